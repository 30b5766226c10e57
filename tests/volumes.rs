//! Every volume operation through the real CLI, the real daemon and the simulator, checking what
//! a user sees and that nothing is left behind in XenAPI or on the share.

mod support;

use std::io::{Seek, SeekFrom, Write};

use serde_json::Value;
use support::{World, raw_content, s};
use xenapinfs::xenapi::codec::Value as Xml;

const GIB: u64 = 1 << 30;

#[tokio::test]
async fn create_show_list_delete() {
    let world = World::start().await;
    let volume = world.ok(&[
        "volume",
        "create",
        "--size",
        "1",
        "--name",
        "db-1",
        "--description",
        "orders",
    ]);
    let id = volume["id"].as_str().unwrap().to_string();
    assert_eq!(volume["size_gb"], 1.0);
    assert_eq!(volume["name"], "db-1");
    assert_eq!(volume["description"], "orders");
    assert_eq!(
        format!(
            "{}/{}",
            volume["sr_uuid"].as_str().unwrap(),
            volume["vdi_uuid"].as_str().unwrap()
        ),
        id
    );
    assert!(world.vhd(&id).is_file());
    world.assert_xapi_clean().await;

    let listed = world.ok(&["volume", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    let shown = world.ok(&["volume", "show", &id]);
    assert_eq!(shown["name"], "db-1");
    assert_eq!(shown["chain"].as_array().unwrap().len(), 1);

    let (ok, table, _) = world.daemon.cli(&["volume", "list"]);
    assert!(
        ok && table.contains("db-1") && table.contains("1.00 GiB"),
        "{table}"
    );

    let deleted = world.ok(&["volume", "delete", &id]);
    assert_eq!(deleted["deleted"], true);
    assert!(
        world.sim.sr_dirs().is_empty(),
        "SR directory must be gone: {:?}",
        world.sim.sr_dirs()
    );
    world.assert_xapi_clean().await;
    let error = world.fails(&["volume", "show", &id]);
    assert!(error.contains("does not exist"), "{error}");
}

#[tokio::test]
async fn extend_grows_and_refuses_to_shrink() {
    let world = World::start().await;
    let id = world.create(1, "grow");
    let grown = world.ok(&["volume", "extend", &id, "--size", "3"]);
    assert_eq!(grown["size_bytes"], 3 * GIB);
    let error = world.fails(&["volume", "extend", &id, "--size", "2"]);
    assert!(error.contains("shrinking"), "{error}");
    assert_eq!(world.ok(&["volume", "show", &id])["size_bytes"], 3 * GIB);
    world.assert_xapi_clean().await;
}

#[tokio::test]
async fn connection_info_is_the_old_drivers_xensm_dict() {
    let world = World::start().await;
    let id = world.create(1, "web");
    let (sr, vdi) = id.split_once('/').unwrap();
    let info = world.ok(&["volume", "connection", &id]);
    assert_eq!(
        info,
        serde_json::json!({
            "driver_volume_type": "xensm",
            "data": {
                "name_label": "web",
                "name_description": "",
                "sr_uuid": sr,
                "vdi_uuid": vdi,
                "sr_type": "nfs",
                "server": "nfs.example",
                "serverpath": "/volumes",
                "introduce_sr_keys": ["sr_type", "server", "serverpath"],
            }
        })
    );
}

#[tokio::test]
async fn attach_write_detach_snapshot_clone_and_grow_from_snapshot_keep_the_data() {
    let world = World::start().await;
    let id = world.create(1, "data");

    let attached = world.ok(&["volume", "attach", &id]);
    let device = attached["device"].as_str().unwrap().to_string();
    assert_eq!(
        std::path::Path::new(&device).parent().unwrap(),
        world.sim.dev_dir
    );
    let pattern: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    {
        let mut disk = std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .unwrap();
        disk.seek(SeekFrom::Start(5 << 20)).unwrap();
        disk.write_all(&pattern).unwrap();
        disk.sync_all().unwrap();
    }
    let error = world.fails(&["volume", "attach", &id]);
    assert!(error.contains("already attached"), "{error}");
    world.ok(&["volume", "detach", &id]);
    assert!(
        !std::path::Path::new(&device).exists(),
        "the device goes away on detach"
    );
    world.assert_xapi_clean().await;

    let original = raw_content(&world.vhd(&id));
    assert_eq!(&original[5 << 20..8 << 20], &pattern[..]);

    let snapshot = world.ok(&["volume", "snapshot", &id, "--name", "snap"]);
    let snap_id = snapshot["id"].as_str().unwrap().to_string();
    assert_eq!(snapshot["name"], "snap");
    assert_eq!(raw_content(&world.vhd(&snap_id)), original);

    let clone = world.ok(&["volume", "clone", &id]);
    assert_eq!(
        raw_content(&world.vhd(clone["id"].as_str().unwrap())),
        original
    );

    let restored = world.ok(&["volume", "from-snapshot", &snap_id, "--size", "2"]);
    assert_eq!(
        restored["size_bytes"],
        2 * GIB,
        "the requested size is honoured"
    );
    let restored_raw = raw_content(&world.vhd(restored["id"].as_str().unwrap()));
    assert_eq!(&restored_raw[..original.len()], &original[..]);

    assert_eq!(world.ok(&["volume", "list"]).as_array().unwrap().len(), 4);
    let jobs = world.ok(&["job", "list"]);
    assert_eq!(jobs.as_array().unwrap().len(), 3);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "succeeded" && j["progress"] == 100.0)
    );
    world.assert_xapi_clean().await;
}

#[tokio::test]
async fn a_failing_copy_is_reported_and_leaves_nothing_behind() {
    let world = World::start().await;
    let id = world.create(1, "src");
    let dirs_before = world.sim.sr_dirs();
    world
        .control(
            "simulator.inject_fault",
            &[
                s("VDI.copy"),
                Xml::Int(1),
                s("SR_BACKEND_FAILURE_44"),
                Xml::Array(vec![s(""), s("There is insufficient space"), s("")]),
            ],
        )
        .await;
    let error = world.fails(&["volume", "snapshot", &id]);
    assert!(error.contains("SR_BACKEND_FAILURE_44"), "{error}");
    assert_eq!(
        world.sim.sr_dirs(),
        dirs_before,
        "no SR directory of the failed copy may remain"
    );
    world.assert_xapi_clean().await;
    let jobs = world.ok(&["job", "list"]);
    assert_eq!(jobs[0]["state"], "failed");
    assert!(
        jobs[0]["message"]
            .as_str()
            .unwrap()
            .contains("insufficient space")
    );
}

#[tokio::test]
async fn a_failing_pbd_plug_is_reported_and_the_sr_is_forgotten() {
    let world = World::start().await;
    let id = world.create(1, "x");
    world
        .control(
            "simulator.inject_fault",
            &[
                s("PBD.plug"),
                Xml::Int(1),
                s("SR_BACKEND_FAILURE_73"),
                Xml::Array(vec![s(""), s("NFS mount error"), s("")]),
            ],
        )
        .await;
    let error = world.fails(&["volume", "delete", &id]);
    assert!(error.contains("SR_BACKEND_FAILURE_73"), "{error}");
    world.assert_xapi_clean().await;
    assert!(
        world.vhd(&id).is_file(),
        "a failed delete leaves the volume intact"
    );
    world.ok(&["volume", "delete", &id]);
    assert!(world.sim.sr_dirs().is_empty());
}

#[tokio::test]
async fn an_expiring_session_is_invisible_to_the_user() {
    let world = World::start().await;
    let id = world.create(1, "a");
    world.control("simulator.expire_sessions", &[]).await;
    world.ok(&["volume", "extend", &id, "--size", "2"]);
    world.control("simulator.expire_sessions", &[]).await;
    world.ok(&["volume", "snapshot", &id]);
    world.assert_xapi_clean().await;
}

#[tokio::test]
async fn cancelling_a_snapshot_job_leaves_nothing_behind() {
    let world = World::start().await;
    let id = world.create(1, "big");
    let dirs_before = world.sim.sr_dirs();
    world
        .control("simulator.set_delay", &[s("VDI.copy"), Xml::Int(20_000)])
        .await;
    let job = world.ok(&["volume", "snapshot", &id, "--no-wait"]);
    assert_eq!(job["state"], "running");
    let job_id = job["id"].as_str().unwrap();
    // Wait until the copy is under way, then cancel it.
    for _ in 0..200 {
        if world.ok(&["job", "show", job_id])["progress"]
            .as_f64()
            .unwrap()
            > 5.0
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    world.ok(&["job", "cancel", job_id]);
    let mut state = Value::Null;
    for _ in 0..400 {
        state = world.ok(&["job", "show", job_id]);
        if state["state"] != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(state["state"], "cancelled", "{state}");
    assert_eq!(world.sim.sr_dirs(), dirs_before);
    world.assert_xapi_clean().await;
}

#[tokio::test]
async fn attach_in_remote_mode_is_refused_with_the_reason() {
    let world = World::start_with("mode = \"remote\"\n").await;
    let id = world.create(1, "r");
    let error = world.fails(&["volume", "attach", &id]);
    assert!(
        error.contains("remote mode") && error.contains("mode = remote"),
        "{error}"
    );
    world.assert_xapi_clean().await;
}

#[tokio::test]
async fn stats_report_real_capacity() {
    let world = World::start().await;
    world.create(2, "s");
    let stats = world.ok(&["stats"]);
    assert!(stats["total_capacity_gb"].as_f64().unwrap() > 0.0);
    assert!(stats["free_capacity_gb"].as_f64().unwrap() > 0.0);
    assert_eq!(stats["provisioned_capacity_gb"], 2.0);
    assert_eq!(stats["volumes"], 1);
    assert_eq!(stats["storage_protocol"], "xensm");
}

#[tokio::test]
async fn bad_ids_and_requests_get_clear_errors() {
    let world = World::start().await;
    let error = world.fails(&["volume", "show", "../../etc"]);
    assert!(error.contains("is not a UUID"), "{error}");
    let error = world.fails(&["volume", "show", "vol-1"]);
    assert!(
        error.contains("not of the form <sr_uuid>/<vdi_uuid>"),
        "{error}"
    );
    let error = world.fails(&["volume", "create", "--size", "0"]);
    assert!(error.contains("size 0 GiB"), "{error}");
    let error = world.fails(&[
        "volume",
        "delete",
        "11111111-2222-4333-8444-555555555555/11111111-2222-4333-8444-666666666666",
    ]);
    assert!(error.contains("does not exist"), "{error}");
    let error = world.fails(&["job", "show", "nope"]);
    assert!(error.contains("does not exist"), "{error}");

    let client = xenapinfs::api::client::ApiClient::new(&world.daemon.socket);
    let error = client
        .get::<Value>("/v1/volumes/x/..")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a UUID"), "{error}");
    let error = client
        .request::<Value>(
            "POST",
            "/v1/volumes",
            Some(serde_json::json!({"size_gb": 1, "colour": "red"})),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("colour"), "{error}");
    assert!(world.sim.sr_dirs().is_empty());
}
