//! The real `xenapinfsd` binary against the simulator, driven by the real CLI over its socket.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::{Daemon, Sim, VM_UUID, daemon_config};
use tokio_util::sync::CancellationToken;

#[test]
fn status_shows_local_mode_and_an_established_session() {
    let sim = Sim::plain();
    let mut daemon = Daemon::start(&daemon_config(&sim, ""));
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o660,
        "control socket must be group-accessible only"
    );

    let status = daemon.settled_status();
    assert_eq!(status["mode"], "local", "{status}");
    assert_eq!(status["vm_uuid"], VM_UUID);
    assert_eq!(status["xenapi"]["session"], "established");
    assert_eq!(status["xenapi"]["url"], sim.url);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));

    let (ok, text, _) = daemon.cli(&["status"]);
    assert!(ok);
    assert!(text.contains("mode          local"), "{text}");

    assert!(
        daemon.stop().success(),
        "SIGTERM must end the daemon cleanly"
    );
    assert!(
        !daemon.socket.exists(),
        "the socket file is removed on exit"
    );
    assert_eq!(
        sim.logged_methods().last().map(String::as_str),
        Some("session.logout")
    );
}

#[test]
fn status_explains_remote_mode() {
    let sim = Sim::plain();
    let config = daemon_config(&sim, "");
    std::fs::remove_file(sim.dir.path().join("hypervisor-uuid")).unwrap();
    let daemon = Daemon::start(&config);
    let status = daemon.settled_status();
    assert_eq!(status["mode"], "remote");
    assert!(
        status["mode_reason"]
            .as_str()
            .unwrap()
            .contains("hypervisor-uuid"),
        "{status}"
    );

    let sim_other = Sim::plain();
    let config = daemon_config(&sim_other, "");
    std::fs::write(
        sim_other.dir.path().join("hypervisor-uuid"),
        "0c0ffee0-0000-4000-8000-000000000000\n",
    )
    .unwrap();
    let daemon = Daemon::start(&config);
    let status = daemon.settled_status();
    assert_eq!(status["mode"], "remote");
    assert!(
        status["mode_reason"]
            .as_str()
            .unwrap()
            .contains("not known"),
        "{status}"
    );
}

#[test]
fn unreachable_xenapi_is_reported_and_retried() {
    let sim = Sim::plain();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/", listener.local_addr().unwrap());
    drop(listener);
    let config = daemon_config(&sim, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&sim.url, &dead);
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start(&config);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out, _) = daemon.cli(&["status", "--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["mode"], "undecided");
    assert_eq!(status["xenapi"]["session"], "none");
    assert!(
        status["xenapi"]["last_error"]
            .as_str()
            .unwrap()
            .contains("connection"),
        "{status}"
    );
}

#[test]
fn bad_configuration_exits_with_a_message_naming_the_key() {
    let sim = Sim::plain();
    let config = daemon_config(&sim, "mode = \"sideways\"\n");
    let output = Command::new(env!("CARGO_BIN_EXE_xenapinfsd"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("mode") && stderr.contains("xenapinfs.toml"),
        "{stderr}"
    );
}

#[test]
fn cinder_conf_options_are_accepted() {
    let sim = Sim::plain();
    let path = sim.dir.path().join("cinder.conf");
    std::fs::write(
        &path,
        format!(
            "[DEFAULT]\nenabled_backends = xen\n[xen]\nxenapi_connection_url = {}\nxenapi_connection_password = {}\n\
             xenapi_nfs_server = nfs.example\nxenapi_nfs_serverpath = /volumes\n",
            sim.url,
            support::SIM_PASSWORD
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xenapinfsd"))
        .args(["--cinder-conf"])
        .arg(&path)
        .args(["--backend", "xen", "--check-config"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_cli_says_clearly_when_the_daemon_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is the service running?"), "{stderr}");
}

#[tokio::test]
async fn the_daemon_core_runs_in_process_and_stops_on_its_token() {
    let sim = Sim::plain();
    let settings = xenapinfs::config::load(&daemon_config(&sim, ""), None).unwrap();
    let listener =
        xenapinfs::service::bind_socket(&settings.socket, &settings.socket_group).unwrap();
    let client = xenapinfs::api::client::ApiClient::new(&settings.socket);
    let agent = Arc::new(xenapinfs::service::Agent::new(settings).unwrap());
    let shutdown = CancellationToken::new();
    let notifier = Arc::new(xenapinfs::service::notify::SystemdNotifier::default());
    let server = tokio::spawn(xenapinfs::service::run(
        listener,
        agent,
        notifier,
        None,
        shutdown.clone(),
    ));

    let health: serde_json::Value = client.get("/v1/health").await.unwrap();
    assert_eq!(health["status"], "ok");
    let error = client
        .get::<serde_json::Value>("/v1/nothing")
        .await
        .unwrap_err();
    assert!(
        matches!(error, xenapinfs::api::client::ClientError::Api { status: 404, ref kind, .. } if kind == "not_found")
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
