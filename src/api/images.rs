//! Images in and out: `/v1/volumes/import`, `/v1/volumes/{sr}/{vdi}/import` and `.../export`.
//!
//! An image is either sent in the request body (`application/octet-stream`: the CLI streams a
//! file or its stdin) — the request then lasts as long as the import and answers with the
//! finished job — or named by URL in a JSON body (`{"url": ..., "headers": ["Name: value"]}`),
//! which starts a job and answers 202 at once.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::metrics::{before_job, metered_chunks, metered_source};
use super::{ApiError, JsonObject};
use crate::image::ImageFormat;
use crate::image::transfer::{ChannelWriter, UrlSpec, chunk_stream};
use crate::jobs::{Job, JobState};
use crate::service::Agent;
use crate::volume::images::{NewVolume, export_to_url};
use crate::volume::{ImageSource, VolumeId};

type Id = Result<Path<(String, String)>, PathRejection>;

fn volume_id(path: Id) -> Result<VolumeId, ApiError> {
    let Path((sr, vdi)) = path?;
    VolumeId::parse(&format!("{sr}/{vdi}")).map_err(ApiError::invalid)
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(format!("query: {}", rejection.body_text()))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// Declared format; detected from content when absent, and a mismatch is refused.
    pub format: Option<ImageFormat>,
    /// For a new volume: its size; from the image when absent.
    pub size_gb: Option<u64>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    pub format: ImageFormat,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    pub format: ImageFormat,
    pub url: String,
    #[serde(default)]
    pub headers: Vec<String>,
}

/// Refuses a body that is neither image bytes nor a JSON URL request: form data (what
/// `curl -d` sends) or a body without a type would otherwise be taken as a raw image.
fn check_content_type(request: &Request) -> Result<(), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    match content_type.as_deref() {
        Some(t)
            if t.starts_with("application/json") || t.starts_with("application/octet-stream") =>
        {
            Ok(())
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            format!(
                "request body: send the image as `Content-Type: application/octet-stream`, or a \
                 URL as `Content-Type: application/json` (got {})",
                other.map_or("no content type".to_string(), crate::volume::id::quoted)
            ),
        )),
    }
}

/// The image source of a request: its body, or the URL its JSON body names.
async fn source(request: Request) -> Result<(ImageSource, bool), ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = request.into_body();
    if is_json {
        let bytes = axum::body::to_bytes(body, super::BODY_LIMIT)
            .await
            .map_err(|e| {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
                let status = if too_large {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                };
                ApiError::new(status, "invalid_request", format!("request body: {e}"))
            })?;
        let JsonObject(spec): JsonObject<UrlSpec> = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
        spec.validate().map_err(ApiError::invalid)?;
        return Ok((ImageSource::Url(spec), true));
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let body = Box::pin(tokio_util::io::StreamReader::new(stream));
    Ok((ImageSource::Upload { body, length }, false))
}

/// An uploaded image is imported while the request lasts; a URL import runs as a job.
async fn answer(agent: &Agent, job: Job, detached: bool) -> Response {
    if detached {
        return (StatusCode::ACCEPTED, Json(job)).into_response();
    }
    let Some(mut updates) = agent.jobs.subscribe(&job.id) else {
        return (StatusCode::ACCEPTED, Json(job)).into_response();
    };
    let finished = match updates.wait_for(|j| j.state.is_finished()).await {
        Ok(job) => job.clone(),
        Err(_) => return (StatusCode::ACCEPTED, Json(job)).into_response(),
    };
    match (finished.state, &finished.error) {
        (JobState::Succeeded, _) => (StatusCode::OK, Json(finished)).into_response(),
        (_, Some(error)) => {
            let status = match error.kind.as_str() {
                "image_refused" => StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request" => StatusCode::BAD_REQUEST,
                "not_found" => StatusCode::NOT_FOUND,
                "conflict" | "cancelled" | "wrong_mode" => StatusCode::CONFLICT,
                "xenapi" => StatusCode::BAD_GATEWAY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let body = serde_json::json!({"error": {"kind": error.kind, "message": error.message, "details": {"job": finished.id}}});
            (status, Json(body)).into_response()
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, Json(finished)).into_response(),
    }
}

pub async fn import(
    State(agent): State<Arc<Agent>>,
    id: Id,
    query: Result<Query<ImportQuery>, QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let id = volume_id(id)?;
    let Query(query) = query?;
    if query.size_gb.is_some() || !query.name.is_empty() || !query.description.is_empty() {
        return Err(ApiError::invalid(
            "size_gb, name and description are for new volumes (POST /v1/volumes/import)",
        ));
    }
    check_content_type(&request)?;
    before_job(&agent, "import", async {
        agent.require_xenapi()?;
        Ok(agent.volumes.show(id)?)
    })
    .await?;
    let (source, detached) = source(request).await?;
    let worker = agent.clone();
    let job = agent
        .jobs
        .start("import", Some(id.to_string()), move |ctx| async move {
            let source = metered_source(worker.metrics.clone(), source).await?;
            let mode = worker.mode();
            let volume = worker
                .volumes
                .import(id, source, query.format, mode.as_ref(), &ctx)
                .await?;
            Ok(serde_json::to_value(volume).expect("volumes serialise"))
        });
    Ok(answer(&agent, job, detached).await)
}

pub async fn create(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<ImportQuery>, QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    check_content_type(&request)?;
    before_job(&agent, "create-from-image", async {
        agent.require_xenapi()
    })
    .await?;
    let (source, detached) = source(request).await?;
    let new = NewVolume {
        size_gb: query.size_gb,
        name: query.name,
        description: query.description,
    };
    let format = query.format;
    let worker = agent.clone();
    let job = agent
        .jobs
        .start("create-from-image", None, move |ctx| async move {
            let source = metered_source(worker.metrics.clone(), source).await?;
            let mode = worker.mode();
            let volume = worker
                .volumes
                .create_from_image(&new, source, format, mode.as_ref(), &ctx)
                .await?;
            Ok(serde_json::to_value(volume).expect("volumes serialise"))
        });
    Ok(answer(&agent, job, detached).await)
}

/// Streams the volume as an image. A failure midway ends the stream with an error, so the
/// caller never mistakes a truncated image for a whole one. The job id is in `x-xenapinfs-job`.
pub async fn export(
    State(agent): State<Arc<Agent>>,
    id: Id,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = volume_id(id)?;
    let Query(query) = query?;
    before_job(&agent, "export", async { Ok(agent.volumes.show(id)?) }).await?;
    let (writer, receiver) = ChannelWriter::new(4);
    let worker = agent.clone();
    let format = query.format;
    let job = agent
        .jobs
        .start("export", Some(id.to_string()), move |ctx| async move {
            let bytes = worker.volumes.export(id, format, writer, &ctx).await?;
            Ok(serde_json::json!({"bytes": bytes, "format": format}))
        });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("x-xenapinfs-job", job.id)
        .body(Body::from_stream(metered_chunks(
            agent.metrics.clone(),
            chunk_stream(receiver),
        )))
        .expect("static response parts"))
}

/// Exports to a URL (HTTP PUT) as a job.
pub async fn export_url(
    State(agent): State<Arc<Agent>>,
    id: Id,
    body: Result<Json<JsonObject<ExportRequest>>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let id = volume_id(id)?;
    let Json(JsonObject(request)) = body?;
    let spec = UrlSpec {
        url: request.url,
        headers: request.headers,
    };
    spec.validate().map_err(ApiError::invalid)?;
    before_job(&agent, "export", async { Ok(agent.volumes.show(id)?) }).await?;
    let worker = agent.clone();
    let format = request.format;
    let job = agent
        .jobs
        .start("export", Some(id.to_string()), move |ctx| async move {
            let bytes = export_to_url(&worker.volumes, id, format, spec, ctx).await?;
            // The upload's bytes are counted once it has completed.
            worker.metrics.exported(bytes);
            Ok(serde_json::json!({"bytes": bytes, "format": format}))
        });
    Ok((StatusCode::ACCEPTED, Json(job)))
}
