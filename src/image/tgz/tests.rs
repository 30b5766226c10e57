//! Round trips of chains through export and import, readability by GNU tar and Python, legacy
//! layouts, and the hostile suite: each bad tarball must be refused with a message naming the
//! member and the rule.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::{Compress, Compression, Crc, FlushCompress};
use tar::EntryType;
use uuid::Uuid;

use super::*;
use crate::vhd::{self, ChainReader, DiskType};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

// ---------------------------------------------------------------------------------------------
// helpers

fn tmp() -> tempfile::TempDir {
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

/// Disk content of `size` bytes where only block `block` (2 MiB) holds data: compressible
/// text with a random tail, so that the files are neither trivial nor slow to compress.
fn content(seed: u64, size: u64, block: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let start = (block * BLOCK_SIZE) as usize;
    let end = (start + BLOCK_SIZE as usize).min(data.len());
    let text = format!("block {block} of disk {seed}; ");
    for (i, b) in data[start..end].iter_mut().enumerate() {
        *b = text.as_bytes()[i % text.len()];
    }
    let noise = pattern(seed, 4096);
    data[start..start + 4096].copy_from_slice(&noise);
    data
}

/// Rewrite both footers of a dynamic or differencing VHD, resealing the checksum.
fn edit_footers(path: &Path, reseal: bool, f: impl Fn(&mut [u8])) {
    let mut b = fs::read(path).unwrap();
    let end = b.len() - 512;
    for off in [0, end] {
        let footer = &mut b[off..off + 512];
        f(footer);
        if reseal {
            footer[64..68].fill(0);
            let sum: u32 = footer.iter().map(|&x| u32::from(x)).sum();
            footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
        }
    }
    fs::write(path, b).unwrap();
}

/// A dynamic VHD holding `data`, or a differencing one linked to `parent` (same directory).
fn make_vhd(dir: &Path, name: &str, uuid: Uuid, data: &[u8], parent: Option<&Path>) -> PathBuf {
    let path = dir.join(name);
    vhd::write_dynamic_from(
        &mut &data[..],
        data.len() as u64,
        &path,
        uuid,
        &mut |_, _| true,
    )
    .unwrap();
    if let Some(parent) = parent {
        edit_footers(&path, true, |f| {
            f[60..64].copy_from_slice(&4u32.to_be_bytes())
        });
        vhd::set_parent(&path, parent).unwrap();
    }
    path
}

/// A valid chain of `depth` files in `dir`, leaf first; with `data`, each file holds one
/// block of its own, else none (tiny files: deflate is slow in debug builds).
fn chain_of(dir: &Path, depth: usize, data: bool) -> Vec<PathBuf> {
    let mut chain: Vec<PathBuf> = Vec::new();
    for level in (0..depth).rev() {
        let block = (level % 2) as u64;
        let data = if data {
            content(level as u64 + 1, SIZE, block)
        } else {
            vec![0; SIZE as usize]
        };
        let name = format!("{}.vhd", Uuid::new_v4());
        let parent = chain.first().cloned();
        let path = make_vhd(dir, &name, Uuid::new_v4(), &data, parent.as_deref());
        if let Some(parent) = &parent {
            // Parents are hidden in a real SR; the importer sets the flags anyway.
            vhd::set_hidden(parent, true).unwrap();
        }
        chain.insert(0, path);
    }
    chain
}

fn make_chain(dir: &Path, depth: usize) -> Vec<PathBuf> {
    chain_of(dir, depth, true)
}

fn light_chain(dir: &Path, depth: usize) -> Vec<PathBuf> {
    chain_of(dir, depth, false)
}

fn merged(leaf: &Path) -> Vec<u8> {
    let mut r = ChainReader::open(leaf).unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    out
}

fn export(chain: &[PathBuf]) -> Vec<u8> {
    let mut out = Vec::new();
    let n = export_tgz(chain, &mut out, 2, &mut |_| true).unwrap();
    assert_eq!(n, out.len() as u64);
    out
}

fn limits() -> TgzLimits {
    TgzLimits::new(64 * MIB)
}

fn import_with(
    src: &mut dyn Read,
    limits: &TgzLimits,
) -> (tempfile::TempDir, Result<ImportedChain, ImageError>) {
    let dir = tmp();
    let staging = dir.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let r = import_tgz(src, &staging, Uuid::new_v4(), limits, &mut |_| true);
    (dir, r)
}

fn import(tgz: &[u8]) -> (tempfile::TempDir, Result<ImportedChain, ImageError>) {
    import_with(&mut &tgz[..], &limits())
}

#[track_caller]
fn refused(tgz: &[u8], needles: &[&str]) -> String {
    refused_with(tgz, &limits(), needles)
}

#[track_caller]
fn refused_with(tgz: &[u8], limits: &TgzLimits, needles: &[&str]) -> String {
    let (_dir, r) = import_with(&mut &tgz[..], limits);
    let e = r.expect_err("the import must be refused");
    let msg = e.to_string();
    assert!(e.is_refusal(), "not a refusal: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} does not mention {n:?}");
    }
    msg
}

/// gzip with stored blocks: tests build many tarballs, and deflate is slow in debug builds.
fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::none());
    io::Write::write_all(&mut e, data).unwrap();
    e.finish().unwrap()
}

/// A tar stream built by hand, so that any name, type and size can be written.
#[derive(Default)]
struct RawTar(Vec<u8>);

impl RawTar {
    fn header(&mut self, name: &[u8], kind: u8, size: u64, link: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(EntryType::new(kind));
        let b = h.as_mut_bytes();
        b[..name.len()].copy_from_slice(name);
        b[157..157 + link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
    }

    fn entry(&mut self, name: &[u8], kind: u8, data: &[u8]) -> &mut Self {
        self.header(name, kind, data.len() as u64, b"");
        self.0.extend_from_slice(data);
        self.pad();
        self
    }

    fn link(&mut self, name: &[u8], kind: u8, target: &[u8]) -> &mut Self {
        self.header(name, kind, 0, target);
        self
    }

    fn file(&mut self, name: &str, path: &Path) -> &mut Self {
        self.entry(name.as_bytes(), b'0', &fs::read(path).unwrap())
    }

    fn pad(&mut self) {
        let n = self.0.len().next_multiple_of(512);
        self.0.resize(n, 0);
    }

    fn end(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.0);
        v.extend_from_slice(&[0u8; 1024]);
        v
    }
}

/// Tarball of the given files under the given names.
fn tgz_of(members: &[(&str, &Path)]) -> Vec<u8> {
    let mut t = RawTar::default();
    for (name, path) in members {
        t.file(name, path);
    }
    gz(&t.end())
}

/// A reader handing out at most `step` bytes per call.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A reader that fails once anything past `limit` is requested.
struct Tripwire<'a> {
    data: &'a [u8],
    pos: usize,
    limit: usize,
}

impl Read for Tripwire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = (self.pos + buf.len()).min(self.data.len());
        if end > self.limit {
            return Err(io::Error::other("tripwire: read past the limit"));
        }
        let n = end - self.pos;
        buf[..n].copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(n)
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------------------------
// round trips

fn round_trip(depth: usize) {
    let src = tmp();
    let chain = make_chain(src.path(), depth);
    let expected = merged(&chain[0]);
    let tgz = export(&chain);

    // Read in odd-sized pieces to exercise every buffer boundary.
    let dir = tmp();
    let staging = dir.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let leaf_uuid = Uuid::new_v4();
    let mut calls = 0u64;
    let mut last = 0u64;
    let got = import_tgz(
        &mut Trickle {
            data: &tgz,
            step: 100_003,
        },
        &staging,
        leaf_uuid,
        &limits(),
        &mut |n| {
            assert!(n >= last);
            last = n;
            calls += 1;
            true
        },
    )
    .unwrap();
    assert!(calls > 0 && last <= tgz.len() as u64);
    assert_eq!(got.leaf, staging.join(format!("{leaf_uuid}.vhd")));
    assert_eq!(got.files.len(), depth);
    assert_eq!(got.virtual_size, SIZE);
    assert_eq!(got.files[0].0, got.leaf);
    let mut uuids = std::collections::HashSet::new();
    for (i, (path, info)) in got.files.iter().enumerate() {
        assert_eq!(path.parent(), Some(staging.as_path()));
        assert_eq!(
            path.file_name().unwrap(),
            format!("{}.vhd", info.uuid).as_str()
        );
        assert!(uuids.insert(info.uuid));
        assert_eq!(info.hidden, i != 0, "file {i} hidden flag");
        assert_eq!(vhd::check(path).unwrap(), *info);
        match got.files.get(i + 1) {
            Some((_, parent)) => {
                let link = info.parent.as_ref().unwrap();
                assert_eq!(link.uuid, parent.uuid);
                assert_eq!(link.name, format!("{}.vhd", parent.uuid));
            }
            None => assert_eq!(info.disk_type, DiskType::Dynamic),
        }
    }
    assert_eq!(got.files[0].1.uuid, leaf_uuid);
    // Nothing else is left in the staging directory.
    assert_eq!(fs::read_dir(&staging).unwrap().count(), depth);
    assert!(merged(&got.leaf) == expected, "merged content differs");
}

#[test]
fn round_trip_one() {
    round_trip(1);
}

#[test]
fn round_trip_two() {
    round_trip(2);
}

#[test]
fn round_trip_five() {
    round_trip(5);
}

#[test]
fn export_is_one_gzip_member_and_readable_by_tar_and_python() {
    let src = tmp();
    let chain = make_chain(src.path(), 3);
    let tgz = export(&chain);
    let file = src.path().join("out.tgz");
    fs::write(&file, &tgz).unwrap();

    // Single member: a plain (non-multi) gzip decoder reads the whole tar.
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&tgz[..])
        .read_to_end(&mut plain)
        .unwrap();
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(&plain[..]);
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.header().entry_type(), EntryType::Regular);
        assert_eq!(entry.header().mode().unwrap(), 0o644);
        names.push(String::from_utf8(entry.path_bytes().into_owned()).unwrap());
    }
    assert_eq!(names, ["0.vhd", "1.vhd", "2.vhd"]);

    if have("tar") {
        let out = Command::new("tar")
            .arg("-tzvf")
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        for (i, line) in lines.iter().enumerate() {
            assert!(line.starts_with("-rw-r--r--"), "{line}");
            assert!(line.ends_with(&format!(" {i}.vhd")), "{line}");
        }
        let x = src.path().join("x");
        fs::create_dir(&x).unwrap();
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(&file)
            .arg("-C")
            .arg(&x)
            .status()
            .unwrap();
        assert!(st.success());
        for (i, p) in chain.iter().enumerate() {
            assert!(fs::read(x.join(format!("{i}.vhd"))).unwrap() == fs::read(p).unwrap());
        }
    }
    if have("python3") {
        let script = "import sys, tarfile, hashlib\n\
                      with tarfile.open(sys.argv[1], 'r|gz') as t:\n\
                      \x20   for m in t:\n\
                      \x20       d = t.extractfile(m).read()\n\
                      \x20       print(m.name, m.size, len(d), hashlib.sha256(d).hexdigest()[:16])\n";
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for (i, p) in chain.iter().enumerate() {
            let len = fs::metadata(p).unwrap().len();
            assert!(
                lines[i].starts_with(&format!("{i}.vhd {len} {len} ")),
                "{}",
                lines[i]
            );
        }
    }
}

#[test]
fn export_refuses_a_broken_chain_and_cancels() {
    let src = tmp();
    let chain = light_chain(src.path(), 2);
    let mut out = Vec::new();
    let e = export_tgz(&chain[..1], &mut out, 1, &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("missing from the chain"), "{e}");
    let other = light_chain(src.path(), 1);
    let e = export_tgz(
        &[chain[0].clone(), other[0].clone()],
        &mut out,
        1,
        &mut |_| true,
    )
    .unwrap_err();
    assert!(e.to_string().contains("is not the UUID"), "{e}");
    let e = export_tgz(
        &[chain[1].clone(), chain[0].clone()],
        &mut out,
        1,
        &mut |_| true,
    )
    .unwrap_err();
    assert!(e.to_string().contains("has no parent"), "{e}");
    let e = export_tgz(&chain, &mut out, 3, &mut |_| false).unwrap_err();
    assert!(matches!(e, ImageError::Cancelled), "{e}");
}

#[test]
fn import_cancels() {
    let src = tmp();
    let chain = light_chain(src.path(), 2);
    let tgz = export(&chain);
    let dir = tmp();
    let r = import_tgz(
        &mut &tgz[..],
        dir.path(),
        Uuid::new_v4(),
        &limits(),
        &mut |_| false,
    );
    assert!(matches!(r, Err(ImageError::Cancelled)), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// legacy layouts

#[test]
fn legacy_names_snap_image_base() {
    let src = tmp();
    let chain = light_chain(src.path(), 3);
    let expected = merged(&chain[0]);
    // Out of order, with the ./ directory entry Nova's upload wrote.
    let mut t = RawTar::default();
    t.entry(b"./", b'5', b"")
        .file("./base.vhd", &chain[2])
        .file("./snap.vhd", &chain[0])
        .file("./image.vhd", &chain[1]);
    let (_d, r) = import(&gz(&t.end()));
    let got = r.unwrap();
    assert_eq!(got.files.len(), 3);
    assert!(merged(&got.leaf) == expected);

    // image.vhd alone is the leaf; image + base form a chain of two.
    let two = light_chain(src.path(), 2);
    let (_d, r) = import(&tgz_of(&[("image.vhd", &two[0]), ("base.vhd", &two[1])]));
    assert_eq!(r.unwrap().files.len(), 2);
    let one = light_chain(src.path(), 1);
    let (_d, r) = import(&tgz_of(&[("image.vhd", &one[0])]));
    assert_eq!(r.unwrap().files.len(), 1);
}

#[test]
fn single_oddly_named_member_is_the_leaf() {
    let src = tmp();
    let one = light_chain(src.path(), 1);
    let expected = merged(&one[0]);
    let (_d, r) = import(&tgz_of(&[("my disk.vhd", &one[0])]));
    let got = r.unwrap();
    assert!(merged(&got.leaf) == expected);

    // A long name needs a GNU long-name header, which the tar crate decodes.
    let long = format!("{}.vhd", "x".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    b.append_path_with_name(&one[0], &long).unwrap();
    let tgz = gz(&b.into_inner().unwrap());
    let (_d, r) = import(&tgz);
    assert_eq!(r.unwrap().files.len(), 1);

    // Not the single member: refused, naming it.
    let two = light_chain(src.path(), 2);
    refused(
        &tgz_of(&[("0.vhd", &two[0]), ("1.vhd", &two[1]), ("odd.vhd", &one[0])]),
        &["odd.vhd", "extra member"],
    );
    refused(
        &tgz_of(&[("odd.vhd", &one[0]), ("0.vhd", &two[0])]),
        &["odd.vhd", "extra member"],
    );
}

/// One PAX record: the length field counts itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

#[test]
fn pax_size_and_path_records_are_honoured() {
    // Python's tarfile and GNU tar --format=pax put sizes of 8 GiB and more in a PAX record
    // and 0 in the ustar field: the record wins, and so does a PAX path.
    let src = tmp();
    let one = light_chain(src.path(), 1);
    let v = fs::read(&one[0]).unwrap();
    let mut pax = pax_record("size", &v.len().to_string());
    pax.extend_from_slice(&pax_record("path", "./0.vhd"));
    let mut t = RawTar::default();
    t.entry(b"PaxHeader", b'x', &pax);
    t.header(b"ignored-name", b'0', 0, b"");
    t.0.extend_from_slice(&v);
    t.pad();
    let (_d, r) = import(&gz(&t.end()));
    assert_eq!(r.unwrap().files.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// hostile names and types

fn one_vhd() -> (tempfile::TempDir, Vec<u8>) {
    let src = tmp();
    let one = light_chain(src.path(), 1);
    let bytes = fs::read(&one[0]).unwrap();
    (src, bytes)
}

#[test]
fn path_traversal_and_odd_paths_are_refused() {
    let (_s, v) = one_vhd();
    for (name, rule) in [
        (&b"../0.vhd"[..], "path traversal"),
        (b"./../0.vhd", "path traversal"),
        (b"/0.vhd", "absolute"),
        (b"a/0.vhd", "subdirectories"),
        (b"./a/0.vhd", "subdirectories"),
        (b".//0.vhd", "subdirectories"),
    ] {
        let tgz = gz(&RawTar::default().entry(name, b'0', &v).end());
        refused(&tgz, &[&String::from_utf8_lossy(name), rule]);
    }
    // The same through a PAX path record.
    let mut t = RawTar::default();
    t.entry(b"PaxHeader", b'x', b"23 path=../../../0.vhd\n")
        .entry(b"0.vhd", b'0', &v);
    refused(&gz(&t.end()), &["../../../0.vhd", "path traversal"]);
}

#[test]
fn links_devices_fifos_and_directories_are_refused() {
    let (_s, v) = one_vhd();
    let cases: [(&str, Vec<u8>, &str); 8] = [
        (
            "symlink",
            RawTar::default().link(b"0.vhd", b'2', b"/etc/passwd").end(),
            "symbolic links",
        ),
        (
            "hardlink",
            RawTar::default()
                .entry(b"1.vhd", b'0', &v)
                .link(b"0.vhd", b'1', b"1.vhd")
                .end(),
            "hard links",
        ),
        (
            "char device",
            RawTar::default().link(b"0.vhd", b'3', b"").end(),
            "device nodes",
        ),
        (
            "block device",
            RawTar::default().link(b"0.vhd", b'4', b"").end(),
            "device nodes",
        ),
        (
            "fifo",
            RawTar::default().link(b"0.vhd", b'6', b"").end(),
            "FIFOs",
        ),
        (
            "directory",
            RawTar::default().link(b"0.vhd/", b'5', b"").end(),
            "directory members",
        ),
        (
            "contiguous",
            RawTar::default().entry(b"0.vhd", b'7', &v).end(),
            "contiguous",
        ),
        (
            "volume label",
            RawTar::default().link(b"0.vhd", b'V', b"").end(),
            "not allowed",
        ),
    ];
    for (what, tar, rule) in cases {
        let msg = refused(&gz(&tar), &["0.vhd", rule]);
        assert!(!msg.is_empty(), "{what}");
    }
    // The ./ entry is skipped only before the members.
    let late = RawTar::default()
        .entry(b"0.vhd", b'0', &v)
        .link(b"./", b'5', b"")
        .end();
    refused(&gz(&late), &["\"./\"", "directory members"]);
    // GNU sparse (old style 'S') and PAX sparse records.
    // One 512-byte chunk at the end of a 1 GiB file: the rest would read as zeros.
    let mut h = tar::Header::new_gnu();
    h.set_size(512);
    h.set_entry_type(EntryType::GNUSparse);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.set_real_size(1 << 30);
    gnu.sparse[0].set_offset((1 << 30) - 512);
    gnu.sparse[0].set_length(512);
    h.as_mut_bytes()[..5].copy_from_slice(b"0.vhd");
    h.set_cksum();
    let mut sparse = h.as_bytes().to_vec();
    sparse.extend_from_slice(&[7u8; 512]);
    sparse.extend_from_slice(&[0u8; 1024]);
    refused(&gz(&sparse), &["0.vhd", "sparse"]);
    let mut t = RawTar::default();
    t.entry(b"PaxHeader", b'x', b"22 GNU.sparse.major=1\n")
        .entry(b"0.vhd", b'0', &v);
    refused(&gz(&t.end()), &["0.vhd", "sparse"]);
}

#[test]
fn duplicates_extras_and_swap_are_refused() {
    let src = tmp();
    let two = light_chain(src.path(), 2);
    let one = light_chain(src.path(), 1);
    refused(
        &tgz_of(&[("0.vhd", &two[0]), ("./0.vhd", &two[0])]),
        &["0.vhd", "duplicate"],
    );
    // A legacy name renamed onto an existing number.
    refused(
        &tgz_of(&[("snap.vhd", &two[0]), ("0.vhd", &one[0])]),
        &["snap.vhd", "duplicates member 0.vhd"],
    );
    let mut t = RawTar::default();
    t.file("0.vhd", &two[0])
        .file("1.vhd", &two[1])
        .entry(b"readme.txt", b'0', b"hello\n");
    refused(&gz(&t.end()), &["readme.txt", "not a VHD"]);
    let mut t = RawTar::default();
    t.file("0.vhd", &two[0])
        .file("1.vhd", &two[1])
        .file("swap.vhd", &two[1]);
    refused(&gz(&t.end()), &["swap.vhd", "swap"]);
    // Leading zeros make a name that is not N.vhd: an extra member.
    refused(
        &tgz_of(&[("0.vhd", &two[0]), ("01.vhd", &two[1])]),
        &["01.vhd", "extra member"],
    );
}

#[test]
fn gaps_and_too_many_members_are_refused() {
    let src = tmp();
    let three = light_chain(src.path(), 3);
    refused(
        &tgz_of(&[("0.vhd", &three[0]), ("2.vhd", &three[2])]),
        &["gap", "1.vhd is missing"],
    );
    let four = light_chain(src.path(), 4);
    let tgz = export(&four);
    let small = TgzLimits {
        max_virtual_size: 64 * MIB,
        max_members: 3,
    };
    refused_with(&tgz, &small, &["3.vhd", "too many members"]);
    let (_d, r) = import_with(
        &mut &tgz[..],
        &TgzLimits {
            max_members: 4,
            ..small
        },
    );
    assert_eq!(r.unwrap().files.len(), 4);
}

#[test]
fn empty_archives_are_refused() {
    refused(&gz(&RawTar::default().end()), &["empty archive"]);
    refused(
        &gz(&RawTar::default().entry(b"./", b'5', b"").end()),
        &["empty archive"],
    );
    refused(&[], &["gzip"]);
}

// ---------------------------------------------------------------------------------------------
// hostile chains

#[test]
fn wrong_zero_and_looping_parents_are_refused() {
    let d = tmp();
    let dir = d.path();
    let data = vec![0; SIZE as usize];
    // Child of a decoy whose uuid differs from the real parent's.
    let decoy = make_vhd(dir, "decoy.vhd", Uuid::new_v4(), &data, None);
    let child = make_vhd(dir, "child.vhd", Uuid::new_v4(), &data, Some(&decoy));
    let parent = make_vhd(dir, "parent.vhd", Uuid::new_v4(), &data, None);
    refused(
        &tgz_of(&[("0.vhd", &child), ("1.vhd", &parent)]),
        &["0.vhd", "wrong parent"],
    );
    // Order in the archive does not matter: the parent first.
    refused(
        &tgz_of(&[("1.vhd", &parent), ("0.vhd", &child)]),
        &["0.vhd", "wrong parent"],
    );

    // All-zero parent uuid (blktap "raw parent").
    let nil = make_vhd(dir, "nil.vhd", Uuid::nil(), &data, None);
    let raw_child = make_vhd(dir, "raw-child.vhd", Uuid::new_v4(), &data, Some(&nil));
    refused(
        &tgz_of(&[("0.vhd", &raw_child), ("1.vhd", &parent)]),
        &["0.vhd", "all-zero parent UUID"],
    );

    // Two files naming each other.
    let (ua, ub) = (Uuid::new_v4(), Uuid::new_v4());
    let decoy_b = make_vhd(dir, "decoy-b.vhd", ub, &data, None);
    let decoy_a = make_vhd(dir, "decoy-a.vhd", ua, &data, None);
    let a = make_vhd(dir, "a.vhd", ua, &data, Some(&decoy_b));
    let b = make_vhd(dir, "b.vhd", ub, &data, Some(&decoy_a));
    refused(&tgz_of(&[("0.vhd", &a), ("1.vhd", &b)]), &["1.vhd", "loop"]);
    // The same file twice under two numbers: same uuid.
    refused(
        &tgz_of(&[("0.vhd", &parent), ("1.vhd", &parent)]),
        &["1.vhd", "duplicate UUIDs"],
    );
}

#[test]
fn bad_chain_shapes_are_refused() {
    let d = tmp();
    let dir = d.path();
    let data = vec![0; SIZE as usize];
    // The base is differencing, its parent not in the archive.
    let outside = make_vhd(dir, "outside.vhd", Uuid::new_v4(), &data, None);
    let mid = make_vhd(dir, "mid.vhd", Uuid::new_v4(), &data, Some(&outside));
    let leaf = make_vhd(dir, "leaf.vhd", Uuid::new_v4(), &data, Some(&mid));
    refused(
        &tgz_of(&[("0.vhd", &leaf), ("1.vhd", &mid)]),
        &["1.vhd", "base", "not in the archive"],
    );
    refused(
        &tgz_of(&[("0.vhd", &leaf)]),
        &["0.vhd", "not in the archive"],
    );
    // A dynamic disk with something after it.
    refused(
        &tgz_of(&[("0.vhd", &outside), ("1.vhd", &mid)]),
        &["0.vhd", "cannot have a parent"],
    );

    // A hidden leaf.
    let hidden = make_vhd(dir, "hidden.vhd", Uuid::new_v4(), &data, Some(&outside));
    vhd::set_hidden(&hidden, true).unwrap();
    refused(
        &tgz_of(&[("0.vhd", &hidden), ("1.vhd", &outside)]),
        &["0.vhd", "hidden"],
    );
    let single_hidden = make_vhd(dir, "single-hidden.vhd", Uuid::new_v4(), &data, None);
    vhd::set_hidden(&single_hidden, true).unwrap();
    refused(
        &tgz_of(&[("snap.vhd", &single_hidden)]),
        &["snap.vhd", "hidden"],
    );

    // A child smaller than its parent: linked to a small decoy with the big parent's uuid.
    let big_uuid = Uuid::new_v4();
    let small_decoy = make_vhd(dir, "small-decoy.vhd", big_uuid, &data, None);
    let small = make_vhd(dir, "small.vhd", Uuid::new_v4(), &data, Some(&small_decoy));
    let big = make_vhd(dir, "big.vhd", big_uuid, &vec![0; 2 * SIZE as usize], None);
    refused(
        &tgz_of(&[("0.vhd", &small), ("1.vhd", &big)]),
        &["0.vhd", "smaller"],
    );

    // Virtual size beyond the limit.
    let huge = make_vhd(
        dir,
        "huge.vhd",
        Uuid::new_v4(),
        &vec![0; 2 * SIZE as usize],
        None,
    );
    let e = refused_with(
        &tgz_of(&[("0.vhd", &huge)]),
        &TgzLimits {
            max_virtual_size: SIZE,
            max_members: 30,
        },
        &["virtual size of member 0.vhd"],
    );
    assert!(e.contains(&format!("{}", 2 * SIZE)), "{e}");
}

#[test]
fn bad_checksum_fails_before_the_next_member_is_read() {
    let src = tmp();
    let chain = light_chain(src.path(), 2);
    let bad = src.path().join("bad.vhd");
    fs::copy(&chain[1], &bad).unwrap();
    // Flip a byte of the primary footer's uuid without resealing.
    let len = fs::metadata(&bad).unwrap().len() as usize;
    let mut b = fs::read(&bad).unwrap();
    b[len - 512 + 70] ^= 0x55;
    fs::write(&bad, &b).unwrap();

    let mut head = RawTar::default();
    head.file("0.vhd", &chain[0]).file("1.vhd", &bad);
    let head = gz(&head.0);
    // The third member: 2 MiB of noise the importer must never get to.
    let mut tail = RawTar::default();
    tail.entry(b"2.vhd", b'0', &pattern(77, (2 * MIB) as usize));
    let tail = gz(&tail.end());
    let mut tgz = head.clone();
    tgz.extend_from_slice(&tail);
    let mut src_reader = Tripwire {
        data: &tgz,
        pos: 0,
        limit: head.len() + (512 << 10),
    };
    let (_d, r) = import_with(&mut src_reader, &limits());
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("1.vhd") && msg.contains("checksum"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// broken streams

#[test]
fn truncated_and_malformed_streams_are_refused() {
    let src = tmp();
    let chain = light_chain(src.path(), 2);
    let tgz = export(&chain);
    // Truncated gzip: the trailer and some data missing.
    refused(&tgz[..tgz.len() - 100], &["gzip"]);
    refused(&tgz[..tgz.len() / 2], &["gzip"]);

    // Truncated tar inside a member, with a valid gzip around it.
    let mut t = RawTar::default();
    t.file("0.vhd", &chain[0]).file("1.vhd", &chain[1]);
    let tar = t.end();
    let cut = 512 + fs::metadata(&chain[0]).unwrap().len() as usize / 2;
    refused(&gz(&tar[..cut]), &["0.vhd", "truncated"]);
    // Cut at a member boundary: no end-of-archive marker.
    refused(&gz(&tar[..tar.len() - 1024]), &["end-of-archive marker"]);
    // Cut inside a header block.
    refused(&gz(&tar[..tar.len() - 1024 + 100]), &["tar archive"]);

    // Not gzip at all, and gzip of something that is not a tar.
    refused(&pattern(5, 100_000), &["gzip"]);
    refused(&tar, &["gzip"]);
    refused(&gz(&pattern(6, 100_000)), &["tar archive is not valid"]);

    // Data after the end of the tar archive, inside the gzip stream.
    let mut trailing = tar.clone();
    trailing.extend_from_slice(b"surprise");
    refused(&gz(&trailing), &["after the end-of-archive marker"]);
    // Zero padding is fine (GNU tar pads to 10 KiB records).
    let mut padded = tar.clone();
    padded.resize(padded.len() + 9 * 1024, 0);
    let (_d, r) = import(&gz(&padded));
    r.unwrap();
    // Garbage after the gzip stream.
    let mut after = tgz.clone();
    after.extend_from_slice(b"garbage after the gzip stream");
    refused(&after, &["gzip"]);
    // A corrupted byte in the middle of the compressed data.
    let mut flipped = tgz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    refused(&flipped, &[]);
}

/// A gzip stream of `prefix`, then `zero_chunks` MiB of zeros, then `suffix`, built without
/// compressing the zeros more than once.
fn gz_with_zeros(prefix: &[u8], zero_chunks: u64, suffix: &[u8]) -> Vec<u8> {
    fn raw(data: &[u8], flush: FlushCompress) -> Vec<u8> {
        let mut c = Compress::new(Compression::best(), false);
        let mut out = Vec::with_capacity(data.len() + 4096);
        c.compress_vec(data, &mut out, flush).unwrap();
        assert_eq!(c.total_in() as usize, data.len());
        out
    }
    static ZEROS: std::sync::OnceLock<(Vec<u8>, Crc)> = std::sync::OnceLock::new();
    let (zeros_z, zeros_crc) = ZEROS.get_or_init(|| {
        let zeros = vec![0u8; MIB as usize];
        let mut crc = Crc::new();
        crc.update(&zeros);
        (raw(&zeros, FlushCompress::Sync), crc)
    });
    let mut crc = Crc::new();
    crc.update(prefix);
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    out.extend_from_slice(&raw(prefix, FlushCompress::Sync));
    for _ in 0..zero_chunks {
        out.extend_from_slice(zeros_z);
        crc.combine(zeros_crc);
    }
    out.extend_from_slice(&raw(suffix, FlushCompress::Finish));
    let mut suffix_crc = Crc::new();
    suffix_crc.update(suffix);
    crc.combine(&suffix_crc);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&crc.amount().to_le_bytes());
    out
}

#[test]
fn decompression_bombs_are_refused_quickly() {
    // The helper itself is sound: a small instance decodes.
    let mut small = Vec::new();
    flate2::read::GzDecoder::new(&gz_with_zeros(b"abc", 3, b"xyz")[..])
        .read_to_end(&mut small)
        .unwrap();
    assert_eq!(small.len(), 3 + 3 * MIB as usize + 3);

    // 2 GiB of zeros in a member claiming to be 0.vhd, with a 64 MiB limit: refused at the
    // tar header, before any of the data is inflated.
    let mut h = RawTar::default();
    h.header(b"0.vhd", b'0', 2048 * MIB, b"");
    let bomb = gz_with_zeros(&h.0, 2048, &[0u8; 1024]);
    assert!(bomb.len() < 4 << 20);
    let started = Instant::now();
    let msg = refused(&bomb, &["member 0.vhd", &format!("{}", 2048 * MIB)]);
    assert!(started.elapsed() < Duration::from_secs(5), "{msg}");

    // A PAX record of 64 MiB (the tar crate would hold it in memory): refused after 1 MiB.
    let mut h = RawTar::default();
    h.header(b"PaxHeader", b'x', 64 * MIB, b"");
    let bomb = gz_with_zeros(&h.0, 64, &[0u8; 1536]);
    let started = Instant::now();
    refused(&bomb, &["PAX records"]);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A skipped ./ entry claiming data.
    let mut h = RawTar::default();
    h.header(b"./", b'5', 64 * MIB, b"");
    refused(&gz_with_zeros(&h.0, 64, &[0u8; 1024]), &["./"]);
    // A PAX global header is skipped, but its data counts against the same 1 MiB.
    let mut h = RawTar::default();
    h.header(b"pax_global_header", b'g', 64 * MIB, b"");
    refused(&gz_with_zeros(&h.0, 64, &[0u8; 1024]), &["PAX records"]);
    // So do many small skipped entries.
    let mut t = RawTar::default();
    for _ in 0..3000 {
        t.entry(b"./", b'5', b"");
    }
    refused(&gz(&t.end()), &["PAX records"]);

    // Zero padding after the end of the archive: bounded too.
    let (_s, v) = one_vhd();
    let mut t = RawTar::default();
    t.entry(b"0.vhd", b'0', &v);
    let tar = t.end();
    refused(
        &gz_with_zeros(&tar, 64, b""),
        &["padding after the end-of-archive marker"],
    );

    // A member within the size limit whose VHD is far smaller than the file: refused after
    // inspection (the file holds megabytes of garbage past what its virtual size needs).
    let d = tmp();
    let vhd_path = make_vhd(
        d.path(),
        "s.vhd",
        Uuid::new_v4(),
        &vec![0; 2 * MIB as usize],
        None,
    );
    let mut bytes = fs::read(&vhd_path).unwrap();
    let footer = bytes.split_off(bytes.len() - 512);
    let garbage = 20 * MIB;
    let mut head = RawTar::default();
    head.header(b"0.vhd", b'0', bytes.len() as u64 + garbage + 512, b"");
    head.0.extend_from_slice(&bytes);
    let mut tail = footer;
    tail.extend_from_slice(&[0u8; 1024]);
    let tgz = gz_with_zeros(&head.0, garbage / MIB, &tail);
    refused(&tgz, &["member 0.vhd", "bytes of virtual size"]);
}

// ---------------------------------------------------------------------------------------------
// benchmark (release): TGZ_BENCH=make:<dir> builds a chain and exports it; TGZ_BENCH=import:<tgz>
// imports a tarball into <tgz>.staging (run in a fresh process to see its peak RSS).

/// Disk content generated block by block: a third zero, a third random, a third text-like.
struct Synthetic {
    seed: u64,
    pos: u64,
    size: u64,
    block: Vec<u8>,
}

impl Read for Synthetic {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size {
            return Ok(0);
        }
        let index = self.pos / BLOCK_SIZE;
        let within = (self.pos % BLOCK_SIZE) as usize;
        if within == 0 {
            self.block = match (index + self.seed) % 3 {
                0 => vec![0; BLOCK_SIZE as usize],
                1 => pattern(self.seed * 1_000_003 + index, BLOCK_SIZE as usize),
                _ => {
                    let mut b = Vec::with_capacity(BLOCK_SIZE as usize);
                    let mut i = 0u64;
                    while b.len() < BLOCK_SIZE as usize {
                        let line = format!(
                            "{:08x} disk {} block {index} record {i}: the quick brown fox\n",
                            i.wrapping_mul(2_654_435_761) ^ self.seed,
                            self.seed
                        );
                        b.extend_from_slice(line.as_bytes());
                        i += 1;
                    }
                    b.truncate(BLOCK_SIZE as usize);
                    b
                }
            };
        }
        let n = buf.len().min(BLOCK_SIZE as usize - within);
        buf[..n].copy_from_slice(&self.block[within..within + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "benchmark; run in release with TGZ_BENCH set"]
fn bench() {
    let Ok(spec) = std::env::var("TGZ_BENCH") else {
        return;
    };
    if let Some(dir) = spec.strip_prefix("make:") {
        let dir = Path::new(dir);
        fs::create_dir_all(dir).unwrap();
        let size = 300 * MIB;
        let mut chain: Vec<PathBuf> = Vec::new();
        for level in (0..3u64).rev() {
            let path = dir.join(format!("{level}.vhd"));
            let mut src = Synthetic {
                seed: level + 1,
                pos: 0,
                size,
                block: Vec::new(),
            };
            vhd::write_dynamic_from(&mut src, size, &path, Uuid::new_v4(), &mut |_, _| true)
                .unwrap();
            if let Some(parent) = chain.first() {
                edit_footers(&path, true, |f| {
                    f[60..64].copy_from_slice(&4u32.to_be_bytes())
                });
                vhd::set_parent(&path, parent).unwrap();
                vhd::set_hidden(parent, true).unwrap();
            }
            chain.insert(0, path);
        }
        eprintln!("made {}, peak RSS {} KiB", dir.display(), peak_rss_kib());
    } else if let Some(rest) = spec.strip_prefix("export:") {
        // export:<dir>:<threads>:<level>
        let mut parts = rest.split(':');
        let dir = Path::new(parts.next().unwrap());
        let threads: usize = parts.next().unwrap_or("2").parse().unwrap();
        let level: u32 = parts.next().unwrap_or("6").parse().unwrap();
        let chain: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("{i}.vhd"))).collect();
        let data: u64 = chain.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        let out_path = dir.join(format!("export-{threads}-{level}.tgz"));
        let mut out = io::BufWriter::new(fs::File::create(&out_path).unwrap());
        let t = Instant::now();
        let n = export::run_level(&chain, &mut out, threads, level, &mut |_| true).unwrap();
        io::Write::flush(&mut out).unwrap();
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "export threads={threads} level={level}: {data} bytes in {s:.3} s = {:.0} MB/s, \
             {n} bytes out (ratio {:.3}), peak RSS {} KiB",
            data as f64 / s / 1e6,
            n as f64 / data as f64,
            peak_rss_kib()
        );
    } else if let Some(tgz) = spec.strip_prefix("decode:") {
        let src = io::BufReader::with_capacity(256 << 10, fs::File::open(tgz).unwrap());
        let mut d = flate2::bufread::MultiGzDecoder::new(src);
        let mut buf = vec![0u8; 1 << 20];
        let t = Instant::now();
        let mut n = 0u64;
        loop {
            let k = d.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "decode {tgz}: {n} bytes in {s:.3} s = {:.0} MB/s",
            n as f64 / s / 1e6
        );
    } else if let Some(tgz) = spec.strip_prefix("import:") {
        let staging = PathBuf::from(format!("{tgz}.staging"));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir(&staging).unwrap();
        let mut src = fs::File::open(tgz).unwrap();
        let t = Instant::now();
        let got = import_tgz(
            &mut src,
            &staging,
            Uuid::new_v4(),
            &TgzLimits::new(1 << 40),
            &mut |_| true,
        )
        .unwrap();
        let s = t.elapsed().as_secs_f64();
        let data: u64 = got.files.iter().map(|f| f.1.file_size).sum();
        eprintln!(
            "import {tgz}: {data} bytes in {s:.3} s = {:.0} MB/s, peak RSS {} KiB",
            data as f64 / s / 1e6,
            peak_rss_kib()
        );
    }
}
