//! VHDX: the file identifier, the two headers, the region table, the metadata region and the
//! block allocation table. Little-endian fields; GUIDs in Microsoft's mixed-endian layout;
//! headers and region tables carry a CRC-32C.
//!
//! Refused: differencing images (a parent locator metadata item, the HasParent file parameter,
//! partially present payload blocks, present sector bitmap blocks), a log that needs replay,
//! unknown required regions or metadata items, missing required metadata, and any region,
//! item or block outside the file or overlapping another. When a structure cannot be read
//! with certainty the image is refused rather than guessed at.

use super::{ReadAt, bytes, check_span, check_virtual_size, le16, le32, le64, read, refused};
use crate::image::ImageError;

pub const SIGNATURE: &[u8; 8] = b"vhdxfile";

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_SIZE: usize = 4096;
const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_SIZE: usize = 64 * 1024;
const METADATA_TABLE_SIZE: usize = 64 * 1024;
const MAX_ENTRIES: u64 = 2047;
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
const MIN_BLOCK: u32 = 1 << 20;
const MAX_BLOCK: u32 = 256 << 20;

type Guid = [u8; 16];

/// A GUID as stored on disk: the first three fields little-endian, the rest as written.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

const REGION_BAT: Guid = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
const REGION_METADATA: Guid = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
const ITEM_FILE_PARAMETERS: Guid = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const ITEM_VIRTUAL_DISK_SIZE: Guid = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const ITEM_PAGE83: Guid = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const ITEM_LOGICAL_SECTOR: Guid = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const ITEM_PHYSICAL_SECTOR: Guid = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const ITEM_PARENT_LOCATOR: Guid = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

const ITEM_IS_USER: u32 = 1 << 0;
const ITEM_IS_REQUIRED: u32 = 1 << 2;
const PARAM_LEAVE_ALLOCATED: u32 = 1 << 0;
const PARAM_HAS_PARENT: u32 = 1 << 1;

const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
const BITMAP_NOT_PRESENT: u64 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VhdxInfo {
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
}

/// CRC-32C (Castagnoli), reflected, as VHDX uses for headers and region tables.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The checksum at `off` must be the CRC-32C of `buf` with that field zeroed.
fn checksum_ok(buf: &mut [u8], off: usize) -> bool {
    let stored = le32(buf, off);
    if let Some(field) = buf.get_mut(off..off + 4) {
        field.fill(0);
    }
    crc32c(buf) == stored
}

/// A span of the file that must not overlap another.
struct Span {
    start: u64,
    end: u64,
    what: &'static str,
}

fn no_overlaps(spans: &mut [Span]) -> Result<(), ImageError> {
    spans.sort_by_key(|s| (s.start, s.end));
    for w in spans.windows(2) {
        if w[1].start < w[0].end {
            return Err(refused(format!(
                "vhdx: {} ({:#x}..{:#x}) overlaps {} ({:#x}..{:#x})",
                w[1].what, w[1].start, w[1].end, w[0].what, w[0].start, w[0].end
            )));
        }
    }
    Ok(())
}

/// A region of the file: 1 MiB aligned, a whole number of MiB, after the header section and
/// inside the file.
fn region_span(
    src: &dyn ReadAt,
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<Span, ImageError> {
    if offset < MIB || !offset.is_multiple_of(MIB) || len == 0 || !len.is_multiple_of(MIB) {
        return Err(refused(format!(
            "vhdx: {what} at {offset:#x} ({len} bytes) is not a non-empty whole number of MiB, 1 MiB aligned, after the header section"
        )));
    }
    check_span(src, what, offset, len)?;
    Ok(Span {
        start: offset,
        end: offset + len,
        what,
    })
}

pub fn inspect(src: &dyn ReadAt, limit: u64) -> Result<VhdxInfo, ImageError> {
    let size = src.size();
    if size < MIB {
        return Err(refused(format!(
            "vhdx: the file has {size} bytes, fewer than the 1 MiB header section"
        )));
    }
    let mut id = [0u8; 8];
    read(src, "vhdx file identifier", 0, &mut id)?;
    if id != *SIGNATURE {
        return Err(refused(
            "vhdx file identifier: signature is not \"vhdxfile\"",
        ));
    }
    let mut spans = vec![Span {
        start: 0,
        end: MIB,
        what: "the header section",
    }];
    if let Some(log) = check_header(src)? {
        spans.push(log);
    }
    let regions = read_regions(src)?;
    spans.push(region_span(
        src,
        "the BAT region",
        regions.bat.0,
        regions.bat.1,
    )?);
    spans.push(region_span(
        src,
        "the metadata region",
        regions.metadata.0,
        regions.metadata.1,
    )?);
    for &(offset, len) in &regions.others {
        spans.push(region_span(src, "an optional region", offset, len)?);
    }
    no_overlaps(&mut spans)?;

    let meta = read_metadata(src, regions.metadata.0, regions.metadata.1)?;
    check_virtual_size("vhdx", meta.virtual_size, limit)?;
    check_bat(src, &meta, regions.bat, &spans)?;

    Ok(VhdxInfo {
        virtual_size: meta.virtual_size,
        block_size: meta.block_size,
        logical_sector_size: meta.logical_sector_size,
    })
}

/// The current header (valid copy with the highest sequence number); returns the log span.
fn check_header(src: &dyn ReadAt) -> Result<Option<Span>, ImageError> {
    let mut best: Option<(u64, Vec<u8>)> = None;
    for offset in HEADER_OFFSETS {
        let mut h = vec![0u8; HEADER_SIZE];
        read(src, "vhdx header", offset, &mut h)?;
        if h[..4] != *b"head" || !checksum_ok(&mut h, 4) {
            continue;
        }
        let seq = le64(&h, 8);
        if best.as_ref().is_none_or(|(s, _)| seq > *s) {
            best = Some((seq, h));
        }
    }
    let Some((_, h)) = best else {
        return Err(refused(
            "vhdx header: neither header copy has a valid signature and checksum",
        ));
    };
    let log_guid: Guid = bytes(&h, 48);
    let log_version = le16(&h, 64);
    let version = le16(&h, 66);
    let log_len = u64::from(le32(&h, 68));
    let log_offset = le64(&h, 72);
    if version != 1 {
        return Err(refused(format!(
            "vhdx header: version {version} is not supported (only 1)"
        )));
    }
    if log_version != 0 {
        return Err(refused(format!(
            "vhdx header: log version {log_version} is not supported (only 0)"
        )));
    }
    if log_guid != [0; 16] {
        return Err(refused(
            "vhdx header: the log GUID is set (the log needs replay); images with a pending log are refused",
        ));
    }
    if log_len == 0 {
        return Ok(None);
    }
    region_span(src, "the log", log_offset, log_len).map(Some)
}

struct Regions {
    bat: (u64, u64),
    metadata: (u64, u64),
    others: Vec<(u64, u64)>,
}

fn read_regions(src: &dyn ReadAt) -> Result<Regions, ImageError> {
    let mut table = None;
    for offset in REGION_OFFSETS {
        let mut t = vec![0u8; REGION_TABLE_SIZE];
        read(src, "vhdx region table", offset, &mut t)?;
        if t[..4] == *b"regi" && checksum_ok(&mut t, 4) {
            table = Some(t);
            break;
        }
    }
    let Some(t) = table else {
        return Err(refused(
            "vhdx region table: neither copy has a valid signature and checksum",
        ));
    };
    let count = u64::from(le32(&t, 8));
    if count > MAX_ENTRIES {
        return Err(refused(format!(
            "vhdx region table: {count} entries exceed {MAX_ENTRIES}"
        )));
    }
    let mut bat = None;
    let mut metadata = None;
    let mut others = Vec::new();
    for i in 0..count as usize {
        let e = 16 + i * 32;
        let id: Guid = bytes(&t, e);
        let offset = le64(&t, e + 16);
        let len = u64::from(le32(&t, e + 24));
        let required = le32(&t, e + 28) & 1 != 0;
        let slot = if id == REGION_BAT {
            &mut bat
        } else if id == REGION_METADATA {
            &mut metadata
        } else if required {
            return Err(refused(format!(
                "vhdx region table: entry {i} is an unknown required region"
            )));
        } else {
            others.push((offset, len));
            continue;
        };
        if slot.replace((offset, len)).is_some() {
            return Err(refused(format!(
                "vhdx region table: entry {i} repeats a region"
            )));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions {
            bat,
            metadata,
            others,
        }),
        _ => Err(refused(
            "vhdx region table: the BAT or the metadata region is missing",
        )),
    }
}

struct Metadata {
    virtual_size: u64,
    block_size: u32,
    logical_sector_size: u32,
}

fn read_metadata(src: &dyn ReadAt, offset: u64, len: u64) -> Result<Metadata, ImageError> {
    let mut t = vec![0u8; METADATA_TABLE_SIZE];
    read(src, "vhdx metadata table", offset, &mut t)?;
    if t[..8] != *b"metadata" {
        return Err(refused(
            "vhdx metadata table: signature is not \"metadata\"",
        ));
    }
    let count = u64::from(le16(&t, 10));
    if count > MAX_ENTRIES {
        return Err(refused(format!(
            "vhdx metadata table: {count} entries exceed {MAX_ENTRIES}"
        )));
    }
    let mut file_params = None;
    let mut virtual_size = None;
    let mut page83 = false;
    let mut logical = None;
    let mut physical = None;
    let mut seen: Vec<(Guid, bool)> = Vec::new();
    for i in 0..count as usize {
        let e = 32 + i * 32;
        let id: Guid = bytes(&t, e);
        let item_offset = u64::from(le32(&t, e + 16));
        let item_len = u64::from(le32(&t, e + 20));
        let flags = le32(&t, e + 24);
        let user = flags & ITEM_IS_USER != 0;
        if seen.contains(&(id, user)) {
            return Err(refused(format!(
                "vhdx metadata table: entry {i} repeats an item"
            )));
        }
        seen.push((id, user));
        if item_len > 0
            && (item_offset < METADATA_TABLE_SIZE as u64
                || item_offset
                    .checked_add(item_len)
                    .is_none_or(|end| end > len))
        {
            return Err(refused(format!(
                "vhdx metadata table: entry {i} data at {item_offset:#x} ({item_len} bytes) lies outside the metadata region"
            )));
        }
        if item_len == 0 && item_offset != 0 {
            return Err(refused(format!(
                "vhdx metadata table: entry {i} has no data but an offset"
            )));
        }
        let known = !user
            && [
                ITEM_FILE_PARAMETERS,
                ITEM_VIRTUAL_DISK_SIZE,
                ITEM_PAGE83,
                ITEM_LOGICAL_SECTOR,
                ITEM_PHYSICAL_SECTOR,
                ITEM_PARENT_LOCATOR,
            ]
            .contains(&id);
        if !known {
            if flags & ITEM_IS_REQUIRED != 0 {
                return Err(refused(format!(
                    "vhdx metadata table: entry {i} is an unknown required item"
                )));
            }
            continue;
        }
        if id == ITEM_PARENT_LOCATOR {
            return Err(refused(
                "vhdx metadata: a parent locator is present; differencing images are refused",
            ));
        }
        let mut data = [0u8; 16];
        let want = if id == ITEM_FILE_PARAMETERS || id == ITEM_VIRTUAL_DISK_SIZE {
            8
        } else if id == ITEM_PAGE83 {
            16
        } else {
            4
        };
        if item_len < want as u64 {
            return Err(refused(format!(
                "vhdx metadata table: entry {i} holds {item_len} bytes, fewer than the {want} its item needs"
            )));
        }
        read(
            src,
            "vhdx metadata item",
            offset + item_offset,
            &mut data[..want],
        )?;
        if id == ITEM_FILE_PARAMETERS {
            file_params = Some((le32(&data, 0), le32(&data, 4)));
        } else if id == ITEM_VIRTUAL_DISK_SIZE {
            virtual_size = Some(le64(&data, 0));
        } else if id == ITEM_PAGE83 {
            page83 = true;
        } else if id == ITEM_LOGICAL_SECTOR {
            logical = Some(le32(&data, 0));
        } else {
            physical = Some(le32(&data, 0));
        }
    }
    let (Some((block_size, param_flags)), Some(virtual_size), true, Some(logical), Some(physical)) =
        (file_params, virtual_size, page83, logical, physical)
    else {
        return Err(refused(
            "vhdx metadata: a required item (file parameters, virtual disk size, page 83 data, logical or physical sector size) is missing",
        ));
    };
    if param_flags & PARAM_HAS_PARENT != 0 {
        return Err(refused(
            "vhdx metadata: file parameter HasParent is set; differencing images are refused",
        ));
    }
    if param_flags & !(PARAM_HAS_PARENT | PARAM_LEAVE_ALLOCATED) != 0 {
        return Err(refused(format!(
            "vhdx metadata: file parameter flags {param_flags:#x} has unknown bits"
        )));
    }
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(refused(format!(
            "vhdx metadata: block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    for (name, v) in [("logical", logical), ("physical", physical)] {
        if v != 512 && v != 4096 {
            return Err(refused(format!(
                "vhdx metadata: {name} sector size {v} is neither 512 nor 4096"
            )));
        }
    }
    if virtual_size == 0
        || virtual_size > MAX_VIRTUAL_SIZE
        || !virtual_size.is_multiple_of(u64::from(logical))
    {
        return Err(refused(format!(
            "vhdx metadata: virtual disk size {virtual_size} is not a positive multiple of the logical sector size up to 64 TiB"
        )));
    }
    Ok(Metadata {
        virtual_size,
        block_size,
        logical_sector_size: logical,
    })
}

/// Payload entries must be plain states with blocks inside the file and apart from each other
/// and from the metadata structures; sector bitmap entries must be absent.
fn check_bat(
    src: &dyn ReadAt,
    meta: &Metadata,
    (bat_offset, bat_len): (u64, u64),
    spans: &[Span],
) -> Result<(), ImageError> {
    const CHUNK: u64 = 64 * 1024;
    let block = u64::from(meta.block_size);
    // 2^23 * sector size / block size: at least 16 with the bounds above.
    let chunk_ratio = ((1u64 << 23) * u64::from(meta.logical_sector_size)) / block;
    let data_blocks = meta.virtual_size.div_ceil(block);
    let entries = data_blocks + (data_blocks - 1) / chunk_ratio;
    if entries.saturating_mul(8) > bat_len {
        return Err(refused(format!(
            "vhdx BAT: {entries} entries do not fit the {bat_len}-byte BAT region"
        )));
    }
    let size = src.size();
    let mut blocks: Vec<u64> = Vec::new();
    let mut buf = Vec::new();
    let mut index = 0u64;
    while index < entries {
        let n = (entries - index).min(CHUNK);
        buf.resize(n as usize * 8, 0);
        read(src, "vhdx BAT", bat_offset + index * 8, &mut buf)?;
        for (k, raw) in buf.chunks_exact(8).enumerate() {
            let i = index + k as u64;
            let entry = le64(raw, 0);
            let state = entry & 7;
            if (i + 1).is_multiple_of(chunk_ratio + 1) {
                if state != BITMAP_NOT_PRESENT {
                    return Err(refused(format!(
                        "vhdx BAT: sector bitmap entry {i} has state {state}; only differencing images have sector bitmaps"
                    )));
                }
                continue;
            }
            match state {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {}
                PAYLOAD_FULLY_PRESENT => {
                    let offset = (entry >> 20).saturating_mul(MIB);
                    if offset < MIB || offset.checked_add(block).is_none_or(|end| end > size) {
                        return Err(refused(format!(
                            "vhdx BAT: payload entry {i} points at {offset:#x}, outside the {size}-byte file"
                        )));
                    }
                    blocks.push(offset);
                }
                PAYLOAD_PARTIALLY_PRESENT => {
                    return Err(refused(format!(
                        "vhdx BAT: payload entry {i} is partially present; differencing images are refused"
                    )));
                }
                s => {
                    return Err(refused(format!(
                        "vhdx BAT: payload entry {i} has unknown state {s}"
                    )));
                }
            }
        }
        index += n;
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[1] - w[0] < block {
            return Err(refused(format!(
                "vhdx BAT: payload blocks at {:#x} and {:#x} overlap",
                w[0], w[1]
            )));
        }
    }
    for s in spans {
        // The first block starting at or after s.start - block + 1 is the only one that can
        // overlap s.
        let from = s.start.saturating_sub(block - 1);
        let first = blocks.partition_point(|&b| b < from);
        if let Some(&b) = blocks.get(first)
            && b < s.end
        {
            return Err(refused(format!(
                "vhdx BAT: the payload block at {b:#x} overlaps {}",
                s.what
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::formats::testutil::{create, mutations, refusal, with_data};

    const LIMIT: u64 = 1 << 40;

    fn load(path: &std::path::Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    fn put(b: &mut [u8], off: usize, bytes: &[u8]) {
        b[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// Recompute the CRC-32C of both headers and both region tables after a patch.
    fn reseal(b: &mut [u8]) {
        for (offset, len) in [
            (HEADER_OFFSETS[0], HEADER_SIZE),
            (HEADER_OFFSETS[1], HEADER_SIZE),
            (REGION_OFFSETS[0], REGION_TABLE_SIZE),
            (REGION_OFFSETS[1], REGION_TABLE_SIZE),
        ] {
            let s = &mut b[offset as usize..offset as usize + len];
            s[4..8].fill(0);
            let crc = crc32c(s);
            s[4..8].copy_from_slice(&crc.to_le_bytes());
        }
    }

    fn region(b: &[u8], id: Guid) -> usize {
        let t = REGION_OFFSETS[0] as usize;
        (0..le32(b, t + 8) as usize)
            .map(|i| t + 16 + i * 32)
            .find(|&e| b[e..e + 16] == id)
            .map(|e| le64(b, e + 16) as usize)
            .unwrap()
    }

    /// The metadata table entry of item `id`.
    fn meta_entry(b: &[u8], id: Guid) -> usize {
        let m = region(b, REGION_METADATA);
        (0..le16(b, m + 10) as usize)
            .map(|i| m + 32 + i * 32)
            .find(|&e| b[e..e + 16] == id)
            .unwrap()
    }

    /// The data of metadata item `id`.
    fn meta_data(b: &[u8], id: Guid) -> usize {
        region(b, REGION_METADATA) + le32(b, meta_entry(b, id) + 16) as usize
    }

    fn refused_with(b: &Vec<u8>, expect: &str) {
        let msg = refusal(inspect(b, LIMIT));
        assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
    }

    #[test]
    fn crc32c_matches_the_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn empty_and_populated_images_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let empty = create(dir.path(), "e.vhdx", "vhdx", &[], "10M");
        assert_eq!(
            inspect(&load(&empty), LIMIT).unwrap(),
            VhdxInfo {
                virtual_size: 10 << 20,
                block_size: 8 << 20,
                logical_sector_size: 512
            }
        );
        let data = with_data(dir.path(), "d.vhdx", "vhdx", &["-o", "block_size=1M"]);
        let b = load(&data);
        assert_eq!(inspect(&b, LIMIT).unwrap().block_size, 1 << 20);
        let bat = region(&b, REGION_BAT);
        assert_eq!(le64(&b, bat) & 7, PAYLOAD_FULLY_PRESENT);
        let big = create(dir.path(), "b.vhdx", "vhdx", &[], "64G");
        assert_eq!(inspect(&load(&big), LIMIT).unwrap().virtual_size, 64 << 30);
    }

    #[test]
    fn differencing_markers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = load(&with_data(
            dir.path(),
            "d.vhdx",
            "vhdx",
            &["-o", "block_size=1M"],
        ));

        let mut b = good.clone();
        let at = meta_data(&b, ITEM_FILE_PARAMETERS) + 4;
        put(&mut b, at, &PARAM_HAS_PARENT.to_le_bytes());
        refused_with(
            &b,
            "vhdx metadata: file parameter HasParent is set; differencing images are refused",
        );

        let mut b = good.clone();
        let at = meta_entry(&b, ITEM_PAGE83);
        put(&mut b, at, &ITEM_PARENT_LOCATOR);
        refused_with(
            &b,
            "vhdx metadata: a parent locator is present; differencing images are refused",
        );

        let mut b = good.clone();
        let bat = region(&b, REGION_BAT);
        let entry = le64(&b, bat) | PAYLOAD_PARTIALLY_PRESENT;
        put(&mut b, bat, &entry.to_le_bytes());
        refused_with(&b, "payload entry 0 is partially present");

        // The entry after the first chunk of payload entries is a sector bitmap entry.
        let mut b = load(&create(dir.path(), "b.vhdx", "vhdx", &[], "8G"));
        let block = u64::from(le32(&b, meta_data(&b, ITEM_FILE_PARAMETERS)));
        let ratio = ((1u64 << 23) * 512 / block) as usize;
        let bat = region(&b, REGION_BAT);
        put(&mut b, bat + ratio * 8, &((1u64 << 20) | 6).to_le_bytes());
        refused_with(&b, &format!("sector bitmap entry {ratio} has state 6"));
    }

    #[test]
    fn structure_rules() {
        let dir = tempfile::tempdir().unwrap();
        let good = load(&with_data(
            dir.path(),
            "d.vhdx",
            "vhdx",
            &["-o", "block_size=1M"],
        ));
        let h = HEADER_OFFSETS.map(|o| o as usize);
        let r = REGION_OFFSETS.map(|o| o as usize);

        // One damaged header copy is tolerated; two are not.
        let mut b = good.clone();
        b[h[0] + 100] ^= 1;
        assert!(inspect(&b, LIMIT).is_ok());
        b[h[1] + 100] ^= 1;
        refused_with(&b, "neither header copy has a valid signature and checksum");

        let mut b = good.clone();
        put(&mut b, h[0] + 48, &[7; 16]);
        put(&mut b, h[1] + 48, &[7; 16]);
        reseal(&mut b);
        refused_with(&b, "the log GUID is set (the log needs replay)");

        let mut b = good.clone();
        put(&mut b, h[0] + 66, &2u16.to_le_bytes());
        put(&mut b, h[1] + 66, &2u16.to_le_bytes());
        reseal(&mut b);
        refused_with(&b, "vhdx header: version 2 is not supported");

        let mut b = good.clone();
        for t in r {
            put(&mut b, t + 8, &3u32.to_le_bytes());
            put(&mut b, t + 16 + 64, &[9; 16]);
            put(&mut b, t + 16 + 64 + 16, &(64u64 << 20).to_le_bytes());
            put(&mut b, t + 16 + 64 + 24, &(1u32 << 20).to_le_bytes());
            put(&mut b, t + 16 + 64 + 28, &1u32.to_le_bytes());
        }
        reseal(&mut b);
        refused_with(&b, "entry 2 is an unknown required region");

        let mut b = good.clone();
        for t in r {
            put(&mut b, t + 16 + 16, &(1u64 << 40).to_le_bytes());
        }
        reseal(&mut b);
        refused_with(&b, "the BAT region at offset 0x10000000000");

        let mut b = good.clone();
        for t in r {
            put(&mut b, t + 16 + 16, &(3u64 << 20).to_le_bytes());
        }
        reseal(&mut b);
        refused_with(&b, "overlaps");

        let mut b = good.clone();
        let e = meta_entry(&b, ITEM_PAGE83);
        put(&mut b, e, &[5; 16]);
        put(&mut b, e + 24, &ITEM_IS_REQUIRED.to_le_bytes());
        refused_with(&b, "is an unknown required item");

        let mut b = good.clone();
        let e = meta_entry(&b, ITEM_PAGE83);
        put(&mut b, e, &[5; 16]);
        put(&mut b, e + 24, &0u32.to_le_bytes());
        refused_with(&b, "a required item (file parameters");

        let mut b = good.clone();
        let e = meta_entry(&b, ITEM_VIRTUAL_DISK_SIZE);
        put(&mut b, e + 16, &(1u32 << 30).to_le_bytes());
        refused_with(&b, "lies outside the metadata region");

        let mut b = good.clone();
        let at = meta_data(&b, ITEM_FILE_PARAMETERS);
        put(&mut b, at, &(3u32 << 20).to_le_bytes());
        refused_with(&b, "block size 3145728 is not a power of two");

        let mut b = good.clone();
        let at = meta_data(&b, ITEM_LOGICAL_SECTOR);
        put(&mut b, at, &1000u32.to_le_bytes());
        refused_with(&b, "logical sector size 1000");

        let mut b = good.clone();
        let at = meta_data(&b, ITEM_VIRTUAL_DISK_SIZE);
        put(&mut b, at, &(1u64 << 50).to_le_bytes());
        refused_with(&b, "up to 64 TiB");
        put(&mut b, at, &(1u64 << 41).to_le_bytes());
        match inspect(&b, LIMIT) {
            Err(ImageError::TooLarge { size, .. }) => assert_eq!(size, 1 << 41),
            other => panic!("{other:?}"),
        }

        let bat = region(&good, REGION_BAT);
        let mut b = good.clone();
        put(&mut b, bat, &((1u64 << 40) | 6).to_le_bytes());
        refused_with(&b, "payload entry 0 points at 0x10000000000, outside");
        let mut b = good.clone();
        let first = le64(&b, bat);
        put(&mut b, bat + 8, &first.to_le_bytes());
        refused_with(&b, "overlap");
        let mut b = good.clone();
        let meta = region(&b, REGION_METADATA) as u64;
        put(&mut b, bat, &((meta >> 20 << 20) | 6).to_le_bytes());
        refused_with(&b, "overlaps the metadata region");
        let mut b = good.clone();
        put(&mut b, bat, &4u64.to_le_bytes());
        refused_with(&b, "unknown state 4");
    }

    #[test]
    fn truncated_and_mutated_headers_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let good = load(&with_data(
            dir.path(),
            "d.vhdx",
            "vhdx",
            &["-o", "block_size=1M"],
        ));
        mutations(&good, 4 << 20, 17, 300, &mut |m| {
            let _ = inspect(m, LIMIT);
        });
        // Damage behind valid checksums: the metadata table and the BAT are not checksummed.
        let meta = region(&good, REGION_METADATA);
        let mut rng = crate::image::formats::testutil::Rng::new(23);
        let mut b = good.clone();
        for _ in 0..300 {
            let at = meta + rng.below(256) as usize;
            let old = b[at];
            b[at] = rng.next() as u8;
            let _ = inspect(&b, LIMIT);
            b[at] = old;
        }
    }
}
