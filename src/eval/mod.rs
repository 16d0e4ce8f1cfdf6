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
//! `metrics` is the arithmetic, `run` reads directories and accumulates, `output` prints tables
//! and JSON, `report` writes the HTML report.
mod metrics;
mod output;
mod report;
mod run;

pub use crate::labels::labels_from_cams;
pub use metrics::{ClassMetrics, ConfusionMatrix, LabelError, Metrics};
pub use output::comparison_json;
pub use output::comparison_table;
pub use run::{evaluate, evaluate_runs};
use serde::Serialize;
use std::path::PathBuf;

/// Which maps of a CAM archive to label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CamKey {
    /// Refined (CAA) maps.
    #[serde(rename = "cams")]
    Cams,
    /// GradCAM maps before refinement.
    #[serde(rename = "raw_cams")]
    RawCams,
}

impl CamKey {
    /// The archive entry's name.
    pub fn name(self) -> &'static str {
        match self {
            CamKey::Cams => "cams",
            CamKey::RawCams => "raw_cams",
        }
    }
}

/// Where image-level labels are scored from (`eval --labels-pred`, [`crate::label_metrics`]).
#[derive(Debug, Clone, Default)]
pub struct LabelOptions {
    /// Predicted labels file (JSON or text, as `tag` writes it).
    pub labels_pred: Option<PathBuf>,
    /// Ground-truth labels file.
    pub labels_gt: Option<PathBuf>,
    /// Ground-truth VOC XML annotations directory.
    pub annotations: Option<PathBuf>,
    /// Per-class scores for the mAP.
    pub scores: Option<PathBuf>,
}

/// What to evaluate: the library side of `clipmask eval` (the CLI fills it from flags).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Directories of predicted label PNGs `<id>.png`, one run each.
    pub pred: Vec<PathBuf>,
    /// Directories of saved maps `<id>.npz`, one run each, labelled per `alpha`.
    pub cams: Vec<PathBuf>,
    /// Ground-truth label PNGs `<id>.png`.
    pub gt: Option<PathBuf>,
    /// Dataset config: a JSON path or a shipped name.
    pub config: String,
    /// Ids to evaluate; default every ground-truth PNG.
    pub split: Option<PathBuf>,
    /// Skip ids without prediction or ground truth instead of failing.
    pub allow_missing: bool,
    /// HTML report directory.
    pub report: Option<PathBuf>,
    /// Photos for the report's overlays.
    pub images: Option<PathBuf>,
    /// Background exponents tried on CAM runs.
    pub alpha: Vec<f32>,
    /// Which maps of the archives to label.
    pub cam_key: CamKey,
    /// Image-level label quality instead of masks.
    pub labels: LabelOptions,
}

impl EvalOptions {
    /// Evaluates label PNGs in `pred` against `gt`, everything else default.
    pub fn new(pred: impl Into<PathBuf>, gt: impl Into<PathBuf>, config: impl Into<String>) -> Self {
        EvalOptions {
            pred: vec![pred.into()],
            cams: Vec::new(),
            gt: Some(gt.into()),
            config: config.into(),
            split: None,
            allow_missing: false,
            report: None,
            images: None,
            alpha: vec![1.0, 2.0],
            cam_key: CamKey::Cams,
            labels: LabelOptions::default(),
        }
    }

    /// The ground-truth directory (empty when only labels are scored).
    pub(crate) fn gt_dir(&self) -> &std::path::Path {
        self.gt.as_deref().unwrap_or(std::path::Path::new(""))
    }
}

/// One scored labelling: the label PNGs, or one alpha of the CAM sweep.
#[derive(Debug, Clone)]
pub struct VariantResult {
    /// `None` for label PNGs.
    pub alpha: Option<f32>,
    pub confusion: ConfusionMatrix,
    pub metrics: Metrics,
}

/// Score of one image (its own confusion matrix), for the report's ordering.
#[derive(Debug, Clone)]
pub struct ImageScore {
    pub id: String,
    /// Per variant, mean IoU over the classes in this image's ground truth (NaN if none).
    pub miou: Vec<f64>,
    /// Per variant.
    pub pixel_accuracy: Vec<f64>,
}

/// Everything `eval` computed for one run (one `--pred` or `--cams` directory).
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// The run's directory.
    pub source: PathBuf,
    pub config_name: String,
    /// Background first, then the config's classes.
    pub class_names: Vec<String>,
    /// `Some` in CAM mode.
    pub cam_key: Option<CamKey>,
    /// One entry for label PNGs, one per alpha for CAMs.
    pub variants: Vec<VariantResult>,
    /// Index into `variants` of the highest mIoU (the first on ties).
    pub best: usize,
    /// Images evaluated.
    pub images: usize,
    /// Ids skipped under --allow-missing (no prediction or no ground truth in some run).
    pub skipped: Vec<String>,
    /// In evaluation order (split order, or sorted ground-truth stems).
    pub per_image: Vec<ImageScore>,
}

impl EvalReport {
    /// The best variant's scores.
    pub fn best_metrics(&self) -> &Metrics {
        &self.variants[self.best].metrics
    }
}

/// `clipmask eval`: evaluates, prints the tables (or JSON), writes the report if asked.
/// Returns the process exit code (0).
pub fn run(opts: &EvalOptions, json: bool) -> anyhow::Result<i32> {
    if opts.labels.labels_pred.is_some() {
        return crate::label_metrics::run(opts, json);
    }
    let runs = evaluate_runs(opts)?;
    let text = match (json, runs.as_slice()) {
        (true, [one]) => one.to_json()?,
        (true, runs) => comparison_json(runs)?,
        (false, [one]) => one.to_table(),
        (false, runs) => comparison_table(runs),
    };
    if json {
        println!("{text}");
    } else {
        print!("{text}");
        if let Some(dir) = &opts.report {
            println!("report: {}", dir.join("index.html").display());
        }
    }
    Ok(0)
}
