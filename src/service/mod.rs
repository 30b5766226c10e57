//! The daemon core: the agent's state, its start-up and its serving loop.
//!
//! [`run`] takes an already bound listener, the agent and a shutdown token, so tests start the
//! whole daemon in-process and `xenapinfsd`'s `main` stays a thin shell.

pub mod logging;
pub mod mode;

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
}

/// Everything the request handlers and jobs share.
#[derive(Debug)]
pub struct Agent {
    pub settings: Settings,
    pub xenapi: Arc<XenApiClient>,
    pub volumes: VolumeManager,
    pub jobs: JobManager,
    pub started: Instant,
    mode: RwLock<Option<ModeReport>>,
}

impl Agent {
    pub fn new(settings: Settings) -> Result<Self, ServiceError> {
        let xenapi = XenApiClient::new(ClientSettings {
            url: settings.xenapi.url.clone(),
            username: settings.xenapi.username.clone(),
            password: settings.xenapi.password.clone(),
            transport: TransportSettings {
                trust: settings.xenapi.trust.clone(),
                connect_timeout: settings.xenapi.connect_timeout,
                request_timeout: settings.xenapi.request_timeout,
                originator: "xenapinfs".into(),
            },
        })?;
        let xenapi = Arc::new(xenapi);
        Ok(Agent {
            volumes: VolumeManager::new(&settings, xenapi.clone()),
            jobs: JobManager::default(),
            settings,
            xenapi,
            started: Instant::now(),
            mode: RwLock::new(None),
        })
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
        let why = self.xenapi.state().last_error.unwrap_or_else(|| "still connecting".into());
        Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the agent has not reached XenAPI yet: {why}"),
        ))
    }

    /// Logs in and decides the mode, retrying with backoff while xapi is unreachable.
    async fn establish(&self, shutdown: &CancellationToken) {
        let mut delay = Duration::from_secs(1);
        loop {
            let attempt = async {
                self.xenapi.connect().await?;
                mode::detect(self.settings.mode, &self.settings.hypervisor_uuid_path, &self.xenapi).await
            };
            match attempt.await {
                Ok(report) => {
                    info!(mode = %report.mode, reason = %report.reason, "operating mode decided");
                    *self.mode.write().expect("lock poisoned") = Some(report);
                    return;
                }
                Err(e) => warn!(error = %e, retry_in_s = delay.as_secs(), "XenAPI not usable yet"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }
}

/// How long running jobs get to cancel and clean up at shutdown.
const JOB_GRACE: Duration = Duration::from_secs(60);

/// Serves the control API on `listener` until `shutdown` fires, then logs out of XenAPI.
pub async fn run(listener: UnixListener, agent: Arc<Agent>, shutdown: CancellationToken) -> Result<(), ServiceError> {
    if matches!(agent.settings.xenapi.trust, crate::xenapi::TlsTrust::Insecure) {
        warn!("xenapi_insecure = true: the XenServer host's certificate is NOT verified");
    }
    if agent.settings.xenapi.url.scheme() == "http" {
        warn!(url = %agent.settings.xenapi.url, "XenAPI over plain HTTP: the password crosses the network unencrypted");
    }
    let establish = {
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { agent.establish(&shutdown).await })
    };
    let app = crate::api::router(agent.clone()).into_make_service_with_connect_info::<Peer>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(ServiceError::Serve);
    establish.abort();
    if !agent.jobs.shutdown(JOB_GRACE).await {
        warn!("jobs still running after {} s; leaving them", JOB_GRACE.as_secs());
    }
    agent.volumes.detach_all().await;
    agent.xenapi.logout().await;
    info!("stopped");
    served
}

/// Binds the control socket at its configured path: a stale socket file is replaced, the
/// directory is created, and the socket is made group-accessible (0660).
pub fn bind_socket(path: &std::path::Path) -> Result<UnixListener, ServiceError> {
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
    Ok(listener)
}
