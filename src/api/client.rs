//! A small client for the control API over its Unix socket, used by the CLI and tests.

use std::path::{Path, PathBuf};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// A request body streamed to the daemon.
pub type UploadBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to xenapinfsd at {path}: {source} ({})",
        connect_hint(source)
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to xenapinfsd: {0}")]
    Http(String),
    /// The daemon answered with its JSON error shape.
    #[error("{message}")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("unexpected answer from xenapinfsd: {0}")]
    Decode(String),
}

/// What an operator should check when the socket cannot be reached.
fn connect_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "only root and members of the daemon's socket group (socket_group) may use it"
        }
        _ => "is the service running?",
    }
}

/// Sends requests to `xenapinfsd`.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        ApiClient {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request("GET", path, None).await
    }

    /// Sends one request on a fresh connection and returns the response, body unread.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let body = Full::new(Bytes::from(payload))
            .map_err(|never| match never {})
            .boxed_unsync();
        self.send_body(method, path, "application/json", body).await
    }

    /// Sends a request with any body (e.g. an image being uploaded).
    pub async fn send_body(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: UploadBody,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "xenapinfsd")
            .header("content-type", content_type)
            .body(body)
            .map_err(|e| ClientError::Http(e.to_string()))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))
    }

    pub async fn request<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path, body).await?;
        Self::decode(response).await
    }

    /// Reads a JSON answer, or the API's error shape.
    pub async fn decode<T: DeserializeOwned>(
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<T, ClientError> {
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let error = &parsed["error"];
            return Err(ClientError::Api {
                status: status.as_u16(),
                kind: error["kind"].as_str().unwrap_or("unknown").to_string(),
                message: error["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("HTTP {status}")),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

impl ApiClient {
    /// Follows `/v1/jobs/{id}/events` and calls `on_update` for each state of the job until it
    /// has finished; returns the final state.
    pub async fn follow_job(
        &self,
        id: &str,
        on_update: &mut (dyn FnMut(&crate::jobs::Job) + Send),
    ) -> Result<crate::jobs::Job, ClientError> {
        let response = self
            .send("GET", &format!("/v1/jobs/{id}/events"), None)
            .await?;
        if !response.status().is_success() {
            return Err(ClientError::Http(format!(
                "following job {id}: HTTP {}",
                response.status()
            )));
        }
        let mut body = response.into_body();
        let mut pending = Vec::new();
        let mut last = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let job: crate::jobs::Job = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
                on_update(&job);
                last = Some(job);
            }
        }
        match last {
            Some(job) if job.state.is_finished() => Ok(job),
            _ => Err(ClientError::Http(format!(
                "the daemon stopped reporting on job {id} before it finished"
            ))),
        }
    }
}
