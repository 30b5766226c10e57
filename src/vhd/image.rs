//! Opening one VHD file and validating its structure: the code that stands between hostile
//! tenant images and every reader or writer in this module. Every offset and size read from
//! the file is checked against the file size before it is used, allocations are bounded, and
//! all metadata regions and data blocks are checked for overlaps.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::error::VhdError;
use super::footer::{FOOTER_SIZE, Footer, TYPE_DIFFERENCING, TYPE_DYNAMIC, TYPE_FIXED};
use super::header::{HEADER_SIZE, Header, LOCATOR_COUNT, platform_name};
use super::util::{get_u32, read_at, round_up};
use super::{BLOCK_SIZE, DiskType, ParentLink, SECTOR_SIZE, VhdInfo};

/// BAT value of a block that is not allocated.
pub(crate) const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Bound on the BAT we accept (2 Mi entries): twice the 4 MiB a 2040 GiB disk with 2 MiB
/// blocks needs, small enough that a hostile header cannot make us allocate gigabytes.
const MAX_BAT_BYTES: u64 = 8 << 20;
const MIN_BLOCK_SIZE: u64 = 512;
/// libvhd refuses larger blocks, and so do we.
const MAX_BLOCK_SIZE: u64 = BLOCK_SIZE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read-only, following a symlink in the last component.
    Read,
    /// Read-only, refusing a symlink (used for parents found by name).
    ReadNoFollow,
    /// Read-write for in-place metadata updates.
    Write,
}

#[derive(Debug)]
pub(crate) struct Image {
    pub path: PathBuf,
    pub file: File,
    pub file_size: u64,
    pub footer: Footer,
    /// Offset of the primary footer (EOF - 512, or EOF - 511 for a legacy short footer).
    pub footer_offset: u64,
    pub dynamic: Option<Dynamic>,
}

#[derive(Debug)]
pub(crate) struct Dynamic {
    pub header: Header,
    pub header_offset: u64,
    /// The first `used_entries` BAT entries (those covering the current size), validated.
    /// Entries past them are never read.
    pub bat: Vec<u32>,
    pub used_entries: u64,
    pub block_size: u64,
    /// Bytes of the sector bitmap in front of each block (a whole number of sectors).
    pub bitmap_size: u64,
    /// Decoded header parent name (differencing disks only).
    pub parent_name: Option<String>,
}

impl Dynamic {
    /// Byte offset of the sector bitmap of block `index`, when allocated.
    pub(crate) fn block_offset(&self, index: u64) -> Option<u64> {
        if index >= self.used_entries {
            return None;
        }
        let e = *self.bat.get(usize::try_from(index).ok()?)?;
        (e != BAT_UNUSED).then(|| u64::from(e) * SECTOR_SIZE)
    }

    pub(crate) fn bat_bytes_padded(&self) -> u64 {
        bat_padded(self.header.max_entries)
    }
}

pub(crate) fn bat_padded(entries: u32) -> u64 {
    round_up(u64::from(entries) * 4, SECTOR_SIZE).max(SECTOR_SIZE)
}

/// Bytes of the per-block sector bitmap (one bit per sector, whole sectors, at least one).
pub(crate) fn bitmap_bytes(block_size: u64) -> u64 {
    round_up((block_size / SECTOR_SIZE).div_ceil(8), SECTOR_SIZE).max(SECTOR_SIZE)
}

#[derive(Clone, Copy, Debug)]
enum Region {
    FooterCopy,
    Header,
    Bat,
    Locator(usize),
    Block(u64),
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Region::FooterCopy => write!(f, "the footer copy at offset 0"),
            Region::Header => write!(f, "the dynamic header"),
            Region::Bat => write!(f, "the BAT"),
            Region::Locator(i) => write!(f, "parent locator {i} data"),
            Region::Block(i) => write!(f, "block {i}"),
        }
    }
}

impl Image {
    pub(crate) fn open(path: &Path, access: Access) -> Result<Image, VhdError> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        match access {
            Access::Read => {}
            Access::ReadNoFollow => {
                opts.custom_flags(libc::O_NOFOLLOW);
            }
            Access::Write => {
                opts.write(true);
            }
        }
        let file = opts
            .open(path)
            .map_err(|e| VhdError::io(path, "opening VHD", e))?;
        let meta = file
            .metadata()
            .map_err(|e| VhdError::io(path, "stat of VHD", e))?;
        if !meta.is_file() {
            return Err(VhdError::invalid(path, "not a regular file"));
        }
        Self::from_file(path, file, meta.len())
    }

    fn from_file(path: &Path, file: File, file_size: u64) -> Result<Image, VhdError> {
        let path = path.to_path_buf();
        let p = path.as_path();
        if file_size < FOOTER_SIZE as u64 {
            return Err(VhdError::invalid(
                p,
                format!("file size {file_size} is too small to hold a 512-byte footer"),
            ));
        }
        // Virtual PC before 2004 wrote a 511-byte footer; libvhd still reads those.
        let (footer_offset, footer_len) = match file_size % SECTOR_SIZE {
            0 => (file_size - 512, 512),
            511 => (file_size - 511, 511),
            r => {
                return Err(VhdError::invalid(
                    p,
                    format!(
                        "file size {file_size} is not a multiple of 512 (remainder {r}): truncated or not a VHD"
                    ),
                ));
            }
        };
        let mut fbuf = [0u8; FOOTER_SIZE];
        read_at(&file, p, &mut fbuf[..footer_len], footer_offset, "footer")?;
        let footer = Footer::parse(&fbuf);
        footer.validate(p, "footer")?;

        let mut img = Image {
            path: path.clone(),
            file,
            file_size,
            footer,
            footer_offset,
            dynamic: None,
        };
        match img.footer.disk_type {
            TYPE_FIXED => {
                if footer_offset < img.footer.current_size {
                    return Err(VhdError::invalid(
                        p,
                        format!(
                            "fixed disk: data area of {footer_offset} bytes is smaller than the current size {}",
                            img.footer.current_size
                        ),
                    ));
                }
            }
            TYPE_DYNAMIC | TYPE_DIFFERENCING => {
                img.load_dynamic()?;
            }
            // Footer::validate accepted only the three types above.
            t => {
                return Err(VhdError::invalid(p, format!("footer: disk type {t}")));
            }
        }
        Ok(img)
    }

    fn load_dynamic(&mut self) -> Result<(), VhdError> {
        let p = self.path.as_path();
        let footer_offset = self.footer_offset;

        let mut bbuf = [0u8; FOOTER_SIZE];
        read_at(&self.file, p, &mut bbuf, 0, "backup footer")?;
        let backup = Footer::parse(&bbuf);
        backup.validate(p, "backup footer")?;
        if backup != self.footer {
            return Err(VhdError::invalid(
                p,
                "backup footer at offset 0 differs from the primary footer at EOF",
            ));
        }

        let header_offset = self.footer.data_offset;
        if header_offset < SECTOR_SIZE
            || header_offset
                .checked_add(HEADER_SIZE as u64)
                .is_none_or(|end| end > footer_offset)
        {
            return Err(VhdError::invalid(
                p,
                format!(
                    "footer: data offset {header_offset:#x} does not leave room for the 1024-byte header between the footer copy and the footer at {footer_offset:#x}"
                ),
            ));
        }
        let mut hbuf = [0u8; HEADER_SIZE];
        read_at(&self.file, p, &mut hbuf, header_offset, "dynamic header")?;
        let header = Header::parse(&hbuf);
        header.validate(p)?;

        let block_size = u64::from(header.block_size);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(VhdError::invalid(
                p,
                format!(
                    "dynamic header: block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
                ),
            ));
        }
        let used_entries = self.footer.current_size.div_ceil(block_size);
        let max_entries = u64::from(header.max_entries);
        if max_entries < used_entries {
            return Err(VhdError::invalid(
                p,
                format!(
                    "dynamic header: BAT has {max_entries} entries but current size {} needs {used_entries} blocks of {block_size} bytes",
                    self.footer.current_size
                ),
            ));
        }
        let bat_len = bat_padded(header.max_entries);
        if bat_len > MAX_BAT_BYTES {
            return Err(VhdError::invalid(
                p,
                format!(
                    "dynamic header: BAT of {max_entries} entries exceeds the {MAX_BAT_BYTES}-byte limit"
                ),
            ));
        }
        let table = header.table_offset;
        if !table.is_multiple_of(SECTOR_SIZE) {
            return Err(VhdError::invalid(
                p,
                format!("dynamic header: table offset {table:#x} is not sector aligned"),
            ));
        }
        if table
            .checked_add(bat_len)
            .is_none_or(|end| end > footer_offset)
        {
            return Err(VhdError::invalid(
                p,
                format!(
                    "dynamic header: BAT at {table:#x} ({bat_len} bytes) extends past the footer at {footer_offset:#x}"
                ),
            ));
        }
        // used_entries <= max_entries, whose BAT fits MAX_BAT_BYTES.
        let mut raw = vec![0u8; used_entries as usize * 4];
        read_at(&self.file, p, &mut raw, table, "BAT")?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| get_u32(c, 0)).collect();

        let mut regions: Vec<(u64, u64, Region)> = vec![
            (0, SECTOR_SIZE, Region::FooterCopy),
            (
                header_offset,
                header_offset + HEADER_SIZE as u64,
                Region::Header,
            ),
            (table, table + bat_len, Region::Bat),
        ];

        let is_diff = self.footer.disk_type == TYPE_DIFFERENCING;
        for (i, loc) in header.locators.iter().enumerate().take(LOCATOR_COUNT) {
            if loc.code == 0 {
                continue;
            }
            if !loc.known_code() {
                return Err(VhdError::invalid(
                    p,
                    format!(
                        "parent locator {i}: unknown platform code {}",
                        platform_name(loc.code)
                    ),
                ));
            }
            let Some(space) = loc.space_bytes() else {
                return Err(VhdError::invalid(
                    p,
                    format!(
                        "parent locator {i}: data space {} is neither sectors (<512) nor a multiple of 512 bytes",
                        loc.data_space
                    ),
                ));
            };
            if u64::from(loc.data_len) > space {
                return Err(VhdError::invalid(
                    p,
                    format!(
                        "parent locator {i}: data length {} exceeds its data space {space}",
                        loc.data_len
                    ),
                ));
            }
            let start = loc.data_offset;
            if start == 0
                || start
                    .checked_add(space)
                    .is_none_or(|end| end > footer_offset)
            {
                return Err(VhdError::invalid(
                    p,
                    format!(
                        "parent locator {i}: data at {start:#x} ({space} bytes) is outside the file before the footer at {footer_offset:#x}"
                    ),
                ));
            }
            regions.push((start, start + space, Region::Locator(i)));
        }

        let bitmap_size = bitmap_bytes(block_size);
        let span = bitmap_size + block_size;
        for (i, &e) in bat.iter().enumerate().take(used_entries as usize) {
            if e == BAT_UNUSED {
                continue;
            }
            let start = u64::from(e) * SECTOR_SIZE;
            let end = start + span;
            if end > footer_offset {
                return Err(VhdError::invalid(
                    p,
                    format!(
                        "BAT entry {i}: block at {start:#x} ({span} bytes with bitmap) extends past the footer at {footer_offset:#x}"
                    ),
                ));
            }
            regions.push((start, end, Region::Block(i as u64)));
        }
        regions.sort_unstable_by_key(|r| (r.0, r.1));
        for w in regions.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if b.0 < a.1 {
                return Err(VhdError::invalid(
                    p,
                    format!(
                        "{} ({:#x}..{:#x}) overlaps {} ({:#x}..{:#x})",
                        b.2, b.0, b.1, a.2, a.0, a.1
                    ),
                ));
            }
        }

        let parent_name = if is_diff {
            match header.parent_name() {
                Some(n) => Some(n),
                None => {
                    return Err(VhdError::invalid(
                        p,
                        "dynamic header: parent name is not valid UTF-16BE",
                    ));
                }
            }
        } else {
            None
        };

        self.dynamic = Some(Dynamic {
            header,
            header_offset,
            bat,
            used_entries,
            block_size,
            bitmap_size,
            parent_name,
        });
        Ok(())
    }

    pub(crate) fn disk_type(&self) -> DiskType {
        match self.footer.disk_type {
            TYPE_FIXED => DiskType::Fixed,
            TYPE_DIFFERENCING => DiskType::Differencing,
            _ => DiskType::Dynamic,
        }
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.footer.current_size
    }

    pub(crate) fn allocated_blocks(&self) -> u64 {
        match &self.dynamic {
            Some(d) => d.bat.iter().filter(|&&e| e != BAT_UNUSED).count() as u64,
            None => self.footer.current_size.div_ceil(BLOCK_SIZE),
        }
    }

    pub(crate) fn info(&self) -> VhdInfo {
        let parent = match (&self.dynamic, self.footer.disk_type) {
            (Some(d), TYPE_DIFFERENCING) => Some(ParentLink {
                uuid: Uuid::from_bytes(d.header.parent_uuid),
                name: d.parent_name.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        VhdInfo {
            uuid: Uuid::from_bytes(self.footer.uuid),
            disk_type: self.disk_type(),
            virtual_size: self.footer.current_size,
            parent,
            hidden: self.footer.hidden != 0,
            file_size: self.file_size,
            allocated_blocks: self.allocated_blocks(),
            block_size: self.dynamic.as_ref().map_or(BLOCK_SIZE, |d| d.block_size),
            creator: self.footer.creator_string(),
            creator_version: self.footer.creator_version,
        }
    }
}

/// A batmap as found in a file.
#[derive(Debug)]
pub(crate) struct FoundBatmap {
    pub header_offset: u64,
    pub header: super::batmap::BatmapHeader,
}

impl Image {
    /// Whether libvhd expects a batmap in this file (`vhd_has_batmap`): dynamic or
    /// differencing, creator "tap", version >= 1.2 always, 1.1 only if the cookie is there.
    pub(crate) fn expects_batmap(&self) -> Result<bool, VhdError> {
        if self.dynamic.is_none() || !self.footer.is_tap() {
            return Ok(false);
        }
        let v = self.footer.creator_version;
        if v <= 0x0000_0001 {
            return Ok(false);
        }
        if v >= 0x0001_0002 {
            return Ok(true);
        }
        Ok(self
            .batmap_header()?
            .is_some_and(|b| b.header.cookie == super::batmap::BATMAP_COOKIE))
    }

    /// The sector after the padded BAT, parsed as a batmap header, when it lies inside the
    /// file before the footer. Nothing is validated.
    pub(crate) fn batmap_header(&self) -> Result<Option<FoundBatmap>, VhdError> {
        let Some(d) = &self.dynamic else {
            return Ok(None);
        };
        let off = d.header.table_offset + d.bat_bytes_padded();
        if off + super::batmap::BATMAP_HEADER_SIZE as u64 > self.footer_offset {
            return Ok(None);
        }
        let mut b = [0u8; super::batmap::BATMAP_HEADER_SIZE];
        read_at(&self.file, &self.path, &mut b, off, "batmap header")?;
        Ok(Some(FoundBatmap {
            header_offset: off,
            header: super::batmap::BatmapHeader::parse(&b),
        }))
    }
}
