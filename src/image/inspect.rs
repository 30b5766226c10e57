//! Format detection and full inspection of an uploaded image.
//!
//! The format is decided from content only (magic numbers at the head, the VHD footer at the
//! tail), never from a name; a declared format must match it. Each format's header is then
//! parsed by our own code ([`super::formats`], [`crate::vhd`]) with the safety rules applied
//! *before* qemu-img ever opens the file, and only then is `qemu-img info` run, with the
//! explicit driver and under resource limits, as an independent cross-check.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::formats::{self, FileSource, ReadAt, check_virtual_size, read, refused};
use super::qemu::{QemuImg, QemuInfo};
use super::{ImageError, ImageFormat};
use crate::vhd::{self, DiskType};

/// How much of the head detection looks at.
pub const HEAD_LEN: usize = 4096;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b, 0x08];

/// Decides the format from the first bytes of a stream (at least 4 KiB when available).
/// Gzip magic => VhdTgz (the tar inside is checked later by the tgz importer); "conectix" at 0
/// => Vhd (dynamic/differencing); QFI\xfb => Qcow2; "KDMV" or a VMDK text descriptor => Vmdk;
/// the VDI signature 0xbeda107f at 0x40 => Vdi; "vhdxfile" => Vhdx; anything else => Raw
/// (a fixed VHD has its footer only at the end, see inspect_file).
pub fn detect_head(head: &[u8]) -> ImageFormat {
    head_matches(head)
        .first()
        .copied()
        .unwrap_or(ImageFormat::Raw)
}

/// Every format whose head signature `head` carries, in detection order. More than one means
/// the content is ambiguous (a polyglot), which [`inspect_file`] refuses.
fn head_matches(head: &[u8]) -> Vec<ImageFormat> {
    let mut found = Vec::new();
    if head.starts_with(GZIP_MAGIC) {
        found.push(ImageFormat::VhdTgz);
    }
    if head.starts_with(formats::vhd::COOKIE) {
        found.push(ImageFormat::Vhd);
    }
    if head.starts_with(formats::qcow2::MAGIC) {
        found.push(ImageFormat::Qcow2);
    }
    if head.starts_with(formats::vmdk::MAGIC) || formats::vmdk::looks_like_descriptor(head) {
        found.push(ImageFormat::Vmdk);
    }
    let at = formats::vdi::SIGNATURE_OFFSET;
    if head.get(at..at + 4).map(|s| formats::le32(s, 0)) == Some(formats::vdi::SIGNATURE) {
        found.push(ImageFormat::Vdi);
    }
    if head.starts_with(formats::vhdx::SIGNATURE) {
        found.push(ImageFormat::Vhdx);
    }
    found
}

/// Everything known about an image file after inspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inspection {
    pub format: ImageFormat,
    /// The size of the disk the image describes, in bytes. For a VHD this is the footer's
    /// current size (what XenServer uses); qemu may report the slightly smaller CHS size.
    pub virtual_size: u64,
    pub file_size: u64,
}

/// Full inspection of a (staged, seekable) file: detect from head AND tail (fixed VHD footer
/// "conectix" in the last 512 bytes => Vhd), refuse a mismatch with `declared`, parse the
/// format's header with our own code and apply the safety rules, then cross-check with
/// `qemu-img info -f <driver> --output=json` run under resource limits; refuse if the virtual
/// size exceeds `max_virtual_size`.
///
/// A gzip file (vhd-tgz) is not a disk image: it is refused here and belongs to the tgz
/// importer, which checks every VHD member itself.
pub async fn inspect_file(
    path: &Path,
    declared: Option<ImageFormat>,
    max_virtual_size: u64,
    qemu: &QemuImg,
) -> Result<Inspection, ImageError> {
    let owned = path.to_path_buf();
    let local =
        tokio::task::spawn_blocking(move || inspect_local(&owned, declared, max_virtual_size))
            .await
            .map_err(|e| ImageError::Io {
                context: format!("inspecting {}", path.display()),
                source: std::io::Error::other(e.to_string()),
            })??;
    let info = qemu.info(path, local.format).await?;
    cross_check(&local, &info, path, max_virtual_size)?;
    Ok(local.inspection)
}

/// What our own parsers found, plus what qemu's answer is compared with.
#[derive(Debug)]
struct Local {
    format: ImageFormat,
    inspection: Inspection,
    /// Virtual sizes qemu may report for this image (a VHD has two readings).
    qemu_sizes: Vec<u64>,
    vmdk_create_type: Option<&'static str>,
}

fn open(path: &Path) -> Result<(File, u64), ImageError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(ImageError::io_at(path, "opening image"))?;
    let meta = file
        .metadata()
        .map_err(ImageError::io_at(path, "stat of image"))?;
    if !meta.is_file() {
        return Err(refused(format!("{}: not a regular file", path.display())));
    }
    Ok((file, meta.len()))
}

/// Detection from head and tail. Refuses content that matches several formats.
fn detect_file(src: &dyn ReadAt) -> Result<(ImageFormat, Option<[u8; 512]>), ImageError> {
    let size = src.size();
    let mut head = vec![0u8; size.min(HEAD_LEN as u64) as usize];
    read(src, "image head", 0, &mut head)?;
    let matches = head_matches(&head);
    if matches.len() > 1 {
        let names: Vec<&str> = matches.iter().map(|f| f.name()).collect();
        return Err(refused(format!(
            "format detection: the content matches several formats ({}); ambiguous images are refused",
            names.join(", ")
        )));
    }
    let tail = formats::vhd::tail_footer(src)?;
    let detected = match (matches.first().copied(), tail.is_some()) {
        (None, true) => ImageFormat::Vhd,
        (Some(ImageFormat::Vhd), _) => ImageFormat::Vhd,
        (Some(other), true) => {
            return Err(refused(format!(
                "format detection: the content starts as {other} but ends with a VHD footer; ambiguous images are refused"
            )));
        }
        (Some(f), false) => f,
        (None, false) => ImageFormat::Raw,
    };
    Ok((detected, tail))
}

fn inspect_local(
    path: &Path,
    declared: Option<ImageFormat>,
    limit: u64,
) -> Result<Local, ImageError> {
    let (file, file_size) = open(path)?;
    let src = FileSource::new(file, file_size);
    let (format, tail) = detect_file(&src)?;
    if let Some(declared) = declared
        && declared != format
    {
        return Err(ImageError::Mismatch {
            declared,
            detected: format,
        });
    }
    let mut vmdk_create_type = None;
    let (virtual_size, qemu_sizes) = match format {
        ImageFormat::VhdTgz => {
            return Err(refused(
                "vhd-tgz: a gzip archive is not a disk image; it is imported by the vhd-tgz importer, which checks every member",
            ));
        }
        ImageFormat::Raw => {
            check_virtual_size("raw", file_size, limit)?;
            // qemu rounds a raw file up to whole sectors.
            (file_size, vec![file_size, file_size.next_multiple_of(512)])
        }
        ImageFormat::Qcow2 => {
            let s = formats::qcow2::inspect(&src, limit)?.virtual_size;
            (s, vec![s])
        }
        ImageFormat::Vmdk => {
            let info = formats::vmdk::inspect(&src, limit)?;
            vmdk_create_type = Some(info.create_type.name());
            (info.virtual_size, vec![info.virtual_size])
        }
        ImageFormat::Vdi => {
            let s = formats::vdi::inspect(&src, limit)?.virtual_size;
            (s, vec![s])
        }
        ImageFormat::Vhdx => {
            let s = formats::vhdx::inspect(&src, limit)?.virtual_size;
            (s, vec![s])
        }
        ImageFormat::Vhd => {
            let Some(footer) = tail else {
                return Err(refused(
                    "vhd footer: no \"conectix\" footer at the end of the file (truncated?)",
                ));
            };
            check_vhd(path, &src, &footer, limit)?
        }
    };
    Ok(Local {
        format,
        inspection: Inspection {
            format,
            virtual_size,
            file_size,
        },
        qemu_sizes,
        vmdk_create_type,
    })
}

/// Dynamic or fixed VHDs without any parent reference; returns the current size and the sizes
/// qemu's vpc driver may report (current size, or the CHS capacity for some creators).
fn check_vhd(
    path: &Path,
    src: &dyn ReadAt,
    footer: &[u8; 512],
    limit: u64,
) -> Result<(u64, Vec<u64>), ImageError> {
    // Before the VHD reader sizes its BAT from the header.
    check_virtual_size("vhd", formats::vhd::current_size(footer), limit)?;
    // Named as the tenant's image, not by its staging path on the share.
    let info = vhd::inspect(path).map_err(|e| e.about(Path::new("vhd image")))?;
    match info.disk_type {
        DiskType::Differencing => {
            return Err(refused(
                "vhd footer: disk type 4 (differencing) is refused; a lone differencing VHD has no parent here (chains only come in vhd-tgz)",
            ));
        }
        DiskType::Fixed => {
            // qemu takes a file whose first sector holds a footer for a dynamic disk.
            let mut first = [0u8; 8];
            read(src, "vhd data", 0, &mut first)?;
            if first == *formats::vhd::COOKIE {
                return Err(refused(
                    "vhd: a fixed disk whose first sector holds a VHD footer is ambiguous (qemu would read it as a dynamic disk)",
                ));
            }
        }
        DiskType::Dynamic => formats::vhd::check_no_parent_fields(src, footer)?,
    }
    if let Some(parent) = &info.parent {
        return Err(refused(format!(
            "vhd header: parent {} ({:?}) is set; images with parents are refused",
            parent.uuid, parent.name
        )));
    }
    check_virtual_size("vhd", info.virtual_size, limit)?;
    let mut sizes = vec![info.virtual_size];
    let chs = formats::vhd::chs_size(footer);
    if chs != info.virtual_size && chs != 0 {
        sizes.push(chs);
    }
    Ok((info.virtual_size, sizes))
}

/// qemu must read the same format, the same size, and no other file.
fn cross_check(local: &Local, info: &QemuInfo, path: &Path, limit: u64) -> Result<(), ImageError> {
    let driver = local.format.qemu_driver().unwrap_or("");
    if info.format != driver {
        return Err(refused(format!(
            "qemu-img info: reports format {:?} for a {} image",
            info.format, local.format
        )));
    }
    if let Some(backing) = &info.backing_filename {
        return Err(refused(format!(
            "qemu-img info: reports backing file {backing:?}; images with backing files are refused"
        )));
    }
    if let Some(data) = &info.data_file {
        return Err(refused(format!(
            "qemu-img info: reports data file {data:?}; images with external data files are refused"
        )));
    }
    if let Some(child) = info.children.iter().find(|c| c.as_str() != "file") {
        return Err(refused(format!(
            "qemu-img info: the image opens another node {child:?}; only the file itself may be read"
        )));
    }
    if let Some(expected) = local.vmdk_create_type {
        if info.vmdk_create_type.as_deref() != Some(expected) {
            return Err(refused(format!(
                "qemu-img info: reports VMDK create type {:?}, our parser found {expected:?}",
                info.vmdk_create_type
            )));
        }
        let own = qemu_path(path);
        if info.vmdk_extents.len() != 1 || info.vmdk_extents[0] != own {
            return Err(refused(format!(
                "qemu-img info: reports VMDK extents {:?}; only the image itself may be an extent",
                info.vmdk_extents
            )));
        }
    }
    if info.virtual_size > limit {
        return Err(ImageError::TooLarge {
            what: format!("the {} virtual size reported by qemu-img", local.format),
            size: info.virtual_size,
            limit,
        });
    }
    if !local.qemu_sizes.contains(&info.virtual_size) {
        return Err(refused(format!(
            "qemu-img info: reports virtual size {} but the {} header says {}",
            info.virtual_size, local.format, local.inspection.virtual_size
        )));
    }
    Ok(())
}

/// The file name as qemu reports it for the path we passed.
fn qemu_path(path: &Path) -> String {
    super::qemu::path_arg(path).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::formats::testutil::{
        Rng, create, luks_qcow2, qemu_img, random_raw, with_data,
    };
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    const LIMIT: u64 = 1 << 40;

    async fn check(path: &Path, declared: Option<ImageFormat>) -> Result<Inspection, ImageError> {
        inspect_file(path, declared, LIMIT, &QemuImg::new("qemu-img")).await
    }

    fn refusal(r: Result<Inspection, ImageError>) -> String {
        match r {
            Err(ImageError::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// One's complement of the byte sum with the checksum field zeroed (VHD footer, header).
    fn vhd_seal(b: &mut [u8], field: usize) {
        b[field..field + 4].fill(0);
        let sum = b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        b[field..field + 4].copy_from_slice(&(!sum).to_be_bytes());
    }

    /// Turn a qemu-made dynamic VHD into a differencing one (or a dynamic one with parent
    /// fields when `disk_type` stays 3), with valid checksums.
    fn vhd_with_parent(dynamic: &[u8], disk_type: u32, parent: [u8; 16]) -> Vec<u8> {
        let mut b = dynamic.to_vec();
        let end = b.len() - 512;
        b[end + 60..end + 64].copy_from_slice(&disk_type.to_be_bytes());
        vhd_seal(&mut b[end..], 64);
        let footer = b[end..].to_vec();
        b[..512].copy_from_slice(&footer);
        let header = &mut b[512..1536];
        header[40..56].copy_from_slice(&parent);
        for (i, c) in "p.vhd".encode_utf16().enumerate() {
            header[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        vhd_seal(header, 36);
        b
    }

    #[test]
    fn detect_head_by_magic() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        let cases: Vec<(&[u8], ImageFormat)> = vec![
            (b"\x1f\x8b\x08\x00rest", ImageFormat::VhdTgz),
            (b"conectix\0\0\0\x02", ImageFormat::Vhd),
            (b"QFI\xfb\0\0\0\x03", ImageFormat::Qcow2),
            (b"KDMV\x01\0\0\0", ImageFormat::Vmdk),
            (
                b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n",
                ImageFormat::Vmdk,
            ),
            (&vdi, ImageFormat::Vdi),
            (b"vhdxfile\x51\0", ImageFormat::Vhdx),
            (&[0u8; 4096], ImageFormat::Raw),
            (b"", ImageFormat::Raw),
            (b"QFI", ImageFormat::Raw),
            (b"\x1f\x8b", ImageFormat::Raw),
            (b"conecti", ImageFormat::Raw),
            (b"\xeb\x63\x90 MBR boot code", ImageFormat::Raw),
        ];
        for (head, expected) in cases {
            assert_eq!(detect_head(head), expected, "{head:?}");
        }
    }

    #[test]
    fn detect_head_never_panics_on_garbage() {
        let mut rng = Rng::new(77);
        let magics: [&[u8]; 6] = [
            b"\x1f\x8b\x08",
            b"conectix",
            b"QFI\xfb",
            b"KDMV",
            b"vhdxfile",
            b"# Disk DescriptorFile\ncreateType",
        ];
        for len in (0..5000).step_by(37) {
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            let _ = detect_head(&buf);
            for m in magics {
                let mut b = m.to_vec();
                b.extend_from_slice(&buf);
                let _ = detect_head(&b);
                let _ = detect_head(&b[..b.len().min(len)]);
            }
        }
    }

    #[tokio::test]
    async fn safe_images_of_every_format_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vhd_dynamic = create(d, "d.vhd", "vpc", &[], "10M");
        let vhd_fixed = create(d, "f.vhd", "vpc", &["-o", "subformat=fixed"], "10M");
        let vhd_size = vhd::inspect(&vhd_dynamic).unwrap().virtual_size;
        // qemu rounds VHD sizes up to the CHS geometry.
        let with_vhd = with_data(d, "w.vhd", "vpc", &[]);
        let with_vhd_size = vhd::inspect(&with_vhd).unwrap().virtual_size;
        assert!(with_vhd_size >= 6 << 20);
        let raw = d.join("r.raw");
        random_raw(&raw, 6 << 20, 1 << 20, 4096, 3);
        let odd = write(d, "odd.raw", &[7u8; 1000]);
        let cases = [
            (
                create(d, "a.qcow2", "qcow2", &[], "10M"),
                ImageFormat::Qcow2,
                10 << 20,
            ),
            (
                with_data(d, "b.qcow2", "qcow2", &[]),
                ImageFormat::Qcow2,
                6 << 20,
            ),
            (
                create(
                    d,
                    "s.vmdk",
                    "vmdk",
                    &["-o", "subformat=monolithicSparse"],
                    "10M",
                ),
                ImageFormat::Vmdk,
                10 << 20,
            ),
            (
                with_data(d, "so.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
                ImageFormat::Vmdk,
                6 << 20,
            ),
            (
                create(d, "a.vdi", "vdi", &[], "10M"),
                ImageFormat::Vdi,
                10 << 20,
            ),
            (
                with_data(d, "b.vdi", "vdi", &["-o", "static=on"]),
                ImageFormat::Vdi,
                6 << 20,
            ),
            (
                create(d, "a.vhdx", "vhdx", &[], "10M"),
                ImageFormat::Vhdx,
                10 << 20,
            ),
            (
                with_data(d, "b.vhdx", "vhdx", &[]),
                ImageFormat::Vhdx,
                6 << 20,
            ),
            (vhd_dynamic, ImageFormat::Vhd, vhd_size),
            (vhd_fixed, ImageFormat::Vhd, vhd_size),
            (with_vhd.clone(), ImageFormat::Vhd, with_vhd_size),
            (raw, ImageFormat::Raw, 6 << 20),
            (odd, ImageFormat::Raw, 1000),
        ];
        for (path, format, size) in cases {
            let file_size = std::fs::metadata(&path).unwrap().len();
            let expected = Inspection {
                format,
                virtual_size: size,
                file_size,
            };
            for declared in [None, Some(format)] {
                let got = check(&path, declared).await;
                assert_eq!(got.unwrap(), expected, "{}", path.display());
            }
        }
    }

    #[tokio::test]
    async fn qcow2_external_references_and_encryption_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let backing = create(
            d,
            "c.qcow2",
            "qcow2",
            &["-u", "-b", "/etc/shadow", "-F", "raw"],
            "10M",
        );
        assert_eq!(
            refusal(check(&backing, Some(ImageFormat::Qcow2)).await),
            "qcow2 header: backing file \"/etc/shadow\" is set; images with backing files are refused"
        );
        let base = create(d, "base.qcow2", "qcow2", &[], "10M");
        let child = d.join("child.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            child.to_str().unwrap(),
        ]);
        assert!(
            refusal(check(&child, None).await).contains("images with backing files are refused")
        );

        write(d, "data.bin", b"");
        let data_file = create(d, "df.qcow2", "qcow2", &["-o", "data_file=data.bin"], "10M");
        assert_eq!(
            refusal(check(&data_file, None).await),
            "qcow2 header: incompatible feature bit 2 (external data file) is set; images with external data files are refused"
        );
        let luks = write(d, "luks.qcow2", luks_qcow2());
        assert_eq!(
            refusal(check(&luks, None).await),
            "qcow2 header: crypt_method 2 (LUKS) is set; encrypted images are refused"
        );
        let aes = create(
            d,
            "aes.qcow2",
            "qcow2",
            &[
                "--object",
                "secret,id=s0,data=hunter2",
                "-o",
                "encrypt.format=aes,encrypt.key-secret=s0",
            ],
            "10M",
        );
        assert_eq!(
            refusal(check(&aes, None).await),
            "qcow2 header: crypt_method 1 (AES) is set; encrypted images are refused"
        );
        let mut truncated = std::fs::read(create(d, "t.qcow2", "qcow2", &[], "10M")).unwrap();
        truncated.truncate(100);
        let truncated = write(d, "t2.qcow2", &truncated);
        assert!(refusal(check(&truncated, None).await).contains("version 3 header"));
    }

    #[tokio::test]
    async fn vmdk_outside_one_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let flat = create(
            d,
            "flat.vmdk",
            "vmdk",
            &["-o", "subformat=monolithicFlat"],
            "1M",
        );
        assert_eq!(
            refusal(check(&flat, Some(ImageFormat::Vmdk)).await),
            "vmdk descriptor file: createType \"monolithicFlat\" is not allowed (only monolithicSparse and streamOptimized)"
        );
        let split = create(
            d,
            "split.vmdk",
            "vmdk",
            &["-o", "subformat=twoGbMaxExtentFlat"],
            "1M",
        );
        assert!(refusal(check(&split, None).await).contains("createType \"twoGbMaxExtentFlat\""));
        let hostile = write(
            d,
            "hostile.vmdk",
            b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"/etc/hostname\" 0\n",
        );
        assert_eq!(
            refusal(check(&hostile, Some(ImageFormat::Vmdk)).await),
            "vmdk descriptor file: createType \"monolithicFlat\" is not allowed (only monolithicSparse and streamOptimized)"
        );
        let disguised = write(
            d,
            "disguised.vmdk",
            b"# Disk DescriptorFile\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"/etc/hostname\"\n",
        );
        assert!(
            refusal(check(&disguised, None).await)
                .contains("extent \"/etc/hostname\" names another file")
        );
        let text_only = write(
            d,
            "text.vmdk",
            b"# Disk DescriptorFile\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"s.vmdk\"\n",
        );
        assert!(refusal(check(&text_only, None).await).contains("a text-only descriptor"));
        // Declared raw, a descriptor is still a VMDK: never handed to qemu as raw data either.
        assert!(matches!(
            check(&hostile, Some(ImageFormat::Raw)).await,
            Err(ImageError::Mismatch {
                declared: ImageFormat::Raw,
                detected: ImageFormat::Vmdk
            })
        ));
    }

    #[tokio::test]
    async fn vhd_parents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dynamic = std::fs::read(create(d, "d.vhd", "vpc", &[], "10M")).unwrap();
        let diff = write(d, "diff.vhd", &vhd_with_parent(&dynamic, 4, [9; 16]));
        assert_eq!(
            refusal(check(&diff, Some(ImageFormat::Vhd)).await),
            "vhd footer: disk type 4 (differencing) is refused; a lone differencing VHD has no parent here (chains only come in vhd-tgz)"
        );
        let raw_parent = write(d, "null.vhd", &vhd_with_parent(&dynamic, 4, [0; 16]));
        assert!(refusal(check(&raw_parent, None).await).contains("disk type 4 (differencing)"));
        let dynamic_with_parent = write(d, "dp.vhd", &vhd_with_parent(&dynamic, 3, [9; 16]));
        assert_eq!(
            refusal(check(&dynamic_with_parent, None).await),
            "vhd dynamic header: parent UUID is set on a dynamic disk; images with parents are refused"
        );
        // A fixed disk whose data begins with a footer would be read by qemu as dynamic.
        let mut fixed =
            std::fs::read(create(d, "f.vhd", "vpc", &["-o", "subformat=fixed"], "10M")).unwrap();
        let footer = fixed[fixed.len() - 512..].to_vec();
        fixed[..512].copy_from_slice(&footer);
        let fixed = write(d, "f2.vhd", &fixed);
        assert!(refusal(check(&fixed, None).await).contains("ambiguous"));
        // A broken footer is the VHD reader's refusal.
        let mut broken = dynamic.clone();
        let n = broken.len();
        broken[n - 512 + 24] ^= 0xff;
        let broken = write(d, "broken.vhd", &broken);
        assert!(matches!(
            check(&broken, None).await,
            Err(ImageError::Vhd(_))
        ));
    }

    #[tokio::test]
    async fn vhdx_and_vdi_differencing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut vdi = std::fs::read(create(d, "a.vdi", "vdi", &[], "10M")).unwrap();
        vdi[0x4c..0x50].copy_from_slice(&4u32.to_le_bytes());
        let vdi = write(d, "diff.vdi", &vdi);
        assert!(refusal(check(&vdi, None).await).contains("image type 4 (differencing)"));

        let mut vhdx = std::fs::read(create(d, "a.vhdx", "vhdx", &[], "10M")).unwrap();
        // The file parameters item of a qemu image: metadata region at 3 MiB, data at +64 KiB.
        let params = (3 << 20) + 0x10000 + 4;
        vhdx[params..params + 4].copy_from_slice(&2u32.to_le_bytes());
        let vhdx = write(d, "diff.vhdx", &vhdx);
        assert!(refusal(check(&vhdx, None).await).contains("HasParent is set"));
    }

    #[tokio::test]
    async fn declared_format_must_match_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vmdk = create(d, "s.vmdk", "vmdk", &[], "1M");
        assert!(matches!(
            check(&vmdk, Some(ImageFormat::Qcow2)).await,
            Err(ImageError::Mismatch {
                declared: ImageFormat::Qcow2,
                detected: ImageFormat::Vmdk
            })
        ));
        let qcow2 = create(d, "a.qcow2", "qcow2", &[], "1M");
        assert!(matches!(
            check(&qcow2, Some(ImageFormat::Raw)).await,
            Err(ImageError::Mismatch {
                declared: ImageFormat::Raw,
                detected: ImageFormat::Qcow2
            })
        ));
        let fixed = create(d, "f.vhd", "vpc", &["-o", "subformat=fixed"], "1M");
        assert!(matches!(
            check(&fixed, Some(ImageFormat::Raw)).await,
            Err(ImageError::Mismatch {
                declared: ImageFormat::Raw,
                detected: ImageFormat::Vhd
            })
        ));
        let raw = write(d, "r.raw", &[0u8; 4096]);
        assert!(matches!(
            check(&raw, Some(ImageFormat::Vhdx)).await,
            Err(ImageError::Mismatch {
                declared: ImageFormat::Vhdx,
                detected: ImageFormat::Raw
            })
        ));
    }

    #[tokio::test]
    async fn ambiguous_content_and_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut qcow2 = std::fs::read(create(d, "a.qcow2", "qcow2", &[], "1M")).unwrap();
        let footer = std::fs::read(create(d, "f.vhd", "vpc", &["-o", "subformat=fixed"], "1M"))
            .unwrap()
            .split_off(1 << 20);
        let mut polyglot = qcow2.clone();
        polyglot.extend_from_slice(&footer[footer.len() - 512..]);
        let polyglot = write(d, "poly.img", &polyglot);
        assert!(
            refusal(check(&polyglot, None).await)
                .contains("starts as qcow2 but ends with a VHD footer")
        );
        qcow2[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        let both = write(d, "both.img", &qcow2);
        assert!(refusal(check(&both, None).await).contains("matches several formats (qcow2, vdi)"));

        let gz = write(d, "x.tgz", b"\x1f\x8b\x08\0\0\0\0\0\0\x03rest");
        for declared in [None, Some(ImageFormat::VhdTgz)] {
            assert!(refusal(check(&gz, declared).await).contains("vhd-tgz importer"));
        }
    }

    #[tokio::test]
    async fn virtual_size_above_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let qemu = QemuImg::new("qemu-img");
        for (path, size) in [
            (create(d, "a.qcow2", "qcow2", &[], "10M"), 10 << 20),
            (create(d, "a.vmdk", "vmdk", &[], "10M"), 10 << 20),
            (create(d, "a.vdi", "vdi", &[], "10M"), 10 << 20),
            (create(d, "a.vhdx", "vhdx", &[], "10M"), 10 << 20),
            (create(d, "a.raw", "raw", &[], "10M"), 10 << 20),
            (
                create(d, "a.vhd", "vpc", &["-o", "force_size=on"], "10M"),
                10 << 20,
            ),
        ] {
            match inspect_file(&path, None, 1 << 20, &qemu).await {
                Err(ImageError::TooLarge { size: s, limit, .. }) => {
                    assert_eq!((s, limit), (size, 1 << 20), "{}", path.display());
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }

    #[tokio::test]
    async fn garbage_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut rng = Rng::new(5);
        let qemu = QemuImg::new("qemu-img");
        let magics: [&[u8]; 7] = [
            b"",
            b"conectix",
            b"QFI\xfb",
            b"KDMV",
            b"vhdxfile",
            b"# Disk DescriptorFile\n",
            b"\x1f\x8b\x08",
        ];
        for (i, m) in magics.iter().enumerate() {
            for len in [0usize, 7, 600, 5000] {
                let mut b = m.to_vec();
                let mut tail = vec![0u8; len];
                rng.fill(&mut tail);
                b.extend_from_slice(&tail);
                let p = write(d, &format!("g{i}-{len}"), &b);
                let _ = inspect_file(&p, None, LIMIT, &qemu).await;
            }
        }
    }

    #[tokio::test]
    async fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(refusal(check(d, None).await).contains("not a regular file"));
        let target = write(d, "t.raw", &[0u8; 512]);
        let link = d.join("link.raw");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            check(&link, None).await,
            Err(ImageError::Io { .. })
        ));
    }

    /// qemu's view must agree with ours: a stand-in qemu-img reports what a hostile or buggy
    /// qemu might.
    #[tokio::test]
    async fn disagreement_with_qemu_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw = write(d, "r.raw", &[0u8; 4096]);
        let vmdk = create(d, "s.vmdk", "vmdk", &[], "1M");
        let fake = |name: &str, json: &str| {
            let path = d.join(name);
            std::fs::write(&path, format!("#!/bin/sh\ncat <<'EOF'\n{json}\nEOF\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            QemuImg::new(path)
        };
        let cases = [
            (
                &raw,
                r#"{"virtual-size": 4096, "format": "raw", "backing-filename": "/etc/shadow"}"#,
                "reports backing file \"/etc/shadow\"",
            ),
            (
                &raw,
                r#"{"virtual-size": 4096, "format": "raw", "format-specific": {"data": {"data-file": "/x"}}}"#,
                "reports data file \"/x\"",
            ),
            (
                &raw,
                r#"{"virtual-size": 4096, "format": "raw", "children": [{"name": "file"}, {"name": "data-file"}]}"#,
                "opens another node \"data-file\"",
            ),
            (
                &raw,
                r#"{"virtual-size": 8192, "format": "raw"}"#,
                "reports virtual size 8192",
            ),
            (
                &raw,
                r#"{"virtual-size": 4096, "format": "qcow2"}"#,
                "reports format \"qcow2\"",
            ),
            (
                &vmdk,
                r#"{"virtual-size": 1048576, "format": "vmdk", "format-specific": {"data": {"create-type": "monolithicFlat"}}}"#,
                "reports VMDK create type Some(\"monolithicFlat\")",
            ),
            (
                &vmdk,
                r#"{"virtual-size": 1048576, "format": "vmdk", "format-specific": {"data": {"create-type": "monolithicSparse", "extents": [{"filename": "/etc/hostname"}]}}}"#,
                "reports VMDK extents [\"/etc/hostname\"]",
            ),
        ];
        for (i, (path, json, expect)) in cases.into_iter().enumerate() {
            let qemu = fake(&format!("q{i}"), json);
            let msg = refusal(inspect_file(path, None, LIMIT, &qemu).await);
            assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
        }
        let qemu = fake("big", r#"{"virtual-size": 4096000, "format": "raw"}"#);
        assert!(matches!(
            inspect_file(&raw, None, 1 << 20, &qemu).await,
            Err(ImageError::TooLarge { .. })
        ));
    }
}
