//! VHD images as XenServer's blktap writes and checks them.
//!
//! Everything read from an image is treated as hostile tenant input: [`inspect`] validates the
//! structure of one file (footers, header, BAT bounds and overlaps, parent locators) before any
//! reader touches data, [`Chain::open`] resolves parents only by plain file name in the same
//! directory and verifies UUID links, and [`check`] adds the remaining `vhd-util check` rules.
//! Writers produce XenServer's exact layout (creator "tap" 1.3, BAT at 1536, batmap after the
//! BAT, 4 KiB-aligned block data) so the files pass `vhd-util check` and can be resized by SM.

mod batmap;
mod chain;
mod check;
mod copy;
mod error;
mod footer;
mod header;
mod image;
mod modify;
mod util;
mod writer;

#[cfg(test)]
mod tests;

use std::path::Path;

use uuid::Uuid;

pub use chain::{Chain, ChainReader};
pub use check::check;
pub use copy::{copy_flattened, write_dynamic_from, write_raw};
pub use error::VhdError;
pub use modify::{grow, make_child_of, set_hidden, set_parent, set_uuid};

use image::{Access, Image};
use writer::NewImage;

pub const SECTOR_SIZE: u64 = 512;
/// The block size XenServer uses for every dynamic and differencing VHD.
pub const BLOCK_SIZE: u64 = 2 * 1024 * 1024;
/// SM's `MAX_VHD_SIZE` (and qemu's limit).
pub const MAX_VIRTUAL_SIZE: u64 = 2040 * 1024 * 1024 * 1024;
/// SM's `MAX_CHAIN_SIZE`: files in a chain, leaf included.
pub const MAX_CHAIN_DEPTH: usize = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl std::fmt::Display for DiskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        })
    }
}

/// The parent reference stored in a differencing header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLink {
    /// Must equal the parent's footer UUID.
    pub uuid: Uuid,
    /// Header parent unicode name (a basename for XenServer-written files).
    pub name: String,
}

/// What [`inspect`] learns about one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhdInfo {
    /// Footer unique id.
    pub uuid: Uuid,
    pub disk_type: DiskType,
    /// Footer current size in bytes.
    pub virtual_size: u64,
    pub parent: Option<ParentLink>,
    /// blktap's hidden flag (footer byte 85).
    pub hidden: bool,
    pub file_size: u64,
    /// Allocated BAT entries covering the virtual size (for fixed disks: every 2 MiB block).
    pub allocated_blocks: u64,
    /// Header block size (2 MiB for fixed disks, by convention).
    pub block_size: u64,
    /// Creator application, NULs and trailing spaces trimmed: "tap", "qemu", "win", ...
    pub creator: String,
    /// Creator version, major << 16 | minor (blktap 1.3 = 0x00010003).
    pub creator_version: u32,
}

/// Round a requested size the way SM does: at least 2 MiB, up to a multiple of 2 MiB.
/// Saturates instead of overflowing; callers compare against [`MAX_VIRTUAL_SIZE`].
pub fn round_up_size(bytes: u64) -> u64 {
    let b = bytes.max(BLOCK_SIZE);
    match b.checked_next_multiple_of(BLOCK_SIZE) {
        Some(v) => v,
        None => u64::MAX - (u64::MAX % BLOCK_SIZE),
    }
}

/// Parse and structurally validate one VHD file (footer, backup footer, header, BAT bounds
/// and overlaps, parent locator bounds). Does not look at parents or the batmap.
pub fn inspect(path: &Path) -> Result<VhdInfo, VhdError> {
    Ok(Image::open(path, Access::Read)?.info())
}

/// Create an empty dynamic VHD exactly as XenServer lays it out. `virtual_size` is rounded up
/// to 2 MiB. Fails if `path` exists.
pub fn create_dynamic(path: &Path, virtual_size: u64, uuid: Uuid) -> Result<VhdInfo, VhdError> {
    let size = checked_size(path, virtual_size)?;
    NewImage::create(path, size, uuid, None)?.finish()
}

/// Validate and round a requested virtual size.
pub(crate) fn checked_size(path: &Path, virtual_size: u64) -> Result<u64, VhdError> {
    let size = round_up_size(virtual_size);
    if size > MAX_VIRTUAL_SIZE {
        return Err(VhdError::argument(
            path,
            format!("virtual size {virtual_size} exceeds the maximum {MAX_VIRTUAL_SIZE}"),
        ));
    }
    Ok(size)
}
