//! `clipmask crf`: the dense CRF on maps saved by `generate --save-cams`, so maps are computed
//! once and CRF settings tried many times.
use super::generate::CrfArgs;
use crate::config::DatasetConfig;
use crate::datasets::{find_image, missing_image_reason};
use crate::image_input::load_rgb_limited;
use crate::labels::crf_labels;
use crate::outputs::{output_path, write_label_png, CamArchive};
use crate::pipeline::{progress_bar, write_confidence, write_failures, Failure};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

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
    #[arg(long, default_value = "cams", value_parser = ["cams", "raw_cams"])]
    pub cam_key: String,
    /// Background exponent: bg = (1 - max_c M_c)^alpha (CLIP-ES uses 1 with the CRF).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// Pixel budget for the images, as `generate --max-pixels`.
    #[arg(long, default_value_t = crate::image_input::DEFAULT_MAX_PIXELS, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=crate::image_input::MAX_PIXELS_LIMIT))]
    pub max_pixels: u64,
    #[command(flatten)]
    pub crf: CrfArgs,
    /// Label PNG format. gray (default): 8-bit grayscale, value = class id (0 background,
    /// 255 ignore), which PIL, OpenCV and imageio all decode to the ids (ToCo, AFA, WeCLIP, IRN,
    /// detectron2, mmseg with cv2). palette: the VOC-style coloured file, viewable, but only PIL
    /// decodes it to ids; OpenCV and imageio return colours or luminance.
    #[arg(long, value_enum, default_value = "gray")]
    pub mask_format: crate::outputs::MaskFormat,
}

pub fn run(args: &CrfCmdArgs) -> Result<i32> {
    let cfg = DatasetConfig::resolve(&args.config)?;
    let mut opts = args.crf.options(&cfg)?;
    if !(args.alpha.is_finite() && args.alpha > 0.0) {
        bail!("--alpha must be a finite number > 0, got {}", args.alpha);
    }
    let ids: Vec<String> = crate::files::files_by_stem(&args.cams, &["npz"], "--cams", false)?.into_keys().collect();
    if ids.is_empty() {
        bail!("no .npz maps in {}", args.cams.display());
    }
    let masks_dir = args.out.join("masks");
    let written = [("--out", masks_dir.clone()), ("--out", args.out.join("confidence"))];
    let written: Vec<(&str, &std::path::Path)> = written.iter().map(|(w, p)| (*w, p.as_path())).collect();
    crate::files::check_apart(&written, &[("--cams", &args.cams), ("--images", &args.images)])?;
    for (_, d) in &written {
        crate::files::check_output_dir(d)?;
    }
    crate::files::check_final_name(&args.out.join("failures.jsonl"))?;
    std::fs::create_dir_all(&masks_dir)
        .with_context(|| format!("cannot create output directory {}", masks_dir.display()))?;
    crate::files::check_writable(&masks_dir)?;
    crate::files::sweep_temp_files(&crate::pipeline::temp_dirs(&args.out), false);
    let interrupt = crate::signals::Interrupt::install(crate::pipeline::temp_dirs(&args.out))?;
    let stop = interrupt.stop_flag();
    opts.stop = Some(stop.clone());
    let palette = cfg.png_palette();
    let bar = progress_bar(ids.len() as u64);
    let start = std::time::Instant::now();
    // Each id: Some(Ok) done, Some(Err) failed, None not started (stopped by a signal).
    let results: Vec<(&String, Option<Result<(), Failure>>)> = ids
        .par_iter()
        .map(|id| {
            if stop.load(Ordering::SeqCst) {
                return (id, None);
            }
            let npz = args.cams.join(format!("{id}.npz"));
            let mut path = npz.clone();
            let r = (|| -> Result<()> {
                crate::datasets::validate_id(id).map_err(anyhow::Error::msg)?;
                let mut a = CamArchive::read(&npz)?;
                a.validate(&args.cam_key, cfg.classes.len()).with_context(|| format!("{}", npz.display()))?;
                let maps = if args.cam_key == "cams" { a.cams } else { a.raw_cams };
                path = find_image(&args.images, id)
                    .ok_or_else(|| anyhow::anyhow!(missing_image_reason(&args.images, id)))?;
                let img = load_rgb_limited(&path, args.max_pixels)?;
                let (_, h, w) = maps.dim();
                if (img.width() as usize, img.height() as usize) != (w, h) {
                    bail!(
                        "image {} is {}x{} but its maps {} are {}x{}",
                        path.display(),
                        img.width(),
                        img.height(),
                        npz.display(),
                        w,
                        h
                    );
                }
                let (labels, conf) = crf_labels(&img, &maps, &a.keys, args.alpha, &opts)?;
                if opts.save_confidence {
                    write_confidence(&output_path(&args.out, "confidence", id, "npy")?, conf, h as u32, w as u32)?;
                }
                let png_palette = (args.mask_format == crate::outputs::MaskFormat::Palette).then_some(&palette[..]);
                write_label_png(&output_path(&args.out, "masks", id, "png")?, &labels, w as u32, h as u32, png_palette)
            })();
            bar.inc(1);
            if r.as_ref().is_err_and(|e| e.downcast_ref::<crate::crf::Cancelled>().is_some()) {
                return (id, None); // stopped by a signal mid-CRF: not attempted
            }
            let r = r.map_err(|e| Failure {
                id: id.clone(),
                path: path.display().to_string(),
                stage: "crf".to_string(),
                reason: super::format_error(&e),
            });
            (id, Some(r))
        })
        .collect();
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let attempted: HashSet<String> = results.iter().filter(|(_, r)| r.is_some()).map(|(id, _)| (*id).clone()).collect();
    let failures: Vec<Failure> = results.into_iter().filter_map(|(_, r)| r.and_then(|r| r.err())).collect();
    let done = attempted.len() - failures.len();
    let interrupted = stop.load(Ordering::SeqCst);
    eprintln!(
        "{} images: {} done, {} failed{} in {:.1} s ({:.2} images/s)",
        ids.len(),
        done,
        failures.len(),
        if interrupted { ", interrupted" } else { "" },
        secs,
        done as f64 / secs.max(1e-9)
    );
    for f in &failures {
        eprintln!("failed: {}: {}", f.id, f.reason);
    }
    write_failures(&args.out, &failures, &attempted)?;
    if !failures.is_empty() {
        eprintln!("failures are listed in {}", args.out.join("failures.jsonl").display());
    }
    Ok(if interrupted {
        interrupt.exit_code()
    } else if failures.is_empty() {
        0
    } else {
        1
    })
}
