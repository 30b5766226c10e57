//! Errors of the VHD module. Every message starts with the file it concerns and names the
//! field and the rule that failed, because these errors end up in operator logs and in replies
//! to tenants whose images were refused.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// An operating-system error while touching `path`.
    #[error("{}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: io::Error,
    },

    /// The file is not a well-formed VHD (structure, checksum, bounds, overlaps, ...).
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },

    /// The file is well-formed but fails a `vhd-util check` style rule (timestamps, reserved
    /// bytes, batmap, locators resolving, ...). Only `check()` produces these.
    #[error("{}: check failed: {msg}", path.display())]
    Check { path: PathBuf, msg: String },

    /// The differencing chain rooted at `path` cannot be resolved safely.
    #[error("{}: chain: {msg}", path.display())]
    Chain { path: PathBuf, msg: String },

    /// A valid VHD feature this module does not handle (e.g. a block size other than 2 MiB
    /// where a rewrite is required).
    #[error("{}: unsupported: {msg}", path.display())]
    Unsupported { path: PathBuf, msg: String },

    /// A caller-supplied argument is out of range.
    #[error("{}: invalid argument: {msg}", path.display())]
    InvalidArgument { path: PathBuf, msg: String },

    /// Creating a new image refused to replace an existing file.
    #[error("{}: already exists", path.display())]
    AlreadyExists { path: PathBuf },

    /// Virtual sizes only ever grow.
    #[error(
        "{}: refusing to shrink virtual size from {current} to {requested} bytes",
        path.display()
    )]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },

    /// The raw source stream ended before the announced size.
    #[error("{}: source ended after {got} of {expected} bytes", path.display())]
    ShortSource {
        path: PathBuf,
        got: u64,
        expected: u64,
    },

    /// The progress callback asked to stop; any partial output was removed.
    #[error("operation cancelled")]
    Cancelled,
}

impl VhdError {
    pub(crate) fn io(path: &Path, context: impl Into<String>, source: io::Error) -> Self {
        VhdError::Io {
            path: path.to_path_buf(),
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, msg: impl Into<String>) -> Self {
        VhdError::Invalid {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn check(path: &Path, msg: impl Into<String>) -> Self {
        VhdError::Check {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn chain(path: &Path, msg: impl Into<String>) -> Self {
        VhdError::Chain {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, msg: impl Into<String>) -> Self {
        VhdError::Unsupported {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn argument(path: &Path, msg: impl Into<String>) -> Self {
        VhdError::InvalidArgument {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// The same error told about `path` instead of the file it concerns: an importer names
    /// the member or image the tenant sent rather than its staging file on the share.
    pub fn about(self, path: &Path) -> Self {
        let path = path.to_path_buf();
        match self {
            VhdError::Io {
                context, source, ..
            } => VhdError::Io {
                path,
                context,
                source,
            },
            VhdError::Invalid { msg, .. } => VhdError::Invalid { path, msg },
            VhdError::Check { msg, .. } => VhdError::Check { path, msg },
            VhdError::Chain { msg, .. } => VhdError::Chain { path, msg },
            VhdError::Unsupported { msg, .. } => VhdError::Unsupported { path, msg },
            VhdError::InvalidArgument { msg, .. } => VhdError::InvalidArgument { path, msg },
            VhdError::AlreadyExists { .. } => VhdError::AlreadyExists { path },
            VhdError::Shrink {
                current, requested, ..
            } => VhdError::Shrink {
                path,
                current,
                requested,
            },
            VhdError::ShortSource { got, expected, .. } => VhdError::ShortSource {
                path,
                got,
                expected,
            },
            VhdError::Cancelled => VhdError::Cancelled,
        }
    }

    /// True when the operation stopped because the progress callback returned false.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, VhdError::Cancelled)
    }
}
