//! The configuration as written by the operator: every key optional, unknown keys refused.

use std::path::PathBuf;

use serde::Deserialize;

/// One TOML configuration file. Key names of the old Cinder driver are kept verbatim.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub xenapi_connection_url: Option<String>,
    pub xenapi_connection_username: Option<String>,
    pub xenapi_connection_password: Option<String>,
    pub xenapi_connection_password_file: Option<PathBuf>,
    pub xenapi_nfs_server: Option<String>,
    pub xenapi_nfs_serverpath: Option<String>,
    pub xenapi_sr_base_path: Option<PathBuf>,
    pub share_mount_check: Option<bool>,
    pub xenapi_ca_file: Option<PathBuf>,
    pub xenapi_tls_fingerprint: Option<String>,
    pub xenapi_insecure: Option<bool>,
    pub xenapi_connect_timeout: Option<u64>,
    pub xenapi_request_timeout: Option<u64>,
    pub xenapi_task_stall_timeout: Option<u64>,
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub mode: Option<String>,
    pub hypervisor_uuid_path: Option<PathBuf>,
    pub device_dir: Option<PathBuf>,
    pub qemu_img: Option<PathBuf>,
}

/// The six options the old driver read from cinder.conf.
pub const CINDER_KEYS: [&str; 6] = [
    "xenapi_connection_url",
    "xenapi_connection_username",
    "xenapi_connection_password",
    "xenapi_nfs_server",
    "xenapi_nfs_serverpath",
    "xenapi_sr_base_path",
];

impl RawConfig {
    /// Fills one of the cinder.conf options by name.
    pub fn set_cinder_option(&mut self, key: &str, value: String) {
        match key {
            "xenapi_connection_url" => self.xenapi_connection_url = Some(value),
            "xenapi_connection_username" => self.xenapi_connection_username = Some(value),
            "xenapi_connection_password" => self.xenapi_connection_password = Some(value),
            "xenapi_nfs_server" => self.xenapi_nfs_server = Some(value),
            "xenapi_nfs_serverpath" => self.xenapi_nfs_serverpath = Some(value),
            "xenapi_sr_base_path" => self.xenapi_sr_base_path = Some(PathBuf::from(value)),
            _ => {}
        }
    }
}
