//! `/v1/jobs/...`: long operations.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::Response;

use super::ApiError;
use crate::jobs::Job;
use crate::service::Agent;

/// A job id from the path; one that is not even text is refused in the API's error shape.
type JobId = Result<Path<String>, PathRejection>;

fn unknown(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("job {} does not exist", crate::volume::id::quoted(id)),
    )
}

pub async fn list(State(agent): State<Arc<Agent>>) -> Json<Vec<Job>> {
    Json(agent.jobs.list())
}

pub async fn show(State(agent): State<Arc<Agent>>, id: JobId) -> Result<Json<Job>, ApiError> {
    let Path(id) = id?;
    agent.jobs.get(&id).map(Json).ok_or_else(|| unknown(&id))
}

pub async fn cancel(State(agent): State<Arc<Agent>>, id: JobId) -> Result<Json<Job>, ApiError> {
    let Path(id) = id?;
    agent.jobs.cancel(&id).map(Json).ok_or_else(|| unknown(&id))
}

/// The job as newline-delimited JSON, one line per change, until it has finished.
pub async fn events(State(agent): State<Arc<Agent>>, id: JobId) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let updates = agent.jobs.subscribe(&id).ok_or_else(|| unknown(&id))?;
    // State: the receiver, whether a line was sent already, whether the job had finished.
    let stream = futures_util::stream::unfold(
        (updates, false, false),
        |(mut updates, sent, done)| async move {
            if done || (sent && updates.changed().await.is_err()) {
                return None;
            }
            let job = updates.borrow_and_update().clone();
            let mut line = serde_json::to_vec(&job).expect("jobs serialise");
            line.push(b'\n');
            Some((
                Ok::<_, std::convert::Infallible>(line),
                (updates, true, job.state.is_finished()),
            ))
        },
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static response parts"))
}
