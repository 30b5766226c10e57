//! The simulator started in-process (`xenapinfs::sim::start`): xapi's storage semantics, error
//! codes and the test hooks, driven over real HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xenapinfs::sim::codec::{self, Value};
use xenapinfs::sim::{FaultSpec, Listeners, SimConfig};

const VM_UUID: &str = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const MIB: i64 = 1 << 20;

struct Sim {
    runtime: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    running: Option<xenapinfs::sim::Running>,
    addr: String,
    slave_addr: Option<String>,
    export: PathBuf,
    dev_dir: PathBuf,
    call_log: PathBuf,
    session: String,
    _dir: tempfile::TempDir,
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Struct(
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

fn nfs() -> Value {
    map(&[("server", s("nfs.example")), ("serverpath", s("/volumes"))])
}

impl Sim {
    fn start(adjust: impl FnOnce(&mut SimConfig)) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        let dev_dir = dir.path().join("dev");
        std::fs::create_dir_all(&export).unwrap();
        std::fs::create_dir_all(&dev_dir).unwrap();
        let call_log = dir.path().join("calls.jsonl");
        let mut config = SimConfig::new(&export, &dev_dir);
        config.vm_uuid = Some(VM_UUID.into());
        config.password = Some("pw".into());
        config.auth_failure_delay = Duration::ZERO;
        config.call_log = Some(call_log.clone());
        adjust(&mut config);
        let listeners = Listeners {
            master: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            slave: config
                .pool_slave
                .then(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = runtime
            .block_on(xenapinfs::sim::start(listeners, config, shutdown.clone()))
            .unwrap();
        let strip = |url: &str| {
            url.trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string()
        };
        let mut sim = Sim {
            addr: strip(&running.url),
            slave_addr: running.slave_url.as_deref().map(strip),
            running: Some(running),
            runtime,
            shutdown,
            export,
            dev_dir,
            call_log,
            session: String::new(),
            _dir: dir,
        };
        sim.session = sim.login(&sim.addr.clone()).unwrap();
        sim
    }

    fn raw(&self, addr: &str, method: &str, params: &[Value]) -> Value {
        let body = codec::method_call(method, params);
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(&body).unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        codec::parse_response(&rest).unwrap()
    }

    fn outcome(response: Value) -> Result<Value, Vec<String>> {
        match response["Status"].as_str() {
            Some("Success") => Ok(response["Value"].clone()),
            _ => Err(response["ErrorDescription"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()),
        }
    }

    fn login(&self, addr: &str) -> Result<String, Vec<String>> {
        Self::outcome(self.raw(addr, "session.login_with_password", &[s("root"), s("pw")]))
            .map(|v| v.as_str().unwrap().to_string())
    }

    /// A XenAPI call with this sim's session.
    fn call(&self, method: &str, params: &[Value]) -> Result<Value, Vec<String>> {
        let mut all = vec![s(&self.session)];
        all.extend_from_slice(params);
        Self::outcome(self.raw(&self.addr, method, &all))
    }

    fn ok(&self, method: &str, params: &[Value]) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e:?}"))
    }

    fn text(&self, method: &str, params: &[Value]) -> String {
        self.ok(method, params).as_str().unwrap().to_string()
    }

    fn err(&self, method: &str, params: &[Value]) -> Vec<String> {
        match self.call(method, params) {
            Ok(v) => panic!("{method} should fail, returned {v:?}"),
            Err(e) => e,
        }
    }

    fn control(&self, method: &str, params: &[Value]) {
        Self::outcome(self.raw(&self.addr, method, params)).unwrap();
    }

    fn host(&self) -> String {
        let pools = self.ok("pool.get_all", &[]);
        self.text("pool.get_master", &[pools[0].clone()])
    }

    fn new_sr(&self) -> (String, PathBuf) {
        let host = self.host();
        let sr = self.text(
            "SR.create",
            &[
                s(&host),
                nfs(),
                s("0"),
                s("vol"),
                s(""),
                s("nfs"),
                s("user"),
                Value::Bool(true),
            ],
        );
        let uuid = self.text("SR.get_uuid", &[s(&sr)]);
        (sr, self.export.join(uuid))
    }

    fn new_vdi(&self, sr: &str, size: i64) -> String {
        self.text(
            "VDI.create",
            &[map(&[
                ("SR", s(sr)),
                ("virtual_size", s(&size.to_string())),
                ("type", s("user")),
                ("sharable", Value::Bool(false)),
                ("read_only", Value::Bool(false)),
                ("other_config", map(&[])),
                ("name_label", s("disk")),
            ])],
        )
    }

    fn new_vbd(&self, vdi: &str, userdevice: &str, mode: &str) -> Result<Value, Vec<String>> {
        let vm = self.text("VM.get_by_uuid", &[s(VM_UUID)]);
        self.call(
            "VBD.create",
            &[map(&[
                ("VM", s(&vm)),
                ("VDI", s(vdi)),
                ("userdevice", s(userdevice)),
                ("bootable", Value::Bool(false)),
                ("mode", s(mode)),
                ("type", s("Disk")),
                ("empty", Value::Bool(false)),
                ("other_config", map(&[])),
                ("qos_algorithm_type", s("")),
                ("qos_algorithm_params", map(&[])),
            ])],
        )
    }

    fn vhd_of(&self, vdi: &str) -> PathBuf {
        let sr = self.text("VDI.get_SR", &[s(vdi)]);
        let sr_uuid = self.text("SR.get_uuid", &[s(&sr)]);
        let uuid = self.text("VDI.get_uuid", &[s(vdi)]);
        self.export.join(sr_uuid).join(format!("{uuid}.vhd"))
    }

    fn wait_task(&self, task: &str) -> Value {
        for _ in 0..600 {
            let record = self.ok("task.get_record", &[s(task)]);
            if record["status"].as_str() != Some("pending")
                && record["status"].as_str() != Some("cancelling")
            {
                return record;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("task {task} did not finish");
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            self.runtime.block_on(running.wait());
        }
    }
}

#[test]
fn scan_introduces_dropped_vhds_ignores_hidden_leaves_and_forgets_vanished_files() {
    let sim = Sim::start(|_| {});
    let (sr, dir) = sim.new_sr();
    let dropped = uuid::Uuid::new_v4();
    xenapinfs::vhd::create_dynamic(
        &dir.join(format!("{dropped}.vhd")),
        (8 * MIB) as u64,
        dropped,
    )
    .unwrap();
    let hidden = uuid::Uuid::new_v4();
    let hidden_path = dir.join(format!("{hidden}.vhd"));
    xenapinfs::vhd::create_dynamic(&hidden_path, (2 * MIB) as u64, hidden).unwrap();
    xenapinfs::vhd::set_hidden(&hidden_path, true).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a disk").unwrap();
    sim.ok("SR.scan", &[s(&sr)]);

    let vdi = sim.text("VDI.get_by_uuid", &[s(&dropped.to_string())]);
    let record = sim.ok("VDI.get_record", &[s(&vdi)]);
    assert_eq!(
        record["virtual_size"],
        s(&(8 * MIB).to_string()),
        "int64 arrives as bare digits"
    );
    assert_eq!(record["name_label"], s(""));
    assert_eq!(record["location"], s(&dropped.to_string()));
    assert_eq!(record["managed"], Value::Bool(true));
    assert_eq!(record["read_only"], Value::Bool(false));
    assert_eq!(
        sim.err("VDI.get_by_uuid", &[s(&hidden.to_string())])[0],
        "UUID_INVALID"
    );
    assert_eq!(
        sim.text("SR.get_virtual_allocation", &[s(&sr)]),
        (8 * MIB).to_string()
    );
    assert!(
        sim.text("SR.get_physical_size", &[s(&sr)])
            .parse::<i64>()
            .unwrap()
            > 0
    );

    let junk = dir.join(format!("{}.vhd", uuid::Uuid::new_v4()));
    std::fs::write(&junk, vec![0x55; 4096]).unwrap();
    let error = sim.err("SR.scan", &[s(&sr)]);
    assert_eq!(error[0], "SR_BACKEND_FAILURE_40");
    assert_eq!(error[1], "");
    assert!(error[2].starts_with("The SR scan failed"), "{error:?}");
    std::fs::remove_file(&junk).unwrap();

    std::fs::remove_file(dir.join(format!("{dropped}.vhd"))).unwrap();
    sim.ok("SR.scan", &[s(&sr)]);
    assert_eq!(
        sim.err("VDI.get_record", &[s(&vdi)]),
        ["HANDLE_INVALID", "VDI", vdi.as_str()]
    );
    assert_eq!(sim.text("SR.get_virtual_allocation", &[s(&sr)]), "0");
}

#[test]
fn resize_grows_offline_only() {
    let sim = Sim::start(|_| {});
    let (sr, _) = sim.new_sr();
    let vdi = sim.new_vdi(&sr, 4 * MIB);
    sim.ok("VDI.resize", &[s(&vdi), s(&(5 * MIB).to_string())]);
    assert_eq!(
        sim.text("VDI.get_virtual_size", &[s(&vdi)]),
        (6 * MIB).to_string()
    );
    assert_eq!(
        xenapinfs::vhd::inspect(&sim.vhd_of(&vdi))
            .unwrap()
            .virtual_size,
        6 << 20
    );
    let error = sim.err("VDI.resize", &[s(&vdi), s(&(2 * MIB).to_string())]);
    assert_eq!(error[0], "SR_BACKEND_FAILURE_79");
    assert!(error[2].contains("shrinking not allowed"), "{error:?}");

    let vbd = sim.new_vbd(&vdi, "autodetect", "RW").unwrap();
    sim.ok("VBD.plug", std::slice::from_ref(&vbd));
    assert_eq!(
        sim.err("VDI.resize", &[s(&vdi), s(&(8 * MIB).to_string())]),
        ["VDI_IN_USE", vdi.as_str(), "resize"]
    );
    sim.ok("VBD.unplug", &[vbd]);
}

#[test]
fn copy_makes_an_independent_flat_vhd_sync_and_async() {
    let sim = Sim::start(|_| {});
    let (sr, _) = sim.new_sr();
    let (target, target_dir) = sim.new_sr();
    let vdi = sim.new_vdi(&sr, 4 * MIB);
    let vbd = sim.new_vbd(&vdi, "autodetect", "RW").unwrap();
    sim.ok("VBD.plug", std::slice::from_ref(&vbd));
    let device = sim
        .dev_dir
        .join(sim.text("VBD.get_device", std::slice::from_ref(&vbd)));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .unwrap();
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(3 << 20)).unwrap();
        file.write_all(b"copied data").unwrap();
        file.sync_all().unwrap();
    }
    assert_eq!(
        sim.err("VDI.copy", &[s(&vdi), s(&target)]),
        ["VDI_IN_USE", vdi.as_str(), "copy"]
    );
    sim.ok("VBD.unplug", &[vbd]);

    let copy = sim.text("VDI.copy", &[s(&vdi), s(&target)]);
    assert_eq!(sim.text("VDI.get_SR", &[s(&copy)]), target);
    assert_eq!(sim.text("VDI.get_name_label", &[s(&copy)]), "disk");
    let path = sim.vhd_of(&copy);
    assert!(path.starts_with(&target_dir));
    let info = xenapinfs::vhd::check(&path).unwrap();
    assert!(info.parent.is_none());
    assert_eq!(info.uuid.to_string(), sim.text("VDI.get_uuid", &[s(&copy)]));
    let mut reader = xenapinfs::vhd::ChainReader::open(&path).unwrap();
    let mut buf = vec![0; 11];
    reader.read_at(3 << 20, &mut buf).unwrap();
    assert_eq!(buf, b"copied data");

    let task = sim.text("Async.VDI.copy", &[s(&vdi), s(&target)]);
    assert!(task.starts_with("OpaqueRef:"));
    let record = sim.wait_task(&task);
    assert_eq!(record["status"], s("success"));
    assert_eq!(record["progress"], Value::Double(1.0));
    let result = record["result"].as_str().unwrap();
    assert!(
        result.starts_with("<value>OpaqueRef:") && result.ends_with("</value>"),
        "{result}"
    );
    let second = codec::parse_value_fragment(result).unwrap();
    assert_eq!(sim.text("VDI.get_SR", &[second]), target);
    sim.ok("task.destroy", &[s(&task)]);
    assert_eq!(sim.err("task.get_status", &[s(&task)])[0], "HANDLE_INVALID");
}

#[test]
fn cancelled_copy_leaves_nothing_behind() {
    let sim = Sim::start(|c| c.delays.push(("VDI.copy".into(), 3000)));
    let (sr, _) = sim.new_sr();
    let (target, target_dir) = sim.new_sr();
    let vdi = sim.new_vdi(&sr, 32 * MIB);
    let task = sim.text("Async.VDI.copy", &[s(&vdi), s(&target)]);
    let mut progress = 0.0;
    while progress == 0.0 {
        std::thread::sleep(Duration::from_millis(50));
        progress = sim.ok("task.get_progress", &[s(&task)]).as_f64().unwrap();
    }
    assert!(progress < 1.0);
    sim.ok("task.cancel", &[s(&task)]);
    let record = sim.wait_task(&task);
    assert_eq!(record["status"], s("cancelled"));
    assert_eq!(
        record["error_info"],
        Value::Array(vec![s("TASK_CANCELLED"), s(&task)])
    );
    assert_eq!(std::fs::read_dir(&target_dir).unwrap().count(), 0);
    assert_eq!(sim.ok("SR.get_VDIs", &[s(&target)]), Value::Array(vec![]));
    assert_eq!(
        sim.err("task.cancel", &[s(&task)])[0],
        "OPERATION_NOT_ALLOWED"
    );
}

#[test]
fn vbd_preconditions_follow_xapi() {
    let sim = Sim::start(|_| {});
    let (sr, _) = sim.new_sr();
    let vdi = sim.new_vdi(&sr, 2 * MIB);
    let vm = sim.text("VM.get_by_uuid", &[s(VM_UUID)]);
    let allowed = sim.ok("VM.get_allowed_VBD_devices", &[s(&vm)]);
    assert_eq!(allowed.as_array().unwrap()[0], s("1"), "0 is the root disk");

    let first = sim.new_vbd(&vdi, "autodetect", "RW").unwrap();
    assert_eq!(
        sim.new_vbd(&vdi, "1", "RO").unwrap_err(),
        ["DEVICE_ALREADY_EXISTS", "1"]
    );
    assert_eq!(
        sim.new_vbd(&vdi, "xyz", "RO").unwrap_err(),
        ["INVALID_DEVICE", "xyz"]
    );
    let second = sim.new_vbd(&vdi, "autodetect", "ro").unwrap();
    assert_eq!(
        sim.text("VBD.get_userdevice", std::slice::from_ref(&second)),
        "2"
    );
    assert_eq!(
        sim.text("VBD.get_mode", std::slice::from_ref(&second)),
        "RO"
    );
    sim.ok("VBD.plug", std::slice::from_ref(&first));
    assert_eq!(
        sim.err("VBD.plug", std::slice::from_ref(&second)),
        ["VDI_IN_USE", vdi.as_str()]
    );
    let error = sim.err("VBD.destroy", std::slice::from_ref(&first));
    assert_eq!(error[0], "OPERATION_NOT_ALLOWED");
    assert!(error[1].contains("still attached"), "{error:?}");
    assert_eq!(
        sim.err("PBD.unplug", &[sim.ok("SR.get_PBDs", &[s(&sr)])[0].clone()]),
        ["VDI_IN_USE", vdi.as_str()]
    );
    sim.ok("VBD.unplug", std::slice::from_ref(&first));
    sim.ok("VBD.destroy", &[first]);
    sim.ok("VBD.destroy", &[second]);

    let read_only = sim.text(
        "VDI.create",
        &[map(&[
            ("SR", s(&sr)),
            ("virtual_size", s("2097152")),
            ("type", s("user")),
            ("sharable", Value::Bool(false)),
            ("read_only", Value::Bool(true)),
            ("other_config", map(&[])),
        ])],
    );
    assert_eq!(
        sim.new_vbd(&read_only, "autodetect", "RW").unwrap_err(),
        ["VDI_READONLY", read_only.as_str()]
    );
    assert!(std::fs::read_dir(&sim.dev_dir).unwrap().next().is_none());
}

#[test]
fn sr_and_pbd_lifecycle_rules() {
    let sim = Sim::start(|_| {});
    let host = sim.host();
    let (sr, dir) = sim.new_sr();
    let vdi = sim.new_vdi(&sr, 2 * MIB);
    let pbd = sim.ok("SR.get_PBDs", &[s(&sr)])[0].clone();
    assert_eq!(
        sim.err("PBD.destroy", std::slice::from_ref(&pbd)),
        ["OPERATION_NOT_ALLOWED", "PBD is currently attached"]
    );
    assert_eq!(sim.err("SR.forget", &[s(&sr)]), ["SR_HAS_PBD", sr.as_str()]);
    sim.ok("PBD.unplug", std::slice::from_ref(&pbd));
    assert_eq!(sim.err("SR.destroy", &[s(&sr)]), ["SR_NOT_EMPTY"]);
    assert_eq!(
        sim.err("VDI.destroy", &[s(&vdi)]),
        ["SR_NO_PBDS", sr.as_str()]
    );
    sim.ok("PBD.plug", std::slice::from_ref(&pbd));
    sim.ok("VDI.destroy", &[s(&vdi)]);
    sim.ok("PBD.unplug", &[pbd]);
    sim.ok("SR.destroy", &[s(&sr)]);
    assert!(!dir.exists());

    // An SR whose directory is gone cannot be attached.
    let uuid = uuid::Uuid::new_v4().to_string();
    let introduced = sim.text(
        "SR.introduce",
        &[
            s(&uuid),
            s("gone"),
            s(""),
            s("nfs"),
            s("user"),
            Value::Bool(true),
        ],
    );
    assert_eq!(sim.text("SR.get_physical_size", &[s(&introduced)]), "-1");
    let pbd = sim.text(
        "PBD.create",
        &[map(&[
            ("host", s(&host)),
            ("SR", s(&introduced)),
            ("device_config", nfs()),
        ])],
    );
    let error = sim.err("PBD.plug", &[s(&pbd)]);
    assert_eq!(error[0], "SR_BACKEND_FAILURE_73");
    assert!(error[3].contains("No such file or directory"), "{error:?}");
    assert_eq!(
        sim.ok("PBD.get_currently_attached", &[s(&pbd)]),
        Value::Bool(false)
    );
    sim.ok("PBD.destroy", &[s(&pbd)]);
    sim.ok("SR.forget", &[s(&introduced)]);
    assert_eq!(std::fs::read_dir(&sim.export).unwrap().count(), 0);
}

#[test]
fn generic_dispatch_errors_and_records() {
    let sim = Sim::start(|_| {});
    assert_eq!(
        sim.err("VDI.get_record", &[]),
        [
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            "VDI.get_record",
            "1",
            "0"
        ]
    );
    assert_eq!(
        sim.err("Async.VDI.get_record", &[s("x")])[0],
        "MESSAGE_METHOD_UNKNOWN"
    );
    let host = sim.host();
    let record = sim.ok("host.get_record", &[s(&host)]);
    assert_eq!(record["name_label"], s("xenserver-sim"));
    assert_eq!(record["address"], s("127.0.0.1"));
    let vms = sim.ok("VM.get_all_records", &[]);
    let vms = vms.as_struct().unwrap();
    assert_eq!(
        vms.values()
            .filter(|v| v["is_control_domain"] == Value::Bool(true))
            .count(),
        1
    );
    let appliance = vms.values().find(|v| v["uuid"] == s(VM_UUID)).unwrap();
    assert_eq!(appliance["power_state"], s("Running"));
    assert_eq!(appliance["resident_on"], s(&host));
    assert_eq!(appliance["VBDs"].as_array().unwrap().len(), 1);
    // Enums are case-insensitive; other_config maps refuse duplicate keys.
    let (sr, _) = sim.new_sr();
    sim.ok("SR.add_to_other_config", &[s(&sr), s("k"), s("v")]);
    let uuid = sim.text("SR.get_uuid", &[s(&sr)]);
    assert_eq!(
        sim.err("SR.add_to_other_config", &[s(&sr), s("k"), s("w")]),
        [
            "MAP_DUPLICATE_KEY",
            "SR",
            "other_config",
            uuid.as_str(),
            "k"
        ]
    );
    sim.ok("SR.remove_from_other_config", &[s(&sr), s("k")]);
    assert_eq!(sim.ok("SR.get_other_config", &[s(&sr)]), map(&[]));
    assert_eq!(
        sim.ok("SR.get_by_name_label", &[s("vol")]),
        Value::Array(vec![s(&sr)])
    );
    assert_eq!(
        sim.err(
            "SR.create",
            &[s(&host), nfs(), s("0"), s("v"), s(""), s("nfs"), s("user")]
        )[0],
        "MESSAGE_PARAMETER_COUNT_MISMATCH"
    );
}

#[test]
fn hooks_faults_delays_call_log_and_expired_sessions() {
    let sim = Sim::start(|c| {
        c.faults.push(
            FaultSpec::parse("VDI.create:2:SR_BACKEND_FAILURE_44::There is insufficient space:")
                .unwrap(),
        );
    });
    let (sr, _) = sim.new_sr();
    sim.new_vdi(&sr, 2 * MIB);
    let error = sim.call("VDI.create", &[map(&[])]).unwrap_err();
    assert_eq!(
        error,
        [
            "SR_BACKEND_FAILURE_44",
            "",
            "There is insufficient space",
            ""
        ]
    );
    sim.new_vdi(&sr, 2 * MIB);

    sim.control(
        "simulator.inject_fault",
        &[
            s("VDI.resize"),
            Value::Int(1),
            s("SR_BACKEND_FAILURE_79"),
            Value::Array(vec![s("x")]),
        ],
    );
    let vdi = sim.new_vdi(&sr, 2 * MIB);
    let task = sim.text("Async.VDI.resize", &[s(&vdi), s("4194304")]);
    let record = sim.wait_task(&task);
    assert_eq!(record["status"], s("failure"));
    assert_eq!(
        record["error_info"],
        Value::Array(vec![s("SR_BACKEND_FAILURE_79"), s("x")])
    );
    sim.control(
        "simulator.inject_fault",
        &[s("VDI.resize"), Value::Int(1), s("X"), Value::Array(vec![])],
    );
    sim.control("simulator.clear_faults", &[]);
    sim.ok("VDI.resize", &[s(&vdi), s("4194304")]);

    sim.control("simulator.set_delay", &[s("pool.get_all"), Value::Int(300)]);
    let started = std::time::Instant::now();
    sim.ok("pool.get_all", &[]);
    assert!(started.elapsed() >= Duration::from_millis(300));
    sim.control("simulator.set_delay", &[s("pool.get_all"), Value::Int(0)]);

    sim.control("simulator.expire_sessions", &[]);
    assert_eq!(
        sim.err("pool.get_all", &[]),
        ["SESSION_INVALID", sim.session.as_str()]
    );

    let log = std::fs::read_to_string(&sim.call_log).unwrap();
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let login = &entries[0];
    assert_eq!(login["method"], "session.login_with_password");
    assert_eq!(login["params"], serde_json::json!(["root", "******"]));
    assert_eq!(login["ok"], true);
    let failed = entries.iter().find(|e| e["ok"] == false).unwrap();
    assert_eq!(failed["method"], "VDI.create");
    assert_eq!(failed["error"][0], "SR_BACKEND_FAILURE_44");
    assert!(
        entries
            .iter()
            .all(|e| e["ms"].is_number() && e["ts"].is_string())
    );
    assert!(!log.contains("simulator."));
}

#[test]
fn the_pool_supporter_redirects_to_the_master() {
    let sim = Sim::start(|c| c.pool_slave = true);
    let slave = sim.slave_addr.clone().unwrap();
    assert_eq!(
        sim.login(&slave).unwrap_err(),
        ["HOST_IS_SLAVE", sim.addr.as_str()]
    );
    assert_eq!(sim.ok("host.get_all", &[]).as_array().unwrap().len(), 2);
    // A shared SR gets a PBD on every host, all plugged.
    let (sr, _) = sim.new_sr();
    let pbds = sim.ok("SR.get_PBDs", &[s(&sr)]);
    assert_eq!(pbds.as_array().unwrap().len(), 2);
    for pbd in pbds.as_array().unwrap() {
        assert_eq!(
            sim.ok("PBD.get_currently_attached", std::slice::from_ref(pbd)),
            Value::Bool(true)
        );
    }
}

#[test]
fn anonymous_sessions_beyond_the_limit_evict_the_least_recently_used() {
    let sim = Sim::start(|_| {});
    let addr = sim.addr.clone();
    let newest: Vec<String> = (0..400).map(|_| sim.login(&addr).unwrap()).collect();
    assert_eq!(
        sim.err("pool.get_all", &[]),
        ["SESSION_INVALID", sim.session.as_str()]
    );
    let last = newest.last().unwrap();
    let pools = Sim::outcome(sim.raw(&addr, "pool.get_all", &[s(last)]));
    assert!(pools.is_ok(), "{pools:?}");
}
