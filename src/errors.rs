//! Error types shared by the commands: the per-image failure (one image fails, the run goes on)
//! and the text of a caught panic (tch reports libtorch's C++ exceptions as panics).
use std::any::Any;

/// Why one image produced no output. The stage is written to `OUT/failures.jsonl`, so a user
/// can tell a bad file (decode) from an unknown class (labels) or a full disk (write).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Its labels could not be resolved against the config.
    #[error("{0}")]
    Labels(String),
    /// The file could not be read or decoded, or is over the pixel budget.
    #[error("{0}")]
    Decode(String),
    /// The model or the maps failed (libtorch error, out of memory).
    #[error("model error: {0}")]
    Model(String),
    /// Labels, CRF or files failed.
    #[error("{0}")]
    Write(String),
}

impl ImageError {
    /// The stage name written to failures.jsonl.
    pub fn stage(&self) -> &'static str {
        match self {
            ImageError::Labels(_) => "labels",
            ImageError::Decode(_) => "decode",
            ImageError::Model(_) => "model",
            ImageError::Write(_) => "write",
        }
    }
}

/// The first line of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("internal error");
    msg.lines().next().unwrap_or("").to_string()
}
