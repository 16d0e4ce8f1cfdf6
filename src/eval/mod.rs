//! Evaluation of label maps against pixel ground truth (docs/method.md §8), and of saved CAMs through
//! the background-threshold labelling of docs/method.md §6. Several runs (`--pred A --pred B`)
//! are scored on the same images and compared.
//!
//! Conventions used throughout:
//! - Classes are `0..n`: 0 is background, `1..=C` the config's classes in order (n = 21 for
//!   VOC, 81 for COCO). 255 is "ignore".
//! - Ground-truth 255 pixels are skipped entirely.
//! - A *predicted* 255 (e.g. the low-confidence pixels of the CRF step) on a valid ground-truth
//!   pixel is kept in a separate "ignored" column, which is not a class. In the main metrics it
//!   counts as wrong: a miss for its ground-truth class and a false positive for no class. The
//!   `*_kept` metric drops those pixels instead, which measures the quality of what was kept.
//! - Any other label value above C, in either map, is an error, never silently clipped.
//!
//! `options` says what to evaluate, `metrics` is the arithmetic, `run` reads directories and
//! accumulates, `output` prints tables and JSON, `report` writes the HTML report, and
//! `image_labels` scores image-level labels (`--labels-pred`).
pub mod image_labels;
mod metrics;
mod options;
mod output;
mod report;
mod results;
mod run;

pub use crate::label_maps::label_map_from_cams;
use anyhow::{bail, Result};
pub use metrics::{ClassMetrics, ConfusionMatrix, LabelError, Metrics};
pub use options::{CamKey, EvalOptions, LabelOptions};
pub use output::comparison_table;
pub use output::eval_json;
pub use report::{DEFAULT_REPORT_IMAGES, PAGE_SIZE as REPORT_PAGE_SIZE};
pub use results::{EvalReport, ImageScore, VariantResult};

/// `clipmask eval`: evaluates, writes the report if asked, and returns the tables (or the
/// JSON) to print.
pub fn run(opts: &EvalOptions, json: bool) -> anyhow::Result<String> {
    if opts.labels.labels_pred.is_some() {
        return image_labels::run(opts, json);
    }
    let runs = evaluate_runs(opts)?;
    let mut text = match (json, runs.as_slice()) {
        (true, runs) => eval_json(runs)? + "\n",
        (false, [one]) => one.to_table(),
        (false, runs) => comparison_table(runs),
    };
    if let (false, Some(dir)) = (json, &opts.report) {
        text += &format!("report: {}\n", dir.join("index.html").display());
    }
    Ok(text)
}

/// Scores every run `opts` describes on the same images (label directories first, then CAM
/// directories), one report each, and writes the HTML report when `opts.report` is set (its
/// folders are checked first, before anything is scored). Prints nothing but notes about
/// skipped ids (stderr).
pub fn evaluate_runs(opts: &EvalOptions) -> Result<Vec<EvalReport>> {
    if let Some(dir) = &opts.report {
        report::check(dir, opts)?;
    }
    let runs = run::score_runs(opts)?;
    if let Some(dir) = &opts.report {
        report::write(dir, opts, &runs)?;
    }
    Ok(runs)
}

/// [`evaluate_runs`] for exactly one run.
pub fn evaluate(opts: &EvalOptions) -> Result<EvalReport> {
    let mut runs = evaluate_runs(opts)?;
    if runs.len() != 1 {
        bail!("{} runs given where one was expected", runs.len());
    }
    Ok(runs.remove(0))
}
