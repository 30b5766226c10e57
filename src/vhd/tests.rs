//! Tests of the VHD module: hand-built images for every validated field, chains with partial
//! sector bitmaps, and round trips against the independent reader qemu-img.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::batmap::{BATMAP_HEADER_SIZE, BatmapHeader};
use super::footer::{FOOTER_SIZE, Footer};
use super::header::{HEADER_SIZE, Header, Locator, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use super::util::{chs, decode_utf16le};
use super::writer::{NewImage, ParentSpec};
use super::*;

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// helpers

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn bytes(p: &Path) -> Vec<u8> {
    fs::read(p).expect("read file")
}

fn footer_of(b: &[u8], off: usize) -> Footer {
    let mut a = [0u8; FOOTER_SIZE];
    a.copy_from_slice(&b[off..off + FOOTER_SIZE]);
    Footer::parse(&a)
}

fn header_of(b: &[u8]) -> Header {
    let mut a = [0u8; HEADER_SIZE];
    a.copy_from_slice(&b[512..512 + HEADER_SIZE]);
    Header::parse(&a)
}

/// Edit both footers; `reseal` recomputes the checksum so later rules are reached.
fn edit_footers(p: &Path, reseal: bool, f: impl Fn(&mut Footer)) {
    let mut b = bytes(p);
    let end = b.len() - FOOTER_SIZE;
    let mut ft = footer_of(&b, end);
    f(&mut ft);
    if reseal {
        ft.seal();
    }
    let enc = ft.encode();
    b[end..].copy_from_slice(&enc);
    if ft.disk_type != 2 {
        b[..FOOTER_SIZE].copy_from_slice(&enc);
    }
    fs::write(p, b).expect("write");
}

fn edit_header(p: &Path, reseal: bool, f: impl Fn(&mut Header)) {
    let mut b = bytes(p);
    let mut h = header_of(&b);
    f(&mut h);
    if reseal {
        h.seal();
    }
    b[512..512 + HEADER_SIZE].copy_from_slice(&h.encode());
    fs::write(p, b).expect("write");
}

fn poke(p: &Path, off: usize, data: &[u8]) {
    let mut b = bytes(p);
    b[off..off + data.len()].copy_from_slice(data);
    fs::write(p, b).expect("write");
}

#[track_caller]
fn assert_err<T: std::fmt::Debug>(r: Result<T, VhdError>, needle: &str) {
    match r {
        Ok(v) => panic!("expected an error containing {needle:?}, got Ok({v:?})"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not contain {needle:?}"
            );
        }
    }
}

fn no_progress() -> impl FnMut(u64, u64) -> bool {
    |_, _| true
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-img's raw conversion of a dynamic or fixed VHD.
fn qemu_raw(vhd: &Path) -> Vec<u8> {
    let raw = vhd.with_extension("qemu.raw");
    let _ = fs::remove_file(&raw);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(vhd)
        .arg(&raw));
    let b = bytes(&raw);
    fs::remove_file(&raw).expect("rm");
    b
}

fn qemu_virtual_size(vhd: &Path) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(vhd));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["virtual-size"].as_u64().expect("virtual-size")
}

fn read_all(leaf: &Path) -> Vec<u8> {
    let mut r = ChainReader::open(leaf).expect("chain");
    let mut out = Vec::new();
    r.read_to_end(&mut out).expect("read");
    out
}

/// Raw test data of `blocks` 2 MiB blocks: block i is zero when `zero(i)`, otherwise pattern
/// data, with a zero tail in odd blocks so that zero-detection works per block, not per byte.
fn mixed_data(blocks: u64, zero: impl Fn(u64) -> bool) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..blocks {
        if zero(i) {
            v.extend(std::iter::repeat_n(0u8, BLOCK_SIZE as usize));
        } else {
            let mut b = pattern(i + 1, BLOCK_SIZE as usize);
            if i % 2 == 1 {
                b[BLOCK_SIZE as usize / 2..].fill(0);
            }
            v.extend(b);
        }
    }
    v
}

fn write_raw_vhd(p: &Path, data: &[u8], size: u64) -> VhdInfo {
    let mut src = data;
    write_dynamic_from(&mut src, size, p, Uuid::new_v4(), &mut no_progress()).expect("write")
}

/// A differencing (or, without parent, dynamic) image whose blocks carry explicit bitmaps.
fn build_image(
    p: &Path,
    size: u64,
    uuid: Uuid,
    parent: Option<(&Path, Uuid)>,
    blocks: &[(u64, Vec<u8>, Vec<u8>)],
) -> VhdInfo {
    let spec = parent.map(|(pp, pu)| ParentSpec {
        uuid: *pu.as_bytes(),
        name: pp.file_name().unwrap().to_str().unwrap().to_string(),
        timestamp: 0,
    });
    let mut img = NewImage::create(p, size, uuid, spec.as_ref()).expect("create");
    for (i, bm, data) in blocks {
        img.write_block(*i, bm, data).expect("block");
    }
    img.finish().expect("finish")
}

fn bitmap_with(sectors: impl Fn(u64) -> bool) -> Vec<u8> {
    let mut bm = vec![0u8; 512];
    for s in 0..(BLOCK_SIZE / 512) {
        if sectors(s) {
            bm[(s / 8) as usize] |= 0x80 >> (s % 8);
        }
    }
    bm
}

/// Apply a block written with `bitmap` over `view` (the sectors with set bits).
fn overlay(view: &mut [u8], index: u64, bitmap: &[u8], data: &[u8]) {
    for s in 0..(BLOCK_SIZE / 512) {
        if bitmap[(s / 8) as usize] & (0x80 >> (s % 8)) != 0 {
            let at = (index * BLOCK_SIZE + s * 512) as usize;
            if at < view.len() {
                view[at..at + 512]
                    .copy_from_slice(&data[(s * 512) as usize..(s * 512 + 512) as usize]);
            }
        }
    }
}

fn fresh(d: &Path, name: &str, size: u64) -> PathBuf {
    let p = d.join(name);
    create_dynamic(&p, size, Uuid::new_v4()).expect("create");
    p
}

// ---------------------------------------------------------------------------------------------
// creation and layout

#[test]
fn round_up_size_like_sm() {
    assert_eq!(round_up_size(0), BLOCK_SIZE);
    assert_eq!(round_up_size(1), BLOCK_SIZE);
    assert_eq!(round_up_size(BLOCK_SIZE), BLOCK_SIZE);
    assert_eq!(round_up_size(BLOCK_SIZE + 1), 2 * BLOCK_SIZE);
    assert_eq!(round_up_size(u64::MAX) % BLOCK_SIZE, 0);
}

#[test]
fn create_dynamic_has_xenserver_layout() {
    let d = dir();
    let p = d.path().join("a.vhd");
    let uuid = Uuid::new_v4();
    let info = create_dynamic(&p, 7 * MIB, uuid).unwrap();
    assert_eq!(info.virtual_size, 8 * MIB);
    assert_eq!(info.uuid, uuid);
    assert_eq!(info.disk_type, DiskType::Dynamic);
    assert_eq!(info.creator, "tap");
    assert_eq!(info.creator_version, 0x0001_0003);
    assert_eq!(info.allocated_blocks, 0);
    assert_eq!(info.file_size, 3584);
    assert!(!info.hidden && info.parent.is_none());

    let b = bytes(&p);
    assert_eq!(b.len(), 3584);
    assert_eq!(&b[..512], &b[3072..]);
    let f = footer_of(&b, 3072);
    assert_eq!(&f.cookie, b"conectix");
    assert_eq!(f.features, 2);
    assert_eq!(f.version, 0x0001_0000);
    assert_eq!(f.data_offset, 512);
    assert_eq!(&f.creator_app, b"tap\0");
    assert_eq!(f.creator_os, 0);
    assert_eq!(f.original_size, 8 * MIB);
    assert_eq!(f.current_size, 8 * MIB);
    assert_eq!(f.geometry, chs(8 * MIB));
    assert_eq!(f.geometry, (240 << 16) | (4 << 8) | 17);
    assert_eq!(f.disk_type, 3);
    let h = header_of(&b);
    assert_eq!(&h.cookie, b"cxsparse");
    assert_eq!(h.table_offset, 1536);
    assert_eq!(h.max_entries, 4);
    assert_eq!(h.block_size, 2 * 1024 * 1024);
    assert!(b[1536..1552].iter().all(|&x| x == 0xff));
    let mut bh = [0u8; BATMAP_HEADER_SIZE];
    bh.copy_from_slice(&b[2048..2560]);
    let bh = BatmapHeader::parse(&bh);
    assert_eq!(&bh.cookie, b"tdbatmap");
    assert_eq!(bh.offset, 2560);
    assert_eq!(bh.size, 1);
    assert_eq!(bh.version, 0x0001_0002);
    assert_eq!(bh.checksum, 0xffff_ffff);

    assert_eq!(check(&p).unwrap(), info);
    assert_eq!(inspect(&p).unwrap(), info);
    assert!(matches!(
        create_dynamic(&p, 8 * MIB, uuid),
        Err(VhdError::AlreadyExists { .. })
    ));
    assert_err(
        create_dynamic(&d.path().join("big.vhd"), MAX_VIRTUAL_SIZE + 1, uuid),
        "exceeds the maximum",
    );
}

#[test]
fn create_large_has_multi_sector_bat() {
    let d = dir();
    let p = d.path().join("big.vhd");
    // 100 GiB: 51200 entries, 200 KiB of BAT, 13 sectors of batmap; nothing is allocated.
    let info = create_dynamic(&p, 100 << 30, Uuid::new_v4()).unwrap();
    let b = bytes(&p);
    let h = header_of(&b);
    assert_eq!(h.max_entries, 51200);
    let bm_hdr = 1536 + 51200 * 4;
    assert_eq!(&b[bm_hdr..bm_hdr + 8], b"tdbatmap");
    assert_eq!(info.file_size as usize, bm_hdr + 512 + 13 * 512 + 512);
    check(&p).unwrap();
    if have("qemu-img") {
        assert_eq!(qemu_virtual_size(&p), 100 << 30);
    }
}

#[test]
fn set_hidden_and_set_uuid_rewrite_both_footers() {
    let d = dir();
    let p = fresh(d.path(), "a.vhd", 8 * MIB);
    set_hidden(&p, true).unwrap();
    let b = bytes(&p);
    assert_eq!(b[85], 1);
    assert_eq!(b[b.len() - 512 + 85], 1);
    assert!(check(&p).unwrap().hidden);
    set_hidden(&p, false).unwrap();
    assert!(!check(&p).unwrap().hidden);
    let u = Uuid::new_v4();
    set_uuid(&p, u).unwrap();
    assert_eq!(check(&p).unwrap().uuid, u);
    assert_eq!(footer_of(&bytes(&p), 0).uuid, *u.as_bytes());
}

#[test]
fn legacy_short_footer_is_accepted() {
    let d = dir();
    let p = d.path().join("short.vhd");
    let data = mixed_data(2, |_| false);
    write_raw_vhd(&p, &data, 4 * MIB);
    // Virtual PC before 2004 wrote 511-byte footers; the missing byte is reserved (zero).
    let b = bytes(&p);
    fs::write(&p, &b[..b.len() - 1]).unwrap();
    let info = check(&p).unwrap();
    assert_eq!(info.file_size as usize, b.len() - 1);
    assert!(read_all(&p) == data);
    set_hidden(&p, true).unwrap();
    assert_eq!(bytes(&p).len(), b.len());
    assert!(check(&p).unwrap().hidden);
}

// ---------------------------------------------------------------------------------------------
// inspect: structural rules

#[test]
fn inspect_rejects_bad_footers() {
    let d = dir();
    let base = fresh(d.path(), "base.vhd", 8 * MIB);
    let case = |name: &str, reseal: bool, f: &dyn Fn(&mut Footer), needle: &str| {
        let p = d.path().join(name);
        fs::copy(&base, &p).unwrap();
        edit_footers(&p, reseal, f);
        assert_err(inspect(&p), needle);
    };
    case(
        "cookie.vhd",
        true,
        &|f| f.cookie = *b"conectiy",
        "bad cookie",
    );
    case("poison.vhd", true, &|f| f.cookie = *b"v_poison", "v_poison");
    case(
        "sum.vhd",
        false,
        &|f| f.timestamp ^= 1,
        "footer checksum mismatch (stored",
    );
    case("feat0.vhd", true, &|f| f.features = 0, "reserved bit 0x2");
    case("feat8.vhd", true, &|f| f.features = 0x6, "unknown bits");
    case(
        "ver.vhd",
        true,
        &|f| f.version = 0x0002_0000,
        "file format version",
    );
    case("type.vhd", true, &|f| f.disk_type = 5, "disk type 5");
    case(
        "huge.vhd",
        true,
        &|f| f.current_size = MAX_VIRTUAL_SIZE + BLOCK_SIZE,
        "exceeds",
    );
    case(
        "zero.vhd",
        true,
        &|f| f.current_size = 0,
        "positive multiple of 512",
    );
    case(
        "odd.vhd",
        true,
        &|f| f.current_size = 8 * MIB - 1,
        "positive multiple of 512",
    );
    case(
        "bigger.vhd",
        true,
        &|f| f.current_size = 10 * MIB,
        "needs 5 blocks",
    );
    case(
        "hdr-off.vhd",
        true,
        &|f| f.data_offset = 1 << 40,
        "data offset",
    );

    // Primary and backup must agree.
    let p = d.path().join("backup.vhd");
    fs::copy(&base, &p).unwrap();
    let mut b = bytes(&p);
    let mut f = footer_of(&b, 0);
    f.hidden = 1;
    f.seal();
    b[..512].copy_from_slice(&f.encode());
    fs::write(&p, &b).unwrap();
    assert_err(inspect(&p), "backup footer at offset 0 differs");

    // Broken backup copy.
    poke(&p, 0, b"xxxxxxxx");
    assert_err(inspect(&p), "backup footer: bad cookie");

    // Truncation.
    let p = d.path().join("trunc.vhd");
    fs::copy(&base, &p).unwrap();
    let b = bytes(&p);
    fs::write(&p, &b[..b.len() - 100]).unwrap();
    assert_err(inspect(&p), "not a multiple of 512");
    fs::write(&p, &b[..100]).unwrap();
    assert_err(inspect(&p), "too small");
    fs::write(&p, &b[..b.len() - 512]).unwrap();
    assert_err(inspect(&p), "bad cookie");
}

#[test]
fn inspect_rejects_bad_headers_and_bat() {
    let d = dir();
    // 8 MiB with two allocated blocks.
    let base = d.path().join("base.vhd");
    write_raw_vhd(&base, &mixed_data(4, |i| i % 2 == 1), 8 * MIB);
    assert_eq!(inspect(&base).unwrap().allocated_blocks, 2);
    let case = |name: &str, reseal: bool, f: &dyn Fn(&mut Header), needle: &str| {
        let p = d.path().join(name);
        fs::copy(&base, &p).unwrap();
        edit_header(&p, reseal, f);
        assert_err(inspect(&p), needle);
    };
    case(
        "cookie.vhd",
        true,
        &|h| h.cookie = *b"cxsparsf",
        "dynamic header: bad cookie",
    );
    case(
        "sum.vhd",
        false,
        &|h| h.reserved1 = 7,
        "dynamic header checksum mismatch",
    );
    case(
        "ver.vhd",
        true,
        &|h| h.version = 0x0001_0001,
        "dynamic header: version",
    );
    case("doff.vhd", true, &|h| h.data_offset = 0, "must be all ones");
    case("bs.vhd", true, &|h| h.block_size = 3 << 20, "block size");
    case("bs2.vhd", true, &|h| h.block_size = 4 << 20, "block size");
    case(
        "entries.vhd",
        true,
        &|h| h.max_entries = 3,
        "needs 4 blocks",
    );
    case(
        "bat-huge.vhd",
        true,
        &|h| h.max_entries = u32::MAX,
        "exceeds",
    );
    case(
        "bat-eof.vhd",
        true,
        &|h| h.table_offset = 1 << 30,
        "extends past the footer",
    );
    case(
        "bat-align.vhd",
        true,
        &|h| h.table_offset = 1537,
        "not sector aligned",
    );
    case("bat-hdr.vhd", true, &|h| h.table_offset = 1024, "overlaps");
    case(
        "loc-code.vhd",
        true,
        &|h| {
            h.locators[0] = Locator {
                code: 0x1234_5678,
                data_space: 1,
                data_len: 4,
                reserved: 0,
                data_offset: 3072,
            }
        },
        "unknown platform code",
    );
    case(
        "loc-eof.vhd",
        true,
        &|h| {
            h.locators[0] = Locator {
                code: PLAT_MACX,
                data_space: 512,
                data_len: 4,
                reserved: 0,
                data_offset: 1 << 40,
            }
        },
        "outside the file",
    );
    case(
        "loc-space.vhd",
        true,
        &|h| {
            h.locators[0] = Locator {
                code: PLAT_MACX,
                data_space: 1000,
                data_len: 4,
                reserved: 0,
                data_offset: 3072,
            }
        },
        "neither sectors",
    );
    case(
        "loc-len.vhd",
        true,
        &|h| {
            h.locators[0] = Locator {
                code: PLAT_MACX,
                data_space: 1,
                data_len: 600,
                reserved: 0,
                data_offset: 3072,
            }
        },
        "exceeds its data space",
    );
    case(
        "loc-over-bat.vhd",
        true,
        &|h| {
            h.locators[0] = Locator {
                code: PLAT_MACX,
                data_space: 1,
                data_len: 4,
                reserved: 0,
                data_offset: 1536,
            }
        },
        "overlaps",
    );

    // BAT entries: past EOF, overlapping each other, overlapping the BAT.
    let bat = |name: &str, idx: usize, value: u32, needle: &str| {
        let p = d.path().join(name);
        fs::copy(&base, &p).unwrap();
        poke(&p, 1536 + 4 * idx, &value.to_be_bytes());
        assert_err(inspect(&p), needle);
    };
    let b = bytes(&base);
    let e0 = u32::from_be_bytes(b[1536..1540].try_into().unwrap());
    bat("past-eof.vhd", 1, 0x0100_0000, "extends past the footer");
    bat("same.vhd", 1, e0, "overlaps block 0");
    bat("inside.vhd", 1, e0 + 8, "overlaps block 0");
    bat("over-bat.vhd", 1, 3, "overlaps");
    bat("over-footer-copy.vhd", 1, 0, "the footer copy");
}

// ---------------------------------------------------------------------------------------------
// check: vhd-util rules

#[test]
fn check_rejects_what_vhd_util_rejects() {
    let d = dir();
    let base = d.path().join("base.vhd");
    write_raw_vhd(&base, &mixed_data(4, |i| i == 2), 8 * MIB);
    check(&base).unwrap();
    let fcase = |name: &str, f: &dyn Fn(&mut Footer), needle: &str| {
        let p = d.path().join(name);
        fs::copy(&base, &p).unwrap();
        edit_footers(&p, true, f);
        inspect(&p).unwrap();
        assert_err(check(&p), needle);
    };
    let now = super::util::vhd_now();
    fcase("future.vhd", &|f| f.timestamp = now + 4000, "in the future");
    fcase("hidden2.vhd", &|f| f.hidden = 2, "hidden flag 2");
    fcase("saved2.vhd", &|f| f.saved_state = 2, "saved state 2");
    fcase(
        "reserved.vhd",
        &|f| f.reserved[100] = 1,
        "reserved byte 186",
    );
    fcase(
        "nulluuid.vhd",
        &|f| f.uuid = [0; 16],
        "unique id is all zero",
    );
    fcase(
        "geometry.vhd",
        &|f| f.geometry = (65535 << 16) | (16 << 8) | 255,
        "geometry",
    );
    fcase(
        "tapver.vhd",
        &|f| f.creator_version = 0x0001_0004,
        "tap creator version",
    );
    // A near-future timestamp within the slack passes.
    let p = d.path().join("slack.vhd");
    fs::copy(&base, &p).unwrap();
    edit_footers(&p, true, |f| f.timestamp = now + 600);
    check(&p).unwrap();

    let hcase = |name: &str, f: &dyn Fn(&mut Header), needle: &str| {
        let p = d.path().join(name);
        fs::copy(&base, &p).unwrap();
        edit_header(&p, true, f);
        inspect(&p).unwrap();
        assert_err(check(&p), needle);
    };
    hcase("res1.vhd", &|h| h.reserved1 = 1, "offset 60");
    hcase("res2.vhd", &|h| h.reserved2[3] = 1, "reserved byte 771");
    hcase("pname.vhd", &|h| h.parent_name[1] = b'x', "parent name set");
    hcase("puuid.vhd", &|h| h.parent_uuid[0] = 1, "parent UUID set");
    hcase(
        "pts.vhd",
        &|h| h.parent_timestamp = 5,
        "parent time stamp set",
    );

    // Batmap: checksum, cookie, a bit for an unallocated block, missing when tap >= 1.2.
    let b = bytes(&base);
    let bcase = |name: &str, off: usize, data: &[u8], needle: &str| {
        let p = d.path().join(name);
        fs::copy(&base, &p).unwrap();
        poke(&p, off, data);
        inspect(&p).unwrap();
        assert_err(check(&p), needle);
    };
    // Blocks 0, 1, 3 are allocated and full, so bits 0x80|0x40|0x10 are set.
    assert_eq!(b[2560], 0xd0);
    bcase("bm-sum.vhd", 2560, &[0xc0], "batmap checksum mismatch");
    bcase("bm-cookie.vhd", 2048, b"tdbatmaq", "batmap: bad cookie");
    bcase(
        "bm-ver.vhd",
        2048 + 20,
        &0x0001_0003u32.to_be_bytes(),
        "batmap: version",
    );
    bcase(
        "bm-size.vhd",
        2048 + 16,
        &0u32.to_be_bytes(),
        "size is zero",
    );
    bcase(
        "bm-off.vhd",
        2048 + 8,
        &(1u64 << 40).to_be_bytes(),
        "extends past the footer",
    );
    {
        // Bit for the unallocated block 2 with a consistent checksum.
        let p = d.path().join("bm-bit.vhd");
        fs::copy(&base, &p).unwrap();
        let mut map = vec![0u8; 512];
        map[0] = 0xf0;
        poke(&p, 2560, &map[..1]);
        let sum = super::batmap::map_checksum(&map, 0x0001_0002);
        poke(&p, 2048 + 24, &sum.to_be_bytes());
        assert_err(check(&p), "marks block 2 full");
    }
    // A file without batmap passes when it does not claim tap >= 1.2.
    let p = d.path().join("nobm.vhd");
    fs::copy(&base, &p).unwrap();
    poke(&p, 2048, &[0u8; 512]);
    assert_err(check(&p), "batmap: bad cookie");
    edit_footers(&p, true, |f| f.creator_app = *b"qemu");
    check(&p).unwrap();
}

// ---------------------------------------------------------------------------------------------
// streaming writer

#[test]
fn write_dynamic_from_round_trips_through_qemu() {
    let d = dir();
    let p = d.path().join("w.vhd");
    let size = 9 * BLOCK_SIZE + 12345;
    let mut data = mixed_data(10, |i| i == 1 || i == 4);
    data.truncate(size as usize);
    let mut calls = 0u64;
    let mut last = (0, 0);
    let mut progress = |done: u64, total: u64| {
        calls += 1;
        last = (done, total);
        true
    };
    let mut src = &data[..];
    let info = write_dynamic_from(&mut src, size, &p, Uuid::new_v4(), &mut progress).unwrap();
    assert_eq!(calls, 10);
    assert_eq!(last, (size, size));
    assert_eq!(info.virtual_size, 10 * BLOCK_SIZE);
    assert_eq!(info.allocated_blocks, 8);
    assert_eq!(check(&p).unwrap(), info);
    // Block data is 4 KiB aligned after a one-sector bitmap.
    let b = bytes(&p);
    for i in 0..10usize {
        let e = u32::from_be_bytes(b[1536 + 4 * i..1540 + 4 * i].try_into().unwrap());
        if e != 0xffff_ffff {
            assert_eq!((u64::from(e) * 512 + 512) % 4096, 0);
        }
    }
    let mut expect = data.clone();
    expect.resize((10 * BLOCK_SIZE) as usize, 0);
    assert_eq!(read_all(&p), expect);
    if have("qemu-img") {
        assert_eq!(qemu_virtual_size(&p), 10 * BLOCK_SIZE);
        assert_eq!(qemu_raw(&p), expect);
    }
}

#[test]
fn write_dynamic_from_cleans_up_on_cancel_and_short_source() {
    let d = dir();
    let p = d.path().join("c.vhd");
    let data = mixed_data(4, |_| false);
    let mut src = &data[..];
    let mut stop_after_two = |done: u64, _| done < 2 * BLOCK_SIZE;
    let r = write_dynamic_from(&mut src, 8 * MIB, &p, Uuid::new_v4(), &mut stop_after_two);
    assert!(r.unwrap_err().is_cancelled());
    assert!(!p.exists());

    let mut short = &data[..3 * MIB as usize];
    let r = write_dynamic_from(&mut short, 8 * MIB, &p, Uuid::new_v4(), &mut no_progress());
    assert!(matches!(r, Err(VhdError::ShortSource { got, .. }) if got == 3 * MIB));
    assert!(!p.exists());

    // An existing destination is never replaced.
    fs::write(&p, b"keep").unwrap();
    let mut src = &data[..];
    let r = write_dynamic_from(&mut src, 8 * MIB, &p, Uuid::new_v4(), &mut no_progress());
    assert!(matches!(r, Err(VhdError::AlreadyExists { .. })));
    assert_eq!(bytes(&p), b"keep");
}

// ---------------------------------------------------------------------------------------------
// chains

/// base (dynamic, 16 MiB) <- mid (differencing, 20 MiB) <- leaf (differencing, 24 MiB), with
/// partial sector bitmaps. Returns the paths and the expected merged view of the leaf.
fn three_deep(d: &Path) -> (PathBuf, PathBuf, PathBuf, Vec<u8>) {
    let base = d.join("base.vhd");
    let mid = d.join("mid.vhd");
    let leaf = d.join("leaf.vhd");
    let base_data = mixed_data(8, |i| i == 2 || i == 6);
    let base_info = write_raw_vhd(&base, &base_data, 16 * MIB);

    let mid_uuid = Uuid::new_v4();
    let mid_blocks = vec![
        // Whole sectors 0-7 and 100-200, plus a partial bitmap byte (sectors 400..408).
        (
            0,
            bitmap_with(|s| s < 8 || (100..=200).contains(&s) || [400, 402, 405, 407].contains(&s)),
            pattern(100, BLOCK_SIZE as usize),
        ),
        (2, bitmap_with(|_| true), pattern(102, BLOCK_SIZE as usize)),
        (
            5,
            bitmap_with(|s| s % 2 == 0),
            pattern(105, BLOCK_SIZE as usize),
        ),
        // Beyond the base's size: clear sectors read as zero.
        (
            9,
            bitmap_with(|s| s < 64),
            pattern(109, BLOCK_SIZE as usize),
        ),
    ];
    build_image(
        &mid,
        20 * MIB,
        mid_uuid,
        Some((&base, base_info.uuid)),
        &mid_blocks,
    );

    let leaf_blocks = vec![
        (
            0,
            bitmap_with(|s| (3..=5).contains(&s) || s == 401),
            pattern(200, BLOCK_SIZE as usize),
        ),
        // Allocated with an empty bitmap: everything falls through.
        (2, bitmap_with(|_| false), pattern(202, BLOCK_SIZE as usize)),
        (
            5,
            bitmap_with(|s| s % 3 == 0),
            pattern(205, BLOCK_SIZE as usize),
        ),
        (
            11,
            bitmap_with(|s| s >= 4000),
            pattern(211, BLOCK_SIZE as usize),
        ),
    ];
    build_image(
        &leaf,
        24 * MIB,
        Uuid::new_v4(),
        Some((&mid, mid_uuid)),
        &leaf_blocks,
    );

    let mut view = vec![0u8; (24 * MIB) as usize];
    view[..base_data.len()].copy_from_slice(&base_data);
    for (i, bm, data) in &mid_blocks {
        overlay(&mut view[..(20 * MIB) as usize], *i, bm, data);
    }
    for (i, bm, data) in &leaf_blocks {
        overlay(&mut view, *i, bm, data);
    }
    (base, mid, leaf, view)
}

#[test]
fn three_deep_chain_reads_merged() {
    let d = dir();
    let (base, mid, leaf, view) = three_deep(d.path());
    let chain = Chain::open(&leaf).unwrap();
    let names: Vec<_> = chain.files().iter().map(|f| f.0.clone()).collect();
    assert_eq!(names, vec![leaf.clone(), mid.clone(), base.clone()]);
    assert_eq!(chain.virtual_size(), 24 * MIB);
    assert_eq!(chain.files()[1].1.parent.as_ref().unwrap().name, "base.vhd");
    for p in [&base, &mid, &leaf] {
        check(p).unwrap();
    }

    let mut r = ChainReader::new(chain);
    // Whole view through Read.
    let mut all = Vec::new();
    r.read_to_end(&mut all).unwrap();
    assert!(all == view, "merged view differs");
    // Odd, unaligned ranges through read_at and Seek.
    for (off, len) in [
        (0u64, 1usize),
        (511, 3),
        (1536, 70_000),
        (2 * MIB - 5, 11),
        (19 * MIB, 3 * MIB as usize),
    ] {
        let mut buf = vec![0xeeu8; len];
        r.read_at(off, &mut buf).unwrap();
        assert_eq!(
            &buf[..],
            &view[off as usize..off as usize + len],
            "at {off}+{len}"
        );
    }
    r.seek(SeekFrom::Start(5 * MIB + 3)).unwrap();
    let mut buf = vec![0u8; 1000];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf[..],
        &view[(5 * MIB + 3) as usize..(5 * MIB + 1003) as usize]
    );
    assert_err(
        r.read_at(24 * MIB - 1, &mut [0u8; 2]),
        "past the virtual size",
    );
    // Block 7 is zero in the base and never written above; 6 is a zero block of the base.
    assert!(r.allocated(0) && r.allocated(9) && r.allocated(11));
    assert!(!r.allocated(6) && !r.allocated(10) && !r.allocated(12));

    // Flatten: one dynamic file with the same content, passing check and qemu.
    let flat = d.path().join("flat.vhd");
    let info = copy_flattened(&leaf, &flat, Uuid::new_v4(), None, &mut no_progress()).unwrap();
    assert_eq!(info.disk_type, DiskType::Dynamic);
    assert_eq!(check(&flat).unwrap(), info);
    assert!(read_all(&flat) == view);
    if have("qemu-img") {
        assert!(qemu_raw(&flat) == view);
    }
    // Grown copy; shrinking refused.
    let big = d.path().join("big.vhd");
    let info = copy_flattened(
        &leaf,
        &big,
        Uuid::new_v4(),
        Some(30 * MIB),
        &mut no_progress(),
    )
    .unwrap();
    assert_eq!(info.virtual_size, 30 * MIB);
    let all = read_all(&big);
    assert!(all[..view.len()] == view[..] && all[view.len()..].iter().all(|&b| b == 0));
    assert!(matches!(
        copy_flattened(
            &leaf,
            &d.path().join("small.vhd"),
            Uuid::new_v4(),
            Some(MIB),
            &mut no_progress()
        ),
        Err(VhdError::Shrink { .. })
    ));
    assert!(!d.path().join("small.vhd").exists());
}

#[test]
fn write_raw_gives_the_merged_view_with_holes_and_stops_on_cancel() {
    use std::os::unix::fs::MetadataExt;
    let d = dir();
    let (_, _, leaf, view) = three_deep(d.path());
    let raw = d.path().join("disk.raw");
    let file = std::fs::File::create(&raw).unwrap();
    let mut calls = 0;
    super::write_raw(&leaf, &file, &raw, &mut |_, _| {
        calls += 1;
        true
    })
    .unwrap();
    assert!(bytes(&raw) == view, "raw differs from the merged view");
    assert!(calls > 1, "progress is reported per block");
    // Blocks 6, 10 and 12 are held by no file: they stay holes.
    let allocated = std::fs::metadata(&raw).unwrap().blocks() * 512;
    assert!(
        allocated <= 24 * MIB - 3 * 2 * MIB,
        "{allocated} bytes allocated"
    );

    let cancelled = d.path().join("cancelled.raw");
    let file = std::fs::File::create(&cancelled).unwrap();
    let result = super::write_raw(&leaf, &file, &cancelled, &mut |done, _| done < 3);
    assert!(matches!(result, Err(VhdError::Cancelled)));
}

#[test]
fn dynamic_disk_clear_bitmap_bits_read_as_zero() {
    let d = dir();
    let p = d.path().join("dyn.vhd");
    let data = pattern(7, BLOCK_SIZE as usize);
    build_image(
        &p,
        4 * MIB,
        Uuid::new_v4(),
        None,
        &[(1, bitmap_with(|s| s == 0 || s == 9), data.clone())],
    );
    let all = read_all(&p);
    let mut expect = vec![0u8; (4 * MIB) as usize];
    overlay(&mut expect, 1, &bitmap_with(|s| s == 0 || s == 9), &data);
    assert!(all == expect);
}

#[test]
fn chain_rejects_bad_links() {
    let d = dir();
    let dp = d.path();
    let base = fresh(dp, "base.vhd", 8 * MIB);
    let base_uuid = inspect(&base).unwrap().uuid;

    // Wrong parent UUID.
    let c = dp.join("wrong.vhd");
    build_image(
        &c,
        8 * MIB,
        Uuid::new_v4(),
        Some((&base, Uuid::new_v4())),
        &[],
    );
    assert_err(Chain::open(&c), "does not match the footer UUID");
    assert_err(check(&c), "does not match the footer UUID");

    // Null parent UUID (raw parent).
    let c = dp.join("raw.vhd");
    build_image(&c, 8 * MIB, Uuid::new_v4(), Some((&base, Uuid::nil())), &[]);
    assert_err(Chain::open(&c), "all-zero parent UUID");
    assert_err(check(&c), "all zero");

    // Parent names with directories.
    for (i, name) in ["../base.vhd", "sub/base.vhd", "..", "C:\\x\\base.vhd", ""]
        .iter()
        .enumerate()
    {
        let c = dp.join(format!("name{i}.vhd"));
        build_image(&c, 8 * MIB, Uuid::new_v4(), Some((&base, base_uuid)), &[]);
        edit_header(&c, true, |h| {
            h.set_parent_name(Path::new("x"), name).unwrap()
        });
        assert_err(Chain::open(&c), "not a plain file name");
    }

    // Missing parent.
    let c = dp.join("orphan.vhd");
    build_image(
        &c,
        8 * MIB,
        Uuid::new_v4(),
        Some((&dp.join("gone.vhd"), Uuid::new_v4())),
        &[],
    );
    assert_err(Chain::open(&c), "not found");
    assert_err(check(&c), "cannot be opened");

    // Child smaller than parent.
    let big = fresh(dp, "bigbase.vhd", 16 * MIB);
    let c = dp.join("small.vhd");
    build_image(
        &c,
        8 * MIB,
        Uuid::new_v4(),
        Some((&big, inspect(&big).unwrap().uuid)),
        &[],
    );
    assert_err(Chain::open(&c), "smaller than its parent");

    // Loop: a -> b -> a.
    let (ua, ub) = (Uuid::new_v4(), Uuid::new_v4());
    let (a, b) = (dp.join("a.vhd"), dp.join("b.vhd"));
    build_image(&a, 8 * MIB, ua, Some((&b, ub)), &[]);
    build_image(&b, 8 * MIB, ub, Some((&a, ua)), &[]);
    assert_err(Chain::open(&a), "loop");

    // Symlinked parent.
    let c = dp.join("vialink.vhd");
    std::os::unix::fs::symlink(&base, dp.join("link.vhd")).unwrap();
    build_image(
        &c,
        8 * MIB,
        Uuid::new_v4(),
        Some((&dp.join("link.vhd"), base_uuid)),
        &[],
    );
    assert_err(Chain::open(&c), "symlink");

    // Depth: 30 files are fine, 31 are not.
    let mut parent = base.clone();
    let mut parent_uuid = base_uuid;
    for i in 1..=30 {
        let c = dp.join(format!("d{i}.vhd"));
        let u = Uuid::new_v4();
        build_image(&c, 8 * MIB, u, Some((&parent, parent_uuid)), &[]);
        if i == 29 {
            assert_eq!(Chain::open(&c).unwrap().files().len(), 30);
        }
        parent = c;
        parent_uuid = u;
    }
    assert_err(Chain::open(&parent), "deeper than 30");
}

#[test]
fn check_validates_parent_locators() {
    let d = dir();
    let dp = d.path();
    let base = fresh(dp, "base.vhd", 8 * MIB);
    let bu = inspect(&base).unwrap().uuid;
    let child = dp.join("child.vhd");
    build_image(&child, 8 * MIB, Uuid::new_v4(), Some((&base, bu)), &[]);
    check(&child).unwrap();
    // The XenServer locators, byte for byte.
    let b = bytes(&child);
    let h = header_of(&b);
    assert_eq!(h.locators[0].code, PLAT_MACX);
    assert_eq!(h.locators[1].code, PLAT_W2KU);
    assert_eq!(h.locators[2].code, PLAT_W2RU);
    assert_eq!(h.locators[0].data_offset, 3072);
    let l0 = h.locators[0];
    assert_eq!(&b[3072..3072 + l0.data_len as usize], b"file://./base.vhd");
    let l1 = h.locators[1];
    let w = decode_utf16le(
        &b[l1.data_offset as usize..(l1.data_offset + u64::from(l1.data_len)) as usize],
    );
    assert_eq!(w.as_deref(), Some(".\\base.vhd"));
    assert_eq!(l1.data_space, 512);

    let case = |name: &str, f: &dyn Fn(&mut Header, &Path), needle: &str| {
        let p = dp.join(name);
        fs::copy(&child, &p).unwrap();
        edit_header(&p, true, |h| f(h, &p));
        assert_err(check(&p), needle);
    };
    case(
        "dup.vhd",
        &|h, _| h.locators[1].code = PLAT_MACX,
        "duplicate platform code",
    );
    case(
        "res.vhd",
        &|h, _| h.locators[1].reserved = 1,
        "reserved field",
    );
    case(
        "len0.vhd",
        &|h, _| h.locators[1].data_len = 0,
        "must all be non-zero",
    );
    case(
        "empty.vhd",
        &|h, _| h.locators[3].data_len = 1,
        "unused entry with non-zero",
    );
    case(
        "none.vhd",
        &|h, _| h.locators = [Locator::default(); 8],
        "no MacX",
    );
    // A locator naming another file, and one leaving the directory.
    let p = dp.join("other.vhd");
    fs::copy(&child, &p).unwrap();
    poke(&p, 3072, b"file://./bxse.vhd");
    assert_err(check(&p), "does not match header parent name");
    let p = dp.join("escape.vhd");
    fs::copy(&child, &p).unwrap();
    poke(&p, 3072, b"file://x/base.vhd");
    assert_err(check(&p), "leaves the child's directory");
    // Future parent timestamp.
    case(
        "pts.vhd",
        &|h, _| h.parent_timestamp = super::util::vhd_now() + 5000,
        "parent time stamp",
    );
}

#[test]
fn set_parent_relinks_in_place_and_by_rewrite() {
    let d = dir();
    let dp = d.path();
    let (_base, mid, leaf, view) = three_deep(dp);
    // A copy of mid under a new name and UUID; re-point the leaf at it (in place: the three
    // existing locator areas are large enough).
    let mid2 = dp.join("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0.vhd");
    fs::copy(&mid, &mid2).unwrap();
    let u2 = Uuid::new_v4();
    set_uuid(&mid2, u2).unwrap();
    let leaf_len = bytes(&leaf).len();
    set_parent(&leaf, &mid2).unwrap();
    assert_eq!(
        bytes(&leaf).len(),
        leaf_len,
        "in-place relink keeps the layout"
    );
    let info = check(&leaf).unwrap();
    assert_eq!(info.parent.as_ref().unwrap().uuid, u2);
    assert_eq!(
        info.parent.as_ref().unwrap().name,
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0.vhd"
    );
    let chain = Chain::open(&leaf).unwrap();
    assert_eq!(chain.files()[1].0, mid2);
    assert!(read_all(&leaf) == view);
    let b = bytes(&leaf);
    let h = header_of(&b);
    let l0 = h.locators[0];
    assert_eq!(l0.data_len, 49);
    assert_eq!(
        &b[l0.data_offset as usize..l0.data_offset as usize + 49],
        b"file://./0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0.vhd"
    );
    assert_eq!(h.locators[1].data_len, 84);
    let mt = fs::metadata(&mid2).unwrap();
    assert_eq!(
        u64::from(h.parent_timestamp),
        std::os::unix::fs::MetadataExt::mtime(&mt) as u64 - super::util::VHD_EPOCH
    );

    // Without room for locators the child is rewritten (same UUID, same data).
    let lonely = dp.join("lonely.vhd");
    fs::copy(&leaf, &lonely).unwrap();
    edit_header(&lonely, true, |h| h.locators = [Locator::default(); 8]);
    let before = inspect(&lonely).unwrap();
    set_parent(&lonely, &mid).unwrap();
    let after = check(&lonely).unwrap();
    assert_eq!(after.uuid, before.uuid);
    assert_eq!(after.parent.as_ref().unwrap().name, "mid.vhd");
    assert!(read_all(&lonely) == view);
    let leftovers: Vec<_> = fs::read_dir(dp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());

    // Refusals: not differencing, other directory, bigger parent.
    let plain = fresh(dp, "plain.vhd", 8 * MIB);
    assert_err(set_parent(&plain, &mid), "only differencing disks");
    let sub = dp.join("sub");
    fs::create_dir(&sub).unwrap();
    let far = fresh(&sub, "far.vhd", 8 * MIB);
    assert_err(set_parent(&leaf, &far), "not in the same directory");
    let huge = fresh(dp, "huge.vhd", 64 * MIB);
    assert_err(set_parent(&leaf, &huge), "smaller than the new parent");
    assert_err(set_parent(&leaf, &leaf), "own parent");
}

#[test]
fn grow_in_place_and_by_rewrite() {
    let d = dir();
    let dp = d.path();
    let p = dp.join("g.vhd");
    let data = mixed_data(4, |i| i == 2);
    let orig = write_raw_vhd(&p, &data, 8 * MIB);
    assert_err(grow(&p, 4 * MIB), "refusing to shrink");
    assert_eq!(grow(&p, 8 * MIB).unwrap().virtual_size, 8 * MIB);

    // 4 -> 30 entries fit the BAT's sector padding: no relocation.
    let len = bytes(&p).len();
    let info = grow(&p, 60 * MIB - 3).unwrap();
    assert_eq!(info.virtual_size, 60 * MIB);
    assert_eq!(bytes(&p).len(), len);
    assert_eq!(check(&p).unwrap(), info);
    assert_prefix_then_zeros(&p, &data, 60 * MIB);

    // 30 -> 150 entries: rewritten with a larger BAT, identity kept.
    set_hidden(&p, true).unwrap();
    let info = grow(&p, 300 * MIB).unwrap();
    assert_eq!(info.virtual_size, 300 * MIB);
    assert_eq!(info.uuid, orig.uuid);
    assert!(info.hidden);
    assert_eq!(info.allocated_blocks, 3);
    assert_eq!(check(&p).unwrap(), info);
    assert_prefix_then_zeros(&p, &data, 300 * MIB);
    if have("qemu-img") {
        assert_eq!(qemu_virtual_size(&p), 300 * MIB);
    }

    // A differencing child keeps its parent link through a rewrite.
    let (_base, _mid, leaf, view) = three_deep(dp);
    let info = grow(&leaf, 300 * MIB).unwrap();
    assert_eq!(info.parent.as_ref().unwrap().name, "mid.vhd");
    check(&leaf).unwrap();
    assert_prefix_then_zeros(&leaf, &view, 300 * MIB);
}

/// The merged view of `p` starts with `prefix`, is `size` bytes long and zero afterwards
/// (verified by reading the prefix, a window after it and the last block).
fn assert_prefix_then_zeros(p: &Path, prefix: &[u8], size: u64) {
    let mut r = ChainReader::open(p).unwrap();
    assert_eq!(r.virtual_size(), size);
    let mut buf = vec![0u8; prefix.len()];
    r.read_at(0, &mut buf).unwrap();
    assert!(buf == prefix);
    let first_hole = prefix.len() as u64;
    let mut z = vec![1u8; (4 * MIB) as usize];
    r.read_at(first_hole, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    r.read_at(size - 4 * MIB, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    assert!(!r.allocated((size - 1) / BLOCK_SIZE));
}

// ---------------------------------------------------------------------------------------------
// interoperability with qemu

#[test]
fn qemu_created_images_are_readable() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io missing: skipped");
        return;
    }
    let d = dir();
    let dyn_p = d.path().join("q-dyn.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&dyn_p)
        .arg("10M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "vpc",
            "-c",
            "write -P 0x5a 1M 3M",
            "-c",
            "write -P 0x11 7M 512",
        ])
        .arg(&dyn_p));
    let info = inspect(&dyn_p).unwrap();
    assert_eq!(info.creator, "qemu");
    assert_eq!(info.disk_type, DiskType::Dynamic);
    assert_eq!(info.virtual_size, qemu_virtual_size(&dyn_p));
    check(&dyn_p).unwrap();
    assert!(read_all(&dyn_p) == qemu_raw(&dyn_p));

    // Fixed: from raw data through qemu.
    let raw = d.path().join("src.raw");
    let data = pattern(42, (6 * MIB) as usize);
    fs::write(&raw, &data).unwrap();
    let fixed = d.path().join("q-fixed.vhd");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed",
        ])
        .arg(&raw)
        .arg(&fixed));
    let info = inspect(&fixed).unwrap();
    assert_eq!(info.disk_type, DiskType::Fixed);
    check(&fixed).unwrap();
    let all = read_all(&fixed);
    assert_eq!(all.len() as u64, info.virtual_size);
    assert!(all[..data.len()] == data[..]);
    assert!(all == qemu_raw(&fixed));

    // A fixed disk grows in place and flattens to a dynamic one.
    let grown = grow(&fixed, 16 * MIB).unwrap();
    assert_eq!(grown.virtual_size, 16 * MIB);
    check(&fixed).unwrap();
    let all = read_all(&fixed);
    assert!(all[..data.len()] == data[..] && all[data.len()..].iter().all(|&b| b == 0));
    let flat = d.path().join("flat.vhd");
    copy_flattened(&fixed, &flat, Uuid::new_v4(), None, &mut no_progress()).unwrap();
    check(&flat).unwrap();
    assert!(read_all(&flat) == all);
}

#[test]
fn qemu_written_xenserver_image_is_readable_and_renormalised() {
    if !have("qemu-io") {
        eprintln!("qemu-io missing: skipped");
        return;
    }
    let d = dir();
    let p = fresh(d.path(), "x.vhd", 16 * MIB);
    // qemu places its first block right after the BAT, on top of the batmap.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "vpc",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 5M 4k",
        ])
        .arg(&p));
    let info = inspect(&p).unwrap();
    assert_eq!(info.allocated_blocks, 2);
    assert_err(check(&p), "batmap");
    let mut expect = vec![0u8; (16 * MIB) as usize];
    expect[..MIB as usize].fill(0xab);
    expect[(5 * MIB) as usize..(5 * MIB + 4096) as usize].fill(0xcd);
    let all = read_all(&p);
    assert!(all == expect);

    let out = d.path().join("norm.vhd");
    let info = copy_flattened(&p, &out, Uuid::new_v4(), None, &mut no_progress()).unwrap();
    assert_eq!(check(&out).unwrap(), info);
    assert_eq!(info.allocated_blocks, 2);
    assert!(read_all(&out) == expect);
    if have("qemu-img") {
        assert!(qemu_raw(&out) == expect);
    }
}

/// Throughput comparison with qemu-img (run with
/// `cargo test --release --lib vhd::tests::bench -- --ignored --nocapture`;
/// `VHD_BENCH_DIR` picks the directory, `VHD_BENCH_MIB` the size).
#[test]
#[ignore]
fn bench_against_qemu() {
    use std::io::Write;
    use std::time::Instant;
    let root = std::env::var("VHD_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    let mib: u64 = std::env::var("VHD_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let d = tempfile::tempdir_in(root).unwrap();
    let dp = d.path();
    let size = mib * MIB;
    // 40 % of the blocks random, 10 % half-filled, the rest zero.
    let raw = dp.join("src.raw");
    {
        let mut f = std::io::BufWriter::new(fs::File::create(&raw).unwrap());
        for i in 0..size / BLOCK_SIZE {
            let mut b = vec![0u8; BLOCK_SIZE as usize];
            match i % 10 {
                0..=3 => b = pattern(i + 1, BLOCK_SIZE as usize),
                4 => b[..(BLOCK_SIZE / 2) as usize]
                    .copy_from_slice(&pattern(i, (BLOCK_SIZE / 2) as usize)),
                _ => {}
            }
            f.write_all(&b).unwrap();
        }
        f.into_inner().unwrap().sync_all().unwrap();
    }
    let rate = |what: &str, t: std::time::Duration| {
        println!(
            "{what:<44} {:>7.3} s  {:>7.0} MiB/s",
            t.as_secs_f64(),
            mib as f64 / t.as_secs_f64()
        );
    };
    for round in 0..2 {
        println!("round {round} ({mib} MiB, 50 % of blocks hold data)");
        let ours = dp.join(format!("ours{round}.vhd"));
        let t = Instant::now();
        let mut src = fs::File::open(&raw).unwrap();
        write_dynamic_from(&mut src, size, &ours, Uuid::new_v4(), &mut no_progress()).unwrap();
        rate("write_dynamic_from raw -> vhd (fsync)", t.elapsed());

        let q = dp.join(format!("q{round}.vhd"));
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-t", "writeback", "-f", "raw", "-O", "vpc"])
            .arg(&raw)
            .arg(&q));
        rate("qemu-img convert raw -> vpc (-t writeback)", t.elapsed());

        let flat = dp.join(format!("flat{round}.vhd"));
        let t = Instant::now();
        copy_flattened(&ours, &flat, Uuid::new_v4(), None, &mut no_progress()).unwrap();
        rate("copy_flattened vhd -> vhd (fsync)", t.elapsed());

        let t = Instant::now();
        let mut r = ChainReader::open(&ours).unwrap();
        let mut out = std::io::sink();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for b in 0..size / BLOCK_SIZE {
            if r.allocated(b) {
                r.read_at(b * BLOCK_SIZE, &mut buf).unwrap();
                out.write_all(&buf).unwrap();
            }
        }
        rate("ChainReader vhd -> /dev/null (skip holes)", t.elapsed());

        let t = Instant::now();
        let mut r = ChainReader::open(&ours).unwrap();
        let dest = dp.join(format!("ours{round}.raw"));
        let f = fs::File::create(&dest).unwrap();
        f.set_len(size).unwrap();
        for b in 0..size / BLOCK_SIZE {
            if r.allocated(b) {
                r.read_at(b * BLOCK_SIZE, &mut buf).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, &buf, b * BLOCK_SIZE).unwrap();
            }
        }
        f.sync_all().unwrap();
        rate("ChainReader vhd -> raw file (fsync)", t.elapsed());

        let qraw = dp.join(format!("q{round}.raw"));
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-t", "writeback", "-f", "vpc", "-O", "raw"])
            .arg(&ours)
            .arg(&qraw));
        rate("qemu-img convert vpc -> raw (-t writeback)", t.elapsed());
        if round == 0 {
            assert!(bytes(&qraw) == bytes(&raw));
            assert!(bytes(&dest) == bytes(&raw));
            check(&flat).unwrap();
        }
        for p in [ours, q, flat, dest, qraw] {
            fs::remove_file(p).unwrap();
        }
    }
}

#[test]
fn a_dynamic_disk_becomes_a_child_and_the_chain_reads_merged() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let mut base_data = vec![1u8; size as usize];
    base_data[(2 * MIB) as usize..(4 * MIB) as usize].fill(0);
    let mut child_data = vec![0u8; size as usize];
    child_data[(2 * MIB) as usize..(3 * MIB) as usize].fill(9);
    let base = dir.path().join(format!("{}.vhd", Uuid::new_v4()));
    let child = dir.path().join(format!("{}.vhd", Uuid::new_v4()));
    write_dynamic_from(
        &mut &base_data[..],
        size,
        &base,
        Uuid::new_v4(),
        &mut |_, _| true,
    )
    .unwrap();
    write_dynamic_from(
        &mut &child_data[..],
        size,
        &child,
        Uuid::new_v4(),
        &mut |_, _| true,
    )
    .unwrap();
    make_child_of(&child, &base).unwrap();
    check(&child).unwrap();
    let mut merged = vec![0u8; size as usize];
    ChainReader::open(&child)
        .unwrap()
        .read_at(0, &mut merged)
        .unwrap();
    // The child's only block (2..4 MiB) shadows the parent's; the rest reads through.
    assert_eq!(
        &merged[..(2 * MIB) as usize],
        &base_data[..(2 * MIB) as usize]
    );
    assert_eq!(
        &merged[(2 * MIB) as usize..(4 * MIB) as usize],
        &child_data[(2 * MIB) as usize..(4 * MIB) as usize]
    );
    assert_eq!(
        &merged[(4 * MIB) as usize..],
        &base_data[(4 * MIB) as usize..]
    );
    assert!(
        make_child_of(&child, &base)
            .unwrap_err()
            .to_string()
            .contains("only a dynamic disk")
    );
}
