//! Colour overlays: label colours blended into the photo (`generate --overlays`, the report's
//! panels).
use crate::files::write_atomic;
use anyhow::Result;
use std::path::Path;

/// Blends each pixel's label colour (`palette[3 l..3 l + 3]`) into `img` with `opacity`,
/// except labels for which `skip` holds.
pub fn blend_labels(img: &mut image::RgbImage, labels: &[u8], palette: &[u8], opacity: f32, skip: impl Fn(u8) -> bool) {
    for (px, &l) in img.pixels_mut().zip(labels) {
        if skip(l) {
            continue;
        }
        let c = &palette[l as usize * 3..l as usize * 3 + 3];
        for (o, &ci) in px.0.iter_mut().zip(c) {
            *o = (*o as f32 * (1.0 - opacity) + ci as f32 * opacity).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// The image blended with its label colours (ignore pixels left as they are), as a JPEG.
pub fn write_overlay(path: &Path, rgb: &image::RgbImage, labels: &[u8], palette: &[u8], opacity: f32) -> Result<()> {
    let mut out = rgb.clone();
    blend_labels(&mut out, labels, palette, opacity, |l| l == 0 || l == 255);
    write_atomic(path, |w| {
        out.write_to(w, image::ImageFormat::Jpeg)?;
        Ok(())
    })
}

