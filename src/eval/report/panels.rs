//! The pictures of the report: per image the panels (photo | each run's prediction | ground
//! truth), one full-size strip and one small thumbnail per panel, each bounded in size so that
//! a report over a whole dataset stays small.
use super::super::run::{load_preds, Source};
use super::super::EvalOptions;
use crate::files::write_atomic;
use crate::outputs::read_label_png_colours;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Longest side of one panel in the thumbnails shown in the pages.
pub(super) const THUMB_SIDE: u32 = 160;
/// Longest side of one panel in the full-size strip (`images/<id>`): VOC and COCO images
/// (<= 640 px) are shown at their own size, larger ones downscaled.
pub(super) const FULL_SIDE: u32 = 640;
const GAP: u32 = 4;
/// JPEG quality of the pictures with photos: at 75 a VOC image with six runs (eight panels)
/// takes about 360 KB, so 100 pictured images stay well under 50 MB (README, "Evaluation").
const JPEG_QUALITY: u8 = 75;

/// What was drawn for one image: how many panels, and the size of each thumbnail.
pub(super) struct Drawn {
    pub panels: usize,
    pub thumb: (u32, u32),
}

/// `(w, h)` scaled down (never up) so that its longest side is at most `side`, aspect kept.
pub(super) fn fit(w: u32, h: u32, side: u32) -> (u32, u32) {
    let long = w.max(h).max(1);
    if long <= side {
        return (w.max(1), h.max(1));
    }
    let scale = |v: u32| ((v as u64 * side as u64 + long as u64 / 2) / long as u64).max(1) as u32;
    (scale(w), scale(h))
}

/// `thumbs/<id>.<k>.<ext>`: the k-th panel's thumbnail. The panel number has no dot, so two
/// ids never share a name.
pub(super) fn thumb_name(id: &str, k: usize, ext: &str) -> String {
    format!("{id}.{k}.{ext}")
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

fn side_by_side(panels: &[image::RgbImage]) -> image::RgbImage {
    let (w, h) = panels.first().map(|p| p.dimensions()).unwrap_or((1, 1));
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
            image::codecs::jpeg::JpegEncoder::new_with_quality(w, JPEG_QUALITY).encode_image(img)?;
        } else {
            img.write_to(w, image::ImageFormat::Png)?;
        }
        Ok(())
    })
}

/// Shrinks a panel to fit `side` (a triangle filter; label colours blur at the edges only).
fn shrink(img: &image::RgbImage, side: u32) -> image::RgbImage {
    let (w, h) = fit(img.width(), img.height(), side);
    if (w, h) == img.dimensions() {
        img.clone()
    } else {
        image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle)
    }
}

/// Draws image `id`: `images/<id>.<ext>` (the panels side by side, each at most
/// [`FULL_SIDE`]) and `thumbs/<id>.<k>.<ext>` (panel k at most [`THUMB_SIDE`]). `runs`: each
/// run's source at its best variant.
pub(super) fn draw(
    dir: &Path,
    opts: &EvalOptions,
    runs: &[&Source],
    id: &str,
    n: usize,
    palette: &[u8],
) -> Result<Drawn> {
    let photos = opts.images.as_deref();
    let (jpeg, ext) = if photos.is_some() { (true, "jpg") } else { (false, "png") };
    // The ground truth once, each run's prediction (at its best variant) against it.
    let gt_path = opts.gt_dir().join(format!("{id}.png"));
    let (gt, w, h) = read_label_png_colours(&gt_path, palette)?;
    let mut preds = Vec::with_capacity(runs.len());
    for source in runs {
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
        panels.push(colour_panel(pred, w, h, palette, photo.as_ref()));
    }
    panels.push(colour_panel(&gt, w, h, palette, photo.as_ref()));
    let full: Vec<image::RgbImage> = panels.iter().map(|p| shrink(p, FULL_SIDE)).collect();
    save_image(&dir.join("images").join(format!("{id}.{ext}")), &side_by_side(&full), jpeg)?;
    let mut thumb = (1, 1);
    for (k, p) in full.iter().enumerate() {
        let t = shrink(p, THUMB_SIDE);
        thumb = t.dimensions();
        save_image(&dir.join("thumbs").join(thumb_name(id, k, ext)), &t, jpeg)?;
    }
    Ok(Drawn { panels: panels.len(), thumb })
}
