//! Errors of the XenAPI client: what xapi said, kept apart from what went wrong getting there.

use std::fmt;

/// An error returned by a XenAPI call.
#[derive(Debug, thiserror::Error)]
pub enum XenApiError {
    /// xapi answered with `Status = Failure`; the code and parameters are kept as sent.
    #[error("XenAPI {method} failed: {failure}")]
    Api { method: String, failure: ApiFailure },
    /// The request did not get an answer from xapi.
    #[error("XenAPI {method} at {url}: {source}")]
    Transport {
        method: String,
        url: String,
        #[source]
        source: TransportError,
    },
    /// xapi answered with something that is not a XenAPI response of the expected shape.
    #[error("XenAPI {method}: unexpected response: {reason}")]
    Protocol { method: String, reason: String },
    /// A task was cancelled, by us or by someone else.
    #[error("XenAPI task {task} ({name}) was cancelled")]
    TaskCancelled { task: String, name: String },
    /// A task did not finish in the time allowed; it has been asked to cancel.
    #[error("XenAPI task {task} ({name}) did not finish within {seconds} s")]
    TaskTimeout {
        task: String,
        name: String,
        seconds: u64,
    },
    /// A task's progress did not move for too long; it has been asked to cancel.
    #[error("XenAPI task {task} ({name}) made no progress for {seconds} s and was cancelled")]
    TaskStalled {
        task: String,
        name: String,
        seconds: u64,
    },
    /// Logins kept being redirected between pool members.
    #[error("XenAPI login: too many HOST_IS_SLAVE redirects (last master address {last})")]
    TooManyRedirects { last: String },
    /// A redirect named a master address that cannot be turned into a URL.
    #[error("XenAPI login: HOST_IS_SLAVE named an unusable master address {address:?}")]
    BadMasterAddress { address: String },
}

impl XenApiError {
    /// The XenAPI error code, when xapi sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            XenApiError::Api { failure, .. } => Some(&failure.code),
            _ => None,
        }
    }

    /// The XenAPI error parameters, when xapi sent them.
    pub fn params(&self) -> &[String] {
        match self {
            XenApiError::Api { failure, .. } => &failure.params,
            _ => &[],
        }
    }

    /// True for a failure with exactly this XenAPI code.
    pub fn is(&self, code: &str) -> bool {
        self.code() == Some(code)
    }

    /// True when xapi could not be reached at all (as opposed to refusing a call).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, XenApiError::Transport { .. })
    }
}

/// `ErrorDescription` of a failed call: `[CODE, param1, ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub code: String,
    pub params: Vec<String>,
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code)?;
        if !self.params.is_empty() {
            write!(f, " [{}]", self.params.join("; "))?;
        }
        Ok(())
    }
}

/// Why a request got no XenAPI answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("timed out after {0} s")]
    Timeout(u64),
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("{0}")]
    Other(String),
}
