//! Confusion matrix and the metrics of docs/method.md §8.
use serde::Serialize;

/// Why a pair of label maps could not be added to a [`ConfusionMatrix`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The two maps have different numbers of pixels.
    #[error("ground truth has {gt} pixels but prediction has {pred}")]
    LengthMismatch { gt: usize, pred: usize },
    /// A value that is neither a class id (`0..n`) nor 255.
    #[error("{} label value {value} is out of range (class ids are 0..={}, 255 is ignore)",
        if *in_ground_truth { "ground-truth" } else { "predicted" }, n_classes - 1)]
    OutOfRange { in_ground_truth: bool, value: u8, n_classes: usize },
}

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
