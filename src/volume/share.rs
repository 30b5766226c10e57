//! The share as inventory: xapi forgets idle SRs, so what exists is what is on the export.
//!
//! Layout under `xenapi_sr_base_path`: `<sr_uuid>/<vdi_uuid>.vhd` (plus the VHD's parents, for
//! volumes imported from a chain) and `<sr_uuid>/.xenapinfs.json` with the volume's name and
//! description, which the SR record cannot keep across SR.forget.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::vhd;

use super::{VolumeError, VolumeId};

/// Name of the per-SR metadata file. SM ignores files that are not `*.vhd`/`*.raw`.
const METADATA_FILE: &str = ".xenapinfs.json";

/// What the agent keeps about a volume besides its VHD files.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// A volume as found on the share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub sr_uuid: Uuid,
    pub vdi_uuid: Uuid,
    pub size_gb: f64,
    pub size_bytes: u64,
    /// Bytes the VHD files of the volume take on the share.
    pub allocated_bytes: u64,
    pub name: String,
    pub description: String,
    /// VHD uuids from the leaf (the volume's VDI) to the base.
    pub chain: Vec<Uuid>,
    /// Set when the volume's files cannot be read; the other fields are then partial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Capacity of the share's filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// The mounted export.
#[derive(Debug, Clone)]
pub struct Share {
    base: PathBuf,
}

impl Share {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Share { base: base.into() }
    }

    pub fn sr_dir(&self, sr: Uuid) -> PathBuf {
        self.base.join(sr.to_string())
    }

    pub fn vhd_path(&self, id: VolumeId) -> PathBuf {
        self.sr_dir(id.sr).join(format!("{}.vhd", id.vdi))
    }

    pub fn exists(&self, id: VolumeId) -> bool {
        self.vhd_path(id).is_file()
    }

    /// Every volume on the share, sorted by id. Directories that are not SR uuids are skipped.
    pub fn list(&self) -> Result<Vec<Volume>, VolumeError> {
        let mut volumes = Vec::new();
        let entries = std::fs::read_dir(&self.base).map_err(VolumeError::io(format!(
            "reading the share at {}",
            self.base.display()
        )))?;
        for entry in entries.filter_map(Result::ok) {
            let Some(sr) = entry
                .file_name()
                .to_str()
                .and_then(|n| super::id::parse_uuid(n, "SR").ok())
            else {
                continue;
            };
            if !entry.path().is_dir() {
                continue;
            }
            for vdi in self.leaves(sr) {
                volumes.push(self.describe(VolumeId { sr, vdi }));
            }
        }
        volumes.sort_by_key(|v| v.id);
        Ok(volumes)
    }

    /// One volume; `NotFound` if its VHD is not on the share.
    pub fn volume(&self, id: VolumeId) -> Result<Volume, VolumeError> {
        if !self.exists(id) {
            return Err(VolumeError::NotFound(id));
        }
        Ok(self.describe(id))
    }

    /// VHDs in an SR directory that are leaves: not hidden and nobody's parent.
    fn leaves(&self, sr: Uuid) -> Vec<Uuid> {
        let dir = self.sr_dir(sr);
        let mut found = Vec::new();
        let mut parents = Vec::new();
        for entry in std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".vhd")) else {
                continue;
            };
            let Ok(vdi) = super::id::parse_uuid(stem, "VDI") else {
                continue;
            };
            match vhd::inspect(&entry.path()) {
                Ok(info) => {
                    if let Some(parent) = info.parent {
                        parents.push(parent.uuid);
                    }
                    if !info.hidden {
                        found.push(vdi);
                    }
                }
                // An unreadable file is still listed, with its problem.
                Err(_) => found.push(vdi),
            }
        }
        found.retain(|vdi| !parents.contains(vdi));
        found.sort();
        found
    }

    fn describe(&self, id: VolumeId) -> Volume {
        let metadata = self.metadata(id.sr).unwrap_or_default();
        let mut volume = Volume {
            id,
            sr_uuid: id.sr,
            vdi_uuid: id.vdi,
            size_gb: 0.0,
            size_bytes: 0,
            allocated_bytes: 0,
            name: metadata.name,
            description: metadata.description,
            chain: Vec::new(),
            problem: None,
        };
        match vhd::Chain::open(&self.vhd_path(id)) {
            Ok(chain) => {
                volume.size_bytes = chain.virtual_size();
                volume.size_gb = gib(volume.size_bytes);
                for (_, info) in chain.files() {
                    volume.chain.push(info.uuid);
                    volume.allocated_bytes += info.file_size;
                }
            }
            Err(e) => volume.problem = Some(e.to_string()),
        }
        volume
    }

    pub fn metadata(&self, sr: Uuid) -> Option<Metadata> {
        let text = std::fs::read_to_string(self.sr_dir(sr).join(METADATA_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the metadata atomically (temporary file, fsync, rename).
    pub fn write_metadata(&self, sr: Uuid, metadata: &Metadata) -> Result<(), VolumeError> {
        let dir = self.sr_dir(sr);
        let context = format!("writing volume metadata in {}", dir.display());
        let temp = dir.join(format!("{METADATA_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(metadata).expect("metadata serialises");
        write_synced(&temp, &text).map_err(VolumeError::io(context.clone()))?;
        std::fs::rename(&temp, dir.join(METADATA_FILE)).map_err(VolumeError::io(context))
    }

    pub fn capacity(&self) -> Result<Capacity, VolumeError> {
        let stat = nix::sys::statvfs::statvfs(&self.base).map_err(|e| VolumeError::Io {
            context: format!("statvfs of the share at {}", self.base.display()),
            source: e.into(),
        })?;
        let fragment = stat.fragment_size() as u64;
        Ok(Capacity {
            total_bytes: stat.blocks() as u64 * fragment,
            free_bytes: stat.blocks_available() as u64 * fragment,
        })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
