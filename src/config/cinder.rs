//! Reading the old driver's options from an existing cinder.conf (an oslo.config INI file).

use super::raw::{CINDER_KEYS, RawConfig};

/// Takes the six XenAPINFS options from `section`, falling back to `[DEFAULT]` as oslo.config's
/// INI files do. Other keys and sections are Cinder's business and are ignored.
pub fn parse(text: &str, section: &str) -> Result<RawConfig, String> {
    let mut from_section = RawConfig::default();
    let mut from_default = RawConfig::default();
    let mut current: Option<String> = None;
    let mut section_seen = section == "DEFAULT";
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let name = name
                .strip_suffix(']')
                .ok_or_else(|| format!("line {}: unterminated section header", index + 1))?
                .trim();
            section_seen |= name == section;
            current = Some(name.to_string());
            continue;
        }
        let Some((key, value)) = line.split_once('=').or_else(|| line.split_once(':')) else {
            return Err(format!("line {}: expected `key = value`", index + 1));
        };
        let (key, value) = (key.trim(), value.trim().to_string());
        if !CINDER_KEYS.contains(&key) {
            continue;
        }
        match current.as_deref() {
            Some(name) if name == section => from_section.set_cinder_option(key, value),
            Some("DEFAULT") => from_default.set_cinder_option(key, value),
            None => {
                return Err(format!(
                    "line {}: option {key} outside any section",
                    index + 1
                ));
            }
            Some(_) => {}
        }
    }
    if !section_seen {
        return Err(format!("no section [{section}]"));
    }
    Ok(RawConfig {
        xenapi_connection_url: from_section
            .xenapi_connection_url
            .or(from_default.xenapi_connection_url),
        xenapi_connection_username: from_section
            .xenapi_connection_username
            .or(from_default.xenapi_connection_username),
        xenapi_connection_password: from_section
            .xenapi_connection_password
            .or(from_default.xenapi_connection_password),
        xenapi_nfs_server: from_section
            .xenapi_nfs_server
            .or(from_default.xenapi_nfs_server),
        xenapi_nfs_serverpath: from_section
            .xenapi_nfs_serverpath
            .or(from_default.xenapi_nfs_serverpath),
        xenapi_sr_base_path: from_section
            .xenapi_sr_base_path
            .or(from_default.xenapi_sr_base_path),
        ..RawConfig::default()
    })
}
