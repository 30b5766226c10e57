//! The daemon as systemd runs it, without systemd: a datagram socket as NOTIFY_SOCKET,
//! socket activation through `systemd-socket-activate`, signals.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Sim, daemon_config, terminate};

/// Collects what the daemon tells "systemd".
struct NotifySocket {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            socket,
            seen: Vec::new(),
        }
    }

    /// Reads messages until one satisfies `want`, within `limit`.
    fn wait_for(&mut self, limit: Duration, want: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        let mut buffer = [0u8; 4096];
        while started.elapsed() < limit {
            if let Ok(n) = self.socket.recv(&mut buffer) {
                let message = String::from_utf8_lossy(&buffer[..n]).trim_end().to_string();
                self.seen.push(message.clone());
                if message.lines().any(&want) {
                    return message;
                }
            }
        }
        panic!(
            "no matching notification within {limit:?}; saw {:?}",
            self.seen
        );
    }
}

fn start_daemon(
    config: &std::path::Path,
    notify: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xenapinfsd"));
    command
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", notify)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

#[test]
fn ready_status_watchdog_and_stopping_reach_systemd_in_order() {
    let sim = Sim::plain();
    let config = daemon_config(&sim, "");
    let mut notify = NotifySocket::bind(&sim.dir.path().join("notify.sock"));
    let daemon = start_daemon(
        &config,
        &sim.dir.path().join("notify.sock"),
        &[("WATCHDOG_USEC", "400000")],
    );

    notify.wait_for(Duration::from_secs(10), |m| m == "READY=1");
    let status_before_ready = notify
        .seen
        .iter()
        .position(|m| m.starts_with("STATUS="))
        .unwrap();
    let ready = notify.seen.iter().position(|m| m == "READY=1").unwrap();
    assert!(
        status_before_ready < ready,
        "the first STATUS says what happened before READY: {:?}",
        notify.seen
    );
    assert!(
        notify.seen[status_before_ready].contains("XenAPI connected"),
        "{:?}",
        notify.seen
    );

    // WATCHDOG_USEC = 0.4 s: pings every 0.2 s.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(1) {
        notify.wait_for(Duration::from_secs(1), |m| m == "WATCHDOG=1");
        pings += 1;
    }
    assert!((3..=8).contains(&pings), "{pings} watchdog pings in 1 s");

    let status = terminate(daemon);
    assert!(status.success(), "{status:?}");
    notify.wait_for(Duration::from_secs(2), |m| m == "STOPPING=1");
}

#[test]
fn a_bad_config_on_sighup_is_refused_and_the_old_one_stays() {
    let sim = Sim::plain();
    let config = daemon_config(&sim, "");
    let socket_path = sim.dir.path().join("notify.sock");
    let mut notify = NotifySocket::bind(&socket_path);
    let daemon = start_daemon(&config, &socket_path, &[]);
    notify.wait_for(Duration::from_secs(10), |m| m == "READY=1");

    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}mode = \"sideways\"\n")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    notify.wait_for(Duration::from_secs(5), |m| m.starts_with("RELOADING=1"));
    let refused = notify.wait_for(Duration::from_secs(5), |m| {
        m.starts_with("STATUS=reload refused")
    });
    assert!(refused.contains("mode"), "{refused}");
    notify.wait_for(Duration::from_secs(5), |m| m == "READY=1");

    let output = Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
        .arg("--socket")
        .arg(sim.dir.path().join("xenapinfs.sock"))
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "still serving after a refused reload"
    );
    assert!(terminate(daemon).success());
}

#[test]
fn socket_activation_serves_on_the_socket_systemd_passes() {
    let sim = Sim::plain();
    let config = daemon_config(&sim, "");
    let socket = sim.dir.path().join("activated.sock");
    let activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(env!("CARGO_BIN_EXE_xenapinfsd"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which takes over the listening socket.
    let output = Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
        .arg("--socket")
        .arg(&socket)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        !sim.dir.path().join("xenapinfs.sock").exists(),
        "an activated daemon must not bind its configured path"
    );
    assert!(terminate(activator).success());
}
