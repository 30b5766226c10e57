//! Shared helpers of the integration tests: the simulator and the daemon as real processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use xenapinfs::xenapi::codec::Value as Xml;
use xenapinfs::xenapi::codec::{self, Decoded, Value};
use xenapinfs::xenapi::{ClientSettings, Password, TlsTrust, TransportSettings, XenApiClient};

pub const SIM_PASSWORD: &str = "sim-secret";
pub const VM_UUID: &str = "5d6a2a1e-8d5e-4d8b-9a53-0f4c6c1f2b7a";

/// Options of a simulator run.
#[derive(Debug, Default, Clone)]
pub struct SimOptions {
    pub tls: bool,
    pub pool_slave: bool,
    pub extra: Vec<String>,
}

/// A running `xenapinfs-sim` in its own temporary directory; stopped with SIGTERM on drop.
pub struct Sim {
    child: Option<Child>,
    pub url: String,
    pub slave_url: Option<String>,
    pub fingerprint: Option<String>,
    pub ca_file: PathBuf,
    pub export: PathBuf,
    pub dev_dir: PathBuf,
    pub call_log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Sim {
    pub fn start(options: SimOptions) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        let dev_dir = dir.path().join("dev");
        std::fs::create_dir_all(&export).unwrap();
        std::fs::create_dir_all(&dev_dir).unwrap();
        let ca_file = dir.path().join("sim-ca.pem");
        let call_log = dir.path().join("calls.jsonl");
        let mut command = Command::new(env!("CARGO_BIN_EXE_xenapinfs-sim"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--password",
                SIM_PASSWORD,
                "--vm-uuid",
                VM_UUID,
            ])
            .arg("--export")
            .arg(&export)
            .arg("--dev-dir")
            .arg(&dev_dir)
            .arg("--call-log")
            .arg(&call_log)
            .args(["--auth-failure-delay-ms", "0"])
            .args(&options.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if options.tls {
            command.arg("--tls").arg("--tls-ca-out").arg(&ca_file);
        }
        if options.pool_slave {
            command.arg("--pool-slave");
        }
        let mut child = command.spawn().expect("start xenapinfs-sim");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line.trim().to_string();
        assert!(
            url.starts_with("http"),
            "simulator printed {url:?} instead of its URL"
        );
        let slave_url = options.pool_slave.then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            line.trim().to_string()
        });
        // Keep reading both streams so the simulator never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let fingerprint = if options.tls {
            let mut found = None;
            let mut line = String::new();
            while stderr.read_line(&mut line).unwrap_or(0) > 0 {
                if let Some((_, fp)) = line.split_once("SHA-256 fingerprint:") {
                    found = Some(fp.trim().to_string());
                    break;
                }
                line.clear();
            }
            Some(found.expect("simulator printed no TLS fingerprint"))
        } else {
            None
        };
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            if !rest.trim().is_empty() {
                eprintln!("[sim stderr] {rest}");
            }
        });
        Sim {
            child: Some(child),
            url,
            slave_url,
            fingerprint,
            ca_file,
            export,
            dev_dir,
            call_log,
            dir,
        }
    }

    pub fn plain() -> Sim {
        Sim::start(SimOptions::default())
    }

    /// A client of this simulator with the given trust policy.
    pub fn client_with(&self, url: &str, password: &str, trust: TlsTrust) -> XenApiClient {
        XenApiClient::new(ClientSettings {
            url: reqwest::Url::parse(url).unwrap(),
            username: "root".into(),
            password: Password::new(password),
            transport: TransportSettings {
                trust,
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(30),
                originator: "xenapinfs-tests".into(),
            },
        })
        .unwrap()
    }

    pub fn client(&self) -> XenApiClient {
        self.client_with(&self.url, SIM_PASSWORD, TlsTrust::Insecure)
    }

    /// Calls one of the simulator's own `simulator.*` control methods.
    pub async fn control(&self, method: &str, params: &[Value]) -> Value {
        let http = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let body = codec::encode_call(method, params);
        let response = http.post(&self.url).body(body).send().await.unwrap();
        let bytes = response.bytes().await.unwrap();
        match codec::decode_response(&bytes).unwrap() {
            Decoded::Success(value) => value,
            Decoded::Failure(f) => panic!("{method} failed: {f}"),
        }
    }

    /// XenAPI methods the simulator received, from its call log.
    pub fn logged_methods(&self) -> Vec<String> {
        std::fs::read_to_string(&self.call_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|entry| entry["method"].as_str().map(str::to_string))
            .collect()
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        terminate(self.child.take().expect("already stopped"))
    }
}

/// SIGTERM, then wait for the exit.
pub fn terminate(mut child: Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_with_timeout(&mut child, Duration::from_secs(20))
}

impl Drop for Sim {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Entries of a directory, sorted, for leftover checks.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A configuration file for `xenapinfsd` pointing at `sim`, in the simulator's directory. The
/// share is a plain directory here, so the share mount check is off.
pub fn daemon_config(sim: &Sim, extra: &str) -> PathBuf {
    let password = format!("xenapi_connection_password = \"{SIM_PASSWORD}\"\n{extra}");
    write_daemon_config(
        sim.dir.path(),
        &sim.url,
        &sim.export,
        &sim.dev_dir,
        &password,
    )
}

/// A daemon configuration in `dir` for the simulator at `url`; `lines` carries the password
/// setting and anything else.
pub fn write_daemon_config(
    dir: &Path,
    url: &str,
    export: &Path,
    dev_dir: &Path,
    lines: &str,
) -> PathBuf {
    let uuid_file = dir.join("hypervisor-uuid");
    std::fs::write(&uuid_file, format!("{VM_UUID}\n")).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let text = format!(
        "xenapi_connection_url = \"{url}\"\n\
         xenapi_nfs_server = \"nfs.example\"\n\
         xenapi_nfs_serverpath = \"/volumes\"\n\
         xenapi_sr_base_path = \"{export}\"\n\
         share_mount_check = false\n\
         socket = \"{socket}\"\n\
         state_dir = \"{state}\"\n\
         hypervisor_uuid_path = \"{uuid}\"\n\
         device_dir = \"{dev}\"\n{lines}",
        export = export.display(),
        socket = dir.join("xenapinfs.sock").display(),
        state = dir.join("state").display(),
        uuid = uuid_file.display(),
        dev = dev_dir.display(),
    );
    let path = dir.join("xenapinfs.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `xenapinfsd`; SIGTERM on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Daemon {
    /// Warnings and errors only, to the test's stderr: the tests' own output stays readable.
    pub fn start(config: &Path) -> Daemon {
        Self::start_logging(config, None, "warn")
    }

    /// The daemon logging at `level`, into `log` (without colours) or to the test's stderr.
    pub fn start_logging(config: &Path, log: Option<&Path>, level: &str) -> Daemon {
        let text = std::fs::read_to_string(config).unwrap();
        let socket = text
            .lines()
            .find_map(|l| l.strip_prefix("socket = \""))
            .map(|s| PathBuf::from(s.trim_end_matches('"')))
            .unwrap();
        let stderr = match log {
            Some(log) => Stdio::from(std::fs::File::create(log).unwrap()),
            None => Stdio::inherit(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_xenapinfsd"))
            .env("RUST_LOG", level)
            .env("NO_COLOR", "1")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "xenapinfsd did not create its socket: {}",
                log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child: Some(child),
            socket,
        }
    }

    /// Runs the real CLI against this daemon; returns (exit ok, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_xenapinfs"));
        command.arg("--socket").arg(&self.socket).args(args);
        run_captured(&mut command)
    }

    /// SIGKILL, as a crash: nothing of the daemon's own clean-up runs.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("already stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `xenapinfs status --json`, polled until the agent has decided its mode.
    pub fn settled_status(&self) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let (ok, out, err) = self.cli(&["status", "--json"]);
            assert!(ok, "status failed: {err}");
            let status: serde_json::Value = serde_json::from_str(&out).unwrap();
            if status["mode"] != "undecided" {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "mode never decided: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        terminate(self.child.take().expect("already stopped"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// SRs, PBDs and VBDs xapi knows about, by uuid, for leftover checks.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct XapiObjects {
    pub srs: Vec<String>,
    pub pbds: Vec<String>,
    pub vbds: Vec<String>,
    pub vdis: Vec<String>,
}

impl Sim {
    pub async fn objects(&self) -> XapiObjects {
        use xenapinfs::xenapi::{Pbd, Sr, Vbd, Vdi};
        let client = self.client();
        let mut objects = XapiObjects {
            srs: client
                .get_all_records::<Sr>()
                .await
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.uuid)
                .collect(),
            pbds: client
                .get_all_records::<Pbd>()
                .await
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.uuid)
                .collect(),
            vbds: client
                .get_all_records::<Vbd>()
                .await
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.uuid)
                .collect(),
            vdis: client
                .get_all_records::<Vdi>()
                .await
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.uuid)
                .collect(),
        };
        objects.srs.sort();
        objects.pbds.sort();
        objects.vbds.sort();
        objects.vdis.sort();
        client.logout().await;
        objects
    }

    /// SR directories on the export.
    pub fn sr_dirs(&self) -> Vec<String> {
        entries(&self.export)
    }
}

/// The simulator and a daemon using it, with the XenAPI state from before the daemon started.
pub struct World {
    pub sim: Sim,
    pub daemon: Daemon,
    pub baseline: XapiObjects,
}

impl World {
    pub async fn start() -> World {
        Self::start_with("").await
    }

    pub async fn start_with(extra_config: &str) -> World {
        let sim = Sim::plain();
        let baseline = sim.objects().await;
        let daemon = Daemon::start(&daemon_config(&sim, extra_config));
        daemon.settled_status();
        World {
            sim,
            daemon,
            baseline,
        }
    }

    /// Runs the CLI with `--json`; panics with stderr if it fails.
    pub fn ok(&self, args: &[&str]) -> Json {
        let mut all = args.to_vec();
        all.push("--json");
        let (ok, out, err) = self.daemon.cli(&all);
        assert!(ok, "xenapinfs {args:?} failed: {err}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("xenapinfs {args:?} printed non-JSON ({e}): {out}"))
    }

    /// Runs the CLI expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.daemon.cli(args);
        assert!(
            !ok,
            "xenapinfs {args:?} should have failed but printed {out}"
        );
        err
    }

    pub fn create(&self, size_gb: u64, name: &str) -> String {
        let volume = self.ok(&[
            "volume",
            "create",
            "--size",
            &size_gb.to_string(),
            "--name",
            name,
        ]);
        volume["id"].as_str().unwrap().to_string()
    }

    /// Nothing introduced in xapi beyond what was there before the daemon started.
    pub async fn assert_xapi_clean(&self) {
        let now = self.sim.objects().await;
        assert_eq!(now.srs, self.baseline.srs, "SRs left introduced in xapi");
        assert_eq!(now.pbds, self.baseline.pbds, "PBDs left in xapi");
        assert_eq!(now.vbds, self.baseline.vbds, "VBDs left in xapi");
    }

    pub fn vhd(&self, id: &str) -> std::path::PathBuf {
        let (sr, vdi) = id.split_once('/').unwrap();
        self.sim.export.join(sr).join(format!("{vdi}.vhd"))
    }

    pub async fn control(&self, method: &str, params: &[Xml]) {
        self.sim.control(method, params).await;
    }

    /// Starts a snapshot of `id` whose copy takes `copy_ms` in the simulator (from then on);
    /// returns the job's id.
    pub async fn slow_snapshot(&self, id: &str, copy_ms: i32) -> String {
        self.control("simulator.set_delay", &[s("VDI.copy"), Xml::Int(copy_ms)])
            .await;
        let job = self.ok(&["volume", "snapshot", id, "--no-wait"]);
        job["id"].as_str().unwrap().to_string()
    }
}

pub fn s(text: &str) -> Xml {
    Xml::String(text.to_string())
}

/// The raw content of a VHD, as an independent reader (qemu-img) sees it.
pub fn raw_content(vhd: &std::path::Path) -> Vec<u8> {
    let out = vhd.with_extension("raw-check");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(vhd)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    bytes
}

/// Runs qemu-img with `args`; panics with its stderr on failure.
pub fn qemu_img(args: &[&str]) {
    let output = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A raw disk image of `size` bytes with recognisable data in a few places (and holes).
pub fn patterned_raw(path: &Path, size: u64) -> Vec<u8> {
    let mut content = vec![0u8; size as usize];
    for (start, length) in [
        (0usize, 4096usize),
        (3 << 20, 1 << 20),
        ((size as usize) - 8192, 8192),
    ] {
        for (i, byte) in content[start..start + length].iter_mut().enumerate() {
            *byte = ((i * 7 + start / 4096) % 253) as u8 + 1;
        }
    }
    std::fs::write(path, &content).unwrap();
    content
}

/// Files and directories the agent stages on the share; none may outlive an operation.
pub fn staging_leftovers(export: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![export.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".xenapinfs-")
                || name.ends_with(".tmp")
                || name.ends_with(".partial")
            {
                found.push(path.clone());
            }
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    found
}

/// An HTTP server for image URLs: GET serves files from `dir`, PUT stores into it; both want
/// the header `X-Auth-Token: <token>`.
pub async fn image_server(dir: PathBuf, token: &'static str) -> String {
    use axum::body::Bytes;
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    type Shared = std::sync::Arc<PathBuf>;
    fn allowed(headers: &HeaderMap, token: &str) -> bool {
        headers.get("x-auth-token").and_then(|v| v.to_str().ok()) == Some(token)
    }
    let app = axum::Router::new()
        .route(
            "/images/{name}",
            get(
                move |State(dir): State<Shared>,
                      UrlPath(name): UrlPath<String>,
                      headers: HeaderMap| async move {
                    if !allowed(&headers, token) {
                        return Err(StatusCode::UNAUTHORIZED);
                    }
                    std::fs::read(dir.join(name)).map_err(|_| StatusCode::NOT_FOUND)
                },
            )
            .put(
                move |State(dir): State<Shared>,
                      UrlPath(name): UrlPath<String>,
                      headers: HeaderMap,
                      body: Bytes| async move {
                    if !allowed(&headers, token) {
                        return StatusCode::UNAUTHORIZED;
                    }
                    std::fs::write(dir.join(name), &body).unwrap();
                    StatusCode::CREATED
                },
            ),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(std::sync::Arc::new(dir));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/images/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Asserts that the disk in `vhd` holds `raw`'s bytes followed by zeros, as qemu-img sees it
/// (`qemu-img compare` treats the larger disk's excess as zeros, without writing anything).
pub fn assert_same_disk(raw: &Path, vhd: &Path, what: &str) {
    assert_same_image(raw, vhd, "vpc", what);
}

/// Asserts that the image `image` (qemu driver `driver`) holds `raw`'s bytes followed by zeros.
pub fn assert_same_image(raw: &Path, image: &Path, driver: &str, what: &str) {
    let output = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", driver])
        .arg(raw)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{what}: {} differs from {}: {}{}",
        image.display(),
        raw.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Sim {
    /// The simulator's process id (to stop and continue it, as a host that hangs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("simulator stopped").id()
    }
}

/// A path as the `&str` a command line takes (test paths are UTF-8).
pub fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img convert` of the raw `source` into `format` at `target`.
pub fn make_image(source: &Path, format: &str, target: &Path) {
    let driver = if format == "vhd" { "vpc" } else { format };
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        driver,
        text(source),
        text(target),
    ]);
}

/// Runs `command` to the end: (exit ok, stdout, stderr).
pub fn run_captured(command: &mut Command) -> (bool, String, String) {
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
