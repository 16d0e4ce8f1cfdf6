//! Image-level label quality (`clipmask eval --labels-pred`): predicted labels (from `tag` or
//! `generate --labels auto`) against ground-truth labels from a labels file, VOC XML
//! annotations or ground-truth masks. Per class and mean precision, recall and F1, overall
//! (micro) precision, recall and F1 as TagCLIP reports them, and the mAP of the scores.
use crate::config::DatasetConfig;
use crate::datasets::{read_labels_file, read_split, read_voc_annotations, scores_path_for, ScoresFile};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The ground truth's description and, per id, its classes (or why they could not be read).
type GtLabels = (String, BTreeMap<String, Result<BTreeSet<usize>>>);

/// Metrics of one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassLabelMetrics {
    pub name: String,
    /// Images whose ground truth has the class.
    pub support: usize,
    /// Images predicted to have it.
    pub predicted: usize,
    pub tp: usize,
    /// tp / predicted; 0 when nothing was predicted.
    pub precision: f64,
    /// tp / support; 0 when the class never occurs.
    pub recall: f64,
    /// 2 P R / (P + R); 0 when both are 0.
    pub f1: f64,
    /// Average precision of the scores (None without scores or without a positive image).
    pub ap: Option<f64>,
}

/// The label-quality report.
#[derive(Debug, Clone, Serialize)]
pub struct LabelReport {
    pub images: usize,
    /// Ids skipped with --allow-missing (no prediction or no ground truth); `skipped_ids` in JSON,
    /// beside their count `skipped`, as in the masks' `eval --json`.
    #[serde(rename = "skipped_ids")]
    pub skipped: Vec<String>,
    /// Every class of the config.
    pub classes: Vec<ClassLabelMetrics>,
    /// Classes in the means: those with support or predictions.
    pub mean_over: usize,
    pub mean_precision: f64,
    pub mean_recall: f64,
    pub mean_f1: f64,
    /// Micro precision, recall, and F1 of those two (TagCLIP's `compute_F1(..., 'overall')`).
    pub overall_precision: f64,
    pub overall_recall: f64,
    pub overall_f1: f64,
    /// Mean AP over classes with at least one positive image.
    pub map: Option<f64>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    }
}

/// Average precision of one class (TagCLIP utils.py `compute_AP`, VOC's non-interpolated AP):
/// images by descending score (ties in id order), the mean of the precision at each positive.
pub fn average_precision(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    if n_pos == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(std::cmp::Ordering::Equal));
    let (mut tp, mut sum) = (0usize, 0.0);
    for (rank, &i) in order.iter().enumerate() {
        if positive[i] {
            tp += 1;
            sum += tp as f64 / (rank + 1) as f64;
        }
    }
    Some(sum / n_pos as f64)
}

/// Metrics of predicted against ground-truth class sets (0-based class indices), one pair per
/// image; `scores` (per image, one per class) for the AP.
pub fn label_metrics(
    names: &[String],
    pred: &[BTreeSet<usize>],
    gt: &[BTreeSet<usize>],
    scores: Option<&[Vec<f32>]>,
) -> LabelReport {
    let c = names.len();
    let (mut all_tp, mut all_pred, mut all_gt) = (0, 0, 0);
    let mut classes = Vec::with_capacity(c);
    for (k, name) in names.iter().enumerate() {
        let support = gt.iter().filter(|g| g.contains(&k)).count();
        let predicted = pred.iter().filter(|p| p.contains(&k)).count();
        let tp = pred.iter().zip(gt).filter(|(p, g)| p.contains(&k) && g.contains(&k)).count();
        let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
        let ap = scores.and_then(|s| {
            let col: Vec<f32> = s.iter().map(|v| v[k]).collect();
            let pos: Vec<bool> = gt.iter().map(|g| g.contains(&k)).collect();
            average_precision(&col, &pos)
        });
        all_tp += tp;
        all_pred += predicted;
        all_gt += support;
        classes.push(ClassLabelMetrics {
            name: name.clone(),
            support,
            predicted,
            tp,
            precision,
            recall,
            f1: f1(precision, recall),
            ap,
        });
    }
    let used: Vec<&ClassLabelMetrics> = classes.iter().filter(|m| m.support > 0 || m.predicted > 0).collect();
    let mean = |f: fn(&ClassLabelMetrics) -> f64| {
        if used.is_empty() {
            0.0
        } else {
            used.iter().map(|m| f(m)).sum::<f64>() / used.len() as f64
        }
    };
    let aps: Vec<f64> = classes.iter().filter_map(|m| m.ap).collect();
    let (op, or) = (ratio(all_tp, all_pred), ratio(all_tp, all_gt));
    LabelReport {
        images: pred.len(),
        skipped: Vec::new(),
        mean_over: used.len(),
        mean_precision: mean(|m| m.precision),
        mean_recall: mean(|m| m.recall),
        mean_f1: mean(|m| m.f1),
        overall_precision: op,
        overall_recall: or,
        overall_f1: f1(op, or),
        map: (!aps.is_empty()).then(|| aps.iter().sum::<f64>() / aps.len() as f64),
        classes,
    }
}

impl LabelReport {
    pub fn to_table(&self) -> String {
        let mut s = format!("label quality over {} images", self.images);
        if !self.skipped.is_empty() {
            s += &format!(" ({} skipped)", self.skipped.len());
        }
        s += "\n";
        s += &format!(
            "{:<16} {:>7} {:>9} {:>9} {:>7} {:>7} {:>7}\n",
            "class", "support", "predicted", "precision", "recall", "F1", "AP"
        );
        let ap = |a: Option<f64>| a.map_or_else(|| "-".to_string(), |v| format!("{:.1}", v * 100.0));
        for m in &self.classes {
            s += &format!(
                "{:<16} {:>7} {:>9} {:>9.1} {:>7.1} {:>7.1} {:>7}\n",
                m.name,
                m.support,
                m.predicted,
                m.precision * 100.0,
                m.recall * 100.0,
                m.f1 * 100.0,
                ap(m.ap)
            );
        }
        s += &format!(
            "{:<16} {:>7} {:>9} {:>9.1} {:>7.1} {:>7.1} {:>7}\n",
            format!("mean ({})", self.mean_over),
            "",
            "",
            self.mean_precision * 100.0,
            self.mean_recall * 100.0,
            self.mean_f1 * 100.0,
            ap(self.map)
        );
        s += &format!(
            "{:<16} {:>7} {:>9} {:>9.1} {:>7.1} {:>7.1}\n",
            "overall (micro)",
            "",
            "",
            self.overall_precision * 100.0,
            self.overall_recall * 100.0,
            self.overall_f1 * 100.0
        );
        s
    }
}

/// Class indices of one image's names; unknown names are an error naming the file and image.
fn resolve(cfg: &DatasetConfig, names: &[String], what: &str, id: &str) -> Result<BTreeSet<usize>> {
    names
        .iter()
        .map(|n| {
            cfg.class_index(n)
                .with_context(|| format!("{what}, image {id}: unknown class {n:?} (not in config {})", cfg.name))
        })
        .collect()
}

/// Classes present in a ground-truth mask: ids other than 0 (background) and 255 (ignore).
fn mask_classes(path: &Path, cfg: &DatasetConfig) -> Result<BTreeSet<usize>> {
    let (px, _, _) = crate::outputs::read_label_png(path)?;
    let mut out = BTreeSet::new();
    for v in px.into_iter().collect::<BTreeSet<u8>>() {
        if v == 0 || v == 255 {
            continue;
        }
        if v as usize > cfg.classes.len() {
            bail!("{}: label {v} is beyond the {} classes of config {}", path.display(), cfg.classes.len(), cfg.name);
        }
        out.insert(v as usize - 1);
    }
    Ok(out)
}

/// Ground truth per id, from the source the flags name.
fn ground_truth(args: &super::EvalOptions, cfg: &DatasetConfig) -> Result<GtLabels> {
    let l = &args.labels;
    let mut out = BTreeMap::new();
    if let Some(f) = &l.labels_gt {
        let what = f.display().to_string();
        for (id, names) in read_labels_file(f)? {
            let r = resolve(cfg, &names, &what, &id);
            out.insert(id, r);
        }
        return Ok((what, out));
    }
    if let Some(d) = &l.annotations {
        let what = d.display().to_string();
        for (id, names) in read_voc_annotations(d)? {
            let r = match names {
                Ok(n) => resolve(cfg, &n, &what, &id),
                Err(e) => Err(anyhow::anyhow!("{what}, image {id}: {e}")),
            };
            out.insert(id, r);
        }
        return Ok((what, out));
    }
    let dir = args.gt.as_deref().context(
        "scoring image-level labels needs ground truth: a labels file, VOC XML annotations or ground-truth masks",
    )?;
    for (id, p) in crate::files::files_by_stem(dir, &["png"], "ground-truth directory", false)? {
        let r = mask_classes(&p, cfg);
        out.insert(id, r);
    }
    Ok((format!("masks in {}", dir.display()), out))
}

/// Reads everything the flags name and computes the report.
pub fn evaluate(args: &super::EvalOptions) -> Result<LabelReport> {
    let pred_path = args.labels.labels_pred.as_deref().context("no predicted labels file given")?;
    let l = &args.labels;
    if l.labels_gt.is_none() && l.annotations.is_none() && args.gt.is_none() {
        bail!(
            "scoring image-level labels needs ground truth: a labels file, VOC XML annotations or ground-truth masks"
        );
    }
    let cfg = DatasetConfig::resolve(&args.config)?;
    let pred = read_labels_file(pred_path)?;
    let (gt_what, gt) = ground_truth(args, &cfg)?;
    let scores_path = match &args.labels.scores {
        Some(p) => Some(p.clone()),
        None => Some(scores_path_for(pred_path)).filter(|p| p.is_file()),
    };
    let scores = scores_path.as_deref().map(ScoresFile::read).transpose()?;
    if let Some(s) = &scores {
        if s.classes != cfg.class_names() {
            bail!(
                "scores {}: its classes are not those of config {}",
                scores_path.unwrap_or_default().display(),
                cfg.name
            );
        }
    }
    let ids: Vec<String> = match &args.split {
        Some(f) => read_split(f)?,
        None => gt.keys().cloned().collect(),
    };
    if ids.is_empty() {
        bail!("no ground truth in {gt_what}");
    }
    let (mut p_sets, mut g_sets, mut s_rows, mut skipped, mut problems) = (vec![], vec![], vec![], vec![], vec![]);
    for id in &ids {
        let g = match gt.get(id) {
            None => {
                problems.push(format!("image {id}: no ground truth in {gt_what}"));
                skipped.push(id.clone());
                continue;
            }
            Some(Err(e)) => {
                problems.push(format!("{e:#}"));
                skipped.push(id.clone());
                continue;
            }
            Some(Ok(g)) => g,
        };
        let Some(names) = pred.get(id) else {
            problems.push(format!("image {id}: no prediction in {}", pred_path.display()));
            skipped.push(id.clone());
            continue;
        };
        let p = resolve(&cfg, names, &pred_path.display().to_string(), id)?;
        if let Some(s) = &scores {
            let row = s.scores.get(id).with_context(|| format!("scores: no entry for image {id}"))?;
            if row.len() != cfg.classes.len() {
                bail!("scores, image {id}: {} values for {} classes", row.len(), cfg.classes.len());
            }
            s_rows.push(row.clone());
        }
        p_sets.push(p);
        g_sets.push(g.clone());
    }
    if !problems.is_empty() && !args.allow_missing {
        let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
        bail!(
            "{} of {} images cannot be scored (pass --allow-missing to skip them): {}{}",
            problems.len(),
            ids.len(),
            shown.join("; "),
            if problems.len() > shown.len() { "; ..." } else { "" }
        );
    }
    if p_sets.is_empty() {
        bail!("no image has both a prediction in {} and ground truth in {gt_what}", pred_path.display());
    }
    let names: Vec<String> = cfg.class_names().iter().map(|s| s.to_string()).collect();
    let mut report = label_metrics(&names, &p_sets, &g_sets, scores.as_ref().map(|_| s_rows.as_slice()));
    report.skipped = skipped;
    Ok(report)
}

/// `eval --labels-pred --json` (docs/schemas/eval-labels.schema.json): the report after
/// `"schema": 1` and `skipped`, the count of `skipped_ids`.
#[derive(Serialize)]
struct LabelReportJson<'a> {
    skipped: usize,
    #[serde(flatten)]
    report: &'a LabelReport,
}

/// `clipmask eval --labels-pred ...`: the table (or the JSON) to print.
pub fn run(args: &super::EvalOptions, json: bool) -> Result<String> {
    let report = evaluate(args)?;
    Ok(if json {
        let out = LabelReportJson { skipped: report.skipped.len(), report: &report };
        serde_json::to_string_pretty(&crate::schema::versioned(&out))? + "\n"
    } else {
        report.to_table()
    })
}
