//! `clipmask tag`: image-level labels predicted by CLIP itself (TagCLIP, docs/tagclip.md), in
//! the labels format `generate --labels` reads, with the per-class scores next to them. Also
//! the `--labels auto` step of `generate`.
use super::args::{ImageSetArgs, ModelArgs, ShardArgs};
use crate::config::DatasetConfig;
use crate::datasets::{read_split, scores_path_for};
use crate::tagclip::{
    items_for, tag_images, text_features, write_outputs, TagOptions, DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_THRESHOLD,
};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

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
    #[command(flatten)]
    pub input: ImageSetArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Labels file to write (JSON).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Scores file to write (default: `<out stem>.scores.json` next to --out).
    #[arg(long, value_name = "FILE")]
    pub scores: Option<PathBuf>,
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

pub fn check_threshold(name: &str, t: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&t) {
        bail!("{name} must be in [0, 1], got {t}");
    }
    Ok(())
}

pub fn run(args: &TagArgs) -> Result<i32> {
    // Everything that can fail for the whole run is checked before the model loads.
    if !args.input.images.is_dir() {
        bail!("--images {}: not a directory", args.input.images.display());
    }
    check_threshold("--threshold", args.threshold)?;
    check_threshold("--candidate-threshold", args.candidate_threshold)?;
    let cfg = DatasetConfig::resolve(&args.model.config)?;
    let templates = args.templates.as_deref().map(crate::prompts::read_templates).transpose()?;
    let split = args.input.split.as_deref().map(read_split).transpose()?;
    let items = items_for(&args.input.images, split.as_deref())?;
    if items.is_empty() {
        bail!("no images in {}", args.input.images.display());
    }
    let shard = args.shard.shard()?;
    let items: Vec<(String, PathBuf)> = items.into_iter().filter(|(id, _)| shard.contains(id)).collect();
    if args.shard.shard.is_some() {
        eprintln!("shard {}/{} ({}): {} images", shard.index, shard.count, shard.source, items.len());
    }
    let scores_path = args.scores.clone().unwrap_or_else(|| scores_path_for(&args.out));
    let stem = args.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "labels".into());
    let failures_path = args.out.with_file_name(shard.file_name(&format!("{stem}.failures"), "jsonl"));
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
    crate::failures::write_failures_file(&failures_path, &run.failures, &run.attempted())?;
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
