//! Crash safety: `xenapinfsd` is killed with SIGKILL at every step of a snapshot and of an image
//! import, restarted, and must leave xapi, the share and the volumes as if the operation had
//! either never happened or fully happened, and report the interrupted job.
//!
//! Every XenAPI call is slowed down in the simulator, so "after the k-th call of the operation"
//! is a window in which the kill lands before the next call takes effect.

mod support;

use support::{make_image, text};

use std::time::{Duration, Instant};

use serde_json::Value as Json;
use support::{Daemon, World, XapiObjects, assert_same_disk, patterned_raw, s, staging_leftovers};
use xenapinfs::xenapi::codec::Value as Xml;

const MIB: u64 = 1 << 20;

/// Delay of every XenAPI call while an operation is being cut short.
const CALL_DELAY_MS: i32 = 150;

/// Everything a crash could leave behind, as seen from outside the agent.
#[derive(Debug, PartialEq)]
struct Footprint {
    xapi: XapiObjects,
    volumes: Vec<String>,
    /// SR directory -> VHD files in it.
    files: Vec<(String, Vec<String>)>,
}

async fn footprint(world: &World) -> Footprint {
    let volumes = world.ok(&["volume", "list"]);
    let mut volumes: Vec<String> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    volumes.sort();
    let mut files = Vec::new();
    for sr in world.sim.sr_dirs() {
        let mut vhds = support::entries(&world.sim.export.join(&sr));
        vhds.retain(|f| f.ends_with(".vhd"));
        files.push((sr, vhds));
    }
    Footprint {
        xapi: world.sim.objects().await,
        volumes,
        files,
    }
}

async fn set_delay(world: &World, millis: i32) {
    world
        .control("simulator.set_delay", &[s("*"), Xml::Int(millis)])
        .await;
}

/// Kills the daemon with SIGKILL once the simulator has answered `calls` more XenAPI calls than
/// `before` (the next call is still in its delay then). The loop only reads the call log, so
/// it notices each call within milliseconds.
fn kill_after_calls(world: &mut World, before: usize, calls: usize, job: &str) {
    let started = Instant::now();
    while world.sim.logged_methods().len() < before + calls {
        if started.elapsed() > Duration::from_secs(60) {
            let (_, out, _) = world.daemon.cli(&["job", "show", job, "--json"]);
            panic!("the operation never made {calls} calls: {out}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    world.daemon.kill();
    // xapi finishes a call whose client died; so does the simulator. Recovery must cope with
    // that call's effect, so it runs after the call is done, as after a real restart.
    let mut seen = world.sim.logged_methods().len();
    loop {
        std::thread::sleep(Duration::from_millis(3 * CALL_DELAY_MS as u64));
        let now = world.sim.logged_methods().len();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Starts the agent again on the same state directory and waits until it serves (which is
/// after recovery).
fn restart(world: &mut World) {
    let config = world.sim.dir.path().join("xenapinfs.toml");
    let _ = std::fs::remove_file(&world.daemon.socket);
    world.daemon = Daemon::start(&config);
    world.daemon.settled_status();
}

/// The id of the one running job of `kind`, once it shows.
fn running_job(world: &World, kind: &str) -> String {
    let started = Instant::now();
    loop {
        let (_, out, _) = world.daemon.cli(&["job", "list", "--json"]);
        let jobs: Json = serde_json::from_str(&out).unwrap_or(Json::Null);
        let running = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["kind"] == kind && j["state"] == "running");
        if let Some(job) = running {
            return job["id"].as_str().unwrap().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no {kind} job started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After restart: nothing is left in xapi or staging, and the job is reported as interrupted
/// (`None`: the operation made fewer calls than counted, ended before the kill, and is not
/// in the journal: the caller checks its result is whole).
async fn assert_recovered(
    world: &World,
    job: &str,
    before: &Footprint,
    point: &str,
) -> Option<Json> {
    let after = footprint(world).await;
    assert_eq!(after.xapi.srs, before.xapi.srs, "{point}: SRs left in xapi");
    assert_eq!(after.xapi.pbds, before.xapi.pbds, "{point}: PBDs left");
    assert_eq!(after.xapi.vbds, before.xapi.vbds, "{point}: VBDs left");
    assert!(
        staging_leftovers(&world.sim.export).is_empty(),
        "{point}: staging left: {:?}",
        staging_leftovers(&world.sim.export)
    );
    let jobs = world.ok(&["job", "list"]);
    let record = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job)?
        .clone();
    let message = record["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("interrupted"),
        "{point}: job message {message:?}"
    );
    assert!(
        matches!(record["state"].as_str(), Some("failed" | "succeeded")),
        "{point}: {record}"
    );
    assert!(
        !message.contains("clean-up incomplete"),
        "{point}: {message}"
    );
    Some(record)
}

#[tokio::test]
async fn a_snapshot_killed_at_any_call_is_rolled_back_or_finished() {
    let mut world = World::start().await;
    let dir = world.sim.dir.path().to_path_buf();
    let raw = dir.join("disk.raw");
    patterned_raw(&raw, 8 * MIB);
    let source = world.ok(&["volume", "create", "--size", "1", "--image", text(&raw)]);
    let source = source["id"].as_str().unwrap().to_string();
    let before = footprint(&world).await;

    // A complete snapshot, to learn how many calls one makes.
    let calls_before = world.sim.logged_methods().len();
    let copy = world.ok(&["volume", "snapshot", &source]);
    let calls = world.sim.logged_methods().len() - calls_before;
    world.ok(&["volume", "delete", copy["id"].as_str().unwrap()]);
    assert_eq!(footprint(&world).await, before);

    let (mut rolled_back, mut finished, mut ended_first) = (0, 0, 0);
    for point in 1..calls {
        set_delay(&world, CALL_DELAY_MS).await;
        let calls_before = world.sim.logged_methods().len();
        let job = world.ok(&["volume", "snapshot", &source, "--no-wait"]);
        let job = job["id"].as_str().unwrap().to_string();
        kill_after_calls(&mut world, calls_before, point, &job);
        set_delay(&world, 0).await;
        restart(&mut world);
        let label = format!("snapshot killed after call {point} of {calls}");
        let record = assert_recovered(&world, &job, &before, &label).await;
        let now = footprint(&world).await;
        let new_volume = now.volumes.iter().find(|v| !before.volumes.contains(v));
        match record.as_ref().and_then(|r| r["state"].as_str()) {
            Some("failed") => {
                rolled_back += 1;
                assert_eq!(now, before, "{label}: the share must be as before");
            }
            outcome => {
                match outcome {
                    Some(_) => finished += 1,
                    None => ended_first += 1,
                }
                let new_id = new_volume.unwrap_or_else(|| panic!("{label}: no new volume"));
                assert_eq!(now.volumes.len(), before.volumes.len() + 1, "{label}");
                if let Some(record) = &record {
                    assert_eq!(record["result"]["id"], new_id.as_str(), "{label}");
                }
                assert_same_disk(&raw, &world.vhd(new_id), &label);
                world.ok(&["volume", "delete", new_id]);
            }
        }
        assert_same_disk(&raw, &world.vhd(&source), "the source is never touched");
    }
    eprintln!(
        "snapshot: {} kill points, {rolled_back} rolled back, {finished} finished at restart, \
         {ended_first} ended before the kill (fewer task polls than counted)",
        calls - 1
    );
    assert!(ended_first <= 2, "most kills land inside the operation");
    assert!(
        rolled_back > 0 && finished > 0,
        "both outcomes are exercised"
    );
}

#[tokio::test]
async fn an_image_import_killed_at_any_call_keeps_old_or_new_content_whole() {
    let mut world = World::start().await;
    let dir = world.sim.dir.path().to_path_buf();
    let old = dir.join("old.raw");
    patterned_raw(&old, 8 * MIB);
    let new = dir.join("new.raw");
    let new_len = 8 * MIB as usize;
    std::fs::write(&new, vec![0x5a; new_len]).unwrap();
    let image = dir.join("new.qcow2");
    make_image(&new, "qcow2", &image);
    let volume = world.ok(&["volume", "create", "--size", "1", "--image", text(&old)]);
    let id = volume["id"].as_str().unwrap().to_string();
    let before = footprint(&world).await;

    let calls_before = world.sim.logged_methods().len();
    world.ok(&["volume", "import", &id, text(&image)]);
    let calls = world.sim.logged_methods().len() - calls_before;
    // Back to the old content, for a known start.
    world.ok(&["volume", "import", &id, text(&old)]);
    let before_files = footprint(&world).await;
    assert_eq!(before_files.xapi, before.xapi);

    let (mut rolled_back, mut finished) = (0, 0);
    for point in 1..calls {
        set_delay(&world, CALL_DELAY_MS).await;
        let calls_before = world.sim.logged_methods().len();
        let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
            .arg("--socket")
            .arg(&world.daemon.socket)
            .args(["volume", "import", &id, text(&image), "--json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let job = running_job(&world, "import");
        kill_after_calls(&mut world, calls_before, point, &job);
        set_delay(&world, 0).await;
        assert!(!cli.wait().unwrap().success(), "the CLI saw the agent die");
        restart(&mut world);
        let made = world.sim.logged_methods()[calls_before..].join(" ");
        let label = format!("import killed after call {point} of {calls} ({made})");
        let record = assert_recovered(&world, &job, &before, &label)
            .await
            .unwrap_or_else(|| serde_json::json!({"state": "ended before the kill"}));
        let now = footprint(&world).await;
        assert_eq!(now.volumes, before.volumes, "{label}");
        assert_eq!(
            now.files, before_files.files,
            "{label}: the SR directory holds exactly the volume's VHD"
        );
        match record["state"].as_str() {
            Some("succeeded" | "ended before the kill") => {
                finished += 1;
                assert_same_disk(&new, &world.vhd(&id), &label);
                world.ok(&["volume", "import", &id, text(&old)]);
            }
            _ => {
                rolled_back += 1;
                let is_new = support::raw_content(&world.vhd(&id))[..new_len]
                    == std::fs::read(&new).unwrap()[..];
                assert!(
                    !is_new,
                    "{label}: rolled back, yet the new content is in: {record}"
                );
                assert_same_disk(&old, &world.vhd(&id), &label);
            }
        }
    }
    eprintln!(
        "import: {} kill points, {rolled_back} rolled back, {finished} finished",
        calls - 1
    );
    assert!(
        rolled_back > 0,
        "some kills land before the new content is in"
    );
}

#[tokio::test]
async fn sigterm_during_a_job_cancels_it_cleans_up_and_exits_zero() {
    let mut world = World::start().await;
    let source = world.create(1, "busy");
    let before = footprint(&world).await;
    let job = world.slow_snapshot(&source, 20_000).await;
    let started = Instant::now();
    while world.ok(&["job", "show", &job])["message"] != "copying" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "copy never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopping = Instant::now();
    let status = world.daemon.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "stopping took {:?}",
        stopping.elapsed()
    );
    world
        .control("simulator.set_delay", &[s("VDI.copy"), Xml::Int(0)])
        .await;
    let after = footprint_without_daemon(&world).await;
    assert_eq!(after.0, before.xapi, "nothing left in xapi");
    assert_eq!(after.1, before.files, "the share is as before");
    assert!(staging_leftovers(&world.sim.export).is_empty());
    // The cancelled job ended properly: nothing to recover at the next start.
    restart(&mut world);
    let jobs = world.ok(&["job", "list"]);
    assert!(
        !jobs.as_array().unwrap().iter().any(|j| j["id"] == job),
        "a job cancelled at shutdown is not an interrupted one: {jobs}"
    );
}

async fn footprint_without_daemon(world: &World) -> (XapiObjects, Vec<(String, Vec<String>)>) {
    let mut files = Vec::new();
    for sr in world.sim.sr_dirs() {
        let mut vhds = support::entries(&world.sim.export.join(&sr));
        vhds.retain(|f| f.ends_with(".vhd"));
        files.push((sr, vhds));
    }
    (world.sim.objects().await, files)
}

#[tokio::test]
async fn an_attachment_cut_short_by_sigkill_is_undone_at_start_journal_or_not() {
    let mut world = World::start().await;
    let id = world.create(1, "attached");
    let before = footprint(&world).await;

    // The journal knows the attachment: VBD, PBD and SR all go.
    world.ok(&["volume", "attach", &id]);
    assert_eq!(
        world.sim.objects().await.vbds.len(),
        before.xapi.vbds.len() + 1
    );
    world.daemon.kill();
    restart(&mut world);
    assert_eq!(footprint(&world).await, before);

    // Journal lost (a fresh state directory): the VBD still goes, found by its tag.
    world.ok(&["volume", "attach", &id]);
    world.daemon.kill();
    let state = world.sim.dir.path().join("state");
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    restart(&mut world);
    assert_eq!(
        world.sim.objects().await.vbds,
        before.xapi.vbds,
        "a VBD tagged by the agent is removed at start"
    );
    world.ok(&["volume", "attach", &id]);
    world.ok(&["volume", "detach", &id]);
}

#[tokio::test]
async fn sighup_during_a_job_reloads_and_the_job_completes() {
    let world = World::start().await;
    let source = world.create(1, "busy");
    let job = world.slow_snapshot(&source, 3_000).await;
    let config = world.sim.dir.path().join("xenapinfs.toml");
    let changed = std::fs::read_to_string(&config).unwrap() + "xenapi_request_timeout = 30\n";
    std::fs::write(&config, changed).unwrap();
    let pid = world.daemon.child.as_ref().unwrap().id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let started = Instant::now();
    let done = loop {
        let record = world.ok(&["job", "show", &job]);
        if record["state"] != "running" {
            break record;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "job never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["state"], "succeeded", "{done}");
    let status = world.ok(&["status"]);
    assert_ne!(status["mode"], "undecided", "{status}");
    world.ok(&["volume", "delete", done["result"]["id"].as_str().unwrap()]);
    world.assert_xapi_clean().await;
}
