//! The HTML report of `clipmask eval --report`: per image the photo, each run's prediction and
//! the ground truth side by side; worst images first for one run, and for several runs the
//! images where they differ most first.
use super::run::{load_preds, sources, Source};
use super::{EvalOptions, EvalReport, ImageScore};
use crate::config::DatasetConfig;
use crate::files::write_atomic;
use crate::outputs::read_label_png_colours;
use anyhow::{Context, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const THUMB_HEIGHT: u32 = 120;
const GAP: u32 = 4;

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// Percent-encodes a file name for a relative URL (ids may hold spaces, '#', '?').
fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn find_photo(dir: &Path, id: &str) -> Option<PathBuf> {
    crate::datasets::find_image(dir, id).filter(|p| p.is_file())
}

/// Label colours over `base` (or plain colours without a photo). Background stays the photo;
/// 255 is drawn white so that ignored pixels are visible.
fn colour_panel(labels: &[u8], w: u32, h: u32, palette: &[u8], base: Option<&image::RgbImage>) -> image::RgbImage {
    let mut out = base.cloned().unwrap_or_else(|| image::RgbImage::new(w, h));
    match base {
        // Opacity 1 over a black canvas: the plain colours.
        None => crate::outputs::blend_labels(&mut out, labels, palette, 1.0, |_| false),
        Some(_) => crate::outputs::blend_labels(&mut out, labels, palette, 0.55, |l| l == 0),
    }
    out
}

fn side_by_side(panels: &[image::RgbImage], w: u32, h: u32) -> image::RgbImage {
    let total_w = panels.len() as u32 * w + (panels.len() as u32).saturating_sub(1) * GAP;
    let mut out = image::RgbImage::from_pixel(total_w, h, image::Rgb([255, 255, 255]));
    for (i, p) in panels.iter().enumerate() {
        image::imageops::replace(&mut out, p, (i as u32 * (w + GAP)) as i64, 0);
    }
    out
}

fn save_image(path: &Path, img: &image::RgbImage, jpeg: bool) -> Result<()> {
    write_atomic(path, |w| {
        if jpeg {
            image::codecs::jpeg::JpegEncoder::new_with_quality(w, 88).encode_image(img)?;
        } else {
            img.write_to(w, image::ImageFormat::Png)?;
        }
        Ok(())
    })
}

/// The report of `reports` (from [`super::run::score_runs`] with the same `opts`), each run
/// shown at its best variant.
pub(super) fn write(dir: &Path, opts: &EvalOptions, reports: &[EvalReport]) -> Result<()> {
    let config = DatasetConfig::resolve(&opts.config)?;
    let runs: Vec<(Source, &EvalReport)> =
        sources(opts)?.into_iter().zip(reports).map(|(s, r)| (s.at_variant(r.best), r)).collect();
    write_report(dir, opts, &runs, &config)
}

/// Per image `images/<id>.{jpg,png}` (photo | prediction of each run | ground truth) and
/// `thumbs/<id>.{jpg,png}`, then `index.html`. `runs`: each run's source at its best variant.
fn write_report(dir: &Path, opts: &EvalOptions, runs: &[(Source, &EvalReport)], config: &DatasetConfig) -> Result<()> {
    let Some((_, first)) = runs.first() else { return Ok(()) };
    let n = first.class_names.len();
    let palette = config.png_palette();
    let photos = opts.images.as_deref();
    let jpeg = photos.is_some();
    let ext = if jpeg { "jpg" } else { "png" };
    first.per_image.par_iter().try_for_each(|score| -> Result<()> {
        let id = &score.id;
        // The ground truth once, each run's prediction (at its best variant) against it.
        let gt_path = opts.gt_dir().join(format!("{id}.png"));
        let (gt, w, h) = read_label_png_colours(&gt_path, &palette)?;
        let mut preds = Vec::with_capacity(runs.len());
        for (source, _) in runs {
            preds.extend(load_preds(source, id, n, (w, h), &gt_path)?.into_iter().take(1));
        }
        let photo = match photos.and_then(|d| find_photo(d, id)) {
            Some(p) => {
                let img = image::open(&p).with_context(|| format!("cannot read image {}", p.display()))?.to_rgb8();
                // Photos at another size than the masks are shown resized, not rejected.
                Some(if img.dimensions() != (w, h) {
                    image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle)
                } else {
                    img
                })
            }
            // Without a photo for this id, a grey canvas keeps the layout of the others.
            None if photos.is_some() => Some(image::RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]))),
            None => None,
        };
        let mut panels = Vec::with_capacity(runs.len() + 2);
        if let Some(p) = &photo {
            panels.push(p.clone());
        }
        for pred in &preds {
            panels.push(colour_panel(pred, w, h, &palette, photo.as_ref()));
        }
        panels.push(colour_panel(&gt, w, h, &palette, photo.as_ref()));
        let full = side_by_side(&panels, w, h);
        save_image(&dir.join("images").join(format!("{id}.{ext}")), &full, jpeg)?;
        let th = THUMB_HEIGHT.min(full.height()).max(1);
        let tw = ((full.width() as u64 * th as u64) / full.height().max(1) as u64).max(1) as u32;
        let thumb = image::imageops::thumbnail(&full, tw, th);
        save_image(&dir.join("thumbs").join(format!("{id}.{ext}")), &thumb, jpeg)?;
        Ok(())
    })?;

    let reports: Vec<&EvalReport> = runs.iter().map(|(_, r)| *r).collect();
    let nan_last = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    let mut order: Vec<usize> = (0..first.per_image.len()).collect();
    if reports.len() == 1 {
        // Worst first; images whose ground truth is all ignore (NaN) last; id breaks ties.
        let key = |i: usize| nan_last(first.per_image[i].miou[first.best]);
        order.sort_by(|&a, &b| {
            key(a).total_cmp(&key(b)).then_with(|| first.per_image[a].id.cmp(&first.per_image[b].id))
        });
    } else {
        // Largest disagreement between the runs first.
        let spread = spreads(&reports);
        let key = |i: usize| nan_last(-spread[&first.per_image[i].id]);
        order.sort_by(|&a, &b| {
            key(a).total_cmp(&key(b)).then_with(|| first.per_image[a].id.cmp(&first.per_image[b].id))
        });
    }
    let html = report_html(&reports, &order, ext, &palette, photos.is_some());
    write_atomic(&dir.join("index.html"), |w| {
        use std::io::Write;
        w.write_all(html.as_bytes())?;
        Ok(())
    })
}

fn report_html(runs: &[&EvalReport], order: &[usize], ext: &str, palette: &[u8], with_photo: bool) -> String {
    use std::fmt::Write as _;
    let first = runs[0];
    let pct = |v: f64| if v.is_finite() { format!("{:.2}", v * 100.0) } else { "n/a".to_string() };
    let mut s = String::new();
    let title = format!("clipmask eval: {}", first.config_name);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
         body{{font-family:sans-serif;font-size:13px;margin:12px;color:#222}} h1{{font-size:20px}} h2{{font-size:16px}}\n\
         table{{border-collapse:collapse;margin-bottom:12px}} .row{{display:flex;gap:32px;align-items:flex-start}}\n\
         td,th{{border:1px solid #bbb;padding:1px 6px;text-align:right}} td.l,th.l{{text-align:left}}\n\
         .sw{{display:inline-block;width:12px;height:12px;border:1px solid #555;vertical-align:middle;margin-right:4px}}\n\
         img{{display:block}}\n</style></head><body>\n<h1>{}</h1>\n",
        html_escape(&title),
        html_escape(&title)
    );
    for r in runs {
        if let Some(a) = r.variants[r.best].alpha {
            let _ = writeln!(
                s,
                "<p>{}: CAM labels ({}) at the best alpha = {a}.</p>",
                html_escape(&r.source.display().to_string()),
                r.cam_key.map(|k| k.name()).unwrap_or("")
            );
        }
    }
    // Summary and per-class tables side by side, so that the images start on screen.
    let _ = writeln!(s, "<div class=\"row\"><div><h2>Summary</h2>\n<table>");
    if runs.len() > 1 {
        let _ = write!(s, "<tr><th class=\"l\"></th>");
        for (i, r) in runs.iter().enumerate() {
            let _ = write!(s, "<th title=\"{}\">#{}</th>", html_escape(&r.source.display().to_string()), i + 1);
        }
        let _ = writeln!(s, "</tr>");
    }
    type Row = (&'static str, fn(&super::Metrics) -> f64);
    let rows: [Row; 6] = [
        ("mIoU", |m| m.miou),
        ("pixel accuracy", |m| m.pixel_accuracy),
        ("mean accuracy", |m| m.mean_accuracy),
        ("frequency-weighted IoU", |m| m.fw_iou),
        ("ignored fraction (predicted 255)", |m| m.ignored_fraction),
        ("mIoU on kept pixels", |m| m.miou_kept),
    ];
    for (k, f) in rows {
        let _ = write!(s, "<tr><th class=\"l\">{k}</th>");
        for r in runs {
            let _ = write!(s, "<td>{}</td>", pct(f(r.best_metrics())));
        }
        let _ = writeln!(s, "</tr>");
    }
    let _ = writeln!(s, "<tr><th class=\"l\">images</th><td>{}</td></tr>", first.images);
    let _ = writeln!(s, "<tr><th class=\"l\">skipped</th><td>{}</td></tr>", first.skipped.len());
    if runs.len() > 1 {
        for (i, r) in runs.iter().enumerate() {
            let _ = writeln!(
                s,
                "<tr><th class=\"l\">#{}</th><td class=\"l\" colspan=\"{}\">{}</td></tr>",
                i + 1,
                runs.len(),
                html_escape(&r.source.display().to_string())
            );
        }
    }
    let _ = write!(s, "</table></div>\n<div><h2>Per class</h2>\n<table>\n<tr><th class=\"l\">class</th>");
    if runs.len() == 1 {
        let _ = writeln!(s, "<th>IoU %</th><th>acc %</th><th>gt px</th><th>pred px</th><th>ignored px</th></tr>");
    } else {
        for i in 0..runs.len() {
            let _ = write!(s, "<th>IoU % #{}</th>", i + 1);
        }
        let _ = writeln!(s, "</tr>");
    }
    for (i, name) in first.class_names.iter().enumerate() {
        let col = &palette[i * 3..i * 3 + 3];
        let _ = write!(
            s,
            "<tr><td class=\"l\"><span class=\"sw\" style=\"background:rgb({},{},{})\"></span>{}</td>",
            col[0],
            col[1],
            col[2],
            html_escape(name)
        );
        if runs.len() == 1 {
            let c = &first.best_metrics().per_class[i];
            let _ = writeln!(
                s,
                "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                c.iou.map(pct).unwrap_or_else(|| "-".into()),
                c.accuracy.map(pct).unwrap_or_else(|| "-".into()),
                c.gt_pixels,
                c.pred_pixels,
                c.ignored_pixels
            );
        } else {
            for r in runs {
                let _ =
                    write!(s, "<td>{}</td>", r.best_metrics().per_class[i].iou.map(pct).unwrap_or_else(|| "-".into()));
            }
            let _ = writeln!(s, "</tr>");
        }
    }
    let preds = if runs.len() == 1 {
        "prediction".to_string()
    } else {
        (1..=runs.len()).map(|i| format!("#{i}")).collect::<Vec<_>>().join(" | ")
    };
    let layout = if with_photo { format!("photo | {preds} | ground truth") } else { format!("{preds} | ground truth") };
    let heading = if runs.len() == 1 { "Images, worst first" } else { "Images, largest difference between runs first" };
    let _ = write!(
        s,
        "</table></div></div>\n<h2>{heading}</h2>\n<p>Each row: {layout}; white = 255 (ignore). Click a thumbnail for full size.</p>\n<table>\n<tr><th>#</th><th class=\"l\">id</th>"
    );
    for i in 0..runs.len() {
        let _ = write!(s, "<th>mIoU %{}</th>", if runs.len() > 1 { format!(" #{}", i + 1) } else { String::new() });
    }
    if runs.len() == 1 {
        let _ = write!(s, "<th>pixel acc %</th>");
    }
    let _ = writeln!(s, "<th class=\"l\">{layout}</th></tr>");
    for (rank, &i) in order.iter().enumerate() {
        let sc: &ImageScore = &first.per_image[i];
        let file = format!("{}.{ext}", url_component(&sc.id));
        let _ = write!(s, "<tr><td>{}</td><td class=\"l\">{}</td>", rank + 1, html_escape(&sc.id));
        for r in runs {
            let _ = write!(s, "<td>{}</td>", pct(r.per_image[i].miou[r.best]));
        }
        if runs.len() == 1 {
            let _ = write!(s, "<td>{}</td>", pct(sc.pixel_accuracy[first.best]));
        }
        let _ = writeln!(
            s,
            "<td class=\"l\"><a href=\"images/{file}\"><img loading=\"lazy\" src=\"thumbs/{file}\" alt=\"{}\" height=\"{THUMB_HEIGHT}\"></a></td></tr>",
            html_escape(&sc.id)
        );
    }
    let _ = writeln!(s, "</table>\n</body></html>");
    s
}

/// The report's folders must not be, or lie inside, any input folder (the report would
/// overwrite photos or ground truth with its panels), and index.html must be writable: both
/// checked before anything is scored.
pub(super) fn check(dir: &Path, opts: &EvalOptions) -> Result<()> {
    let sources = sources(opts)?;
    let written = [dir.join("images"), dir.join("thumbs")];
    let written: Vec<(&str, &Path)> = written.iter().map(|p| ("report folder", p.as_path())).collect();
    let mut inputs: Vec<(&str, &Path)> = sources.iter().map(|s| ("predictions", s.dir())).collect();
    if let Some(gt) = &opts.gt {
        inputs.push(("ground truth", gt));
    }
    if let Some(images) = &opts.images {
        inputs.push(("images", images));
    }
    crate::files::check_apart(&written, &inputs)?;
    crate::files::check_output_dir(dir)?;
    for (_, d) in &written {
        crate::files::check_output_dir(d)?;
    }
    crate::files::check_final_name(&dir.join("index.html"))
}

/// Per image, the spread (max - min) of the runs' mIoU at their best variants; images where
/// every run is NaN have spread NaN.
fn spreads(runs: &[&EvalReport]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Some(first) = runs.first() {
        for (i, s) in first.per_image.iter().enumerate() {
            let vals: Vec<f64> = runs.iter().map(|r| r.per_image[i].miou[r.best]).filter(|v| !v.is_nan()).collect();
            let spread = if vals.is_empty() {
                f64::NAN
            } else {
                vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                    - vals.iter().cloned().fold(f64::INFINITY, f64::min)
            };
            out.insert(s.id.clone(), spread);
        }
    }
    out
}
