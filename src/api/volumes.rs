//! `/v1/volumes/...` and `/v1/stats`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::metrics::{before_job, counted};
use super::{ApiError, JsonObject};
use crate::jobs::Job;
use crate::service::Agent;
use crate::volume::{ConnectionInfo, CopyKind, Stats, Volume, VolumeId};

type Body<T> = Result<Json<JsonObject<T>>, JsonRejection>;
type Id = Result<Path<(String, String)>, PathRejection>;

fn volume_id(path: Id) -> Result<VolumeId, ApiError> {
    let Path((sr, vdi)) = path?;
    VolumeId::parse(&format!("{sr}/{vdi}")).map_err(ApiError::invalid)
}

/// A body that may be absent: an empty request body means "all defaults". A body that is
/// there but not declared JSON is refused, not ignored.
fn optional<T: Default>(headers: &HeaderMap, body: Body<T>) -> Result<T, ApiError> {
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length != "0");
    match body {
        Ok(Json(JsonObject(value))) => Ok(value),
        Err(JsonRejection::MissingJsonContentType(_)) if !has_body => Ok(T::default()),
        Err(JsonRejection::JsonSyntaxError(e))
            if e.body_text()
                .contains("EOF while parsing a value at line 1 column 0") =>
        {
            Ok(T::default())
        }
        Err(rejection) => Err(rejection.into()),
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub size_gb: u64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub size_gb: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    pub size_gb: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Deleted {
    pub id: VolumeId,
    pub deleted: bool,
}

pub async fn list(State(agent): State<Arc<Agent>>) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(agent.volumes.list()?))
}

pub async fn create(
    State(agent): State<Arc<Agent>>,
    body: Body<CreateRequest>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let Json(JsonObject(request)) = body?;
    let volume = counted(&agent, "create", async {
        agent.require_xenapi()?;
        Ok(agent
            .volumes
            .create(request.size_gb, &request.name, &request.description)
            .await?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(volume)))
}

pub async fn show(State(agent): State<Arc<Agent>>, id: Id) -> Result<Json<Volume>, ApiError> {
    Ok(Json(agent.volumes.show(volume_id(id)?)?))
}

pub async fn delete(State(agent): State<Arc<Agent>>, id: Id) -> Result<Json<Deleted>, ApiError> {
    let id = volume_id(id)?;
    counted(&agent, "delete", async {
        agent.require_xenapi()?;
        Ok(agent.volumes.delete(id).await?)
    })
    .await?;
    Ok(Json(Deleted { id, deleted: true }))
}

pub async fn extend(
    State(agent): State<Arc<Agent>>,
    id: Id,
    body: Body<ExtendRequest>,
) -> Result<Json<Volume>, ApiError> {
    let id = volume_id(id)?;
    let Json(JsonObject(request)) = body?;
    let volume = counted(&agent, "extend", async {
        agent.require_xenapi()?;
        Ok(agent.volumes.extend(id, request.size_gb).await?)
    })
    .await?;
    Ok(Json(volume))
}

pub async fn connection(
    State(agent): State<Arc<Agent>>,
    id: Id,
) -> Result<Json<ConnectionInfo>, ApiError> {
    Ok(Json(agent.volumes.connection(volume_id(id)?)?))
}

async fn start_copy(
    agent: Arc<Agent>,
    kind: CopyKind,
    id: Id,
    headers: HeaderMap,
    body: Body<CopyRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let source = volume_id(id)?;
    let request = optional(&headers, body)?;
    if kind != CopyKind::FromSnapshot && request.size_gb.is_some() {
        return Err(ApiError::invalid(format!(
            "size_gb is only accepted by from-snapshot, not {}",
            kind.job_name()
        )));
    }
    before_job(&agent, kind.job_name(), async {
        agent.require_xenapi()?;
        Ok(agent
            .volumes
            .check_copy(source, request.size_gb, request.name.as_deref())?)
    })
    .await?;
    let worker = agent.clone();
    let job = agent.jobs.start(
        kind.job_name(),
        Some(source.to_string()),
        move |ctx| async move {
            let volume = worker
                .volumes
                .copy(kind, source, request.size_gb, request.name, &ctx)
                .await?;
            Ok(serde_json::to_value(volume).expect("volumes serialise"))
        },
    );
    Ok((StatusCode::ACCEPTED, Json(job)))
}

pub async fn snapshot(
    State(agent): State<Arc<Agent>>,
    id: Id,
    headers: HeaderMap,
    body: Body<CopyRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    start_copy(agent, CopyKind::Snapshot, id, headers, body).await
}

pub async fn clone(
    State(agent): State<Arc<Agent>>,
    id: Id,
    headers: HeaderMap,
    body: Body<CopyRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    start_copy(agent, CopyKind::Clone, id, headers, body).await
}

pub async fn from_snapshot(
    State(agent): State<Arc<Agent>>,
    id: Id,
    headers: HeaderMap,
    body: Body<CopyRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    start_copy(agent, CopyKind::FromSnapshot, id, headers, body).await
}

pub async fn attach(
    State(agent): State<Arc<Agent>>,
    id: Id,
) -> Result<Json<crate::volume::AttachInfo>, ApiError> {
    let id = volume_id(id)?;
    let attached = counted(&agent, "attach", async {
        agent.require_xenapi()?;
        Ok(agent.volumes.attach(id, agent.mode().as_ref()).await?)
    })
    .await?;
    Ok(Json(attached))
}

pub async fn detach(
    State(agent): State<Arc<Agent>>,
    id: Id,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = volume_id(id)?;
    counted(&agent, "detach", async {
        Ok(agent.volumes.detach(id).await?)
    })
    .await?;
    Ok(Json(serde_json::json!({"id": id, "detached": true})))
}

pub async fn attachments(State(agent): State<Arc<Agent>>) -> Json<Vec<crate::volume::AttachInfo>> {
    Json(agent.volumes.attachments())
}

pub async fn stats(State(agent): State<Arc<Agent>>) -> Result<Json<Stats>, ApiError> {
    Ok(Json(agent.volumes.stats()?))
}
