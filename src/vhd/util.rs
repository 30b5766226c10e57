//! Small helpers shared by the VHD structures: big-endian fields, checksums, the VHD epoch,
//! CHS geometry, UTF-16 names and positioned file I/O with path-carrying errors.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::VhdError;

/// Unix time of 2000-01-01 00:00:00 UTC, the VHD epoch.
pub(crate) const VHD_EPOCH: u64 = 946_684_800;

pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

/// One's complement of the byte sum: the checksum of footers, headers and batmaps.
pub(crate) fn ones_complement_sum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)))
}

pub(crate) fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align).saturating_mul(align)
}

pub(crate) fn is_zero(buf: &[u8]) -> bool {
    // Wide words per 4 KiB page: vectorises well and stops early on data.
    for page in buf.chunks(4096) {
        let mut words = page.chunks_exact(16);
        let mut acc = 0u128;
        for w in &mut words {
            acc |= u128::from_ne_bytes(array(w, 0));
        }
        if acc != 0 || words.remainder().iter().any(|&b| b != 0) {
            return false;
        }
    }
    true
}

/// Seconds since the VHD epoch, as stored in footers and headers.
pub(crate) fn vhd_now() -> u32 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    unix_to_vhd_time(unix)
}

pub(crate) fn unix_to_vhd_time(unix: u64) -> u32 {
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// CHS geometry for a disk of `size` bytes, following the algorithm of the VHD specification
/// (the same as libvhd `vhd_chs` and qemu): cylinders u16, heads u8, sectors per track u8.
pub(crate) fn chs(size: u64) -> u32 {
    let max_secs: u64 = 65535 * 16 * 255;
    let secs = size.div_ceil(512).clamp(1, max_secs);
    let (spt, heads, cth);
    if secs >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = secs / spt;
    } else {
        let mut s = 17;
        let mut c = secs / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            c = secs / s;
            h = 16;
        }
        if c >= h * 1024 {
            s = 63;
            c = secs / s;
            h = 16;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cylinders = cth / heads;
    // Every factor is bounded above (cylinders <= 65535), so the casts are lossless.
    ((cylinders as u32) << 16) | ((heads as u32) << 8) | (spt as u32)
}

/// Decode a NUL-terminated UTF-16 big-endian name (the header's parent name).
pub(crate) fn decode_utf16be(bytes: &[u8]) -> Option<String> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

/// Decode a UTF-16 little-endian string (Windows parent locators), stopping at a NUL.
pub(crate) fn decode_utf16le(bytes: &[u8]) -> Option<String> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

pub(crate) fn encode_utf16be(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_be_bytes()).collect()
}

pub(crate) fn encode_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Read exactly `buf.len()` bytes at `offset`; a short file is reported as an invalid image
/// because every offset we read was validated against the file size first.
pub(crate) fn read_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), VhdError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            VhdError::invalid(
                path,
                format!(
                    "{what}: file ends before offset {} (truncated?)",
                    offset + buf.len() as u64
                ),
            )
        } else {
            VhdError::io(path, format!("reading {what} at offset {offset}"), e)
        }
    })
}

pub(crate) fn write_at(
    file: &File,
    path: &Path,
    buf: &[u8],
    offset: u64,
    what: &str,
) -> Result<(), VhdError> {
    file.write_all_at(buf, offset)
        .map_err(|e| VhdError::io(path, format!("writing {what} at offset {offset}"), e))
}

pub(crate) fn sync(file: &File, path: &Path) -> Result<(), VhdError> {
    file.sync_all().map_err(|e| VhdError::io(path, "fsync", e))
}

/// Flush a directory entry change (create, rename) to stable storage.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), VhdError> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let f = File::open(d).map_err(|e| VhdError::io(d, "opening directory for fsync", e))?;
    f.sync_all()
        .map_err(|e| VhdError::io(d, "fsync of directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_spec_examples() {
        // 8 MiB: 16384 sectors -> spt 17, heads 4, cylinders 240.
        assert_eq!(chs(8 << 20), (240 << 16) | (4 << 8) | 17);
        // Huge sizes clamp to 65535/16/255.
        assert_eq!(chs(3 << 40), (65535 << 16) | (16 << 8) | 255);
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}
