//! The simulator's shared state and the objects it starts with: one pool, the master host (and
//! a supporter with `--pool-slave`), dom0 and, with `--vm-uuid`, the appliance VM with its
//! root disk on a local SR.

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use super::SimConfig;
use super::devices::Devices;
use super::dispatch::Methods;
use super::error::{ApiError, ApiResult};
use super::hooks::Hooks;
use super::model::{self, Db, Host, Map, Pbd, Pool, Sr, Vbd, Vdi, Vm};

pub struct SimState {
    pub config: SimConfig,
    pub db: Mutex<Db>,
    pub hooks: Hooks,
    pub devices: Devices,
    pub methods: Methods,
    /// What HOST_IS_SLAVE names: `127.0.0.1:PORT` of the master listener.
    pub master_address: String,
    /// The supporter's listener address, with `--pool-slave`.
    pub slave_address: OnceLock<String>,
    /// `simulator.move_master` swapped the roles: the supporter is the master now.
    pub master_moved: AtomicBool,
    /// Colon-separated SHA-256 of the server certificate, with `--tls`.
    pub fingerprint: Option<String>,
    /// Serialises `autodetect` device allocation in VBD.create, like xapi's global mutex.
    pub vbd_create_lock: Mutex<()>,
}

impl SimState {
    pub fn new(
        config: SimConfig,
        master_address: String,
        fingerprint: Option<String>,
    ) -> std::io::Result<SimState> {
        let hooks = Hooks::default();
        for fault in &config.faults {
            hooks.inject_fault(fault.clone());
        }
        for (method, millis) in &config.delays {
            hooks.set_delay(method, *millis);
        }
        hooks.set_call_log(config.call_log.as_deref())?;
        let db = seed(&config);
        let devices = Devices::new(&config);
        Ok(SimState {
            config,
            db: Mutex::new(db),
            hooks,
            devices,
            methods: super::classes::methods(),
            master_address,
            slave_address: OnceLock::new(),
            master_moved: AtomicBool::new(false),
            fingerprint,
            vbd_create_lock: Mutex::new(()),
        })
    }

    /// SESSION_INVALID unless `handle` is a live session; refreshes `last_active`.
    pub fn check_session(&self, handle: &str) -> ApiResult<()> {
        let mut db = self
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match db.sessions.get_mut(handle) {
            Some(session) => {
                session.last_active = unix_now();
                db.session_seq += 1;
                let seq = db.session_seq;
                if let Some(session) = db.sessions.get_mut(handle) {
                    session.used_seq = seq;
                }
                Ok(())
            }
            None => Err(ApiError::new("SESSION_INVALID", [handle])),
        }
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn seed(config: &SimConfig) -> Db {
    let mut db = Db::default();
    let master = model::new_ref();
    db.hosts.insert(
        master.clone(),
        Host {
            uuid: model::new_uuid(),
            name_label: "xenserver-sim".into(),
            hostname: "xenserver-sim".into(),
            address: "127.0.0.1".into(),
            other_config: Map::new(),
        },
    );
    if config.pool_slave {
        db.hosts.insert(
            model::new_ref(),
            Host {
                uuid: model::new_uuid(),
                name_label: "xenserver-sim-2".into(),
                hostname: "xenserver-sim-2".into(),
                address: "127.0.0.1".into(),
                other_config: Map::new(),
            },
        );
    }
    db.master = master.clone();
    db.pool_ref = model::new_ref();
    db.pool = Pool {
        uuid: model::new_uuid(),
        name_label: String::new(),
        master: master.clone(),
        other_config: Map::new(),
    };
    for (host_ref, host) in db.hosts.clone() {
        db.vms.insert(
            model::new_ref(),
            Vm {
                uuid: model::new_uuid(),
                name_label: format!("Control domain on host: {}", host.hostname),
                name_description:
                    "The domain which manages physical devices and manages other domains".into(),
                power_state: "Running".into(),
                resident_on: host_ref,
                is_control_domain: true,
                domid: 0,
                other_config: Map::new(),
                is_appliance: false,
            },
        );
    }
    if let Some(vm_uuid) = &config.vm_uuid {
        let sr = model::new_ref();
        db.srs.insert(
            sr.clone(),
            Sr {
                uuid: model::new_uuid(),
                name_label: "Local storage".into(),
                name_description: String::new(),
                sr_type: "ext".into(),
                content_type: "user".into(),
                shared: false,
                physical_size: 100 << 30,
                physical_utilisation: 10 << 30,
                virtual_allocation: 10 << 30,
                local: true,
                ..Sr::default()
            },
        );
        db.pbds.insert(
            model::new_ref(),
            Pbd {
                uuid: model::new_uuid(),
                host: master.clone(),
                sr: sr.clone(),
                device_config: [("device".to_string(), "/dev/sda3".to_string())].into(),
                currently_attached: true,
                other_config: Map::new(),
            },
        );
        let root_uuid = model::new_uuid();
        let vdi = model::new_ref();
        db.vdis.insert(
            vdi.clone(),
            Vdi {
                uuid: root_uuid.clone(),
                name_label: "xenapinfs appliance root".into(),
                name_description: "Created by the simulator".into(),
                sr,
                virtual_size: 10 << 30,
                physical_utilisation: 3 << 30,
                vdi_type: "system".into(),
                location: root_uuid,
                managed: true,
                ..Vdi::default()
            },
        );
        let vm = model::new_ref();
        db.vms.insert(
            vm.clone(),
            Vm {
                uuid: vm_uuid.clone(),
                name_label: "xenapinfs appliance".into(),
                name_description: String::new(),
                power_state: "Running".into(),
                resident_on: master.clone(),
                is_control_domain: false,
                domid: 1,
                other_config: Map::new(),
                is_appliance: true,
            },
        );
        db.vbds.insert(
            model::new_ref(),
            Vbd {
                uuid: model::new_uuid(),
                vm,
                vdi,
                device: "xvda".into(),
                userdevice: "0".into(),
                bootable: true,
                mode: "RW".into(),
                vbd_type: "Disk".into(),
                unpluggable: false,
                currently_attached: true,
                ..Vbd::default()
            },
        );
    }
    db
}
