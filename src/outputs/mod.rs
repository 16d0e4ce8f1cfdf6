//! Output files: palette label PNGs (here), `.npz` map archives (`npz`, stored as
//! `cam_storage` says), colour overlays with their legend (`overlay`); all written atomically
//! (temporary name in the same directory, then rename), so an interrupted run never leaves a
//! partial file under a final name.
pub mod cam_storage;
mod npz;
mod overlay;

pub use cam_storage::{CamDtype, CamStorage, MAX_CAM_STRIDE};
pub use npz::{CamArchive, MAP_TOLERANCE};
pub use overlay::{blend_labels, classes_present, draw_legend, overlay_image, write_overlay, LegendLayout};

use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// How label PNGs are written (`--mask-format`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskFormat {
    /// 8-bit grayscale, value = class id: every reader (PIL, OpenCV, imageio) decodes the ids,
    /// like VOC's SegmentationClassAug and the original CLIP-ES's cv2.imwrite.
    #[default]
    Gray,
    /// 8-bit palette PNG with the config's colours (viewable; PIL decodes the ids, OpenCV and
    /// imageio decode colours).
    Palette,
}

/// 8-bit label PNG (`labels.len() == width * height`): indexed with a 768-byte `palette`, or
/// grayscale when `palette` is None. Either way the stored byte is the class id.
pub fn write_label_png(path: &Path, labels: &[u8], width: u32, height: u32, palette: Option<&[u8]>) -> Result<()> {
    if labels.len() != (width * height) as usize {
        bail!("label map has {} pixels, expected {}x{}", labels.len(), width, height);
    }
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, width, height);
        enc.set_depth(png::BitDepth::Eight);
        match palette {
            Some(p) => {
                enc.set_color(png::ColorType::Indexed);
                enc.set_palette(p.to_vec());
            }
            None => enc.set_color(png::ColorType::Grayscale),
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(labels)?;
        writer.finish()?;
        Ok(())
    })
}

/// Reads a label PNG as class ids: palette indices or 8-bit grayscale values as stored, or an
/// RGB(A) colour image mapped back through `palette` (768 bytes; VOC's SegmentationClass style),
/// with an error naming the first colour that is not in it.
pub fn read_label_png_colours(path: &Path, palette: &[u8]) -> Result<(Vec<u8>, u32, u32)> {
    read_label_png_with(path, Some(palette))
}

/// Reads a label PNG as raw indices (palette or 8-bit grayscale), not as colours.
pub fn read_label_png(path: &Path) -> Result<(Vec<u8>, u32, u32)> {
    read_label_png_with(path, None)
}

fn read_label_png_with(path: &Path, palette: Option<&[u8]>) -> Result<(Vec<u8>, u32, u32)> {
    let file = crate::files::open_regular(path)?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    // Keep palette indices: no expansion to RGB.
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().with_context(|| format!("{} is not a PNG", path.display()))?;
    let info = reader.info();
    let (w, h) = (info.width, info.height);
    let (ct, depth) = (info.color_type, info.bit_depth);
    let colour = matches!(ct, png::ColorType::Rgb | png::ColorType::Rgba);
    if depth != png::BitDepth::Eight
        || !(matches!(ct, png::ColorType::Indexed | png::ColorType::Grayscale) || colour && palette.is_some())
    {
        bail!(
            "{}: label PNGs must be 8-bit palette, grayscale or RGB colour, got {:?} {:?}",
            path.display(),
            ct,
            depth
        );
    }
    let mut buf = vec![0u8; reader.output_buffer_size().context("PNG too large")?];
    let frame = reader.next_frame(&mut buf).with_context(|| format!("cannot decode {}", path.display()))?;
    buf.truncate(frame.buffer_size());
    match palette {
        Some(pal) if colour => {
            let channels = if ct == png::ColorType::Rgba { 4 } else { 3 };
            // The last index wins for duplicate colours except that 0..=255 are scanned upward,
            // so a colour used by a class and by padding maps to the class (lowest index).
            let mut lookup = std::collections::HashMap::new();
            for (i, c) in pal.chunks_exact(3).enumerate().rev() {
                lookup.insert([c[0], c[1], c[2]], i as u8);
            }
            let mut ids = Vec::with_capacity((w * h) as usize);
            for (i, px) in buf.chunks_exact(channels).enumerate() {
                let rgb = [px[0], px[1], px[2]];
                match lookup.get(&rgb) {
                    Some(&id) => ids.push(id),
                    None => bail!(
                        "{}: colour {rgb:?} at pixel ({}, {}) is not in the config's palette (an RGB label PNG \
                         must use exactly the palette's colours)",
                        path.display(),
                        i as u32 % w,
                        i as u32 / w
                    ),
                }
            }
            Ok((ids, w, h))
        }
        _ => Ok((buf, w, h)),
    }
}

/// `OUT/<kind>/<id>.<ext>`, for a valid id only ([`crate::datasets::validate_id`]): the path
/// is always a file directly inside `OUT/<kind>`.
pub fn output_path(out: &Path, kind: &str, id: &str, ext: &str) -> Result<PathBuf> {
    crate::datasets::validate_id(id).map_err(anyhow::Error::msg)?;
    // OUT/<kind> must be a real directory: a link planted there would send every file elsewhere.
    let dir = out.join(kind);
    crate::files::check_output_dir(&dir)?;
    Ok(dir.join(format!("{id}.{ext}")))
}
