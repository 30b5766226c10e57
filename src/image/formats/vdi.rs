//! VirtualBox VDI, header version 1.1 (the only one qemu reads). Little-endian fields; the
//! pre-header is 0x40 bytes of text, then the signature.
//!
//! Refused: differencing (image type 4) and undo (3) images, a non-null link or parent UUID,
//! other header versions, sector sizes other than 512, block sizes other than 1 MiB, and any
//! header whose sizes, offsets or block map disagree with each other or with the file.

use super::{ReadAt, bytes, check_span, check_virtual_size, le32, le64, read, read_array, refused};
use crate::image::ImageError;

pub const SIGNATURE: u32 = 0xbeda_107f;
pub const SIGNATURE_OFFSET: usize = 0x40;

const HEADER_END: u64 = 0x200;
const VERSION_1_1: u32 = 0x0001_0001;
/// The size of the version 1.1 header after the signature and version fields.
const MIN_HEADER_SIZE: u32 = 0x180;
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;
const SECTOR: u32 = 512;
const BLOCK: u32 = 1 << 20;
/// Block map values meaning "not allocated" and "discarded".
const UNALLOCATED: u32 = 0xffff_ffff;
const DISCARDED: u32 = 0xffff_fffe;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VdiInfo {
    pub virtual_size: u64,
    pub fixed: bool,
    pub blocks_allocated: u32,
}

pub fn inspect(src: &dyn ReadAt, limit: u64) -> Result<VdiInfo, ImageError> {
    let size = src.size();
    if size < HEADER_END {
        return Err(refused(format!(
            "vdi header: the file has {size} bytes, fewer than the {HEADER_END}-byte header"
        )));
    }
    let h: [u8; HEADER_END as usize] = read_array(src, "vdi header", 0)?;
    if le32(&h, 0x40) != SIGNATURE {
        return Err(refused("vdi header: signature at 0x40 is not 0xbeda107f"));
    }
    let version = le32(&h, 0x44);
    if version != VERSION_1_1 {
        return Err(refused(format!(
            "vdi header: version {version:#010x} is not supported (only 1.1)"
        )));
    }
    let header_size = le32(&h, 0x48);
    let image_type = le32(&h, 0x4c);
    match image_type {
        TYPE_NORMAL | TYPE_FIXED => {}
        TYPE_DIFF => {
            return Err(refused(
                "vdi header: image type 4 (differencing) is refused; images with parents are refused",
            ));
        }
        TYPE_UNDO => {
            return Err(refused(
                "vdi header: image type 3 (undo) is refused; images with parents are refused",
            ));
        }
        t => {
            return Err(refused(format!(
                "vdi header: image type {t} is unknown (1 normal, 2 fixed)"
            )));
        }
    }
    let uuid_link: [u8; 16] = bytes(&h, 0x1a8);
    let uuid_parent: [u8; 16] = bytes(&h, 0x1b8);
    if uuid_link != [0; 16] || uuid_parent != [0; 16] {
        return Err(refused(
            "vdi header: the link or parent UUID is set; images with parents are refused",
        ));
    }

    let offset_bmap = u64::from(le32(&h, 0x154));
    let offset_data = u64::from(le32(&h, 0x158));
    let sector_size = le32(&h, 0x168);
    let disk_size = le64(&h, 0x170);
    let block_size = le32(&h, 0x178);
    let block_extra = le32(&h, 0x17c);
    let blocks = le32(&h, 0x180);
    let allocated = le32(&h, 0x184);

    if header_size < MIN_HEADER_SIZE {
        return Err(refused(format!(
            "vdi header: header size {header_size:#x} is smaller than the version 1.1 header ({MIN_HEADER_SIZE:#x})"
        )));
    }
    if sector_size != SECTOR {
        return Err(refused(format!(
            "vdi header: sector size {sector_size} is not 512"
        )));
    }
    if block_size != BLOCK || block_extra != 0 {
        return Err(refused(format!(
            "vdi header: block size {block_size} (extra {block_extra}) is not 1 MiB without extra data"
        )));
    }
    check_virtual_size("vdi", disk_size, limit)?;
    let block = u64::from(BLOCK);
    let needed = disk_size.div_ceil(block);
    if u64::from(blocks) != needed {
        return Err(refused(format!(
            "vdi header: {blocks} blocks in the image do not match the disk size {disk_size} ({needed} blocks of 1 MiB)"
        )));
    }
    if allocated > blocks {
        return Err(refused(format!(
            "vdi header: {allocated} allocated blocks exceed the {blocks} blocks of the image"
        )));
    }
    let fixed = image_type == TYPE_FIXED;
    if fixed && allocated != blocks {
        return Err(refused(format!(
            "vdi header: a fixed image must have all {blocks} blocks allocated, not {allocated}"
        )));
    }
    let header_end = 0x48 + u64::from(header_size);
    let bmap_bytes = u64::from(blocks) * 4;
    if !offset_bmap.is_multiple_of(u64::from(SECTOR)) || offset_bmap < header_end.max(HEADER_END) {
        return Err(refused(format!(
            "vdi header: block map offset {offset_bmap:#x} is not sector aligned after the header"
        )));
    }
    if !offset_data.is_multiple_of(u64::from(SECTOR)) || offset_data < offset_bmap + bmap_bytes {
        return Err(refused(format!(
            "vdi header: data offset {offset_data:#x} is not sector aligned after the block map ({offset_bmap:#x} + {bmap_bytes})"
        )));
    }
    check_span(src, "vdi block map", offset_bmap, bmap_bytes)?;
    check_span(
        src,
        "vdi data blocks",
        offset_data,
        u64::from(allocated) * block,
    )?;
    check_block_map(src, offset_bmap, blocks, allocated)?;

    Ok(VdiInfo {
        virtual_size: disk_size,
        fixed,
        blocks_allocated: allocated,
    })
}

/// Every mapped block must name a distinct data block below the allocated count.
fn check_block_map(
    src: &dyn ReadAt,
    offset: u64,
    blocks: u32,
    allocated: u32,
) -> Result<(), ImageError> {
    const CHUNK: u32 = 64 * 1024;
    // One bit per allocated block; blocks is bounded by the size limit checked before.
    let mut seen = vec![0u64; (allocated as usize).div_ceil(64)];
    let mut buf = Vec::new();
    let mut index: u32 = 0;
    while index < blocks {
        let n = (blocks - index).min(CHUNK);
        buf.resize(n as usize * 4, 0);
        read(
            src,
            "vdi block map",
            offset + u64::from(index) * 4,
            &mut buf,
        )?;
        for (i, entry) in buf.chunks_exact(4).enumerate() {
            let v = le32(entry, 0);
            if v == UNALLOCATED || v == DISCARDED {
                continue;
            }
            let virtual_block = index as usize + i;
            if v >= allocated {
                return Err(refused(format!(
                    "vdi block map: entry {virtual_block} points at block {v}, beyond the {allocated} allocated blocks"
                )));
            }
            let (word, bit) = ((v / 64) as usize, v % 64);
            if let Some(w) = seen.get_mut(word) {
                if *w & (1 << bit) != 0 {
                    return Err(refused(format!(
                        "vdi block map: entry {virtual_block} points at block {v}, which another entry already uses"
                    )));
                }
                *w |= 1 << bit;
            }
        }
        index += n;
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

    fn patch(image: &[u8], off: usize, bytes: &[u8]) -> Vec<u8> {
        let mut b = image.to_vec();
        b[off..off + bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn dynamic_and_static_images_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let dynamic = create(dir.path(), "d.vdi", "vdi", &[], "10M");
        assert_eq!(
            inspect(&load(&dynamic), LIMIT).unwrap(),
            VdiInfo {
                virtual_size: 10 << 20,
                fixed: false,
                blocks_allocated: 0
            }
        );
        let fixed = create(dir.path(), "s.vdi", "vdi", &["-o", "static=on"], "3M");
        let info = inspect(&load(&fixed), LIMIT).unwrap();
        assert!(info.fixed);
        assert_eq!(info.blocks_allocated, 3);
        let data = with_data(dir.path(), "x.vdi", "vdi", &[]);
        let info = inspect(&load(&data), LIMIT).unwrap();
        assert_eq!((info.virtual_size, info.blocks_allocated), (6 << 20, 6));
    }

    #[test]
    fn header_rules() {
        let dir = tempfile::tempdir().unwrap();
        let good = load(&with_data(dir.path(), "x.vdi", "vdi", &[]));
        let case = |b: Vec<u8>, expect: &str| {
            let msg = refusal(inspect(&b, LIMIT));
            assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
        };
        case(
            patch(&good, 0x4c, &4u32.to_le_bytes()),
            "vdi header: image type 4 (differencing) is refused",
        );
        case(
            patch(&good, 0x4c, &3u32.to_le_bytes()),
            "image type 3 (undo)",
        );
        case(
            patch(&good, 0x4c, &9u32.to_le_bytes()),
            "image type 9 is unknown",
        );
        case(
            patch(&good, 0x1b8, &[1; 16]),
            "the link or parent UUID is set",
        );
        case(
            patch(&good, 0x1a8, &[1; 16]),
            "the link or parent UUID is set",
        );
        case(
            patch(&good, 0x44, &0x10000u32.to_le_bytes()),
            "version 0x00010000",
        );
        case(patch(&good, 0x40, &[0; 4]), "signature at 0x40");
        case(
            patch(&good, 0x48, &0x100u32.to_le_bytes()),
            "header size 0x100",
        );
        case(
            patch(&good, 0x168, &4096u32.to_le_bytes()),
            "sector size 4096",
        );
        case(
            patch(&good, 0x178, &(2u32 << 20).to_le_bytes()),
            "block size 2097152",
        );
        case(
            patch(&good, 0x170, &(100u64 << 20).to_le_bytes()),
            "6 blocks in the image do not match the disk size 104857600",
        );
        case(
            patch(&good, 0x184, &7u32.to_le_bytes()),
            "7 allocated blocks exceed",
        );
        case(
            patch(&good, 0x154, &0x100u32.to_le_bytes()),
            "block map offset 0x100",
        );
        case(
            patch(&good, 0x158, &0x200u32.to_le_bytes()),
            "data offset 0x200",
        );
        case(
            patch(&good, 0x200, &9u32.to_le_bytes()),
            "entry 0 points at block 9, beyond the 6 allocated blocks",
        );
        let first = le32(&good, 0x200);
        case(
            patch(&good, 0x204, &first.to_le_bytes()),
            "entry 1 points at block 0, which another entry already uses",
        );
        let mut short = good.clone();
        short.truncate(good.len() - 4096);
        case(short, "vdi data blocks at offset");
        match inspect(&good, 1 << 20) {
            Err(ImageError::TooLarge { size, .. }) => assert_eq!(size, 6 << 20),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_and_mutated_headers_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let good = load(&with_data(dir.path(), "x.vdi", "vdi", &[]));
        mutations(&good, 0x220, 3, 400, &mut |m| {
            let _ = inspect(m, LIMIT);
        });
    }
}
