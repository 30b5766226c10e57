//! Errors of the image layer. Images are hostile input: every refusal says which member, which
//! field and which rule.

use crate::vhd::VhdError;

use super::ImageFormat;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image breaks a rule (unsafe, malformed, unsupported); the message names the member
    /// or field and the rule.
    #[error("image refused: {0}")]
    Refused(String),
    /// The content is not the format the caller declared.
    #[error("image refused: declared as {declared} but the content is {detected}")]
    Mismatch {
        declared: ImageFormat,
        detected: ImageFormat,
    },
    /// Something is larger than allowed (the target volume, a member, the total).
    #[error("image refused: {what} is {size} bytes, more than the {limit} allowed")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// A VHD in the image is not valid (the message names the file and the rule).
    #[error("image refused: {0}")]
    Vhd(#[from] VhdError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// qemu-img failed; its own message is kept.
    #[error("{command} failed ({status}): {stderr}")]
    Qemu {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cancelled")]
    Cancelled,
}

impl ImageError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }

    pub fn io_at(path: &std::path::Path, what: &str) -> impl FnOnce(std::io::Error) -> ImageError {
        let context = format!("{what} {}", path.display());
        move |source| ImageError::Io { context, source }
    }

    /// True when the image itself is at fault (as opposed to the machine or the caller).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ImageError::Refused(_)
                | ImageError::Mismatch { .. }
                | ImageError::TooLarge { .. }
                | ImageError::Vhd(_)
        )
    }
}
