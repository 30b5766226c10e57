//! Streaming raw data or a merged chain into a new dynamic VHD, allocating only blocks that
//! hold non-zero data. Work is done in whole 2 MiB blocks: one read and two writes per block.

use std::io::{self, Read};
use std::path::Path;

use uuid::Uuid;

use super::chain::{Chain, ChainReader};
use super::error::VhdError;
use super::util::is_zero;
use super::writer::NewImage;
use super::{BLOCK_SIZE, VhdInfo, checked_size};

/// Read until `buf` is full or the source ends; returns the bytes read.
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Stream `virtual_size` raw bytes from `src` into a new dynamic VHD at `dest` (created
/// exclusively, XenServer layout, size rounded up to 2 MiB). `progress(done, total)` is called
/// after each block; returning false cancels. On any error or cancellation `dest` is removed.
pub fn write_dynamic_from(
    src: &mut dyn Read,
    virtual_size: u64,
    dest: &Path,
    uuid: Uuid,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<VhdInfo, VhdError> {
    let size = checked_size(dest, virtual_size)?;
    let mut out = NewImage::create(dest, size, uuid, None)?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for index in 0..size / BLOCK_SIZE {
        let start = index * BLOCK_SIZE;
        let want = virtual_size.saturating_sub(start).min(BLOCK_SIZE) as usize;
        let got = read_full(src, &mut buf[..want])
            .map_err(|e| VhdError::io(dest, "reading the raw source", e))?;
        if got < want {
            return Err(VhdError::ShortSource {
                path: dest.to_path_buf(),
                got: start + got as u64,
                expected: virtual_size,
            });
        }
        buf[want..].fill(0);
        if !is_zero(&buf) {
            out.write_full_block(index, &buf)?;
        }
        if !progress(start + want as u64, virtual_size) {
            return Err(VhdError::Cancelled);
        }
    }
    out.finish()
}

/// Copy the merged view of the chain ending at `leaf` into one new dynamic VHD at `dest`
/// (what xapi's VDI.copy produces). `new_size` may only grow the disk.
pub fn copy_flattened(
    leaf: &Path,
    dest: &Path,
    uuid: Uuid,
    new_size: Option<u64>,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<VhdInfo, VhdError> {
    let chain = Chain::open(leaf)?;
    let src_size = chain.virtual_size();
    let size = match new_size {
        Some(n) if n < src_size => {
            return Err(VhdError::Shrink {
                path: leaf.to_path_buf(),
                current: src_size,
                requested: n,
            });
        }
        Some(n) => checked_size(dest, n)?,
        None => checked_size(dest, src_size)?,
    };
    let mut reader = ChainReader::new(chain);
    let mut out = NewImage::create(dest, size, uuid, None)?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for index in 0..src_size.div_ceil(BLOCK_SIZE) {
        let start = index * BLOCK_SIZE;
        let n = (src_size - start).min(BLOCK_SIZE) as usize;
        if reader.allocated(index) {
            reader.read_at(start, &mut buf[..n])?;
            buf[n..].fill(0);
            if !is_zero(&buf) {
                out.write_full_block(index, &buf)?;
            }
        }
        if !progress(start + n as u64, src_size) {
            return Err(VhdError::Cancelled);
        }
    }
    out.finish()
}

/// Buffers in flight between the reading and the writing thread of [`write_raw`].
const RAW_IN_FLIGHT: usize = 4;

/// Writes the merged content of the chain whose leaf is `leaf` into `out` as a sparse raw
/// disk: blocks no file holds stay holes. Reading and writing overlap (a second thread writes),
/// as qemu-img keeps several requests in flight. `progress(done, total)` is called per block;
/// returning false cancels. The caller owns `out` and removes it on error.
pub fn write_raw(
    leaf: &Path,
    out: &std::fs::File,
    out_path: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<(), VhdError> {
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc;
    let mut reader = ChainReader::open(leaf)?;
    let size = reader.virtual_size();
    let blocks = size.div_ceil(BLOCK_SIZE);
    let write_failed = |e| VhdError::io(out_path, "writing the raw disk", e);
    std::thread::scope(|s| {
        let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(RAW_IN_FLIGHT);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..RAW_IN_FLIGHT {
            let _ = free_tx.send(vec![0u8; BLOCK_SIZE as usize]);
        }
        let writer = s.spawn(move || -> io::Result<()> {
            for (offset, buffer) in full_rx {
                out.write_all_at(&buffer, offset)?;
                // The reader may have stopped already; the buffer is then simply dropped.
                let _ = free_tx.send(buffer);
            }
            Ok(())
        });
        let read = (|| {
            for block in 0..blocks {
                if !progress(block, blocks) {
                    return Err(VhdError::Cancelled);
                }
                if !reader.allocated(block) {
                    continue;
                }
                let offset = block * BLOCK_SIZE;
                let length = (size - offset).min(BLOCK_SIZE) as usize;
                // No buffer back means the writer stopped; its error is reported below.
                let Ok(mut buffer) = free_rx.recv() else {
                    return Ok(());
                };
                buffer.resize(length, 0);
                reader.read_at(offset, &mut buffer)?;
                if full_tx.send((offset, buffer)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the writing thread panicked")));
        read?;
        written.map_err(write_failed)
    })?;
    out.set_len(size).map_err(write_failed)?;
    progress(blocks, blocks);
    Ok(())
}
