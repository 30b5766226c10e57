//! The parts of VHD inspection that `crate::vhd::inspect` leaves to the image layer: finding
//! the footer at the end of the file (fixed disks have no header), the parent fields of a
//! dynamic header, and the sizes qemu's `vpc` driver may report.

use super::{ReadAt, be16, be64, read, refused};
use crate::image::ImageError;

pub const COOKIE: &[u8; 8] = b"conectix";
const FOOTER: u64 = 512;
const HEADER: usize = 1024;

/// The footer at the end of the file: the last 512 bytes, or the last 511 of an old
/// Virtual PC image. `None` when neither holds the cookie.
pub fn tail_footer(src: &dyn ReadAt) -> Result<Option<[u8; 512]>, ImageError> {
    let size = src.size();
    for len in [FOOTER, FOOTER - 1] {
        if size < len || (len == FOOTER - 1 && size % 512 != 511) {
            continue;
        }
        let mut buf = [0u8; 512];
        read(src, "vhd footer", size - len, &mut buf[..len as usize])?;
        if buf.starts_with(COOKIE) {
            return Ok(Some(buf));
        }
    }
    Ok(None)
}

/// Footer current size (the size XenServer uses).
pub fn current_size(footer: &[u8]) -> u64 {
    be64(footer, 48)
}

/// The capacity of the footer's CHS geometry, which qemu reports instead of the current size
/// for images created by Virtual PC and older qemu.
pub fn chs_size(footer: &[u8]) -> u64 {
    let cylinders = u64::from(be16(footer, 56));
    let heads = u64::from(footer.get(58).copied().unwrap_or(0));
    let sectors = u64::from(footer.get(59).copied().unwrap_or(0));
    cylinders * heads * sectors * 512
}

/// A dynamic disk must not carry a parent UUID, parent name or parent locator, even though
/// readers ignore them for type 3: what names a parent is refused. `footer` is the validated
/// footer (its data offset points at the header).
pub fn check_no_parent_fields(src: &dyn ReadAt, footer: &[u8]) -> Result<(), ImageError> {
    let offset = be64(footer, 16);
    let mut h = [0u8; HEADER];
    read(src, "vhd dynamic header", offset, &mut h)?;
    if h[40..56].iter().any(|&b| b != 0) {
        return Err(refused(
            "vhd dynamic header: parent UUID is set on a dynamic disk; images with parents are refused",
        ));
    }
    if h[64..576].iter().any(|&b| b != 0) {
        return Err(refused(
            "vhd dynamic header: parent name is set on a dynamic disk; images with parents are refused",
        ));
    }
    if h[576..768].iter().any(|&b| b != 0) {
        return Err(refused(
            "vhd dynamic header: a parent locator is set on a dynamic disk; images with parents are refused",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::formats::testutil::{create, mutations, refusal};

    #[test]
    fn footer_is_found_at_the_end_of_fixed_and_dynamic_disks() {
        let dir = tempfile::tempdir().unwrap();
        let fixed = std::fs::read(create(
            dir.path(),
            "f.vhd",
            "vpc",
            &["-o", "subformat=fixed"],
            "10M",
        ))
        .unwrap();
        let footer = tail_footer(&fixed).unwrap().unwrap();
        assert_eq!(be32(&footer, 60), 2);
        assert_eq!(current_size(&footer), fixed.len() as u64 - 512);
        // qemu sizes its images to the geometry.
        assert_eq!(chs_size(&footer), current_size(&footer));

        let dynamic = std::fs::read(create(dir.path(), "d.vhd", "vpc", &[], "10M")).unwrap();
        let footer = tail_footer(&dynamic).unwrap().unwrap();
        assert_eq!(be32(&footer, 60), 3);
        check_no_parent_fields(&dynamic, &footer).unwrap();

        // An old Virtual PC footer of 511 bytes.
        let mut short = fixed.clone();
        short.pop();
        assert!(tail_footer(&short).unwrap().is_some());
        assert!(tail_footer(&vec![0u8; 4096]).unwrap().is_none());
        assert!(tail_footer(&vec![]).unwrap().is_none());
    }

    #[test]
    fn parent_fields_of_a_dynamic_disk_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(create(dir.path(), "d.vhd", "vpc", &[], "10M")).unwrap();
        let footer = tail_footer(&good).unwrap().unwrap();
        let header = be64(&footer, 16) as usize;
        for (off, expect) in [
            (40, "parent UUID is set"),
            (64, "parent name is set"),
            (576, "a parent locator is set"),
        ] {
            let mut b = good.clone();
            b[header + off] = 1;
            let msg = refusal(check_no_parent_fields(&b, &footer));
            assert!(msg.contains(expect), "{msg}");
        }
        mutations(&good, 2048, 1, 100, &mut |m| {
            if let Ok(Some(f)) = tail_footer(m) {
                let _ = check_no_parent_fields(m, &f);
                let _ = chs_size(&f);
            }
        });
    }

    fn be32(b: &[u8], off: usize) -> u32 {
        super::super::be32(b, off)
    }
}
