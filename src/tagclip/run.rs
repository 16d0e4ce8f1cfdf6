//! A tagging run over a dataset (`clipmask tag`, and the labels step of `generate --labels
//! auto`): each image tagged by [`super::tag_image`], the labels file in the form `generate
//! --labels` reads, the per-class scores beside it, and the failures file. A rerun merges with
//! the files already there, so an interrupted one loses nothing.
use super::{list_images, select, tag_image, text_features, TagOptions, TagText};
use crate::clip::Clip;
use crate::config::DatasetConfig;
use crate::datasets::{find_image, scores_path_for, ScoresFile};
use crate::failures::Failure;
use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// What a tagging run produced.
#[derive(Debug, Default)]
pub struct TagRun {
    pub labels: BTreeMap<String, Vec<String>>,
    pub scores: BTreeMap<String, Vec<f32>>,
    /// Images that could not be tagged (stage "tag").
    pub failures: Vec<Failure>,
    pub interrupted: bool,
}

impl TagRun {
    /// Ids this run tagged or failed (an interrupted run did not reach the others).
    pub fn attempted(&self) -> HashSet<String> {
        self.labels.keys().cloned().chain(self.failures.iter().map(|f| f.id.clone())).collect()
    }
}

fn failure(id: &str, path: &Path, reason: String) -> Failure {
    Failure { id: id.to_string(), path: path.display().to_string(), stage: "tag".into(), reason }
}

/// Tags `items` (id, path) one by one; a bad image is a failure, never the end of the run.
/// `stop` (a signal) is checked before each image.
pub fn tag_images(
    model: &Clip,
    text: &TagText,
    cfg: &DatasetConfig,
    items: &[(String, PathBuf)],
    opts: &TagOptions,
    stop: Option<&AtomicBool>,
) -> TagRun {
    let mut run = TagRun::default();
    let bar = crate::progress::progress_bar(items.len() as u64, "image");
    bar.set_message("tagging");
    for (id, path) in items {
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            run.interrupted = true;
            break;
        }
        // One id rule for every command: an id `generate` would refuse is not tagged either.
        if let Err(reason) = crate::datasets::validate_id(id) {
            run.failures.push(failure(id, path, reason));
            bar.inc(1);
            continue;
        }
        let r = crate::image_input::load_rgb(path).and_then(|img| {
            let p = crate::image_input::prepare(&img, model.visual.patch, opts.max_side);
            // libtorch errors surface as panics in tch: they fail this image, not the run.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tag_image(model, text, &p, opts)))
                .unwrap_or_else(|p| Err(anyhow::anyhow!("model error: {}", crate::errors::panic_message(p.as_ref()))))
        });
        match r {
            Ok(t) => {
                let names =
                    select(&t.scores, opts.threshold).into_iter().map(|c| cfg.classes[c].name.clone()).collect();
                run.labels.insert(id.clone(), names);
                run.scores.insert(id.clone(), t.scores);
            }
            Err(e) => run.failures.push(failure(id, path, format!("{e:#}"))),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    run
}

/// Writes the labels and the scores (atomically). Entries of an earlier run at the same paths
/// that this run did not attempt are kept (an interrupted rerun must not lose them); this run's
/// outcome replaces the entries of the ids it attempted. Shards of one run merge into the same
/// files this way, one at a time under a lock on the labels file's directory.
pub fn write_outputs(run: &TagRun, cfg: &DatasetConfig, threshold: f64, labels: &Path, scores: &Path) -> Result<()> {
    let dir = labels.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let lock = std::fs::File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", dir.display()))?;
    let written = merge_and_write(run, cfg, threshold, labels, scores);
    let _ = lock.unlock();
    written
}

fn merge_and_write(run: &TagRun, cfg: &DatasetConfig, threshold: f64, labels: &Path, scores: &Path) -> Result<()> {
    let classes: Vec<String> = cfg.class_names().iter().map(|s| s.to_string()).collect();
    let mut all_labels = run.labels.clone();
    let mut all_scores = run.scores.clone();
    if let Some((old_labels, old_scores)) = previous_outputs(labels, scores, &classes, threshold) {
        let attempted = run.attempted();
        for (id, names) in old_labels {
            if !attempted.contains(&id) {
                if let Some(sc) = old_scores.get(&id) {
                    all_scores.insert(id.clone(), sc.clone());
                }
                all_labels.insert(id, names);
            }
        }
    }
    let file = ScoresFile { method: "tagclip".into(), classes, threshold, scores: all_scores };
    let json = serde_json::to_string(&file)?;
    write_atomic(scores, |w| Ok(w.write_all(json.as_bytes())?))?;
    let json = serde_json::to_string_pretty(&all_labels)?;
    write_atomic(labels, |w| Ok(writeln!(w, "{json}")?))
}

/// The labels and scores an earlier run left at these paths, when they were made with the same
/// classes and threshold (else they are replaced, as they could not be mixed with this run's).
#[allow(clippy::type_complexity)]
fn previous_outputs(
    labels: &Path,
    scores: &Path,
    classes: &[String],
    threshold: f64,
) -> Option<(BTreeMap<String, Vec<String>>, BTreeMap<String, Vec<f32>>)> {
    const MAX: u64 = 1 << 30;
    let old_labels: BTreeMap<String, Vec<String>> =
        serde_json::from_slice(&crate::files::read_regular(labels, MAX).ok()?).ok()?;
    let old_scores: ScoresFile = serde_json::from_slice(&crate::files::read_regular(scores, MAX).ok()?).ok()?;
    (old_scores.classes == classes && old_scores.threshold == threshold).then_some((old_labels, old_scores.scores))
}

/// Ids and image paths: the split's ids, or every image of the directory.
pub fn items_for(images: &Path, split: Option<&[String]>) -> Result<Vec<(String, PathBuf)>> {
    Ok(match split {
        // No image found: <id>.jpg, whose read names the problem; an invalid id (one that is
        // not a file name, crate::datasets::validate_id) looks nowhere outside `images`.
        Some(ids) => ids
            .iter()
            .map(|id| {
                let fallback = || match crate::datasets::validate_id(id) {
                    Ok(()) => images.join(format!("{id}.jpg")),
                    Err(_) => images.to_path_buf(),
                };
                (id.clone(), find_image(images, id).unwrap_or_else(fallback))
            })
            .collect(),
        None => list_images(images)?,
    })
}

/// Labels predicted for `generate` (`--labels auto`): tags the images with the loaded model, writes OUT/labels.json and
/// OUT/labels.scores.json, and returns the labels in generate's form (an image that could not
/// be tagged carries the reason).
pub fn auto_labels(
    model: &Clip,
    cfg: &DatasetConfig,
    images: &Path,
    split: Option<&[String]>,
    out: &Path,
    opts: &TagOptions,
    stop: &AtomicBool,
) -> Result<BTreeMap<String, Result<Vec<String>, String>>> {
    let items = items_for(images, split)?;
    if items.is_empty() {
        bail!("no images to tag in {}", images.display());
    }
    let text = text_features(model, cfg, false, None)?;
    eprintln!("tagging {} images (TagCLIP) for their labels", items.len());
    let run = tag_images(model, &text, cfg, &items, opts, Some(stop));
    let labels_path = out.join("labels.json");
    write_outputs(&run, cfg, opts.threshold, &labels_path, &scores_path_for(&labels_path))?;
    let mut labels: BTreeMap<String, Result<Vec<String>, String>> =
        run.labels.into_iter().map(|(id, names)| (id, Ok(names))).collect();
    for f in run.failures {
        labels.insert(f.id, Err(format!("no labels predicted: {}", f.reason)));
    }
    Ok(labels)
}
