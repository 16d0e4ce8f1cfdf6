//! `clipmask eval`: flags, turned into [`crate::eval::EvalOptions`].
use crate::eval::{CamKey, EvalOptions, LabelOptions};
use anyhow::Result;
use std::path::PathBuf;

/// `clipmask eval`: score label maps (or saved CAMs) against ground truth; several runs are
/// compared side by side.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Compare runs: clipmask eval --pred A/masks --pred B/masks --gt GT \
prints mIoU, per-class IoU and the ignored fraction of each run with the difference to the first; \
--json gives the same, --report DIR shows the images worst first with the differences.")]
// What is scored: label maps, saved maps or image-level labels; clap's error lists all three.
#[command(group(clap::ArgGroup::new("scored").required(true).multiple(true).args(["pred", "cams", "labels_pred"])))]
pub struct EvalArgs {
    /// Directory of predicted label PNGs, `<id>.png` (palette or 8-bit gray indices; 255 =
    /// ignored). Repeat to compare runs on the same images (the first is the baseline).
    #[arg(long, value_name = "DIR")]
    pub pred: Vec<PathBuf>,
    /// Directory of ground-truth label PNGs, `<id>.png` (255 = ignore).
    /// With --labels-pred: the masks give each image's classes (any id but 0 and 255).
    #[arg(long, value_name = "DIR", required_unless_present = "labels_pred")]
    pub gt: Option<PathBuf>,
    /// Dataset config: a JSON path or a shipped name (voc12, coco14).
    #[arg(long, short = 'c', value_name = "CONFIG", default_value = "voc12")]
    pub config: String,
    /// File of image ids, one per line; default: every `<id>.png` in the ground-truth directory.
    #[arg(long, value_name = "FILE")]
    pub split: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Skip ids without prediction (in any run) or ground truth (they are counted) instead of
    /// failing.
    #[arg(long)]
    pub allow_missing: bool,
    /// Without --split, require a prediction for every ground-truth PNG (exit 2 otherwise). By
    /// default, ground truth that holds more ids than the predictions (VOC's SegmentationClass
    /// against masks for train) is scored on the predicted ids, and stderr says how many
    /// ground-truth ids were left out.
    #[arg(long)]
    pub strict: bool,
    /// Write an HTML report to DIR: index.html (summary, per-class IoU, differences to the
    /// first run) and pages of 100 images, worst first (the first run's image mIoU; ties: the
    /// largest difference between runs), with index.json (every image's page and scores).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// How many images, worst first, get pictures in the report (photo, predictions and ground
    /// truth side by side, each panel at most 640 px, and 160 px thumbnails); the others get
    /// their row of scores only. Bounds the report's size: about 40 KB per panel with photos.
    #[arg(long, value_name = "N", default_value_t = crate::eval::DEFAULT_REPORT_IMAGES, requires = "report")]
    pub report_images: usize,
    /// Photos `<id>.jpg` / `<id>.png` for the report's overlays; without it the report shows
    /// the coloured label maps only.
    #[arg(long, value_name = "DIR", requires = "report")]
    pub images: Option<PathBuf>,
    /// Evaluate saved maps `<id>.npz` (from generate --save-cams) instead of label PNGs,
    /// labelled with the background threshold of docs/method.md §6 for each --alpha. Repeat to
    /// compare runs (after any --pred runs).
    #[arg(long, value_name = "DIR")]
    pub cams: Vec<PathBuf>,
    /// Background exponents to try with --cams, comma separated; the best is reported.
    #[arg(long, value_name = "A,B,..", value_delimiter = ',', default_value = "1,2")]
    pub alpha: Vec<f32>,
    /// Which maps of the archives to label with --cams.
    #[arg(long, value_enum, default_value_t = CamKey::Cams)]
    pub cam_key: CamKey,
    /// Image-level label quality (issue 18: --labels-pred, --labels-gt, --annotations, --scores).
    #[command(flatten)]
    pub labels: LabelEvalArgs,
}

/// Flags of `clipmask eval` for label quality.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LabelEvalArgs {
    /// Score image-level labels instead of masks: a labels file as the tag command (or
    /// generate with labels auto) writes it, JSON {"<id>": ["<class>", ...]} or tab-separated
    /// text. Ground truth from --labels-gt, --annotations or --gt (classes in the mask).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["pred", "cams"])]
    pub labels_pred: Option<PathBuf>,
    /// Ground-truth image-level labels (same formats as --labels-pred).
    #[arg(long, value_name = "FILE", requires = "labels_pred", conflicts_with_all = ["annotations", "gt"])]
    pub labels_gt: Option<PathBuf>,
    /// Ground-truth labels from VOC XML annotations `<id>.xml` (object names).
    #[arg(long, value_name = "DIR", requires = "labels_pred", conflicts_with = "gt")]
    pub annotations: Option<PathBuf>,
    /// Per-class scores for the mAP (`<labels>.scores.json` as tag writes it); default: the
    /// file next to --labels-pred when it exists. Without scores the mAP is not reported.
    #[arg(long, value_name = "FILE", requires = "labels_pred")]
    pub scores: Option<PathBuf>,
}

impl EvalArgs {
    /// The library options these flags describe.
    pub fn options(&self) -> EvalOptions {
        EvalOptions {
            pred: self.pred.clone(),
            cams: self.cams.clone(),
            gt: self.gt.clone(),
            config: self.config.clone(),
            split: self.split.clone(),
            allow_missing: self.allow_missing,
            strict: self.strict,
            report: self.report.clone(),
            images: self.images.clone(),
            report_images: self.report_images,
            alpha: self.alpha.clone(),
            cam_key: self.cam_key,
            labels: LabelOptions {
                labels_pred: self.labels.labels_pred.clone(),
                labels_gt: self.labels.labels_gt.clone(),
                annotations: self.labels.annotations.clone(),
                scores: self.labels.scores.clone(),
            },
        }
    }
}

pub fn run(args: &EvalArgs) -> Result<i32> {
    let text = crate::eval::run(&args.options(), args.json)?;
    super::print_line(text.trim_end_matches('\n'))?;
    Ok(0)
}
