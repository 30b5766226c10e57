//! qcow2 (versions 2 and 3): the header, its extensions and the bounds of the tables qemu
//! reads at open. All fields are big-endian.
//!
//! Refused: a backing file (header fields or the backing-format extension), an external data
//! file (incompatible bit 2, the data-file extension, the data-file-raw autoclear bit),
//! encryption (crypt method, LUKS extension), unknown incompatible features, the corrupt bit,
//! versions other than 2 and 3, cluster bits outside 9..=21, and any header length, extension
//! or table that does not fit the first cluster or the file.

use super::{ReadAt, be32, be64, check_span, check_virtual_size, read, read_array, refused, shown};
use crate::image::ImageError;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";

const V2_HEADER_LEN: u64 = 72;
const V3_HEADER_LEN: u64 = 104;
const MAX_NAME_LEN: u64 = 1023;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// qemu's own limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS).
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u64 = 65536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qcow2Info {
    pub virtual_size: u64,
    pub version: u32,
    pub cluster_size: u64,
}

/// Parse and check a qcow2 image; `limit` bounds the virtual size.
pub fn inspect(src: &dyn ReadAt, limit: u64) -> Result<Qcow2Info, ImageError> {
    let size = src.size();
    if size < V2_HEADER_LEN {
        return Err(refused(format!(
            "qcow2 header: the file has {size} bytes, fewer than the {V2_HEADER_LEN}-byte header"
        )));
    }
    let h: [u8; V2_HEADER_LEN as usize] = read_array(src, "qcow2 header", 0)?;
    if h[..4] != *MAGIC {
        return Err(refused("qcow2 header: magic is not QFI\\xfb"));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(refused(format!(
            "qcow2 header: version {version} is not supported (only 2 and 3)"
        )));
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(refused(format!(
            "qcow2 header: cluster_bits {cluster_bits} is outside 9..=21"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;

    let backing_offset = be64(&h, 8);
    let backing_size = u64::from(be32(&h, 16));
    if backing_offset != 0 || backing_size != 0 {
        return Err(refused(format!(
            "qcow2 header: backing file {} is set; images with backing files are refused",
            name_at(src, backing_offset, backing_size)
        )));
    }

    match be32(&h, 32) {
        0 => {}
        1 => {
            return Err(refused(
                "qcow2 header: crypt_method 1 (AES) is set; encrypted images are refused",
            ));
        }
        2 => {
            return Err(refused(
                "qcow2 header: crypt_method 2 (LUKS) is set; encrypted images are refused",
            ));
        }
        m => {
            return Err(refused(format!(
                "qcow2 header: crypt_method {m} is unknown; encrypted images are refused"
            )));
        }
    }

    let mut header_len = V2_HEADER_LEN;
    let mut extended_l2 = false;
    if version == 3 {
        if size < V3_HEADER_LEN {
            return Err(refused(format!(
                "qcow2 header: the file has {size} bytes, fewer than the {V3_HEADER_LEN}-byte version 3 header"
            )));
        }
        let h3: [u8; 112] = {
            let mut b = [0u8; 112];
            let n = size.min(112) as usize;
            read(src, "qcow2 version 3 header", 0, &mut b[..n])?;
            b
        };
        let incompat = be64(&h3, 72);
        let autoclear = be64(&h3, 88);
        let refcount_order = be32(&h3, 96);
        header_len = u64::from(be32(&h3, 100));

        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(refused(
                "qcow2 header: incompatible feature bit 2 (external data file) is set; images with external data files are refused",
            ));
        }
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| b.to_string())
                .collect();
            return Err(refused(format!(
                "qcow2 header: unknown incompatible feature bits {} are set; only bits 0, 1, 3 and 4 are understood",
                bits.join(", ")
            )));
        }
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(refused(
                "qcow2 header: incompatible feature bit 1 (corrupt) is set; images marked corrupt are refused",
            ));
        }
        if autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(refused(
                "qcow2 header: autoclear bit 1 (raw external data file) is set; images with external data files are refused",
            ));
        }
        if header_len < V3_HEADER_LEN || !header_len.is_multiple_of(8) || header_len > cluster_size
        {
            return Err(refused(format!(
                "qcow2 header: header_length {header_len} must be a multiple of 8 between {V3_HEADER_LEN} and the cluster size {cluster_size}"
            )));
        }
        check_span(src, "qcow2 header", 0, header_len)?;
        let compression = if header_len > V3_HEADER_LEN {
            h3[104]
        } else {
            0
        };
        if incompat & INCOMPAT_COMPRESSION != 0 {
            if compression > 1 {
                return Err(refused(format!(
                    "qcow2 header: compression_type {compression} is unknown (0 zlib, 1 zstd)"
                )));
            }
        } else if compression != 0 {
            return Err(refused(format!(
                "qcow2 header: compression_type {compression} is set without incompatible feature bit 3"
            )));
        }
        if refcount_order > 6 {
            return Err(refused(format!(
                "qcow2 header: refcount_order {refcount_order} is above 6"
            )));
        }
        extended_l2 = incompat & INCOMPAT_EXTENDED_L2 != 0;
    }

    let virtual_size = be64(&h, 24);
    check_virtual_size("qcow2", virtual_size, limit)?;

    check_extensions(src, header_len, cluster_size)?;
    check_tables(src, &h, virtual_size, cluster_size, extended_l2)?;

    Ok(Qcow2Info {
        virtual_size,
        version,
        cluster_size,
    })
}

/// A file name stored in the image (backing or data file), for the refusal message.
fn name_at(src: &dyn ReadAt, offset: u64, len: u64) -> String {
    if len == 0 || len > MAX_NAME_LEN {
        return format!("(at offset {offset:#x}, {len} bytes)");
    }
    let mut buf = vec![0u8; len as usize];
    match read(src, "name", offset, &mut buf) {
        Ok(()) => shown(&buf),
        Err(_) => format!("(at offset {offset:#x}, {len} bytes, outside the file)"),
    }
}

/// Header extensions follow the header and must end inside the first cluster.
fn check_extensions(src: &dyn ReadAt, start: u64, cluster_size: u64) -> Result<(), ImageError> {
    let end = cluster_size.min(src.size());
    if start >= end {
        return Ok(());
    }
    // At most one cluster (2 MiB), bounded by cluster_bits above.
    let mut area = vec![0u8; (end - start) as usize];
    read(src, "qcow2 header extensions", start, &mut area)?;
    let mut off: usize = 0;
    while off + 8 <= area.len() {
        let kind = be32(&area, off);
        let len = be32(&area, off + 4) as usize;
        if kind == EXT_END {
            return Ok(());
        }
        let at = start + off as u64;
        let data_start = off + 8;
        let Some(data) = data_start
            .checked_add(len)
            .and_then(|data_end| area.get(data_start..data_end))
        else {
            return Err(refused(format!(
                "qcow2 header extension {kind:#010x} at offset {at:#x} ({len} bytes) runs past the first cluster or the file"
            )));
        };
        match kind {
            EXT_BACKING_FORMAT => {
                return Err(refused(format!(
                    "qcow2 header extension {kind:#010x}: backing file format {} is set; images with backing files are refused",
                    shown(data)
                )));
            }
            EXT_DATA_FILE => {
                return Err(refused(format!(
                    "qcow2 header extension {kind:#010x}: external data file {} is set; images with external data files are refused",
                    shown(data)
                )));
            }
            EXT_CRYPTO => {
                return Err(refused(format!(
                    "qcow2 header extension {kind:#010x}: a full disk encryption (LUKS) header is present; encrypted images are refused"
                )));
            }
            _ => {}
        }
        off = data_start + len.next_multiple_of(8);
    }
    Err(refused(format!(
        "qcow2 header extensions starting at offset {start:#x} have no end marker inside the first cluster or the file"
    )))
}

fn check_tables(
    src: &dyn ReadAt,
    h: &[u8],
    virtual_size: u64,
    cluster_size: u64,
    extended_l2: bool,
) -> Result<(), ImageError> {
    let l1_entries = u64::from(be32(h, 36));
    let l1_offset = be64(h, 40);
    let l2_entry_size = if extended_l2 { 16 } else { 8 };
    // At most 2^21 * 2^18 = 2^39, no overflow.
    let bytes_per_l1_entry = cluster_size * (cluster_size / l2_entry_size);
    let needed = virtual_size.div_ceil(bytes_per_l1_entry);
    if l1_entries < needed {
        return Err(refused(format!(
            "qcow2 header: l1_size {l1_entries} is too small for the virtual size {virtual_size} (needs {needed})"
        )));
    }
    let l1_bytes = l1_entries * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(refused(format!(
            "qcow2 header: the L1 table of {l1_entries} entries exceeds {MAX_L1_BYTES} bytes"
        )));
    }
    if l1_entries > 0 {
        aligned("l1_table_offset", l1_offset, cluster_size)?;
        check_span(src, "qcow2 L1 table", l1_offset, l1_bytes)?;
    }

    let rt_offset = be64(h, 48);
    let rt_clusters = u64::from(be32(h, 56));
    let rt_bytes = rt_clusters.saturating_mul(cluster_size);
    if rt_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
        return Err(refused(format!(
            "qcow2 header: refcount_table_clusters {rt_clusters} must be between 1 and {} clusters",
            MAX_REFTABLE_BYTES / cluster_size
        )));
    }
    if rt_offset == 0 {
        return Err(refused("qcow2 header: refcount_table_offset is zero"));
    }
    aligned("refcount_table_offset", rt_offset, cluster_size)?;
    check_span(src, "qcow2 refcount table", rt_offset, rt_bytes)?;

    let snapshots = u64::from(be32(h, 60));
    let snap_offset = be64(h, 64);
    if snapshots > MAX_SNAPSHOTS {
        return Err(refused(format!(
            "qcow2 header: nb_snapshots {snapshots} exceeds {MAX_SNAPSHOTS}"
        )));
    }
    if snapshots > 0 {
        aligned("snapshots_offset", snap_offset, cluster_size)?;
        // Each snapshot table entry is at least 40 bytes.
        check_span(src, "qcow2 snapshot table", snap_offset, snapshots * 40)?;
    }
    Ok(())
}

fn aligned(field: &str, offset: u64, cluster_size: u64) -> Result<(), ImageError> {
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(refused(format!(
            "qcow2 header: {field} {offset:#x} is not a non-zero multiple of the cluster size {cluster_size}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::formats::testutil::{create, luks_qcow2, mutations, refusal, with_data};

    const LIMIT: u64 = 1 << 40;

    fn load(path: &std::path::Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn plain_images_of_both_versions_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let v3 = create(dir.path(), "v3.qcow2", "qcow2", &[], "10M");
        let info = inspect(&load(&v3), LIMIT).unwrap();
        assert_eq!(
            info,
            Qcow2Info {
                virtual_size: 10 << 20,
                version: 3,
                cluster_size: 65536
            }
        );
        let v2 = create(
            dir.path(),
            "v2.qcow2",
            "qcow2",
            &["-o", "compat=0.10"],
            "3G",
        );
        let info = inspect(&load(&v2), LIMIT).unwrap();
        assert_eq!((info.version, info.virtual_size), (2, 3 << 30));
        let data = with_data(dir.path(), "d.qcow2", "qcow2", &["-o", "cluster_size=4096"]);
        assert_eq!(inspect(&load(&data), LIMIT).unwrap().cluster_size, 4096);
    }

    #[test]
    fn backing_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = create(
            dir.path(),
            "c.qcow2",
            "qcow2",
            &["-u", "-b", "/etc/shadow", "-F", "raw"],
            "10M",
        );
        let msg = refusal(inspect(&load(&p), LIMIT));
        assert_eq!(
            msg,
            "qcow2 header: backing file \"/etc/shadow\" is set; images with backing files are refused"
        );
    }

    #[test]
    fn backing_format_extension_alone_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = create(
            dir.path(),
            "c.qcow2",
            "qcow2",
            &["-u", "-b", "base.raw", "-F", "raw"],
            "10M",
        );
        let mut b = load(&p);
        put64(&mut b, 8, 0);
        put32(&mut b, 16, 0);
        let msg = refusal(inspect(&b, LIMIT));
        assert!(msg.contains("backing file format \"raw\" is set"), "{msg}");
    }

    #[test]
    fn external_data_file_is_refused_by_bit_and_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.bin"), b"").unwrap();
        let p = create(
            dir.path(),
            "df.qcow2",
            "qcow2",
            &["-o", "data_file=data.bin"],
            "10M",
        );
        let mut b = load(&p);
        let msg = refusal(inspect(&b, LIMIT));
        assert!(
            msg.starts_with("qcow2 header: incompatible feature bit 2 (external data file) is set"),
            "{msg}"
        );
        // The extension still names the file when the bit is cleared.
        put64(&mut b, 72, 0);
        let msg = refusal(inspect(&b, LIMIT));
        assert!(
            msg.contains("external data file \"data.bin\" is set; images with external data files are refused"),
            "{msg}"
        );
    }

    #[test]
    fn encryption_is_refused() {
        let mut b = luks_qcow2().to_vec();
        let msg = refusal(inspect(&b, LIMIT));
        assert!(msg.contains("crypt_method 2 (LUKS)"), "{msg}");
        put32(&mut b, 32, 0);
        let msg = refusal(inspect(&b, LIMIT));
        assert!(msg.contains("full disk encryption (LUKS)"), "{msg}");
        put32(&mut b, 32, 1);
        assert!(refusal(inspect(&b, LIMIT)).contains("crypt_method 1 (AES)"));
    }

    #[test]
    fn header_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "p.qcow2", "qcow2", &[], "10M");
        let good = load(&p);
        let case = |patch: &dyn Fn(&mut Vec<u8>), expect: &str| {
            let mut b = good.clone();
            patch(&mut b);
            let msg = refusal(inspect(&b, LIMIT));
            assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
        };
        case(&|b| put32(b, 4, 4), "version 4 is not supported");
        case(&|b| put32(b, 4, 1), "version 1 is not supported");
        case(&|b| put32(b, 20, 22), "cluster_bits 22 is outside 9..=21");
        case(&|b| put32(b, 20, 8), "cluster_bits 8 is outside 9..=21");
        case(
            &|b| put64(b, 72, 1 << 5),
            "unknown incompatible feature bits 5 are set",
        );
        case(
            &|b| put64(b, 72, 1 << 63),
            "unknown incompatible feature bits 63 are set",
        );
        case(&|b| put64(b, 72, 2), "(corrupt) is set");
        case(&|b| put64(b, 88, 2), "autoclear bit 1");
        case(&|b| put32(b, 100, 1 << 20), "header_length 1048576");
        case(&|b| put32(b, 100, 100), "header_length 100");
        case(
            &|b| put64(b, 40, 1 << 40),
            "qcow2 L1 table at offset 0x10000000000",
        );
        case(&|b| put64(b, 40, 12345), "l1_table_offset 0x3039 is not");
        case(&|b| put32(b, 36, 0), "l1_size 0 is too small");
        case(&|b| put64(b, 48, 1 << 40), "qcow2 refcount table at offset");
        case(&|b| put32(b, 56, 0), "refcount_table_clusters 0");
        case(&|b| put32(b, 60, 3), "snapshots_offset 0x0 is not");
        case(
            &|b| b.truncate(100),
            "fewer than the 104-byte version 3 header",
        );
        case(&|b| b.truncate(50), "fewer than the 72-byte header");
        // An extension whose length runs past the first cluster.
        case(
            &|b| {
                put32(b, 112, 0x1234_5678);
                put32(b, 116, 70000);
            },
            "runs past the first cluster",
        );
    }

    #[test]
    fn virtual_size_is_checked_against_the_limit_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "big.qcow2", "qcow2", &[], "2T");
        match inspect(&load(&p), 1 << 30) {
            Err(ImageError::TooLarge { size, limit, .. }) => {
                assert_eq!((size, limit), (2 << 40, 1 << 30));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_and_mutated_headers_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = with_data(dir.path(), "m.qcow2", "qcow2", &[]);
        for image in [load(&p), luks_qcow2().to_vec()] {
            mutations(&image, 1024, 11, 300, &mut |m| {
                let _ = inspect(m, LIMIT);
            });
        }
    }
}
