//! Speed check for `clipmask eval` (scripts/bench_eval.sh, `make bench`): writes N label maps
//! (ground truth with VOC-like shapes and 255 borders, and a perturbed prediction) as palette
//! PNGs, then times `clipmask::eval::evaluate` on them and prints one JSON object.
use anyhow::{Context, Result};
use clap::Parser;
use clipmask::config::DatasetConfig;
use clipmask::eval::{self, EvalArgs};
use clipmask::outputs::write_label_png;
use rayon::prelude::*;
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

/// splitmix64: deterministic masks without a rand dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Ground truth: background with a few ellipses and boxes, each with a 3-pixel 255 border like
/// VOC's; prediction: the same shifted, one object relabelled, a block of 255.
fn pair(i: usize, w: usize, h: usize, n_classes: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(i as u64 * 7919 + 1);
    let mut gt = vec![0u8; w * h];
    let objects = 1 + rng.below(4);
    for _ in 0..objects {
        let class = 1 + rng.below(n_classes - 1) as u8;
        let (cx, cy) = (rng.below(w as u64) as i64, rng.below(h as u64) as i64);
        let (rx, ry) = (20 + rng.below(w as u64 / 3) as i64, 20 + rng.below(h as u64 / 3) as i64);
        let ellipse = rng.below(2) == 0;
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
    let (dx, dy) = (rng.below(13) as usize, rng.below(9) as usize);
    let mut pred = vec![0u8; w * h];
    for y in dy..h {
        for x in dx..w {
            let g = gt[(y - dy) * w + x - dx];
            pred[y * w + x] = if g == 255 { 0 } else { g };
        }
    }
    let wrong = 1 + rng.below(n_classes - 1) as u8;
    let (bx, by) = (rng.below(w as u64 / 2) as usize, rng.below(h as u64 / 2) as usize);
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
    let stamp = format!("{} {} {} {} v1\n", args.count, args.width, args.height, config.name);
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
    let n_classes = config.classes.len() as u64 + 1;
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
    let eval_args = EvalArgs::new(args.dir.join("pred"), args.dir.join("gt"), args.config.clone());
    let mut best = f64::INFINITY;
    let mut miou = f64::NAN;
    for _ in 0..args.repeat.max(1) {
        let t = Instant::now();
        let report = eval::evaluate(&eval_args)?;
        best = best.min(t.elapsed().as_secs_f64());
        miou = report.best_metrics().miou;
        anyhow::ensure!(report.images == args.count, "evaluated {} of {} masks", report.images, args.count);
    }
    let out = serde_json::json!({
        "masks": args.count,
        "width": args.width,
        "height": args.height,
        "threads": rayon::current_num_threads(),
        "generate_seconds": generate_s,
        "eval_seconds": best,
        "masks_per_second": args.count as f64 / best,
        "miou": miou,
    });
    println!("{out}");
    Ok(())
}
