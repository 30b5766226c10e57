//! Faults against the real daemon: XenAPI misbehaving (through the simulator's fault injection,
//! hangs and a stopped host), the share filling up, qemu-img dying. Each time the user sees a
//! clear error or the operation completes after recovery, and nothing is left behind.
//!
//! Faults covered elsewhere: a failing `VDI.copy`, a failing `PBD.plug` and session expiry
//! between operations (tests/volumes.rs), SIGKILL of the agent (tests/crash.rs).

mod support;

use support::{make_image, text};

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{
    Sim, SimOptions, World, assert_same_disk, daemon_config, patterned_raw, s, staging_leftovers,
};
use xenapinfs::xenapi::codec::Value as Xml;

const MIB: u64 = 1 << 20;

async fn fail_next(world: &World, method: &str, times: i32, code: &str) {
    for nth in 1..=times {
        world
            .control(
                "simulator.inject_fault",
                &[s(method), Xml::Int(nth), s(code)],
            )
            .await;
    }
}

/// Waits until `check` holds, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn a_failing_vbd_plug_is_reported_and_undone() {
    let world = World::start().await;
    let id = world.create(1, "plug");
    let dirs = world.sim.sr_dirs();
    fail_next(&world, "VBD.plug", 1, "SR_BACKEND_FAILURE_47").await;
    let error = world.fails(&["volume", "attach", &id]);
    assert!(error.contains("SR_BACKEND_FAILURE_47"), "{error}");
    world.assert_xapi_clean().await;
    assert_eq!(world.sim.sr_dirs(), dirs);
    // The same fault during an import in local mode: the old content stays.
    let raw = world.sim.dir.path().join("disk.raw");
    patterned_raw(&raw, 4 * MIB);
    let qcow2 = world.sim.dir.path().join("disk.qcow2");
    make_image(&raw, "qcow2", &qcow2);
    let before = std::fs::read(world.vhd(&id)).unwrap();
    fail_next(&world, "VBD.plug", 1, "SR_BACKEND_FAILURE_47").await;
    let error = world.fails(&["volume", "import", &id, text(&qcow2)]);
    assert!(error.contains("SR_BACKEND_FAILURE_47"), "{error}");
    assert_eq!(std::fs::read(world.vhd(&id)).unwrap(), before);
    world.assert_xapi_clean().await;
    assert!(staging_leftovers(&world.sim.export).is_empty());
}

#[tokio::test]
async fn vbd_unplug_refused_several_times_is_retried_until_it_works() {
    let world = World::start().await;
    let id = world.create(1, "busy-guest");
    world.ok(&["volume", "attach", &id]);
    fail_next(&world, "VBD.unplug", 3, "DEVICE_DETACH_REJECTED").await;
    world.ok(&["volume", "detach", &id]);
    let unplugs = world
        .sim
        .logged_methods()
        .iter()
        .filter(|m| *m == "VBD.unplug")
        .count();
    assert_eq!(unplugs, 4, "three refusals, then success");
    world.assert_xapi_clean().await;
}

#[tokio::test]
async fn a_copy_task_that_hangs_is_cancelled_after_the_stall_timeout() {
    let world = World::start_with("xenapi_task_stall_timeout = 2\n").await;
    let id = world.create(1, "source");
    let dirs = world.sim.sr_dirs();
    world
        .control("simulator.set_hang", &[s("VDI.copy"), Xml::Bool(true)])
        .await;
    let started = Instant::now();
    let error = world.fails(&["volume", "snapshot", &id]);
    assert!(
        error.contains("made no progress for 2 s"),
        "the error says the task hung: {error}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    world
        .control("simulator.set_hang", &[s("VDI.copy"), Xml::Bool(false)])
        .await;
    world.assert_xapi_clean().await;
    assert_eq!(world.sim.sr_dirs(), dirs, "the half-made copy is gone");
}

/// A 3 s snapshot of `id` during which the simulator's `disturbance` happens must succeed.
async fn snapshot_survives(world: &World, id: &str, disturbance: &str) {
    let job = world.slow_snapshot(id, 3_000).await;
    eventually(Duration::from_secs(20), "copy under way", || {
        world.ok(&["job", "show", &job])["progress"]
            .as_f64()
            .unwrap()
            > 10.0
    });
    world.control(disturbance, &[]).await;
    eventually(Duration::from_secs(30), "the job ends", || {
        world.ok(&["job", "show", &job])["state"] != "running"
    });
    let done = world.ok(&["job", "show", &job]);
    assert_eq!(done["state"], "succeeded", "after {disturbance}: {done}");
}

#[tokio::test]
async fn a_session_expiring_during_a_copy_is_invisible_to_the_user() {
    let world = World::start().await;
    let id = world.create(1, "source");
    snapshot_survives(&world, &id, "simulator.expire_sessions").await;
    world.assert_xapi_clean().await;
}

#[tokio::test]
async fn a_pool_member_that_is_not_the_master_redirects_every_login_and_the_master_may_move() {
    let sim = Sim::start(SimOptions {
        pool_slave: true,
        ..Default::default()
    });
    let baseline = sim.objects().await;
    let slave = sim.slave_url.clone().unwrap();
    let config = daemon_config(&sim, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&sim.url, &slave);
    std::fs::write(&config, text).unwrap();
    let daemon = support::Daemon::start(&config);
    daemon.settled_status();
    let world = World {
        sim,
        daemon,
        baseline,
    };
    let id = world.create(1, "pooled");
    world.control("simulator.expire_sessions", &[]).await;
    world.ok(&["volume", "snapshot", &id]);
    // The master moves to the other host in the middle of a copy: the agent follows.
    snapshot_survives(&world, &id, "simulator.move_master").await;
    world
        .control("simulator.set_delay", &[s("VDI.copy"), Xml::Int(0)])
        .await;
    world.ok(&["volume", "extend", &id, "--size", "2"]);
    let status = world.ok(&["status"]);
    assert!(
        status["xenapi"]["url"]
            .as_str()
            .is_some_and(|u| u.trim_end_matches('/') == slave.trim_end_matches('/')),
        "the agent now talks to the new master: {status}"
    );
    let status = world.ok(&["status"]);
    assert_eq!(status["mode"], "local", "{status}");
    world.assert_xapi_clean().await;
}

/// SIGSTOP/SIGCONT of the simulator: a host that stops answering, then comes back.
fn freeze(sim: &Sim, on: bool) {
    let signal = if on { Signal::SIGSTOP } else { Signal::SIGCONT };
    kill(Pid::from_raw(sim.pid() as i32), signal).unwrap();
}

#[tokio::test]
async fn an_unreachable_host_is_reported_retried_and_recovered_without_restart() {
    let timeouts = "xenapi_request_timeout = 2\nxenapi_connect_timeout = 1\n";
    let sim = Sim::plain();
    let baseline = sim.objects().await;
    freeze(&sim, true);
    let daemon = support::Daemon::start(&daemon_config(&sim, timeouts));
    // Not reachable at start: status says so, operations are refused with the reason.
    eventually(Duration::from_secs(20), "status names the problem", || {
        let (_, out, _) = daemon.cli(&["status", "--json"]);
        out.contains("timed out")
    });
    let (ok, _, error) = daemon.cli(&["volume", "create", "--size", "1"]);
    assert!(!ok && error.contains("not reached XenAPI"), "{error}");
    freeze(&sim, false);
    daemon.settled_status();
    let world = World {
        sim,
        daemon,
        baseline,
    };
    let id = world.create(1, "after-outage");

    // Unreachable in the middle of an operation: a clear error, then the clean-up that could
    // not run is retried once the host answers again.
    world
        .control("simulator.set_delay", &[s("VDI.resize"), Xml::Int(1_500)])
        .await;
    let plugs = |world: &World| {
        let log = world.sim.logged_methods();
        log.iter().filter(|m| *m == "PBD.plug").count()
    };
    let plugs_before = plugs(&world);
    let extend = std::process::Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
        .arg("--socket")
        .arg(&world.daemon.socket)
        .args(["volume", "extend", &id, "--size", "2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the resize is under way", || {
        plugs(&world) > plugs_before
    });
    std::thread::sleep(Duration::from_millis(500));
    freeze(&world.sim, true);
    let output = extend.wait_with_output().unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(error.contains("timed out"), "{error}");
    std::thread::sleep(Duration::from_secs(3));
    freeze(&world.sim, false);
    let started = Instant::now();
    loop {
        let now = world.sim.objects().await;
        if now.srs == world.baseline.srs && now.pbds == world.baseline.pbds {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the interrupted clean-up was not retried: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    world.assert_xapi_clean().await;
    let size = world.ok(&["volume", "show", &id])["size_gb"]
        .as_f64()
        .unwrap();
    assert!(size == 1.0 || size == 2.0, "whole sizes only: {size}");
}

/// A size-limited filesystem mounted over the export (unmounted on drop).
struct SmallShare(std::path::PathBuf);

impl SmallShare {
    fn mount(dir: &Path, size: &str) -> Self {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a small tmpfs needs root");
        SmallShare(dir.to_path_buf())
    }
}

impl Drop for SmallShare {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn the_share_filling_up_during_an_import_fails_cleanly() {
    let sim = Sim::plain();
    let _small = SmallShare::mount(&sim.export, "48m");
    let baseline = sim.objects().await;
    let daemon = support::Daemon::start(&daemon_config(&sim, "mode = \"remote\"\n"));
    daemon.settled_status();
    let world = World {
        sim,
        daemon,
        baseline,
    };
    let small = world.sim.dir.path().join("small.raw");
    patterned_raw(&small, 4 * MIB);
    let id = world.ok(&["volume", "create", "--size", "1", "--image", text(&small)]);
    let id = id["id"].as_str().unwrap().to_string();
    let listed = world.ok(&["volume", "list"]);
    // 96 MiB that does not compress: twice what is left on the share.
    let big = world.sim.dir.path().join("big.raw");
    let mut random = vec![0u8; 96 * MIB as usize];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in random.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&big, &random).unwrap();
    let error = world.fails(&["volume", "import", &id, text(&big)]);
    assert!(
        error.contains("No space left on device"),
        "the error names the full share: {error}"
    );
    assert_same_disk(&small, &world.vhd(&id), "the volume keeps its content");
    assert_eq!(world.ok(&["volume", "list"]), listed);
    assert!(staging_leftovers(&world.sim.export).is_empty());
    world.assert_xapi_clean().await;
    // Space is back: the next import works.
    world.ok(&["volume", "import", &id, text(&small)]);
}

/// Pid of a `qemu-img convert` writing onto a device under `dev_dir`.
fn converting_qemu_img(dev_dir: &Path) -> Option<i32> {
    let dev = dev_dir.to_str().unwrap();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_convert = args.first().is_some_and(|a| a.ends_with("qemu-img"))
                && args.get(1).is_some_and(|a| a == "convert")
                && args.iter().any(|a| a.starts_with(dev));
            is_convert.then_some(pid)
        })
}

#[tokio::test]
async fn qemu_img_killed_mid_convert_fails_the_import_and_keeps_the_volume() {
    let world = World::start().await;
    let dir = world.sim.dir.path();
    let old = dir.join("old.raw");
    patterned_raw(&old, 4 * MIB);
    let id = world.ok(&["volume", "create", "--size", "1", "--image", text(&old)]);
    let id = id["id"].as_str().unwrap().to_string();
    let raw = dir.join("new.raw");
    patterned_raw(&raw, 512 * MIB);
    let qcow2 = dir.join("new.qcow2");
    make_image(&raw, "qcow2", &qcow2);
    let import = std::process::Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
        .arg("--socket")
        .arg(&world.daemon.socket)
        .args(["volume", "import", &id, text(&qcow2)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let pid = loop {
        if let Some(pid) = converting_qemu_img(&world.sim.dev_dir) {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "qemu-img convert never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let output = import.wait_with_output().unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        error.contains("qemu-img") && error.contains("SIGKILL"),
        "the error names qemu-img and how it died: {error}"
    );
    assert_same_disk(&old, &world.vhd(&id), "the volume keeps its content");
    assert!(staging_leftovers(&world.sim.export).is_empty());
    world.assert_xapi_clean().await;
}
