//! VMDK: the binary sparse extent header ("KDMV", little-endian) with its embedded text
//! descriptor, and text descriptor files.
//!
//! Accepted: one file holding everything, i.e. a monolithicSparse or streamOptimized image
//! whose embedded descriptor has exactly one SPARSE extent that is a bare file name (the
//! image itself, under whatever name it was uploaded). Refused: any other createType (flat,
//! VMFS, split, ...), extents naming paths, "..", other files or several files, a parent
//! (parentFileNameHint, parentCID), a sparse header without an embedded descriptor (an extent
//! of a split image) or with capacity 0 (qemu then follows the descriptor's extents), and a
//! text-only descriptor file (its data is always in other files).

use super::{
    ReadAt, check_span, check_virtual_size, le16, le32, le64, read, read_array, refused, shown,
};
use crate::image::ImageError;

pub const MAGIC: &[u8; 4] = b"KDMV";

const SECTOR: u64 = 512;
const FLAG_NL_DETECT: u32 = 1 << 0;
const FLAG_REDUNDANT_GT: u32 = 1 << 1;
const FLAG_COMPRESSED: u32 = 1 << 16;
const NEWLINE_CHECK: [u8; 4] = *b"\n \r\n";
const GD_AT_END: u64 = u64::MAX;
const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;
const MAX_DESCRIPTOR: u64 = 1 << 20;
const MAX_GRAIN_SECTORS: u64 = 2048;
const MAX_GTES_PER_GT: u32 = 512;
const MAX_GD_BYTES: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateType {
    MonolithicSparse,
    StreamOptimized,
}

impl CreateType {
    pub fn name(self) -> &'static str {
        match self {
            CreateType::MonolithicSparse => "monolithicSparse",
            CreateType::StreamOptimized => "streamOptimized",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmdkInfo {
    pub virtual_size: u64,
    pub create_type: CreateType,
}

/// True when `head` reads as a VMDK text descriptor: it starts with the descriptor banner or
/// has a `createType=` line before its first NUL byte.
pub fn looks_like_descriptor(head: &[u8]) -> bool {
    let text = &head[..head.iter().position(|&b| b == 0).unwrap_or(head.len())];
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    if text
        .trim_ascii_start()
        .starts_with(b"# Disk DescriptorFile")
    {
        return true;
    }
    text.split(|&b| b == b'\n').any(|line| {
        line.trim_ascii()
            .strip_prefix(b"createType")
            .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"="))
    })
}

pub fn inspect(src: &dyn ReadAt, limit: u64) -> Result<VmdkInfo, ImageError> {
    let size = src.size();
    let mut magic = [0u8; 4];
    if size >= 4 {
        read(src, "vmdk header", 0, &mut magic)?;
    }
    if magic != *MAGIC {
        return Err(text_descriptor_file(src));
    }
    let h: [u8; 512] = read_array(src, "vmdk sparse header", 0)?;
    let header = SparseHeader::parse(&h);
    header.check("vmdk sparse header")?;
    let virtual_size = header.capacity.checked_mul(SECTOR).ok_or_else(|| {
        refused(format!(
            "vmdk sparse header: capacity {} sectors overflows",
            header.capacity
        ))
    })?;
    check_virtual_size("vmdk", virtual_size, limit)?;

    let compressed = header.flags & FLAG_COMPRESSED != 0;
    let gd_offset = if header.gd_offset == GD_AT_END {
        if !compressed {
            return Err(refused(
                "vmdk sparse header: grain directory at the end of the file without compressed grains",
            ));
        }
        footer_gd_offset(src, &header)?
    } else {
        header.gd_offset
    };
    let gd_bytes = header.gd_bytes()?;
    check_sectors(src, "vmdk grain directory", gd_offset, gd_bytes)?;
    if header.flags & FLAG_REDUNDANT_GT != 0 && header.rgd_offset != 0 {
        check_sectors(
            src,
            "vmdk redundant grain directory",
            header.rgd_offset,
            gd_bytes,
        )?;
    }

    if header.desc_size == 0 || header.desc_offset == 0 {
        return Err(refused(
            "vmdk sparse header: no embedded descriptor; extent files of split images are refused",
        ));
    }
    let desc_bytes = header.desc_size.saturating_mul(SECTOR);
    if desc_bytes > MAX_DESCRIPTOR {
        return Err(refused(format!(
            "vmdk sparse header: embedded descriptor of {} sectors exceeds {MAX_DESCRIPTOR} bytes",
            header.desc_size
        )));
    }
    let desc_offset = sectors_to_bytes("vmdk embedded descriptor", header.desc_offset)?;
    let mut desc = vec![0u8; desc_bytes as usize];
    read(src, "vmdk embedded descriptor", desc_offset, &mut desc)?;
    let where_ = "vmdk embedded descriptor";
    let descriptor = Descriptor::parse(&desc, where_)?;
    let create_type = descriptor.check(where_)?;
    let extent = &descriptor.extents[0];
    if extent.sectors != header.capacity {
        return Err(refused(format!(
            "{where_}: the extent has {} sectors but the header capacity is {}",
            extent.sectors, header.capacity
        )));
    }
    match (create_type, compressed) {
        (CreateType::StreamOptimized, false) => Err(refused(format!(
            "{where_}: createType \"streamOptimized\" but the header has no compressed grains"
        ))),
        (CreateType::MonolithicSparse, true) => Err(refused(format!(
            "{where_}: createType \"monolithicSparse\" but the header has compressed grains"
        ))),
        _ => Ok(VmdkInfo {
            virtual_size,
            create_type,
        }),
    }
}

/// A file that is only a descriptor keeps its data elsewhere: always refused, with the first
/// rule it breaks.
fn text_descriptor_file(src: &dyn ReadAt) -> ImageError {
    let where_ = "vmdk descriptor file";
    let size = src.size();
    if size > MAX_DESCRIPTOR {
        return refused(format!(
            "{where_}: a text descriptor of {size} bytes exceeds {MAX_DESCRIPTOR} bytes"
        ));
    }
    let mut text = vec![0u8; size as usize];
    if let Err(e) = read(src, where_, 0, &mut text) {
        return e;
    }
    if let Err(e) = Descriptor::parse(&text, where_).and_then(|d| d.check(where_)) {
        return e;
    }
    refused(format!(
        "{where_}: a text-only descriptor keeps its data in other files; upload a monolithicSparse or streamOptimized image"
    ))
}

struct SparseHeader {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_size: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes_per_gt: u32,
    rgd_offset: u64,
    gd_offset: u64,
    newline: [u8; 4],
    compression: u16,
}

impl SparseHeader {
    fn parse(h: &[u8]) -> SparseHeader {
        SparseHeader {
            version: le32(h, 4),
            flags: le32(h, 8),
            capacity: le64(h, 12),
            grain_size: le64(h, 20),
            desc_offset: le64(h, 28),
            desc_size: le64(h, 36),
            gtes_per_gt: le32(h, 44),
            rgd_offset: le64(h, 48),
            gd_offset: le64(h, 56),
            newline: super::bytes(h, 73),
            compression: le16(h, 77),
        }
    }

    fn check(&self, what: &str) -> Result<(), ImageError> {
        if !(1..=3).contains(&self.version) {
            return Err(refused(format!(
                "{what}: version {} is not supported (1 to 3)",
                self.version
            )));
        }
        if self.flags & FLAG_NL_DETECT != 0 && self.newline != NEWLINE_CHECK {
            return Err(refused(format!(
                "{what}: the newline check bytes are damaged (was the file transferred as text?)"
            )));
        }
        if self.capacity == 0 {
            return Err(refused(format!(
                "{what}: capacity is 0; sparse headers that defer to their descriptor's extents are refused"
            )));
        }
        if !self.grain_size.is_power_of_two() || self.grain_size > MAX_GRAIN_SECTORS {
            return Err(refused(format!(
                "{what}: grain size {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                self.grain_size
            )));
        }
        if !(1..=MAX_GTES_PER_GT).contains(&self.gtes_per_gt) {
            return Err(refused(format!(
                "{what}: {} grain table entries per table is outside 1..={MAX_GTES_PER_GT}",
                self.gtes_per_gt
            )));
        }
        let compressed = self.flags & FLAG_COMPRESSED != 0;
        match (compressed, self.compression) {
            (true, 1) | (false, 0) => Ok(()),
            (c, a) => Err(refused(format!(
                "{what}: compression algorithm {a} does not match the compressed-grains flag ({c})"
            ))),
        }
    }

    /// The grain directory's size in bytes, bounded.
    fn gd_bytes(&self) -> Result<u64, ImageError> {
        // grain_size <= 2048 and gtes <= 512: the product cannot overflow.
        let per_table = self.grain_size * u64::from(self.gtes_per_gt);
        let bytes = self.capacity.div_ceil(per_table).saturating_mul(4);
        if bytes > MAX_GD_BYTES {
            return Err(refused(format!(
                "vmdk sparse header: a grain directory of {bytes} bytes exceeds {MAX_GD_BYTES}"
            )));
        }
        Ok(bytes)
    }
}

/// A streamOptimized image written by VMware keeps the real header in a footer just before the
/// end-of-stream marker: footer marker, footer header, EOS marker, 512 bytes each.
fn footer_gd_offset(src: &dyn ReadAt, header: &SparseHeader) -> Result<u64, ImageError> {
    let size = src.size();
    if size < 3 * SECTOR {
        return Err(refused(
            "vmdk footer: the file is too short to hold the footer a grain directory at the end needs",
        ));
    }
    let marker: [u8; 512] = read_array(src, "vmdk footer marker", size - 3 * SECTOR)?;
    let footer: [u8; 512] = read_array(src, "vmdk footer", size - 2 * SECTOR)?;
    let eos: [u8; 512] = read_array(src, "vmdk end-of-stream marker", size - SECTOR)?;
    if le32(&marker, 12) != MARKER_FOOTER || le32(&eos, 12) != MARKER_EOS || le64(&eos, 0) != 0 {
        return Err(refused(
            "vmdk footer: the footer or end-of-stream marker is missing at the end of the file",
        ));
    }
    if footer[..4] != *MAGIC {
        return Err(refused("vmdk footer: magic is not KDMV"));
    }
    let f = SparseHeader::parse(&footer);
    f.check("vmdk footer")?;
    if f.capacity != header.capacity
        || f.grain_size != header.grain_size
        || f.gtes_per_gt != header.gtes_per_gt
        || f.flags != header.flags
    {
        return Err(refused(
            "vmdk footer: capacity, grain size, table size or flags differ from the header",
        ));
    }
    if f.gd_offset == GD_AT_END {
        return Err(refused(
            "vmdk footer: the grain directory offset is still 'at end'",
        ));
    }
    Ok(f.gd_offset)
}

fn sectors_to_bytes(what: &str, sectors: u64) -> Result<u64, ImageError> {
    sectors
        .checked_mul(SECTOR)
        .ok_or_else(|| refused(format!("{what}: sector offset {sectors} overflows")))
}

fn check_sectors(src: &dyn ReadAt, what: &str, sectors: u64, len: u64) -> Result<(), ImageError> {
    if sectors == 0 {
        return Err(refused(format!("{what}: offset is 0")));
    }
    check_span(src, what, sectors_to_bytes(what, sectors)?, len)
}

struct Extent {
    access: String,
    sectors: u64,
    kind: String,
    file: Option<String>,
    offset: Option<String>,
}

struct Descriptor {
    create_type: Option<String>,
    extents: Vec<Extent>,
}

impl Descriptor {
    /// Every line must be blank, a comment, `key = value` or an extent line.
    fn parse(raw: &[u8], where_: &str) -> Result<Descriptor, ImageError> {
        let raw = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        let text = std::str::from_utf8(raw)
            .map_err(|_| refused(format!("{where_}: the descriptor is not UTF-8 text")))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut d = Descriptor {
            create_type: None,
            extents: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                d.extents.push(parse_extent(line).ok_or_else(|| {
                    refused(format!(
                        "{where_}: line {n}: malformed extent line {}",
                        shown(line.as_bytes())
                    ))
                })?);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(refused(format!(
                    "{where_}: line {n}: {} is neither a comment, a key=value pair nor an extent",
                    shown(line.as_bytes())
                )));
            };
            let key = key.trim();
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            {
                return Err(refused(format!(
                    "{where_}: line {n}: key {} is not a descriptor key",
                    shown(key.as_bytes())
                )));
            }
            match key {
                "createType" => {
                    if d.create_type.is_some() {
                        return Err(refused(format!("{where_}: createType appears twice")));
                    }
                    d.create_type = Some(value.to_string());
                }
                "parentFileNameHint" => {
                    return Err(refused(format!(
                        "{where_}: parentFileNameHint {} names a parent; images with parents are refused",
                        shown(value.as_bytes())
                    )));
                }
                "parentCID" if !value.eq_ignore_ascii_case("ffffffff") => {
                    return Err(refused(format!(
                        "{where_}: parentCID {} names a parent; images with parents are refused",
                        shown(value.as_bytes())
                    )));
                }
                _ => {}
            }
        }
        Ok(d)
    }

    /// The createType and extent rules; returns the (allowed) create type.
    fn check(&self, where_: &str) -> Result<CreateType, ImageError> {
        let create_type = match self.create_type.as_deref() {
            Some("monolithicSparse") => CreateType::MonolithicSparse,
            Some("streamOptimized") => CreateType::StreamOptimized,
            Some(other) => {
                return Err(refused(format!(
                    "{where_}: createType {} is not allowed (only monolithicSparse and streamOptimized)",
                    shown(other.as_bytes())
                )));
            }
            None => return Err(refused(format!("{where_}: createType is missing"))),
        };
        if self.extents.len() != 1 {
            return Err(refused(format!(
                "{where_}: {} extents; exactly one extent, the image itself, is allowed",
                self.extents.len()
            )));
        }
        let e = &self.extents[0];
        let Some(file) = e.file.as_deref() else {
            return Err(refused(format!("{where_}: the extent names no file")));
        };
        if !is_bare_name(file) || e.offset.is_some() {
            return Err(refused(format!(
                "{where_}: extent {} names another file; only the image itself may be an extent (no paths, \"..\", offsets or other files)",
                shown(file.as_bytes())
            )));
        }
        if e.kind != "SPARSE" {
            return Err(refused(format!(
                "{where_}: extent type {} is not allowed (only SPARSE)",
                shown(e.kind.as_bytes())
            )));
        }
        if e.access == "NOACCESS" {
            return Err(refused(format!("{where_}: the extent is NOACCESS")));
        }
        Ok(create_type)
    }
}

/// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`
fn parse_extent(line: &str) -> Option<Extent> {
    let (access, rest) = line.split_once(char::is_whitespace)?;
    let (sectors, rest) = rest.trim_start().split_once(char::is_whitespace)?;
    let sectors: u64 = sectors.parse().ok()?;
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let rest = rest.trim();
    let (file, offset) = if rest.is_empty() {
        (None, None)
    } else {
        let inner = rest.strip_prefix('"')?;
        let close = inner.find('"')?;
        let after = inner[close + 1..].trim();
        let offset = (!after.is_empty()).then(|| after.to_string());
        (Some(inner[..close].to_string()), offset)
    };
    Some(Extent {
        access: access.to_string(),
        sectors,
        kind: kind.to_string(),
        file,
        offset,
    })
}

/// A plain file name in the image's own directory: no separators, no protocol prefix, no
/// dot names, no control characters.
fn is_bare_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c == ':' || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::formats::testutil::{create, mutations, refusal, with_data};

    const LIMIT: u64 = 1 << 40;

    fn load(path: &std::path::Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    /// Replace the embedded descriptor's text (qemu reserves 20 sectors at sector 1).
    fn with_descriptor(image: &[u8], text: &str) -> Vec<u8> {
        let mut b = image.to_vec();
        let area = &mut b[512..512 + 20 * 512];
        area.fill(0);
        area[..text.len()].copy_from_slice(text.as_bytes());
        b
    }

    fn descriptor(create_type: &str, extents: &str) -> String {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n# Extent description\n{extents}\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n"
        )
    }

    #[test]
    fn monolithic_sparse_and_stream_optimized_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = create(
            dir.path(),
            "s.vmdk",
            "vmdk",
            &["-o", "subformat=monolithicSparse"],
            "10M",
        );
        assert_eq!(
            inspect(&load(&sparse), LIMIT).unwrap(),
            VmdkInfo {
                virtual_size: 10 << 20,
                create_type: CreateType::MonolithicSparse
            }
        );
        let stream = with_data(
            dir.path(),
            "so.vmdk",
            "vmdk",
            &["-o", "subformat=streamOptimized"],
        );
        assert_eq!(
            inspect(&load(&stream), LIMIT).unwrap(),
            VmdkInfo {
                virtual_size: 6 << 20,
                create_type: CreateType::StreamOptimized
            }
        );
    }

    #[test]
    fn descriptor_detection() {
        assert!(looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(looks_like_descriptor(
            b"\xef\xbb\xbf  \n# Disk DescriptorFile\n"
        ));
        assert!(looks_like_descriptor(b"version=1\ncreateType = \"vmfs\"\n"));
        assert!(!looks_like_descriptor(b"\0createType=\"x\"\n"));
        assert!(!looks_like_descriptor(b"createTypeX=1\n"));
        assert!(!looks_like_descriptor(b""));
    }

    #[test]
    fn text_descriptor_files_are_refused_with_the_rule_they_break() {
        let case = |text: &str, expect: &str| {
            let msg = refusal(inspect(&text.as_bytes().to_vec(), LIMIT));
            assert!(msg.starts_with("vmdk descriptor file: "), "{msg}");
            assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
        };
        case(
            &descriptor("monolithicFlat", "RW 2048 FLAT \"/etc/hostname\" 0"),
            "createType \"monolithicFlat\" is not allowed (only monolithicSparse and streamOptimized)",
        );
        case(
            &descriptor("twoGbMaxExtentFlat", "RW 2048 FLAT \"d-f001.vmdk\" 0"),
            "createType \"twoGbMaxExtentFlat\" is not allowed",
        );
        case(
            &descriptor("vmfs", "RW 2048 VMFS \"d-flat.vmdk\""),
            "createType \"vmfs\"",
        );
        case(
            &descriptor("monolithicSparse", "RW 2048 SPARSE \"/etc/hostname\""),
            "extent \"/etc/hostname\" names another file",
        );
        case(
            &descriptor("monolithicSparse", "RW 2048 SPARSE \"../x.vmdk\""),
            "extent \"../x.vmdk\" names another file",
        );
        case(
            &descriptor("monolithicSparse", "RW 2048 SPARSE \"..\""),
            "names another file",
        );
        case(
            &descriptor("monolithicSparse", "RW 2048 SPARSE \"nbd:host:10809\""),
            "names another file",
        );
        case(
            &descriptor("streamOptimized", "RW 2048 FLAT \"x.vmdk\" 0"),
            "names another file",
        );
        case(
            &descriptor("streamOptimized", "RW 2048 FLAT \"x.vmdk\""),
            "extent type \"FLAT\" is not allowed",
        );
        case(
            &descriptor(
                "monolithicSparse",
                "RW 2048 SPARSE \"a.vmdk\"\nRW 2048 SPARSE \"b.vmdk\"",
            ),
            "2 extents; exactly one extent",
        );
        case(&descriptor("monolithicSparse", ""), "0 extents");
        case(
            &descriptor("monolithicSparse", "RW two SPARSE \"a.vmdk\""),
            "line 8: malformed extent line \"RW two SPARSE",
        );
        case(
            &descriptor("monolithicSparse", "RW 2048 SPARSE \"a.vmdk"),
            "malformed extent line",
        );
        case(
            "createType=\"monolithicSparse\"\nparentFileNameHint=\"/etc/passwd\"\n",
            "parentFileNameHint \"/etc/passwd\" names a parent",
        );
        case(
            "createType=\"monolithicSparse\"\nparentCID=1234abcd\n",
            "parentCID \"1234abcd\" names a parent",
        );
        case(
            "createType=\"monolithicSparse\"\njunk line\n",
            "line 2: \"junk line\"",
        );
        case("version=1\n", "createType is missing");
        case(
            "createType=\"monolithicSparse\"\ncreateType=\"vmfs\"\n",
            "createType appears twice",
        );
        case(
            &descriptor("monolithicSparse", "RW 2048 SPARSE \"a.vmdk\""),
            "a text-only descriptor keeps its data in other files",
        );
        let big = format!("# Disk DescriptorFile\n{}", "#\n".repeat(600_000));
        case(&big, "exceeds 1048576 bytes");
    }

    #[test]
    fn embedded_descriptor_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "s.vmdk", "vmdk", &[], "1M");
        let good = load(&p);
        let case = |b: Vec<u8>, expect: &str| {
            let msg = refusal(inspect(&b, LIMIT));
            assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
        };
        case(
            with_descriptor(
                &good,
                &descriptor("monolithicSparse", "RW 2048 FLAT \"/etc/hostname\" 0"),
            ),
            "vmdk embedded descriptor: extent \"/etc/hostname\" names another file",
        );
        case(
            with_descriptor(
                &good,
                &descriptor("monolithicFlat", "RW 2048 FLAT \"s-flat.vmdk\" 0"),
            ),
            "vmdk embedded descriptor: createType \"monolithicFlat\" is not allowed",
        );
        case(
            with_descriptor(
                &good,
                &descriptor("monolithicSparse", "RW 4096 SPARSE \"s.vmdk\""),
            ),
            "the extent has 4096 sectors but the header capacity is 2048",
        );
        case(
            with_descriptor(
                &good,
                &descriptor("streamOptimized", "RW 2048 SPARSE \"s.vmdk\""),
            ),
            "no compressed grains",
        );
        // Still accepted under another name: the upload's name is not the creator's.
        let renamed = with_descriptor(
            &good,
            &descriptor("monolithicSparse", "RW 2048 SPARSE \"upload-1234\""),
        );
        assert_eq!(inspect(&renamed, LIMIT).unwrap().virtual_size, 1 << 20);

        let patch = |off: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(bytes);
            b
        };
        case(
            patch(12, &0u64.to_le_bytes()),
            "capacity is 0; sparse headers that defer to their descriptor's extents are refused",
        );
        case(patch(36, &0u64.to_le_bytes()), "no embedded descriptor");
        case(patch(4, &4u32.to_le_bytes()), "version 4 is not supported");
        case(patch(73, b"\r\n\n\n"), "newline check bytes are damaged");
        case(patch(20, &3u64.to_le_bytes()), "grain size 3 sectors");
        case(
            patch(44, &1024u32.to_le_bytes()),
            "1024 grain table entries",
        );
        case(patch(77, &1u16.to_le_bytes()), "compression algorithm 1");
        case(
            patch(56, &(1u64 << 40).to_le_bytes()),
            "vmdk grain directory at offset",
        );
        case(
            patch(28, &(1u64 << 40).to_le_bytes()),
            "vmdk embedded descriptor at offset",
        );
        case(
            patch(56, &u64::MAX.to_le_bytes()),
            "without compressed grains",
        );
        case(patch(12, &u64::MAX.to_le_bytes()), "overflows");
        match inspect(&good, 1000) {
            Err(ImageError::TooLarge { size, .. }) => assert_eq!(size, 1 << 20),
            other => panic!("{other:?}"),
        }
    }

    /// A VMware-style streamOptimized image keeps its grain directory offset in a footer.
    #[test]
    fn grain_directory_at_end_is_read_from_the_footer() {
        let dir = tempfile::tempdir().unwrap();
        let p = with_data(
            dir.path(),
            "so.vmdk",
            "vmdk",
            &["-o", "subformat=streamOptimized"],
        );
        let good = load(&p);
        let gd = le64(&good, 56);
        let mut b = good.clone();
        b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut footer_header = good[..512].to_vec();
        footer_header[56..64].copy_from_slice(&gd.to_le_bytes());
        let mut marker = vec![0u8; 512];
        marker[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        let eos = vec![0u8; 512];
        let mut with_footer = b.clone();
        with_footer.extend_from_slice(&marker);
        with_footer.extend_from_slice(&footer_header);
        with_footer.extend_from_slice(&eos);
        assert_eq!(inspect(&with_footer, LIMIT).unwrap().virtual_size, 6 << 20);

        let msg = refusal(inspect(&b, LIMIT));
        assert!(
            msg.contains("footer or end-of-stream marker is missing"),
            "{msg}"
        );
        let mut bad = with_footer.clone();
        let at = bad.len() - 1024 + 12;
        bad[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
        let msg = refusal(inspect(&bad, LIMIT));
        assert!(msg.contains("differ from the header"), "{msg}");
    }

    #[test]
    fn truncated_and_mutated_headers_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = with_data(dir.path(), "s.vmdk", "vmdk", &[]);
        let stream = with_data(
            dir.path(),
            "so.vmdk",
            "vmdk",
            &["-o", "subformat=streamOptimized"],
        );
        for image in [load(&sparse), load(&stream)] {
            mutations(&image, 2048, 5, 300, &mut |m| {
                let _ = inspect(m, LIMIT);
            });
        }
        let text = descriptor("monolithicSparse", "RW 2048 SPARSE \"a.vmdk\"").into_bytes();
        mutations(&text, text.len(), 9, 300, &mut |m| {
            let _ = inspect(m, LIMIT);
            let _ = looks_like_descriptor(m);
        });
    }
}
