//! The rules of blktap's `vhd-util check` on top of the structural validation of
//! [`super::inspect`]: timestamps, reserved fields, geometry, the batmap, the end of metadata,
//! and parent locators that must name the parent found next to the child.
//!
//! Stricter than vhd-util where vhd-util is unsafe: an all-zero parent UUID ("raw parent") is
//! refused and every locator must point into the child's own directory.

use std::path::Path;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::batmap::{self, BATMAP_COOKIE, BATMAP_HEADER_SIZE, BATMAP_VERSION};
use super::chain::validate_parent_name;
use super::error::VhdError;
use super::footer::{Footer, TAP_VERSION, TYPE_DIFFERENCING, TYPE_FIXED};
use super::header::{
    HEADER_SIZE, LOCATOR_COUNT, PLAT_MAC, PLAT_MACX, PLAT_NONE, PLAT_W2KU, PLAT_W2RU, PLAT_WI2K,
    PLAT_WI2R, platform_name,
};
use super::image::{Access, BAT_UNUSED, Dynamic, Image};
use super::util::{VHD_EPOCH, chs, decode_utf16le, read_at, vhd_now};
use super::{SECTOR_SIZE, VhdInfo};

/// vhd-util tolerates this much clock skew (NFS servers) in timestamps.
const TIMESTAMP_SLACK: u32 = 1800;

fn show_time(vhd_time: u32) -> String {
    let unix = i64::from(vhd_time) + VHD_EPOCH as i64;
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{vhd_time} s after 2000-01-01"))
}

/// Validate `path` the way `vhd-util check -n path` does (plus the refusals above).
pub fn check(path: &Path) -> Result<VhdInfo, VhdError> {
    let img = Image::open(path, Access::Read)?;
    let now = vhd_now();
    // The backup footer is byte-identical to this one (enforced by Image::open).
    check_footer(path, &img.footer, now)?;
    let Some(d) = &img.dynamic else {
        return Ok(img.info());
    };
    check_header(path, d)?;
    let diff = img.footer.disk_type == TYPE_DIFFERENCING;
    if diff {
        check_differencing_header(path, d, now)?;
    } else {
        check_non_differencing_header(path, d)?;
    }
    let batmap_end = check_batmap(&img, d)?;
    check_bat(&img, d, batmap_end)?;
    if diff {
        check_locators(&img, d)?;
        check_parent(&img, d)?;
    }
    Ok(img.info())
}

fn check_footer(p: &Path, f: &Footer, now: u32) -> Result<(), VhdError> {
    if f.timestamp > now.saturating_add(TIMESTAMP_SLACK) {
        return Err(VhdError::check(
            p,
            format!(
                "footer: creation time {} is in the future (now {}, slack {TIMESTAMP_SLACK} s)",
                show_time(f.timestamp),
                show_time(now)
            ),
        ));
    }
    if f.is_tap() && f.creator_version > TAP_VERSION {
        return Err(VhdError::check(
            p,
            format!(
                "footer: tap creator version {:#010x} is newer than the supported 1.3",
                f.creator_version
            ),
        ));
    }
    let max_geometry = chs(f.current_size);
    if f.geometry > max_geometry {
        return Err(VhdError::check(
            p,
            format!(
                "footer: geometry {:#010x} is larger than {max_geometry:#010x} computed for current size {}",
                f.geometry, f.current_size
            ),
        ));
    }
    if f.saved_state > 1 {
        return Err(VhdError::check(
            p,
            format!("footer: saved state {} (must be 0 or 1)", f.saved_state),
        ));
    }
    if f.hidden > 1 {
        return Err(VhdError::check(
            p,
            format!("footer: hidden flag {} (must be 0 or 1)", f.hidden),
        ));
    }
    if let Some(i) = f.reserved.iter().position(|&b| b != 0) {
        return Err(VhdError::check(
            p,
            format!("footer: reserved byte {} is non-zero", 86 + i),
        ));
    }
    if f.uuid == [0; 16] {
        return Err(VhdError::check(p, "footer: unique id is all zero"));
    }
    if f.disk_type == TYPE_FIXED && f.data_offset != u64::MAX {
        return Err(VhdError::check(
            p,
            format!(
                "footer: data offset {:#x} of a fixed disk (must be all ones)",
                f.data_offset
            ),
        ));
    }
    Ok(())
}

fn check_header(p: &Path, d: &Dynamic) -> Result<(), VhdError> {
    let h = &d.header;
    if h.reserved1 != 0 {
        return Err(VhdError::check(
            p,
            format!(
                "dynamic header: reserved field at offset 60 is {:#x} (must be 0)",
                h.reserved1
            ),
        ));
    }
    if let Some(i) = h.reserved2.iter().position(|&b| b != 0) {
        return Err(VhdError::check(
            p,
            format!("dynamic header: reserved byte {} is non-zero", 768 + i),
        ));
    }
    Ok(())
}

fn check_differencing_header(p: &Path, d: &Dynamic, now: u32) -> Result<(), VhdError> {
    let h = &d.header;
    if h.parent_timestamp > now.saturating_add(TIMESTAMP_SLACK) {
        return Err(VhdError::check(
            p,
            format!(
                "dynamic header: parent time stamp {} is in the future (now {})",
                show_time(h.parent_timestamp),
                show_time(now)
            ),
        ));
    }
    // vhd-util converts the name to ASCII; anything else is "invalid parent name".
    match &d.parent_name {
        Some(n) if !n.is_empty() && n.is_ascii() => Ok(()),
        _ => Err(VhdError::check(
            p,
            "dynamic header: parent name is empty or not ASCII",
        )),
    }
}

fn check_non_differencing_header(p: &Path, d: &Dynamic) -> Result<(), VhdError> {
    let h = &d.header;
    if h.parent_name.iter().any(|&b| b != 0) {
        return Err(VhdError::check(
            p,
            "dynamic header: parent name set on a disk without parent",
        ));
    }
    if let Some(i) = h.locators.iter().position(|l| !l.is_all_zero()) {
        return Err(VhdError::check(
            p,
            format!("dynamic header: parent locator {i} set on a disk without parent"),
        ));
    }
    if h.parent_uuid != [0; 16] {
        return Err(VhdError::check(
            p,
            "dynamic header: parent UUID set on a disk without parent",
        ));
    }
    if h.parent_timestamp != 0 {
        return Err(VhdError::check(
            p,
            "dynamic header: parent time stamp set on a disk without parent",
        ));
    }
    Ok(())
}

/// Validate the batmap when libvhd expects one; returns the end of its metadata (0 if none).
fn check_batmap(img: &Image, d: &Dynamic) -> Result<u64, VhdError> {
    let p = &img.path;
    if !img.expects_batmap()? {
        return Ok(0);
    }
    let Some(found) = img.batmap_header()? else {
        return Err(VhdError::check(
            p,
            "batmap: missing (creator tap >= 1.2 requires one after the BAT)",
        ));
    };
    let h = &found.header;
    if h.cookie != BATMAP_COOKIE {
        return Err(VhdError::check(
            p,
            format!(
                "batmap: bad cookie {:?} at {:#x} (expected \"tdbatmap\"; overwritten by a writer that ignores the batmap?)",
                String::from_utf8_lossy(&h.cookie),
                found.header_offset
            ),
        ));
    }
    if h.version > BATMAP_VERSION {
        return Err(VhdError::check(
            p,
            format!(
                "batmap: version {:#010x} is newer than the supported 1.2",
                h.version
            ),
        ));
    }
    if h.size == 0 {
        return Err(VhdError::check(p, "batmap: size is zero"));
    }
    if u64::from(h.size) * SECTOR_SIZE * 8 < u64::from(d.header.max_entries) {
        return Err(VhdError::check(
            p,
            format!(
                "batmap: {} sectors cannot map the BAT's {} entries",
                h.size, d.header.max_entries
            ),
        ));
    }
    if h.offset == 0 || !h.offset.is_multiple_of(SECTOR_SIZE) {
        return Err(VhdError::check(
            p,
            format!(
                "batmap: offset {:#x} is zero or not sector aligned",
                h.offset
            ),
        ));
    }
    let map_len = u64::from(h.size) * SECTOR_SIZE;
    // The offset is tenant-controlled: near u64::MAX the end must not wrap around.
    let Some(map_end) = h
        .offset
        .checked_add(map_len)
        .filter(|&end| end <= img.footer_offset)
    else {
        return Err(VhdError::check(
            p,
            format!(
                "batmap: map at {:#x} ({map_len} bytes) extends past the footer at {:#x}",
                h.offset, img.footer_offset
            ),
        ));
    };
    let covered = batmap::checksum_bytes(img.footer.current_size);
    if covered > map_len {
        return Err(VhdError::check(
            p,
            format!("batmap: {map_len} bytes are fewer than the {covered} the current size needs"),
        ));
    }
    // Only the checksummed part (at most 255 sectors for 2040 GiB): the header's size is
    // tenant-controlled and may be huge.
    let mut map = vec![0u8; covered as usize];
    read_at(&img.file, p, &mut map, h.offset, "batmap")?;
    let computed = batmap::map_checksum(&map, h.version);
    if computed != h.checksum {
        return Err(VhdError::check(
            p,
            format!(
                "batmap checksum mismatch (stored {:#010x}, computed {computed:#010x})",
                h.checksum
            ),
        ));
    }
    let full_blocks = img.footer.current_size >> 21;
    for i in 0..full_blocks {
        let unused = d.bat.get(i as usize).is_none_or(|&e| e == BAT_UNUSED);
        if batmap::test_bit(&map, i) && unused {
            return Err(VhdError::check(
                p,
                format!("batmap: marks block {i} full but its BAT entry is unallocated"),
            ));
        }
    }
    let header_end = found.header_offset + BATMAP_HEADER_SIZE as u64;
    Ok(header_end.max(map_end))
}

fn check_bat(img: &Image, d: &Dynamic, batmap_end: u64) -> Result<(), VhdError> {
    let h = &d.header;
    let mut eom = (d.header_offset + HEADER_SIZE as u64)
        .max(h.table_offset + d.bat_bytes_padded())
        .max(batmap_end);
    for l in h.locators.iter().filter(|l| l.code != PLAT_NONE) {
        eom = eom.max(l.data_offset + l.space_bytes().unwrap_or(0));
    }
    for i in 0..d.used_entries {
        if let Some(at) = d.block_offset(i)
            && at < eom
        {
            return Err(VhdError::check(
                &img.path,
                format!("block {i} at {at:#x} lies inside the metadata, which ends at {eom:#x}"),
            ));
        }
    }
    Ok(())
}

/// Decode a MacX / W2ku / W2ru locator into a '/'-separated path.
fn decode_locator(code: u32, raw: &[u8]) -> Option<String> {
    match code {
        PLAT_MACX => {
            let s = std::str::from_utf8(raw).ok()?;
            let s = s.trim_end_matches('\0');
            s.strip_prefix("file://").map(str::to_string)
        }
        _ => {
            let s = decode_utf16le(raw)?.replace('\\', "/");
            let s = s
                .strip_prefix("c:")
                .or_else(|| s.strip_prefix("C:"))
                .unwrap_or(&s)
                .to_string();
            Some(s)
        }
    }
}

fn check_locators(img: &Image, d: &Dynamic) -> Result<(), VhdError> {
    let p = &img.path;
    let pname = d.parent_name.clone().unwrap_or_default();
    let mut seen: Vec<u32> = Vec::new();
    let mut found = 0;
    for (i, l) in d.header.locators.iter().enumerate().take(LOCATOR_COUNT) {
        if l.code == PLAT_NONE {
            if !l.is_all_zero() {
                return Err(VhdError::check(
                    p,
                    format!("parent locator {i}: unused entry with non-zero fields"),
                ));
            }
            continue;
        }
        if !matches!(
            l.code,
            PLAT_MACX | PLAT_MAC | PLAT_W2KU | PLAT_W2RU | PLAT_WI2R | PLAT_WI2K
        ) {
            return Err(VhdError::check(
                p,
                format!(
                    "parent locator {i}: invalid platform code {}",
                    platform_name(l.code)
                ),
            ));
        }
        if l.data_offset == 0 || l.data_space == 0 || l.data_len == 0 {
            return Err(VhdError::check(
                p,
                format!(
                    "parent locator {i}: data offset {:#x}, space {} and length {} must all be non-zero",
                    l.data_offset, l.data_space, l.data_len
                ),
            ));
        }
        if l.reserved != 0 {
            return Err(VhdError::check(
                p,
                format!("parent locator {i}: reserved field is {:#x}", l.reserved),
            ));
        }
        if seen.contains(&l.code) {
            return Err(VhdError::check(
                p,
                format!(
                    "parent locator {i}: duplicate platform code {}",
                    platform_name(l.code)
                ),
            ));
        }
        seen.push(l.code);
        if !matches!(l.code, PLAT_MACX | PLAT_W2KU | PLAT_W2RU) {
            continue;
        }
        // Bounds were validated by Image::open (data_len <= space, inside the file).
        let mut raw = vec![0u8; l.data_len as usize];
        read_at(&img.file, p, &mut raw, l.data_offset, "parent locator")?;
        let Some(path) = decode_locator(l.code, &raw) else {
            return Err(VhdError::check(
                p,
                format!(
                    "parent locator {i} ({}): data is not a decodable path",
                    platform_name(l.code)
                ),
            ));
        };
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (d, b),
            None => ("", path.as_str()),
        };
        if base != pname {
            return Err(VhdError::check(
                p,
                format!(
                    "parent locator {i} ({}) name {base:?} does not match header parent name {pname:?}",
                    platform_name(l.code)
                ),
            ));
        }
        if !(dir.is_empty() || dir == ".") {
            return Err(VhdError::check(
                p,
                format!(
                    "parent locator {i} ({}) path {path:?} leaves the child's directory",
                    platform_name(l.code)
                ),
            ));
        }
        found += 1;
    }
    if found == 0 {
        return Err(VhdError::check(
            p,
            format!("no MacX, W2ku or W2ru parent locator names the parent {pname:?}"),
        ));
    }
    Ok(())
}

fn check_parent(img: &Image, d: &Dynamic) -> Result<(), VhdError> {
    let p = &img.path;
    if d.header.parent_uuid == [0; 16] {
        return Err(VhdError::check(
            p,
            "dynamic header: parent UUID is all zero (blktap 'raw parent'), refused",
        ));
    }
    let name = d.parent_name.clone().unwrap_or_default();
    validate_parent_name(p, &name).map_err(|_| {
        VhdError::check(
            p,
            format!("header parent name {name:?} is not a plain file name"),
        )
    })?;
    let ppath = p.parent().unwrap_or(Path::new("")).join(&name);
    let parent = Image::open(&ppath, Access::ReadNoFollow).map_err(|e| {
        VhdError::check(
            p,
            format!("parent {} cannot be opened: {e}", ppath.display()),
        )
    })?;
    if parent.footer.uuid != d.header.parent_uuid {
        return Err(VhdError::check(
            p,
            format!(
                "header parent UUID {} does not match the footer UUID {} of {}",
                uuid::Uuid::from_bytes(d.header.parent_uuid),
                uuid::Uuid::from_bytes(parent.footer.uuid),
                ppath.display()
            ),
        ));
    }
    Ok(())
}
