//! Evaluation of label maps against pixel ground truth (docs/method.md §8), and of saved CAMs through
//! the background-threshold labelling of docs/method.md §6.
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
use crate::config::DatasetConfig;
use crate::outputs::{read_label_png, read_label_png_colours, write_atomic, CamArchive};
use anyhow::{bail, Context, Result};
use ndarray::Array3;
use rayon::prelude::*;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Confusion matrix and metrics
// ---------------------------------------------------------------------------------------------

/// Why a pair of label maps could not be added to a [`ConfusionMatrix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelError {
    /// The two maps have different numbers of pixels.
    LengthMismatch { gt: usize, pred: usize },
    /// A value that is neither a class id (`0..n`) nor 255.
    OutOfRange { in_ground_truth: bool, value: u8, n_classes: usize },
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelError::LengthMismatch { gt, pred } => {
                write!(f, "ground truth has {gt} pixels but prediction has {pred}")
            }
            LabelError::OutOfRange { in_ground_truth, value, n_classes } => write!(
                f,
                "{} label value {value} is out of range (class ids are 0..={}, 255 is ignore)",
                if *in_ground_truth { "ground-truth" } else { "predicted" },
                n_classes - 1
            ),
        }
    }
}

impl std::error::Error for LabelError {}

/// Pixel counts over `n` classes, rows = ground truth, columns = prediction, plus a per-row count
/// of pixels predicted 255 ("ignored"; not a class). Ground-truth 255 pixels are never counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    n: usize,
    /// `counts[gt * n + pred]`
    counts: Vec<u64>,
    /// `ignored[gt]`: pixels of ground-truth class `gt` predicted 255.
    ignored: Vec<u64>,
}

/// Per-class numbers behind [`Metrics`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    /// Valid ground-truth pixels of the class, including those predicted 255.
    pub gt_pixels: u64,
    /// Pixels predicted as the class (on valid ground truth).
    pub pred_pixels: u64,
    /// Correctly predicted pixels.
    pub true_positives: u64,
    /// Pixels of the class predicted 255.
    pub ignored_pixels: u64,
    /// `tp / (gt + pred - tp)`; `None` when the class is absent from the ground truth.
    pub iou: Option<f64>,
    /// `tp / gt`; `None` when the class is absent from the ground truth.
    pub accuracy: Option<f64>,
}

/// Scores of a [`ConfusionMatrix`]. With `M[g][p]` the counts, `I[g]` the predicted-255 counts,
/// `G_c = Σ_p M[c][p] + I[c]` (ground-truth pixels), `P_c = Σ_g M[g][c]` (predicted pixels),
/// `TP_c = M[c][c]`, `N = Σ_c G_c` (valid pixels) and `S = {c : G_c > 0}` (classes present in
/// the ground truth):
///
/// - `pixel_accuracy = Σ_c TP_c / N`
/// - `mean_accuracy = mean_{c∈S} TP_c / G_c`
/// - `IoU_c = TP_c / (G_c + P_c - TP_c)` for `c ∈ S`, `None` otherwise (a class only predicted
///   has no IoU: docs/method.md §8 averages over classes present in the ground truth)
/// - `miou = mean_{c∈S} IoU_c`
/// - `fw_iou = Σ_{c∈S} (G_c / N) · IoU_c`
/// - `ignored_fraction = Σ_c I[c] / N`
/// - `miou_kept`: the same mean IoU with predicted-255 pixels removed, i.e. `G'_c = G_c - I[c]`,
///   `IoU'_c = TP_c / (G'_c + P_c - TP_c)`, averaged over `{c : G'_c > 0}`.
///
/// Predicted 255 therefore lowers `IoU_c` of its ground-truth class (through `G_c`) and no other
/// class. Means over an empty set (no valid pixels) are NaN, written as `null` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub pixel_accuracy: f64,
    pub mean_accuracy: f64,
    pub miou: f64,
    pub fw_iou: f64,
    pub ignored_fraction: f64,
    pub miou_kept: f64,
    /// `N`: ground-truth pixels that are not 255.
    pub valid_pixels: u64,
    /// `Σ_c I[c]`: valid pixels predicted 255.
    pub ignored_pixels: u64,
    /// `|S|`
    pub classes_in_gt: usize,
    /// Indexed by class id.
    pub per_class: Vec<ClassMetrics>,
}

impl Metrics {
    /// `IoU_c` by class id.
    pub fn per_class_iou(&self) -> Vec<Option<f64>> {
        self.per_class.iter().map(|c| c.iou).collect()
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// Per-image pair counts indexed `gt << 8 | pred`: one increment per pixel without branches,
/// folded into the n x n matrix (and validated) once per image.
const HIST_LEN: usize = 1 << 16;

impl ConfusionMatrix {
    /// An empty matrix over `n_classes` classes (background included).
    pub fn new(n_classes: usize) -> Self {
        ConfusionMatrix { n: n_classes, counts: vec![0; n_classes * n_classes], ignored: vec![0; n_classes] }
    }

    pub fn n_classes(&self) -> usize {
        self.n
    }

    /// Pixels of ground-truth class `gt` predicted as class `pred`.
    pub fn count(&self, gt: usize, pred: usize) -> u64 {
        self.counts[gt * self.n + pred]
    }

    /// Pixels of ground-truth class `gt` predicted 255.
    pub fn ignored(&self, gt: usize) -> u64 {
        self.ignored[gt]
    }

    /// Adds one pair of label maps (same pixel order). On error nothing is added.
    pub fn accumulate(&mut self, gt: &[u8], pred: &[u8]) -> Result<(), LabelError> {
        if gt.len() != pred.len() {
            return Err(LabelError::LengthMismatch { gt: gt.len(), pred: pred.len() });
        }
        let mut hist = vec![0u32; HIST_LEN];
        let mut staged = ConfusionMatrix::new(self.n);
        // u32 counters: flush before they could overflow.
        const CHUNK: usize = 1 << 31;
        for (gc, pc) in gt.chunks(CHUNK).zip(pred.chunks(CHUNK)) {
            let h = &mut hist[..HIST_LEN];
            for (&g, &p) in gc.iter().zip(pc) {
                h[(g as usize) << 8 | p as usize] += 1;
            }
            staged.add_histogram(h)?;
            h.fill(0);
        }
        self.merge(&staged);
        Ok(())
    }

    /// Folds a `gt << 8 | pred` histogram in, rejecting values outside `0..n` and 255.
    fn add_histogram(&mut self, hist: &[u32]) -> Result<(), LabelError> {
        let n = self.n;
        let first_nonzero = |row: &[u32]| row.iter().position(|&c| c != 0);
        let pred_error =
            |value: usize| LabelError::OutOfRange { in_ground_truth: false, value: value as u8, n_classes: n };
        for g in 0..256usize {
            let row = &hist[g << 8..(g + 1) << 8];
            if g >= n && g != 255 {
                if first_nonzero(row).is_some() {
                    return Err(LabelError::OutOfRange { in_ground_truth: true, value: g as u8, n_classes: n });
                }
                continue;
            }
            if n < 255 {
                if let Some(p) = first_nonzero(&row[n..255]) {
                    return Err(pred_error(n + p));
                }
            }
            if g == 255 {
                continue; // ground truth ignore: validated above, not counted
            }
            for (dst, &c) in self.counts[g * n..(g + 1) * n].iter_mut().zip(&row[..n]) {
                *dst += c as u64;
            }
            self.ignored[g] += row[255] as u64;
        }
        Ok(())
    }

    /// Adds another matrix over the same classes.
    ///
    /// # Panics
    /// If the class counts differ (a programming error, not an input error).
    pub fn merge(&mut self, other: &ConfusionMatrix) {
        assert_eq!(self.n, other.n, "merging confusion matrices over different class counts");
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        for (a, b) in self.ignored.iter_mut().zip(&other.ignored) {
            *a += b;
        }
    }

    /// The scores defined on [`Metrics`].
    pub fn metrics(&self) -> Metrics {
        let n = self.n;
        let mut per_class = Vec::with_capacity(n);
        for c in 0..n {
            let row = &self.counts[c * n..(c + 1) * n];
            let kept_gt: u64 = row.iter().sum();
            let gt_pixels = kept_gt + self.ignored[c];
            let pred_pixels: u64 = (0..n).map(|g| self.counts[g * n + c]).sum();
            let tp = row[c];
            let present = gt_pixels > 0;
            per_class.push(ClassMetrics {
                gt_pixels,
                pred_pixels,
                true_positives: tp,
                ignored_pixels: self.ignored[c],
                iou: present.then(|| tp as f64 / (gt_pixels + pred_pixels - tp) as f64),
                accuracy: present.then(|| tp as f64 / gt_pixels as f64),
            });
        }
        let valid: u64 = per_class.iter().map(|c| c.gt_pixels).sum();
        let ignored: u64 = self.ignored.iter().sum();
        let tp_total: u64 = per_class.iter().map(|c| c.true_positives).sum();
        let frac = |a: u64| if valid == 0 { f64::NAN } else { a as f64 / valid as f64 };
        let fw_iou = if valid == 0 {
            f64::NAN
        } else {
            per_class.iter().filter_map(|c| c.iou.map(|iou| c.gt_pixels as f64 / valid as f64 * iou)).sum()
        };
        let miou_kept = mean(per_class.iter().filter_map(|c| {
            let kept_gt = c.gt_pixels - c.ignored_pixels;
            (kept_gt > 0).then(|| c.true_positives as f64 / (kept_gt + c.pred_pixels - c.true_positives) as f64)
        }));
        Metrics {
            pixel_accuracy: frac(tp_total),
            mean_accuracy: mean(per_class.iter().filter_map(|c| c.accuracy)),
            miou: mean(per_class.iter().filter_map(|c| c.iou)),
            fw_iou,
            ignored_fraction: frac(ignored),
            miou_kept,
            valid_pixels: valid,
            ignored_pixels: ignored,
            classes_in_gt: per_class.iter().filter(|c| c.gt_pixels > 0).count(),
            per_class,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Labels from CAMs (docs/method.md §6)
// ---------------------------------------------------------------------------------------------

/// Label map from an image's class maps: `bg = (1 - max_k cams_k)^alpha`, argmax over
/// `[bg; cams_1..cams_K]` (the first maximum wins ties, as `np.argmax`), channel 0 -> label 0,
/// channel k -> `keys[k-1] + 1`. `cams` is K x H x W; the result is H*W labels, row-major.
/// With no channels every pixel is background. Maps are expected finite (a NaN never wins).
///
/// `alpha` 1 and 2 are computed as `x` and `x * x`, bit-identical to NumPy's `x ** 1.0` and
/// `x ** 2.0`, so that a NumPy re-implementation gives the same labels.
///
/// # Panics
/// If `keys.len()` is not K or a key is outside `0..=253`: callers validate archives first.
pub fn labels_from_cams(cams: &Array3<f32>, keys: &[i64], alpha: f32) -> Vec<u8> {
    let (k, h, w) = cams.dim();
    assert_eq!(keys.len(), k, "labels_from_cams: {} keys for {} maps", keys.len(), k);
    let lut: Vec<u8> = keys
        .iter()
        .map(|&key| match u8::try_from(key + 1) {
            Ok(v) if v != 255 && key >= 0 => v,
            _ => panic!("labels_from_cams: class key {key} outside 0..=253"),
        })
        .collect();
    let npix = h * w;
    if k == 0 || npix == 0 {
        return vec![0; npix];
    }
    let data = cams.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let mut best = vec![f32::NEG_INFINITY; npix];
    for ch in data.chunks_exact(npix) {
        for (m, &v) in best.iter_mut().zip(ch) {
            if v > *m {
                *m = v;
            }
        }
    }
    for b in best.iter_mut() {
        let x = 1.0 - *b;
        *b = if alpha == 1.0 {
            x
        } else if alpha == 2.0 {
            x * x
        } else {
            x.powf(alpha)
        };
    }
    let mut labels = vec![0u8; npix];
    // Channel by channel with a strict `>`: the earliest channel keeps a tie.
    for (ch, &label) in data.chunks_exact(npix).zip(&lut) {
        for ((b, l), &v) in best.iter_mut().zip(labels.iter_mut()).zip(ch) {
            if v > *b {
                *b = v;
                *l = label;
            }
        }
    }
    labels
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// Which maps of a CAM archive to label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum CamKey {
    /// Refined (CAA) maps.
    #[value(name = "cams")]
    #[serde(rename = "cams")]
    Cams,
    /// GradCAM maps before refinement.
    #[value(name = "raw_cams", alias = "raw-cams")]
    #[serde(rename = "raw_cams")]
    RawCams,
}

/// `clipmask eval`: score label maps (or saved CAMs) against ground truth.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Directory of predicted label PNGs, `<id>.png` (palette or 8-bit gray indices; 255 =
    /// ignored). Not needed with --cams.
    #[arg(long, value_name = "DIR", required_unless_present_any = ["cams", "labels_pred"], conflicts_with = "cams")]
    pub pred: Option<PathBuf>,
    /// Directory of ground-truth label PNGs, `<id>.png` (255 = ignore).
    /// With --labels-pred: the masks give each image's classes (any id but 0 and 255).
    #[arg(long, value_name = "DIR", required_unless_present = "labels_pred")]
    pub gt: Option<PathBuf>,
    /// Dataset config: a JSON path or a shipped name (voc12, coco14).
    #[arg(long, value_name = "CONFIG")]
    pub config: String,
    /// File of image ids, one per line; default: every `<id>.png` in the ground-truth directory.
    #[arg(long, value_name = "FILE")]
    pub split: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Skip ids without prediction or ground truth (they are counted) instead of failing.
    #[arg(long)]
    pub allow_missing: bool,
    /// Write an HTML report (index.html, side-by-side images, worst images first) to DIR.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Photos `<id>.jpg` / `<id>.png` for the report's overlays; without it the report shows
    /// the coloured label maps only.
    #[arg(long, value_name = "DIR", requires = "report")]
    pub images: Option<PathBuf>,
    /// Evaluate saved maps `<id>.npz` (from generate --save-cams) instead of label PNGs,
    /// labelled with the background threshold of docs/method.md §6 for each --alpha.
    #[arg(long, value_name = "DIR")]
    pub cams: Option<PathBuf>,
    /// Background exponents to try with --cams, comma separated; the best is reported.
    #[arg(long, value_name = "A,B,..", value_delimiter = ',', default_value = "1,2")]
    pub alpha: Vec<f32>,
    /// Which maps of the archives to label with --cams.
    #[arg(long, value_enum, default_value_t = CamKey::Cams)]
    pub cam_key: CamKey,
    /// Image-level label quality (issue 18: --labels-pred, --labels-gt, --annotations, --scores).
    #[command(flatten)]
    pub labels: crate::label_metrics::LabelEvalArgs,
}

impl EvalArgs {
    /// The ground-truth directory; clap requires --gt unless --labels-pred is given.
    fn gt_dir(&self) -> &Path {
        self.gt.as_deref().unwrap_or(Path::new(""))
    }

    /// Arguments for evaluating label PNGs in `pred` against `gt`, everything else default.
    pub fn new(pred: impl Into<PathBuf>, gt: impl Into<PathBuf>, config: impl Into<String>) -> Self {
        EvalArgs {
            pred: Some(pred.into()),
            gt: Some(gt.into()),
            config: config.into(),
            split: None,
            json: false,
            allow_missing: false,
            report: None,
            images: None,
            cams: None,
            alpha: vec![1.0, 2.0],
            cam_key: CamKey::Cams,
            labels: Default::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation over directories
// ---------------------------------------------------------------------------------------------

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

/// Everything `eval` computed.
#[derive(Debug, Clone)]
pub struct EvalReport {
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
    /// Ids skipped under --allow-missing (no prediction or no ground truth).
    pub skipped: Vec<String>,
    /// In evaluation order (split order, or sorted ground-truth stems).
    pub per_image: Vec<ImageScore>,
}

/// `{"background": iou, "aeroplane": ...}` in class order (serde_json's own map would sort keys).
struct OrderedIou<'a>(&'a [String], &'a Metrics);

impl Serialize for OrderedIou<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, c) in self.0.iter().zip(&self.1.per_class) {
            map.serialize_entry(name, &c.iou)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct ClassJson<'a> {
    name: &'a str,
    #[serde(flatten)]
    m: &'a ClassMetrics,
}

#[derive(Serialize)]
struct MetricsJson<'a> {
    miou: f64,
    pixel_accuracy: f64,
    mean_accuracy: f64,
    fw_iou: f64,
    ignored_fraction: f64,
    miou_kept: f64,
    valid_pixels: u64,
    ignored_pixels: u64,
    classes_in_gt: usize,
    per_class_iou: OrderedIou<'a>,
    per_class: Vec<ClassJson<'a>>,
}

impl<'a> MetricsJson<'a> {
    fn new(names: &'a [String], m: &'a Metrics) -> Self {
        MetricsJson {
            miou: m.miou,
            pixel_accuracy: m.pixel_accuracy,
            mean_accuracy: m.mean_accuracy,
            fw_iou: m.fw_iou,
            ignored_fraction: m.ignored_fraction,
            miou_kept: m.miou_kept,
            valid_pixels: m.valid_pixels,
            ignored_pixels: m.ignored_pixels,
            classes_in_gt: m.classes_in_gt,
            per_class_iou: OrderedIou(names, m),
            per_class: names.iter().zip(&m.per_class).map(|(n, c)| ClassJson { name: n, m: c }).collect(),
        }
    }
}

#[derive(Serialize)]
struct LabelsJson<'a> {
    #[serde(flatten)]
    metrics: MetricsJson<'a>,
    config: &'a str,
    images: usize,
    skipped: usize,
    skipped_ids: &'a [String],
}

#[derive(Serialize)]
struct AlphaJson<'a> {
    alpha: f32,
    #[serde(flatten)]
    metrics: MetricsJson<'a>,
}

#[derive(Serialize)]
struct CamsJson<'a> {
    alphas: Vec<AlphaJson<'a>>,
    best_alpha: Option<f32>,
    best_miou: f64,
    cam_key: Option<CamKey>,
    config: &'a str,
    images: usize,
    skipped: usize,
    skipped_ids: &'a [String],
}

impl EvalReport {
    /// The best variant's scores.
    pub fn best_metrics(&self) -> &Metrics {
        &self.variants[self.best].metrics
    }

    /// The `--json` output. Label PNGs: the metrics at top level (`miou`, `pixel_accuracy`,
    /// `mean_accuracy`, `fw_iou`, `ignored_fraction`, `miou_kept`, `per_class_iou` with
    /// "background" first and `null` for classes absent from the ground truth, `per_class`,
    /// `images`, `skipped`). CAMs: `{"alphas": [{"alpha", ...metrics}], "best_alpha", ...}`.
    /// NaN (nothing to average) is written as `null`.
    pub fn to_json(&self) -> Result<String> {
        let names = &self.class_names;
        let text = if self.cam_key.is_none() {
            serde_json::to_string(&LabelsJson {
                metrics: MetricsJson::new(names, self.best_metrics()),
                config: &self.config_name,
                images: self.images,
                skipped: self.skipped.len(),
                skipped_ids: &self.skipped,
            })?
        } else {
            serde_json::to_string(&CamsJson {
                alphas: self
                    .variants
                    .iter()
                    .map(|v| AlphaJson {
                        alpha: v.alpha.unwrap_or(f32::NAN),
                        metrics: MetricsJson::new(names, &v.metrics),
                    })
                    .collect(),
                best_alpha: self.variants[self.best].alpha,
                best_miou: self.best_metrics().miou,
                cam_key: self.cam_key,
                config: &self.config_name,
                images: self.images,
                skipped: self.skipped.len(),
                skipped_ids: &self.skipped,
            })?
        };
        Ok(text)
    }

    /// The terminal output: per-class table of the best variant, the alpha sweep if any, the
    /// summary.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let pct = |v: f64| if v.is_finite() { format!("{:6.2}", v * 100.0) } else { "   n/a".to_string() };
        let opt = |v: Option<f64>| v.map(pct).unwrap_or_else(|| "     -".to_string());
        let m = self.best_metrics();
        let width = self.class_names.iter().map(|n| n.len()).max().unwrap_or(5).max(5);
        let mut s = String::new();
        if let Some(alpha) = self.variants[self.best].alpha {
            let _ = writeln!(s, "per-class scores at alpha = {alpha}");
        }
        let _ = writeln!(
            s,
            "{:<width$}  {:>6}  {:>6}  {:>12}  {:>12}  {:>10}",
            "class", "IoU", "acc", "gt px", "pred px", "ignored"
        );
        for (name, c) in self.class_names.iter().zip(&m.per_class) {
            let _ = writeln!(
                s,
                "{:<width$}  {}  {}  {:>12}  {:>12}  {:>10}",
                name,
                opt(c.iou),
                opt(c.accuracy),
                c.gt_pixels,
                c.pred_pixels,
                c.ignored_pixels
            );
        }
        let _ = writeln!(s);
        if self.cam_key.is_some() {
            let _ = writeln!(s, "{:>6}  {:>6}  {:>6}  {:>6}  {:>6}", "alpha", "mIoU", "pixacc", "macc", "fwIoU");
            for v in &self.variants {
                let a = v.alpha.unwrap_or(f32::NAN);
                let vm = &v.metrics;
                let _ = writeln!(
                    s,
                    "{:>6}  {}  {}  {}  {}",
                    a,
                    pct(vm.miou),
                    pct(vm.pixel_accuracy),
                    pct(vm.mean_accuracy),
                    pct(vm.fw_iou)
                );
            }
            let _ = writeln!(
                s,
                "best alpha: {} (mIoU {})",
                self.variants[self.best].alpha.unwrap_or(f32::NAN),
                pct(m.miou).trim()
            );
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "mIoU               {} %  (over {} classes present in the ground truth)",
            pct(m.miou),
            m.classes_in_gt
        );
        let _ = writeln!(s, "pixel accuracy     {} %", pct(m.pixel_accuracy));
        let _ = writeln!(s, "mean accuracy      {} %", pct(m.mean_accuracy));
        let _ = writeln!(s, "frequency-w. IoU   {} %", pct(m.fw_iou));
        let _ = writeln!(
            s,
            "ignored (pred 255) {} %  ({} of {} valid pixels)",
            pct(m.ignored_fraction),
            m.ignored_pixels,
            m.valid_pixels
        );
        let _ = writeln!(s, "mIoU on kept px    {} %", pct(m.miou_kept));
        let _ = writeln!(s, "images             {} evaluated, {} skipped", self.images, self.skipped.len());
        s
    }
}

/// Where predictions come from.
enum Source<'a> {
    Labels(&'a Path),
    Cams { dir: &'a Path, key: CamKey, alphas: &'a [f32] },
}

/// `<dir>/<id>.<ext>` for every regular file with that extension (hidden files skipped: they
/// are write_atomic's temporaries).
fn stems(dir: &Path, ext: &str) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read directory {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read directory {}", dir.display()))?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) {
            continue;
        }
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            if !stem.starts_with('.') {
                out.insert(stem.to_string());
            }
        }
    }
    Ok(out)
}

/// "a, b, c, d, e and 12 more"
fn list_some(ids: &[&str]) -> String {
    let shown = ids.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if ids.len() > 5 {
        format!("{shown} and {} more", ids.len() - 5)
    } else {
        shown
    }
}

fn read_split(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read split file {}", path.display()))?;
    let mut seen = HashSet::new();
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        // VOC split files of the segmentation task hold one id per line; detection-style
        // "id label" lines keep their first field.
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| seen.insert(id.to_string()))
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        bail!("split file {} lists no ids", path.display());
    }
    Ok(ids)
}

/// Ids to evaluate and ids skipped, after checking the split, ground truth and predictions
/// agree.
fn resolve_ids(args: &EvalArgs, pred_dir: &Path, pred_ext: &str) -> Result<(Vec<String>, Vec<String>)> {
    let gt = stems(args.gt_dir(), "png").context("ground-truth directory (--gt)")?;
    let pred = stems(pred_dir, pred_ext).context(if pred_ext == "npz" {
        "CAM directory (--cams)"
    } else {
        "prediction directory (--pred)"
    })?;
    let ids = match &args.split {
        Some(split) => read_split(split)?,
        None => {
            let mut v: Vec<String> = gt.iter().cloned().collect();
            v.sort();
            v
        }
    };
    if ids.is_empty() {
        bail!("no ground-truth PNGs in {}", args.gt_dir().display());
    }
    let what = if pred_ext == "npz" { "CAM archive" } else { "prediction" };
    let no_gt: Vec<&str> = ids.iter().filter(|id| !gt.contains(*id)).map(String::as_str).collect();
    let no_pred: Vec<&str> = ids.iter().filter(|id| !pred.contains(*id)).map(String::as_str).collect();
    // With a split, predictions beyond it are normal (masks for train_aug scored on train);
    // without one, a prediction with no ground truth means the directories do not match.
    let mut extra: Vec<&str> = if args.split.is_none() {
        pred.iter().filter(|id| !gt.contains(*id)).map(String::as_str).collect()
    } else {
        Vec::new()
    };
    extra.sort();
    let mut problems = Vec::new();
    if !no_gt.is_empty() {
        problems.push(format!(
            "{} of {} ids in {} have no ground truth {}/<id>.png: {}",
            no_gt.len(),
            ids.len(),
            args.split.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            args.gt_dir().display(),
            list_some(&no_gt)
        ));
    }
    if !no_pred.is_empty() {
        problems.push(format!(
            "{} of {} ids have no {what} {}/<id>.{pred_ext}: {}",
            no_pred.len(),
            ids.len(),
            pred_dir.display(),
            list_some(&no_pred)
        ));
    }
    if !extra.is_empty() {
        problems.push(format!(
            "{} {what}s in {} have no ground truth in {}: {}",
            extra.len(),
            pred_dir.display(),
            args.gt_dir().display(),
            list_some(&extra)
        ));
    }
    if !problems.is_empty() && !args.allow_missing {
        // One line: the CLI prints the first line of each error.
        bail!(
            "ids do not match: {} (pass --allow-missing to evaluate the ids that have both{})",
            problems.join("; "),
            if args.split.is_none() { ", or --split to choose the ids" } else { "" }
        );
    }
    let skip: HashSet<&str> = no_gt.iter().chain(&no_pred).copied().collect();
    let skipped: Vec<String> = ids.iter().filter(|id| skip.contains(id.as_str())).cloned().collect();
    let keep: Vec<String> = ids.iter().filter(|id| !skip.contains(id.as_str())).cloned().collect();
    if keep.is_empty() {
        bail!("no image has both a {what} in {} and ground truth in {}", pred_dir.display(), args.gt_dir().display());
    }
    Ok((keep, skipped))
}

/// An archive's maps for `key`, validated against the config and the ground-truth size.
fn load_cams(
    path: &Path,
    key: CamKey,
    n_classes: usize,
    gt_w: u32,
    gt_h: u32,
    gt_path: &Path,
) -> Result<(Array3<f32>, Vec<i64>)> {
    let archive = CamArchive::read(path)?;
    let maps = match key {
        CamKey::Cams => archive.cams,
        CamKey::RawCams => archive.raw_cams,
    };
    let (k, h, w) = maps.dim();
    if archive.keys.len() != k {
        bail!("{}: {} keys but {} maps in `{}`", path.display(), archive.keys.len(), k, cam_key_name(key));
    }
    if let Some(&bad) = archive.keys.iter().find(|&&c| c < 0 || c as usize + 1 >= n_classes) {
        bail!("{}: key {bad} is not a class index (0..={})", path.display(), n_classes - 2);
    }
    if (w, h) != (gt_w as usize, gt_h as usize) {
        bail!(
            "size mismatch: maps in {} are {}x{} but ground truth {} is {}x{}",
            path.display(),
            w,
            h,
            gt_path.display(),
            gt_w,
            gt_h
        );
    }
    Ok((maps, archive.keys))
}

fn cam_key_name(key: CamKey) -> &'static str {
    match key {
        CamKey::Cams => "cams",
        CamKey::RawCams => "raw_cams",
    }
}

/// Ground truth, its width and height, and one predicted label map per variant.
type Pair = (Vec<u8>, u32, u32, Vec<Vec<u8>>);

/// Ground truth and one predicted label map per variant for `id`.
/// Ground truth may be ids (gray or palette PNG) or colours of the config's palette (RGB).
fn load_pair(source: &Source, gt_dir: &Path, id: &str, n_classes: usize, palette: &[u8]) -> Result<Pair> {
    let gt_path = gt_dir.join(format!("{id}.png"));
    let (gt, gw, gh) = read_label_png_colours(&gt_path, palette)?;
    let preds = match source {
        Source::Labels(dir) => {
            let pred_path = dir.join(format!("{id}.png"));
            let (pred, pw, ph) = read_label_png(&pred_path)?;
            if (pw, ph) != (gw, gh) {
                bail!(
                    "size mismatch: prediction {} is {}x{} but ground truth {} is {}x{}",
                    pred_path.display(),
                    pw,
                    ph,
                    gt_path.display(),
                    gw,
                    gh
                );
            }
            vec![pred]
        }
        Source::Cams { dir, key, alphas } => {
            let path = dir.join(format!("{id}.npz"));
            let (maps, keys) = load_cams(&path, *key, n_classes, gw, gh, &gt_path)?;
            alphas.iter().map(|&a| labels_from_cams(&maps, &keys, a)).collect()
        }
    };
    Ok((gt, gw, gh, preds))
}

/// Error for a bad label, naming the file it came from.
fn label_error(e: LabelError, source: &Source, gt_dir: &Path, id: &str) -> anyhow::Error {
    let file = match (&e, source) {
        (LabelError::OutOfRange { in_ground_truth: true, .. }, _) => gt_dir.join(format!("{id}.png")),
        (_, Source::Labels(dir)) => dir.join(format!("{id}.png")),
        (_, Source::Cams { dir, .. }) => dir.join(format!("{id}.npz")),
    };
    anyhow::Error::new(e).context(format!("{}", file.display()))
}

struct Acc {
    totals: Vec<ConfusionMatrix>,
    scores: Vec<(usize, ImageScore)>,
}

/// Runs the evaluation `args` describe and returns the numbers; prints nothing (notes about
/// skipped ids go to stderr).
pub fn evaluate(args: &EvalArgs) -> Result<EvalReport> {
    let config = DatasetConfig::resolve(&args.config)?;
    let n = config.classes.len() + 1;
    let palette = config.png_palette();
    let (source, pred_dir, ext) = match (&args.cams, &args.pred) {
        (Some(dir), _) => {
            if args.alpha.is_empty() {
                bail!("--alpha needs at least one value");
            }
            if let Some(a) = args.alpha.iter().find(|a| !a.is_finite() || **a < 0.0) {
                bail!("--alpha {a}: exponents must be finite and >= 0");
            }
            (Source::Cams { dir, key: args.cam_key, alphas: &args.alpha }, dir.as_path(), "npz")
        }
        (None, Some(dir)) => (Source::Labels(dir), dir.as_path(), "png"),
        (None, None) => bail!("give --pred DIR (label PNGs) or --cams DIR (saved maps)"),
    };
    let (ids, skipped) = resolve_ids(args, pred_dir, ext)?;
    if !skipped.is_empty() {
        eprintln!(
            "eval: skipping {} ids without prediction or ground truth: {}",
            skipped.len(),
            list_some(&skipped.iter().map(String::as_str).collect::<Vec<_>>())
        );
    }
    let n_variants = match &source {
        Source::Labels(_) => 1,
        Source::Cams { alphas, .. } => alphas.len(),
    };
    let new_acc = || Acc { totals: vec![ConfusionMatrix::new(n); n_variants], scores: Vec::new() };
    let acc = ids
        .par_iter()
        .enumerate()
        .try_fold(new_acc, |mut acc, (i, id)| -> Result<Acc> {
            let (gt, _, _, preds) = load_pair(&source, args.gt_dir(), id, n, &palette)?;
            let mut score = ImageScore {
                id: id.clone(),
                miou: Vec::with_capacity(n_variants),
                pixel_accuracy: Vec::with_capacity(n_variants),
            };
            for (total, pred) in acc.totals.iter_mut().zip(&preds) {
                let mut cm = ConfusionMatrix::new(n);
                cm.accumulate(&gt, pred).map_err(|e| label_error(e, &source, args.gt_dir(), id))?;
                let m = cm.metrics();
                score.miou.push(m.miou);
                score.pixel_accuracy.push(m.pixel_accuracy);
                total.merge(&cm);
            }
            acc.scores.push((i, score));
            Ok(acc)
        })
        .try_reduce(new_acc, |mut a, b| {
            for (x, y) in a.totals.iter_mut().zip(&b.totals) {
                x.merge(y);
            }
            a.scores.extend(b.scores);
            Ok(a)
        })?;
    let mut scores = acc.scores;
    scores.sort_by_key(|(i, _)| *i);
    let alphas: Vec<Option<f32>> = match &source {
        Source::Labels(_) => vec![None],
        Source::Cams { alphas, .. } => alphas.iter().map(|&a| Some(a)).collect(),
    };
    let variants: Vec<VariantResult> = acc
        .totals
        .into_iter()
        .zip(alphas)
        .map(|(confusion, alpha)| VariantResult { alpha, metrics: confusion.metrics(), confusion })
        .collect();
    // Highest mIoU, first on ties; NaN never wins.
    let mut best = 0;
    for (i, v) in variants.iter().enumerate() {
        let b = variants[best].metrics.miou;
        if v.metrics.miou > b || (b.is_nan() && !v.metrics.miou.is_nan()) {
            best = i;
        }
    }
    let mut class_names = vec!["background".to_string()];
    class_names.extend(config.classes.iter().map(|c| c.name.clone()));
    let report = EvalReport {
        config_name: config.name.clone(),
        class_names,
        cam_key: args.cams.as_ref().map(|_| args.cam_key),
        variants,
        best,
        images: ids.len(),
        skipped,
        per_image: scores.into_iter().map(|(_, s)| s).collect(),
    };
    if let Some(dir) = &args.report {
        write_report(dir, args, &source, &config, &report)?;
    }
    Ok(report)
}

/// `clipmask eval`: evaluates, prints the tables (or JSON with --json), writes the report if
/// asked. Returns the process exit code (0).
pub fn run(args: &EvalArgs) -> Result<i32> {
    if args.labels.labels_pred.is_some() {
        return crate::label_metrics::run(args);
    }
    let report = evaluate(args)?;
    if args.json {
        println!("{}", report.to_json()?);
    } else {
        print!("{}", report.to_table());
        if let Some(dir) = &args.report {
            println!("report: {}", dir.join("index.html").display());
        }
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// HTML report
// ---------------------------------------------------------------------------------------------

const THUMB_HEIGHT: u32 = 120;
const GAP: u32 = 4;

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// Percent-encodes a file name for a relative URL (ids may hold spaces, '#', '?').
fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn find_photo(dir: &Path, id: &str) -> Option<PathBuf> {
    crate::datasets::find_image(dir, id).filter(|p| p.is_file())
}

/// Label colours over `base` (or plain colours without a photo). Background stays the photo;
/// 255 is drawn white so that ignored pixels are visible.
fn colour_panel(labels: &[u8], w: u32, h: u32, palette: &[u8], base: Option<&image::RgbImage>) -> image::RgbImage {
    const OPACITY: f32 = 0.55;
    let mut out = match base {
        Some(img) => img.clone(),
        None => image::RgbImage::new(w, h),
    };
    for (px, &l) in out.pixels_mut().zip(labels) {
        let c = &palette[l as usize * 3..l as usize * 3 + 3];
        if base.is_none() {
            px.0 = [c[0], c[1], c[2]];
        } else if l != 0 {
            for (o, &ci) in px.0.iter_mut().zip(c) {
                *o = (*o as f32 * (1.0 - OPACITY) + ci as f32 * OPACITY).round() as u8;
            }
        }
    }
    out
}

fn side_by_side(panels: &[image::RgbImage], w: u32, h: u32) -> image::RgbImage {
    let total_w = panels.len() as u32 * w + (panels.len() as u32).saturating_sub(1) * GAP;
    let mut out = image::RgbImage::from_pixel(total_w, h, image::Rgb([255, 255, 255]));
    for (i, p) in panels.iter().enumerate() {
        image::imageops::replace(&mut out, p, (i as u32 * (w + GAP)) as i64, 0);
    }
    out
}

fn save_image(path: &Path, img: &image::RgbImage, jpeg: bool) -> Result<()> {
    write_atomic(path, |w| {
        if jpeg {
            image::codecs::jpeg::JpegEncoder::new_with_quality(w, 88).encode_image(img)?;
        } else {
            img.write_to(w, image::ImageFormat::Png)?;
        }
        Ok(())
    })
}

/// Per image `images/<id>.{jpg,png}` (photo | prediction | ground truth) and
/// `thumbs/<id>.{jpg,png}`, then `index.html` with the images worst-first.
fn write_report(
    dir: &Path,
    args: &EvalArgs,
    source: &Source,
    config: &DatasetConfig,
    report: &EvalReport,
) -> Result<()> {
    let n = report.class_names.len();
    let palette = config.png_palette();
    let best = report.best;
    let photos = args.images.as_deref();
    // In CAM mode the report shows the best alpha's labels only.
    let one_source;
    let source = match source {
        Source::Cams { dir, key, alphas } => {
            one_source = Source::Cams { dir, key: *key, alphas: std::slice::from_ref(&alphas[best]) };
            &one_source
        }
        s => s,
    };
    let jpeg = photos.is_some();
    let ext = if jpeg { "jpg" } else { "png" };
    report.per_image.par_iter().try_for_each(|score| -> Result<()> {
        let id = &score.id;
        let (gt, w, h, preds) = load_pair(source, args.gt_dir(), id, n, &palette)?;
        let pred = &preds[0];
        let photo = match photos.and_then(|d| find_photo(d, id)) {
            Some(p) => {
                let img = image::open(&p).with_context(|| format!("cannot read image {}", p.display()))?.to_rgb8();
                // Photos at another size than the masks are shown resized, not rejected.
                Some(if img.dimensions() != (w, h) {
                    image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle)
                } else {
                    img
                })
            }
            // Without a photo for this id, a grey canvas keeps the layout of the others.
            None if photos.is_some() => Some(image::RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]))),
            None => None,
        };
        let mut panels = Vec::with_capacity(3);
        if let Some(p) = &photo {
            panels.push(p.clone());
        }
        panels.push(colour_panel(pred, w, h, &palette, photo.as_ref()));
        panels.push(colour_panel(&gt, w, h, &palette, photo.as_ref()));
        let full = side_by_side(&panels, w, h);
        save_image(&dir.join("images").join(format!("{id}.{ext}")), &full, jpeg)?;
        let th = THUMB_HEIGHT.min(full.height()).max(1);
        let tw = ((full.width() as u64 * th as u64) / full.height().max(1) as u64).max(1) as u32;
        let thumb = image::imageops::thumbnail(&full, tw, th);
        save_image(&dir.join("thumbs").join(format!("{id}.{ext}")), &thumb, jpeg)?;
        Ok(())
    })?;

    let mut order: Vec<&ImageScore> = report.per_image.iter().collect();
    // Worst first; images whose ground truth is all ignore (NaN) last; id breaks ties.
    order.sort_by(|a, b| {
        let (x, y) = (a.miou[best], b.miou[best]);
        let key = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
        key(x).total_cmp(&key(y)).then_with(|| a.id.cmp(&b.id))
    });
    let html = report_html(report, &order, ext, &palette, photos.is_some());
    write_atomic(&dir.join("index.html"), |w| {
        use std::io::Write;
        w.write_all(html.as_bytes())?;
        Ok(())
    })
}

fn report_html(report: &EvalReport, order: &[&ImageScore], ext: &str, palette: &[u8], with_photo: bool) -> String {
    use std::fmt::Write as _;
    let best = report.best;
    let m = report.best_metrics();
    let pct = |v: f64| if v.is_finite() { format!("{:.2}", v * 100.0) } else { "n/a".to_string() };
    let mut s = String::new();
    let title = format!("clipmask eval: {}", report.config_name);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
         body{{font-family:sans-serif;font-size:13px;margin:12px;color:#222}} h1{{font-size:20px}} h2{{font-size:16px}}\n\
         table{{border-collapse:collapse;margin-bottom:12px}} .row{{display:flex;gap:32px;align-items:flex-start}}\n\
         td,th{{border:1px solid #bbb;padding:1px 6px;text-align:right}} td.l,th.l{{text-align:left}}\n\
         .sw{{display:inline-block;width:12px;height:12px;border:1px solid #555;vertical-align:middle;margin-right:4px}}\n\
         img{{display:block}}\n</style></head><body>\n<h1>{}</h1>\n",
        html_escape(&title),
        html_escape(&title)
    );
    if let Some(a) = report.variants[best].alpha {
        let _ = writeln!(
            s,
            "<p>CAM labels ({}) at the best alpha = {a}.</p>",
            report.cam_key.map(cam_key_name).unwrap_or("")
        );
    }
    // Summary and per-class tables side by side, so that the worst images start on screen.
    let _ = writeln!(s, "<div class=\"row\"><div><h2>Summary</h2>\n<table>");
    for (k, v) in [
        ("mIoU", pct(m.miou)),
        ("pixel accuracy", pct(m.pixel_accuracy)),
        ("mean accuracy", pct(m.mean_accuracy)),
        ("frequency-weighted IoU", pct(m.fw_iou)),
        ("ignored fraction (predicted 255)", pct(m.ignored_fraction)),
        ("mIoU on kept pixels", pct(m.miou_kept)),
        ("images", report.images.to_string()),
        ("skipped", report.skipped.len().to_string()),
    ] {
        let _ = writeln!(s, "<tr><th class=\"l\">{k}</th><td>{v}</td></tr>");
    }
    let _ = writeln!(s, "</table></div>\n<div><h2>Per class</h2>\n<table>\n<tr><th class=\"l\">class</th><th>IoU %</th><th>acc %</th><th>gt px</th><th>pred px</th><th>ignored px</th></tr>");
    for (i, (name, c)) in report.class_names.iter().zip(&m.per_class).enumerate() {
        let col = &palette[i * 3..i * 3 + 3];
        let _ = writeln!(
            s,
            "<tr><td class=\"l\"><span class=\"sw\" style=\"background:rgb({},{},{})\"></span>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            col[0],
            col[1],
            col[2],
            html_escape(name),
            c.iou.map(pct).unwrap_or_else(|| "-".into()),
            c.accuracy.map(pct).unwrap_or_else(|| "-".into()),
            c.gt_pixels,
            c.pred_pixels,
            c.ignored_pixels
        );
    }
    let layout = if with_photo { "photo | prediction | ground truth" } else { "prediction | ground truth" };
    let _ = writeln!(
        s,
        "</table></div></div>\n<h2>Images, worst first</h2>\n<p>Each row: {layout}; white = 255 (ignore). Click a thumbnail for full size.</p>\n<table>\n<tr><th>#</th><th class=\"l\">id</th><th>mIoU %</th><th>pixel acc %</th><th class=\"l\">{layout}</th></tr>"
    );
    for (rank, sc) in order.iter().enumerate() {
        let file = format!("{}.{ext}", url_component(&sc.id));
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td class=\"l\"><a href=\"images/{file}\"><img loading=\"lazy\" src=\"thumbs/{file}\" alt=\"{}\" height=\"{THUMB_HEIGHT}\"></a></td></tr>",
            rank + 1,
            html_escape(&sc.id),
            pct(sc.miou[best]),
            pct(sc.pixel_accuracy[best]),
            html_escape(&sc.id)
        );
    }
    let _ = writeln!(s, "</table>\n</body></html>");
    s
}
