//! Who may use the control socket: root, the daemon's own user, and members of `socket_group`,
//! decided per connection from the kernel's peer credentials (SO_PEERCRED).

use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use tokio::net::UnixListener;
use tracing::{Instrument, info_span, warn};

use super::ApiError;
use crate::service::Agent;

/// The process at the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => Peer {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid(),
            },
            Err(_) => Peer {
                uid: None,
                gid: None,
                pid: None,
            },
        }
    }
}

/// The group ids a process belongs to (its primary group and the supplementary ones).
fn groups_of(peer: &Peer) -> Vec<u32> {
    let mut groups: Vec<u32> = peer.gid.into_iter().collect();
    if let Some(pid) = peer.pid
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        groups.extend(
            line["Groups:".len()..]
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    groups
}

fn allowed(peer: &Peer, group: &str) -> bool {
    let Some(uid) = peer.uid else { return false };
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return true;
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(group)) => groups_of(peer).contains(&group.gid.as_raw()),
        _ => false,
    }
}

/// Refuses callers that are not allowed, and logs every request with the caller's uid and pid.
pub async fn check_peer(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let uid = peer.uid.map_or(-1, i64::from);
    let pid = peer.pid.unwrap_or(-1);
    let span =
        info_span!("request", method = %request.method(), path = %request.uri().path(), uid, pid);
    if !allowed(&peer, &agent.settings().socket_group) {
        // The caller's ids are in the event itself: the info-level span is off when the log
        // level is `warn`, and a refusal must name who was refused.
        warn!(
            parent: &span,
            uid,
            pid,
            path = %request.uri().path(),
            "refused a caller that is neither root nor in the socket group"
        );
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "uid {uid} may not use xenapinfsd: only root and members of group {:?} may",
                agent.settings().socket_group
            ),
        ));
    }
    tracing::debug!(parent: &span, "request");
    Ok(next.run(request).instrument(span).await)
}
