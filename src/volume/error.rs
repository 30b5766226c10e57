//! Errors of volume operations, in terms an operator can act on.

use crate::xenapi::XenApiError;

use super::VolumeId;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("volume {0} does not exist")]
    NotFound(VolumeId),
    #[error("{0}")]
    Conflict(String),
    #[error("{operation} is not possible in {mode} mode: {reason}")]
    WrongMode {
        operation: &'static str,
        mode: String,
        reason: String,
    },
    #[error("the agent is not ready yet: {0}")]
    NotReady(String),
    /// The job journal could not record a step, so the step was not taken.
    #[error("job journal: {0}")]
    Journal(String),
    #[error("{context}: {source}")]
    XenApi {
        context: String,
        #[source]
        source: XenApiError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Vhd(#[from] crate::vhd::VhdError),
    /// An image was refused or could not be converted.
    #[error("{0}")]
    Image(crate::image::ImageError),
    #[error("cancelled")]
    Cancelled,
    /// The operation failed and so did part of the clean-up; both are reported.
    #[error("{error}; clean-up also failed: {}", cleanup.join("; "))]
    CleanupFailed {
        error: Box<VolumeError>,
        cleanup: Vec<String>,
    },
}

impl VolumeError {
    pub fn xenapi(context: impl Into<String>) -> impl FnOnce(XenApiError) -> VolumeError {
        let context = context.into();
        move |source| VolumeError::XenApi { context, source }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VolumeError {
        let context = context.into();
        move |source| VolumeError::Io { context, source }
    }

    /// Attaches clean-up failures, if any, to this error.
    pub fn with_cleanup(self, cleanup: Vec<String>) -> VolumeError {
        if cleanup.is_empty() {
            self
        } else {
            VolumeError::CleanupFailed {
                error: Box::new(self),
                cleanup,
            }
        }
    }
}

impl VolumeError {
    /// Stable category for API callers and job records.
    pub fn kind(&self) -> &'static str {
        match self {
            VolumeError::Invalid(_) => "invalid_request",
            VolumeError::NotFound(_) => "not_found",
            VolumeError::Conflict(_) => "conflict",
            VolumeError::WrongMode { .. } => "wrong_mode",
            VolumeError::NotReady(_) => "not_ready",
            VolumeError::Journal(_) => "journal",
            VolumeError::XenApi { .. } => "xenapi",
            VolumeError::Io { .. } => "io",
            VolumeError::Vhd(_) => "vhd",
            VolumeError::Image(e) if e.is_refusal() => "image_refused",
            VolumeError::Image(_) => "image",
            VolumeError::Cancelled => "cancelled",
            VolumeError::CleanupFailed { error, .. } => error.kind(),
        }
    }

    /// The XenAPI error underneath, if that is what failed.
    pub fn xenapi_error(&self) -> Option<&XenApiError> {
        match self {
            VolumeError::XenApi { source, .. } => Some(source),
            VolumeError::CleanupFailed { error, .. } => error.xenapi_error(),
            _ => None,
        }
    }
}

impl From<VolumeError> for crate::jobs::JobError {
    fn from(error: VolumeError) -> Self {
        crate::jobs::JobError {
            kind: error.kind().to_string(),
            message: error.to_string(),
        }
    }
}
