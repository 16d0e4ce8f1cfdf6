//! The `crf` run: the dense CRF on maps saved by `generate --save-cams`, so that the maps are
//! computed once and CRF settings tried many times. Every archive is validated against the
//! config before use; an archive or image that fails is a failure of that id alone, recorded
//! in `OUT/failures.jsonl` with stage "crf". Images run in parallel on rayon's threads.
use super::write_confidence;
use crate::config::DatasetConfig;
use crate::datasets::{find_image, missing_image_reason};
use crate::eval::CamKey;
use crate::failures::{write_failures_file, Failure};
use crate::image_input::load_rgb_limited;
use crate::label_maps::{crf_label_map, CrfOptions};
use crate::outputs::{output_path, write_label_png, CamArchive, MaskFormat};
use crate::progress::progress_bar;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a `crf` run reads and writes.
#[derive(Debug, Clone)]
pub struct CrfRunOptions {
    /// Directory of `<id>.npz` archives.
    pub cams: PathBuf,
    /// Directory of the images, at the maps' resolution.
    pub images: PathBuf,
    /// Output directory (`OUT/masks`, `OUT/confidence`, `OUT/failures.jsonl`).
    pub out: PathBuf,
    /// Which maps of the archives.
    pub cam_key: CamKey,
    /// Background exponent (docs/method.md §6).
    pub alpha: f32,
    /// Pixel budget of each image.
    pub max_pixels: u64,
    pub crf: CrfOptions,
    pub mask_format: MaskFormat,
    /// This process's shard of the archives (failures go to `failures.I-of-N.jsonl`).
    pub shard: crate::cluster::Shard,
    /// Redo ids whose outputs exist (else they are skipped, as `generate` does).
    pub overwrite: bool,
}

/// How a `crf` run went.
#[derive(Debug, Default)]
pub struct CrfSummary {
    /// Archives of this shard.
    pub total: usize,
    pub done: usize,
    /// Already complete (mask, and confidence map when asked), not redone.
    pub skipped: usize,
    pub failures: Vec<Failure>,
    /// Stopped by `stop` before every archive was processed.
    pub interrupted: bool,
    pub seconds: f64,
}

/// The ids of the archives in `dir` (an error when there is none).
pub fn archive_ids(dir: &Path) -> Result<Vec<String>> {
    let ids: Vec<String> = crate::files::files_by_stem(dir, &["npz"], "maps directory", false)?.into_keys().collect();
    if ids.is_empty() {
        bail!("no .npz maps in {}", dir.display());
    }
    Ok(ids)
}

/// Runs the CRF on every archive of `opts.cams`; `stop` (a signal) ends the run between images
/// and between mean-field iterations. failures.jsonl is updated for the ids attempted.
pub fn run_crf(cfg: &DatasetConfig, opts: &CrfRunOptions, stop: Arc<AtomicBool>) -> Result<CrfSummary> {
    let ids: Vec<String> = archive_ids(&opts.cams)?.into_iter().filter(|id| opts.shard.contains(id)).collect();
    let total = ids.len();
    // Resume: an id whose outputs are all regular files is done (the mask is written last).
    let complete = |id: &str| {
        let done = |kind: &str, ext: &str| {
            output_path(&opts.out, kind, id, ext).is_ok_and(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        };
        done("masks", "png") && (!opts.crf.save_confidence || done("confidence", "npy"))
    };
    let ids: Vec<String> = ids.into_iter().filter(|id| opts.overwrite || !complete(id)).collect();
    let skipped = total - ids.len();
    let crf = CrfOptions { stop: Some(stop.clone()), ..opts.crf.clone() };
    let palette = cfg.png_palette();
    let png_palette = (opts.mask_format == MaskFormat::Palette).then_some(&palette[..]);
    let bar = progress_bar(ids.len() as u64, "image");
    let start = std::time::Instant::now();
    // As many images at once as the CRF's backend runs well (one per core for the CPU CRF).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(crf.backend.concurrent_images())
        .build()
        .context("cannot start the CRF threads")?;
    // Each id: Some(Ok) done, Some(Err) failed, None not started (stopped by a signal).
    let results: Vec<(&String, Option<Result<(), Failure>>)> = pool.install(|| {
        ids.par_iter()
            .map(|id| {
                if stop.load(Ordering::SeqCst) {
                    return (id, None);
                }
                let npz = opts.cams.join(format!("{id}.npz"));
                let mut path = npz.clone();
                let r = (|| -> Result<()> {
                    crate::datasets::validate_id(id).map_err(anyhow::Error::msg)?;
                    let mut a = CamArchive::read(&npz)?;
                    a.validate(opts.cam_key.name(), cfg.classes.len()).with_context(|| format!("{}", npz.display()))?;
                    let maps = if opts.cam_key == CamKey::Cams { a.cams } else { a.raw_cams };
                    path = find_image(&opts.images, id)
                        .ok_or_else(|| anyhow::anyhow!(missing_image_reason(&opts.images, id)))?;
                    let img = load_rgb_limited(&path, opts.max_pixels)?;
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
                    let (labels, conf) = crf_label_map(&img, &maps, &a.keys, opts.alpha, &crf)?;
                    if crf.save_confidence {
                        write_confidence(&output_path(&opts.out, "confidence", id, "npy")?, conf, h as u32, w as u32)?;
                    }
                    write_label_png(
                        &output_path(&opts.out, "masks", id, "png")?,
                        &labels,
                        w as u32,
                        h as u32,
                        png_palette,
                    )
                })();
                bar.inc(1);
                if r.as_ref().is_err_and(|e| e.downcast_ref::<crate::crf::Cancelled>().is_some()) {
                    return (id, None); // stopped by a signal mid-CRF: not attempted
                }
                let r = r.map_err(|e| Failure {
                    id: id.clone(),
                    path: path.display().to_string(),
                    stage: "crf".to_string(),
                    reason: crate::errors::format_error(&e),
                });
                (id, Some(r))
            })
            .collect()
    });
    bar.finish_and_clear();
    let attempted: HashSet<String> = results.iter().filter(|(_, r)| r.is_some()).map(|(id, _)| (*id).clone()).collect();
    let failures: Vec<Failure> = results.into_iter().filter_map(|(_, r)| r.and_then(|r| r.err())).collect();
    write_failures_file(&opts.out.join(opts.shard.file_name("failures", "jsonl")), &failures, &attempted)?;
    Ok(CrfSummary {
        total,
        skipped,
        done: attempted.len() - failures.len(),
        failures,
        interrupted: stop.load(Ordering::SeqCst),
        seconds: start.elapsed().as_secs_f64(),
    })
}
