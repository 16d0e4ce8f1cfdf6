//! Files of a run: each image's outputs, the confidence maps, failures.jsonl; and the progress
//! display.
use super::{GenerateOptions, ImageMaps};
use crate::datasets::Item;
use crate::outputs::{output_path, write_label_png, write_overlay, CamArchive};
use anyhow::{Context, Result};
use image::RgbImage;

/// Labels (CRF when asked) and every file of one image. The maps and overlay are written
/// first and the mask last: the mask's presence marks the image complete.
pub(super) fn write_outputs(
    item: &Item,
    img: &RgbImage,
    maps: &ImageMaps,
    opts: &GenerateOptions,
    palette: &[u8],
    class_names: &[String],
) -> Result<()> {
    let keys: Vec<i64> = maps.keys.iter().map(|&k| k as i64).collect();
    let (w, h) = (img.width(), img.height());
    let refined = || maps.refined.as_ref().context("internal: maps were not copied to the host");
    let labels = match (&opts.crf, &maps.labels) {
        (None, Some(labels)) => labels.clone(),
        (None, None) => crate::label_maps::label_map_from_cams(refined()?, &keys, opts.alpha),
        (Some(crf), _) => {
            let (labels, conf) = crate::label_maps::crf_label_map(img, refined()?, &keys, opts.alpha, crf)?;
            if crf.save_confidence {
                write_confidence(&output_path(&opts.out, "confidence", &item.id, "npy")?, conf, h, w)?;
            }
            labels
        }
    };
    if opts.save_cams {
        let raw = maps.raw.as_ref().context("internal: maps were not copied to the host")?;
        let archive = CamArchive { keys: keys.clone(), cams: refined()?.clone(), raw_cams: raw.clone() };
        let names: Vec<String> =
            keys.iter().map(|&k| class_names.get(k as usize).cloned().unwrap_or_default()).collect();
        archive.write_stored(&output_path(&opts.out, "cams", &item.id, "npz")?, Some(&names), opts.cams_storage)?;
    }
    if opts.overlays {
        let path = output_path(&opts.out, "overlays", &item.id, "jpg")?;
        write_overlay(&path, img, &labels, palette, 0.55, class_names)?;
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
