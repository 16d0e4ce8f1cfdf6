//! The failures file every command writes (`OUT/failures.jsonl`, `tag`'s
//! `<stem>.failures.jsonl`): one JSON line per item that failed, merged with the lines of the
//! items this run did not attempt, so shards and reruns never lose each other's entries.
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::path::Path;

/// One line of a failures file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub id: String,
    pub path: String,
    /// Where it failed: labels, decode, model or write (crf and tag for those commands).
    pub stage: String,
    pub reason: String,
}

/// Largest failures.jsonl read back (about 1 KB per failed image: a million failures).
const MAX_FAILURES_BYTES: u64 = 1 << 30;

/// Updates OUT/failures.jsonl: entries of images this run attempted are replaced by this run's
/// outcome, others (other shards, images not reached) are kept. A lock on the output directory
/// serialises shards that finish at the same time.
pub fn write_failures(out: &Path, failures: &[Failure], attempted: &HashSet<String>) -> Result<()> {
    write_failures_file(&out.join("failures.jsonl"), failures, attempted)
}

/// [`write_failures`] for any failures file (`tag` writes `<stem>.failures.jsonl` beside its
/// labels); the lock is taken on the file's directory. Reasons are capped at
/// [`crate::errors::MAX_REASON_BYTES`] (a 50 MB class name must not go whole into the file).
pub fn write_failures_file(path: &Path, failures: &[Failure], attempted: &HashSet<String>) -> Result<()> {
    let out = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let lock = std::fs::File::open(out).with_context(|| format!("cannot open {}", out.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    let mut lines: Vec<String> = crate::files::read_own_text(path, MAX_FAILURES_BYTES)?
        .lines()
        .filter(|l| {
            let id = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["id"].as_str().map(String::from));
            id.is_some_and(|id| !attempted.contains(&id))
        })
        .map(String::from)
        .collect();
    for f in failures {
        let capped = Failure { reason: crate::errors::cap_reason(&f.reason), ..f.clone() };
        lines.push(serde_json::to_string(&capped)?);
    }
    let r = if lines.is_empty() {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    } else {
        crate::files::write_atomic(path, |w| {
            use std::io::Write;
            for l in &lines {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })
    };
    let _ = lock.unlock();
    r
}
