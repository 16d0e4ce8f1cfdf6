//! Output files: palette label PNGs, `.npz` map archives, colour overlays; all written
//! atomically (temporary name in the same directory, then rename), so an interrupted run never
//! leaves a partial file under a final name.
use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array3};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes a file through `write` to a temporary sibling, then renames it into place.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<std::fs::File>) -> Result<()>,
{
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        w.flush()?;
        w.get_ref().sync_data().ok();
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// 8-bit indexed PNG of a label map (`labels.len() == width * height`) with a 768-byte palette.
pub fn write_label_png(path: &Path, labels: &[u8], width: u32, height: u32, palette: &[u8]) -> Result<()> {
    if labels.len() != (width * height) as usize {
        bail!("label map has {} pixels, expected {}x{}", labels.len(), width, height);
    }
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, width, height);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette.to_vec());
        let mut writer = enc.write_header()?;
        writer.write_image_data(labels)?;
        writer.finish()?;
        Ok(())
    })
}

/// Reads a label PNG as raw indices (palette or 8-bit grayscale), not as colours.
pub fn read_label_png(path: &Path) -> Result<(Vec<u8>, u32, u32)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    // Keep palette indices: no expansion to RGB.
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().with_context(|| format!("{} is not a PNG", path.display()))?;
    let info = reader.info();
    let (w, h) = (info.width, info.height);
    let (ct, depth) = (info.color_type, info.bit_depth);
    if depth != png::BitDepth::Eight || !matches!(ct, png::ColorType::Indexed | png::ColorType::Grayscale) {
        bail!("{}: label PNGs must be 8-bit palette or grayscale, got {:?} {:?}", path.display(), ct, depth);
    }
    let mut buf = vec![0u8; reader.output_buffer_size().context("PNG too large")?];
    let frame = reader.next_frame(&mut buf).with_context(|| format!("cannot decode {}", path.display()))?;
    buf.truncate(frame.buffer_size());
    Ok((buf, w, h))
}

/// The maps `generate --save-cams` writes for one image (`OUT/cams/<id>.npz`).
pub struct CamArchive {
    /// 0-based class indices of the image's labels, in label order.
    pub keys: Vec<i64>,
    /// Refined (CAA) maps, K x H x W, at original resolution.
    pub cams: Array3<f32>,
    /// GradCAM maps resized the same way, K x H x W.
    pub raw_cams: Array3<f32>,
}

impl CamArchive {
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, |w| {
            let mut npz = ndarray_npy::NpzWriter::new_compressed(w);
            npz.add_array("keys", &Array1::from(self.keys.clone()))?;
            npz.add_array("cams", &self.cams)?;
            npz.add_array("raw_cams", &self.raw_cams)?;
            npz.finish()?;
            Ok(())
        })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut npz = ndarray_npy::NpzReader::new(file)
            .with_context(|| format!("{} is not an .npz archive", path.display()))?;
        let keys: Array1<i64> = npz.by_name("keys").with_context(|| format!("{}: no `keys`", path.display()))?;
        let cams: Array3<f32> = npz.by_name("cams").with_context(|| format!("{}: no `cams`", path.display()))?;
        let raw_cams: Array3<f32> =
            npz.by_name("raw_cams").with_context(|| format!("{}: no `raw_cams`", path.display()))?;
        Ok(CamArchive { keys: keys.to_vec(), cams, raw_cams })
    }
}

/// The image blended with its label colours (ignore pixels left as they are), as a JPEG.
pub fn write_overlay(path: &Path, rgb: &image::RgbImage, labels: &[u8], palette: &[u8], opacity: f32) -> Result<()> {
    let mut out = rgb.clone();
    for (i, px) in out.pixels_mut().enumerate() {
        let l = labels[i] as usize;
        if l == 0 || l == 255 {
            continue;
        }
        for c in 0..3 {
            let v = px.0[c] as f32 * (1.0 - opacity) + palette[l * 3 + c] as f32 * opacity;
            px.0[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    write_atomic(path, |w| {
        out.write_to(w, image::ImageFormat::Jpeg)?;
        Ok(())
    })
}

/// `OUT/<kind>/<id>.<ext>`
pub fn output_path(out: &Path, kind: &str, id: &str, ext: &str) -> PathBuf {
    out.join(kind).join(format!("{id}.{ext}"))
}
