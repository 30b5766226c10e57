//! Writing new dynamic and differencing VHDs with XenServer's layout (what libvhd's
//! `__vhd_create` and tapdisk produce): footer copy @0, header @512, BAT @1536 padded to a
//! sector, batmap header right after the BAT and the map one sector later, then (differencing
//! only) three parent locators, then data blocks placed so that the data after each block's
//! bitmap starts on a 4 KiB boundary, and the footer at EOF.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::batmap::{self, BATMAP_COOKIE, BATMAP_HEADER_SIZE, BATMAP_VERSION, BatmapHeader};
use super::error::VhdError;
use super::footer::{
    COOKIE, FEATURE_RESERVED, FORMAT_VERSION, Footer, TAP_CREATOR, TAP_VERSION, TYPE_DIFFERENCING,
    TYPE_DYNAMIC,
};
use super::header::{HEADER_SIZE, Header, Locator, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use super::image::{BAT_UNUSED, bat_padded, bitmap_bytes};
use super::util::{chs, encode_utf16le, round_up, sync, vhd_now, write_at};
use super::{BLOCK_SIZE, DiskType, MAX_VIRTUAL_SIZE, ParentLink, SECTOR_SIZE, VhdInfo};

const TABLE_OFFSET: u64 = 3 * SECTOR_SIZE;
/// tapdisk aligns block data (not the bitmap) to 4 KiB.
const DATA_ALIGN: u64 = 4096;

/// Parent information written into a differencing header.
#[derive(Clone, Debug)]
pub(crate) struct ParentSpec {
    pub uuid: [u8; 16],
    /// Plain file name of the parent in the same directory.
    pub name: String,
    /// Parent file mtime in VHD time.
    pub timestamp: u32,
}

/// The three locators blktap writes for a parent in the same directory.
pub(crate) fn xen_locator_payloads(name: &str) -> [(u32, Vec<u8>); 3] {
    let win = format!(".\\{name}");
    [
        (PLAT_MACX, format!("file://./{name}").into_bytes()),
        (PLAT_W2KU, encode_utf16le(&win)),
        (PLAT_W2RU, encode_utf16le(&win)),
    ]
}

pub(crate) fn footer_template(size: u64, uuid: Uuid, disk_type: u32) -> Footer {
    Footer {
        cookie: COOKIE,
        features: FEATURE_RESERVED,
        version: FORMAT_VERSION,
        data_offset: SECTOR_SIZE,
        timestamp: vhd_now(),
        creator_app: TAP_CREATOR,
        creator_version: TAP_VERSION,
        creator_os: 0,
        original_size: size,
        current_size: size,
        geometry: chs(size),
        disk_type,
        checksum: 0,
        uuid: *uuid.as_bytes(),
        saved_state: 0,
        hidden: 0,
        reserved: [0; 426],
    }
}

/// A VHD being written. Dropping it before `finish` removes the file, so errors and
/// cancellation never leave a partial image behind.
pub(crate) struct NewImage {
    path: PathBuf,
    file: File,
    pub(crate) footer: Footer,
    header: Header,
    bat: Vec<u32>,
    batmap_header_offset: u64,
    batmap_offset: u64,
    batmap: Vec<u8>,
    /// End of everything written so far; the footer goes here.
    cursor: u64,
    bitmap_size: u64,
    full_bitmap: Vec<u8>,
    scratch: Vec<u8>,
    allocated: u64,
    finished: bool,
}

impl NewImage {
    /// Create `path` exclusively with a virtual size of `size` bytes (a sector multiple).
    pub(crate) fn create(
        path: &Path,
        size: u64,
        uuid: Uuid,
        parent: Option<&ParentSpec>,
    ) -> Result<NewImage, VhdError> {
        // Public entry points round to 2 MiB; rewrites of foreign images keep their size.
        if size == 0 || size > MAX_VIRTUAL_SIZE || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(VhdError::argument(
                path,
                format!(
                    "virtual size {size} must be a non-zero multiple of {SECTOR_SIZE} up to {MAX_VIRTUAL_SIZE}"
                ),
            ));
        }
        let entries = u32::try_from(size.div_ceil(BLOCK_SIZE)).map_err(|_| {
            VhdError::argument(path, format!("virtual size {size} needs too many blocks"))
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    VhdError::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    VhdError::io(path, "creating VHD", e)
                }
            })?;

        let disk_type = if parent.is_some() {
            TYPE_DIFFERENCING
        } else {
            TYPE_DYNAMIC
        };
        let mut img = NewImage {
            path: path.to_path_buf(),
            file,
            footer: footer_template(size, uuid, disk_type),
            header: Header::new(TABLE_OFFSET, entries, BLOCK_SIZE as u32),
            bat: vec![BAT_UNUSED; entries as usize],
            batmap_header_offset: 0,
            batmap_offset: 0,
            batmap: Vec::new(),
            cursor: 0,
            bitmap_size: bitmap_bytes(BLOCK_SIZE),
            full_bitmap: vec![0xff; bitmap_bytes(BLOCK_SIZE) as usize],
            scratch: Vec::with_capacity(DATA_ALIGN as usize),
            allocated: 0,
            finished: false,
        };
        // From here on, Drop removes the file on any error.
        img.batmap_header_offset = TABLE_OFFSET + bat_padded(entries);
        img.batmap_offset = img.batmap_header_offset + BATMAP_HEADER_SIZE as u64;
        let map_sectors = batmap::map_sectors(entries);
        img.batmap = vec![0; map_sectors as usize * SECTOR_SIZE as usize];
        img.cursor = img.batmap_offset + u64::from(map_sectors) * SECTOR_SIZE;

        if let Some(parent) = parent {
            img.header.parent_uuid = parent.uuid;
            img.header.parent_timestamp = parent.timestamp;
            img.header.set_parent_name(path, &parent.name)?;
            for (slot, (code, payload)) in
                xen_locator_payloads(&parent.name).into_iter().enumerate()
            {
                let space = round_up(payload.len() as u64, SECTOR_SIZE).max(SECTOR_SIZE);
                let mut area = payload.clone();
                area.resize(space as usize, 0);
                write_at(&img.file, path, &area, img.cursor, "parent locator")?;
                img.header.locators[slot] = Locator {
                    code,
                    data_space: space as u32,
                    data_len: payload.len() as u32,
                    reserved: 0,
                    data_offset: img.cursor,
                };
                img.cursor += space;
            }
        }
        Ok(img)
    }

    /// Append block `index` whose every sector is present.
    pub(crate) fn write_full_block(&mut self, index: u64, data: &[u8]) -> Result<(), VhdError> {
        let bitmap = std::mem::take(&mut self.full_bitmap);
        let r = self.write_block(index, &bitmap, data);
        self.full_bitmap = bitmap;
        r
    }

    /// Append block `index` with an explicit sector bitmap (copied from another image).
    pub(crate) fn write_block(
        &mut self,
        index: u64,
        bitmap: &[u8],
        data: &[u8],
    ) -> Result<(), VhdError> {
        let slot = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.bat.len())
            .ok_or_else(|| {
                VhdError::argument(&self.path, format!("block {index} is beyond the BAT"))
            })?;
        if self.bat[slot] != BAT_UNUSED {
            return Err(VhdError::argument(
                &self.path,
                format!("block {index} written twice"),
            ));
        }
        if bitmap.len() as u64 != self.bitmap_size || data.len() as u64 != BLOCK_SIZE {
            return Err(VhdError::argument(
                &self.path,
                format!(
                    "block {index}: got {} bitmap and {} data bytes",
                    bitmap.len(),
                    data.len()
                ),
            ));
        }
        let bitmap_at = round_up(self.cursor + self.bitmap_size, DATA_ALIGN) - self.bitmap_size;
        let sector = u32::try_from(bitmap_at / SECTOR_SIZE)
            .ok()
            .filter(|&s| s != BAT_UNUSED)
            .ok_or_else(|| {
                VhdError::argument(
                    &self.path,
                    "image would exceed the 2 TiB addressable by the BAT",
                )
            })?;
        // Gap and bitmap in one write, the data in a second: two syscalls per block.
        self.scratch.clear();
        self.scratch.resize((bitmap_at - self.cursor) as usize, 0);
        self.scratch.extend_from_slice(bitmap);
        write_at(
            &self.file,
            &self.path,
            &self.scratch,
            self.cursor,
            "block bitmap",
        )?;
        let data_at = bitmap_at + self.bitmap_size;
        write_at(&self.file, &self.path, data, data_at, "block data")?;
        self.bat[slot] = sector;
        if bitmap.iter().all(|&b| b == 0xff) {
            batmap::set_bit(&mut self.batmap, index);
        }
        self.cursor = data_at + BLOCK_SIZE;
        self.allocated += 1;
        Ok(())
    }

    /// Write BAT, batmap, header and both footers, fsync, and return the result.
    pub(crate) fn finish(mut self) -> Result<VhdInfo, VhdError> {
        let p = self.path.clone();
        self.footer.seal();
        self.header.seal();

        let mut bat = vec![0u8; bat_padded(self.header.max_entries) as usize];
        for (i, e) in self.bat.iter().enumerate() {
            bat[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
        }
        write_at(&self.file, &p, &bat, self.header.table_offset, "BAT")?;

        let covered =
            batmap::checksum_bytes(self.footer.current_size).min(self.batmap.len() as u64);
        let bh = BatmapHeader {
            cookie: BATMAP_COOKIE,
            offset: self.batmap_offset,
            size: (self.batmap.len() as u64 / SECTOR_SIZE) as u32,
            version: BATMAP_VERSION,
            checksum: batmap::map_checksum(&self.batmap[..covered as usize], BATMAP_VERSION),
        };
        write_at(
            &self.file,
            &p,
            &bh.encode(),
            self.batmap_header_offset,
            "batmap header",
        )?;
        write_at(&self.file, &p, &self.batmap, self.batmap_offset, "batmap")?;
        write_at(&self.file, &p, &self.header.encode(), SECTOR_SIZE, "header")?;
        let footer = self.footer.encode();
        write_at(&self.file, &p, &footer, self.cursor, "footer")?;
        write_at(&self.file, &p, &footer, 0, "footer copy")?;
        let file_size = self.cursor + footer.len() as u64;
        self.file
            .set_len(file_size)
            .map_err(|e| VhdError::io(&p, "setting file length", e))?;
        sync(&self.file, &p)?;
        self.finished = true;

        let parent = (self.footer.disk_type == TYPE_DIFFERENCING).then(|| ParentLink {
            uuid: Uuid::from_bytes(self.header.parent_uuid),
            name: self.header.parent_name().unwrap_or_default(),
        });
        Ok(VhdInfo {
            uuid: Uuid::from_bytes(self.footer.uuid),
            disk_type: if parent.is_some() {
                DiskType::Differencing
            } else {
                DiskType::Dynamic
            },
            virtual_size: self.footer.current_size,
            parent,
            hidden: self.footer.hidden != 0,
            file_size,
            allocated_blocks: self.allocated,
            block_size: BLOCK_SIZE,
            creator: self.footer.creator_string(),
            creator_version: self.footer.creator_version,
        })
    }
}

impl Drop for NewImage {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

// HEADER_SIZE is where the BAT starts after the footer copy; keep the constant honest.
const _: () = assert!(TABLE_OFFSET == SECTOR_SIZE + HEADER_SIZE as u64);
