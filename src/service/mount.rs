//! The share mount check: before serving, the agent makes sure `xenapi_sr_base_path` is the
//! NFS export it was configured for, so it never creates volumes on a local disk that merely
//! has the same path (an unmounted share looks like an empty one).
//!
//! The mount table is read from `/proc/self/mountinfo` (see proc(5)): the agent's own mount
//! namespace, which is what its file operations see.

use std::path::{Path, PathBuf};

use crate::config::Settings;

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo, the fields the check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Why the agent refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("share mount check: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the share is not mounted: xenapi_sr_base_path {path} {found}; expected an nfs or nfs4 \
         mount of {expected} there. Mount the export at {path} (see \
         /usr/share/doc/xenapinfs/examples/sr-mount.mount), or set share_mount_check = false"
    )]
    NotMounted {
        path: PathBuf,
        /// What is there instead, in words.
        found: String,
        /// `server:path`.
        expected: String,
    },
}

/// Parses mountinfo text; lines that do not have the documented shape are skipped.
///
/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
/// the mount point is the fifth field; after the optional fields and the `-` separator come
/// the filesystem type and the source. Spaces, tabs, newlines and backslashes in paths are
/// written as octal escapes (`\040`).
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = fields.get(4)?;
            let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            let fstype = fields.get(separator + 1)?;
            let source = fields.get(separator + 2)?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .collect()
}

/// Undoes the kernel's `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path without trailing slashes (the root stays `/`).
fn trimmed(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" if path.starts_with('/') => "/",
        rest => rest,
    }
}

/// True when an NFS source `server:/path` names `server` and `export` (brackets around an
/// IPv6 address, letter case of the host and trailing slashes do not matter).
fn same_share(source: &str, server: &str, export: &str) -> bool {
    let Some((source_server, source_path)) = source.split_once(":/") else {
        return false;
    };
    let host = |h: &str| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .to_lowercase()
    };
    host(source_server) == host(server) && trimmed(&format!("/{source_path}")) == trimmed(export)
}

/// Checks `mounts` (from [`parse`]) for the share `server:export` at `base`.
pub fn check(mounts: &[Mount], base: &Path, server: &str, export: &str) -> Result<(), MountError> {
    let expected = format!("{server}:{export}");
    let base_text = base.to_string_lossy();
    let base_trimmed = Path::new(trimmed(&base_text));
    // The last mount listed on a path is the one on top, the one file operations reach.
    let found = match mounts.iter().rev().find(|m| m.mount_point == base_trimmed) {
        Some(mount)
            if matches!(mount.fstype.as_str(), "nfs" | "nfs4")
                && same_share(&mount.source, server, export) =>
        {
            return Ok(());
        }
        Some(mount) => format!(
            "is a {} mount of {}",
            mount.fstype,
            if mount.source.is_empty() {
                "(no source)"
            } else {
                &mount.source
            }
        ),
        None => match mounts
            .iter()
            .rev()
            .filter(|m| base_trimmed.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.components().count())
        {
            Some(parent) => format!(
                "is not a mount point: nothing is mounted there (it lies on the {} mount at {})",
                parent.fstype,
                parent.mount_point.display()
            ),
            None => "is not a mount point: nothing is mounted there".to_string(),
        },
    };
    Err(MountError::NotMounted {
        path: base.to_path_buf(),
        found,
        expected,
    })
}

/// Reads `mountinfo` (normally [`MOUNTINFO`]) and checks that the configured share is
/// mounted at `xenapi_sr_base_path` (symbolic links in that path are followed first).
pub fn check_share(mountinfo: &Path, settings: &Settings) -> Result<(), MountError> {
    let text = std::fs::read_to_string(mountinfo).map_err(|source| MountError::Read {
        path: mountinfo.to_path_buf(),
        source,
    })?;
    let base = std::fs::canonicalize(&settings.sr_base_path)
        .unwrap_or_else(|_| settings.sr_base_path.clone());
    check(
        &parse(&text),
        &base,
        &settings.nfs_server,
        &settings.nfs_serverpath,
    )
    .map_err(|error| match error {
        // Name the path as configured, not as resolved.
        MountError::NotMounted {
            found, expected, ..
        } => MountError::NotMounted {
            path: settings.sr_base_path.clone(),
            found,
            expected,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
25 22 0:23 / /run rw,nosuid,nodev,noexec,relatime shared:6 - tmpfs tmpfs rw,size=402000k,mode=755
90 25 0:45 / /run/sr-mount rw,relatime shared:40 - nfs4 10.0.0.5:/export/volumes/ rw,vers=4.2,addr=10.0.0.5
91 22 0:46 / /srv/my\\040share rw,relatime shared:41 master:3 - nfs nas.example:/exports/with\\040space rw,vers=3
92 22 0:47 / /mnt/local rw,relatime shared:42 - xfs /dev/sdb1 rw
93 22 0:48 / /mnt/v6 rw,relatime - nfs [fd00::5]:/vols rw
94 22 0:49 / /mnt/over rw,relatime - nfs4 10.0.0.5:/export/volumes rw
95 94 0:50 / /mnt/over rw,relatime - tmpfs tmpfs rw
";

    fn check_sample(base: &str, server: &str, export: &str) -> Result<(), MountError> {
        check(&parse(SAMPLE), Path::new(base), server, export)
    }

    fn message(result: Result<(), MountError>) -> String {
        result.expect_err("the check should refuse").to_string()
    }

    #[test]
    fn mountinfo_lines_are_parsed_with_optional_fields_and_escapes() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 9);
        assert_eq!(
            mounts[4],
            Mount {
                mount_point: PathBuf::from("/srv/my share"),
                fstype: "nfs".into(),
                source: "nas.example:/exports/with space".into(),
            }
        );
        assert_eq!(mounts[3].fstype, "nfs4");
        assert_eq!(unescape(r"a\134b\011c\012"), "a\\b\tc\n");
        assert_eq!(unescape(r"bad\09x\"), r"bad\09x\");
        assert!(parse("garbage\n1 2 3\n").is_empty());
    }

    #[test]
    fn the_configured_nfs_export_at_the_base_path_passes() {
        check_sample("/run/sr-mount", "10.0.0.5", "/export/volumes").unwrap();
        // Trailing slashes on either side, and on the base path, do not matter.
        check_sample("/run/sr-mount/", "10.0.0.5", "/export/volumes/").unwrap();
        check_sample("/srv/my share", "nas.example", "/exports/with space").unwrap();
        check_sample("/srv/my share", "NAS.example", "/exports/with space").unwrap();
        check_sample("/mnt/v6", "fd00::5", "/vols").unwrap();
        check_sample("/mnt/v6", "[fd00::5]", "/vols").unwrap();
    }

    #[test]
    fn nothing_mounted_is_refused_naming_the_path_and_what_was_expected() {
        let text = message(check_sample("/var/lib/sr", "10.0.0.5", "/export/volumes"));
        assert!(text.contains("/var/lib/sr"), "{text}");
        assert!(text.contains("nothing is mounted there"), "{text}");
        assert!(text.contains("ext4 mount at /"), "{text}");
        assert!(text.contains("10.0.0.5:/export/volumes"), "{text}");
        assert!(text.contains("share_mount_check = false"), "{text}");
    }

    #[test]
    fn another_filesystem_or_another_export_is_refused_saying_what_is_there() {
        let local = message(check_sample("/mnt/local", "10.0.0.5", "/export/volumes"));
        assert!(local.contains("is a xfs mount of /dev/sdb1"), "{local}");
        let other_export = message(check_sample("/run/sr-mount", "10.0.0.5", "/export/other"));
        assert!(
            other_export.contains("is a nfs4 mount of 10.0.0.5:/export/volumes/"),
            "{other_export}"
        );
        let other_server = message(check_sample("/run/sr-mount", "10.0.0.6", "/export/volumes"));
        assert!(
            other_server.contains("10.0.0.6:/export/volumes"),
            "{other_server}"
        );
        // A share hidden under a later mount on the same path is not reachable.
        let hidden = message(check_sample("/mnt/over", "10.0.0.5", "/export/volumes"));
        assert!(hidden.contains("is a tmpfs mount of tmpfs"), "{hidden}");
    }

    #[test]
    fn an_unreadable_mount_table_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::config::validate(
            crate::config::RawConfig {
                xenapi_connection_url: Some("https://10.0.0.1".into()),
                xenapi_connection_password: Some("pw".into()),
                xenapi_nfs_server: Some("10.0.0.5".into()),
                xenapi_nfs_serverpath: Some("/export".into()),
                xenapi_sr_base_path: Some(dir.path().to_path_buf()),
                ..Default::default()
            },
            Path::new("test.toml"),
            None,
        )
        .unwrap();
        let missing = dir.path().join("no-mountinfo");
        let text = check_share(&missing, &settings).unwrap_err().to_string();
        assert!(text.contains("no-mountinfo"), "{text}");
        // The real table of this process: a temporary directory is no NFS mount.
        let text = check_share(Path::new(MOUNTINFO), &settings)
            .unwrap_err()
            .to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }
}
