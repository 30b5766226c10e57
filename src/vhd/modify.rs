//! Changes to existing images: hidden flag, UUID, parent link, virtual size.
//!
//! Small metadata updates are done in place (primary footer first, then the copy at 0, as
//! libvhd does). When the new metadata does not fit the existing layout (BAT too small, no
//! room for the locators), the image is rewritten into a sibling temporary file which is then
//! renamed over the original: a crash leaves either the old or the new file, never a mix.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::batmap::{self, BATMAP_COOKIE};
use super::chain::validate_parent_name;
use super::error::VhdError;
use super::footer::Footer;
use super::header::{Locator, PLAT_NONE};
use super::image::{Access, BAT_UNUSED, Image};
use super::util::{chs, read_at, round_up, sync, sync_dir, unix_to_vhd_time, write_at};
use super::writer::{NewImage, ParentSpec, xen_locator_payloads};
use super::{BLOCK_SIZE, DiskType, SECTOR_SIZE, VhdInfo, checked_size};

/// Write `footer` (sealed) to EOF and, for dynamic and differencing disks, to offset 0.
pub(crate) fn write_footers(img: &Image, footer: &Footer) -> Result<(), VhdError> {
    let enc = footer.encode();
    write_at(&img.file, &img.path, &enc, img.footer_offset, "footer")?;
    if img.dynamic.is_some() {
        write_at(&img.file, &img.path, &enc, 0, "footer copy")?;
    }
    sync(&img.file, &img.path)
}

/// Set or clear blktap's hidden flag (footer byte 85) in both footers.
pub fn set_hidden(path: &Path, hidden: bool) -> Result<(), VhdError> {
    let img = Image::open(path, Access::Write)?;
    let mut f = img.footer.clone();
    f.hidden = u8::from(hidden);
    f.seal();
    write_footers(&img, &f)
}

/// Give the image a new footer UUID (both copies). Children that pointed at the old UUID must
/// be re-parented afterwards.
pub fn set_uuid(path: &Path, uuid: Uuid) -> Result<(), VhdError> {
    let img = Image::open(path, Access::Write)?;
    let mut f = img.footer.clone();
    f.uuid = *uuid.as_bytes();
    f.seal();
    write_footers(&img, &f)
}

fn mtime_vhd(path: &Path, file: &fs::File) -> Result<u32, VhdError> {
    let m = file
        .metadata()
        .map_err(|e| VhdError::io(path, "stat of parent", e))?;
    Ok(unix_to_vhd_time(u64::try_from(m.mtime()).unwrap_or(0)))
}

fn canonical_dir(p: &Path) -> Result<PathBuf, VhdError> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::canonicalize(dir).map_err(|e| VhdError::io(dir, "resolving directory", e))
}

/// Turns the dynamic disk `child` into a differencing child of `parent` (same directory):
/// blocks `child` holds shadow the parent's, the rest read through. This is how a chain is
/// built from layers written with [`super::write_dynamic_from`].
pub fn make_child_of(child: &Path, parent: &Path) -> Result<(), VhdError> {
    {
        let img = Image::open(child, Access::Write)?;
        if img.disk_type() != DiskType::Dynamic {
            return Err(VhdError::argument(
                child,
                format!(
                    "is a {} disk; only a dynamic disk can become a child",
                    img.disk_type()
                ),
            ));
        }
        let mut footer = img.footer.clone();
        footer.disk_type = 4;
        footer.seal();
        write_footers(&img, &footer)?;
    }
    set_parent(child, parent)
}

/// Re-parent the differencing disk `child` onto `parent`, which must be in the same
/// directory: header parent UUID = parent footer UUID, parent name = the parent's file name,
/// parent timestamp = parent mtime, and exactly XenServer's three locators (MacX
/// `file://./<name>`, W2ku and W2ru `.\<name>`).
pub fn set_parent(child: &Path, parent: &Path) -> Result<(), VhdError> {
    let img = Image::open(child, Access::Write)?;
    if img.disk_type() != DiskType::Differencing {
        return Err(VhdError::argument(
            child,
            format!(
                "is a {} disk, only differencing disks have a parent",
                img.disk_type()
            ),
        ));
    }
    let pimg = Image::open(parent, Access::Read)?;
    if canonical_dir(child)? != canonical_dir(parent)? {
        return Err(VhdError::argument(
            child,
            format!(
                "parent {} is not in the same directory as the child",
                parent.display()
            ),
        ));
    }
    let same_file = {
        let a = img
            .file
            .metadata()
            .map_err(|e| VhdError::io(child, "stat", e))?;
        let b = pimg
            .file
            .metadata()
            .map_err(|e| VhdError::io(parent, "stat", e))?;
        a.dev() == b.dev() && a.ino() == b.ino()
    };
    if same_file || pimg.footer.uuid == img.footer.uuid {
        return Err(VhdError::argument(child, "a disk cannot be its own parent"));
    }
    let name = parent
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| VhdError::argument(parent, "parent file name is not UTF-8"))?
        .to_string();
    validate_parent_name(child, &name)?;
    if pimg.virtual_size() > img.virtual_size() {
        return Err(VhdError::argument(
            child,
            format!(
                "virtual size {} is smaller than the new parent's {}",
                img.virtual_size(),
                pimg.virtual_size()
            ),
        ));
    }
    let spec = ParentSpec {
        uuid: pimg.footer.uuid,
        name,
        timestamp: mtime_vhd(parent, &pimg.file)?,
    };
    if !relink_in_place(&img, &spec)? {
        rewrite(&img, img.virtual_size(), Some(&spec))?;
    }
    Ok(())
}

/// Reuse the data areas of the first three existing locators when each is large enough.
fn relink_in_place(img: &Image, spec: &ParentSpec) -> Result<bool, VhdError> {
    let Some(d) = &img.dynamic else {
        return Ok(false);
    };
    let areas: Vec<(u64, u64)> = d
        .header
        .locators
        .iter()
        .filter(|l| l.code != PLAT_NONE)
        .filter_map(|l| l.space_bytes().map(|s| (l.data_offset, s)))
        .collect();
    let payloads = xen_locator_payloads(&spec.name);
    if areas.len() < payloads.len()
        || payloads
            .iter()
            .zip(&areas)
            .any(|((_, data), (_, space))| data.len() as u64 > *space)
    {
        return Ok(false);
    }
    let mut header = d.header.clone();
    header.parent_uuid = spec.uuid;
    header.parent_timestamp = spec.timestamp;
    header.set_parent_name(&img.path, &spec.name)?;
    header.locators = [Locator::default(); 8];
    for (slot, ((code, data), (offset, space))) in payloads.iter().zip(&areas).enumerate() {
        let mut area = data.clone();
        area.resize(*space as usize, 0);
        write_at(&img.file, &img.path, &area, *offset, "parent locator")?;
        header.locators[slot] = Locator {
            code: *code,
            data_space: *space as u32,
            data_len: data.len() as u32,
            reserved: 0,
            data_offset: *offset,
        };
    }
    header.seal();
    // Locator data first: a crash before the header write leaves the old link readable.
    sync(&img.file, &img.path)?;
    write_at(
        &img.file,
        &img.path,
        &header.encode(),
        d.header_offset,
        "dynamic header",
    )?;
    sync(&img.file, &img.path)?;
    Ok(true)
}

/// Grow the virtual size to `new_size` rounded up to 2 MiB. Shrinking is refused.
pub fn grow(path: &Path, new_size: u64) -> Result<VhdInfo, VhdError> {
    let img = Image::open(path, Access::Write)?;
    let current = img.virtual_size();
    if new_size < current {
        return Err(VhdError::Shrink {
            path: path.to_path_buf(),
            current,
            requested: new_size,
        });
    }
    let size = checked_size(path, new_size)?;
    if size == current {
        return Ok(img.info());
    }
    match &img.dynamic {
        None => grow_fixed(&img, size)?,
        Some(_) => {
            if !grow_dynamic_in_place(&img, size)? {
                let parent = parent_spec_of(&img)?;
                rewrite(&img, size, parent.as_ref())?;
            }
        }
    }
    drop(img);
    Ok(Image::open(path, Access::Read)?.info())
}

fn grow_fixed(img: &Image, size: u64) -> Result<(), VhdError> {
    let mut f = img.footer.clone();
    f.current_size = size;
    f.geometry = chs(size);
    f.seal();
    if size <= img.footer_offset {
        // The data area is already large enough.
        return write_footers(img, &f);
    }
    // New footer first (extends the file), then clear the old one, now inside the data.
    write_at(&img.file, &img.path, &f.encode(), size, "footer")?;
    sync(&img.file, &img.path)?;
    let len = img.file_size - img.footer_offset;
    write_at(
        &img.file,
        &img.path,
        &vec![0u8; len as usize],
        img.footer_offset,
        "old footer",
    )?;
    sync(&img.file, &img.path)
}

/// Grow within the existing BAT (or its sector padding). Returns false when a rewrite is
/// needed.
fn grow_dynamic_in_place(img: &Image, size: u64) -> Result<bool, VhdError> {
    let Some(d) = &img.dynamic else {
        return Ok(false);
    };
    let need = size.div_ceil(d.block_size);
    let capacity = d.bat_bytes_padded() / 4;
    if need > capacity {
        return Ok(false);
    }
    let found = match img.batmap_header()? {
        Some(b) if b.header.cookie == BATMAP_COOKIE => Some(b),
        _ => None,
    };
    if let Some(b) = &found
        && u64::from(b.header.size) * SECTOR_SIZE * 8 < need
    {
        return Ok(false);
    }
    let p = &img.path;
    // Entries that become live may hold leftovers: mark them unused first.
    let unused = BAT_UNUSED.to_be_bytes();
    let mut entries = Vec::new();
    for _ in d.used_entries..need {
        entries.extend_from_slice(&unused);
    }
    write_at(
        &img.file,
        p,
        &entries,
        d.header.table_offset + d.used_entries * 4,
        "BAT",
    )?;
    if need > u64::from(d.header.max_entries) {
        let mut h = d.header.clone();
        h.max_entries = need as u32;
        h.seal();
        write_at(&img.file, p, &h.encode(), d.header_offset, "dynamic header")?;
    }
    if let Some(b) = found {
        refresh_batmap(img, &b.header, b.header_offset, d.used_entries, need, size)?;
    }
    let mut f = img.footer.clone();
    f.current_size = size;
    f.geometry = chs(size);
    f.seal();
    sync(&img.file, p)?;
    write_footers(img, &f)?;
    Ok(true)
}

/// Clear batmap bits of newly live entries and recompute the checksum for the new size.
fn refresh_batmap(
    img: &Image,
    h: &batmap::BatmapHeader,
    header_offset: u64,
    from: u64,
    to: u64,
    size: u64,
) -> Result<(), VhdError> {
    let len = u64::from(h.size) * SECTOR_SIZE;
    if h.offset == 0
        || h.offset
            .checked_add(len)
            .is_none_or(|end| end > img.footer_offset)
    {
        // A damaged batmap is check()'s business; growing does not make it worse.
        return Ok(());
    }
    // Read only what the new size needs; the header's size is tenant-controlled.
    let want = batmap::checksum_bytes(size)
        .max(round_up(to.div_ceil(8), SECTOR_SIZE))
        .min(len);
    let mut map = vec![0u8; want as usize];
    read_at(&img.file, &img.path, &mut map, h.offset, "batmap")?;
    for i in from..to {
        if let Some(b) = map.get_mut((i / 8) as usize) {
            *b &= !(0x80u8 >> (i % 8));
        }
    }
    let covered = batmap::checksum_bytes(size).min(want) as usize;
    let mut nh = h.clone();
    nh.checksum = batmap::map_checksum(&map[..covered], h.version);
    write_at(&img.file, &img.path, &map, h.offset, "batmap")?;
    write_at(
        &img.file,
        &img.path,
        &nh.encode(),
        header_offset,
        "batmap header",
    )
}

fn parent_spec_of(img: &Image) -> Result<Option<ParentSpec>, VhdError> {
    let Some(d) = &img.dynamic else {
        return Ok(None);
    };
    if img.disk_type() != DiskType::Differencing {
        return Ok(None);
    }
    let name = d.parent_name.clone().unwrap_or_default();
    if validate_parent_name(&img.path, &name).is_err() {
        return Err(VhdError::unsupported(
            &img.path,
            format!(
                "parent name {name:?} is not a plain file name; re-parent with set_parent first"
            ),
        ));
    }
    Ok(Some(ParentSpec {
        uuid: d.header.parent_uuid,
        name,
        timestamp: d.header.parent_timestamp,
    }))
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{name}.{}.tmp", Uuid::new_v4().simple());
    match path.parent() {
        Some(d) => d.join(tmp),
        None => PathBuf::from(tmp),
    }
}

/// Rewrite `img` with XenServer's layout for `size` bytes, keeping its identity (UUID,
/// timestamps, flags) and every allocated block verbatim (bitmap included), then rename the
/// result over the original.
fn rewrite(img: &Image, size: u64, parent: Option<&ParentSpec>) -> Result<VhdInfo, VhdError> {
    let p = &img.path;
    let Some(d) = &img.dynamic else {
        return Err(VhdError::unsupported(
            p,
            "only dynamic and differencing disks are rewritten",
        ));
    };
    if d.block_size != BLOCK_SIZE {
        return Err(VhdError::unsupported(
            p,
            format!(
                "block size {} (only {BLOCK_SIZE}-byte blocks can be relocated)",
                d.block_size
            ),
        ));
    }
    let perms = img
        .file
        .metadata()
        .map_err(|e| VhdError::io(p, "stat", e))?
        .permissions();
    let tmp = temp_sibling(p);
    let mut out = NewImage::create(&tmp, size, Uuid::from_bytes(img.footer.uuid), parent)?;
    out.footer.timestamp = img.footer.timestamp;
    out.footer.hidden = img.footer.hidden;
    out.footer.saved_state = img.footer.saved_state;
    out.footer.original_size = img.footer.original_size;
    out.footer.features = img.footer.features;
    let mut bitmap = vec![0u8; d.bitmap_size as usize];
    let mut data = vec![0u8; BLOCK_SIZE as usize];
    for b in 0..d.used_entries {
        if let Some(at) = d.block_offset(b) {
            read_at(&img.file, p, &mut bitmap, at, "block bitmap")?;
            read_at(&img.file, p, &mut data, at + d.bitmap_size, "block data")?;
            out.write_block(b, &bitmap, &data)?;
        }
    }
    let info = out.finish()?;
    let placed = fs::set_permissions(&tmp, perms)
        .map_err(|e| VhdError::io(&tmp, "setting permissions", e))
        .and_then(|()| {
            fs::rename(&tmp, p)
                .map_err(|e| VhdError::io(p, "renaming rewritten image into place", e))
        });
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(p.parent().unwrap_or(Path::new("")))?;
    Ok(info)
}
