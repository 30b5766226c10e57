//! The daemon core: the agent's state, its start-up and its serving loop.
//!
//! [`run`] takes an already bound listener, the agent and a shutdown token, so tests start the
//! whole daemon in-process and `xenapinfsd`'s `main` stays a thin shell.

pub mod logging;
pub mod mode;
pub mod mount;
pub mod notify;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{ApiError, Peer};
use crate::config::Settings;
use crate::jobs::JobManager;
use crate::volume::VolumeManager;
use crate::xenapi::{ClientSettings, TransportSettings, XenApiClient, XenApiError};
use mode::ModeReport;
use notify::Notifier;

/// How often the session loop checks that xapi still answers (and keeps the session alive).
const KEEPALIVE: Duration = Duration::from_secs(60);
/// How soon a clean-up that failed (xapi unreachable, say) is tried again.
const CLEANUP_RETRY: Duration = Duration::from_secs(5);

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot set up the XenAPI client: {0}")]
    XenApi(#[from] XenApiError),
    #[error("control socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the control API: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

/// Everything the request handlers and jobs share.
#[derive(Debug)]
pub struct Agent {
    /// Swapped whole on reload; read with [`Agent::settings`].
    settings: RwLock<Arc<Settings>>,
    pub xenapi: Arc<XenApiClient>,
    pub volumes: VolumeManager,
    pub jobs: JobManager,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub started: Instant,
    mode: RwLock<Option<ModeReport>>,
    /// Milliseconds since `started` at which the XenAPI session loop last went round.
    session_heartbeat: AtomicU64,
    /// Wakes the session loop early (after a reload).
    wake_session_loop: tokio::sync::Notify,
}

fn client_settings(settings: &Settings) -> ClientSettings {
    ClientSettings {
        url: settings.xenapi.url.clone(),
        username: settings.xenapi.username.clone(),
        password: settings.xenapi.password.clone(),
        transport: TransportSettings {
            trust: settings.xenapi.trust.clone(),
            connect_timeout: settings.xenapi.connect_timeout,
            request_timeout: settings.xenapi.request_timeout,
            originator: "xenapinfs".into(),
        },
    }
}

impl Agent {
    pub fn new(settings: Settings) -> Result<Self, ServiceError> {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let xenapi = Arc::new(XenApiClient::with_observer(
            client_settings(&settings),
            metrics.clone(),
        )?);
        let journal = crate::journal::Journal::open(&settings.state_dir)?;
        Ok(Agent {
            volumes: VolumeManager::new(&settings, xenapi.clone(), journal),
            jobs: JobManager::with_metrics(metrics.clone()),
            metrics,
            settings: RwLock::new(Arc::new(settings)),
            xenapi,
            started: Instant::now(),
            mode: RwLock::new(None),
            session_heartbeat: AtomicU64::new(0),
            wake_session_loop: tokio::sync::Notify::new(),
        })
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("lock poisoned").clone()
    }

    /// Applies a new configuration. XenAPI connection settings, `socket_group`, `mode` and
    /// `hypervisor_uuid_path` take effect at once (the session and the mode are established
    /// afresh); the keys returned need a restart and keep their old values until then.
    pub fn reload(&self, new: Settings) -> Result<Vec<&'static str>, ServiceError> {
        let old = self.settings();
        let restart_only = [
            ("xenapi_nfs_server", old.nfs_server != new.nfs_server),
            (
                "xenapi_nfs_serverpath",
                old.nfs_serverpath != new.nfs_serverpath,
            ),
            ("xenapi_sr_base_path", old.sr_base_path != new.sr_base_path),
            ("socket", old.socket != new.socket),
            ("state_dir", old.state_dir != new.state_dir),
            ("device_dir", old.device_dir != new.device_dir),
            ("qemu_img", old.qemu_img != new.qemu_img),
            (
                "xenapi_task_stall_timeout",
                old.task_stall_timeout != new.task_stall_timeout,
            ),
        ];
        let ignored: Vec<&'static str> = restart_only
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| *key)
            .collect();
        let xenapi_changed = old.xenapi != new.xenapi;
        let mode_changed =
            old.mode != new.mode || old.hypervisor_uuid_path != new.hypervisor_uuid_path;
        if xenapi_changed {
            self.xenapi.reconfigure(client_settings(&new))?;
        }
        let merged = Settings {
            nfs_server: old.nfs_server.clone(),
            nfs_serverpath: old.nfs_serverpath.clone(),
            sr_base_path: old.sr_base_path.clone(),
            socket: old.socket.clone(),
            state_dir: old.state_dir.clone(),
            device_dir: old.device_dir.clone(),
            qemu_img: old.qemu_img.clone(),
            task_stall_timeout: old.task_stall_timeout,
            ..new
        };
        *self.settings.write().expect("lock poisoned") = Arc::new(merged);
        if xenapi_changed || mode_changed {
            *self.mode.write().expect("lock poisoned") = None;
            self.wake_session_loop.notify_one();
        }
        info!(
            xenapi_changed,
            mode_changed,
            ?ignored,
            "configuration reloaded"
        );
        Ok(ignored)
    }

    /// The mode once decided; `None` while the agent has not reached XenAPI yet.
    pub fn mode(&self) -> Option<ModeReport> {
        self.mode.read().expect("lock poisoned").clone()
    }

    /// Refuses work that needs XenAPI until the agent has reached it.
    pub fn require_xenapi(&self) -> Result<(), ApiError> {
        if self.mode().is_some() {
            return Ok(());
        }
        let why = self
            .xenapi
            .state()
            .last_error
            .unwrap_or_else(|| "still connecting".into());
        Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the agent has not reached XenAPI yet: {why}"),
        ))
    }

    /// One line for `systemctl status`.
    pub fn status_line(&self) -> String {
        let jobs = self.jobs.running();
        match (self.mode(), self.xenapi.state().last_error) {
            (_, Some(error)) => format!("XenAPI unreachable: {error}; {jobs} jobs running"),
            (Some(report), None) => format!(
                "serving; XenAPI connected; {} mode; {jobs} jobs running",
                report.mode
            ),
            (None, None) => "connecting to XenAPI".to_string(),
        }
    }

    fn beat(&self) {
        self.session_heartbeat
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the XenAPI session loop last went round.
    fn session_loop_age(&self) -> Duration {
        let beat = Duration::from_millis(self.session_heartbeat.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(beat)
    }

    /// Logs in and decides the mode, retrying with backoff while xapi is unreachable; then
    /// checks the session now and then, so an unreachable host shows in status and the session
    /// is re-established without a restart. `first_attempt` fires after the first try.
    async fn session_loop(
        &self,
        notifier: &dyn Notifier,
        first_attempt: tokio::sync::oneshot::Sender<()>,
        shutdown: &CancellationToken,
    ) {
        let mut first_attempt = Some(first_attempt);
        let mut delay = Duration::from_secs(1);
        loop {
            self.beat();
            let wait = if self.mode().is_none() {
                let attempt = async {
                    self.xenapi.connect().await?;
                    let settings = self.settings();
                    let report =
                        mode::detect(settings.mode, &settings.hypervisor_uuid_path, &self.xenapi)
                            .await?;
                    self.recover_once(&report, notifier).await?;
                    Ok::<_, StartError>(report)
                };
                match attempt.await {
                    Ok(report) => {
                        info!(mode = %report.mode, reason = %report.reason, "operating mode decided");
                        *self.mode.write().expect("lock poisoned") = Some(report);
                        delay = Duration::from_secs(1);
                        KEEPALIVE
                    }
                    Err(e) => {
                        warn!(error = %e, retry_in_s = delay.as_secs(), "XenAPI not usable yet");
                        let this = delay;
                        delay = (delay * 2).min(Duration::from_secs(60));
                        this
                    }
                }
            } else {
                if let Err(e) = self
                    .xenapi
                    .call_on_own_session("session.get_this_host")
                    .await
                {
                    warn!(error = %e, "XenAPI check failed");
                }
                KEEPALIVE
            };
            let wait = match self.mode() {
                Some(report) if self.volumes.has_abandoned() => {
                    self.volumes.recover_abandoned(report.vm.as_ref()).await;
                    if self.volumes.has_abandoned() {
                        wait.min(CLEANUP_RETRY)
                    } else {
                        wait
                    }
                }
                _ => wait,
            };
            notifier.status(&self.status_line());
            if let Some(signal) = first_attempt.take() {
                let _ = signal.send(());
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake_session_loop.notified() => {}
                _ = self.volumes.cleanup_pending.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Why the agent cannot serve volumes yet (the session loop retries).
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    XenApi(#[from] XenApiError),
    #[error("recovering interrupted operations: {0}")]
    Recovery(#[from] crate::volume::VolumeError),
}

impl Agent {
    /// Before the first operation: finishes or undoes what the last stop interrupted.
    async fn recover_once(
        &self,
        report: &ModeReport,
        notifier: &dyn Notifier,
    ) -> Result<(), crate::volume::VolumeError> {
        if self.volumes.is_recovered() {
            return Ok(());
        }
        // Nothing runs yet, so every operation still in the journal was interrupted.
        if self.volumes.has_abandoned() {
            notifier.status("recovering operations interrupted by the last stop");
        }
        let jobs = self.volumes.recover(report.vm.as_ref()).await?;
        self.jobs.restore(jobs);
        Ok(())
    }
}

/// How long running jobs get to cancel and clean up at shutdown.
const JOB_GRACE: Duration = Duration::from_secs(60);

/// Serves the control API on `listener` until `shutdown` fires: READY once serving and the
/// first XenAPI attempt has been made; watchdog pings while the session loop and the job
/// table are alive; on shutdown, jobs are cancelled, attachments undone and the session ended.
pub async fn run(
    listener: UnixListener,
    agent: Arc<Agent>,
    notifier: Arc<dyn Notifier>,
    watchdog: Option<Duration>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    warn_about_transport(&agent.settings());
    let (first_attempt, attempted) = tokio::sync::oneshot::channel();
    let session_loop = {
        let (agent, notifier, shutdown) = (agent.clone(), notifier.clone(), shutdown.clone());
        tokio::spawn(async move {
            agent
                .session_loop(notifier.as_ref(), first_attempt, &shutdown)
                .await
        })
    };
    let app = crate::api::router(agent.clone()).into_make_service_with_connect_info::<Peer>();
    let server =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    tokio::select! {
        _ = attempted => {}
        _ = shutdown.cancelled() => {}
    }
    notifier.ready();
    let pinger = watchdog.map(|period| {
        let (agent, notifier, shutdown) = (agent.clone(), notifier.clone(), shutdown.clone());
        tokio::spawn(
            async move { ping_watchdog(&agent, notifier.as_ref(), period, &shutdown).await },
        )
    });
    let served = server
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(ServiceError::Serve);
    notifier.stopping();
    notifier.status("stopping: cancelling jobs and detaching volumes");
    session_loop.abort();
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    if !agent.jobs.shutdown(JOB_GRACE).await {
        warn!(
            "jobs still running after {} s; leaving them",
            JOB_GRACE.as_secs()
        );
    }
    agent.volumes.detach_all().await;
    agent.xenapi.logout().await;
    info!("stopped");
    served
}

/// Security warnings an operator must see at start and after a reload.
pub fn warn_about_transport(settings: &Settings) {
    if matches!(settings.xenapi.trust, crate::xenapi::TlsTrust::Insecure) {
        warn!("xenapi_insecure = true: the XenServer host's certificate is NOT verified");
    }
    if settings.xenapi.url.scheme() == "http" {
        warn!(url = %settings.xenapi.url, "XenAPI over plain HTTP: the password crosses the network unencrypted");
    }
}

/// Pings systemd's watchdog at half its period, but only while the parts that must be alive
/// are: this runtime (the pinger runs on it), the XenAPI session loop, and the job table.
async fn ping_watchdog(
    agent: &Agent,
    notifier: &dyn Notifier,
    period: Duration,
    shutdown: &CancellationToken,
) {
    let stale_after = KEEPALIVE * 2 + agent.settings().xenapi.request_timeout * 2;
    let mut ticker = tokio::time::interval(period / 2);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let _jobs_alive = agent.jobs.running();
        let age = agent.session_loop_age();
        if age <= stale_after {
            notifier.watchdog();
        } else {
            warn!(
                seconds = age.as_secs(),
                "the XenAPI session loop is stuck; no watchdog ping"
            );
        }
    }
}

/// The listening socket systemd passed (socket activation), if any.
pub fn activated_socket() -> Result<Option<UnixListener>, ServiceError> {
    use std::os::fd::FromRawFd;
    let failed = |source| ServiceError::Socket {
        path: "(socket activation)".into(),
        source,
    };
    let mut fds = sd_notify::listen_fds().map_err(failed)?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    // SAFETY: systemd hands this descriptor to us alone (LISTEN_PID was checked).
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    listener.set_nonblocking(true).map_err(failed)?;
    UnixListener::from_std(listener).map(Some).map_err(failed)
}

/// Binds the control socket at its configured path: a stale socket file is replaced, the
/// directory is created, and the socket is made accessible to `group` only (0660). A group
/// that does not exist leaves the socket to root and the daemon's user.
pub fn bind_socket(path: &std::path::Path, group: &str) -> Result<UnixListener, ServiceError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |source| ServiceError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(failed)?;
    match nix::unistd::Group::from_name(group) {
        Ok(Some(group)) => {
            nix::unistd::chown(path, None, Some(group.gid)).map_err(|e| failed(e.into()))?;
        }
        _ => warn!(
            group,
            "the socket group does not exist; only root can use the socket"
        ),
    }
    Ok(listener)
}
