//! `clipmask tag`: image-level labels predicted by CLIP itself (TagCLIP, docs/tagclip.md), in
//! the labels format `generate --labels` reads, with the per-class scores next to them. Also
//! the `--labels auto` step of `generate`.
use super::ModelArgs;
use crate::clip::Clip;
use crate::config::DatasetConfig;
use crate::datasets::{find_image, read_split};
use crate::files::write_atomic;
use crate::label_metrics::{scores_path_for, ScoresFile};
use crate::tagclip::{
    list_images, select, tag_image, text_features, TagOptions, TagText, DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_THRESHOLD,
};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
#[command(after_long_help = "OUTPUTS
  --out FILE              {\"<id>\": [\"<class>\", ...]}, classes in config order: the labels
                          `clipmask generate --labels FILE` reads. Every image gets at least one
                          class (the best one when none passes the threshold), as in TagCLIP.
  <stem>.scores.json      next to --out (or --scores FILE): {\"method\": \"tagclip\", \"classes\":
                          [...], \"threshold\": t, \"scores\": {\"<id>\": [one score per class]}}.
                          Re-threshold it yourself, or give it to `clipmask eval --labels-pred`
                          for the mAP.
  <stem>.failures.jsonl   one {\"id\", \"path\", \"reason\"} per image that could not be tagged;
                          absent when none failed. Failed images are left out of both files.

Files are written under a temporary name and renamed. The method, its defaults and its formulas
are in docs/tagclip.md. Exit status: 0 when every image was tagged, 1 when some failed (0 with
--allow-failures), 130 when interrupted, 2 on a fatal error before processing.")]
pub struct TagArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Directory of images: every .jpg/.jpeg/.png/.bmp/.webp/.tif(f) file, its name without
    /// extension as the id (with --split, `<id>.<ext>` for each listed id).
    #[arg(long)]
    pub images: PathBuf,
    /// Labels file to write (JSON).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Scores file to write (default: `<out stem>.scores.json` next to --out).
    #[arg(long, value_name = "FILE")]
    pub scores: Option<PathBuf>,
    /// Ids to tag, one per line (default: every image in --images).
    #[arg(long, value_name = "FILE")]
    pub split: Option<PathBuf>,
    /// A class is a label when its score exceeds min + T (max - min) of the image's scores
    /// (TagCLIP: 0.5 for VOC and COCO, 0.1 for COCO-Stuff).
    #[arg(long, value_name = "T", default_value_t = DEFAULT_THRESHOLD)]
    pub threshold: f64,
    /// Classes re-identified on a crop: local score above min + T (max - min) of the refined
    /// patch scores (TagCLIP: 0.5, 0.1 for COCO-Stuff). Changes the scores.
    #[arg(long, value_name = "T", default_value_t = DEFAULT_CANDIDATE_THRESHOLD)]
    pub candidate_threshold: f64,
    /// Read each class as the config's prompt names (e.g. "person with clothes,people,human")
    /// instead of its label name, which is what TagCLIP reads.
    #[arg(long)]
    pub class_prompts: bool,
    /// Templates, one per line with one `{}` (default: TagCLIP's 85, prompts/tagclip-templates.txt).
    #[arg(long, value_name = "FILE")]
    pub templates: Option<PathBuf>,
    /// Longer side of the model input is capped at this many pixels (TagCLIP has no cap;
    /// VOC and COCO images are never downscaled by the default).
    #[arg(long, default_value_t = 1024)]
    pub max_side: u32,
    /// Keep the interpolated positional table in full precision instead of rounding it to fp16
    /// as TagCLIP's `upsample_pos_emb` does.
    #[arg(long)]
    pub exact_positions: bool,
    /// Exit 0 even when some images failed (they are still listed in the failures file).
    #[arg(long)]
    pub allow_failures: bool,
}

/// `--labels auto`: the value of `generate --labels` that asks for predicted labels.
pub fn is_auto(labels: Option<&Path>) -> bool {
    labels.is_some_and(|p| p.as_os_str() == "auto")
}

fn check_threshold(name: &str, t: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&t) {
        bail!("{name} must be in [0, 1], got {t}");
    }
    Ok(())
}

/// What a tagging run produced.
#[derive(Debug, Default)]
pub struct TagRun {
    pub labels: BTreeMap<String, Vec<String>>,
    pub scores: BTreeMap<String, Vec<f32>>,
    /// (id, path, reason)
    pub failures: Vec<(String, PathBuf, String)>,
    pub interrupted: bool,
}

/// Tags `items` (id, path) one by one; a bad image is a failure, never the end of the run.
pub fn tag_images(
    model: &Clip,
    text: &TagText,
    cfg: &DatasetConfig,
    items: &[(String, PathBuf)],
    opts: &TagOptions,
    stop: Option<&AtomicBool>,
) -> TagRun {
    let mut run = TagRun::default();
    let bar = crate::pipeline::progress_bar(items.len() as u64);
    bar.set_message("tagging");
    for (id, path) in items {
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            run.interrupted = true;
            break;
        }
        // One id rule for every command: an id `generate` would refuse is not tagged either.
        if let Err(reason) = crate::datasets::validate_id(id) {
            run.failures.push((id.clone(), path.clone(), reason));
            bar.inc(1);
            continue;
        }
        let r = crate::image_input::load_rgb(path).and_then(|img| {
            let p = crate::pipeline::prepare(&img, model.visual.patch, opts.max_side);
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
            Err(e) => run.failures.push((id.clone(), path.clone(), format!("{e:#}"))),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    run
}

/// Writes the labels and the scores (atomically). Entries of an earlier run at the same paths
/// that this run did not attempt are kept (an interrupted rerun must not lose them); this run's
/// outcome replaces the entries of the ids it attempted.
pub fn write_outputs(run: &TagRun, cfg: &DatasetConfig, threshold: f64, labels: &Path, scores: &Path) -> Result<()> {
    let classes: Vec<String> = cfg.class_names().iter().map(|s| s.to_string()).collect();
    let mut all_labels = run.labels.clone();
    let mut all_scores = run.scores.clone();
    if let Some((old_labels, old_scores)) = previous_outputs(labels, scores, &classes, threshold) {
        let attempted: std::collections::HashSet<&String> =
            run.labels.keys().chain(run.failures.iter().map(|(id, _, _)| id)).collect();
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
fn items_for(images: &Path, split: Option<&[String]>) -> Result<Vec<(String, PathBuf)>> {
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

/// `generate --labels auto`: tags the images with the loaded model, writes OUT/labels.json and
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
    check_threshold("--tag-threshold", opts.threshold)?;
    let items = items_for(images, split)?;
    if items.is_empty() {
        bail!("--labels auto: no images in {}", images.display());
    }
    let text = text_features(model, cfg, false, None)?;
    eprintln!("--labels auto: tagging {} images (TagCLIP)", items.len());
    let run = tag_images(model, &text, cfg, &items, opts, Some(stop));
    let labels_path = out.join("labels.json");
    write_outputs(&run, cfg, opts.threshold, &labels_path, &scores_path_for(&labels_path))?;
    let mut labels: BTreeMap<String, Result<Vec<String>, String>> =
        run.labels.into_iter().map(|(id, names)| (id, Ok(names))).collect();
    for (id, _, reason) in run.failures {
        labels.insert(id, Err(format!("no labels predicted: {reason}")));
    }
    Ok(labels)
}

pub fn run(args: &TagArgs) -> Result<i32> {
    // Everything that can fail for the whole run is checked before the model loads.
    if !args.images.is_dir() {
        bail!("--images {}: not a directory", args.images.display());
    }
    check_threshold("--threshold", args.threshold)?;
    check_threshold("--candidate-threshold", args.candidate_threshold)?;
    let cfg = DatasetConfig::resolve(&args.model.config)?;
    let templates = args.templates.as_deref().map(crate::prompts::read_templates).transpose()?;
    let split = args.split.as_deref().map(read_split).transpose()?;
    let items = items_for(&args.images, split.as_deref())?;
    if items.is_empty() {
        bail!("no images in {}", args.images.display());
    }
    let scores_path = args.scores.clone().unwrap_or_else(|| scores_path_for(&args.out));
    let stem = args.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "labels".into());
    let failures_path = args.out.with_file_name(format!("{stem}.failures.jsonl"));
    // Every output is checked before the model loads, not after the tagging.
    for p in [&args.out, &scores_path, &failures_path] {
        crate::files::check_final_name(p)?;
    }
    for p in [&args.out, &scores_path] {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create output directory {}", dir.display()))?;
        crate::files::check_writable(dir)?;
    }

    // SIGINT, SIGTERM, SIGHUP: the first finishes the image in flight, a second quits at once.
    let out_dir = args.out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let interrupt = crate::signals::Interrupt::install(vec![out_dir])?;
    let stop = interrupt.stop_flag();
    let model = args.model.load_model()?;
    let text = text_features(&model, &cfg, args.class_prompts, templates)?;
    let opts = TagOptions {
        threshold: args.threshold,
        candidate_threshold: args.candidate_threshold,
        round_pos_fp16: !args.exact_positions,
        max_side: Some(args.max_side),
    };
    let start = std::time::Instant::now();
    let run = tag_images(&model, &text, &cfg, &items, &opts, Some(&stop));
    write_outputs(&run, &cfg, args.threshold, &args.out, &scores_path)?;
    // Ids of this run replace their entries; an interrupted run keeps those it did not reach.
    let attempted: std::collections::HashSet<String> =
        run.labels.keys().cloned().chain(run.failures.iter().map(|(id, _, _)| id.clone())).collect();
    let failures: Vec<crate::pipeline::Failure> = run
        .failures
        .iter()
        .map(|(id, path, reason)| crate::pipeline::Failure {
            id: id.clone(),
            path: path.display().to_string(),
            stage: "tag".into(),
            reason: reason.clone(),
        })
        .collect();
    crate::pipeline::write_failures_file(&failures_path, &failures, &attempted)?;
    let n_labels: usize = run.labels.values().map(Vec::len).sum();
    eprintln!(
        "{} images: {} tagged ({:.2} labels per image), {} failed{} in {:.1} s; labels in {}, scores in {}",
        items.len(),
        run.labels.len(),
        n_labels as f64 / run.labels.len().max(1) as f64,
        run.failures.len(),
        if run.interrupted { ", interrupted" } else { "" },
        start.elapsed().as_secs_f64(),
        args.out.display(),
        scores_path.display()
    );
    if !run.failures.is_empty() {
        eprintln!("failures are listed in {}", failures_path.display());
    }
    Ok(if run.interrupted {
        interrupt.exit_code()
    } else if !run.failures.is_empty() && !args.allow_failures {
        1
    } else {
        0
    })
}
