//! `GET /v1/health` and `GET /v1/status`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use crate::service::Agent;

#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// Cheap liveness answer for scripts.
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// What `xenapinfs status` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// `local`, `remote`, or `undecided` until XenAPI has been reached.
    pub mode: String,
    pub mode_reason: String,
    pub vm_uuid: Option<String>,
    pub xenapi: XenApiStatus,
    pub nfs: NfsStatus,
    pub uptime_seconds: u64,
    pub jobs_running: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct XenApiStatus {
    pub url: String,
    pub session: String,
    pub logins: u64,
    pub calls: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NfsStatus {
    pub server: String,
    pub serverpath: String,
    pub sr_base_path: String,
}

pub async fn status(State(agent): State<Arc<Agent>>) -> Json<StatusReport> {
    let connection = agent.xenapi.state();
    let (mode, mode_reason, vm_uuid) = match agent.mode() {
        Some(report) => (report.mode.to_string(), report.reason, report.vm_uuid),
        None => (
            "undecided".to_string(),
            format!(
                "waiting for XenAPI (configured mode: {})",
                agent.settings().mode
            ),
            None,
        ),
    };
    Json(StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        mode,
        mode_reason,
        vm_uuid,
        xenapi: XenApiStatus {
            url: connection.url,
            session: if connection.logged_in {
                "established"
            } else {
                "none"
            }
            .to_string(),
            logins: connection.logins,
            calls: agent.xenapi.calls_sent(),
            last_error: connection.last_error,
        },
        nfs: NfsStatus {
            server: agent.settings().nfs_server.clone(),
            serverpath: agent.settings().nfs_serverpath.clone(),
            sr_base_path: agent.settings().sr_base_path.display().to_string(),
        },
        uptime_seconds: agent.started.elapsed().as_secs(),
        jobs_running: agent.jobs.running(),
    })
}
