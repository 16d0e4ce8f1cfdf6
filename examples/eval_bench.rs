//! Speed check for `clipmask eval` (scripts/bench_eval.sh, `make bench`): writes N label maps
//! (ground truth with VOC-like shapes and 255 borders, and a perturbed prediction) as palette
//! PNGs, then times `clipmask::eval::evaluate` on them and prints one JSON object.
use anyhow::{Context, Result};
use clap::Parser;
use clipmask::config::DatasetConfig;
use clipmask::eval::{self, EvalOptions};
use clipmask::outputs::write_label_png;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Time `clipmask eval` on generated label PNGs")]
struct Args {
    /// Working directory for the generated masks; reused when a previous run completed it.
    #[arg(long, default_value = "bench-out/eval")]
    dir: PathBuf,
    /// Number of ground-truth / prediction pairs.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Mask width in pixels.
    #[arg(long, default_value_t = 500)]
    width: u32,
    /// Mask height in pixels.
    #[arg(long, default_value_t = 375)]
    height: u32,
    /// Dataset config (path or shipped name) giving the class count and palette.
    #[arg(long, default_value = "voc12")]
    config: String,
    /// Evaluation runs; the fastest is reported (the first also warms the page cache).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
}

/// The JSON object printed.
#[derive(Serialize)]
struct Report {
    masks: usize,
    width: u32,
    height: u32,
    threads: usize,
    generate_seconds: f64,
    eval_seconds: f64,
    masks_per_second: f64,
    miou: f64,
}

/// A uniform integer in `0..n` (0 when `n` is 0).
fn below(rng: &mut StdRng, n: usize) -> usize {
    rng.random_range(0..n.max(1))
}

/// Ground truth: background with a few ellipses and boxes, each with a 3-pixel 255 border like
/// VOC's; prediction: the same shifted, one object relabelled, a block of 255.
fn pair(i: usize, w: usize, h: usize, n_classes: usize) -> (Vec<u8>, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(i as u64);
    let mut gt = vec![0u8; w * h];
    let objects = rng.random_range(1..=4);
    for _ in 0..objects {
        let class = 1 + below(&mut rng, n_classes - 1) as u8;
        let (cx, cy) = (below(&mut rng, w) as i64, below(&mut rng, h) as i64);
        let (rx, ry) = (20 + below(&mut rng, w / 3) as i64, 20 + below(&mut rng, h / 3) as i64);
        let ellipse: bool = rng.random();
        for y in (cy - ry).max(0)..(cy + ry).min(h as i64) {
            for x in (cx - rx).max(0)..(cx + rx).min(w as i64) {
                let (u, v) = ((x - cx) as f32 / rx as f32, (y - cy) as f32 / ry as f32);
                let r = if ellipse { (u * u + v * v).sqrt() } else { u.abs().max(v.abs()) };
                if r <= 1.0 {
                    let border = 1.0 - r < 3.0 / rx.min(ry) as f32;
                    gt[y as usize * w + x as usize] = if border { 255 } else { class };
                }
            }
        }
    }
    let (dx, dy) = (below(&mut rng, 13), below(&mut rng, 9));
    let mut pred = vec![0u8; w * h];
    for y in dy..h {
        for x in dx..w {
            let g = gt[(y - dy) * w + x - dx];
            pred[y * w + x] = if g == 255 { 0 } else { g };
        }
    }
    let wrong = 1 + below(&mut rng, n_classes - 1) as u8;
    let (bx, by) = (below(&mut rng, w / 2), below(&mut rng, h / 2));
    for y in by..(by + h / 5).min(h) {
        for x in bx..(bx + w / 5).min(w) {
            if pred[y * w + x] != 0 {
                pred[y * w + x] = wrong;
            }
        }
        for x in (w - w / 10)..w {
            pred[y * w + x] = 255;
        }
    }
    (gt, pred)
}

fn generate(dir: &Path, args: &Args, config: &DatasetConfig) -> Result<()> {
    // v2: masks drawn with rand's StdRng (v1 used a hand-written generator).
    let stamp = format!("{} {} {} {} v2\n", args.count, args.width, args.height, config.name);
    let marker = dir.join(".complete");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&marker);
    for sub in ["gt", "pred"] {
        let d = dir.join(sub);
        // Stale masks from a run with another count would be "extra" ids.
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("cannot clear {}", d.display()))?;
        }
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let palette = config.png_palette();
    let n_classes = config.classes.len() + 1;
    (0..args.count).into_par_iter().try_for_each(|i| -> Result<()> {
        let (gt, pred) = pair(i, args.width as usize, args.height as usize, n_classes);
        let id = format!("{i:06}");
        write_label_png(&dir.join("gt").join(format!("{id}.png")), &gt, args.width, args.height, Some(&palette))?;
        write_label_png(&dir.join("pred").join(format!("{id}.png")), &pred, args.width, args.height, Some(&palette))?;
        Ok(())
    })?;
    std::fs::write(&marker, stamp).with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = DatasetConfig::resolve(&args.config)?;
    let t0 = Instant::now();
    generate(&args.dir, &args, &config)?;
    let generate_s = t0.elapsed().as_secs_f64();
    let eval_args = EvalOptions::new(args.dir.join("pred"), args.dir.join("gt"), args.config.clone());
    let mut best = f64::INFINITY;
    let mut miou = f64::NAN;
    for _ in 0..args.repeat.max(1) {
        let t = Instant::now();
        let report = eval::evaluate(&eval_args)?;
        best = best.min(t.elapsed().as_secs_f64());
        miou = report.best_metrics().miou;
        anyhow::ensure!(report.images == args.count, "evaluated {} of {} masks", report.images, args.count);
    }
    let report = Report {
        masks: args.count,
        width: args.width,
        height: args.height,
        threads: rayon::current_num_threads(),
        generate_seconds: generate_s,
        eval_seconds: best,
        masks_per_second: args.count as f64 / best,
        miou,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
