//! The 512-byte hard disk footer (at EOF for every type, copied at offset 0 for dynamic and
//! differencing disks).

use std::path::Path;

use super::MAX_VIRTUAL_SIZE;
use super::error::VhdError;
use super::util::{array, get_u32, get_u64, ones_complement_sum, put_u32, put_u64};

pub(crate) const FOOTER_SIZE: usize = 512;
pub(crate) const COOKIE: [u8; 8] = *b"conectix";
/// blktap marks a disabled VHD with this cookie.
pub(crate) const POISON_COOKIE: [u8; 8] = *b"v_poison";

pub(crate) const FEATURE_TEMPORARY: u32 = 0x1;
pub(crate) const FEATURE_RESERVED: u32 = 0x2;
pub(crate) const FORMAT_VERSION: u32 = 0x0001_0000;

pub(crate) const TYPE_FIXED: u32 = 2;
pub(crate) const TYPE_DYNAMIC: u32 = 3;
pub(crate) const TYPE_DIFFERENCING: u32 = 4;

/// Creator application and version XenServer's blktap writes ("tap\0", 1.3).
pub(crate) const TAP_CREATOR: [u8; 4] = *b"tap\0";
pub(crate) const TAP_VERSION: u32 = 0x0001_0003;

const OFF_CHECKSUM: usize = 64;
/// blktap keeps its `hidden` flag in the first reserved byte.
pub(crate) const OFF_HIDDEN: usize = 85;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Footer {
    pub cookie: [u8; 8],
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: u32,
    pub disk_type: u32,
    pub checksum: u32,
    pub uuid: [u8; 16],
    pub saved_state: u8,
    pub hidden: u8,
    /// Bytes 86..512, which must be zero.
    pub reserved: [u8; 426],
}

impl Footer {
    pub(crate) fn parse(b: &[u8; FOOTER_SIZE]) -> Footer {
        Footer {
            cookie: array(b, 0),
            features: get_u32(b, 8),
            version: get_u32(b, 12),
            data_offset: get_u64(b, 16),
            timestamp: get_u32(b, 24),
            creator_app: array(b, 28),
            creator_version: get_u32(b, 32),
            creator_os: get_u32(b, 36),
            original_size: get_u64(b, 40),
            current_size: get_u64(b, 48),
            geometry: get_u32(b, 56),
            disk_type: get_u32(b, 60),
            checksum: get_u32(b, OFF_CHECKSUM),
            uuid: array(b, 68),
            saved_state: b[84],
            hidden: b[OFF_HIDDEN],
            reserved: array(b, 86),
        }
    }

    pub(crate) fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        put_u32(&mut b, 8, self.features);
        put_u32(&mut b, 12, self.version);
        put_u64(&mut b, 16, self.data_offset);
        put_u32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put_u32(&mut b, 32, self.creator_version);
        put_u32(&mut b, 36, self.creator_os);
        put_u64(&mut b, 40, self.original_size);
        put_u64(&mut b, 48, self.current_size);
        put_u32(&mut b, 56, self.geometry);
        put_u32(&mut b, 60, self.disk_type);
        put_u32(&mut b, OFF_CHECKSUM, self.checksum);
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        b[OFF_HIDDEN] = self.hidden;
        b[86..].copy_from_slice(&self.reserved);
        b
    }

    pub(crate) fn computed_checksum(&self) -> u32 {
        let mut b = self.encode();
        put_u32(&mut b, OFF_CHECKSUM, 0);
        ones_complement_sum(&b)
    }

    /// Store the checksum matching the current contents.
    pub(crate) fn seal(&mut self) {
        self.checksum = self.computed_checksum();
    }

    pub(crate) fn is_tap(&self) -> bool {
        self.creator_app[..3] == *b"tap"
    }

    pub(crate) fn creator_string(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches(['\0', ' '])
            .to_string()
    }

    /// The structural rules every reader relies on. `which` names the copy ("footer" or
    /// "backup footer") in messages.
    pub(crate) fn validate(&self, path: &Path, which: &str) -> Result<(), VhdError> {
        if self.cookie == POISON_COOKIE {
            return Err(VhdError::invalid(
                path,
                format!("{which}: cookie is 'v_poison' (VHD disabled by blktap)"),
            ));
        }
        if self.cookie != COOKIE {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which}: bad cookie {:?} (expected \"conectix\")",
                    String::from_utf8_lossy(&self.cookie)
                ),
            ));
        }
        let computed = self.computed_checksum();
        if computed != self.checksum && !self.legacy_hidden_checksum_ok() {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which} checksum mismatch (stored {:#010x}, computed {:#010x})",
                    self.checksum, computed
                ),
            ));
        }
        if self.features & FEATURE_RESERVED == 0 {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which}: features {:#010x} lack the reserved bit 0x2 that must be set",
                    self.features
                ),
            ));
        }
        if self.features & !(FEATURE_TEMPORARY | FEATURE_RESERVED) != 0 {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which}: features {:#010x} has unknown bits (only 0x1 and 0x2 are defined)",
                    self.features
                ),
            ));
        }
        if self.version != FORMAT_VERSION {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which}: file format version {:#010x} (expected 0x00010000)",
                    self.version
                ),
            ));
        }
        if !matches!(
            self.disk_type,
            TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING
        ) {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which}: disk type {} (expected 2 fixed, 3 dynamic or 4 differencing)",
                    self.disk_type
                ),
            ));
        }
        if self.current_size > MAX_VIRTUAL_SIZE {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which}: current size {} exceeds the VHD maximum {MAX_VIRTUAL_SIZE}",
                    self.current_size
                ),
            ));
        }
        if self.current_size == 0 || !self.current_size.is_multiple_of(512) {
            return Err(VhdError::invalid(
                path,
                format!(
                    "{which}: current size {} is not a positive multiple of 512",
                    self.current_size
                ),
            ));
        }
        Ok(())
    }

    /// Early blktap (creator versions 0.1 and 1.1) set `hidden` without updating the
    /// checksum; libvhd accepts that, and so do we.
    fn legacy_hidden_checksum_ok(&self) -> bool {
        if self.hidden == 0
            || !self.is_tap()
            || !(self.creator_version == 0x0000_0001 || self.creator_version == 0x0001_0001)
        {
            return false;
        }
        let mut copy = self.clone();
        copy.hidden = 0;
        copy.computed_checksum() == self.checksum
    }
}
