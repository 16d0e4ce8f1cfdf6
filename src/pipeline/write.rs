//! Files of a run: each image's outputs, the confidence maps, failures.jsonl; and the progress
//! display.
use super::{Failure, GenerateOptions, ImageMaps};
use crate::datasets::Item;
use crate::outputs::{output_path, write_label_png, write_overlay, CamArchive};
use anyhow::{Context, Result};
use image::RgbImage;
use std::collections::HashSet;
use std::io::IsTerminal;

/// Labels (CRF when asked) and every file of one image. The maps and overlay are written
/// first and the mask last: the mask's presence marks the image complete.
pub(super) fn write_outputs(
    item: &Item,
    img: &RgbImage,
    maps: &ImageMaps,
    opts: &GenerateOptions,
    palette: &[u8],
) -> Result<()> {
    let keys: Vec<i64> = maps.keys.iter().map(|&k| k as i64).collect();
    let (w, h) = (img.width(), img.height());
    let refined = || maps.refined.as_ref().context("internal: maps were not copied to the host");
    let labels = match (&opts.crf, &maps.labels) {
        (None, Some(labels)) => labels.clone(),
        (None, None) => crate::labels::labels_from_cams(refined()?, &keys, opts.alpha),
        (Some(crf), _) => {
            let (labels, conf) = crate::labels::crf_labels(img, refined()?, &keys, opts.alpha, crf)?;
            if crf.save_confidence {
                write_confidence(&output_path(&opts.out, "confidence", &item.id, "npy")?, conf, h, w)?;
            }
            labels
        }
    };
    if opts.save_cams {
        let raw = maps.raw.as_ref().context("internal: maps were not copied to the host")?;
        let archive = CamArchive { keys: keys.clone(), cams: refined()?.clone(), raw_cams: raw.clone() };
        archive.write(&output_path(&opts.out, "cams", &item.id, "npz")?)?;
    }
    if opts.overlays {
        write_overlay(&output_path(&opts.out, "overlays", &item.id, "jpg")?, img, &labels, palette, 0.55)?;
    }
    let png_palette = (opts.mask_format == crate::outputs::MaskFormat::Palette).then_some(palette);
    write_label_png(&output_path(&opts.out, "masks", &item.id, "png")?, &labels, w, h, png_palette)
}

/// Largest CRF marginal per pixel as a float32 H x W `.npy`.
pub fn write_confidence(path: &std::path::Path, conf: Vec<f32>, h: u32, w: u32) -> Result<()> {
    use ndarray_npy::WriteNpyExt;
    let arr = ndarray::Array2::from_shape_vec((h as usize, w as usize), conf)?;
    crate::files::write_atomic(path, |f| Ok(arr.write_npy(f)?))
}

/// Updates OUT/failures.jsonl: entries of images this run attempted are replaced by this run's
/// outcome, others (other shards, images not reached) are kept. A lock on the output directory
/// serialises shards that finish at the same time.
/// Longest reason kept in a failures file, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// `reason` cut to at most [`MAX_REASON_BYTES`] at a character boundary, saying how much was cut.
pub fn cap_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_string();
    }
    let mut end = MAX_REASON_BYTES - 40;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ... ({} bytes cut)", &reason[..end], reason.len() - end)
}

/// Largest failures.jsonl read back (about 1 KB per failed image: a million failures).
const MAX_FAILURES_BYTES: u64 = 1 << 30;

pub fn write_failures(out: &std::path::Path, failures: &[Failure], attempted: &HashSet<String>) -> Result<()> {
    write_failures_file(&out.join("failures.jsonl"), failures, attempted)
}

/// [`write_failures`] for any failures file (`tag` writes `<stem>.failures.jsonl` beside its
/// labels); the lock is taken on the file's directory. Reasons are capped at
/// [`MAX_REASON_BYTES`] (a 50 MB class name must not go whole into the file).
pub fn write_failures_file(path: &std::path::Path, failures: &[Failure], attempted: &HashSet<String>) -> Result<()> {
    let out = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let lock = std::fs::File::open(out).with_context(|| format!("cannot open {}", out.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    let mut lines: Vec<String> = crate::files::read_own_text(path, MAX_FAILURES_BYTES)?
        .lines()
        .filter(|l| {
            let id = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["id"].as_str().map(String::from));
            id.is_some_and(|id| !attempted.contains(&id))
        })
        .map(String::from)
        .collect();
    for f in failures {
        let capped = Failure { reason: cap_reason(&f.reason), ..f.clone() };
        lines.push(serde_json::to_string(&capped)?);
    }
    let r = if lines.is_empty() {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    } else {
        crate::files::write_atomic(path, |w| {
            use std::io::Write;
            for l in &lines {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })
    };
    let _ = lock.unlock();
    r
}

pub fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::hidden())
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// VmHWM from /proc/self/status.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
