//! XenAPI failures as the simulator raises them: a code and its string parameters, exactly what
//! ends up in `ErrorDescription`.

/// One XenAPI failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub params: Vec<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]", self.code, self.params.join("; "))
    }
}

impl std::error::Error for ApiError {}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(
        code: impl Into<String>,
        params: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ApiError {
            code: code.into(),
            params: params.into_iter().map(Into::into).collect(),
        }
    }

    pub fn handle_invalid(class: &str, handle: &str) -> Self {
        Self::new("HANDLE_INVALID", [class, handle])
    }

    pub fn uuid_invalid(class: &str, uuid: &str) -> Self {
        Self::new("UUID_INVALID", [class, uuid])
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new("INTERNAL_ERROR", [message.into()])
    }

    pub fn field_not_found(field: &str) -> Self {
        Self::internal(format!(
            "Server_helpers.Dispatcher_FieldNotFound(\"{field}\")"
        ))
    }

    pub fn operation_not_allowed(reason: impl Into<String>) -> Self {
        Self::new("OPERATION_NOT_ALLOWED", [reason.into()])
    }

    /// `SR_BACKEND_FAILURE_<n>` with SM's `["", reason, stderr]` parameters.
    pub fn backend(code: u32, reason: impl Into<String>, stderr: impl Into<String>) -> Self {
        Self::new(
            format!("SR_BACKEND_FAILURE_{code}"),
            [String::new(), reason.into(), stderr.into()],
        )
    }

    /// The message SM builds for an error with an `opterr`.
    pub fn backend_opterr(code: u32, description: &str, opterr: impl std::fmt::Display) -> Self {
        Self::backend(code, format!("{description} [opterr={opterr}]"), "")
    }

    /// The error a method's task ends with when it is cancelled.
    pub fn task_cancelled(task: &str) -> Self {
        Self::new("TASK_CANCELLED", [task])
    }
}
