//! vhd tgz chains through the real CLI, daemon and simulator, in both modes: chains of depth 2
//! and 5 whose layers overwrite, partially shadow and zero their parents' data are imported,
//! read back, exported in every format and re-imported; broken chains (a missing member, a
//! wrong parent, a loop) are refused without a trace.
//!
//! The chains are built with the library's VHD writer and then patched by hand: sector bitmaps
//! with single-sector granularity (the writer only writes whole blocks), garbage under the
//! clear bits of differencing layers (a reader that ignores bitmaps returns it), blocks that
//! are allocated but zero (a child erasing its parent's data), and batmaps kept consistent.
//! The tarballs are made by GNU tar, not by our exporter.

mod support;

use support::text;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{World, assert_same_disk, assert_same_image, staging_leftovers};
use uuid::Uuid;
use xenapinfs::vhd::{self, Chain, ChainReader, DiskType};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BLOCK: u64 = vhd::BLOCK_SIZE;
const SECTOR: u64 = 512;
const SECTORS_PER_BLOCK: usize = (BLOCK / SECTOR) as usize;

fn remote() -> &'static str {
    "mode = \"remote\"\n"
}

/// One allocated block of a layer: which sectors the layer holds, and the bytes stored in
/// the file (for sectors it does not hold: garbage in a differencing layer, zeros in the base).
#[derive(Clone)]
struct BlockSpec {
    present: Vec<bool>,
    stored: Vec<u8>,
}

/// One file of a chain.
struct LayerSpec {
    size: u64,
    blocks: BTreeMap<u64, BlockSpec>,
}

/// Non-zero bytes, different for every layer and sector.
fn layer_data(level: usize, block: u64) -> Vec<u8> {
    (0..BLOCK as usize)
        .map(|i| {
            let sector = block as usize * SECTORS_PER_BLOCK + i / 512;
            ((level * 37 + sector * 11 + i % 512) % 251) as u8 + 1
        })
        .collect()
}

fn block(
    level: usize,
    index: u64,
    differencing: bool,
    present: impl Fn(usize) -> bool,
) -> BlockSpec {
    let data = layer_data(level, index);
    let present: Vec<bool> = (0..SECTORS_PER_BLOCK).map(present).collect();
    let mut stored = data;
    for (s, &p) in present.iter().enumerate() {
        if !p {
            let filler = if differencing { 0xEE } else { 0 };
            stored[s * 512..(s + 1) * 512].fill(filler);
        }
    }
    BlockSpec { present, stored }
}

fn zero_block(present: impl Fn(usize) -> bool) -> BlockSpec {
    let present: Vec<bool> = (0..SECTORS_PER_BLOCK).map(present).collect();
    let mut stored = vec![0u8; BLOCK as usize];
    for (s, &p) in present.iter().enumerate() {
        if !p {
            stored[s * 512..(s + 1) * 512].fill(0xEE);
        }
    }
    BlockSpec { present, stored }
}

/// The layers of a chain of `depth` files over `size` bytes, leaf first. Level 0 is the base.
/// Every upper level overwrites one whole parent block, shadows some sectors of another with
/// an irregular, sector-granular bitmap, and writes zeros over a whole block its parents
/// hold; the leaf also zeros a few sectors here and there, and may be larger than its parents.
fn plan(depth: usize, size: u64, leaf_size: u64) -> Vec<LayerSpec> {
    let blocks = size / BLOCK;
    assert_eq!(blocks, 8, "the plan is written for 8 blocks");
    let mut layers = Vec::new();
    for level in 0..depth {
        let leaf = level == depth - 1;
        let mut map = BTreeMap::new();
        if level == 0 {
            for b in 0..6 {
                map.insert(b, block(0, b, false, |_| true));
            }
            // Runs of three sectors: bitmap bytes like 0xE3 0x8E 0x38, never 0x00 or 0xFF.
            map.insert(6, block(0, 6, false, |s| (s / 3) % 2 == 0));
        } else {
            let l = level as u64;
            map.insert(
                (l + 2) % 7,
                block(level, (l + 2) % 7, true, |s| (s * (level + 1) / 5) % 3 != 0),
            );
            map.insert(l % 6, block(level, l % 6, true, |_| true));
            map.insert((l + 4) % 6, zero_block(|_| true));
            if leaf {
                map.insert((l + 5) % 6, zero_block(|s| s % 16 < 4 || s == 4095));
                if leaf_size > size {
                    map.insert(blocks, block(level, blocks, true, |s| s % 2 == 0));
                }
            }
        }
        layers.push(LayerSpec {
            size: if leaf { leaf_size } else { size },
            blocks: map,
        });
    }
    layers.reverse();
    layers
}

/// The merged disk the chain describes (leaf size).
fn expected_content(layers: &[LayerSpec]) -> Vec<u8> {
    let size = layers[0].size;
    let mut disk = vec![0u8; size as usize];
    for s in 0..(size / SECTOR) {
        let (b, within) = (s / (BLOCK / SECTOR), (s % (BLOCK / SECTOR)) as usize);
        for layer in layers {
            if s * SECTOR >= layer.size {
                continue;
            }
            if let Some(spec) = layer.blocks.get(&b)
                && spec.present[within]
            {
                let at = s as usize * 512;
                disk[at..at + 512].copy_from_slice(&spec.stored[within * 512..(within + 1) * 512]);
                break;
            }
        }
    }
    disk
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Writes each block's bitmap and stored bytes into `path` (whose BAT already has them
/// allocated), clearing the batmap bit of partial blocks and re-sealing the batmap.
fn patch_blocks(path: &Path, spec: &LayerSpec) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut footer = [0u8; 512];
    file.read_exact_at(&mut footer, 0).unwrap();
    let mut header = [0u8; 1024];
    file.read_exact_at(&mut header, be_u64(&footer, 16))
        .unwrap();
    let table = be_u64(&header, 16);
    let entries = be_u32(&header, 28) as usize;
    let mut bat = vec![0u8; entries * 4];
    file.read_exact_at(&mut bat, table).unwrap();
    let batmap_at = table + (entries as u64 * 4).next_multiple_of(512);
    let mut batmap_header = [0u8; 512];
    file.read_exact_at(&mut batmap_header, batmap_at).unwrap();
    assert_eq!(
        &batmap_header[..8],
        b"tdbatmap",
        "the writer emits a batmap"
    );
    let map_at = be_u64(&batmap_header, 8);
    let covered = ((spec.size >> 24).div_ceil(512).max(1) * 512) as usize;
    let mut map = vec![0u8; covered];
    file.read_exact_at(&mut map, map_at).unwrap();
    for (&index, b) in &spec.blocks {
        let entry = be_u32(&bat, index as usize * 4);
        assert_ne!(entry, u32::MAX, "block {index} must be allocated");
        let at = u64::from(entry) * SECTOR;
        let mut bitmap = [0u8; 512];
        for (s, &p) in b.present.iter().enumerate() {
            if p {
                bitmap[s / 8] |= 0x80 >> (s % 8);
            }
        }
        file.write_all_at(&bitmap, at).unwrap();
        file.write_all_at(&b.stored, at + SECTOR).unwrap();
        if !b.present.iter().all(|&p| p) {
            map[index as usize / 8] &= !(0x80 >> (index % 8));
        }
    }
    file.write_all_at(&map, map_at).unwrap();
    let sum = map.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    file.write_all_at(&(!sum).to_be_bytes(), batmap_at + 24)
        .unwrap();
    file.sync_all().unwrap();
}

/// A chain on disk: `<dir>/0.vhd` (leaf) .. `<dir>/N.vhd` (base).
struct BuiltChain {
    dir: PathBuf,
    files: Vec<PathBuf>,
    uuids: Vec<Uuid>,
    expected: Vec<u8>,
}

fn build_chain(dir: &Path, depth: usize, size: u64, leaf_size: u64) -> BuiltChain {
    std::fs::create_dir_all(dir).unwrap();
    let layers = plan(depth, size, leaf_size);
    let files: Vec<PathBuf> = (0..depth).map(|i| dir.join(format!("{i}.vhd"))).collect();
    let mut uuids = Vec::new();
    for i in (0..depth).rev() {
        let spec = &layers[i];
        // Every allocated block gets non-zero placeholder bytes so the writer allocates it;
        // the real bitmap and bytes are patched in afterwards.
        let mut raw = vec![0u8; spec.size as usize];
        for &b in spec.blocks.keys() {
            raw[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].fill(0x5A);
        }
        let uuid = Uuid::new_v4();
        let info =
            vhd::write_dynamic_from(&mut &raw[..], spec.size, &files[i], uuid, &mut |_, _| true)
                .unwrap();
        assert_eq!(info.allocated_blocks, spec.blocks.len() as u64);
        if i + 1 < depth {
            vhd::set_hidden(&files[i + 1], true).unwrap();
            vhd::make_child_of(&files[i], &files[i + 1]).unwrap();
        }
        patch_blocks(&files[i], spec);
        uuids.push(uuid);
    }
    uuids.reverse();
    for f in &files {
        vhd::check(f).unwrap_or_else(|e| panic!("the built layer is not valid: {e}"));
    }
    let expected = expected_content(&layers);
    // Our reader agrees with the model before anything else is tested.
    assert_eq!(read_all(&files[0], expected.len() as u64), expected);
    BuiltChain {
        dir: dir.to_path_buf(),
        files,
        uuids,
        expected,
    }
}

/// `tar -czf` with GNU tar, of the named members (or of `.` like Nova's uploader).
fn tarball(chain_dir: &Path, out: &Path, members: Option<&[&str]>) {
    let mut command = Command::new("tar");
    command.arg("-czf").arg(out).arg("-C").arg(chain_dir);
    match members {
        Some(names) => command.args(names),
        None => command.arg("."),
    };
    let status = command.status().unwrap();
    assert!(status.success());
}

fn read_all(leaf: &Path, length: u64) -> Vec<u8> {
    let mut reader = ChainReader::open(leaf).unwrap();
    let mut buf = vec![0u8; length as usize];
    reader.read_at(0, &mut buf).unwrap();
    buf
}

async fn assert_clean(world: &World, step: &str) {
    // An export's reply ends when the last byte is sent; the daemon removes its staging
    // directory just after that, so give it a moment (and say so when it was needed).
    let started = std::time::Instant::now();
    let mut left = staging_leftovers(&world.sim.export);
    while !left.is_empty() && started.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        left = staging_leftovers(&world.sim.export);
    }
    if started.elapsed() >= std::time::Duration::from_millis(20) {
        eprintln!(
            "note: {step}: staging was still there when the CLI returned; gone after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(left, Vec::<PathBuf>::new(), "{step}: staging left behind");
    world.assert_xapi_clean().await;
}

/// The volume holds the chain: merged content, fresh hidden parents, the leaf under the VDI
/// uuid, nothing else in the SR directory. Returns the parents' uuids.
fn verify_volume(
    world: &World,
    id: &str,
    depth: usize,
    expected: &[u8],
    not: &HashSet<Uuid>,
) -> Vec<Uuid> {
    let leaf = world.vhd(id);
    let vdi: Uuid = id.split_once('/').unwrap().1.parse().unwrap();
    let chain = Chain::open(&leaf).unwrap();
    let files = chain.files().to_vec();
    drop(chain);
    assert_eq!(files.len(), depth, "{id}: the chain keeps its depth");
    assert_eq!(files[0].1.uuid, vdi, "the leaf has the volume's VDI uuid");
    assert!(!files[0].1.hidden, "the leaf is visible");
    assert_eq!(
        files[0].1.virtual_size, GIB,
        "the leaf has the volume's size"
    );
    let mut parents = Vec::new();
    for (path, info) in &files[1..] {
        assert!(info.hidden, "{}: parents are hidden", path.display());
        assert_eq!(
            info.disk_type,
            if path == &files[depth - 1].0 {
                DiskType::Dynamic
            } else {
                DiskType::Differencing
            }
        );
        assert!(
            !not.contains(&info.uuid),
            "{}: parent uuids are fresh",
            path.display()
        );
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            format!("{}.vhd", info.uuid)
        );
        assert_eq!(
            path.parent(),
            leaf.parent(),
            "parents live in the volume's SR"
        );
        parents.push(info.uuid);
    }
    for (path, _) in &files {
        vhd::check(path).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut on_share: Vec<String> = support::entries(leaf.parent().unwrap())
        .into_iter()
        .filter(|n| n.ends_with(".vhd"))
        .collect();
    on_share.sort();
    let mut in_chain: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    in_chain.sort();
    assert_eq!(on_share, in_chain, "the SR holds exactly the chain");

    let mut reader = ChainReader::open(&leaf).unwrap();
    let mut got = vec![0u8; expected.len()];
    reader.read_at(0, &mut got).unwrap();
    if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{id}: merged content differs from the expected at byte {at} (sector {})",
            at / 512
        );
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for b in (expected.len() as u64).div_ceil(BLOCK)..GIB / BLOCK {
        if reader.allocated(b) {
            reader.read_at(b * BLOCK, &mut buf).unwrap();
            assert!(
                buf.iter().all(|&x| x == 0),
                "block {b} past the image is zero"
            );
        }
    }
    parents
}

async fn chain_round_trip(world: &World, depth: usize, leaf_size: u64) {
    let dir = world.sim.dir.path().join(format!("depth-{depth}"));
    let built = build_chain(&dir.join("chain"), depth, 16 * MIB, leaf_size);
    let raw = dir.join("expected.raw");
    std::fs::write(&raw, &built.expected).unwrap();
    let tgz = dir.join("chain.tgz");
    if depth == 2 {
        tarball(&built.dir, &tgz, Some(&["0.vhd", "1.vhd"]));
    } else {
        tarball(&built.dir, &tgz, None);
    }
    let mut seen: HashSet<Uuid> = built.uuids.iter().copied().collect();

    // Into an existing volume.
    let target = world.create(1, &format!("chain-{depth}"));
    world.ok(&["volume", "import", &target, text(&tgz)]);
    assert_clean(world, "import").await;
    let parents = verify_volume(world, &target, depth, &built.expected, &seen);
    seen.extend(parents);

    // vhd-tgz out, then into a new volume.
    let exported = dir.join("exported.tgz");
    world.ok(&[
        "volume",
        "export",
        &target,
        text(&exported),
        "--format",
        "vhd-tgz",
    ]);
    assert_clean(world, "export vhd-tgz").await;
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(&exported)
        .output()
        .unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let wanted: Vec<String> = (0..depth).map(|i| format!("{i}.vhd")).collect();
    assert_eq!(names, wanted, "the export is the whole chain, leaf first");
    let copy = world.ok(&["volume", "create", "--image", text(&exported)]);
    assert_clean(world, "re-import").await;
    let copy_id = copy["id"].as_str().unwrap();
    assert_eq!(copy["size_bytes"], GIB);
    verify_volume(world, copy_id, depth, &built.expected, &seen);

    // Every flat format equals the original content.
    for (format, driver) in [("raw", "raw"), ("qcow2", "qcow2"), ("vhd", "vpc")] {
        let out = dir.join(format!("out.{format}"));
        world.ok(&["volume", "export", &target, text(&out), "--format", format]);
        assert_clean(world, &format!("export {format}")).await;
        assert_same_image(
            &raw,
            &out,
            driver,
            &format!("depth {depth} exported as {format}"),
        );
        if format == "vhd" {
            let info = vhd::inspect(&out).unwrap();
            assert_eq!(
                info.disk_type,
                DiskType::Dynamic,
                "a vhd export is flattened"
            );
            assert_same_disk(&raw, &out, "flattened vhd");
        }
        std::fs::remove_file(&out).unwrap();
    }
    // The source volume is untouched by its exports.
    verify_volume(world, &target, depth, &built.expected, &HashSet::new());
}

#[tokio::test]
async fn chains_of_depth_2_and_5_round_trip_in_local_mode() {
    let world = World::start().await;
    chain_round_trip(&world, 2, 16 * MIB).await;
    chain_round_trip(&world, 5, 20 * MIB).await;
}

#[tokio::test]
async fn chains_of_depth_2_and_5_round_trip_in_remote_mode() {
    let world = World::start_with(remote()).await;
    chain_round_trip(&world, 2, 16 * MIB).await;
    chain_round_trip(&world, 5, 20 * MIB).await;
}

/// Every file of the volume's SR directory with its bytes.
fn sr_snapshot(world: &World, id: &str) -> BTreeMap<String, Vec<u8>> {
    let dir = world.vhd(id).parent().unwrap().to_path_buf();
    support::entries(&dir)
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

async fn broken_chains_are_refused(mode: &str) {
    let world = World::start_with(mode).await;
    let root = world.sim.dir.path().to_path_buf();
    // The target holds a 3-deep chain, so refusals must also leave its parents alone.
    let good = build_chain(&root.join("good"), 3, 16 * MIB, 16 * MIB);
    let good_tgz = root.join("good.tgz");
    tarball(&good.dir, &good_tgz, None);
    let target = world.create(1, "target");
    world.ok(&["volume", "import", &target, text(&good_tgz)]);
    verify_volume(&world, &target, 3, &good.expected, &HashSet::new());
    let before = sr_snapshot(&world, &target);
    let volumes = world.ok(&["volume", "list"]);
    let sr_dirs = world.sim.sr_dirs();

    let missing = build_chain(&root.join("missing"), 4, 16 * MIB, 16 * MIB);
    let missing_tgz = root.join("missing.tgz");
    tarball(
        &missing.dir,
        &missing_tgz,
        Some(&["0.vhd", "1.vhd", "3.vhd"]),
    );

    let wrong = build_chain(&root.join("wrong"), 3, 16 * MIB, 16 * MIB);
    let stranger = Uuid::new_v4();
    vhd::set_uuid(&wrong.files[1], stranger).unwrap();
    let wrong_tgz = root.join("wrong.tgz");
    tarball(&wrong.dir, &wrong_tgz, Some(&["0.vhd", "1.vhd", "2.vhd"]));

    // 0.vhd -> 1.vhd -> 2.vhd -> 0.vhd: the base becomes a child of the leaf.
    let looped = build_chain(&root.join("loop"), 3, 16 * MIB, 16 * MIB);
    vhd::make_child_of(&looped.files[2], &looped.files[0]).unwrap();
    let loop_tgz = root.join("loop.tgz");
    tarball(&looped.dir, &loop_tgz, Some(&["0.vhd", "1.vhd", "2.vhd"]));

    let cases: [(&Path, Vec<String>); 3] = [
        (
            &missing_tgz,
            vec!["gap in the chain".into(), "member 2.vhd is missing".into()],
        ),
        (
            &wrong_tgz,
            vec![
                "member 0.vhd".into(),
                "wrong parent".into(),
                wrong.uuids[1].to_string(),
                stranger.to_string(),
            ],
        ),
        (
            &loop_tgz,
            vec![
                "member 2.vhd".into(),
                "loop".into(),
                looped.uuids[0].to_string(),
            ],
        ),
    ];
    for (tgz, expected) in cases {
        for args in [
            vec!["volume", "import", &target, text(tgz)],
            vec!["volume", "create", "--image", text(tgz)],
        ] {
            let error = world.fails(&args);
            for needle in &expected {
                assert!(
                    error.contains(needle.as_str()),
                    "{args:?}: {needle:?} not in {error}"
                );
            }
            assert_clean(&world, &format!("refused {}", tgz.display())).await;
            assert_eq!(
                sr_snapshot(&world, &target),
                before,
                "{args:?}: the target's SR changed"
            );
            assert_eq!(
                world.ok(&["volume", "list"]),
                volumes,
                "{args:?}: volumes changed"
            );
            assert_eq!(
                world.sim.sr_dirs(),
                sr_dirs,
                "{args:?}: an SR directory appeared"
            );
        }
    }
    verify_volume(&world, &target, 3, &good.expected, &HashSet::new());
}

#[tokio::test]
async fn broken_chains_are_refused_without_a_trace_in_local_mode() {
    broken_chains_are_refused("").await;
}

#[tokio::test]
async fn broken_chains_are_refused_without_a_trace_in_remote_mode() {
    broken_chains_are_refused(remote()).await;
}
