//! The HTML report of `clipmask eval --report DIR`, sized for whole datasets: the images worst
//! first (the first run's per-image mIoU), paged ([`PAGE_SIZE`] rows a page: `index.html`, then
//! `page-2.html`, ...), pictures (full-size strip and small thumbnails, both bounded in size)
//! only for the first `--report-images` images of that order, and `index.json` with every
//! image's page and scores (docs/schemas/eval-report-index.schema.json).
mod html;
mod panels;

use super::run::{sources, Source};
use super::{EvalOptions, EvalReport};
use crate::config::DatasetConfig;
use crate::files::write_atomic;
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;

/// Image rows per HTML page.
pub const PAGE_SIZE: usize = 100;
/// Images that get pictures unless `--report-images` says otherwise: the first page.
pub const DEFAULT_REPORT_IMAGES: usize = PAGE_SIZE;

/// One image's row: its scores in every run, and its pictures when it has them.
struct Row<'a> {
    id: &'a str,
    /// Index into every run's `per_image`.
    index: usize,
    drawn: Option<panels::Drawn>,
}

/// `NaN` (nothing to average) as JSON `null`.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The report of `reports` (from [`super::run::score_runs`] with the same `opts`), each run
/// shown at its best variant.
pub(super) fn write(dir: &Path, opts: &EvalOptions, reports: &[EvalReport]) -> Result<()> {
    let config = DatasetConfig::resolve(&opts.config)?;
    let sources: Vec<Source> = sources(opts)?.into_iter().zip(reports).map(|(s, r)| s.at_variant(r.best)).collect();
    let runs: Vec<&EvalReport> = reports.iter().collect();
    let Some(first) = runs.first() else { return Ok(()) };
    let palette = config.png_palette();
    let n = first.class_names.len();
    let order = order(&runs);
    let ext = if opts.images.is_some() { "jpg" } else { "png" };
    let source_refs: Vec<&Source> = sources.iter().collect();
    // Pictures for the first images of the order only: their number bounds the report's size.
    let drawn: Vec<panels::Drawn> = order
        .iter()
        .take(opts.report_images)
        .collect::<Vec<_>>()
        .par_iter()
        .map(|&&i| panels::draw(dir, opts, &source_refs, &first.per_image[i].id, n, &palette))
        .collect::<Result<_>>()?;
    let mut drawn = drawn.into_iter();
    let rows: Vec<Row> =
        order.iter().map(|&i| Row { id: &first.per_image[i].id, index: i, drawn: drawn.next() }).collect();
    let mut chunks: Vec<&[Row]> = rows.chunks(PAGE_SIZE).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let pages = chunks.len();
    for (k, chunk) in chunks.into_iter().enumerate() {
        let page = k + 1;
        let text = html::page(&runs, &palette, opts.images.is_some(), ext, chunk, k * PAGE_SIZE, page, pages);
        write_atomic(&dir.join(page_file(page)), |w| {
            use std::io::Write;
            w.write_all(text.as_bytes())?;
            Ok(())
        })?;
    }
    // Pages of an earlier, longer report would link to images of another order: removed.
    let mut stale = pages + 1;
    while dir.join(page_file(stale)).symlink_metadata().is_ok_and(|m| m.is_file()) {
        std::fs::remove_file(dir.join(page_file(stale)))?;
        stale += 1;
    }
    let json = index_json(&runs, &rows)?;
    write_atomic(&dir.join("index.json"), |w| {
        use std::io::Write;
        w.write_all(json.as_bytes())?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// `index.html` for page 1, `page-<k>.html` after it.
fn page_file(page: usize) -> String {
    if page <= 1 {
        "index.html".to_string()
    } else {
        format!("page-{page}.html")
    }
}

/// Row order, worst first: the first run's per-image mIoU ascending (images whose ground truth
/// is all ignore, NaN, last); ties broken by the largest spread between the runs (max - min
/// mIoU), then by id.
fn order(runs: &[&EvalReport]) -> Vec<usize> {
    let first = runs[0];
    let nan_last = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    let score = |i: usize| nan_last(first.per_image[i].miou[first.best]);
    let spread: Vec<f64> = (0..first.per_image.len()).map(|i| nan_last(-spread(runs, i))).collect();
    let mut order: Vec<usize> = (0..first.per_image.len()).collect();
    order.sort_by(|&a, &b| {
        score(a)
            .total_cmp(&score(b))
            .then_with(|| spread[a].total_cmp(&spread[b]))
            .then_with(|| first.per_image[a].id.cmp(&first.per_image[b].id))
    });
    order
}

/// Max - min of the runs' mIoU on image `i` (NaN where every run is NaN).
fn spread(runs: &[&EvalReport], i: usize) -> f64 {
    let vals: Vec<f64> = runs.iter().map(|r| r.per_image[i].miou[r.best]).filter(|v| !v.is_nan()).collect();
    if vals.is_empty() {
        return f64::NAN;
    }
    vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - vals.iter().cloned().fold(f64::INFINITY, f64::min)
}

#[derive(Serialize)]
struct IndexRun {
    source: String,
    cam_key: Option<super::CamKey>,
    best_alpha: Option<f32>,
    miou: Option<f64>,
}

#[derive(Serialize)]
struct IndexImage<'a> {
    id: &'a str,
    rank: usize,
    page: usize,
    /// Per run, the image's mIoU (`null`: nothing to average).
    miou: Vec<Option<f64>>,
    /// Per run, minus the first run's (`null` where either is `null`).
    delta_miou: Vec<Option<f64>>,
    pixel_accuracy: Vec<Option<f64>>,
    /// Whether `images/` and `thumbs/` hold its pictures.
    pictures: bool,
}

#[derive(Serialize)]
struct Index<'a> {
    schema: u32,
    config: &'a str,
    page_size: usize,
    pages: usize,
    runs: Vec<IndexRun>,
    images: Vec<IndexImage<'a>>,
}

fn index_json(runs: &[&EvalReport], rows: &[Row]) -> Result<String> {
    let first = runs[0];
    let images = rows
        .iter()
        .enumerate()
        .map(|(rank, row)| {
            let miou: Vec<f64> = runs.iter().map(|r| r.per_image[row.index].miou[r.best]).collect();
            IndexImage {
                id: row.id,
                rank: rank + 1,
                page: rank / PAGE_SIZE + 1,
                delta_miou: miou.iter().map(|&v| finite(v - miou[0])).collect(),
                miou: miou.iter().map(|&v| finite(v)).collect(),
                pixel_accuracy: runs.iter().map(|r| finite(r.per_image[row.index].pixel_accuracy[r.best])).collect(),
                pictures: row.drawn.is_some(),
            }
        })
        .collect();
    let index = Index {
        schema: crate::schema::SCHEMA_VERSION,
        config: &first.config_name,
        page_size: PAGE_SIZE,
        pages: rows.len().div_ceil(PAGE_SIZE).max(1),
        runs: runs
            .iter()
            .map(|r| IndexRun {
                source: r.source.display().to_string(),
                cam_key: r.cam_key,
                best_alpha: r.variants[r.best].alpha,
                miou: finite(r.best_metrics().miou),
            })
            .collect(),
        images,
    };
    Ok(serde_json::to_string(&index)?)
}

/// The report's folders must not be, or lie inside, any input folder (the report would
/// overwrite photos or ground truth with its panels), and index.html and index.json must be
/// writable: both checked before anything is scored.
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
    crate::files::check_final_name(&dir.join("index.html"))?;
    crate::files::check_final_name(&dir.join("index.json"))
}
