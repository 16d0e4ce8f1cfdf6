//! `clipmask crf`: the dense CRF on maps saved by `generate --save-cams`, so maps are computed
//! once and CRF settings tried many times.
use super::args::{CrfArgs, ShardArgs};
use crate::config::DatasetConfig;
use crate::eval::CamKey;
use crate::pipeline::crf::{archive_ids, run_crf, CrfRunOptions};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[command(after_long_help = "Every archive is checked against the config before use: at least one key, keys unique
and class indices of the config, one key per map, values finite and in [0, 1] (values within
0.001 of it, from resizing, are clamped), maps the size of the image. An archive or image that
fails is listed with its id in OUT/failures.jsonl like `generate`, and the others go on.
Exit status: 0 all done, 1 some failed, 2 fatal error, 130 / 143 / 129 on SIGINT / SIGTERM / SIGHUP.")]
pub struct CrfCmdArgs {
    /// Directory of <id>.npz maps from `generate --save-cams`.
    #[arg(long)]
    pub cams: PathBuf,
    /// Directory of the images (<id>.jpg etc.), at the maps' resolution.
    #[arg(long)]
    pub images: PathBuf,
    /// Output directory: OUT/masks/<id>.png like `generate`.
    #[arg(long)]
    pub out: PathBuf,
    /// Dataset config (palette and CRF parameters): a JSON path or voc12 / coco14.
    #[arg(long, short = 'c', default_value = "voc12")]
    pub config: String,
    /// Which maps to use: cams (CAA-refined, default) or raw_cams (GradCAM).
    #[arg(long, value_enum, default_value = "cams")]
    pub cam_key: CamKey,
    /// Background exponent: bg = (1 - max_c M_c)^alpha (CLIP-ES uses 1 with the CRF).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// Pixel budget for the images, as `generate --max-pixels`.
    #[arg(long, default_value_t = crate::image_input::DEFAULT_MAX_PIXELS, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=crate::image_input::MAX_PIXELS_LIMIT))]
    pub max_pixels: u64,
    #[command(flatten)]
    pub crf: CrfArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Redo images whose outputs exist (by default a rerun skips them, as `generate` does).
    #[arg(long)]
    pub overwrite: bool,
    /// Label PNG format. gray (default): 8-bit grayscale, value = class id (0 background,
    /// 255 ignore), which PIL, OpenCV and imageio all decode to the ids (ToCo, AFA, WeCLIP, IRN,
    /// detectron2, mmseg with cv2). palette: the VOC-style coloured file, viewable, but only PIL
    /// decodes it to ids; OpenCV and imageio return colours or luminance.
    #[arg(long, value_enum, default_value = "gray")]
    pub mask_format: crate::outputs::MaskFormat,
}

pub fn run(args: &CrfCmdArgs) -> Result<i32> {
    // Everything that can fail for the whole run is checked before any image.
    let cfg = DatasetConfig::resolve(&args.config)?;
    let crf = args.crf.options(&cfg, None)?;
    if !(args.alpha.is_finite() && args.alpha > 0.0) {
        bail!("--alpha must be a finite number > 0, got {}", args.alpha);
    }
    archive_ids(&args.cams)?;
    let shard = args.shard.shard()?;
    if args.shard.shard.is_some() {
        eprintln!("shard {}/{} ({})", shard.index, shard.count, shard.source);
    }
    let written = [args.out.join("masks"), args.out.join("confidence")];
    let written: Vec<(&str, &Path)> = written.iter().map(|p| ("--out", p.as_path())).collect();
    crate::files::check_apart(&written, &[("--cams", &args.cams), ("--images", &args.images)])?;
    for (_, d) in &written {
        crate::files::check_output_dir(d)?;
    }
    crate::files::check_final_name(&args.out.join(shard.file_name("failures", "jsonl")))?;
    std::fs::create_dir_all(written[0].1)
        .with_context(|| format!("cannot create output directory {}", written[0].1.display()))?;
    crate::files::check_writable(written[0].1)?;
    crate::files::sweep_temp_files(&crate::pipeline::temp_dirs(&args.out), false);
    let interrupt = crate::signals::Interrupt::install(crate::pipeline::temp_dirs(&args.out))?;
    let opts = CrfRunOptions {
        cams: args.cams.clone(),
        images: args.images.clone(),
        out: args.out.clone(),
        cam_key: args.cam_key,
        alpha: args.alpha,
        max_pixels: args.max_pixels,
        crf,
        mask_format: args.mask_format,
        shard: shard.clone(),
        overwrite: args.overwrite,
    };
    let s = run_crf(&cfg, &opts, interrupt.stop_flag())?;
    eprintln!(
        "{} images: {} done, {} skipped (already complete), {} failed{} in {:.1} s ({:.2} images/s)",
        s.total,
        s.done,
        s.skipped,
        s.failures.len(),
        if s.interrupted { ", interrupted" } else { "" },
        s.seconds,
        s.done as f64 / s.seconds.max(1e-9)
    );
    for f in &s.failures {
        eprintln!("failed: {}: {}", f.id, f.reason);
    }
    if !s.failures.is_empty() {
        eprintln!("failures are listed in {}", args.out.join(shard.file_name("failures", "jsonl")).display());
    }
    Ok(if s.interrupted {
        interrupt.exit_code()
    } else if s.failures.is_empty() {
        0
    } else {
        1
    })
}
