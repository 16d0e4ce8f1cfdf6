//! Reading predictions and ground truth, and accumulating confusion matrices over images.
use super::{CamKey, ConfusionMatrix, EvalOptions, EvalReport, ImageScore, LabelError, VariantResult};
use crate::config::DatasetConfig;
use crate::label_maps::label_map_from_cams;
use crate::outputs::{read_label_png, read_label_png_colours, CamArchive};
use anyhow::{bail, Context, Result};
use ndarray::Array3;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Where one run's predictions come from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    Labels(PathBuf),
    Cams { dir: PathBuf, key: CamKey, alphas: Vec<f32> },
}

impl Source {
    pub(super) fn dir(&self) -> &Path {
        match self {
            Source::Labels(d) | Source::Cams { dir: d, .. } => d,
        }
    }

    fn ext(&self) -> &'static str {
        match self {
            Source::Labels(_) => "png",
            Source::Cams { .. } => "npz",
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Source::Labels(_) => "prediction",
            Source::Cams { .. } => "CAM archive",
        }
    }

    /// The same source labelled at one alpha only (the report shows the best one).
    pub(super) fn at_variant(&self, variant: usize) -> Source {
        match self {
            Source::Cams { dir, key, alphas } => {
                Source::Cams { dir: dir.clone(), key: *key, alphas: vec![alphas[variant]] }
            }
            s => s.clone(),
        }
    }
}

/// The runs `opts` names: label directories first, then CAM directories, in flag order.
pub(super) fn sources(opts: &EvalOptions) -> Result<Vec<Source>> {
    if !opts.cams.is_empty() {
        if opts.alpha.is_empty() {
            bail!("no background exponent (alpha) given");
        }
        if let Some(a) = opts.alpha.iter().find(|a| !a.is_finite() || **a < 0.0) {
            bail!("background exponent {a}: must be finite and >= 0");
        }
    }
    let mut out: Vec<Source> = opts.pred.iter().map(|d| Source::Labels(d.clone())).collect();
    out.extend(opts.cams.iter().map(|d| Source::Cams {
        dir: d.clone(),
        key: opts.cam_key,
        alphas: opts.alpha.clone(),
    }));
    if out.is_empty() {
        bail!("nothing to evaluate: no directory of label PNGs or of saved maps given");
    }
    Ok(out)
}

/// "a, b, c, d, e and 12 more"
pub(crate) fn list_some(ids: &[&str]) -> String {
    let shown = ids.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if ids.len() > 5 {
        format!("{shown} and {} more", ids.len() - 5)
    } else {
        shown
    }
}

fn stems(dir: &Path, ext: &str, what: &str) -> Result<HashSet<String>> {
    Ok(crate::files::files_by_stem(dir, &[ext], what, true)?.into_keys().collect())
}

/// The ids `eval` scores: which, which were skipped, and how many ground-truth ids were left
/// out because no run predicted them.
struct Selection {
    /// In evaluation order (split order, or sorted stems).
    ids: Vec<String>,
    /// Ids dropped under `allow_missing` (no prediction in some run, or no ground truth).
    skipped: Vec<String>,
    /// Ground-truth ids without a prediction in any run, not scored (no split, not strict).
    gt_left_out: usize,
    /// Ground-truth PNGs found.
    gt_total: usize,
}

/// Ids to evaluate and ids skipped, after checking the split, ground truth and every run's
/// predictions agree. Runs are compared on the same images: an id missing from any run is
/// missing.
///
/// Without a split: when every prediction has ground truth (the ground truth is a superset, as
/// VOC's SegmentationClass is of masks for train), the predicted ids are scored and the other
/// ground-truth ids left out; `strict` requires a prediction for every ground-truth id instead.
/// A prediction without ground truth means the directories do not match.
fn resolve_ids(opts: &EvalOptions, sources: &[Source]) -> Result<Selection> {
    let gt_dir = opts.gt_dir();
    let gt = stems(gt_dir, "png", "ground-truth directory")?;
    let mut preds = Vec::with_capacity(sources.len());
    for source in sources {
        let flag = if source.ext() == "npz" { "CAM directory" } else { "prediction directory" };
        preds.push(stems(source.dir(), source.ext(), flag)?);
    }
    let sorted = |set: &HashSet<String>| {
        let mut v: Vec<String> = set.iter().cloned().collect();
        v.sort();
        v
    };
    let mut extras: Vec<Vec<&str>> = Vec::with_capacity(sources.len());
    for pred in &preds {
        // With a split, predictions beyond it are normal (masks for train_aug scored on train);
        // without one, a prediction with no ground truth means the directories do not match.
        let mut extra: Vec<&str> = if opts.split.is_none() {
            pred.iter().filter(|id| !gt.contains(*id)).map(String::as_str).collect()
        } else {
            Vec::new()
        };
        extra.sort();
        extras.push(extra);
    }
    let superset = extras.iter().all(Vec::is_empty);
    let (ids, gt_left_out) = match &opts.split {
        Some(split) => (crate::datasets::read_split(split)?, 0),
        None if !opts.strict && superset && !gt.is_empty() => {
            let predicted: HashSet<String> = preds.iter().flatten().cloned().collect();
            if predicted.is_empty() {
                let dirs: Vec<String> = sources.iter().map(|s| s.dir().display().to_string()).collect();
                bail!("no {} <id>.{} in {}", sources[0].what(), sources[0].ext(), dirs.join(" or "));
            }
            let ids = sorted(&predicted);
            (ids, gt.len() - predicted.len())
        }
        None => (sorted(&gt), 0),
    };
    if ids.is_empty() {
        bail!("no ground-truth PNGs in {}", gt_dir.display());
    }
    let mut problems = Vec::new();
    let no_gt: Vec<&str> = ids.iter().filter(|id| !gt.contains(*id)).map(String::as_str).collect();
    if !no_gt.is_empty() {
        problems.push(format!(
            "{} of {} ids in {} have no ground truth {}/<id>.png: {}",
            no_gt.len(),
            ids.len(),
            opts.split.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            gt_dir.display(),
            list_some(&no_gt)
        ));
    }
    let mut skip: HashSet<String> = no_gt.iter().map(|s| s.to_string()).collect();
    for ((source, pred), extra) in sources.iter().zip(&preds).zip(&extras) {
        let (dir, ext, what) = (source.dir(), source.ext(), source.what());
        let no_pred: Vec<&str> = ids.iter().filter(|id| !pred.contains(*id)).map(String::as_str).collect();
        if !no_pred.is_empty() {
            problems.push(format!(
                "{} of {} ids have no {what} {}/<id>.{ext}: {}",
                no_pred.len(),
                ids.len(),
                dir.display(),
                list_some(&no_pred)
            ));
        }
        if !extra.is_empty() {
            problems.push(format!(
                "{} {what}s in {} have no ground truth in {}: {}",
                extra.len(),
                dir.display(),
                gt_dir.display(),
                list_some(extra)
            ));
        }
        skip.extend(no_pred.iter().map(|s| s.to_string()));
    }
    if !problems.is_empty() && !opts.allow_missing {
        // One line: the CLI prints the first line of each error.
        bail!(
            "ids do not match: {} (pass --allow-missing to evaluate the ids that have both{})",
            problems.join("; "),
            if opts.split.is_none() { ", or --split to choose the ids" } else { "" }
        );
    }
    let skipped: Vec<String> = ids.iter().filter(|id| skip.contains(*id)).cloned().collect();
    let keep: Vec<String> = ids.iter().filter(|id| !skip.contains(*id)).cloned().collect();
    if keep.is_empty() {
        let dirs: Vec<String> = sources.iter().map(|s| s.dir().display().to_string()).collect();
        bail!(
            "no image has both a {} in {} and ground truth in {}",
            sources[0].what(),
            dirs.join(" and "),
            gt_dir.display()
        );
    }
    Ok(Selection { ids: keep, skipped, gt_left_out, gt_total: gt.len() })
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
    // The checks `crf` makes: keys unique class indices, values finite and in [0, 1] (NaN or
    // out-of-range maps would otherwise be scored).
    let mut archive = CamArchive::read(path)?;
    archive.validate(key.name(), n_classes - 1).with_context(|| format!("{}", path.display()))?;
    let maps = match key {
        CamKey::Cams => archive.cams,
        CamKey::RawCams => archive.raw_cams,
    };
    let (_, h, w) = maps.dim();
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

/// Ground truth, its width and height, and one predicted label map per variant.
pub(super) type Pair = (Vec<u8>, u32, u32, Vec<Vec<u8>>);

/// Ground truth and one predicted label map per variant for `id`.
/// Ground truth may be ids (gray or palette PNG) or colours of the config's palette (RGB).
pub(super) fn load_pair(source: &Source, gt_dir: &Path, id: &str, n_classes: usize, palette: &[u8]) -> Result<Pair> {
    let gt_path = gt_dir.join(format!("{id}.png"));
    let (gt, gw, gh) = read_label_png_colours(&gt_path, palette)?;
    let preds = load_preds(source, id, n_classes, (gw, gh), &gt_path)?;
    Ok((gt, gw, gh, preds))
}

/// One predicted label map per variant of `source` for `id`, checked against the ground truth's
/// size (`gt_path` names it in errors).
pub(super) fn load_preds(
    source: &Source,
    id: &str,
    n_classes: usize,
    (gw, gh): (u32, u32),
    gt_path: &Path,
) -> Result<Vec<Vec<u8>>> {
    Ok(match source {
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
            let (maps, keys) = load_cams(&path, *key, n_classes, gw, gh, gt_path)?;
            alphas.iter().map(|&a| label_map_from_cams(&maps, &keys, a)).collect()
        }
    })
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

/// Scores one run on `ids`.
fn evaluate_source(
    source: &Source,
    ids: &[String],
    gt_dir: &Path,
    config: &DatasetConfig,
) -> Result<(Vec<VariantResult>, usize, Vec<ImageScore>)> {
    let n = config.classes.len() + 1;
    let palette = config.png_palette();
    let n_variants = match source {
        Source::Labels(_) => 1,
        Source::Cams { alphas, .. } => alphas.len(),
    };
    let new_acc = || Acc { totals: vec![ConfusionMatrix::new(n); n_variants], scores: Vec::new() };
    let acc = ids
        .par_iter()
        .enumerate()
        .try_fold(new_acc, |mut acc, (i, id)| -> Result<Acc> {
            let (gt, _, _, preds) = load_pair(source, gt_dir, id, n, &palette)?;
            let mut score = ImageScore {
                id: id.clone(),
                miou: Vec::with_capacity(n_variants),
                pixel_accuracy: Vec::with_capacity(n_variants),
            };
            for (total, pred) in acc.totals.iter_mut().zip(&preds) {
                let mut cm = ConfusionMatrix::new(n);
                cm.accumulate(&gt, pred).map_err(|e| label_error(e, source, gt_dir, id))?;
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
    let alphas: Vec<Option<f32>> = match source {
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
    Ok((variants, best, scores.into_iter().map(|(_, s)| s).collect()))
}

/// Scores each run `opts` describes (label directories first, then CAM directories) on the
/// same images; prints nothing (notes about skipped ids go to stderr).
pub(super) fn score_runs(opts: &EvalOptions) -> Result<Vec<EvalReport>> {
    let config = DatasetConfig::resolve(&opts.config)?;
    let sources = sources(opts)?;
    let Selection { ids, skipped, gt_left_out, gt_total } = resolve_ids(opts, &sources)?;
    if gt_left_out > 0 {
        eprintln!(
            "eval: scoring the {} predicted ids; {gt_left_out} of the {gt_total} ground-truth ids in {} have no \
             prediction and are left out",
            ids.len() + skipped.len(),
            opts.gt_dir().display()
        );
    }
    if !skipped.is_empty() {
        eprintln!(
            "eval: skipping {} ids without prediction or ground truth: {}",
            skipped.len(),
            list_some(&skipped.iter().map(String::as_str).collect::<Vec<_>>())
        );
    }
    let mut class_names = vec!["background".to_string()];
    class_names.extend(config.classes.iter().map(|c| c.name.clone()));
    let mut reports = Vec::with_capacity(sources.len());
    for source in &sources {
        let (variants, best, per_image) = evaluate_source(source, &ids, opts.gt_dir(), &config)?;
        reports.push(EvalReport {
            source: source.dir().to_path_buf(),
            config_name: config.name.clone(),
            class_names: class_names.clone(),
            cam_key: matches!(source, Source::Cams { .. }).then_some(opts.cam_key),
            variants,
            best,
            images: ids.len(),
            skipped: skipped.clone(),
            gt_left_out,
            per_image,
        });
    }
    Ok(reports)
}
