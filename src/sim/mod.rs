//! A XenAPI simulator backed by real files, for running and testing xenapinfs without XenServer.
//!
//! It speaks XML-RPC over HTTP(S) byte for byte like xapi (see [`codec`]), keeps a pool with one
//! master host (plus a supporter answering `HOST_IS_SLAVE` with `--pool-slave`), dom0 and,
//! optionally, the appliance VM the agent runs in. NFS SRs are directories
//! `<export>/<sr_uuid>/` holding real dynamic VHDs `<vdi_uuid>.vhd`; `VBD.plug` on the appliance
//! exposes a VDI as `<dev-dir>/xvdX`, backed by the VHD through a `qemu-storage-daemon` FUSE
//! export (see [`devices`]).
//!
//! Messages: `session.login_with_password/logout/local_logout`; for session, pool, host, VM, SR,
//! PBD, VDI, VBD and task the generic `get_record`, `get_by_uuid`, `get_<field>` for every
//! field, `get_all`/`get_all_records` (not session), `get_by_name_label` (host, VM, SR, VDI,
//! task), `set_name_label/description` (pool, host, VM, SR, VDI), `add_to_/remove_from_/set_`
//! for map fields (`other_config` everywhere, `sm_config` on SR and VDI, `xenstore_data`);
//! `SR.create/introduce/forget/destroy/scan/update/get_supported_types`,
//! `PBD.create/plug/unplug/destroy/set_device_config`, `VDI.create/destroy/forget/copy/resize`,
//! `VBD.create/plug/unplug/unplug_force/destroy`, `VM.get_allowed_VBD_devices`,
//! `task.cancel/destroy`, `system.listMethods`, and `Async.` forms of the SR, PBD, VDI, VBD and
//! task operations.
//!
//! # Test hooks
//!
//! These XML-RPC methods take no session and work on both listeners:
//!
//! | method | effect |
//! |---|---|
//! | `simulator.inject_fault(method, nth, code, [params])` | the `nth` upcoming call of `method` (counting its `Async.` form too; 1 = the next one) fails with `[code, params...]`; for an `Async.` call the task fails |
//! | `simulator.clear_faults()` | forgets every planned fault |
//! | `simulator.set_delay(method, millis)` | every call of `method` takes `millis` longer (0 removes the delay); for `VDI.copy` the delay is spread over the copy so task progress can be watched |
//! | `simulator.set_hang(method, on)` | calls of `method` (and `VDI.copy` tasks) make no progress until cancelled or released |
//! | `simulator.set_delay("*", millis)` | the delay of every method without one of its own |
//! | `simulator.move_master()` | with `--pool-slave`, the two hosts swap roles (sessions are lost) |
//! | `simulator.expire_sessions()` | every session becomes invalid (`SESSION_INVALID`), as after a xapi restart |
//! | `simulator.set_call_log(path)` | appends the call log to `path` from now on (`""` stops it) |
//!
//! The same hooks exist as flags: `--fault METHOD:N:CODE[:PARAM...]` (repeatable),
//! `--delay METHOD:MS` (repeatable), `--call-log PATH`. The call log has one JSON object per
//! XenAPI call: `{"ts", "method", "params" (password as "******"), "ok", "error": [code,
//! params...] | null, "ms"}`; `simulator.*` calls are not logged.

pub mod codec;
pub mod error;
pub mod hooks;

mod classes;
mod control;
mod devices;
mod dispatch;
mod http;
mod model;
mod ops_session;
mod ops_storage;
mod ops_vbd;
mod ops_vdi;
mod state;
mod storage;
mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ApiError;
pub use hooks::FaultSpec;

/// How the simulator is set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The NFS export: SR directories are created here.
    pub export: PathBuf,
    /// Where plugged VBDs of the appliance appear (`xvdb`, `xvdc`, ...).
    pub dev_dir: PathBuf,
    /// The root password; `None` accepts any password for root.
    pub password: Option<String>,
    /// The appliance VM's uuid; `None` means no appliance VM.
    pub vm_uuid: Option<String>,
    /// The only NFS server SR.create / PBD.plug accept.
    pub nfs_server: String,
    /// The only server path SR.create / PBD.plug accept.
    pub nfs_path: String,
    /// Serve HTTPS with a generated certificate.
    pub tls: bool,
    /// Also serve a pool supporter that answers HOST_IS_SLAVE.
    pub pool_slave: bool,
    /// How long a failed login waits before answering (xapi: 5 s).
    pub auth_failure_delay: Duration,
    pub faults: Vec<FaultSpec>,
    pub delays: Vec<(String, u64)>,
    pub call_log: Option<PathBuf>,
    /// Never use FUSE exports; plugged VBDs are raw copies.
    pub no_fuse: bool,
    /// The qemu-storage-daemon binary; found on PATH when `None`.
    pub qemu_storage_daemon: Option<PathBuf>,
}

impl SimConfig {
    /// The defaults of the command line for these two directories.
    pub fn new(export: impl Into<PathBuf>, dev_dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            export: export.into(),
            dev_dir: dev_dir.into(),
            password: None,
            vm_uuid: None,
            nfs_server: "nfs.example".into(),
            nfs_path: "/volumes".into(),
            tls: false,
            pool_slave: false,
            auth_failure_delay: Duration::from_secs(5),
            faults: Vec::new(),
            delays: Vec::new(),
            call_log: None,
            no_fuse: false,
            qemu_storage_daemon: None,
        }
    }
}

/// Already-bound sockets: the master, and the supporter with `pool_slave`.
pub struct Listeners {
    pub master: std::net::TcpListener,
    pub slave: Option<std::net::TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{what} {}: {reason}", path.display())]
    Directory {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--pool-slave needs a second listener")]
    NoSlaveListener,
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error("call log: {0}")]
    CallLog(#[source] std::io::Error),
    #[error("{0}")]
    Tls(String),
}

/// A started simulator.
pub struct Running {
    /// `http://127.0.0.1:PORT/` (or `https://`).
    pub url: String,
    pub slave_url: Option<String>,
    /// SHA-256 of the server certificate, `AB:CD:...`, with TLS.
    pub fingerprint: Option<String>,
    /// PEM of the CA that signed the server certificate, with TLS.
    pub ca_pem: Option<String>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the simulator has shut down (after `shutdown` fired) and every plugged VBD
    /// has been unplugged.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

fn check_dir(what: &'static str, path: &std::path::Path) -> Result<(), SimError> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(SimError::Directory {
            what,
            path: path.to_path_buf(),
            reason: "not an existing directory".into(),
        })
    }
}

/// Starts serving on `listeners`; returns once the sockets accept calls. Everything stops when
/// `shutdown` is cancelled: connections finish their request, plugged VBDs are unplugged (FUSE
/// exports stopped, VHDs normalised).
pub async fn start(
    listeners: Listeners,
    config: SimConfig,
    shutdown: CancellationToken,
) -> Result<Running, SimError> {
    check_dir("export directory", &config.export)?;
    check_dir("device directory", &config.dev_dir)?;
    if config.pool_slave && listeners.slave.is_none() {
        return Err(SimError::NoSlaveListener);
    }
    let master_addr = listeners.master.local_addr().map_err(SimError::Listener)?;
    let scheme = if config.tls { "https" } else { "http" };
    let (acceptor, fingerprint, ca_pem) = if config.tls {
        let material = tokio::task::spawn_blocking(tls::generate)
            .await
            .map_err(|e| SimError::Tls(e.to_string()))?
            .map_err(SimError::Tls)?;
        (
            Some(tokio_rustls::TlsAcceptor::from(material.server_config)),
            Some(material.fingerprint),
            Some(material.ca_pem),
        )
    } else {
        (None, None, None)
    };
    let master_address = master_addr.to_string();
    let sim = Arc::new(
        state::SimState::new(config.clone(), master_address, fingerprint.clone())
            .map_err(SimError::CallLog)?,
    );
    let tracker = TaskTracker::new();
    let to_tokio = |l: std::net::TcpListener| -> Result<tokio::net::TcpListener, SimError> {
        l.set_nonblocking(true).map_err(SimError::Listener)?;
        tokio::net::TcpListener::from_std(l).map_err(SimError::Listener)
    };
    let master = to_tokio(listeners.master)?;
    let mut servers = vec![tokio::spawn(http::serve(
        master,
        acceptor.clone(),
        dispatch::Role::Master,
        sim.clone(),
        shutdown.clone(),
        tracker.clone(),
    ))];
    let mut slave_url = None;
    if config.pool_slave
        && let Some(slave) = listeners.slave
    {
        let addr = slave.local_addr().map_err(SimError::Listener)?;
        slave_url = Some(format!("{scheme}://{addr}/"));
        let _ = sim.slave_address.set(addr.to_string());
        servers.push(tokio::spawn(http::serve(
            to_tokio(slave)?,
            acceptor,
            dispatch::Role::Slave,
            sim.clone(),
            shutdown.clone(),
            tracker.clone(),
        )));
    }
    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        for server in servers {
            let _ = server.await;
        }
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
        let sim_for_cleanup = sim.clone();
        let errors = tokio::task::spawn_blocking(move || ops_vbd::unplug_all(&sim_for_cleanup))
            .await
            .unwrap_or_default();
        for e in errors {
            eprintln!("xenapinfs-sim: unplug at shutdown: {e}");
        }
    });
    Ok(Running {
        url: format!("{scheme}://{master_addr}/"),
        slave_url,
        fingerprint,
        ca_pem,
        done,
    })
}

/// Serves until `shutdown` and cleans up; for callers that do not need the URL.
pub async fn run(
    listeners: Listeners,
    config: SimConfig,
    shutdown: CancellationToken,
) -> Result<(), SimError> {
    start(listeners, config, shutdown).await?.wait().await;
    Ok(())
}
