//! What to evaluate: the library side of `clipmask eval` (the CLI fills it from its flags).
use serde::Serialize;
use std::path::PathBuf;

/// Which maps of a CAM archive to label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum CamKey {
    /// Refined (CAA) maps.
    #[serde(rename = "cams")]
    #[value(name = "cams")]
    Cams,
    /// GradCAM maps before refinement.
    #[serde(rename = "raw_cams")]
    #[value(name = "raw_cams", alias = "raw-cams")]
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

/// Where image-level labels are scored from (`eval --labels-pred`, [`super::image_labels`]).
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
    /// Without a split, require a prediction for every ground-truth id. When false, ground truth
    /// that is a superset of the predictions is scored on the predicted ids only (the others are
    /// left out and counted).
    pub strict: bool,
    /// HTML report directory.
    pub report: Option<PathBuf>,
    /// Photos for the report's overlays.
    pub images: Option<PathBuf>,
    /// How many images (the worst first) get pictures in the report.
    pub report_images: usize,
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
            strict: false,
            report: None,
            images: None,
            report_images: super::report::DEFAULT_REPORT_IMAGES,
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
