//! Output files: palette label PNGs, `.npz` map archives, colour overlays; all written
//! atomically (temporary name in the same directory, then rename), so an interrupted run never
//! leaves a partial file under a final name.
use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array3};
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

/// The maps `generate --save-cams` writes for one image (`OUT/cams/<id>.npz`).
pub struct CamArchive {
    /// 0-based class indices of the image's labels, in label order.
    pub keys: Vec<i64>,
    /// Refined (CAA) maps, K x H x W, at original resolution.
    pub cams: Array3<f32>,
    /// GradCAM maps resized the same way, K x H x W.
    pub raw_cams: Array3<f32>,
}

/// A `.npy` file of strings, as numpy writes `np.array(names)`: dtype `<U{longest}` (UTF-32LE,
/// zero-padded), shape (K,), header padded to a multiple of 64 bytes.
fn npy_strings(names: &[String]) -> Vec<u8> {
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0).max(1);
    let mut header = format!("{{'descr': '<U{width}', 'fortran_order': False, 'shape': ({},), }}", names.len());
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for n in names {
        let chars: Vec<char> = n.chars().collect();
        for k in 0..width {
            out.extend((chars.get(k).copied().unwrap_or('\0') as u32).to_le_bytes());
        }
    }
    out
}

impl CamArchive {
    /// Writes the archive: `keys`, `cams`, `raw_cams`.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.write_named(path, None)
    }

    /// [`CamArchive::write`], plus `class_names` (one per key, numpy strings) when given, so that
    /// an archive says which classes its maps are without the config.
    pub fn write_named(&self, path: &Path, class_names: Option<&[String]>) -> Result<()> {
        use ndarray_npy::WriteNpyExt;
        use std::io::Write;
        let mut entries: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut npy = Vec::new();
        Array1::from(self.keys.clone()).write_npy(&mut npy)?;
        entries.push(("keys.npy", npy));
        if let Some(names) = class_names {
            entries.push(("class_names.npy", npy_strings(names)));
        }
        for (name, arr) in [("cams.npy", &self.cams), ("raw_cams.npy", &self.raw_cams)] {
            let mut npy = Vec::new();
            arr.write_npy(&mut npy)?;
            entries.push((name, npy));
        }
        write_atomic(path, |w| {
            let mut zip = zip::ZipWriter::new(w);
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .large_file(false);
            let added = (|| -> Result<()> {
                for (name, bytes) in &entries {
                    zip.start_file(*name, options)?;
                    zip.write_all(bytes)?;
                }
                Ok(())
            })();
            if let Err(e) = added {
                // Dropping a failed zip writer retries the write and prints "ZipWriter drop
                // failed" to stderr (a full disk would print it for every image): the error is
                // reported once, as this image's failure, and the writer is not dropped.
                std::mem::forget(zip);
                return Err(e);
            }
            zip.finish()?;
            Ok(())
        })
    }

    /// Reads an archive without trusting it: only a regular file, each entry's size checked
    /// against its compressed size (deflate expands at most ~1032x) and its `.npy` header
    /// against the bytes it holds before any array is allocated, so a crafted archive cannot
    /// make the reader allocate more than about a thousand times its own size. Values are
    /// not checked here: see [`CamArchive::validate`].
    pub fn read(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path)?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .with_context(|| format!("{} is not an .npz archive", path.display()))?;
        let keys: Array1<i64> = read_npz_entry(&mut zip, "keys", path)?;
        let cams: Array3<f32> = read_npz_entry(&mut zip, "cams", path)?;
        let raw_cams: Array3<f32> = read_npz_entry(&mut zip, "raw_cams", path)?;
        Ok(CamArchive { keys: keys.to_vec(), cams, raw_cams })
    }

    /// Checks the archive against a config of `n_classes` foreground classes before its maps
    /// `key` ("cams" or "raw_cams") are used: at least one key, keys unique and in
    /// 0..n_classes, one key per map, every value finite and in [0, 1]. Values within
    /// [`MAP_TOLERANCE`] of [0, 1] (rounding in resizing) are clamped into it; anything else is
    /// an error naming the problem.
    pub fn validate(&mut self, key: &str, n_classes: usize) -> Result<()> {
        let maps = if key == "raw_cams" { &mut self.raw_cams } else { &mut self.cams };
        let k = maps.dim().0;
        if self.keys.is_empty() {
            bail!("no keys: an archive needs one class index per map");
        }
        if self.keys.len() != k {
            bail!("{} keys but {} maps in `{key}`", self.keys.len(), k);
        }
        if let Some(bad) = self.keys.iter().find(|&&c| c < 0 || c as u64 >= n_classes as u64) {
            bail!("key {bad} is not a class index of the config (0..={})", n_classes - 1);
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.keys.iter().find(|&&c| !seen.insert(c)) {
            bail!("key {dup} appears twice: keys must be unique");
        }
        if let Some(v) = maps.iter().find(|v| !v.is_finite()) {
            bail!("`{key}` holds a non-finite value ({v})");
        }
        let range = -MAP_TOLERANCE..=1.0 + MAP_TOLERANCE;
        if let Some(v) = maps.iter().find(|v| !range.contains(*v)) {
            bail!("`{key}` holds {v}, outside [0, 1]: maps are normalised scores");
        }
        maps.mapv_inplace(|v| v.clamp(0.0, 1.0));
        Ok(())
    }
}

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

/// Largest expansion of a deflate stream (a 258-byte match per 2 bits, about 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Longest `.npy` header accepted: numpy writes a few hundred bytes; a bound keeps the header
/// parser's work (and recursion) small.
const MAX_NPY_HEADER: usize = 4096;

/// Array `name` of an `.npz` archive, with every size checked before it is allocated.
fn read_npz_entry<A, R>(zip: &mut zip::ZipArchive<R>, name: &str, path: &Path) -> Result<A>
where
    A: ndarray_npy::ReadNpyExt + HasElementSize,
    R: std::io::Read + std::io::Seek,
{
    use std::io::Read;
    let bad = |why: String| anyhow::anyhow!("{}: `{name}` {why}", path.display());
    let entry = match zip.by_name(&format!("{name}.npy")) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => bail!("{}: no `{name}`", path.display()),
        Err(e) => return Err(bad(format!("cannot be read: {e}"))),
    };
    let size = entry.size();
    if size > entry.compressed_size().saturating_mul(MAX_DEFLATE_RATIO).saturating_add(4096) {
        return Err(bad(format!("claims {size} bytes from {} compressed bytes", entry.compressed_size())));
    }
    let mut bytes = Vec::new();
    let n = usize::try_from(size).map_err(|_| bad(format!("claims {size} bytes")))?;
    bytes.try_reserve_exact(n).map_err(|_| bad(format!("needs {size} bytes: not enough memory")))?;
    entry.take(size + 1).read_to_end(&mut bytes).map_err(|e| bad(format!("cannot be read: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(bad(format!("holds {} bytes, not the {size} its entry declares", bytes.len())));
    }
    // The header's length field first (the parser would allocate it blindly), then the header,
    // then the data length its shape implies.
    let (start, header_len) = match (bytes.get(..8), bytes.get(8..12)) {
        (Some(m), Some(l)) if m.starts_with(b"\x93NUMPY") && m[6] == 1 => {
            (10, u16::from_le_bytes([l[0], l[1]]) as usize)
        }
        (Some(m), Some(l)) if m.starts_with(b"\x93NUMPY") && (m[6] == 2 || m[6] == 3) => {
            (12, u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        }
        _ => return Err(bad("is not an .npy array".into())),
    };
    if header_len > MAX_NPY_HEADER || start + header_len > bytes.len() {
        return Err(bad(format!("has a {header_len}-byte header")));
    }
    let depth = bytes[start..start + header_len].iter().try_fold((0i32, 0i32), |(d, max), &b| match b {
        b'(' | b'[' | b'{' => Some((d + 1, max.max(d + 1))),
        b')' | b']' | b'}' => Some((d - 1, max)),
        _ => Some((d, max)),
    });
    if depth.is_none_or(|(_, max)| max > 4) {
        return Err(bad("has a malformed header".into()));
    }
    let mut reader = &bytes[..];
    let header = ndarray_npy::npy::header::Header::from_reader(&mut reader)
        .map_err(|e| bad(format!("has a bad header: {e}")))?;
    let elements = header.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let data = reader.len() as u64;
    if elements.and_then(|e| e.checked_mul(A::ELEMENT_SIZE)) != Some(data) {
        return Err(bad(format!("has shape {:?} but {data} bytes of data", header.shape)));
    }
    A::read_npy(&bytes[..]).map_err(|e| bad(format!("cannot be read: {e}")))
}

/// Bytes per element of the arrays an archive holds.
trait HasElementSize {
    const ELEMENT_SIZE: u64;
}

impl HasElementSize for Array1<i64> {
    const ELEMENT_SIZE: u64 = 8;
}

impl HasElementSize for Array3<f32> {
    const ELEMENT_SIZE: u64 = 4;
}

/// How far outside [0, 1] a saved map value may be and still be accepted (and clamped).
pub const MAP_TOLERANCE: f32 = 1e-3;

/// `OUT/<kind>/<id>.<ext>`, for a valid id only ([`crate::datasets::validate_id`]): the path
/// is always a file directly inside `OUT/<kind>`.
pub fn output_path(out: &Path, kind: &str, id: &str, ext: &str) -> Result<PathBuf> {
    crate::datasets::validate_id(id).map_err(anyhow::Error::msg)?;
    // OUT/<kind> must be a real directory: a link planted there would send every file elsewhere.
    let dir = out.join(kind);
    crate::files::check_output_dir(&dir)?;
    Ok(dir.join(format!("{id}.{ext}")))
}
