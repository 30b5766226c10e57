//! The seed corpora of the fuzz targets, generated (no binary blobs): small valid inputs made
//! with `qemu-img` and with the crate's own writers, hand-built VHDs with small blocks (so that
//! allocated data fits a small input), and hand-made nasty inputs. `fuzz/examples/gen_seeds.rs`
//! writes them to `fuzz/corpus/<target>/`; `tests/fuzz_regressions.rs` replays all of them.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use xenapinfs::vhd;
use xenapinfs::xenapi::codec::{self, Value};

use crate::harness::{API_KINDS, join_files};

pub type Seeds = Vec<(String, Vec<u8>)>;

const MIB: u64 = 1 << 20;
const SECTOR: usize = 512;

// ---------------------------------------------------------------------------------------------
// A minimal VHD writer (Microsoft's layout; creator "fuzz", so no blktap batmap is expected).

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Store the one's complement byte-sum checksum of `b` (checksum field zeroed) at `off`.
fn seal(b: &mut [u8], off: usize) {
    put_u32(b, off, 0);
    let sum = b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    put_u32(b, off, !sum);
}

pub const TYPE_FIXED: u32 = 2;
pub const TYPE_DYNAMIC: u32 = 3;
pub const TYPE_DIFF: u32 = 4;

fn footer(disk_type: u32, size: u64, data_offset: u64, uuid: u128) -> Vec<u8> {
    let mut f = vec![0u8; SECTOR];
    f[0..8].copy_from_slice(b"conectix");
    put_u32(&mut f, 8, 2);
    put_u32(&mut f, 12, 0x0001_0000);
    put_u64(&mut f, 16, data_offset);
    f[28..32].copy_from_slice(b"fuzz");
    put_u32(&mut f, 32, 0x0001_0000);
    f[36..40].copy_from_slice(b"Lnux");
    put_u64(&mut f, 40, size);
    put_u64(&mut f, 48, size);
    put_u32(&mut f, 60, disk_type);
    f[68..84].copy_from_slice(&uuid.to_be_bytes());
    seal(&mut f, 64);
    f
}

/// One allocated block: BAT index, how many leading sectors its bitmap marks present, and a
/// byte to fill its data with.
#[derive(Clone, Copy)]
pub struct Blk {
    pub index: u32,
    pub present: u32,
    pub fill: u8,
}

pub struct Spec<'a> {
    pub disk_type: u32,
    pub size: u64,
    pub block_size: u32,
    pub uuid: u128,
    /// Parent footer uuid and file name (differencing disks).
    pub parent: Option<(u128, &'a str)>,
    pub blocks: &'a [Blk],
}

/// A fixed disk of `size` bytes filled with a pattern.
pub fn fixed_vhd(size: u64, uuid: u128) -> Vec<u8> {
    let mut out: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    out.extend_from_slice(&footer(TYPE_FIXED, size, u64::MAX, uuid));
    out
}

/// A dynamic or differencing disk: footer copy, header at 512, BAT at 1536, parent locators
/// (MacX and W2ku), blocks with their sector bitmaps, footer.
pub fn dynamic_vhd(s: &Spec<'_>) -> Vec<u8> {
    let entries = s.size.div_ceil(u64::from(s.block_size)) as usize;
    let bat_len = (entries * 4).div_ceil(SECTOR).max(1) * SECTOR;
    let bitmap_len = (s.block_size as usize / SECTOR)
        .div_ceil(8)
        .div_ceil(SECTOR)
        .max(1)
        * SECTOR;
    let mut out = vec![0u8; 1536 + bat_len];
    let mut header = vec![0u8; 1024];
    header[0..8].copy_from_slice(b"cxsparse");
    put_u64(&mut header, 8, u64::MAX);
    put_u64(&mut header, 16, 1536);
    put_u32(&mut header, 24, 0x0001_0000);
    put_u32(&mut header, 28, entries as u32);
    put_u32(&mut header, 32, s.block_size);
    if let Some((puuid, name)) = s.parent {
        header[40..56].copy_from_slice(&puuid.to_be_bytes());
        let utf16: Vec<u8> = name.encode_utf16().flat_map(u16::to_be_bytes).collect();
        header[64..64 + utf16.len()].copy_from_slice(&utf16);
        let macx = format!("file://./{name}").into_bytes();
        let w2ku: Vec<u8> = format!(".\\{name}")
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        for (i, (code, data)) in [(0x4D61_6358u32, macx), (0x5732_6B75, w2ku)]
            .into_iter()
            .enumerate()
        {
            let at = out.len();
            let mut sector = vec![0u8; SECTOR];
            sector[..data.len()].copy_from_slice(&data);
            out.extend_from_slice(&sector);
            let l = 576 + i * 24;
            put_u32(&mut header, l, code);
            put_u32(&mut header, l + 4, SECTOR as u32);
            put_u32(&mut header, l + 8, data.len() as u32);
            put_u64(&mut header, l + 16, at as u64);
        }
    }
    seal(&mut header, 36);
    out[512..1536].copy_from_slice(&header);
    for i in 0..entries {
        put_u32(&mut out, 1536 + i * 4, u32::MAX);
    }
    for b in s.blocks {
        let at = out.len();
        put_u32(&mut out, 1536 + b.index as usize * 4, (at / SECTOR) as u32);
        let mut bitmap = vec![0u8; bitmap_len];
        for sector in 0..b.present as usize {
            bitmap[sector / 8] |= 0x80 >> (sector % 8);
        }
        out.extend_from_slice(&bitmap);
        out.extend((0..s.block_size).map(|i| b.fill ^ (i % 7) as u8));
    }
    let f = footer(s.disk_type, s.size, 512, s.uuid);
    out[..SECTOR].copy_from_slice(&f);
    out.extend_from_slice(&f);
    out
}

/// Offsets of the fields the nasty seeds change.
const H: usize = 512;
const H_TABLE: usize = H + 16;
const H_MAX_ENTRIES: usize = H + 28;
const H_BLOCK_SIZE: usize = H + 32;
const H_CHECKSUM: usize = H + 36;

fn reseal_header(b: &mut [u8]) {
    let mut h = b[H..H + 1024].to_vec();
    seal(&mut h, 36);
    b[H..H + 1024].copy_from_slice(&h);
}

/// Change both footers (offset 0 and the end) of a dynamic VHD and reseal them.
fn edit_footers(b: &mut [u8], f: impl Fn(&mut [u8])) {
    let end = b.len() - SECTOR;
    for at in [0, end] {
        let mut copy = b[at..at + SECTOR].to_vec();
        f(&mut copy);
        seal(&mut copy, 64);
        b[at..at + SECTOR].copy_from_slice(&copy);
    }
}

// ---------------------------------------------------------------------------------------------
// vhd

fn qemu_img() -> Option<String> {
    let q = std::env::var("QEMU_IMG").unwrap_or_else(|_| "qemu-img".into());
    Command::new(&q)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| q)
}

/// Seeds from qemu-img (creator "qemu") when it is installed.
fn qemu_vhds(dir: &Path) -> Seeds {
    let Some(q) = qemu_img() else {
        eprintln!("qemu-img not found: no qemu-made VHD seeds");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, opts, size) in [
        ("qemu-dynamic-4m", "subformat=dynamic", "4M"),
        ("qemu-dynamic-odd", "subformat=dynamic", "3000K"),
        ("qemu-fixed-64k", "subformat=fixed", "64K"),
        (
            "qemu-dynamic-force-size",
            "subformat=dynamic,force_size=on",
            "6M",
        ),
    ] {
        let p = dir.join(format!("{name}.vhd"));
        let status = Command::new(&q)
            .args(["create", "-q", "-f", "vpc", "-o", opts])
            .arg(&p)
            .arg(size)
            .status()
            .expect("running qemu-img");
        if status.success() {
            out.push((name.to_string(), fs::read(&p).unwrap()));
        }
    }
    out
}

/// Seeds from the crate's own writers (blktap layout, "tap" 1.3 with a batmap): an empty disk
/// and an empty chain of three made with `make_child_of`.
fn tap_vhds(dir: &Path) -> Seeds {
    let mut out = Vec::new();
    let d = dir.join("tap");
    fs::create_dir_all(&d).unwrap();
    let p = |i: usize| d.join(format!("{i}.vhd"));
    for i in 0..3 {
        vhd::create_dynamic(&p(i), 4 * MIB, uuid::Uuid::from_u128(0x7a90 + i as u128)).unwrap();
    }
    out.push(("tap-dynamic".to_string(), fs::read(p(2)).unwrap()));
    vhd::make_child_of(&p(1), &p(2)).unwrap();
    vhd::make_child_of(&p(0), &p(1)).unwrap();
    let files: Vec<Vec<u8>> = (0..3).map(|i| fs::read(p(i)).unwrap()).collect();
    out.push(("tap-chain-3".to_string(), join_files(&files)));
    out
}

const U_LEAF: u128 = 0x1000_0000_0000_4000_8000_0000_0000_0001;
const U_MID: u128 = 0x1000_0000_0000_4000_8000_0000_0000_0002;
const U_BASE: u128 = 0x1000_0000_0000_4000_8000_0000_0000_0003;

/// Hand-built disks with 4 KiB (and smaller) blocks, partially present sectors and chains.
fn small_block_vhds() -> Seeds {
    let base = dynamic_vhd(&Spec {
        disk_type: TYPE_DYNAMIC,
        size: 64 * 1024,
        block_size: 4096,
        uuid: U_BASE,
        parent: None,
        blocks: &[
            Blk {
                index: 0,
                present: 8,
                fill: 0x11,
            },
            Blk {
                index: 3,
                present: 8,
                fill: 0x33,
            },
            Blk {
                index: 15,
                present: 8,
                fill: 0xff,
            },
        ],
    });
    let mid = dynamic_vhd(&Spec {
        disk_type: TYPE_DIFF,
        size: 64 * 1024,
        block_size: 4096,
        uuid: U_MID,
        parent: Some((U_BASE, "2.vhd")),
        blocks: &[
            Blk {
                index: 0,
                present: 3,
                fill: 0x22,
            },
            Blk {
                index: 7,
                present: 8,
                fill: 0x77,
            },
        ],
    });
    let leaf = dynamic_vhd(&Spec {
        disk_type: TYPE_DIFF,
        size: 96 * 1024,
        block_size: 4096,
        uuid: U_LEAF,
        parent: Some((U_MID, "1.vhd")),
        blocks: &[
            Blk {
                index: 0,
                present: 1,
                fill: 0x44,
            },
            Blk {
                index: 3,
                present: 5,
                fill: 0x55,
            },
            Blk {
                index: 20,
                present: 8,
                fill: 0x66,
            },
        ],
    });
    let tiny = dynamic_vhd(&Spec {
        disk_type: TYPE_DYNAMIC,
        size: 8 * 1024,
        block_size: 512,
        uuid: U_BASE,
        parent: None,
        blocks: &[
            Blk {
                index: 1,
                present: 1,
                fill: 9,
            },
            Blk {
                index: 5,
                present: 0,
                fill: 7,
            },
        ],
    });
    vec![
        ("small-dynamic".into(), base.clone()),
        ("small-fixed".into(), fixed_vhd(16 * 1024, U_BASE)),
        ("small-512-blocks".into(), tiny),
        (
            "small-chain-2".into(),
            join_files(&[mid.clone(), vec![], base.clone()]),
        ),
        ("small-chain-3".into(), join_files(&[leaf, mid, base])),
    ]
}

/// Hand-made hostile VHDs: truncation, overflowing offsets and sizes, loops, escapes.
fn nasty_vhds(tap: &[u8]) -> Seeds {
    let good = dynamic_vhd(&Spec {
        disk_type: TYPE_DYNAMIC,
        size: 64 * 1024,
        block_size: 4096,
        uuid: U_BASE,
        parent: None,
        blocks: &[Blk {
            index: 2,
            present: 8,
            fill: 1,
        }],
    });
    let mut out: Seeds = Vec::new();
    let mut add = |name: &str, b: Vec<u8>| out.push((format!("nasty-{name}"), b));

    add("empty", Vec::new());
    add("one-byte", vec![0]);
    add("footer-511", good[good.len() - 511..].to_vec());
    add("truncated-footer", good[..good.len() - 100].to_vec());
    add("truncated-by-one", good[..good.len() - 1].to_vec());
    add("footer-only", good[good.len() - 512..].to_vec());
    let mut fixed_short = fixed_vhd(4096, U_BASE);
    fixed_short.drain(..2048);
    add("fixed-data-short", fixed_short);

    let header = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        reseal_header(&mut b);
        b
    };
    add(
        "bat-size-overflow",
        header(&|b| put_u32(b, H_MAX_ENTRIES, u32::MAX)),
    );
    add(
        "huge-max-table-entries",
        header(&|b| put_u32(b, H_MAX_ENTRIES, 0x0020_0000)),
    );
    add(
        "max-entries-zero",
        header(&|b| put_u32(b, H_MAX_ENTRIES, 0)),
    );
    add(
        "table-offset-overflow",
        header(&|b| put_u64(b, H_TABLE, 0xFFFF_FFFF_FFFF_FE00)),
    );
    add(
        "table-offset-unaligned",
        header(&|b| put_u64(b, H_TABLE, 1537)),
    );
    add("block-size-zero", header(&|b| put_u32(b, H_BLOCK_SIZE, 0)));
    add(
        "block-size-odd",
        header(&|b| put_u32(b, H_BLOCK_SIZE, 4095)),
    );
    add(
        "block-size-4g",
        header(&|b| put_u32(b, H_BLOCK_SIZE, 0x8000_0000)),
    );
    add(
        "locator-offset-overflow",
        header(&|b| {
            put_u32(b, H + 576, 0x4D61_6358);
            put_u32(b, H + 580, 511);
            put_u32(b, H + 584, 10);
            put_u64(b, H + 592, 0xFFFF_FFFF_FFFF_FF00);
        }),
    );
    add(
        "locator-unknown-code",
        header(&|b| put_u32(b, H + 576 + 24, 0x4142_4344)),
    );
    let mut bad_sum = good.clone();
    bad_sum[H_CHECKSUM] ^= 1;
    add("header-checksum", bad_sum);
    let bat = |entry: u32| {
        let mut b = good.clone();
        put_u32(&mut b, 1536, entry);
        b
    };
    add("bat-entry-past-eof", bat(0xFFFF_FFFE));
    add("bat-entry-in-header", bat(1));
    add("bat-entry-zero", bat(0));
    let mut twice = good.clone();
    let e2 = twice[1536 + 8..1536 + 12].to_vec();
    twice[1536..1540].copy_from_slice(&e2);
    add("bat-overlap", twice);

    let footers = |f: &dyn Fn(&mut [u8])| {
        let mut b = good.clone();
        edit_footers(&mut b, f);
        b
    };
    add(
        "size-max",
        footers(&|f| put_u64(f, 48, vhd::MAX_VIRTUAL_SIZE)),
    );
    add(
        "size-overflow",
        footers(&|f| put_u64(f, 48, u64::MAX - 511)),
    );
    add(
        "data-offset-overflow",
        footers(&|f| put_u64(f, 16, u64::MAX - 100)),
    );
    add("data-offset-zero", footers(&|f| put_u64(f, 16, 0)));
    add("disk-type-9", footers(&|f| put_u32(f, 60, 9)));
    add("uuid-zero", footers(&|f| f[68..84].fill(0)));
    add("poison", footers(&|f| f[0..8].copy_from_slice(b"v_poison")));
    let mut differ = good.clone();
    differ[100] ^= 1;
    add("backup-footer-differs", differ);

    // A blktap file whose batmap header points near the end of the address space.
    if let Some(at) = tap.windows(8).position(|w| w == b"tdbatmap") {
        let mut b = tap.to_vec();
        put_u64(&mut b, at + 8, 0xFFFF_FFFF_FFFF_FE00);
        add("batmap-offset-overflow", b.clone());
        put_u64(&mut b, at + 8, 512);
        put_u32(&mut b, at + 16, u32::MAX);
        add("batmap-size-huge", b);
    }

    // Chains that must not resolve: a loop, names leaving the directory, a zero parent uuid.
    let diff = |uuid: u128, parent: u128, name: &str| {
        dynamic_vhd(&Spec {
            disk_type: TYPE_DIFF,
            size: 64 * 1024,
            block_size: 4096,
            uuid,
            parent: Some((parent, name)),
            blocks: &[Blk {
                index: 1,
                present: 2,
                fill: 5,
            }],
        })
    };
    add(
        "chain-loop",
        join_files(&[diff(U_LEAF, U_MID, "1.vhd"), diff(U_MID, U_LEAF, "0.vhd")]),
    );
    add("chain-self", diff(U_LEAF, U_LEAF, "0.vhd"));
    add(
        "chain-dotdot",
        join_files(&[diff(U_LEAF, U_BASE, "../1.vhd"), good.clone()]),
    );
    add("chain-absolute", diff(U_LEAF, U_BASE, "/etc/passwd"));
    add("chain-dot", diff(U_LEAF, U_BASE, "."));
    add("chain-zero-parent", diff(U_LEAF, 0, "1.vhd"));
    add(
        "chain-wrong-uuid",
        join_files(&[diff(U_LEAF, U_MID, "1.vhd"), good.clone()]),
    );
    let big_parent = dynamic_vhd(&Spec {
        disk_type: TYPE_DYNAMIC,
        size: 128 * 1024,
        block_size: 4096,
        uuid: U_BASE,
        parent: None,
        blocks: &[],
    });
    add(
        "chain-child-smaller",
        join_files(&[diff(U_LEAF, U_BASE, "1.vhd"), big_parent]),
    );
    out
}

pub fn vhd_seeds() -> Seeds {
    let dir = tempfile::tempdir().unwrap();
    let mut out = qemu_vhds(dir.path());
    let tap = tap_vhds(dir.path());
    let tap_file = tap[0].1.clone();
    out.extend(tap);
    out.extend(small_block_vhds());
    out.extend(nasty_vhds(&tap_file));
    out
}

// ---------------------------------------------------------------------------------------------
// vhd_tgz: tar streams (the target wraps them into gzip) and a few real .tgz files

/// One raw tar header (GNU format) with any name bytes, type and size.
fn tar_header(name: &[u8], kind: u8, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
    }
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    *h.as_bytes()
}

/// A tar stream of `(name, type, data)` members, padded, with the end-of-archive marker.
pub fn tar_of(members: &[(&[u8], u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data) in members {
        out.extend_from_slice(&tar_header(name, *kind, data.len() as u64));
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

pub fn tgz_seeds() -> Seeds {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n);
    let u = uuid::Uuid::from_u128;
    // Empty tap disks: a single one and a chain of three.
    for (i, n) in ["a.vhd", "b.vhd", "c.vhd"].iter().enumerate() {
        vhd::create_dynamic(&p(n), 4 * MIB, u(0x7a90 + i as u128)).unwrap();
    }
    let single = fs::read(p("c.vhd")).unwrap();
    vhd::make_child_of(&p("b.vhd"), &p("c.vhd")).unwrap();
    vhd::make_child_of(&p("a.vhd"), &p("b.vhd")).unwrap();
    let (a, b, c) = (
        fs::read(p("a.vhd")).unwrap(),
        fs::read(p("b.vhd")).unwrap(),
        fs::read(p("c.vhd")).unwrap(),
    );
    // With data: a 4 MiB disk with one block written, as a real (compressed) vhd tgz.
    let mut raw = vec![0u8; 4 * MIB as usize];
    for (i, x) in raw[2 * MIB as usize..2 * MIB as usize + 8192]
        .iter_mut()
        .enumerate()
    {
        *x = (i % 253) as u8;
    }
    vhd::write_dynamic_from(
        &mut &raw[..],
        raw.len() as u64,
        &p("data.vhd"),
        u(0xda7a),
        &mut |_, _| true,
    )
    .unwrap();
    let data = fs::read(p("data.vhd")).unwrap();

    const REG: u8 = b'0';
    let mut out: Seeds = vec![
        ("single".into(), tar_of(&[(b"0.vhd", REG, &single)])),
        (
            "single-dot-slash".into(),
            tar_of(&[(b"./", b'5', b""), (b"./0.vhd", REG, &single)]),
        ),
        (
            "chain-3".into(),
            tar_of(&[
                (b"0.vhd", REG, &a),
                (b"1.vhd", REG, &b),
                (b"2.vhd", REG, &c),
            ]),
        ),
        (
            "chain-3-reversed".into(),
            tar_of(&[
                (b"2.vhd", REG, &c),
                (b"1.vhd", REG, &b),
                (b"0.vhd", REG, &a),
            ]),
        ),
        (
            "legacy-names".into(),
            tar_of(&[(b"snap.vhd", REG, &b), (b"image.vhd", REG, &c)]),
        ),
        ("other-name".into(), tar_of(&[(b"disk.vhd", REG, &single)])),
        ("data-gz".into(), gzip(&tar_of(&[(b"0.vhd", REG, &data)]))),
        (
            "chain-gz".into(),
            gzip(&tar_of(&[
                (b"0.vhd", REG, &a),
                (b"1.vhd", REG, &b),
                (b"2.vhd", REG, &c),
            ])),
        ),
    ];
    // GNU tar's own output, when tar is there.
    fs::create_dir(p("gnu")).unwrap();
    fs::write(p("gnu/0.vhd"), &single).unwrap();
    if let Ok(o) = Command::new("tar")
        .args(["-C"])
        .arg(p("gnu"))
        .args(["-cf", "-", "."])
        .output()
        && o.status.success()
    {
        out.push(("gnu-tar".into(), o.stdout));
    }

    let mut nasty = |name: &str, b: Vec<u8>| out.push((format!("nasty-{name}"), b));
    nasty("empty-input", Vec::new());
    nasty("empty-archive", vec![0u8; 1024]);
    nasty("traversal", tar_of(&[(b"../0.vhd", REG, &single)]));
    nasty("absolute", tar_of(&[(b"/tmp/0.vhd", REG, &single)]));
    nasty("subdir", tar_of(&[(b"./x/0.vhd", REG, &single)]));
    nasty("symlink", tar_of(&[(b"0.vhd", b'2', b"")]));
    nasty("hardlink", tar_of(&[(b"0.vhd", b'1', b"")]));
    nasty("device", tar_of(&[(b"0.vhd", b'3', b"")]));
    nasty("fifo", tar_of(&[(b"0.vhd", b'6', b"")]));
    nasty("directory", tar_of(&[(b"x/", b'5', b"")]));
    nasty("nul-name", tar_of(&[(b"0.v\x01hd", REG, &single)]));
    nasty(
        "duplicate",
        tar_of(&[(b"0.vhd", REG, &single), (b"0.vhd", REG, &single)]),
    );
    nasty("gap", tar_of(&[(b"0.vhd", REG, &a), (b"2.vhd", REG, &c)]));
    nasty("leading-zero", tar_of(&[(b"00.vhd", REG, &single)]));
    nasty("beyond-limit", tar_of(&[(b"31.vhd", REG, &single)]));
    nasty("swap", tar_of(&[(b"swap.vhd", REG, &single)]));
    nasty("not-vhd", tar_of(&[(b"0.img", REG, &single)]));
    nasty(
        "long-name",
        tar_of(&[
            (b"././@LongLink", b'L', &[b'a'; 300]),
            (b"0.vhd", REG, &single),
        ]),
    );
    nasty(
        "pax-sparse",
        tar_of(&[
            (b"pax", b'x', b"22 GNU.sparse.major=1\n"),
            (b"0.vhd", REG, &single),
        ]),
    );
    nasty(
        "pax-huge-record",
        tar_of(&[
            (b"pax", b'x', b"99999999999 path=0.vhd\n"),
            (b"0.vhd", REG, &single),
        ]),
    );
    nasty(
        "pax-global",
        tar_of(&[
            (b"g", b'g', b"19 comment=hello!!\n"),
            (b"0.vhd", REG, &single),
        ]),
    );
    // Size fields: the largest octal, and a base-256 size near u64::MAX.
    let mut big = tar_of(&[(b"0.vhd", REG, b"")]);
    big[124..136].copy_from_slice(b"77777777777\0");
    let sum = |h: &mut [u8]| {
        h[148..156].fill(b' ');
        let s: u32 = h[..512].iter().map(|&x| u32::from(x)).sum();
        h[148..156].copy_from_slice(format!("{s:06o}\0 ").as_bytes());
    };
    sum(&mut big);
    nasty("size-octal-max", big.clone());
    big[124] = 0x80;
    big[125..136].fill(0xff);
    sum(&mut big);
    nasty("size-base256-max", big);
    let whole = tar_of(&[(b"0.vhd", REG, &single)]);
    nasty("truncated-member", whole[..512 + single.len() / 2].to_vec());
    nasty("no-end-marker", whole[..whole.len() - 1024].to_vec());
    let mut after = whole.clone();
    after.extend_from_slice(b"trailing garbage");
    after.resize(after.len().next_multiple_of(512), 0);
    nasty("data-after-end", after);
    let mut padded = whole.clone();
    padded.resize(padded.len() + 2 * MIB as usize, 0);
    nasty("padding-bomb-gz", gzip(&padded));
    let mut gz = gzip(&whole);
    let n = gz.len();
    gz[n - 8] ^= 0xff;
    nasty("gz-bad-crc", gz);
    nasty("gz-truncated", gzip(&whole)[..40].to_vec());
    // The chain rules on uuids inside the archive.
    let vhds: Seeds = small_block_vhds();
    let fixed = fixed_vhd(2 * MIB, U_BASE);
    nasty("fixed-member", tar_of(&[(b"0.vhd", REG, &fixed)]));
    nasty("small-blocks", tar_of(&[(b"0.vhd", REG, &vhds[0].1)]));
    nasty("child-last", tar_of(&[(b"0.vhd", REG, &b)]));
    nasty(
        "base-first",
        tar_of(&[(b"0.vhd", REG, &c), (b"1.vhd", REG, &b)]),
    );
    nasty(
        "same-twice",
        tar_of(&[(b"0.vhd", REG, &single), (b"1.vhd", REG, &single)]),
    );
    out
}

// ---------------------------------------------------------------------------------------------
// xenapi_response

fn wrap(value: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?><methodResponse><params><param>{value}</param></params></methodResponse>"
    )
}

fn status_ok(value: &str) -> String {
    wrap(&format!(
        "<value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>{value}</member></struct></value>"
    ))
}

fn record(fields: &[(&str, Value)]) -> Value {
    Value::Struct(
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

pub fn xenapi_seeds() -> Seeds {
    let s = |x: &str| Value::String(x.to_string());
    let refs = |xs: &[&str]| Value::Array(xs.iter().map(|x| s(x)).collect());
    let vdi = record(&[
        ("uuid", s("9b0e2f3a-6c7d-4e8f-a1b2-c3d4e5f60718")),
        ("name_label", s("volume")),
        ("name_description", s("")),
        ("SR", s("OpaqueRef:sr")),
        ("VBDs", refs(&["OpaqueRef:vbd"])),
        ("virtual_size", s("10737418240")),
        ("physical_utilisation", s("-1")),
        ("type", s("user")),
        ("read_only", Value::Bool(false)),
        ("managed", Value::Bool(true)),
        ("is_a_snapshot", Value::Bool(false)),
        ("other_config", codec::string_map([("k", "v")])),
        ("sm_config", Value::Struct(Default::default())),
        ("location", s("9b0e2f3a-6c7d-4e8f-a1b2-c3d4e5f60718")),
    ]);
    let task = record(&[
        ("uuid", s("3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c01")),
        ("name_label", s("Async.VDI.copy")),
        ("status", s("success")),
        ("progress", Value::Double(1.0)),
        ("result", s("<value>OpaqueRef:vdi</value>")),
        ("error_info", refs(&[])),
        (
            "created",
            Value::DateTime(xenapinfs::sim::codec::datetime_from_unix(1_700_000_000)),
        ),
        (
            "finished",
            Value::DateTime(xenapinfs::sim::codec::datetime_from_unix(1_700_000_000)),
        ),
    ]);
    let mut all = std::collections::BTreeMap::new();
    all.insert("OpaqueRef:vdi".to_string(), vdi.clone());
    let all = Value::Struct(all);
    let mut out: Seeds = vec![
        ("login".into(), status_ok("<value>OpaqueRef:9e9c4a3c-0000-4000-8000-000000000001</value>").into_bytes()),
        (
            "failure".into(),
            wrap("<value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>HOST_IS_SLAVE</value><value>10.0.0.2</value></data></array></value></member></struct></value>").into_bytes(),
        ),
        (
            "record-types".into(),
            status_ok("<value><struct><member><name>virtual_size</name><value>10737418240</value></member><member><name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601></value></member><member><name>progress</name><value><double>inf</double></value></member><member><name>n</name><value><i4>-7</i4></value></member><member><name>b</name><value><boolean>1</boolean></value></member><member><name>x</name><value><base64>aGVsbG8=</base64></value></member><member><name>nil</name><value><nil/></value></member><member><name>name_description</name><value></value></member></struct></value>").into_bytes(),
        ),
        ("task-result".into(), b"<value><array><data><value>OpaqueRef:a</value></data></array></value>".to_vec()),
    ];
    for (name, v) in [
        ("vdi-record", &vdi),
        ("task-record", &task),
        ("vdi-all-records", &all),
    ] {
        out.push((name.into(), xenapinfs::sim::codec::success(v)));
    }
    out.push((
        "sim-failure".into(),
        xenapinfs::sim::codec::failure("SR_BACKEND_FAILURE_47", &["".into(), "nfs".into()]),
    ));
    let mut nasty = |name: &str, b: Vec<u8>| out.push((format!("nasty-{name}"), b));
    nasty("html", b"<html>502 Bad Gateway</html>".to_vec());
    nasty("empty", Vec::new());
    nasty("fault", b"<?xml version=\"1.0\"?><methodResponse><fault><value><struct><member><name>faultCode</name><value><int>1</int></value></member><member><name>faultString</name><value>x</value></member></struct></value></fault></methodResponse>".to_vec());
    let depth = 3000;
    let deep = format!(
        "{}<value>x</value>{}",
        "<value><array><data>".repeat(depth),
        "</data></array></value>".repeat(depth)
    );
    nasty("deep-arrays", status_ok(&deep).into_bytes());
    let deep_struct = format!(
        "{}<value>x</value>{}",
        "<value><struct><member><name>a</name>".repeat(depth),
        "</member></struct></value>".repeat(depth)
    );
    nasty("deep-structs", status_ok(&deep_struct).into_bytes());
    nasty(
        "unclosed-nesting",
        status_ok(&"<value><array><data>".repeat(depth)).into_bytes(),
    );
    nasty(
        "entity-bomb",
        format!(
            "<?xml version=\"1.0\"?><!DOCTYPE r [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\"><!ENTITY c \"&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;\">]>{}",
            &status_ok("<value>&c;</value>")[21..]
        )
        .into_bytes(),
    );
    nasty(
        "huge-int",
        status_ok("<value><i4>99999999999999999999</i4></value>").into_bytes(),
    );
    nasty(
        "bad-date",
        status_ok("<value><dateTime.iso8601>2024-99-99</dateTime.iso8601></value>").into_bytes(),
    );
    nasty("empty-error", wrap("<value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data></data></array></value></member></struct></value>").into_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// api_request

pub fn api_seeds() -> Seeds {
    let kind = |name: &str| API_KINDS.iter().position(|k| *k == name).unwrap() as u8;
    let id = "3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c01/9b0e2f3a-6c7d-4e8f-a1b2-c3d4e5f60718";
    let cases: &[(&str, &str, String)] = &[
        ("create", "create", r#"{"size_gb":10,"name":"db-1","description":"orders"}"#.into()),
        ("create-min", "create", r#"{"size_gb":1}"#.into()),
        ("create-unknown-field", "create", r#"{"size_gb":1,"extra":true}"#.into()),
        ("create-negative", "create", r#"{"size_gb":-1}"#.into()),
        ("create-huge", "create", r#"{"size_gb":18446744073709551616}"#.into()),
        ("create-control-chars", "create", "{\"size_gb\":1,\"name\":\"a\\u0000\\n\"}".into()),
        ("copy-empty", "copy", String::new()),
        ("copy", "copy", r#"{"name":"snap"}"#.into()),
        ("copy-size", "copy", r#"{"name":null,"size_gb":20}"#.into()),
        ("extend", "extend", r#"{"size_gb":20}"#.into()),
        ("extend-float", "extend", r#"{"size_gb":2.5}"#.into()),
        (
            "import-url",
            "import-url",
            r#"{"url":"https://glance.example:9292/v2/images/x/file","headers":["X-Auth-Token: abcdef0123456789"]}"#.into(),
        ),
        ("import-url-ftp", "import-url", r#"{"url":"ftp://x/y"}"#.into()),
        ("import-url-bad-header", "import-url", r#"{"url":"http://x/","headers":["no colon","X-A\u0001: secretsecret"]}"#.into()),
        (
            "export-url",
            "export-url",
            r#"{"format":"vhd-tgz","url":"http://x/y?sig=1","headers":[]}"#.into(),
        ),
        ("export-url-bad-format", "export-url", r#"{"format":"iso","url":"http://x/"}"#.into()),
        ("import-query", "import-query", "format=qcow2".into()),
        ("import-query-new", "import-query", "format=vhd-tgz&size_gb=5&name=a%20b&description=x".into()),
        ("import-query-bad", "import-query", "format=qcow2&format=raw&size_gb=-1".into()),
        ("export-query", "export-query", "format=vmdk".into()),
        ("volume-id", "volume-id", id.into()),
        ("volume-id-upper", "volume-id", id.to_uppercase()),
        ("volume-id-traversal", "volume-id", "../../etc/passwd".into()),
        ("volume-id-extra", "volume-id", format!("{id}/x")),
        ("volume-id-simple", "volume-id", "3f1c2a8e0a514f0e9a4f7b2f1d1e6c01/9b0e2f3a6c7d4e8fa1b2c3d4e5f60718".into()),
        ("volume-id-braced", "volume-id", "{3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c}/9b0e2f3a-6c7d-4e8f-a1b2-c3d4e5f60718".into()),
        ("volume-id-json", "volume-id-json", format!("\"{id}\"")),
        ("volume-id-json-escaped", "volume-id-json", format!("\"{}\"", id.replace('/', "\\/"))),
        ("volume-id-json-number", "volume-id-json", "42".into()),
    ];
    let mut out: Seeds = cases
        .iter()
        .map(|(name, k, body)| {
            let mut b = vec![kind(k)];
            b.extend_from_slice(body.as_bytes());
            (name.to_string(), b)
        })
        .collect();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    for k in ["create", "copy", "import-url", "volume-id-json"] {
        let mut b = vec![kind(k)];
        b.extend_from_slice(deep.as_bytes());
        out.push((format!("nasty-deep-json-{k}"), b));
    }
    out
}

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("vhd", vhd_seeds()),
        ("vhd_tgz", tgz_seeds()),
        ("xenapi_response", xenapi_seeds()),
        ("api_request", api_seeds()),
    ]
}
