//! What `eval` computed: per run, per labelling variant (alpha) and per image.
use super::{CamKey, ConfusionMatrix, Metrics};
use std::path::PathBuf;

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
    /// Ground-truth ids that no run predicted, left out (no split given, not strict).
    pub gt_left_out: usize,
    /// In evaluation order (split order, or sorted ground-truth stems).
    pub per_image: Vec<ImageScore>,
}

impl EvalReport {
    /// The best variant's scores.
    pub fn best_metrics(&self) -> &Metrics {
        &self.variants[self.best].metrics
    }
}
