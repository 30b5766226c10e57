//! `GET /metrics`, and the counting done at the API's edge: operations answered at once,
//! refusals before a job starts, and image bytes in and out. Jobs count themselves when they
//! end (`JobManager`), XenAPI calls are counted by the client.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, TryStreamExt};

use super::ApiError;
use crate::image::transfer::{self, Chunk, Counting};
use crate::metrics::{CONTENT_TYPE, Metrics, Outcome};
use crate::service::Agent;
use crate::volume::{ImageSource, VolumeError};

/// The metrics in the OpenMetrics text format.
pub async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let text = agent.metrics.encode(agent.jobs.running());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Runs an operation that is answered when it is done, and counts it.
pub(super) async fn counted<T>(
    agent: &Agent,
    operation: &str,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = work.await;
    let outcome = match &result {
        Ok(_) => Outcome::Succeeded,
        Err(error) => Outcome::of_error_kind(error.kind),
    };
    agent
        .metrics
        .operation_finished(operation, outcome, started.elapsed());
    result
}

/// Runs the checks a job operation makes before its job starts: a refusal is counted as that
/// operation failing (a job that starts is counted when it ends).
pub(super) async fn before_job<T>(
    agent: &Agent,
    operation: &str,
    checks: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = checks.await;
    if let Err(error) = &result {
        agent.metrics.operation_finished(
            operation,
            Outcome::of_error_kind(error.kind),
            started.elapsed(),
        );
    }
    result
}

/// The image source with every byte received counted as imported. A URL is opened here, as
/// the job's first step, so its bytes are counted the same way as an upload's.
pub(super) async fn metered_source(
    metrics: Arc<Metrics>,
    source: ImageSource,
) -> Result<ImageSource, VolumeError> {
    let (body, length) = match source {
        ImageSource::Upload { body, length } => (body, length),
        ImageSource::Url(spec) => transfer::download(&spec).await?,
    };
    let (body, _) = Counting::tallied(body, Box::new(move |bytes| metrics.imported(bytes)));
    Ok(ImageSource::Upload {
        body: Box::pin(body),
        length,
    })
}

/// The export stream with every byte handed on counted as exported.
pub(super) fn metered_chunks(
    metrics: Arc<Metrics>,
    chunks: impl Stream<Item = Chunk> + Send + 'static,
) -> impl Stream<Item = Chunk> + Send + 'static {
    chunks.inspect_ok(move |bytes| metrics.exported(bytes.len() as u64))
}
