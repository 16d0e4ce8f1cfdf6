//! `clipmask generate`: the main job. Image-level labels in, pixel pseudo-masks out.
use super::args::{CrfArgs, ImageSetArgs, ModelArgs, ShardArgs};
use crate::datasets::{read_labels, read_split, run_items, LabelSource};
use crate::pipeline::{GenerateOptions, MapOptions};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_long_help = "OUTPUTS
  OUT/masks/<id>.png     8-bit grayscale PNG (--mask-format gray, default): value = class id,
                         0 = background, class id = index in the config + 1, 255 = ignore. PIL,
                         cv2.imread and imageio all read the ids. --mask-format palette writes the
                         same ids as a palette PNG (config colours; only PIL reads the ids).
  OUT/cams/<id>.npz      with --save-cams; numpy.load(p) gives `keys` (int64, 0-based class
                         indices of the image's labels, in label order), `cams` (float32, K x H x W,
                         CAA-refined maps at original resolution) and `raw_cams` (float32,
                         K x H x W, GradCAM maps resized the same way). --cams-dtype float16
                         stores both as float16; --cams-stride N stores them at
                         ceil(H/N) x ceil(W/N) (N x N blocks averaged) and adds `stride`
                         (int64 N) and `size` (int64 [H, W]); crf and eval --cams resize them
                         back (bilinear, align_corners=False) and read float32.
  OUT/overlays/<id>.jpg  with --overlays: the photo blended with its mask colours.
  OUT/failures.jsonl     one {\"id\", \"path\", \"reason\"} per image that failed (bad file,
                         unknown class, no labels, invalid id, over --max-pixels, not a regular
                         file); absent when nothing failed.

Every file is written under a temporary name and renamed, so an interrupted run leaves no partial
file; rerunning the same command skips images whose outputs exist (use --overwrite to redo).
An id names one file: ids that are empty, start with '.', contain '/', '\\' or control characters,
or are longer than 200 bytes fail alone, so no output lands outside OUT. Inputs are only read.

Exit status: 0 when every image succeeded, 1 when some failed (0 with --allow-failures),
2 on a fatal error before processing (bad model, config or paths), and 128 + the signal when
stopped by one: 130 SIGINT (Ctrl-C), 143 SIGTERM, 129 SIGHUP. The first signal finishes the
image in flight and writes the summary and failures.jsonl; a second one quits at once.")]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: ImageSetArgs,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Image-level labels: JSON {"<id>": ["<class>", ...]} or text lines "<id><TAB><class>,<class>".
    /// `auto`: predict them first with CLIP (TagCLIP, as `clipmask tag` does, same model load)
    /// for every image in --images (or --split), written to OUT/labels.json and
    /// OUT/labels.scores.json (a file named auto: ./auto).
    #[arg(long, conflicts_with = "annotations")]
    pub labels: Option<PathBuf>,
    /// With --labels auto: relative threshold of the predicted labels (as the tag command's
    /// threshold option).
    #[arg(long, value_name = "T", default_value_t = crate::tagclip::DEFAULT_THRESHOLD)]
    pub tag_threshold: f64,
    /// Image-level labels from VOC XML annotations (<id>.xml, object names).
    #[arg(long, conflicts_with = "coco")]
    pub annotations: Option<PathBuf>,
    /// Image-level labels from a COCO instances_*.json (category ids map to the config's
    /// classes by rank; images without annotations are skipped and counted).
    #[arg(long, value_name = "INSTANCES.json", conflicts_with = "labels")]
    pub coco: Option<PathBuf>,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Also write OUT/cams/<id>.npz with the refined and raw maps.
    #[arg(long)]
    pub save_cams: bool,
    /// With --save-cams: the maps' element type in the archives. float16 halves their size
    /// (values in [0, 1] keep 11 significant bits); readers (crf, eval --cams) get float32.
    #[arg(long, value_enum, default_value = "float32", value_name = "DTYPE", requires = "save_cams")]
    pub cams_dtype: crate::outputs::CamDtype,
    /// With --save-cams: store the maps at 1/N resolution (each N x N block averaged), N² times
    /// fewer values; the archive records N and the original size, and readers (crf, eval
    /// --cams) resize the maps back bilinearly. 1 (default): full resolution. At most 16.
    #[arg(long, default_value_t = 1, value_name = "N", requires = "save_cams",
          value_parser = clap::value_parser!(u32).range(1..=crate::outputs::MAX_CAM_STRIDE as i64))]
    pub cams_stride: u32,
    /// Also write OUT/overlays/<id>.jpg (photo blended with the mask) for viewing.
    #[arg(long)]
    pub overlays: bool,
    /// Background score exponent: bg = (1 - max_c M_c)^alpha (method §6).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// CAA box threshold as a fraction of each map's maximum (default: the config's, 0.4 VOC, 0.7 COCO).
    #[arg(long)]
    pub box_threshold: Option<f64>,
    /// Longer side of the model input is capped at this many pixels (aspect kept); maps are
    /// upsampled back to the original size. Attention memory grows with the fourth power of
    /// this side (1024 px is 4,096 tokens, ~1 GiB of attention for ViT-B/16); VOC and COCO
    /// images (<= 640 px) are never downscaled by the default.
    /// At least 2 patches (32 px for ViT-B/16).
    #[arg(long, default_value_t = 1024)]
    pub max_side: u32,
    /// Pixel budget: an image whose header claims more than this many pixels (width x height)
    /// fails with a reason before it is decoded, and decoders may not allocate more than 16
    /// bytes per budget pixel, so a crafted header cannot exhaust memory.
    #[arg(long, default_value_t = crate::image_input::DEFAULT_MAX_PIXELS, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=crate::image_input::MAX_PIXELS_LIMIT))]
    pub max_pixels: u64,
    /// Keep the interpolated positional table in full precision instead of rounding it to fp16
    /// as the reference does (moves maps by ~1e-3).
    #[arg(long)]
    pub exact_positions: bool,
    /// Label PNG format. gray (default): 8-bit grayscale, value = class id (0 background,
    /// 255 ignore), which PIL, OpenCV and imageio all decode to the ids (ToCo, AFA, WeCLIP, IRN,
    /// detectron2, mmseg with cv2). palette: the VOC-style coloured file, viewable, but only PIL
    /// decodes it to ids; OpenCV and imageio return colours or luminance.
    #[arg(long, value_enum, default_value = "gray")]
    pub mask_format: crate::outputs::MaskFormat,
    /// Where the maps come from before CAA. gradcam: CLIP-ES's softmax-GradCAM (the default;
    /// one backward pass). maskclip, sclip, clearclip, naclip: training-free dense CLIP (the
    /// last block's attention changed as each paper's code does; no backward pass). CAA,
    /// label maps and CRF are the same for all (docs/method.md §10).
    #[arg(long = "cam", value_enum, default_value = "gradcam", value_name = "SOURCE")]
    pub cam_source: crate::cam::CamSource,
    /// Test-time augmentation: input scales, comma separated (e.g. 1.0,0.75,1.25). Each scale's
    /// maps are resized back to the original size and averaged (raw and refined separately).
    #[arg(long, value_delimiter = ',', default_value = "1.0", value_name = "S,S,..")]
    pub scales: Vec<f64>,
    /// Test-time augmentation: also run every scale on the mirrored image (maps flipped back
    /// before averaging).
    #[arg(long)]
    pub flip: bool,
    /// Model inputs per batch: images of the same input size (VOC: mostly 500x375 and 375x500)
    /// share one trunk forward and one GradCAM backward. Each scale and flip is an input.
    /// 0 (default): 8 on CUDA, 1 on CPU (where batching does not pay).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub batch_size: usize,
    /// Bound on the device memory a batch's attention may take, e.g. 20G or 512M (K, M, G, T
    /// are powers of 1024): CAA keeps n² attention per block, so a batch of large inputs whose
    /// estimate passes the bound runs as several smaller ones (same results). auto (default):
    /// 80 % of the GPU's memory on CUDA, no bound on the CPU.
    #[arg(long, default_value = "auto", value_name = "SIZE|auto")]
    pub max_gpu_mem: crate::pipeline::MemoryBudget,

    /// Refine the label maps with a dense CRF (method §6: unary -log P on P = [bg; maps], Potts
    /// Gaussian + bilateral kernels, 10 mean-field iterations; parameters from the config's
    /// "crf" section) and mark pixels below --confidence as 255. Alpha 1 is CLIP-ES's choice.
    #[arg(long)]
    pub crf: bool,
    #[command(flatten)]
    pub crf_settings: CrfArgs,
    /// Recompute images whose outputs already exist.
    #[arg(long)]
    pub overwrite: bool,
    /// Exit 0 even when some images failed (they are still listed in failures.jsonl).
    #[arg(long)]
    pub allow_failures: bool,
    /// Write the run summary (counts, seconds, per-stage seconds, peak memory) as JSON to this file
    /// (docs/schemas/generate-summary.schema.json). Stage seconds are summed over images and so
    /// over the stage's worker threads (`stage_workers`: decode, and write with --crf, run on
    /// several): worker-seconds, not wall time.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

/// What [`check`] establishes before any model loads.
pub struct Checked {
    pub cfg: crate::config::DatasetConfig,
    /// `--labels auto`: the labels come from the tagger once the model is loaded.
    pub auto: bool,
    pub split: Option<Vec<String>>,
    pub labels: BTreeMap<String, Result<Vec<String>, String>>,
    pub shard: crate::cluster::Shard,
    pub crf: Option<crate::label_maps::CrfOptions>,
}

/// Everything that can fail for the whole run, checked before the model loads: the config,
/// the labels, the split and shard, the CRF settings, the numbers, and the output folders
/// (created; none inside an input). `cfg`: the config to use instead of `--config`'s;
/// `device`: the model's device when it is already loaded (else `--device`'s).
pub fn check(
    args: &GenerateArgs,
    cfg: Option<crate::config::DatasetConfig>,
    device: Option<tch::Device>,
) -> Result<Checked> {
    if !args.input.images.is_dir() {
        bail!("--images {}: not a directory", args.input.images.display());
    }
    let cfg = match cfg {
        Some(c) => c,
        None => crate::config::DatasetConfig::resolve(&args.model.config)?,
    };
    let auto = super::tag::is_auto(args.labels.as_deref());
    // The split is read first: a labels file is then parsed for its ids only.
    let split = args.input.split.as_deref().map(read_split).transpose()?;
    let wanted: Option<std::collections::HashSet<String>> = split.as_ref().map(|s| s.iter().cloned().collect());
    let labels: BTreeMap<String, Result<Vec<String>, String>> = match (&args.labels, &args.annotations, &args.coco) {
        // --labels auto (issue 18): filled once the model is loaded.
        (Some(_), _, _) if auto && args.shard.shard.is_some() => {
            bail!("--labels auto cannot be sharded: run `clipmask tag` once, then shard `generate --labels FILE`")
        }
        (Some(_), _, _) if auto => BTreeMap::new(),
        (Some(f), _, _) => read_labels(&LabelSource::File(f.clone()), &cfg, wanted.as_ref())?,
        (None, Some(d), _) => read_labels(&LabelSource::VocXml(d.clone()), &cfg, wanted.as_ref())?,
        (None, None, Some(f)) => read_labels(&LabelSource::Coco(f.clone()), &cfg, wanted.as_ref())?,
        (None, None, None) => {
            bail!(
                "give image-level labels with --labels FILE, --annotations DIR or --coco INSTANCES.json, or \
                 --labels auto to predict them with CLIP first (TagCLIP)"
            )
        }
    };
    let shard = args.shard.shard()?;
    // The CRF's device follows the model's (`--crf-device auto`).
    let device = match device {
        Some(d) => d,
        None => args.model.device()?.0,
    };
    let crf = if args.crf { Some(args.crf_settings.options(&cfg, Some(device))?) } else { None };
    let masks_dir = args.out.join("masks");
    std::fs::create_dir_all(&masks_dir)
        .with_context(|| format!("cannot create output directory {}", masks_dir.display()))?;
    // No output folder may be, or lie inside, an input directory (nor the reverse).
    let written: Vec<PathBuf> = crate::pipeline::temp_dirs(&args.out).into_iter().skip(1).collect();
    let written: Vec<(&str, &std::path::Path)> = written.iter().map(|p| ("--out", p.as_path())).collect();
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--images", &args.input.images)];
    if let Some(d) = &args.annotations {
        inputs.push(("--annotations", d));
    }
    crate::files::check_apart(&written, &inputs)?;
    for (_, d) in &written {
        crate::files::check_output_dir(d)?;
    }
    for name in [shard.file_name("failures", "jsonl"), shard.file_name("summary", "json")] {
        crate::files::check_final_name(&args.out.join(name))?;
    }
    crate::files::check_writable(&args.out)?;
    if let Some(s) = args.scales.iter().find(|s| !s.is_finite() || **s <= 0.0 || **s > 4.0) {
        bail!("--scales {s}: each scale must be in (0, 4]");
    }
    if args.scales.is_empty() {
        bail!("--scales needs at least one value");
    }
    if !(args.alpha.is_finite() && args.alpha > 0.0) {
        bail!("--alpha must be a finite number > 0, got {}", args.alpha);
    }
    if let Some(t) = args.box_threshold.filter(|t| !(0.0..1.0).contains(t)) {
        bail!("--box-threshold must be in [0, 1), got {t}");
    }
    if auto {
        super::tag::check_threshold("--tag-threshold", args.tag_threshold)?;
    }
    Ok(Checked { cfg, auto, split, labels, shard, crf })
}

/// The map settings the flags ask for.
pub fn map_options(args: &GenerateArgs, cfg: &crate::config::DatasetConfig) -> MapOptions {
    MapOptions {
        box_threshold: args.box_threshold.unwrap_or(cfg.box_threshold),
        max_side: Some(args.max_side),
        round_pos_fp16: !args.exact_positions,
        source: args.cam_source,
        scales: args.scales.clone(),
        flip: args.flip,
    }
}

pub fn run(args: &GenerateArgs) -> Result<i32> {
    let checked = check(args, None, None)?;
    // From here a signal stops the run cleanly: during the model load (or download) the run
    // then ends before its first image with the summary and the signal's exit status; a second
    // signal quits at once.
    let interrupt = crate::signals::Interrupt::install(crate::pipeline::temp_dirs(&args.out))?;
    let (device, device_from) = args.model.device()?;
    if args.shard.shard.is_some() {
        // The first line of a scheduled run: which part it takes and where, and why.
        let shard = &checked.shard;
        eprintln!("shard {}/{} ({}), device {device:?} ({device_from})", shard.index, shard.count, shard.source);
    }
    let mut model = args.model.load_model_on(device)?;
    let maps = map_options(args, &checked.cfg);
    let mut text = crate::prompts::text_features(&model, &checked.cfg)?;
    // The text tower is not needed any more, and large (unless the tagger runs first).
    if !checked.auto {
        model.text = None;
    }
    text.classes = text.classes.to_device(model.device);
    let (shard, allow_failures) = (checked.shard.clone(), args.allow_failures);
    let Some(s) = run_with(args, checked, &model, &text, maps, interrupt.stop_flag())? else {
        return Ok(interrupt.exit_code());
    };
    if s.failed > 0 {
        eprintln!("failures are listed in {}", args.out.join(shard.file_name("failures", "jsonl")).display());
    }
    Ok(if s.interrupted {
        interrupt.exit_code()
    } else if s.failed > 0 && !allow_failures {
        1
    } else {
        0
    })
}

/// The run with a loaded model and its text features: labels (tagged first with `--labels
/// auto`), the work list, the pipeline, the summary line and files. `None` when stopped while
/// tagging (no mask was started). The Python API's `Generator.run` calls this too.
pub fn run_with(
    args: &GenerateArgs,
    checked: Checked,
    model: &crate::clip::Clip,
    text: &crate::prompts::TextFeatures,
    maps: MapOptions,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Option<crate::pipeline::Summary>> {
    let Checked { cfg, auto, split, labels, shard, mut crf } = checked;
    if let Some(c) = crf.as_mut() {
        c.stop = Some(stop.clone());
    }
    let patch = model.visual.patch as u32;
    if args.max_side < 2 * patch {
        bail!("--max-side {}: at least 2 patches ({} px) for this model (patch {patch} px)", args.max_side, 2 * patch);
    }
    let labels = if auto {
        let opts = crate::tagclip::TagOptions {
            threshold: args.tag_threshold,
            max_side: Some(args.max_side),
            round_pos_fp16: !args.exact_positions,
            ..Default::default()
        };
        let labels =
            crate::tagclip::auto_labels(model, &cfg, &args.input.images, split.as_deref(), &args.out, &opts, &stop)?;
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            // Tagged ids are saved in OUT/labels.json; no mask was started.
            eprintln!("stopped while tagging: the labels so far are in {}", args.out.join("labels.json").display());
            return Ok(None);
        }
        labels
    } else {
        labels
    };
    let items = run_items(&cfg, &args.input.images, &labels, split.as_deref(), &shard);
    let opts = GenerateOptions {
        out: args.out.clone(),
        maps,
        alpha: args.alpha,
        crf,
        save_cams: args.save_cams,
        cams_storage: crate::outputs::CamStorage::new(args.cams_dtype, args.cams_stride)?,
        overlays: args.overlays,
        overwrite: args.overwrite,
        max_pixels: args.max_pixels,
        mask_format: args.mask_format,
        batch_size: match args.batch_size {
            0 if model.device.is_cuda() => 8,
            0 => 1,
            n => n,
        },
        max_gpu_mem: crate::pipeline::batches_budget(args.max_gpu_mem, model.device),
        shard: shard.clone(),
    };
    let s = crate::pipeline::generate(model, text, &cfg, items, &opts, stop)?;
    eprintln!(
        "{} images: {} done, {} skipped (already complete), {} failed{} in {:.1} s ({})",
        s.total,
        s.done,
        s.skipped,
        s.failed,
        if s.interrupted { ", interrupted" } else { "" },
        s.seconds,
        crate::progress::rate_text(Some(s.done as f64 / s.seconds.max(1e-9)), "image")
    );
    let json = serde_json::to_string_pretty(&crate::schema::versioned(&s))?;
    if let Some(p) = &args.summary_json {
        crate::files::write_atomic(p, |w| Ok(std::io::Write::write_all(w, json.as_bytes())?))?;
    }
    if shard.is_split() {
        // Each shard's own summary, beside its failures file (`clipmask status` reads both).
        let p = args.out.join(shard.file_name("summary", "json"));
        crate::files::write_atomic(&p, |w| Ok(std::io::Write::write_all(w, json.as_bytes())?))?;
    }
    Ok(Some(s))
}
