//! The file side of an NFS SR: `<export>/<sr_uuid>/<vdi_uuid>.vhd`, read and written through
//! [`crate::vhd`]; errors come out as the `SR_BACKEND_FAILURE_<n>` codes SM raises.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::vhd::{self, VhdInfo};

use super::error::ApiError;

/// The directory of an SR on the export.
pub fn sr_dir(export: &Path, sr_uuid: &str) -> PathBuf {
    export.join(sr_uuid)
}

/// The file of a VDI.
pub fn vhd_path(export: &Path, sr_uuid: &str, vdi_uuid: &str) -> PathBuf {
    sr_dir(export, sr_uuid).join(format!("{vdi_uuid}.vhd"))
}

/// A temporary file name next to `path` that SR.scan never picks up (`.*.vhd.tmp`).
pub fn temp_beside(path: &Path, purpose: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{purpose}-{}.tmp",
        uuid::Uuid::new_v4().simple()
    ))
}

/// What SR.scan finds in one SR directory: every `*.vhd`, by the uuid in its name.
pub fn read_vhds(dir: &Path, skip: &[String]) -> Result<BTreeMap<String, VhdInfo>, ApiError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| scan_failed(format!("{}: {e}", dir.display())))?;
    let mut found = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| scan_failed(format!("{}: {e}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(uuid) = name.strip_suffix(".vhd") else {
            continue;
        };
        if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if skip.iter().any(|s| s == uuid) {
            continue;
        }
        let info = vhd::inspect(&entry.path()).map_err(|e| scan_failed(e.to_string()))?;
        found.insert(uuid.to_string(), info);
    }
    Ok(found)
}

fn scan_failed(detail: String) -> ApiError {
    ApiError::backend_opterr(40, "The SR scan failed ", detail)
}

/// `(size, used)` of the filesystem holding `dir`, in bytes.
pub fn fs_usage(dir: &Path) -> (i64, i64) {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let fragment = st.fragment_size() as i64;
            let size = st.blocks() as i64 * fragment;
            let free = st.blocks_free() as i64 * fragment;
            (size, size - free)
        }
        Err(_) => (0, 0),
    }
}

/// Maps a VHD library error to what SM would report for `code`.
pub fn backend(code: u32, description: &str, error: impl std::fmt::Display) -> ApiError {
    ApiError::backend_opterr(code, description, error)
}
