//! The 1024-byte dynamic disk header and its parent locator table.

use std::path::Path;

use super::error::VhdError;
use super::util::{
    array, decode_utf16be, encode_utf16be, get_u32, get_u64, ones_complement_sum, put_u32, put_u64,
};

pub(crate) const HEADER_SIZE: usize = 1024;
pub(crate) const COOKIE: [u8; 8] = *b"cxsparse";
pub(crate) const HEADER_VERSION: u32 = 0x0001_0000;
const OFF_CHECKSUM: usize = 36;
pub(crate) const PARENT_NAME_BYTES: usize = 512;
pub(crate) const LOCATOR_COUNT: usize = 8;

pub(crate) const PLAT_NONE: u32 = 0;
pub(crate) const PLAT_WI2R: u32 = 0x5769_3272;
pub(crate) const PLAT_WI2K: u32 = 0x5769_326B;
pub(crate) const PLAT_W2RU: u32 = 0x5732_7275;
pub(crate) const PLAT_W2KU: u32 = 0x5732_6B75;
pub(crate) const PLAT_MAC: u32 = 0x4D61_6320;
pub(crate) const PLAT_MACX: u32 = 0x4D61_6358;

pub(crate) fn platform_name(code: u32) -> String {
    match code {
        PLAT_NONE => "none".into(),
        _ => {
            let b = code.to_be_bytes();
            if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
                String::from_utf8_lossy(&b).trim_end().to_string()
            } else {
                format!("{code:#010x}")
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Locator {
    pub code: u32,
    pub data_space: u32,
    pub data_len: u32,
    pub reserved: u32,
    pub data_offset: u64,
}

impl Locator {
    fn parse(b: &[u8]) -> Locator {
        Locator {
            code: get_u32(b, 0),
            data_space: get_u32(b, 4),
            data_len: get_u32(b, 8),
            reserved: get_u32(b, 12),
            data_offset: get_u64(b, 16),
        }
    }

    fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.code);
        put_u32(b, 4, self.data_space);
        put_u32(b, 8, self.data_len);
        put_u32(b, 12, self.reserved);
        put_u64(b, 16, self.data_offset);
    }

    pub(crate) fn is_all_zero(&self) -> bool {
        *self == Locator::default()
    }

    /// Size in bytes of the data area. The specification says sectors, Windows and blktap
    /// write bytes; like libvhd, values below 512 are sectors, multiples of 512 are bytes and
    /// anything else is unusable.
    pub(crate) fn space_bytes(&self) -> Option<u64> {
        let s = u64::from(self.data_space);
        if s == 0 {
            None
        } else if s < 512 {
            Some(s * 512)
        } else if s % 512 == 0 {
            Some(s)
        } else {
            None
        }
    }

    pub(crate) fn known_code(&self) -> bool {
        matches!(
            self.code,
            PLAT_NONE | PLAT_WI2R | PLAT_WI2K | PLAT_W2RU | PLAT_W2KU | PLAT_MAC | PLAT_MACX
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub cookie: [u8; 8],
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_entries: u32,
    pub block_size: u32,
    pub checksum: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    pub reserved1: u32,
    pub parent_name: [u8; PARENT_NAME_BYTES],
    pub locators: [Locator; LOCATOR_COUNT],
    pub reserved2: [u8; 256],
}

impl Header {
    /// A fresh header with XenServer's defaults (BAT right after footer copy + header).
    pub(crate) fn new(table_offset: u64, max_entries: u32, block_size: u32) -> Header {
        Header {
            cookie: COOKIE,
            data_offset: u64::MAX,
            table_offset,
            version: HEADER_VERSION,
            max_entries,
            block_size,
            checksum: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            reserved1: 0,
            parent_name: [0; PARENT_NAME_BYTES],
            locators: [Locator::default(); LOCATOR_COUNT],
            reserved2: [0; 256],
        }
    }

    pub(crate) fn parse(b: &[u8; HEADER_SIZE]) -> Header {
        let mut locators = [Locator::default(); LOCATOR_COUNT];
        for (i, l) in locators.iter_mut().enumerate() {
            let off = 576 + i * 24;
            *l = Locator::parse(&b[off..off + 24]);
        }
        Header {
            cookie: array(b, 0),
            data_offset: get_u64(b, 8),
            table_offset: get_u64(b, 16),
            version: get_u32(b, 24),
            max_entries: get_u32(b, 28),
            block_size: get_u32(b, 32),
            checksum: get_u32(b, OFF_CHECKSUM),
            parent_uuid: array(b, 40),
            parent_timestamp: get_u32(b, 56),
            reserved1: get_u32(b, 60),
            parent_name: array(b, 64),
            locators,
            reserved2: array(b, 768),
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        put_u64(&mut b, 8, self.data_offset);
        put_u64(&mut b, 16, self.table_offset);
        put_u32(&mut b, 24, self.version);
        put_u32(&mut b, 28, self.max_entries);
        put_u32(&mut b, 32, self.block_size);
        put_u32(&mut b, OFF_CHECKSUM, self.checksum);
        b[40..56].copy_from_slice(&self.parent_uuid);
        put_u32(&mut b, 56, self.parent_timestamp);
        put_u32(&mut b, 60, self.reserved1);
        b[64..576].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            let off = 576 + i * 24;
            l.encode(&mut b[off..off + 24]);
        }
        b[768..].copy_from_slice(&self.reserved2);
        b
    }

    pub(crate) fn computed_checksum(&self) -> u32 {
        let mut b = self.encode();
        put_u32(&mut b, OFF_CHECKSUM, 0);
        ones_complement_sum(&b)
    }

    pub(crate) fn seal(&mut self) {
        self.checksum = self.computed_checksum();
    }

    /// The parent name, or None when it is not valid UTF-16.
    pub(crate) fn parent_name(&self) -> Option<String> {
        decode_utf16be(&self.parent_name)
    }

    /// Store `name` as UTF-16BE; fails when it does not fit the 512-byte field.
    pub(crate) fn set_parent_name(&mut self, path: &Path, name: &str) -> Result<(), VhdError> {
        let enc = encode_utf16be(name);
        if enc.len() > PARENT_NAME_BYTES {
            return Err(VhdError::argument(
                path,
                format!(
                    "parent name {name:?} needs {} bytes in UTF-16, the header holds {PARENT_NAME_BYTES}",
                    enc.len()
                ),
            ));
        }
        self.parent_name = [0; PARENT_NAME_BYTES];
        self.parent_name[..enc.len()].copy_from_slice(&enc);
        Ok(())
    }

    /// Structural rules of the header itself (cookie, checksum, version, fixed fields).
    pub(crate) fn validate(&self, path: &Path) -> Result<(), VhdError> {
        if self.cookie != COOKIE {
            return Err(VhdError::invalid(
                path,
                format!(
                    "dynamic header: bad cookie {:?} (expected \"cxsparse\")",
                    String::from_utf8_lossy(&self.cookie)
                ),
            ));
        }
        let computed = self.computed_checksum();
        if computed != self.checksum {
            return Err(VhdError::invalid(
                path,
                format!(
                    "dynamic header checksum mismatch (stored {:#010x}, computed {computed:#010x})",
                    self.checksum
                ),
            ));
        }
        if self.version != HEADER_VERSION {
            return Err(VhdError::invalid(
                path,
                format!(
                    "dynamic header: version {:#010x} (expected 0x00010000)",
                    self.version
                ),
            ));
        }
        if self.data_offset != u64::MAX {
            return Err(VhdError::invalid(
                path,
                format!(
                    "dynamic header: data offset {:#x} (must be all ones)",
                    self.data_offset
                ),
            ));
        }
        Ok(())
    }
}
