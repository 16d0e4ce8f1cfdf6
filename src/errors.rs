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

/// A one-line reason from a panic payload. tch reports a libtorch error as a panic whose text
/// is `called `Result::unwrap()` on an `Err` value: Torch("<message>\n<C++ backtrace>")`, all on
/// one line with escaped newlines: only the message's first line is kept, and a CUDA
/// out-of-memory error says what to do about it.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("internal error");
    one_line_reason(msg)
}

/// See [`panic_message`]; also used for libtorch errors that arrive as values.
pub fn one_line_reason(msg: &str) -> String {
    let mut text = msg;
    if let Some(i) = text.find("Torch(\"") {
        text = &text[i + 7..];
    }
    // Escaped newlines (from Debug formatting) end the line like real ones.
    let end = [text.find("\\n"), text.find('\n')].into_iter().flatten().min().unwrap_or(text.len());
    let line = text[..end].trim().trim_end_matches("\")").trim_end_matches('"');
    let line = if line.is_empty() { "internal error" } else { line };
    if line.contains("CUDA out of memory") || line.contains("CUDA error: out of memory") {
        return format!(
            "out of GPU memory ({}): use a smaller --batch-size or --max-side, or run on the CPU",
            cap_reason(line)
        );
    }
    if line.contains("attempt to divide by zero") || line.contains("index out of bounds") {
        return format!("internal error ({line}): please report it with the input that caused it");
    }
    cap_reason(line)
}

/// Longest reason kept in a failures file, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// `reason` cut to at most [`MAX_REASON_BYTES`] at a character boundary, saying how much was cut.
pub fn cap_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_string();
    }
    let mut end = MAX_REASON_BYTES - 40;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ... ({} bytes cut)", &reason[..end], reason.len() - end)
}

/// One error per line: the context chain, without libtorch's C++ backtrace lines.
pub fn format_error(e: &anyhow::Error) -> String {
    let line = e.chain().map(|c| one_line_reason(&c.to_string())).collect::<Vec<_>>().join(": ");
    cap_reason(&line)
}
