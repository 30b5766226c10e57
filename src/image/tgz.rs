//! XenServer's "vhd tgz" image format: a gzipped tar of a VHD chain, `0.vhd` the leaf, `1.vhd`
//! its parent, and so on down to the base.
//!
//! [`import_tgz`] treats the tarball as hostile input. It never unpacks through the tar crate
//! and never seeks; it reads the stream once and refuses, naming the member and the rule:
//!
//! * anything but regular files (links, devices, FIFOs, directories other than a leading
//!   `./`, contiguous and sparse files, GNU long link names), absolute paths, `..`, any `/`
//!   past a leading `./`, NUL and control characters, names over 255 bytes;
//! * names other than `N.vhd` (decimal, no leading zero), the legacy `snap.vhd`, `image.vhd`,
//!   `base.vhd` (renamed to 0, 1, 2 in that order for those present, as Nova did) or a single
//!   other `*.vhd` (taken as `0.vhd` only when it is the only member); `swap.vhd` and non-VHD
//!   files; duplicates, also after the legacy renaming; gaps; more than `max_members`; no
//!   member at all;
//! * a member larger than [`max_vhd_file_size`] of `max_virtual_size` (checked on the tar
//!   header, before its data is inflated), more than 1 MiB of tar headers, long names and PAX
//!   records before a member (the tar crate would buffer a PAX record of any size), more than
//!   1 MiB of zero padding after the end-of-archive marker, data after it, a missing end
//!   marker, a truncated or corrupt gzip or tar stream;
//! * a VHD that fails [`crate::vhd::inspect`] or [`crate::vhd::check`] (run on each member as
//!   soon as it is complete; on a differencing disk once its parent is there too), whose
//!   block size is not 2 MiB, whose virtual size is over `max_virtual_size`, or whose file is
//!   larger than a VHD of its virtual size can be;
//! * on the uuids found in the archive: a member followed by another that is not a
//!   differencing disk, a parent uuid that is not the next member's uuid, an all-zero parent
//!   uuid (blktap's "raw parent"), a child smaller than its parent, a base that is
//!   differencing, the same uuid twice (loops), a hidden leaf.
//!
//! Then every file gets a fresh `<uuid>.vhd` name and uuid, XenServer's parent name and
//! locators, hidden flags (parents hidden, leaf not), and the chain is opened and checked
//! again from its new names.
//!
//! [`export_tgz`] writes the chain as `0.vhd` .. `N.vhd` in ONE gzip member whose deflate
//! stream is compressed in chunks by worker threads (as pigz does: each chunk ends on a byte
//! boundary with a sync flush and is primed with the previous chunk's last 32 KiB), because
//! Python's tarfile in stream mode (`r|gz`) stops after the first member of a multi-member gzip.

mod export;
mod import;

#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::ImageError;
use crate::vhd::{BLOCK_SIZE, MAX_CHAIN_DEPTH, VhdInfo};

/// What an imported tarball may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TgzLimits {
    /// Largest virtual size of any VHD in the chain (the leaf's is the volume's size).
    pub max_virtual_size: u64,
    /// Most VHD members (the chain depth); SM's limit is [`MAX_CHAIN_DEPTH`].
    pub max_members: usize,
}

impl TgzLimits {
    /// Limits for a volume of at most `max_virtual_size` bytes and SM's chain depth.
    pub fn new(max_virtual_size: u64) -> TgzLimits {
        TgzLimits {
            max_virtual_size,
            max_members: MAX_CHAIN_DEPTH,
        }
    }
}

/// The result of a successful import: every file is inside the staging directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedChain {
    /// `<staging>/<leaf_uuid>.vhd`.
    pub leaf: PathBuf,
    /// Leaf first, base last; each `<staging>/<uuid>.vhd` with its final metadata.
    pub files: Vec<(PathBuf, VhdInfo)>,
    /// The leaf's virtual size.
    pub virtual_size: u64,
}

/// Largest file a VHD of `virtual_size` bytes may be: the data itself, per 2 MiB block one
/// sector bitmap plus XenServer's padding to a 4 KiB data boundary, and a fixed allowance for
/// the footers, the header, the largest BAT [`crate::vhd::inspect`] accepts (8 MiB), the
/// batmap and the parent locators.
pub fn max_vhd_file_size(virtual_size: u64) -> u64 {
    const PER_BLOCK: u64 = 4096;
    const FIXED: u64 = 16 << 20;
    virtual_size
        .saturating_add(virtual_size.div_ceil(BLOCK_SIZE).saturating_mul(PER_BLOCK))
        .saturating_add(FIXED)
}

/// Streams a vhd-tgz from `src` (one pass, never seeking) into `staging`, an empty directory
/// the caller made inside the SR directory, validating as it goes; then renames every file to
/// a fresh `<uuid>.vhd` (the leaf takes `leaf_uuid`), rewrites uuids and parent links, marks
/// the parents hidden and the leaf not hidden, and checks the final chain.
///
/// `progress(compressed_bytes_read)` is called as the import goes; returning false cancels
/// with [`ImageError::Cancelled`]. On any error the caller removes `staging`.
pub fn import_tgz(
    src: &mut dyn Read,
    staging: &Path,
    leaf_uuid: Uuid,
    limits: &TgzLimits,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<ImportedChain, ImageError> {
    import::run(src, staging, leaf_uuid, limits, progress)
}

/// Writes the chain (`chain[0]` the leaf, each next file its parent) as a vhd-tgz to `out`:
/// members `0.vhd` .. `N.vhd`, regular files with mode 0644, gzip-compressed by `threads`
/// workers into a single gzip member. Returns the compressed bytes written. `progress(uncompressed
/// bytes done)` is called as it goes; returning false cancels with [`ImageError::Cancelled`].
pub fn export_tgz(
    chain: &[PathBuf],
    out: &mut dyn Write,
    threads: usize,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<u64, ImageError> {
    export::run(chain, out, threads, progress)
}
