//! Configuration: a TOML file (or the old driver's options in a cinder.conf), validated into
//! typed [`Settings`]. Every error names the file and the key.
//!
//! | key | default |
//! |---|---|
//! | `xenapi_connection_url` | required |
//! | `xenapi_connection_username` | `root` |
//! | `xenapi_connection_password` | or `xenapi_connection_password_file`, or the systemd credential `xenapi_connection_password` |
//! | `xenapi_nfs_server`, `xenapi_nfs_serverpath` | required |
//! | `xenapi_sr_base_path` | `/var/run/sr-mount` |
//! | `share_mount_check` | `true` |
//! | `xenapi_ca_file` / `xenapi_tls_fingerprint` / `xenapi_insecure` | system trust store |
//! | `xenapi_connect_timeout`, `xenapi_request_timeout` (seconds) | 10, 120 |
//! | `xenapi_task_stall_timeout` (seconds without progress before a copy is given up) | 600 |
//! | `socket`, `socket_group` | `/run/xenapinfs/xenapinfs.sock`, `xenapinfs` |
//! | `state_dir` | `/var/lib/xenapinfs` |
//! | `mode` | `auto` (`local`, `remote`) |
//! | `hypervisor_uuid_path` | `/sys/hypervisor/uuid` |
//! | `device_dir` | `/dev` |
//! | `qemu_img` | `qemu-img` |

mod cinder;
mod raw;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use raw::RawConfig;

use crate::xenapi::{Fingerprint, Password, TlsTrust};

/// Default path of the configuration file when installed.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/xenapinfs/xenapinfs.toml";
/// The systemd credential that may carry the XenAPI password.
pub const PASSWORD_CREDENTIAL: &str = "xenapi_connection_password";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {key} is required")]
    Missing { path: PathBuf, key: &'static str },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// Where the agent runs relative to the XenServer host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Detect: local if this VM is a guest of the host behind the URL.
    Auto,
    /// A guest of the controller: VDIs are attached to this VM.
    Local,
    /// Anywhere else: file-level work on the share only.
    Remote,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Local => "local",
            Mode::Remote => "remote",
        })
    }
}

/// How to reach xapi.
#[derive(Debug, Clone, PartialEq)]
pub struct XenApiSettings {
    pub url: reqwest::Url,
    pub username: String,
    pub password: Password,
    pub trust: TlsTrust,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// The validated configuration of the agent.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file these settings came from, for messages.
    pub source: PathBuf,
    pub xenapi: XenApiSettings,
    pub nfs_server: String,
    pub nfs_serverpath: String,
    pub sr_base_path: PathBuf,
    /// Refuse to start unless `sr_base_path` is an NFS mount of `nfs_server:nfs_serverpath`.
    pub share_mount_check: bool,
    /// A XenAPI copy whose progress does not move for this long is cancelled.
    pub task_stall_timeout: Duration,
    pub socket: PathBuf,
    pub socket_group: String,
    pub state_dir: PathBuf,
    pub mode: Mode,
    pub hypervisor_uuid_path: PathBuf,
    pub device_dir: PathBuf,
    pub qemu_img: PathBuf,
}

/// Reads and validates a TOML configuration file. `credentials_dir` is systemd's
/// `$CREDENTIALS_DIRECTORY`, where the password may be.
pub fn load(path: &Path, credentials_dir: Option<&Path>) -> Result<Settings, ConfigError> {
    let text = read(path)?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: syntax_message(&text, &e),
    })?;
    validate(raw, path, credentials_dir)
}

/// Reads the old driver's six options from `section` of a cinder.conf; every other setting
/// takes its default.
pub fn load_cinder(
    path: &Path,
    section: &str,
    credentials_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let text = read(path)?;
    let raw = cinder::parse(&text, section).map_err(|message| ConfigError::Syntax {
        path: path.to_path_buf(),
        message,
    })?;
    validate(raw, path, credentials_dir)
}

/// A TOML error as `line L, column C, key K: message`, without the source line toml quotes:
/// that line may hold the password, and on the password's line the message is not shown either.
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().replace('\n', " ");
    let Some(span) = error.span() else {
        return message;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_number = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    let at = format!("line {line_number}, column {column}");
    match key {
        Some(key) if key.starts_with("xenapi_connection_password") => {
            format!("{at}, key {key}: the value is not valid (not shown: it may be the password)")
        }
        Some(key) => format!("{at}, key {key}: {message}"),
        None => format!("{at}: {message}"),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Turns raw values into settings, applying defaults and checking each key.
pub fn validate(
    raw: RawConfig,
    path: &Path,
    credentials_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        reason,
    };
    let missing = |key: &'static str| ConfigError::Missing {
        path: path.to_path_buf(),
        key,
    };

    let url_text = raw
        .xenapi_connection_url
        .clone()
        .ok_or_else(|| missing("xenapi_connection_url"))?;
    let url = reqwest::Url::parse(&url_text).map_err(|e| {
        invalid(
            "xenapi_connection_url",
            format!("{url_text:?} is not a URL: {e}"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(
            "xenapi_connection_url",
            format!("{url_text:?} must be an http:// or https:// URL with a host"),
        ));
    }

    let password = password(&raw, credentials_dir, path)?;
    let trust = trust(&raw, path)?;

    let nfs_server = raw
        .xenapi_nfs_server
        .ok_or_else(|| missing("xenapi_nfs_server"))?;
    if nfs_server.trim().is_empty() || nfs_server.contains(['/', ' ']) {
        return Err(invalid(
            "xenapi_nfs_server",
            format!("{nfs_server:?} is not a host name or address"),
        ));
    }
    let nfs_serverpath = raw
        .xenapi_nfs_serverpath
        .ok_or_else(|| missing("xenapi_nfs_serverpath"))?;
    if !nfs_serverpath.starts_with('/') {
        return Err(invalid(
            "xenapi_nfs_serverpath",
            format!("{nfs_serverpath:?} must be an absolute export path"),
        ));
    }

    let absolute = |key: &'static str,
                    value: Option<PathBuf>,
                    default: &str|
     -> Result<PathBuf, ConfigError> {
        let value = value.unwrap_or_else(|| PathBuf::from(default));
        if value.is_absolute() {
            Ok(value)
        } else {
            Err(invalid(
                key,
                format!("{} must be an absolute path", value.display()),
            ))
        }
    };

    let mode = match raw.mode.as_deref().unwrap_or("auto") {
        "auto" => Mode::Auto,
        "local" => Mode::Local,
        "remote" => Mode::Remote,
        other => {
            return Err(invalid(
                "mode",
                format!("{other:?} is not one of auto, local, remote"),
            ));
        }
    };

    let seconds =
        |key: &'static str, value: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            match value.unwrap_or(default) {
                0 => Err(invalid(key, "must be at least 1 second".into())),
                n => Ok(Duration::from_secs(n)),
            }
        };

    Ok(Settings {
        source: path.to_path_buf(),
        xenapi: XenApiSettings {
            url,
            username: raw
                .xenapi_connection_username
                .unwrap_or_else(|| "root".into()),
            password,
            trust,
            connect_timeout: seconds("xenapi_connect_timeout", raw.xenapi_connect_timeout, 10)?,
            request_timeout: seconds("xenapi_request_timeout", raw.xenapi_request_timeout, 120)?,
        },
        nfs_server,
        nfs_serverpath,
        sr_base_path: absolute(
            "xenapi_sr_base_path",
            raw.xenapi_sr_base_path,
            "/var/run/sr-mount",
        )?,
        share_mount_check: raw.share_mount_check.unwrap_or(true),
        task_stall_timeout: seconds(
            "xenapi_task_stall_timeout",
            raw.xenapi_task_stall_timeout,
            600,
        )?,
        socket: absolute("socket", raw.socket, "/run/xenapinfs/xenapinfs.sock")?,
        socket_group: raw.socket_group.unwrap_or_else(|| "xenapinfs".into()),
        state_dir: absolute("state_dir", raw.state_dir, "/var/lib/xenapinfs")?,
        mode,
        hypervisor_uuid_path: absolute(
            "hypervisor_uuid_path",
            raw.hypervisor_uuid_path,
            "/sys/hypervisor/uuid",
        )?,
        device_dir: absolute("device_dir", raw.device_dir, "/dev")?,
        qemu_img: raw.qemu_img.unwrap_or_else(|| PathBuf::from("qemu-img")),
    })
}

fn password(
    raw: &RawConfig,
    credentials_dir: Option<&Path>,
    path: &Path,
) -> Result<Password, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        reason,
    };
    let read_secret = |key: &'static str, file: &Path| -> Result<Password, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| invalid(key, format!("cannot read {}: {e}", file.display())))?;
        // Files written by editors or `echo` end in a newline that is not part of the password.
        let secret = text.strip_suffix('\n').unwrap_or(&text);
        let secret = secret.strip_suffix('\r').unwrap_or(secret);
        Ok(Password::new(secret))
    };
    match (
        &raw.xenapi_connection_password,
        &raw.xenapi_connection_password_file,
    ) {
        (Some(_), Some(_)) => Err(invalid(
            "xenapi_connection_password_file",
            "give either xenapi_connection_password or xenapi_connection_password_file, not both"
                .into(),
        )),
        (Some(secret), None) => Ok(Password::new(secret.clone())),
        (None, Some(file)) => read_secret("xenapi_connection_password_file", file),
        // The unit gives the credential an empty default (systemd refuses to start when a
        // credential file is missing), so an empty credential means "not given".
        (None, None) => match credentials_dir.map(|dir| dir.join(PASSWORD_CREDENTIAL)) {
            Some(file) if file.exists() => {
                match read_secret("xenapi_connection_password", &file)? {
                    secret if secret.expose().is_empty() => Err(ConfigError::Missing {
                        path: path.to_path_buf(),
                        key: "xenapi_connection_password",
                    }),
                    secret => Ok(secret),
                }
            }
            _ => Err(ConfigError::Missing {
                path: path.to_path_buf(),
                key: "xenapi_connection_password",
            }),
        },
    }
}

fn trust(raw: &RawConfig, path: &Path) -> Result<TlsTrust, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        reason,
    };
    let insecure = raw.xenapi_insecure.unwrap_or(false);
    match (&raw.xenapi_ca_file, &raw.xenapi_tls_fingerprint, insecure) {
        (Some(_), Some(_), _) => Err(invalid(
            "xenapi_tls_fingerprint",
            "give either xenapi_ca_file or xenapi_tls_fingerprint, not both".into(),
        )),
        (Some(_), None, true) | (None, Some(_), true) => Err(invalid(
            "xenapi_insecure",
            "cannot be true together with xenapi_ca_file or xenapi_tls_fingerprint".into(),
        )),
        (Some(file), None, false) => {
            if file.is_file() {
                Ok(TlsTrust::CaFile(file.clone()))
            } else {
                Err(invalid(
                    "xenapi_ca_file",
                    format!("{} is not a readable file", file.display()),
                ))
            }
        }
        (None, Some(text), false) => Fingerprint::parse(text)
            .map(TlsTrust::Pinned)
            .map_err(|reason| invalid("xenapi_tls_fingerprint", reason)),
        (None, None, true) => Ok(TlsTrust::Insecure),
        (None, None, false) => Ok(TlsTrust::System),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
xenapi_connection_url = "https://xenserver.example"
xenapi_connection_password = "secret"
xenapi_nfs_server = "nfs.example"
xenapi_nfs_serverpath = "/volumes"
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_are_those_of_the_old_driver_and_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let settings = load(&write(dir.path(), "c.toml", MINIMAL), None).unwrap();
        assert_eq!(settings.xenapi.username, "root");
        assert_eq!(settings.sr_base_path, Path::new("/var/run/sr-mount"));
        assert!(settings.share_mount_check);
        assert_eq!(settings.socket, Path::new("/run/xenapinfs/xenapinfs.sock"));
        assert_eq!(settings.state_dir, Path::new("/var/lib/xenapinfs"));
        assert_eq!(settings.mode, Mode::Auto);
        assert_eq!(
            settings.hypervisor_uuid_path,
            Path::new("/sys/hypervisor/uuid")
        );
        assert_eq!(settings.device_dir, Path::new("/dev"));
        assert_eq!(settings.xenapi.trust, TlsTrust::System);
        assert_eq!(settings.xenapi.password.expose(), "secret");
    }

    #[test]
    fn unknown_keys_are_refused_with_key_and_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "c.toml",
            &format!("{MINIMAL}xenapi_nfs_sever = \"typo\"\n"),
        );
        let message = load(&path, None).unwrap_err().to_string();
        assert!(message.contains("xenapi_nfs_sever"), "{message}");
        assert!(message.contains("c.toml"), "{message}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for (line, key) in [
            ("mode = \"sideways\"", "mode"),
            (
                "xenapi_sr_base_path = \"relative/dir\"",
                "xenapi_sr_base_path",
            ),
            (
                "xenapi_tls_fingerprint = \"12:34\"",
                "xenapi_tls_fingerprint",
            ),
            ("xenapi_request_timeout = 0", "xenapi_request_timeout"),
            ("share_mount_check = \"yes\"", "share_mount_check"),
        ] {
            let path = write(dir.path(), "c.toml", &format!("{MINIMAL}{line}\n"));
            let message = load(&path, None).unwrap_err().to_string();
            assert!(message.contains(key), "{line}: {message}");
        }
        let path = write(
            dir.path(),
            "c.toml",
            &MINIMAL.replace("https://xenserver.example", "ftp://x"),
        );
        assert!(
            load(&path, None)
                .unwrap_err()
                .to_string()
                .contains("xenapi_connection_url")
        );
        let path = write(
            dir.path(),
            "c.toml",
            &MINIMAL.replace("xenapi_nfs_server = \"nfs.example\"\n", ""),
        );
        assert_eq!(
            load(&path, None).unwrap_err().to_string(),
            format!("{}: xenapi_nfs_server is required", path.display())
        );
    }

    #[test]
    fn password_comes_from_a_file_or_a_systemd_credential() {
        let dir = tempfile::tempdir().unwrap();
        let secret = write(dir.path(), "pw", "from-file\n");
        let without = MINIMAL.replace("xenapi_connection_password = \"secret\"\n", "");
        let path = write(
            dir.path(),
            "c.toml",
            &format!(
                "{without}xenapi_connection_password_file = \"{}\"\n",
                secret.display()
            ),
        );
        assert_eq!(
            load(&path, None).unwrap().xenapi.password.expose(),
            "from-file"
        );

        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        write(&creds, PASSWORD_CREDENTIAL, "from-credential");
        let path = write(dir.path(), "c.toml", &without);
        assert_eq!(
            load(&path, Some(&creds)).unwrap().xenapi.password.expose(),
            "from-credential"
        );
        let message = load(&path, None).unwrap_err().to_string();
        assert!(
            message.ends_with("xenapi_connection_password is required"),
            "{message}"
        );
    }

    #[test]
    fn insecure_only_when_asked_and_never_with_a_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "c.toml",
            &format!("{MINIMAL}xenapi_insecure = true\n"),
        );
        assert_eq!(load(&path, None).unwrap().xenapi.trust, TlsTrust::Insecure);
        let pin = "ab".repeat(32);
        let path = write(
            dir.path(),
            "c.toml",
            &format!("{MINIMAL}xenapi_insecure = true\nxenapi_tls_fingerprint = \"{pin}\"\n"),
        );
        assert!(
            load(&path, None)
                .unwrap_err()
                .to_string()
                .contains("xenapi_insecure")
        );
    }

    #[test]
    fn cinder_conf_backend_section_with_default_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "cinder.conf",
            "[DEFAULT]\nxenapi_connection_username = admin\nxenapi_sr_base_path = /mnt/srs\nverbose = true\n\
             [xenapinfs-1]\nvolume_driver = cinder.volume.drivers.xenapi.sm.XenAPINFSDriver\n\
             xenapi_connection_url = http://10.0.0.1\nxenapi_connection_password = pw\n\
             xenapi_nfs_server = 10.0.0.2\nxenapi_nfs_serverpath = /export/volumes\n",
        );
        let settings = load_cinder(&path, "xenapinfs-1", None).unwrap();
        assert_eq!(settings.xenapi.url.as_str(), "http://10.0.0.1/");
        assert_eq!(settings.xenapi.username, "admin");
        assert_eq!(settings.sr_base_path, Path::new("/mnt/srs"));
        assert_eq!(settings.nfs_serverpath, "/export/volumes");
        let message = load_cinder(&path, "nope", None).unwrap_err().to_string();
        assert!(message.contains("no section [nope]"), "{message}");
    }
}
