//! The control API: HTTP/1.1 + JSON on a Unix socket, routes under `/v1`.
//!
//! Every error has one shape: `{"error": {"kind": ..., "message": ..., "details": ...}}`.

pub mod client;
mod error;
mod status;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use error::ApiError;
pub use status::StatusReport;

use crate::service::Agent;

/// The API's routes over the shared agent.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/health", get(status::health))
        .route("/v1/status", get(status::status))
        .fallback(error::not_found)
        .with_state(agent)
}
