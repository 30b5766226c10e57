//! Writes a 3-deep VHD chain the way the agent leaves one on the share, for independent
//! readers to check (tests/python/test_libvhdi.py):
//!
//! ```sh
//! cargo run --quiet --example write_chain -- DIR
//! ```
//!
//! Layers are built with the library's writer (`vhd::write_dynamic_from`,
//! `vhd::make_child_of`), given partial sector bitmaps by hand, exported with
//! `image::tgz::export_tgz` and imported again with `image::tgz::import_tgz`: the files in
//! `DIR/chain/` are what an import produces (fresh `<uuid>.vhd` names, rewritten parent
//! links and locators, hidden parents). Also written:
//!
//! * `DIR/expected-K.raw`: the disk seen through file K of the chain (0 the leaf) and its
//!   parents, from a model of the layers (not from our reader);
//! * `DIR/chain.json`: the files leaf first, with uuid, parent uuid, disk type, virtual size
//!   and expected content.
//!
//! Every sector bitmap byte is 0x00 or 0xFF (the layers differ in 4 KiB units): libvhdi
//! reads a partially set bitmap byte wrongly (see the Python test), and the data under clear
//! bits of the differencing layers is garbage (0xEE), so a reader that ignored bitmaps fails.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use xenapinfs::image::tgz::{TgzLimits, export_tgz, import_tgz};
use xenapinfs::vhd::{self, BLOCK_SIZE};

const MIB: u64 = 1 << 20;
const SECTORS: usize = (BLOCK_SIZE / 512) as usize;

/// A layer's blocks: per block, which sectors it holds and the bytes stored in the file.
struct Layer {
    size: u64,
    blocks: BTreeMap<u64, (Vec<bool>, Vec<u8>)>,
}

/// Block `index` of level `level`: data where `present(page)` for the 4 KiB page, `filler`
/// elsewhere; `zero` stores zeros as the data (a child erasing its parent's bytes).
fn block(
    level: usize,
    index: u64,
    filler: u8,
    zero: bool,
    present: impl Fn(usize) -> bool,
) -> (Vec<bool>, Vec<u8>) {
    let present: Vec<bool> = (0..SECTORS).map(|s| present(s / 8)).collect();
    let stored = (0..BLOCK_SIZE as usize)
        .map(|i| {
            let sector = i / 512;
            if !present[sector] {
                filler
            } else if zero {
                0
            } else {
                let disk_sector = index as usize * SECTORS + sector;
                ((level * 41 + disk_sector * 13 + i % 512) % 251) as u8 + 1
            }
        })
        .collect();
    (present, stored)
}

/// Base: six full blocks and one with holes. Middle: overwrites a block, shadows parts of
/// another, zeros a third. Leaf (larger than its parents): overwrites, shadows, zeros pages of
/// a base block, writes where nothing was, and writes past its parents' end.
fn layers() -> Vec<Layer> {
    let size = 16 * MIB;
    let mut base = BTreeMap::new();
    for b in 0..6 {
        base.insert(b, block(0, b, 0, false, |_| true));
    }
    base.insert(6, block(0, 6, 0, false, |p| p % 3 != 1));
    let mut middle = BTreeMap::new();
    middle.insert(1, block(1, 1, 0xEE, false, |_| true));
    middle.insert(3, block(1, 3, 0xEE, false, |p| p % 2 == 0));
    middle.insert(5, block(1, 5, 0xEE, true, |_| true));
    middle.insert(6, block(1, 6, 0xEE, false, |p| p % 3 == 1 && p % 2 == 0));
    let mut leaf = BTreeMap::new();
    leaf.insert(2, block(2, 2, 0xEE, false, |_| true));
    leaf.insert(3, block(2, 3, 0xEE, false, |p| p % 4 == 1));
    leaf.insert(0, block(2, 0, 0xEE, true, |p| p % 5 == 0));
    leaf.insert(7, block(2, 7, 0xEE, false, |p| p % 2 == 1));
    leaf.insert(8, block(2, 8, 0xEE, false, |_| true));
    vec![
        Layer {
            size: size + 4 * MIB,
            blocks: leaf,
        },
        Layer {
            size,
            blocks: middle,
        },
        Layer { size, blocks: base },
    ]
}

/// The disk seen through `layers[0]` and the ones after it.
fn merged(layers: &[Layer]) -> Vec<u8> {
    let size = layers[0].size;
    let mut disk = vec![0u8; size as usize];
    for s in 0..(size / 512) as usize {
        let (b, within) = ((s / SECTORS) as u64, s % SECTORS);
        let found = layers.iter().find_map(|l| {
            let (present, stored) = l.blocks.get(&b).filter(|_| (s as u64) * 512 < l.size)?;
            present[within].then(|| &stored[within * 512..(within + 1) * 512])
        });
        if let Some(bytes) = found {
            disk[s * 512..(s + 1) * 512].copy_from_slice(bytes);
        }
    }
    disk
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Writes the layer's bitmaps and bytes over the blocks the writer allocated, and keeps the
/// batmap ("block fully written") true: partial blocks lose their bit, the checksum follows.
fn patch(path: &Path, layer: &Layer) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut footer = [0u8; 512];
    file.read_exact_at(&mut footer, 0)?;
    let mut header = [0u8; 1024];
    file.read_exact_at(&mut header, be64(&footer, 16))?;
    let table = be64(&header, 16);
    let entries = be32(&header, 28) as usize;
    let mut bat = vec![0u8; entries * 4];
    file.read_exact_at(&mut bat, table)?;
    let batmap = table + (entries as u64 * 4).next_multiple_of(512);
    let mut batmap_header = [0u8; 512];
    file.read_exact_at(&mut batmap_header, batmap)?;
    assert_eq!(&batmap_header[..8], b"tdbatmap");
    let map_at = be64(&batmap_header, 8);
    let mut map = vec![0u8; ((layer.size >> 24).div_ceil(512).max(1) * 512) as usize];
    file.read_exact_at(&mut map, map_at)?;
    for (&index, (present, stored)) in &layer.blocks {
        let at = u64::from(be32(&bat, index as usize * 4)) * 512;
        let mut bitmap = [0u8; 512];
        for (s, _) in present.iter().enumerate().filter(|(_, p)| **p) {
            bitmap[s / 8] |= 0x80 >> (s % 8);
        }
        assert!(bitmap.iter().all(|&b| b == 0 || b == 0xFF));
        file.write_all_at(&bitmap, at)?;
        file.write_all_at(stored, at + 512)?;
        if present.iter().any(|p| !p) {
            map[index as usize / 8] &= !(0x80 >> (index % 8));
        }
    }
    file.write_all_at(&map, map_at)?;
    let sum = map.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    file.write_all_at(&(!sum).to_be_bytes(), batmap + 24)?;
    file.sync_all()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: write_chain DIR")?);
    let work = dir.join("layers");
    let out = dir.join("chain");
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&out)?;
    let layers = layers();
    let files: Vec<PathBuf> = (0..layers.len())
        .map(|i| work.join(format!("{i}.vhd")))
        .collect();
    for i in (0..layers.len()).rev() {
        let layer = &layers[i];
        let mut raw = vec![0u8; layer.size as usize];
        for &b in layer.blocks.keys() {
            raw[(b * BLOCK_SIZE) as usize..((b + 1) * BLOCK_SIZE) as usize].fill(0x5A);
        }
        vhd::write_dynamic_from(
            &mut &raw[..],
            layer.size,
            &files[i],
            Uuid::new_v4(),
            &mut |_, _| true,
        )?;
        if i + 1 < layers.len() {
            vhd::make_child_of(&files[i], &files[i + 1])?;
        }
        patch(&files[i], layer)?;
    }

    // Through the library's exporter and importer, as a volume export and import would do.
    let mut tgz = Vec::new();
    export_tgz(&files, &mut tgz, 2, &mut |_| true)?;
    std::fs::write(dir.join("chain.tgz"), &tgz)?;
    let leaf_uuid = Uuid::new_v4();
    let imported = import_tgz(
        &mut &tgz[..],
        &out,
        leaf_uuid,
        &TgzLimits::new(64 * MIB),
        &mut |_| true,
    )?;

    let mut entries = Vec::new();
    for (k, (path, info)) in imported.files.iter().enumerate() {
        let expected = format!("expected-{k}.raw");
        std::fs::write(dir.join(&expected), merged(&layers[k..]))?;
        entries.push(serde_json::json!({
            "name": path.file_name().unwrap().to_string_lossy(),
            "uuid": info.uuid.to_string(),
            "parent_uuid": info.parent.as_ref().map(|p| p.uuid.to_string()),
            "parent_name": info.parent.as_ref().map(|p| p.name.clone()),
            "disk_type": match info.disk_type {
                vhd::DiskType::Fixed => 2,
                vhd::DiskType::Dynamic => 3,
                vhd::DiskType::Differencing => 4,
            },
            "hidden": info.hidden,
            "virtual_size": info.virtual_size,
            "expected": expected,
        }));
    }
    let manifest = serde_json::json!({ "dir": "chain", "files": entries });
    std::fs::write(
        dir.join("chain.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    println!("{}", dir.join("chain.json").display());
    Ok(())
}
