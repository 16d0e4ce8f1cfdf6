//! Terminal tables and `--json` output of `clipmask eval`, for one run or several compared.
use super::{CamKey, ClassMetrics, EvalReport, Metrics};
use anyhow::Result;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use std::fmt::Write as _;

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
struct AlphaJson<'a> {
    alpha: f32,
    #[serde(flatten)]
    metrics: MetricsJson<'a>,
}

/// One run in `--json`: its directory, the metrics of its label PNGs or of its best alpha, and
/// for saved maps every alpha tried.
#[derive(Serialize)]
struct RunJson<'a> {
    source: String,
    /// `null` for label PNGs.
    cam_key: Option<CamKey>,
    /// The alpha the metrics are at (the best of the sweep); `null` for label PNGs.
    best_alpha: Option<f32>,
    #[serde(flatten)]
    metrics: MetricsJson<'a>,
    /// Saved maps only: the metrics at every alpha, in the order tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    alphas: Option<Vec<AlphaJson<'a>>>,
}

impl<'a> RunJson<'a> {
    fn new(r: &'a EvalReport) -> Self {
        RunJson {
            source: r.source.display().to_string(),
            cam_key: r.cam_key,
            best_alpha: r.variants[r.best].alpha,
            metrics: MetricsJson::new(&r.class_names, r.best_metrics()),
            alphas: r.cam_key.map(|_| {
                r.variants
                    .iter()
                    .map(|v| AlphaJson {
                        alpha: v.alpha.unwrap_or(f32::NAN),
                        metrics: MetricsJson::new(&r.class_names, &v.metrics),
                    })
                    .collect()
            }),
        }
    }
}

/// A run of a comparison, with its differences to the first run.
#[derive(Serialize)]
struct ComparedRunJson<'a> {
    #[serde(flatten)]
    run: RunJson<'a>,
    /// mIoU minus the first run's (0 for the first).
    delta_miou: f64,
    /// Per class, IoU minus the first run's IoU (`null` where either is undefined).
    delta_per_class_iou: Vec<Option<f64>>,
}

/// The one shape of `eval --json` (docs/schemas/eval.schema.json).
#[derive(Serialize)]
struct EvalJson<'a> {
    schema: u32,
    /// The first run.
    #[serde(flatten)]
    first: RunJson<'a>,
    config: &'a str,
    images: usize,
    skipped: usize,
    skipped_ids: &'a [String],
    gt_left_out: usize,
    class_names: &'a [String],
    /// Several runs only: every run, the first included.
    #[serde(skip_serializing_if = "Option::is_none")]
    runs: Option<Vec<ComparedRunJson<'a>>>,
}

impl EvalReport {
    /// The `--json` output of this run alone: [`eval_json`] of one run.
    pub fn to_json(&self) -> Result<String> {
        eval_json(std::slice::from_ref(self))
    }

    /// The terminal output: per-class table of the best variant, the alpha sweep if any, the
    /// summary.
    pub fn to_table(&self) -> String {
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
        let _ = writeln!(
            s,
            "images             {} evaluated, {} skipped{}",
            self.images,
            self.skipped.len(),
            left_out_note(self.gt_left_out)
        );
        s
    }
}

/// ", N ground-truth ids without prediction left out" when N > 0.
fn left_out_note(n: usize) -> String {
    if n > 0 {
        format!(", {n} ground-truth ids without prediction left out")
    } else {
        String::new()
    }
}

/// Percent with two decimals, `n/a` for NaN.
fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:6.2}", v * 100.0)
    } else {
        "   n/a".to_string()
    }
}

/// A signed difference in percentage points, `n/a` for NaN.
fn delta(v: f64) -> String {
    if v.is_finite() {
        format!("{:+6.2}", v * 100.0)
    } else {
        "   n/a".to_string()
    }
}

/// Per class, run minus base IoU.
fn class_deltas(run: &Metrics, base: &Metrics) -> Vec<Option<f64>> {
    run.per_class.iter().zip(&base.per_class).map(|(r, b)| Some(r.iou? - b.iou?)).collect()
}

/// `eval --json`, one shape for any number of runs (docs/schemas/eval.schema.json): `"schema": 1`;
/// the first run's `source`, `cam_key`, `best_alpha` and metrics at top level (`miou`,
/// `pixel_accuracy`, `mean_accuracy`, `fw_iou`, `ignored_fraction`, `miou_kept`, `per_class_iou`
/// with "background" first and `null` for classes absent from the ground truth, `per_class`),
/// of its best alpha for saved maps, whose every alpha is in `alphas`; `config`, `images`,
/// `skipped`, `skipped_ids`, `gt_left_out`, `class_names`; with several runs, `runs`: every run
/// (the first included) at its best alpha, with `delta_miou` and `delta_per_class_iou` against
/// the first. Scores are fractions in [0, 1] (the tables print percent); NaN (nothing to
/// average) is `null`.
pub fn eval_json(runs: &[EvalReport]) -> Result<String> {
    let first = runs.first().ok_or_else(|| anyhow::anyhow!("no runs to report"))?;
    let base = first.best_metrics();
    let out = EvalJson {
        schema: crate::schema::SCHEMA_VERSION,
        first: RunJson::new(first),
        config: &first.config_name,
        images: first.images,
        skipped: first.skipped.len(),
        skipped_ids: &first.skipped,
        gt_left_out: first.gt_left_out,
        class_names: &first.class_names,
        runs: (runs.len() > 1).then(|| {
            runs.iter()
                .map(|r| ComparedRunJson {
                    run: RunJson::new(r),
                    delta_miou: r.best_metrics().miou - base.miou,
                    delta_per_class_iou: class_deltas(r.best_metrics(), base),
                })
                .collect()
        }),
    };
    Ok(serde_json::to_string(&out)?)
}

/// The terminal table for several runs: one summary row per run (mIoU, difference to the first
/// run, ignored fraction), then per-class IoU with one column per run.
pub fn comparison_table(runs: &[EvalReport]) -> String {
    let mut s = String::new();
    let Some(first) = runs.first() else { return s };
    let base = first.best_metrics();
    let _ = writeln!(s, "{:>3}  {:>6}  {:>6}  {:>7}  {:>6}  run", "#", "mIoU", "Δ mIoU", "ignored", "alpha");
    for (i, r) in runs.iter().enumerate() {
        let m = r.best_metrics();
        let alpha = r.variants[r.best].alpha.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:>3}  {}  {}  {:>7}  {:>6}  {}",
            i + 1,
            pct(m.miou),
            if i == 0 { "     -".to_string() } else { delta(m.miou - base.miou) },
            pct(m.ignored_fraction).trim(),
            alpha,
            r.source.display()
        );
    }
    let _ = writeln!(s);
    let width = first.class_names.iter().map(|n| n.len()).max().unwrap_or(5).max(5);
    let _ = write!(s, "{:<width$}", "IoU %");
    for i in 0..runs.len() {
        if i == 0 {
            let _ = write!(s, "  {:>6}", "#1");
        } else {
            let _ = write!(s, "  {:>6} {:>6}", format!("#{}", i + 1), "Δ");
        }
    }
    let _ = writeln!(s);
    for (c, name) in first.class_names.iter().enumerate() {
        let _ = write!(s, "{name:<width$}");
        for (i, r) in runs.iter().enumerate() {
            let iou = r.best_metrics().per_class[c].iou;
            let cell = iou.map(pct).unwrap_or_else(|| "     -".into());
            if i == 0 {
                let _ = write!(s, "  {cell}");
            } else {
                let d = match (iou, base.per_class[c].iou) {
                    (Some(a), Some(b)) => delta(a - b),
                    _ => "     -".into(),
                };
                let _ = write!(s, "  {cell} {d}");
            }
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "images             {} evaluated, {} skipped{}",
        first.images,
        first.skipped.len(),
        left_out_note(first.gt_left_out)
    );
    s
}
