//! `clipmask status`: is a run complete? For every id the run should produce (the same labels
//! and split), whether its outputs are all there and readable (done), it is listed in a
//! failures file (failed), or neither (missing), per shard and in total, plus the temporary
//! files of processes that died. A sharded run is complete when every id is done or failed;
//! the missing ids are the split of the rerun that completes it.
use crate::cluster::shard_of;
use crate::outputs::{read_label_png, CamArchive};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Largest failures file read (about 1 KB per failed image).
const MAX_FAILURES_BYTES: u64 = 1 << 30;

/// One id that failed, as its failures file says.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailedId {
    pub id: String,
    pub stage: String,
    pub reason: String,
    /// The failures file it is listed in.
    pub file: String,
}

/// Counts of one shard.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ShardCounts {
    pub shard: String,
    pub ids: usize,
    pub done: usize,
    pub failed: usize,
    pub missing: usize,
}

/// The state of an output directory.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusReport {
    pub schema: u32,
    pub out: String,
    pub ids: usize,
    pub done: usize,
    pub failed: Vec<FailedId>,
    /// Neither done nor failed (not run, killed, or an output missing or unreadable), sorted.
    pub missing: Vec<String>,
    /// Of the missing: why an id with some outputs is not done (a truncated archive, ...).
    pub incomplete: BTreeMap<String, String>,
    /// Temporary files of processes that died (a rerun removes them).
    pub stale_temp_files: Vec<String>,
    /// Per shard, when the run was sharded (from the failures/summary file names, or asked).
    pub shards: Vec<ShardCounts>,
    /// Every id done or failed.
    pub complete: bool,
}

/// The shard count of a sharded run, from its `failures.I-of-N.jsonl` / `summary.I-of-N.json`.
fn shard_count_from_files(out: &Path) -> Option<usize> {
    let mut counts = BTreeSet::new();
    for e in std::fs::read_dir(out).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("failures.").or_else(|| name.strip_prefix("summary.")) else { continue };
        let Some((tag, _ext)) = rest.rsplit_once('.') else { continue };
        if let Some((_, n)) = tag.split_once("-of-") {
            if let Ok(n) = n.parse::<usize>() {
                counts.insert(n);
            }
        }
    }
    // Several counts (reruns with another N): the ids cannot be grouped one way; use the largest.
    counts.into_iter().next_back()
}

/// Every failure listed in `out`'s failures files (`failures.jsonl`, `failures.I-of-N.jsonl`),
/// by id (the last listing wins). Files are never read through a link.
fn listed_failures(out: &Path) -> Result<BTreeMap<String, FailedId>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.starts_with("failures.") && n.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    let mut out_map = BTreeMap::new();
    for f in files {
        let text = crate::files::read_own_text(&f, MAX_FAILURES_BYTES)?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: a line is not JSON", f.display()))?;
            let Some(id) = v["id"].as_str() else { continue };
            let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
            out_map.insert(
                id.to_string(),
                FailedId {
                    id: id.to_string(),
                    stage: text("stage"),
                    reason: text("reason"),
                    file: f.display().to_string(),
                },
            );
        }
    }
    Ok(out_map)
}

/// Whether the folder holds outputs of this run (a kind the run wrote, e.g. `cams` with
/// `--save-cams`): then every done id needs one there too.
fn kind_written(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| rd.flatten().any(|e| !e.file_name().to_string_lossy().starts_with('.')))
}

/// Why `id` is not done, or None when all its outputs are there and readable.
fn not_done(out: &Path, id: &str, kinds: &[&str]) -> Option<String> {
    let mask = out.join("masks").join(format!("{id}.png"));
    if !mask.symlink_metadata().is_ok_and(|m| m.is_file()) {
        return Some("no mask".into());
    }
    if let Err(e) = read_label_png(&mask) {
        return Some(format!("mask unreadable: {}", crate::errors::format_error(&e)));
    }
    for kind in kinds {
        let (ext, check): (&str, fn(&Path) -> Result<()>) = match *kind {
            "cams" => ("npz", |p| CamArchive::read(p).map(|_| ())),
            "confidence" => ("npy", |p| crate::files::open_regular(p).map(|_| ())),
            _ => ("jpg", |p| crate::files::open_regular(p).map(|_| ())),
        };
        let p = out.join(kind).join(format!("{id}.{ext}"));
        if let Err(e) = check(&p) {
            return Some(format!("{kind}/{id}.{ext}: {}", crate::errors::format_error(&e)));
        }
    }
    None
}

/// The state of `out` for the run of `ids`; `shards` overrides the shard count read from the
/// file names.
pub fn status(out: &Path, ids: &[String], shards: Option<usize>) -> Result<StatusReport> {
    if !out.is_dir() {
        anyhow::bail!("{} is not a directory", out.display());
    }
    let kinds: Vec<&str> =
        ["cams", "overlays", "confidence"].into_iter().filter(|k| kind_written(&out.join(k))).collect();
    let listed = listed_failures(out)?;
    let mut report = StatusReport {
        schema: crate::schema::SCHEMA_VERSION,
        out: out.display().to_string(),
        ids: ids.len(),
        ..Default::default()
    };
    let mut states: Vec<(&String, u8)> = Vec::with_capacity(ids.len()); // 0 done, 1 failed, 2 missing
    for id in ids {
        let state = match not_done(out, id, &kinds) {
            None => 0,
            Some(_) if listed.contains_key(id) => 1,
            Some(why) => {
                // An id with some outputs but not all is worth naming; one never started is not.
                let started = ["cams/{}.npz", "overlays/{}.jpg", "confidence/{}.npy"]
                    .iter()
                    .any(|f| out.join(f.replace("{}", id)).symlink_metadata().is_ok());
                if why != "no mask" || started {
                    report.incomplete.insert(id.clone(), why);
                }
                2
            }
        };
        match state {
            0 => report.done += 1,
            1 => report.failed.push(listed[id].clone()),
            _ => report.missing.push(id.clone()),
        }
        states.push((id, state));
    }
    let dirs: Vec<PathBuf> = crate::pipeline::temp_dirs(out);
    report.stale_temp_files =
        crate::files::stale_temp_files(&dirs, false).iter().map(|p| p.display().to_string()).collect();
    if let Some(n) = shards.or_else(|| shard_count_from_files(out)).filter(|&n| n > 1) {
        let mut counts: Vec<ShardCounts> =
            (0..n).map(|i| ShardCounts { shard: format!("{i}/{n}"), ..Default::default() }).collect();
        for (id, state) in &states {
            let c = &mut counts[shard_of(id, n)];
            c.ids += 1;
            match state {
                0 => c.done += 1,
                1 => c.failed += 1,
                _ => c.missing += 1,
            }
        }
        report.shards = counts;
    }
    report.complete = report.missing.is_empty();
    Ok(report)
}

impl StatusReport {
    /// The terminal form.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} ids: {} done, {} failed, {} missing{}; {} stale temporary file(s)",
            self.out,
            self.ids,
            self.done,
            self.failed.len(),
            self.missing.len(),
            if self.incomplete.is_empty() { String::new() } else { format!(" ({} incomplete)", self.incomplete.len()) },
            self.stale_temp_files.len()
        );
        if !self.shards.is_empty() {
            let _ = writeln!(s, "{:>8} {:>7} {:>7} {:>7} {:>7}", "shard", "ids", "done", "failed", "missing");
            for c in &self.shards {
                let _ = writeln!(s, "{:>8} {:>7} {:>7} {:>7} {:>7}", c.shard, c.ids, c.done, c.failed, c.missing);
            }
        }
        for f in self.failed.iter().take(20) {
            let _ = writeln!(s, "failed: {} ({}): {}", f.id, f.stage, f.reason);
        }
        for (id, why) in self.incomplete.iter().take(20) {
            let _ = writeln!(s, "incomplete: {id}: {why}");
        }
        for p in self.stale_temp_files.iter().take(20) {
            let _ = writeln!(s, "stale temporary file: {p}");
        }
        let _ = writeln!(
            s,
            "{}",
            if self.complete { "complete: every id is done or failed" } else { "incomplete: rerun the missing ids" }
        );
        s
    }
}
