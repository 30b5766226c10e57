//! Differencing chains and the merged reader.
//!
//! Parents are found only by the header's parent name, as a plain file name in the leaf's
//! directory: locators are ignored because they may carry absolute or `..` paths that would let
//! a tenant image read other files on the SR or the host (blktap follows them).

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::VhdError;
use super::footer::TYPE_DIFFERENCING;
use super::image::{Access, Image};
use super::util::read_at;
use super::{BLOCK_SIZE, DiskType, MAX_CHAIN_DEPTH, SECTOR_SIZE, VhdInfo};

/// A validated chain, leaf first. Holds the files open so that what was validated is what
/// gets read.
#[derive(Debug)]
pub struct Chain {
    files: Vec<(PathBuf, VhdInfo)>,
    images: Vec<Image>,
}

/// Accept only a plain file name: no directories, no `.`/`..`, no NUL.
pub(crate) fn validate_parent_name(child: &Path, name: &str) -> Result<(), VhdError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\', '\0'])
        || name.len() > 255;
    if bad {
        return Err(VhdError::chain(
            child,
            format!("header parent name {name:?} is not a plain file name in the same directory"),
        ));
    }
    Ok(())
}

fn file_id(img: &Image) -> Result<(u64, u64), VhdError> {
    let m = img
        .file
        .metadata()
        .map_err(|e| VhdError::io(&img.path, "stat of VHD", e))?;
    Ok((m.dev(), m.ino()))
}

impl Chain {
    /// Open `leaf` and every parent it names, validating each file and each link.
    pub fn open(leaf: &Path) -> Result<Chain, VhdError> {
        let dir = leaf.parent().unwrap_or(Path::new(""));
        let first = Image::open(leaf, Access::Read)?;
        let mut seen = HashSet::new();
        seen.insert(file_id(&first)?);
        let mut images = vec![first];
        while let Some(cur) = images.last() {
            if cur.footer.disk_type != TYPE_DIFFERENCING {
                break;
            }
            let Some(d) = cur.dynamic.as_ref() else { break };
            if d.header.parent_uuid == [0u8; 16] {
                return Err(VhdError::chain(
                    &cur.path,
                    "differencing disk has an all-zero parent UUID (blktap 'raw parent'), refused",
                ));
            }
            let name = d.parent_name.clone().unwrap_or_default();
            validate_parent_name(&cur.path, &name)?;
            if images.len() >= MAX_CHAIN_DEPTH {
                return Err(VhdError::chain(
                    leaf,
                    format!("chain is deeper than {MAX_CHAIN_DEPTH} files"),
                ));
            }
            let ppath = dir.join(&name);
            let parent = match Image::open(&ppath, Access::ReadNoFollow) {
                Ok(p) => p,
                Err(VhdError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Err(VhdError::chain(
                        &cur.path,
                        format!("parent {} not found", ppath.display()),
                    ));
                }
                Err(VhdError::Io { source, .. }) if source.raw_os_error() == Some(libc::ELOOP) => {
                    return Err(VhdError::chain(
                        &cur.path,
                        format!("parent {} is a symlink, refused", ppath.display()),
                    ));
                }
                Err(e) => return Err(e),
            };
            if !seen.insert(file_id(&parent)?) {
                return Err(VhdError::chain(
                    &cur.path,
                    format!("parent {} is already in the chain (loop)", ppath.display()),
                ));
            }
            if parent.footer.uuid != d.header.parent_uuid {
                return Err(VhdError::chain(
                    &cur.path,
                    format!(
                        "header parent UUID {} does not match the footer UUID {} of {}",
                        uuid::Uuid::from_bytes(d.header.parent_uuid),
                        uuid::Uuid::from_bytes(parent.footer.uuid),
                        ppath.display()
                    ),
                ));
            }
            if cur.virtual_size() < parent.virtual_size() {
                return Err(VhdError::chain(
                    &cur.path,
                    format!(
                        "virtual size {} is smaller than its parent's {} ({})",
                        cur.virtual_size(),
                        parent.virtual_size(),
                        ppath.display()
                    ),
                ));
            }
            images.push(parent);
        }
        let files = images.iter().map(|i| (i.path.clone(), i.info())).collect();
        Ok(Chain { files, images })
    }

    /// Leaf first, base last.
    pub fn files(&self) -> &[(PathBuf, VhdInfo)] {
        &self.files
    }

    /// The leaf's virtual size: the size of the merged view.
    pub fn virtual_size(&self) -> u64 {
        self.files.first().map_or(0, |f| f.1.virtual_size)
    }

    pub fn leaf(&self) -> &VhdInfo {
        &self.files[0].1
    }
}

struct Layer {
    img: Image,
    /// Block whose sector bitmap is in `bitmap`, if any.
    cached: Option<u64>,
    bitmap: Vec<u8>,
    /// Block-sized buffer for partially present blocks, allocated on first use.
    scratch: Vec<u8>,
}

/// Merged raw view of a chain: each sector comes from the nearest file whose sector bitmap
/// has it, zeros where no file holds data and past each file's own virtual size.
pub struct ChainReader {
    layers: Vec<Layer>,
    files: Vec<(PathBuf, VhdInfo)>,
    size: u64,
    pos: u64,
}

impl std::fmt::Debug for ChainReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainReader")
            .field("files", &self.files)
            .field("pos", &self.pos)
            .finish()
    }
}

impl ChainReader {
    pub fn new(chain: Chain) -> ChainReader {
        let size = chain.virtual_size();
        let layers = chain
            .images
            .into_iter()
            .map(|img| {
                let bm = img.dynamic.as_ref().map_or(0, |d| d.bitmap_size as usize);
                Layer {
                    img,
                    cached: None,
                    bitmap: vec![0; bm],
                    scratch: Vec::new(),
                }
            })
            .collect();
        ChainReader {
            layers,
            files: chain.files,
            size,
            pos: 0,
        }
    }

    /// Open the chain of `leaf` and a reader over it.
    pub fn open(leaf: &Path) -> Result<ChainReader, VhdError> {
        Ok(ChainReader::new(Chain::open(leaf)?))
    }

    pub fn files(&self) -> &[(PathBuf, VhdInfo)] {
        &self.files
    }

    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// Fill `buf` with the merged view at `offset`. Reading past the virtual size is an
    /// error.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            let leaf = self.files[0].0.clone();
            return Err(VhdError::argument(
                &leaf,
                format!(
                    "read of {} bytes at {offset} goes past the virtual size {}",
                    buf.len(),
                    self.size
                ),
            ));
        }
        fill(&mut self.layers, offset, buf)
    }

    /// Whether any file in the chain holds data for the 2 MiB block `block_index` of the
    /// merged view; false means the block reads as zeros.
    pub fn allocated(&self, block_index: u64) -> bool {
        let Some(start) = block_index.checked_mul(BLOCK_SIZE) else {
            return false;
        };
        for layer in &self.layers {
            let size = layer.img.virtual_size();
            if start >= size {
                continue;
            }
            let end = start.saturating_add(BLOCK_SIZE).min(size);
            let Some(d) = &layer.img.dynamic else {
                return true;
            };
            let first = start / d.block_size;
            let last = (end - 1) / d.block_size;
            if (first..=last).any(|b| d.block_offset(b).is_some()) {
                return true;
            }
        }
        false
    }
}

/// Sector-bitmap test, MSB first.
fn bit(map: &[u8], sector: u64) -> bool {
    map.get((sector / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

/// Fill `buf` from the first layer, deferring to the rest for what it does not hold.
fn fill(layers: &mut [Layer], offset: u64, buf: &mut [u8]) -> Result<(), VhdError> {
    let Some((layer, parents)) = layers.split_first_mut() else {
        buf.fill(0);
        return Ok(());
    };
    let size = layer.img.virtual_size();
    let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(inside);
    tail.fill(0);
    if head.is_empty() {
        return Ok(());
    }
    let Some(d) = layer.img.dynamic.as_ref() else {
        return read_at(
            &layer.img.file,
            &layer.img.path,
            head,
            offset,
            "fixed disk data",
        );
    };
    let diff = layer.img.disk_type() == DiskType::Differencing;
    let bs = d.block_size;
    let mut done = 0usize;
    while done < head.len() {
        let off = offset + done as u64;
        let blk = off / bs;
        let within = off % bs;
        let n = (bs - within).min((head.len() - done) as u64) as usize;
        let piece = &mut head[done..done + n];
        done += n;

        let Some(block_at) = d.block_offset(blk) else {
            if diff {
                fill(parents, off, piece)?;
            } else {
                piece.fill(0);
            }
            continue;
        };
        if layer.cached != Some(blk) {
            layer.cached = None;
            read_at(
                &layer.img.file,
                &layer.img.path,
                &mut layer.bitmap,
                block_at,
                "block bitmap",
            )?;
            layer.cached = Some(blk);
        }
        let map = &layer.bitmap;
        let first = within / SECTOR_SIZE;
        let last = (within + n as u64 - 1) / SECTOR_SIZE;
        let set = (first..=last).filter(|&s| bit(map, s)).count() as u64;
        let data_at = block_at + d.bitmap_size + within;
        if set == last - first + 1 {
            read_at(
                &layer.img.file,
                &layer.img.path,
                piece,
                data_at,
                "block data",
            )?;
            continue;
        }
        // Parent (or zeros) for the whole piece, then this file's sectors on top: a fixed
        // number of reads per block whatever pattern a hostile bitmap has.
        if diff {
            fill(parents, off, piece)?;
        } else {
            piece.fill(0);
        }
        if set == 0 {
            continue;
        }
        if layer.scratch.len() < n {
            layer.scratch.resize(n, 0);
        }
        let scratch = &mut layer.scratch[..n];
        read_at(
            &layer.img.file,
            &layer.img.path,
            scratch,
            data_at,
            "block data",
        )?;
        let mut s = first;
        while s <= last {
            if !bit(map, s) {
                s += 1;
                continue;
            }
            let run_start = s;
            while s <= last && bit(map, s) {
                s += 1;
            }
            let from = ((run_start * SECTOR_SIZE).max(within) - within) as usize;
            let to = ((s * SECTOR_SIZE).min(within + n as u64) - within) as usize;
            piece[from..to].copy_from_slice(&scratch[from..to]);
        }
    }
    Ok(())
}

impl Read for ChainReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (self.size - self.pos).min(buf.len() as u64) as usize;
        self.read_at(self.pos, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ChainReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}
