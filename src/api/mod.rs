//! The control API: HTTP/1.1 + JSON on a Unix socket, routes under `/v1`.
//!
//! `GET /metrics` (OpenMetrics text) sits beside them, behind the same peer check.
//! Every error has one shape: `{"error": {"kind": ..., "message": ..., "details": ...}}`.
//! The endpoints are described in `docs/api.md`.

mod auth;
pub mod client;
mod error;
mod images;
mod jobs;
mod metrics;
mod status;
mod volumes;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use auth::Peer;
pub use error::ApiError;
pub use images::{ExportQuery, ExportRequest, ImportQuery};
pub use status::StatusReport;
pub use volumes::{CopyRequest, CreateRequest, Deleted, ExtendRequest};

use crate::service::Agent;

/// Requests are small JSON documents; anything bigger is refused before it is read.
const BODY_LIMIT: usize = 64 * 1024;

/// A body announced (Content-Length) as larger than [`BODY_LIMIT`] is refused before any of it
/// is read, and before `100 Continue` invites the client to send it. Image uploads
/// (`application/octet-stream`) have no limit; bodies without a length are cut off at the
/// limit as they arrive.
async fn refuse_oversized(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let headers = request.headers();
    let upload = headers
        .get(CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/octet-stream"));
    let length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) if !upload && length > BODY_LIMIT as u64 => Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            format!("request body: {length} bytes is over the limit of {BODY_LIMIT} bytes"),
        )),
        _ => Ok(next.run(request).await),
    }
}

/// A request body that must be a JSON object. Derived `Deserialize` also builds a struct from
/// an array of its fields in order (`[1]` would be `{"size_gb": 1}`); the API takes objects
/// only. Unknown and duplicate fields are still refused by `T`.
#[derive(Debug, Default)]
pub(crate) struct JsonObject<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for JsonObject<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Object<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(Object(std::marker::PhantomData))
            .map(JsonObject)
    }
}

/// The API's routes over the shared agent. Serve it with connect info of type [`Peer`].
pub fn router(agent: Arc<Agent>) -> Router {
    let volume = "/v1/volumes/{sr}/{vdi}";
    Router::new()
        .route("/v1/health", get(status::health))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/status", get(status::status))
        .route("/v1/stats", get(volumes::stats))
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route("/v1/volumes/import", post(images::create))
        .route(volume, get(volumes::show).delete(volumes::delete))
        .route(&format!("{volume}/extend"), post(volumes::extend))
        .route(&format!("{volume}/connection"), get(volumes::connection))
        .route(&format!("{volume}/snapshot"), post(volumes::snapshot))
        .route(&format!("{volume}/clone"), post(volumes::clone))
        .route(
            &format!("{volume}/from-snapshot"),
            post(volumes::from_snapshot),
        )
        .route(&format!("{volume}/import"), post(images::import))
        .route(
            &format!("{volume}/export"),
            get(images::export).post(images::export_url),
        )
        .route(&format!("{volume}/attach"), post(volumes::attach))
        .route(&format!("{volume}/detach"), post(volumes::detach))
        .route("/v1/attachments", get(volumes::attachments))
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            auth::check_peer,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(agent)
}
