//! The qemu-img runner. Every call names the format explicitly (`-f`, `-O`): qemu never
//! probes. `info` runs under resource limits (a hostile image must not exhaust the machine,
//! OSSA-2016-012) and a wall-clock timeout; `convert` reports progress and dies at once when
//! cancelled. Paths are passed so that qemu can never read them as a protocol or `json:`
//! specification.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{ImageError, ImageFormat};

/// Limits for `qemu-img info` (Nova's values).
const INFO_ADDRESS_SPACE: u64 = 1 << 30;
const INFO_CPU_SECONDS: u64 = 30;
const DEFAULT_INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// `info` output beyond this is not JSON we want to parse.
const MAX_INFO_OUTPUT: usize = 4 << 20;
/// How much of qemu's stderr an error keeps.
const MAX_STDERR: usize = 16 << 10;

/// The qemu-img binary (path from config, default "qemu-img"), run with explicit -f always.
#[derive(Clone, Debug)]
pub struct QemuImg {
    path: PathBuf,
    info_timeout: Duration,
}

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuInfo {
    pub virtual_size: u64,
    /// The driver qemu used ("qcow2", "vpc", ...).
    pub format: String,
    pub backing_filename: Option<String>,
    pub data_file: Option<String>,
    /// Names of the block nodes under the image ("file" for the image file itself; anything
    /// else is another file qemu opened).
    pub children: Vec<String>,
    /// VMDK: the create type and the extent files qemu opened.
    pub vmdk_create_type: Option<String>,
    pub vmdk_extents: Vec<String>,
}

/// Options of `qemu-img convert`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvertOptions {
    /// `-n`: write into an existing target (a block device) instead of creating it.
    pub no_create: bool,
    /// `--target-is-zero`: skip writing zeros; only with `no_create` (a created target is
    /// zero anyway, so it is ignored otherwise).
    pub target_is_zero: bool,
    /// `-t none` (O_DIRECT) instead of `-t writeback`; both flush before qemu-img exits.
    pub cache_none: bool,
}

/// A path as qemu must see it: relative paths get "./" so that "nbd:..." or "json:{...}"
/// names are never parsed as protocols.
pub(crate) fn path_arg(path: &Path) -> OsString {
    if path.is_absolute() {
        path.as_os_str().to_owned()
    } else {
        let mut s = OsString::from("./");
        s.push(path.as_os_str());
        s
    }
}

fn driver(format: ImageFormat, command: &str) -> Result<&'static str, ImageError> {
    format.qemu_driver().ok_or_else(|| ImageError::Qemu {
        command: command.to_string(),
        status: "not run".to_string(),
        stderr: format!("qemu-img cannot read or write {format}"),
    })
}

impl QemuImg {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        QemuImg {
            path: path.into(),
            info_timeout: DEFAULT_INFO_TIMEOUT,
        }
    }

    /// The wall-clock limit of `info` (default 60 s).
    pub fn with_info_timeout(mut self, timeout: Duration) -> Self {
        self.info_timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `qemu-img info -f DRIVER --output=json PATH` with resource limits (address space 1 GiB,
    /// CPU 30 s via setrlimit in pre_exec, and a wall-clock timeout), returning virtual-size,
    /// format and whether a backing file / data file is reported.
    pub async fn info(&self, path: &Path, format: ImageFormat) -> Result<QemuInfo, ImageError> {
        let name = format!("{} info", self.path.display());
        let driver = driver(format, &name)?;
        let command = format!("{name} -f {driver} --output=json {}", path.display());
        let mut cmd = Command::new(&self.path);
        cmd.arg("info")
            .arg("-f")
            .arg(driver)
            .arg("--output=json")
            .arg(path_arg(path))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs between fork and exec and only calls setrlimit, which is
        // async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                set_limit(libc::RLIMIT_AS, INFO_ADDRESS_SPACE, INFO_ADDRESS_SPACE)?;
                // SIGXCPU at the soft limit, SIGKILL one second later.
                set_limit(libc::RLIMIT_CPU, INFO_CPU_SECONDS, INFO_CPU_SECONDS + 1)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| spawn_error(&command, &self.path, e))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let run = async {
            let (out, err) = tokio::join!(
                read_capped(stdout, MAX_INFO_OUTPUT),
                read_capped(stderr, MAX_STDERR)
            );
            (out, err, child.wait().await)
        };
        let (out, err, status) = match tokio::time::timeout(self.info_timeout, run).await {
            Ok(done) => done,
            Err(_) => {
                stop(&mut child).await;
                return Err(ImageError::Qemu {
                    command,
                    status: format!("timed out after {:?}", self.info_timeout),
                    stderr: String::new(),
                });
            }
        };
        let status = status.map_err(ImageError::io(format!("waiting for {command}")))?;
        let (stdout, truncated) = out.map_err(ImageError::io(format!("reading from {command}")))?;
        let stderr = lossy(&err.map(|(e, _)| e).unwrap_or_default());
        if !status.success() {
            return Err(ImageError::Qemu {
                command,
                status: status.to_string(),
                stderr,
            });
        }
        if truncated {
            return Err(ImageError::Qemu {
                command,
                status: status.to_string(),
                stderr: format!("output larger than {MAX_INFO_OUTPUT} bytes"),
            });
        }
        parse_info(&stdout).map_err(|e| ImageError::Qemu {
            command,
            status: status.to_string(),
            stderr: format!("unexpected JSON output: {e}"),
        })
    }

    /// `qemu-img convert -p -f SRC_FMT -O DST_FMT [-n] [--target-is-zero] [-t none|writeback] SRC DST`,
    /// reporting progress (qemu prints "(12.34/100%)" on stdout separated by \r) to `progress`
    /// as 0.0..=1.0, killed at once when `cancel` fires (then returns Cancelled), stderr kept
    /// for the error. `opts.target_is_zero` only with `opts.no_create`.
    #[allow(clippy::too_many_arguments)]
    pub async fn convert(
        &self,
        src: &Path,
        src_format: ImageFormat,
        dst: &Path,
        dst_format: ImageFormat,
        opts: ConvertOptions,
        progress: &mut (dyn FnMut(f64) + Send),
        cancel: &CancellationToken,
    ) -> Result<(), ImageError> {
        let name = format!("{} convert", self.path.display());
        let src_driver = driver(src_format, &name)?;
        let dst_driver = driver(dst_format, &name)?;
        let mut args: Vec<OsString> = vec![
            "convert".into(),
            "-p".into(),
            "-f".into(),
            src_driver.into(),
            "-O".into(),
            dst_driver.into(),
        ];
        if opts.no_create {
            args.push("-n".into());
            if opts.target_is_zero {
                args.push("--target-is-zero".into());
            }
        }
        args.push("-t".into());
        args.push(if opts.cache_none { "none" } else { "writeback" }.into());
        args.push(path_arg(src));
        args.push(path_arg(dst));
        let command = format!(
            "{} {}",
            self.path.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        if cancel.is_cancelled() {
            return Err(ImageError::Cancelled);
        }
        let mut child = Command::new(&self.path)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| spawn_error(&command, &self.path, e))?;
        let stderr_task = tokio::spawn(read_capped(child.stderr.take(), MAX_STDERR));
        let mut stdout = child.stdout.take();
        let mut parser = ProgressParser::default();
        let mut buf = [0u8; 1024];

        let outcome: Result<ExitStatus, ImageError> = loop {
            let Some(out) = stdout.as_mut() else {
                break tokio::select! {
                    biased;
                    _ = cancel.cancelled() => Err(ImageError::Cancelled),
                    status = child.wait() => status.map_err(ImageError::io(format!("waiting for {command}"))),
                };
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Err(ImageError::Cancelled),
                read = out.read(&mut buf) => match read {
                    Ok(0) | Err(_) => stdout = None,
                    Ok(n) => {
                        for value in parser.feed(&buf[..n]) {
                            progress(value);
                        }
                    }
                },
            }
        };
        let status = match outcome {
            Ok(status) => status,
            Err(e) => {
                stop(&mut child).await;
                stderr_task.abort();
                return Err(e);
            }
        };
        let stderr = match stderr_task.await {
            Ok(Ok((bytes, _))) => lossy(&bytes),
            _ => String::new(),
        };
        if !status.success() {
            return Err(ImageError::Qemu {
                command,
                status: status.to_string(),
                stderr,
            });
        }
        if parser.last.is_none_or(|last| last < 1.0) {
            progress(1.0);
        }
        Ok(())
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
type Resource = libc::c_int;

fn set_limit(resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn spawn_error(command: &str, program: &Path, e: std::io::Error) -> ImageError {
    ImageError::Io {
        context: format!("starting {command} (is {} installed?)", program.display()),
        source: e,
    }
}

/// Kill the child and reap it.
async fn stop(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Read a pipe to its end, keeping the first `cap` bytes; the flag says whether more came.
async fn read_capped<R: AsyncRead + Unpin>(
    pipe: Option<R>,
    cap: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let Some(mut pipe) = pipe else {
        return Ok((Vec::new(), false));
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            return Ok((kept, truncated));
        }
        let room = cap - kept.len();
        if n > room {
            truncated = true;
        }
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// Turns qemu's `    (12.34/100%)` records (separated by `\r` or `\n`) into 0.0..=1.0,
/// reporting the first value and then only increases.
#[derive(Default)]
struct ProgressParser {
    pending: Vec<u8>,
    last: Option<f64>,
}

impl ProgressParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<f64> {
        let mut values = Vec::new();
        for &b in bytes {
            if b == b'\r' || b == b'\n' {
                if let Some(v) = parse_progress(&self.pending)
                    && self.last.is_none_or(|last| v > last)
                {
                    self.last = Some(v);
                    values.push(v);
                }
                self.pending.clear();
            } else if self.pending.len() < 256 {
                self.pending.push(b);
            }
        }
        values
    }
}

fn parse_progress(record: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(record).ok()?.trim();
    let inner = text.strip_prefix('(')?.strip_suffix("/100%)")?;
    let percent: f64 = inner.trim().parse().ok()?;
    percent
        .is_finite()
        .then(|| (percent / 100.0).clamp(0.0, 1.0))
}

fn parse_info(json: &[u8]) -> Result<QemuInfo, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let virtual_size = v
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or("no virtual-size")?;
    let format = v
        .get("format")
        .and_then(serde_json::Value::as_str)
        .ok_or("no format")?
        .to_string();
    let text = |key: &str| v.get(key).and_then(|s| s.as_str()).map(str::to_string);
    let backing_filename = text("backing-filename").or_else(|| text("full-backing-filename"));
    let data = v.get("format-specific").and_then(|f| f.get("data"));
    let data_file = data
        .and_then(|d| d.get("data-file"))
        .and_then(|s| s.as_str())
        .map(str::to_string);
    let children = v
        .get("children")
        .and_then(|c| c.as_array())
        .map(|list| {
            list.iter()
                .map(|c| {
                    c.get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    let vmdk_create_type = data
        .and_then(|d| d.get("create-type"))
        .and_then(|s| s.as_str())
        .map(str::to_string);
    let vmdk_extents = data
        .and_then(|d| d.get("extents"))
        .and_then(|e| e.as_array())
        .map(|list| {
            list.iter()
                .map(|e| {
                    e.get("filename")
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(QemuInfo {
        virtual_size,
        format,
        backing_filename,
        data_file,
        children,
        vmdk_create_type,
        vmdk_extents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::formats::testutil::{create, random_raw};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    /// A stand-in qemu-img: a shell script with the given body.
    fn fake_qemu(dir: &Path, body: &str) -> QemuImg {
        let path = dir.join("fake-qemu-img");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        QemuImg::new(path)
    }

    /// Processes whose command line mentions `needle` (a unique temp path).
    fn processes_mentioning(needle: &str) -> usize {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(needle))
            .count()
    }

    #[test]
    fn progress_records_become_fractions() {
        assert_eq!(parse_progress(b"    (12.34/100%)"), Some(0.1234));
        assert_eq!(parse_progress(b"(100.00/100%)"), Some(1.0));
        assert_eq!(parse_progress(b"(0.00/100%)"), Some(0.0));
        assert_eq!(parse_progress(b"(250/100%)"), Some(1.0));
        assert_eq!(parse_progress(b"(NaN/100%)"), None);
        assert_eq!(parse_progress(b"junk"), None);
        assert_eq!(parse_progress(b""), None);

        let mut p = ProgressParser::default();
        let mut seen = p.feed(b"    (0.00/100%)\r    (1.");
        seen.extend(p.feed(b"50/100%)\r    (1.50/100%)\r    (1.00/100%)\r"));
        seen.extend(p.feed(b"    (100.00/100%)\n"));
        assert_eq!(seen, vec![0.0, 0.015, 1.0]);
        // Endless garbage without separators stays bounded.
        assert!(p.feed(&[b'x'; 100_000]).is_empty());
        assert!(p.pending.len() <= 256);
    }

    #[test]
    fn info_json_is_parsed() {
        let json = br#"{
            "children": [{"name": "file", "info": {"filename": "d.qcow2", "format": "file"}}],
            "virtual-size": 10485760, "filename": "d.qcow2", "format": "qcow2",
            "backing-filename": "base.qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "data-file": "data.bin"}}
        }"#;
        let info = parse_info(json).unwrap();
        assert_eq!(info.virtual_size, 10 << 20);
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.backing_filename.as_deref(), Some("base.qcow2"));
        assert_eq!(info.data_file.as_deref(), Some("data.bin"));
        assert_eq!(info.children, vec!["file"]);

        let vmdk = br#"{"virtual-size": 1048576, "format": "vmdk",
            "format-specific": {"type": "vmdk", "data": {"create-type": "monolithicFlat",
            "extents": [{"filename": "/srv/secret"}, {"filename": "b"}]}}}"#;
        let info = parse_info(vmdk).unwrap();
        assert_eq!(info.vmdk_create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(info.vmdk_extents, vec!["/srv/secret", "b"]);
        assert_eq!(info.backing_filename, None);

        assert!(parse_info(b"{}").is_err());
        assert!(parse_info(b"not json").is_err());
        assert!(parse_info(br#"{"virtual-size": -1, "format": "raw"}"#).is_err());
    }

    #[test]
    fn relative_paths_cannot_be_read_as_protocols() {
        assert_eq!(
            path_arg(Path::new("nbd:host:1")),
            OsString::from("./nbd:host:1")
        );
        assert_eq!(path_arg(Path::new("json:{}")), OsString::from("./json:{}"));
        assert_eq!(path_arg(Path::new("/a/b:c")), OsString::from("/a/b:c"));
    }

    #[tokio::test]
    async fn info_reads_a_real_image_with_the_named_driver() {
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "d.qcow2", "qcow2", &[], "10M");
        let qemu = QemuImg::new("qemu-img");
        let info = qemu.info(&p, ImageFormat::Qcow2).await.unwrap();
        assert_eq!(info.virtual_size, 10 << 20);
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.backing_filename, None);
        assert_eq!(info.data_file, None);
        // Forced to raw, the same file is just bytes: no probing.
        let raw = qemu.info(&p, ImageFormat::Raw).await.unwrap();
        assert_eq!(raw.format, "raw");
        // qemu rounds a raw file up to whole sectors.
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(raw.virtual_size, len.next_multiple_of(512));
        // A VHD goes through qemu's "vpc" driver.
        let vhd = create(dir.path(), "d.vhd", "vpc", &[], "10M");
        assert_eq!(
            qemu.info(&vhd, ImageFormat::Vhd).await.unwrap().format,
            "vpc"
        );
    }

    #[tokio::test]
    async fn info_failures_keep_qemus_message() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("g.qcow2");
        std::fs::write(&garbage, b"not a qcow2 image at all").unwrap();
        let qemu = QemuImg::new("qemu-img");
        match qemu.info(&garbage, ImageFormat::Qcow2).await {
            Err(ImageError::Qemu {
                command, stderr, ..
            }) => {
                assert!(command.contains("info -f qcow2 --output=json"), "{command}");
                assert!(stderr.contains("Image is not in qcow2 format"), "{stderr}");
            }
            other => panic!("{other:?}"),
        }
        match qemu.info(&garbage, ImageFormat::VhdTgz).await {
            Err(ImageError::Qemu { status, .. }) => assert_eq!(status, "not run"),
            other => panic!("{other:?}"),
        }
        let missing = QemuImg::new(dir.path().join("no-such-qemu-img"));
        assert!(matches!(
            missing.info(&garbage, ImageFormat::Raw).await,
            Err(ImageError::Io { .. })
        ));
    }

    #[tokio::test]
    async fn info_runs_under_resource_limits() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("limits");
        let qemu = fake_qemu(
            dir.path(),
            &format!(
                "echo \"$(ulimit -v) $(ulimit -t) $(ulimit -H -t)\" > {}\necho '{{\"virtual-size\": 1, \"format\": \"raw\"}}'",
                out.display()
            ),
        );
        let info = qemu
            .info(Path::new("/dev/null"), ImageFormat::Raw)
            .await
            .unwrap();
        assert_eq!(info.virtual_size, 1);
        let limits = std::fs::read_to_string(&out).unwrap();
        assert_eq!(limits.trim(), "1048576 30 31");
    }

    #[tokio::test]
    async fn info_is_killed_after_the_wall_clock_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("slow-marker");
        let qemu = fake_qemu(dir.path(), &format!("exec sleep 30 # {}", marker.display()))
            .with_info_timeout(Duration::from_millis(300));
        let start = Instant::now();
        match qemu.info(Path::new("/dev/null"), ImageFormat::Raw).await {
            Err(ImageError::Qemu { status, .. }) => {
                assert!(status.contains("timed out"), "{status}")
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(processes_mentioning(marker.to_str().unwrap()), 0);
    }

    #[tokio::test]
    async fn convert_round_trip_reports_progress_up_to_one() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        random_raw(&raw, 8 << 20, 1 << 20, 100_000, 42);
        let qcow2 = dir.path().join("a.qcow2");
        let back = dir.path().join("b.raw");
        let qemu = QemuImg::new("qemu-img");
        let cancel = CancellationToken::new();

        let mut seen = Vec::new();
        qemu.convert(
            &raw,
            ImageFormat::Raw,
            &qcow2,
            ImageFormat::Qcow2,
            ConvertOptions::default(),
            &mut |p| seen.push(p),
            &cancel,
        )
        .await
        .unwrap();
        assert_eq!(seen.last(), Some(&1.0));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(seen.iter().all(|p| (0.0..=1.0).contains(p)));
        let info = qemu.info(&qcow2, ImageFormat::Qcow2).await.unwrap();
        assert_eq!(info.virtual_size, 8 << 20);

        // Back into an existing target, as onto a block device.
        std::fs::File::create(&back)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let mut seen = Vec::new();
        let opts = ConvertOptions {
            no_create: true,
            target_is_zero: true,
            cache_none: true,
        };
        qemu.convert(
            &qcow2,
            ImageFormat::Qcow2,
            &back,
            ImageFormat::Raw,
            opts,
            &mut |p| seen.push(p),
            &cancel,
        )
        .await
        .unwrap();
        assert_eq!(seen.last(), Some(&1.0));
        assert!(std::fs::read(&raw).unwrap() == std::fs::read(&back).unwrap());
    }

    #[tokio::test]
    async fn convert_failure_keeps_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = QemuImg::new("qemu-img");
        let missing = dir.path().join("missing.qcow2");
        let err = qemu
            .convert(
                &missing,
                ImageFormat::Qcow2,
                &dir.path().join("out.raw"),
                ImageFormat::Raw,
                ConvertOptions::default(),
                &mut |_| {},
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        match err {
            ImageError::Qemu {
                command, stderr, ..
            } => {
                assert!(
                    command.contains("convert -p -f qcow2 -O raw -t writeback"),
                    "{command}"
                );
                assert!(stderr.contains("missing.qcow2"), "{stderr}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn cancel_kills_a_running_convert_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big.raw");
        random_raw(&src, 1 << 30, 1 << 20, 65536, 99);
        let dst = dir.path().join("big-target.qcow2");
        let qemu = QemuImg::new("qemu-img");
        let cancel = CancellationToken::new();
        let mut fired = None;
        let err = qemu
            .convert(
                &src,
                ImageFormat::Raw,
                &dst,
                ImageFormat::Qcow2,
                ConvertOptions::default(),
                &mut |_| {
                    if fired.is_none() {
                        fired = Some(Instant::now());
                        cancel.cancel();
                    }
                },
                &cancel,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::Cancelled), "{err:?}");
        let latency = fired.expect("a progress value came first").elapsed();
        assert!(latency < Duration::from_secs(1), "{latency:?}");
        assert_eq!(processes_mentioning(dst.to_str().unwrap()), 0);
    }

    #[tokio::test]
    async fn cancel_kills_a_stuck_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("stuck-marker");
        let qemu = fake_qemu(
            dir.path(),
            &format!(
                "printf '    (0.00/100%%)\\r'\nexec sleep 30 # {}",
                marker.display()
            ),
        );
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let err = qemu
            .convert(
                Path::new("/dev/null"),
                ImageFormat::Raw,
                &dir.path().join("out"),
                ImageFormat::Raw,
                ConvertOptions::default(),
                &mut |_| cancel.cancel(),
                &cancel,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::Cancelled), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(processes_mentioning(marker.to_str().unwrap()), 0);
        // Cancelled before the start: qemu-img never runs.
        let err = qemu
            .convert(
                Path::new("/dev/null"),
                ImageFormat::Raw,
                &dir.path().join("out"),
                ImageFormat::Raw,
                ConvertOptions::default(),
                &mut |_| {},
                &cancel,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::Cancelled));
    }
}
