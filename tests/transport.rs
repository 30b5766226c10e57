//! Transport security from the daemon's side: TLS to the simulator under every trust policy of
//! the configuration, seen through `xenapinfs status`; and the XenAPI password, which must never
//! show up in the daemon's log, its status, its error messages, its metrics or on the
//! simulator's call log.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use support::{Daemon, SIM_PASSWORD, Sim, SimOptions, daemon_config};
use xenapinfs::xenapi::codec;

/// The daemon with its log in `log` (no colours), at `level`.
fn start_daemon(config: &Path, log: &Path, level: &str) -> Daemon {
    Daemon::start_logging(config, Some(log), level)
}

/// `xenapinfs status --json`, polled until XenAPI has failed at least once.
fn failed_status(daemon: &Daemon) -> Json {
    let started = Instant::now();
    loop {
        let (ok, out, err) = daemon.cli(&["status", "--json"]);
        assert!(ok, "status failed: {err}");
        let status: Json = serde_json::from_str(&out).unwrap();
        if !status["xenapi"]["last_error"].is_null() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no XenAPI error ever shown: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

mod tls {
    use super::*;

    fn tls_sim() -> Sim {
        Sim::start(SimOptions {
            tls: true,
            ..SimOptions::default()
        })
    }

    /// A daemon using the TLS simulator with `trust` (configuration lines) and its log.
    fn tls_daemon(sim: &Sim, trust: &str) -> (Daemon, PathBuf) {
        let config = daemon_config(sim, trust);
        let log = sim.dir.path().join("daemon.log");
        (start_daemon(&config, &log, "info"), log)
    }

    fn assert_connected(daemon: &Daemon, sim: &Sim) {
        let status = daemon.settled_status();
        assert_eq!(status["mode"], "local", "{status}");
        assert_eq!(status["xenapi"]["session"], "established", "{status}");
        assert!(status["xenapi"]["last_error"].is_null(), "{status}");
        assert!(sim.url.starts_with("https://"));
        assert!(
            sim.logged_methods()
                .contains(&"session.login_with_password".into())
        );
    }

    /// The daemon stays undecided, status names the certificate problem (JSON and text), and
    /// the password never went to the unverified host.
    fn assert_refused(daemon: &Daemon, sim: &Sim, words: &[&str]) -> String {
        let status = failed_status(daemon);
        assert_eq!(status["mode"], "undecided", "{status}");
        assert_eq!(status["xenapi"]["session"], "none", "{status}");
        let error = status["xenapi"]["last_error"].as_str().unwrap().to_string();
        assert!(error.contains("TLS"), "not named a TLS failure: {error}");
        for word in words {
            assert!(
                error.to_lowercase().contains(&word.to_lowercase()),
                "{word:?} missing from {error}"
            );
        }
        let (ok, text, _) = daemon.cli(&["status"]);
        assert!(ok);
        assert!(text.contains(words[0]), "plain status hides it: {text}");
        // Operations say the agent is not ready rather than trying anyway.
        let (ok, _, err) = daemon.cli(&["volume", "create", "--size", "1"]);
        assert!(!ok);
        assert!(err.contains("has not reached XenAPI"), "{err}");
        assert!(
            err.to_lowercase().contains(&words[0].to_lowercase()),
            "the refusal says why: {err}"
        );
        assert!(
            sim.logged_methods().is_empty(),
            "calls reached an unverified host: {:?}",
            sim.logged_methods()
        );
        assert!(sim.sr_dirs().is_empty());
        error
    }

    #[test]
    fn the_right_ca_file_connects() {
        let sim = tls_sim();
        let (daemon, _) = tls_daemon(
            &sim,
            &format!("xenapi_ca_file = \"{}\"\n", sim.ca_file.display()),
        );
        assert_connected(&daemon, &sim);
        let (ok, _, err) = daemon.cli(&["volume", "create", "--size", "1"]);
        assert!(ok, "{err}");
    }

    #[test]
    fn a_wrong_ca_file_is_refused_and_status_names_the_certificate_problem() {
        let sim = tls_sim();
        // Another self-signed CA, which did not issue the simulator's certificate.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "some other CA");
        let other = params.self_signed(&key).unwrap();
        let other_ca = sim.dir.path().join("other-ca.pem");
        std::fs::write(&other_ca, other.pem()).unwrap();

        let (daemon, log) = tls_daemon(
            &sim,
            &format!("xenapi_ca_file = \"{}\"\n", other_ca.display()),
        );
        let error = assert_refused(&daemon, &sim, &["certificate"]);
        assert!(
            error.contains("UnknownIssuer") || error.to_lowercase().contains("unknown issuer"),
            "the issuer is the problem: {error}"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("XenAPI not usable yet"), "{text}");
    }

    #[test]
    fn a_pinned_fingerprint_connects_in_either_notation() {
        let sim = tls_sim();
        let pin = sim.fingerprint.clone().unwrap();
        let (daemon, _) = tls_daemon(&sim, &format!("xenapi_tls_fingerprint = \"{pin}\"\n"));
        assert_connected(&daemon, &sim);
        drop(daemon);

        let plain_hex = pin.replace(':', "").to_lowercase();
        let (daemon, _) = tls_daemon(&sim, &format!("xenapi_tls_fingerprint = \"{plain_hex}\"\n"));
        assert_connected(&daemon, &sim);
    }

    #[test]
    fn a_wrong_pin_is_refused_and_says_so() {
        let sim = tls_sim();
        let wrong = ["AB"; 32].join(":");
        let (daemon, _) = tls_daemon(&sim, &format!("xenapi_tls_fingerprint = \"{wrong}\"\n"));
        let error = assert_refused(&daemon, &sim, &["fingerprint", "does not match"]);
        assert!(error.contains(&wrong), "the pin is named: {error}");
        assert!(
            error.contains(sim.fingerprint.as_deref().unwrap()),
            "the presented fingerprint is named, so the operator can compare: {error}"
        );
    }

    #[test]
    fn the_system_trust_store_refuses_a_private_ca() {
        let sim = tls_sim();
        let (daemon, _) = tls_daemon(&sim, "");
        assert_refused(&daemon, &sim, &["certificate"]);
    }

    #[test]
    fn insecure_connects_and_warns_at_start() {
        let sim = tls_sim();
        let (daemon, log) = tls_daemon(&sim, "xenapi_insecure = true\n");
        assert_connected(&daemon, &sim);
        let text = std::fs::read_to_string(&log).unwrap();
        let warning = text
            .lines()
            .find(|l| l.contains("xenapi_insecure = true"))
            .unwrap_or_else(|| panic!("no warning about xenapi_insecure:\n{text}"));
        assert!(warning.contains("WARN"), "{warning}");
        assert!(warning.contains("NOT verified"), "{warning}");
    }

    #[test]
    fn plain_http_is_warned_about() {
        let sim = Sim::plain();
        let config = daemon_config(&sim, "");
        let log = sim.dir.path().join("daemon.log");
        let daemon = start_daemon(&config, &log, "info");
        daemon.settled_status();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.lines()
                .any(|l| l.contains("WARN") && l.contains("plain HTTP")),
            "{text}"
        );
    }

    #[test]
    fn an_unreadable_ca_file_is_a_clear_error() {
        let sim = tls_sim();
        let missing = sim.dir.path().join("no-such-ca.pem");
        let config = daemon_config(
            &sim,
            &format!("xenapi_ca_file = \"{}\"\n", missing.display()),
        );
        let output = Command::new(env!("CARGO_BIN_EXE_xenapinfsd"))
            .arg("--config")
            .arg(&config)
            .arg("--check-config")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(
            !output.status.success(),
            "accepted a missing CA file: {text}"
        );
        assert!(text.contains("xenapi_ca_file"), "{text}");
        assert!(text.contains(&missing.display().to_string()), "{text}");
    }
}

/// The distinctive password of these tests.
const SECRET: &str = "pw-Zq7!unique-4711";

/// A simulator whose root password is [`SECRET`] (the shared helper's is fixed).
struct SecretSim {
    child: Option<Child>,
    url: String,
    export: PathBuf,
    dev_dir: PathBuf,
    call_log: PathBuf,
    stderr_log: PathBuf,
    dir: tempfile::TempDir,
}

impl SecretSim {
    fn start() -> SecretSim {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        let dev_dir = dir.path().join("dev");
        std::fs::create_dir_all(&export).unwrap();
        std::fs::create_dir_all(&dev_dir).unwrap();
        let call_log = dir.path().join("calls.jsonl");
        let stderr_log = dir.path().join("sim.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_xenapinfs-sim"))
            .args(["--listen", "127.0.0.1:0", "--password", SECRET])
            .args(["--vm-uuid", support::VM_UUID])
            .args(["--auth-failure-delay-ms", "0"])
            .arg("--export")
            .arg(&export)
            .arg("--dev-dir")
            .arg(&dev_dir)
            .arg("--call-log")
            .arg(&call_log)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut url = String::new();
        stdout.read_line(&mut url).unwrap();
        let url = url.trim().to_string();
        assert!(url.starts_with("http"), "{url:?}");
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        SecretSim {
            child: Some(child),
            url,
            export,
            dev_dir,
            call_log,
            stderr_log,
            dir,
        }
    }

    /// A daemon configuration with `password_line` (the password setting).
    fn config(&self, password_line: &str) -> PathBuf {
        support::write_daemon_config(
            self.dir.path(),
            &self.url,
            &self.export,
            &self.dev_dir,
            &format!("{password_line}\n"),
        )
    }

    /// Calls one of the simulator's `simulator.*` hooks.
    async fn control(&self, method: &str, params: &[codec::Value]) {
        let body = codec::encode_call(method, params);
        let response = reqwest::Client::new()
            .post(&self.url)
            .body(body)
            .send()
            .await
            .unwrap();
        let bytes = response.bytes().await.unwrap();
        assert!(
            matches!(
                codec::decode_response(&bytes).unwrap(),
                codec::Decoded::Success(_)
            ),
            "{method} failed"
        );
    }
}

impl Drop for SecretSim {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            support::terminate(child);
        }
    }
}

fn s(text: &str) -> codec::Value {
    codec::Value::String(text.to_string())
}

/// Everything a secret could leak into, as (what, text).
async fn leak_places(sim: &SecretSim, daemon: &Daemon, log: &Path) -> Vec<(String, String)> {
    let mut places = Vec::new();
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["job", "list", "--json"],
        &["stats", "--json"],
        &["volume", "list", "--json"],
    ] {
        let (_, out, err) = daemon.cli(args);
        places.push((format!("xenapinfs {args:?}"), out + &err));
    }
    let metrics = xenapinfs::api::client::ApiClient::new(&daemon.socket)
        .send("GET", "/metrics", None)
        .await
        .unwrap();
    use http_body_util::BodyExt;
    let body = metrics.into_body().collect().await.unwrap().to_bytes();
    let metrics = String::from_utf8_lossy(&body).into_owned();
    assert!(
        metrics.contains("xenapinfs_xenapi_calls_total"),
        "{metrics}"
    );
    places.push(("GET /metrics".into(), metrics));
    places.push((
        "simulator call log".into(),
        std::fs::read_to_string(&sim.call_log).unwrap_or_default(),
    ));
    places.push((
        "simulator stderr".into(),
        std::fs::read_to_string(&sim.stderr_log).unwrap_or_default(),
    ));
    places.push((
        "daemon log".into(),
        std::fs::read_to_string(log).unwrap_or_default(),
    ));
    places
}

fn assert_no_secret(places: &[(String, String)], secrets: &[&str]) {
    for (what, text) in places {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "the password appears in the {what}:\n{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_never_shows_in_logs_status_errors_metrics_or_the_call_log() {
    let sim = SecretSim::start();
    let config = sim.config(&format!("xenapi_connection_password = \"{SECRET}\""));
    let log = sim.dir.path().join("daemon.log");
    let daemon = start_daemon(&config, &log, "trace");
    let status = daemon.settled_status();
    assert_eq!(status["xenapi"]["session"], "established", "{status}");

    // Work that succeeds, and work that fails in xapi: a refused create, a failing copy job.
    let (ok, out, err) = daemon.cli(&["volume", "create", "--size", "1", "--json"]);
    assert!(ok, "{err}");
    let volume: Json = serde_json::from_str(&out).unwrap();
    let id = volume["id"].as_str().unwrap().to_string();
    sim.control(
        "simulator.inject_fault",
        &[
            s("VDI.create"),
            codec::Value::Int(1),
            s("SR_BACKEND_FAILURE_44"),
            codec::Value::Array(vec![s("insufficient space")]),
        ],
    )
    .await;
    let (ok, _, create_error) = daemon.cli(&["volume", "create", "--size", "1"]);
    assert!(!ok);
    assert!(
        create_error.contains("SR_BACKEND_FAILURE_44"),
        "{create_error}"
    );
    sim.control(
        "simulator.inject_fault",
        &[
            s("VDI.copy"),
            codec::Value::Int(1),
            s("SR_BACKEND_FAILURE_78"),
        ],
    )
    .await;
    let (ok, _, snapshot_error) = daemon.cli(&["volume", "snapshot", &id]);
    assert!(!ok);
    assert!(!snapshot_error.is_empty());

    // Sessions expire as after a xapi restart: the agent logs in again with the password.
    sim.control("simulator.expire_sessions", &[]).await;
    let (ok, _, err) = daemon.cli(&["volume", "extend", &id, "--size", "2"]);
    assert!(ok, "{err}");
    let (ok, _, err) = daemon.cli(&["volume", "delete", &id]);
    assert!(ok, "{err}");
    let logins = std::fs::read_to_string(&sim.call_log)
        .unwrap()
        .matches("session.login_with_password")
        .count();
    assert!(logins >= 2, "the agent did not log in again");

    let mut places = leak_places(&sim, &daemon, &log).await;
    places.push(("failing create".into(), create_error));
    places.push(("failing snapshot".into(), snapshot_error));
    assert!(
        places
            .iter()
            .any(|(what, text)| what == "daemon log" && text.contains("DEBUG")),
        "the daemon did not log at debug level"
    );
    assert_no_secret(&places, &[SECRET]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_reported_without_echoing_either_password() {
    let sim = SecretSim::start();
    let wrong = "pw-Wr0ng!distinct-9182";
    // From a file this time, as packages configure it.
    let secret_file = sim.dir.path().join("password");
    std::fs::write(&secret_file, format!("{wrong}\n")).unwrap();
    let config = sim.config(&format!(
        "xenapi_connection_password_file = \"{}\"",
        secret_file.display()
    ));
    let log = sim.dir.path().join("daemon.log");
    let daemon = start_daemon(&config, &log, "trace");
    let status = failed_status(&daemon);
    let error = status["xenapi"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("SESSION_AUTHENTICATION_FAILED"),
        "the error says the login was refused: {error}"
    );
    let (ok, _, create_error) = daemon.cli(&["volume", "create", "--size", "1"]);
    assert!(!ok);
    assert!(
        create_error.contains("SESSION_AUTHENTICATION_FAILED"),
        "the refusal says why: {create_error}"
    );

    let mut places = leak_places(&sim, &daemon, &log).await;
    places.push(("refused create".into(), create_error));
    assert_no_secret(&places, &[wrong, SECRET]);
}

#[test]
fn configuration_errors_do_not_quote_the_password() {
    let sim = Sim::plain();
    let base = std::fs::read_to_string(daemon_config(&sim, "")).unwrap();
    let path = sim.dir.path().join("broken.toml");
    let password_line = format!("xenapi_connection_password = \"{SIM_PASSWORD}\"");
    assert!(base.contains(&password_line));
    let digits = "4711084213";
    for (broken, secret) in [
        // A syntax error on the password's line.
        (
            format!("xenapi_connection_password = \"{SECRET}\" trailing"),
            SECRET,
        ),
        // An unterminated string.
        (format!("xenapi_connection_password = \"{SECRET}"), SECRET),
        // The wrong type.
        (
            format!("xenapi_connection_password = [\"{SECRET}\"]"),
            SECRET,
        ),
        // A password of digits, unquoted: an integer where a string belongs.
        (format!("xenapi_connection_password = {digits}"), digits),
        // A key given twice.
        (
            format!("{password_line}\nxenapi_connection_password = \"{SECRET}\""),
            SECRET,
        ),
    ] {
        std::fs::write(&path, base.replace(&password_line, &broken)).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_xenapinfsd"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(78), "{broken}: {text}");
        assert!(text.contains("broken.toml"), "the file is named: {text}");
        assert!(text.contains("line "), "the line is named: {text}");
        assert!(
            !text.contains(secret) && !text.contains(SIM_PASSWORD),
            "the configuration error quotes the password: {text}"
        );
    }
}
