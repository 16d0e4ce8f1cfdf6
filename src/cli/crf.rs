//! `clipmask crf`: the dense CRF on maps saved by `generate --save-cams`, so maps are computed
//! once and CRF settings tried many times.
use super::generate::CrfArgs;
use crate::config::DatasetConfig;
use crate::datasets::find_image;
use crate::image_input::load_rgb;
use crate::outputs::{output_path, write_label_png, CamArchive};
use crate::pipeline::{crf_labels, progress_bar, write_confidence};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
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
    #[command(flatten)]
    pub crf: CrfArgs,
}

pub fn run(args: &CrfCmdArgs) -> Result<i32> {
    let cfg = DatasetConfig::resolve(&args.config)?;
    let mut crf_args = args.crf.clone();
    crf_args.crf = true;
    let opts = crf_args.options(&cfg)?.context("crf options")?;
    let mut ids: Vec<String> = std::fs::read_dir(&args.cams)
        .with_context(|| format!("cannot read --cams {}", args.cams.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "npz"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    ids.sort();
    if ids.is_empty() {
        bail!("no .npz maps in {}", args.cams.display());
    }
    std::fs::create_dir_all(args.out.join("masks")).with_context(|| format!("cannot create {}", args.out.display()))?;
    let palette = cfg.png_palette();
    let bar = progress_bar(ids.len() as u64);
    let start = std::time::Instant::now();
    let failures: Vec<String> = ids
        .par_iter()
        .filter_map(|id| {
            let r = (|| -> Result<()> {
                let a = CamArchive::read(&args.cams.join(format!("{id}.npz")))?;
                let maps = if args.cam_key == "cams" { a.cams } else { a.raw_cams };
                let img = load_rgb(&find_image(&args.images, id))?;
                let (_, h, w) = maps.dim();
                if (img.width() as usize, img.height() as usize) != (w, h) {
                    bail!("image is {}x{} but its maps are {}x{}", img.width(), img.height(), w, h);
                }
                let (labels, conf) = crf_labels(&img, &maps, &a.keys, args.alpha, &opts)?;
                if opts.save_confidence {
                    write_confidence(&output_path(&args.out, "confidence", id, "npy"), conf, h as u32, w as u32)?;
                }
                write_label_png(&output_path(&args.out, "masks", id, "png"), &labels, w as u32, h as u32, &palette)
            })();
            bar.inc(1);
            r.err().map(|e| format!("{id}: {}", super::format_error(&e)))
        })
        .collect();
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!("{} images: {} done, {} failed in {:.1} s ({:.2} images/s)", ids.len(), ids.len() - failures.len(), failures.len(), secs, (ids.len() - failures.len()) as f64 / secs);
    for f in &failures {
        eprintln!("failed: {f}");
    }
    Ok(if failures.is_empty() { 0 } else { 1 })
}
