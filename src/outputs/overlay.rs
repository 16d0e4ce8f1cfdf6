//! Colour overlays: label colours blended into the photo (`generate --overlays`, the report's
//! panels), and the overlays' legend: a swatch and the name of each class the label map holds.
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

/// The image blended with its label colours (background and ignore pixels left as they are),
/// with the legend of the classes present in its top-left corner ([`draw_legend`]).
/// `class_names`: the config's classes (label l is `class_names[l - 1]`).
pub fn overlay_image(
    rgb: &image::RgbImage,
    labels: &[u8],
    palette: &[u8],
    opacity: f32,
    class_names: &[String],
) -> image::RgbImage {
    let mut out = rgb.clone();
    blend_labels(&mut out, labels, palette, opacity, |l| l == 0 || l == 255);
    draw_legend(&mut out, labels, palette, class_names);
    out
}

/// [`overlay_image`] as a JPEG.
pub fn write_overlay(
    path: &Path,
    rgb: &image::RgbImage,
    labels: &[u8],
    palette: &[u8],
    opacity: f32,
    class_names: &[String],
) -> Result<()> {
    let out = overlay_image(rgb, labels, palette, opacity, class_names);
    write_atomic(path, |w| {
        out.write_to(w, image::ImageFormat::Jpeg)?;
        Ok(())
    })
}

/// Longest class name drawn, in characters (longer names are cut).
const LEGEND_CHARS: usize = 24;

/// Where the legend's parts go, in pixels, for `rows` classes with names of at most `chars`
/// characters on an image whose longest side is `side`: glyphs 8 px (times `scale`, 1 up to
/// 999 px, 2 up to 1999 px, ...), a 10 px swatch per row, 12 px rows, 3 px margins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegendLayout {
    pub scale: u32,
    /// The legend's box, from the top-left corner of the image.
    pub width: u32,
    pub height: u32,
}

impl LegendLayout {
    pub fn new(rows: usize, chars: usize, side: u32) -> Self {
        let s = 1 + side / 1000;
        let chars = chars.min(LEGEND_CHARS) as u32;
        LegendLayout { scale: s, width: (3 + 10 + 4 + 8 * chars + 3) * s, height: (3 + 12 * rows as u32 - 2 + 3) * s }
    }

    /// Top-left corner and side of row `i`'s swatch.
    pub fn swatch(&self, i: usize) -> (u32, u32, u32) {
        (3 * self.scale, (3 + 12 * i as u32) * self.scale, 10 * self.scale)
    }

    /// Top-left corner of row `i`'s first glyph.
    pub fn text(&self, i: usize) -> (u32, u32) {
        ((3 + 10 + 4) * self.scale, (3 + 12 * i as u32 + 1) * self.scale)
    }
}

/// The foreground classes present in `labels` (not 0, not 255), ascending.
pub fn classes_present(labels: &[u8]) -> Vec<u8> {
    let mut seen = [false; 256];
    for &l in labels {
        seen[l as usize] = true;
    }
    (1..255u8).filter(|&l| seen[l as usize]).collect()
}

/// Draws the legend into the top-left corner of `img`: on a white box, per class present in
/// `labels` (ascending id) a swatch of its exact palette colour and its name in black, from
/// font8x8's public-domain 8x8 glyphs (characters outside ASCII as '?'). Clipped to the image;
/// nothing is drawn when no foreground class is present.
pub fn draw_legend(img: &mut image::RgbImage, labels: &[u8], palette: &[u8], class_names: &[String]) {
    let present = classes_present(labels);
    if present.is_empty() {
        return;
    }
    let name = |l: u8| -> Vec<char> {
        let n = class_names.get(l as usize - 1).map(String::as_str).unwrap_or("?");
        n.chars().take(LEGEND_CHARS).map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else { '?' }).collect()
    };
    let names: Vec<Vec<char>> = present.iter().map(|&l| name(l)).collect();
    let chars = names.iter().map(Vec::len).max().unwrap_or(0);
    let layout = LegendLayout::new(present.len(), chars, img.width().max(img.height()));
    let (w, h) = img.dimensions();
    let mut fill = |x0: u32, y0: u32, side_x: u32, side_y: u32, c: [u8; 3]| {
        for y in y0..(y0 + side_y).min(h) {
            for x in x0..(x0 + side_x).min(w) {
                img.put_pixel(x, y, image::Rgb(c));
            }
        }
    };
    fill(0, 0, layout.width, layout.height, [255, 255, 255]);
    let s = layout.scale;
    for (i, (&l, chars)) in present.iter().zip(&names).enumerate() {
        let c = palette.get(l as usize * 3..l as usize * 3 + 3).unwrap_or(&[0, 0, 0]);
        let (sx, sy, side) = layout.swatch(i);
        fill(sx, sy, side, side, [c[0], c[1], c[2]]);
        let (tx, ty) = layout.text(i);
        for (k, &ch) in chars.iter().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[ch as usize];
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..8u32 {
                    // Bit 0 is the leftmost pixel of a row.
                    if bits & (1 << gx) != 0 {
                        fill(tx + (k as u32 * 8 + gx) * s, ty + gy as u32 * s, s, s, [0, 0, 0]);
                    }
                }
            }
        }
    }
}
