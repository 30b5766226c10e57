//! blktap's batmap: a one-sector header after the BAT and a bitmap with one bit per BAT
//! entry, set when the block is fully written. Readers here never rely on it (qemu's vpc driver
//! ignores and may overwrite it); writers emit it because `vhd-util check` requires it for
//! creator "tap" >= 1.2, and `check()` validates it.

use super::util::{array, get_u32, get_u64, ones_complement_sum, put_u32, put_u64};

pub(crate) const BATMAP_COOKIE: [u8; 8] = *b"tdbatmap";
pub(crate) const BATMAP_VERSION_1_1: u32 = 0x0001_0001;
pub(crate) const BATMAP_VERSION: u32 = 0x0001_0002;
pub(crate) const BATMAP_HEADER_SIZE: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BatmapHeader {
    pub cookie: [u8; 8],
    pub offset: u64,
    /// Map size in sectors.
    pub size: u32,
    pub version: u32,
    pub checksum: u32,
}

impl BatmapHeader {
    pub(crate) fn parse(b: &[u8; BATMAP_HEADER_SIZE]) -> BatmapHeader {
        BatmapHeader {
            cookie: array(b, 0),
            offset: get_u64(b, 8),
            size: get_u32(b, 16),
            version: get_u32(b, 20),
            checksum: get_u32(b, 24),
        }
    }

    /// Encoded sector; marker, key hash and the rest stay zero (no encryption).
    pub(crate) fn encode(&self) -> [u8; BATMAP_HEADER_SIZE] {
        let mut b = [0u8; BATMAP_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        put_u64(&mut b, 8, self.offset);
        put_u32(&mut b, 16, self.size);
        put_u32(&mut b, 20, self.version);
        put_u32(&mut b, 24, self.checksum);
        b
    }
}

/// Map size in sectors for `entries` BAT entries (never zero).
pub(crate) fn map_sectors(entries: u32) -> u32 {
    u32::try_from(u64::from(entries).div_ceil(8).div_ceil(512).max(1)).unwrap_or(u32::MAX)
}

/// Number of map bytes the checksum covers. libvhd derives it from the current size (one
/// byte per 16 MiB, rounded to whole sectors, at least one), not from the header's size.
pub(crate) fn checksum_bytes(current_size: u64) -> u64 {
    (current_size >> 24).div_ceil(512).max(1) * 512
}

pub(crate) fn map_checksum(map: &[u8], version: u32) -> u32 {
    if version == BATMAP_VERSION_1_1 {
        // Version 1.1 summed signed chars.
        !map.iter()
            .fold(0u32, |acc, &b| acc.wrapping_add(i32::from(b as i8) as u32))
    } else {
        ones_complement_sum(map)
    }
}

pub(crate) fn test_bit(map: &[u8], index: u64) -> bool {
    usize::try_from(index / 8)
        .ok()
        .and_then(|i| map.get(i))
        .is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

pub(crate) fn set_bit(map: &mut [u8], index: u64) {
    if let Some(b) = usize::try_from(index / 8).ok().and_then(|i| map.get_mut(i)) {
        *b |= 0x80 >> (index % 8);
    }
}
