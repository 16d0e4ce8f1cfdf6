//! Image input (docs/method.md §1): decoding to RGB, Pillow-exact bicubic resizing, CLIP
//! normalisation, and the two input geometries (CLIP-ES's patch-multiple resize and CLIP's
//! zero-shot resize + centre crop).
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::path::Path;
use tch::Tensor;

// OpenAI's published constants, digit for digit.
#[allow(clippy::excessive_precision)]
pub const MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Default pixel budget (`--max-pixels`): images whose header claims more pixels are refused
/// before decoding.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Largest `--max-pixels` accepted (2^40, a million megapixels): byte budgets derived from it
/// stay far from u64 overflow.
pub const MAX_PIXELS_LIMIT: u64 = 1 << 40;

/// Bytes per pixel the budget allows a decoder (the widest decoded layout, 32-bit float RGBA).
const MAX_DECODED_BYTES_PER_PIXEL: u64 = 16;

/// Largest image file read for a budget of `max_pixels`: no supported format needs more than
/// the widest decoded layout plus 64 MiB of headers and metadata.
pub fn max_file_bytes(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(MAX_DECODED_BYTES_PER_PIXEL).saturating_add(64 << 20)
}

/// Refuses a `width` x `height` image over the budget, naming the file.
fn check_budget(width: u64, height: u64, max_pixels: u64, path: &Path) -> Result<()> {
    if width == 0 || height == 0 {
        bail!("image {} has no pixels ({width}x{height})", path.display());
    }
    let pixels = width.saturating_mul(height);
    if pixels > max_pixels {
        bail!(
            "image {} is {width}x{height} = {:.1} megapixels, over the pixel budget of {:.1} (raise --max-pixels to allow it)",
            path.display(),
            pixels as f64 / 1e6,
            max_pixels as f64 / 1e6
        );
    }
    Ok(())
}

/// [`load_rgb_limited`] with the default pixel budget.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    load_rgb_limited(path, DEFAULT_MAX_PIXELS)
}

/// Decodes any supported image (grayscale, 16-bit, alpha, palette, CMYK JPEG) to 8-bit RGB in
/// stored pixel orientation (EXIF rotation is not applied: VOC and COCO masks are stored
/// unrotated). JPEGs go through libjpeg-turbo's decoder (mozjpeg), giving the same pixels as
/// PIL, which the reference uses; other formats and JPEGs it cannot convert (CMYK) through the
/// `image` crate.
///
/// Hostile input: only a regular file is read ([`crate::files::open_regular`]); the size in its
/// header is checked against `max_pixels` before anything is decoded, the `image` crate's
/// decoders get an allocation limit derived from the budget (a header that lies cannot make
/// them allocate more), and the large buffers are reserved fallibly, so an image that does not
/// fit fails alone with a reason instead of aborting the process.
pub fn load_rgb_limited(path: &Path, max_pixels: u64) -> Result<RgbImage> {
    let data = crate::files::read_regular(path, max_file_bytes(max_pixels))
        .with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb_limited(&data, path, max_pixels)
}

/// [`load_rgb_limited`] on bytes already read; `path` only names the image in errors.
pub fn decode_rgb_limited(data: &[u8], path: &Path, max_pixels: u64) -> Result<RgbImage> {
    if data.is_empty() {
        bail!("image {} is empty (0 bytes)", path.display());
    }
    if data.starts_with(&[0xFF, 0xD8]) {
        if let Some(img) = decode_jpeg_libjpeg(data, path, max_pixels)? {
            return Ok(img);
        }
    }
    // PNG's size sits at a fixed offset: checked before the decoder sizes its row buffers.
    if let (Some(b"\x89PNG\r\n\x1a\n"), Some(b"IHDR"), Some(wh)) = (data.get(..8), data.get(12..16), data.get(16..24)) {
        let (w, h) =
            (u32::from_be_bytes([wh[0], wh[1], wh[2], wh[3]]), u32::from_be_bytes([wh[4], wh[5], wh[6], wh[7]]));
        check_budget(w as u64, h as u64, max_pixels, path)?;
    }
    check_tiff_entries(data, path)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let mut limits = image::Limits::default();
    // Header parsing gets at least 64 MiB (PNG text chunks, ICC profiles): the budget error
    // below should name the size, not a parser's limit. The image buffer is checked after.
    limits.max_alloc = Some(max_pixels.saturating_mul(MAX_DECODED_BYTES_PER_PIXEL).max(64 << 20));
    reader.limits(limits.clone());
    limits.max_alloc = Some(max_pixels.saturating_mul(MAX_DECODED_BYTES_PER_PIXEL));
    let mut decoder = reader.into_decoder().with_context(|| format!("cannot decode image {}", path.display()))?;
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    check_budget(w as u64, h as u64, max_pixels, path)?;
    let total = image::ImageDecoder::total_bytes(&decoder);
    limits.reserve(total).with_context(|| format!("cannot decode image {}: over the memory budget", path.display()))?;
    image::ImageDecoder::set_limits(&mut decoder, limits)
        .with_context(|| format!("cannot decode image {}: over the memory budget", path.display()))?;
    // The decoded buffer, then the RGB copy.
    crate::files::probe_alloc(total.saturating_add(w as u64 * h as u64 * 3), &format!("image {}", path.display()))?;
    let img = image::DynamicImage::from_decoder(decoder)
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    Ok(img.into_rgb8())
}

/// A TIFF directory entry's values lie in the file, so an entry claiming more bytes than the
/// file holds is corrupt. Checked before the decoder runs: the tiff decoder sizes its value
/// vectors from the claimed count (8 M values of a 3 KB file took 256 MiB, found by the fuzz
/// test), not from the file. Follows at most 64 directories; other formats pass.
fn check_tiff_entries(data: &[u8], path: &Path) -> Result<()> {
    let le = match data.get(..4) {
        Some(b"II*\0") => true,
        Some(b"MM\0*") => false,
        _ => return Ok(()),
    };
    let u16_at = |o: usize| {
        data.get(o..o + 2).map(|b| if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) })
    };
    let u32_at = |o: usize| {
        data.get(o..o + 4).map(|b| {
            let b = [b[0], b[1], b[2], b[3]];
            if le {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }
        })
    };
    let mut ifd = u32_at(4).unwrap_or(0) as usize;
    for _ in 0..64 {
        if ifd == 0 {
            break;
        }
        let Some(n) = u16_at(ifd) else { break };
        for i in 0..n as usize {
            let e = ifd + 2 + 12 * i;
            let (Some(typ), Some(count)) = (u16_at(e + 2), u32_at(e + 4)) else { break };
            let size: u64 = match typ {
                3 | 8 => 2,
                4 | 9 | 11 | 13 => 4,
                5 | 10 | 12 | 16 | 17 | 18 => 8,
                _ => 1,
            };
            if count as u64 * size > data.len() as u64 {
                bail!(
                    "cannot decode image {}: corrupt TIFF (an entry claims {} values in a {}-byte file)",
                    path.display(),
                    count,
                    data.len()
                );
            }
        }
        ifd = u32_at(ifd + 2 + 12 * n as usize).unwrap_or(0) as usize;
    }
    Ok(())
}

/// libjpeg-turbo decoding with libjpeg's defaults (ISLOW IDCT, fancy upsampling), as PIL does.
/// Ok(None) for colour spaces it does not convert to RGB (CMYK/YCCK): the caller falls back.
/// The header's size is checked against `max_pixels` before decoding starts.
fn decode_jpeg_libjpeg(data: &[u8], path: &Path, max_pixels: u64) -> Result<Option<RgbImage>> {
    // libjpeg fills a truncated file with grey and only warns; PIL refuses it, so do we.
    let end = data.iter().rposition(|&b| b != 0).unwrap_or(0);
    if end < 1 || data[end - 1..=end] != [0xFF, 0xD9] {
        bail!("image {} is truncated (JPEG without end marker)", path.display());
    }
    let result = std::panic::catch_unwind(|| -> Result<Option<(usize, usize, Vec<u8>)>> {
        let d = mozjpeg::Decompress::new_mem(data)?;
        check_budget(d.width() as u64, d.height() as u64, max_pixels, path)?;
        if matches!(d.color_space(), mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK) {
            return Ok(None);
        }
        let mut started = d.rgb()?;
        let (w, h) = (started.width(), started.height());
        // Reserves its buffer fallibly: out of memory is an error, not an abort.
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        Ok(Some((w, h, pixels)))
    });
    match result {
        Ok(Ok(Some((w, h, raw)))) => RgbImage::from_raw(w as u32, h as u32, raw)
            .map(Some)
            .with_context(|| format!("cannot decode image {}: short pixel data", path.display())),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) if e.downcast_ref::<std::io::Error>().is_some() => {
            bail!("cannot decode image {}: {e}", path.display())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("cannot decode image {}: corrupt JPEG data", path.display()),
    }
}

// Pillow's fixed-point resampling (libImaging/Resample.c): coefficients in double, rounded to
// 22-bit fixed point, one horizontal then one vertical pass, each clipped to u8. Reproducing it
// exactly keeps the model input bit-identical to the reference's PIL-based preprocessing.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Per output index: first input index and fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> (Vec<usize>, Vec<Vec<i32>>) {
    let support_unit = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support_unit * filterscale;
    let mut starts = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            for v in &mut k {
                *v /= ww;
            }
        }
        let fixed = k
            .iter()
            .map(|&v| {
                let s = v * (1u32 << PRECISION_BITS) as f64;
                if v < 0.0 {
                    (-0.5 + s) as i32
                } else {
                    (0.5 + s) as i32
                }
            })
            .collect();
        starts.push(xmin);
        weights.push(fixed);
    }
    (starts, weights)
}

#[inline]
fn clip8(v: i64) -> u8 {
    let v = v >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

/// Bicubic resize identical to Pillow's `Image.resize((w, h), BICUBIC)` for RGB images.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    let src = img.as_raw();
    let round = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width does not change, as Pillow does).
    let horiz: Vec<u8> = if ow != iw {
        let (starts, weights) = coefficients(iw, ow);
        let mut out = vec![0u8; ow * ih * 3];
        for y in 0..ih {
            let row = &src[y * iw * 3..(y + 1) * iw * 3];
            let orow = &mut out[y * ow * 3..(y + 1) * ow * 3];
            for x in 0..ow {
                let (s, k) = (starts[x], &weights[x]);
                let mut acc = [round; 3];
                for (i, &w) in k.iter().enumerate() {
                    let p = &row[(s + i) * 3..(s + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i64 * w as i64;
                    }
                }
                for c in 0..3 {
                    orow[x * 3 + c] = clip8(acc[c]);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    // Vertical pass.
    let data = if oh != ih {
        let (starts, weights) = coefficients(ih, oh);
        let mut out = vec![0u8; ow * oh * 3];
        let stride = ow * 3;
        for y in 0..oh {
            let (s, k) = (starts[y], &weights[y]);
            let orow = &mut out[y * stride..(y + 1) * stride];
            for (x, o) in orow.iter_mut().enumerate() {
                let mut acc = round;
                for (i, &w) in k.iter().enumerate() {
                    acc += horiz[(s + i) * stride + x] as i64 * w as i64;
                }
                *o = clip8(acc);
            }
        }
        out
    } else {
        horiz
    };
    RgbImage::from_raw(width, height, data).expect("buffer size matches")
}

/// (1, 3, H, W) float tensor: /255 then CLIP mean/std, in f32 as torchvision does.
pub fn to_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planar = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            planar[c * w * h + i] = (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Tensor::from_slice(&planar).reshape([1, 3, h as i64, w as i64])
}

/// Model input size for CLIP-ES (docs/method.md §1): each side rounded up to a multiple of the
/// patch. `max_side` first caps the longer side (aspect ratio kept) for very large images.
pub fn clipes_size(width: u32, height: u32, patch: u32, max_side: Option<u32>) -> (u32, u32) {
    let (mut w, mut h) = (width as f64, height as f64);
    if let Some(m) = max_side {
        let long = w.max(h);
        if long > m as f64 {
            let s = m as f64 / long;
            w = (w * s).round().max(1.0);
            h = (h * s).round().max(1.0);
        }
    }
    let up = |v: f64| ((v / patch as f64).ceil() as u32).max(1) * patch;
    (up(w), up(h))
}

/// CLIP's zero-shot preprocessing: bicubic resize of the shorter side to `res` (torchvision's
/// rounding), then a centre crop of res x res.
pub fn zero_shot_crop(img: &RgbImage, res: u32) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let (nw, nh) = if w <= h {
        (res, (res as f64 * h as f64 / w as f64) as u32)
    } else {
        ((res as f64 * w as f64 / h as f64) as u32, res)
    };
    let resized = if (nw, nh) == (w, h) { img.clone() } else { resize_bicubic(img, nw, nh) };
    // torchvision: int(round((size - crop) / 2)), Python's round half to even.
    let top = ((nh - res) as f64 / 2.0).round_ties_even() as u32;
    let left = ((nw - res) as f64 / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(&resized, left, top, res, res).to_image()
}

/// The model-side input of an image: the resized, normalised tensor and its grid.
pub struct Prepared {
    pub input: Tensor,
    pub gh: i64,
    pub gw: i64,
    /// Size of the original image (maps are returned at this size).
    pub width: i64,
    pub height: i64,
    /// The input is the mirror image: its maps are flipped back.
    pub flipped: bool,
}

/// docs/method.md §1: resize to patch multiples (Pillow bicubic), normalise.
pub fn prepare(img: &RgbImage, patch: i64, max_side: Option<u32>) -> Prepared {
    let (w, h) = (img.width(), img.height());
    let (iw, ih) = clipes_size(w, h, patch as u32, max_side);
    prepare_at(img, patch, iw, ih, false)
}

/// [`prepare`] at a given input size, optionally mirrored (test-time augmentation).
pub fn prepare_at(img: &RgbImage, patch: i64, iw: u32, ih: u32, flipped: bool) -> Prepared {
    let (w, h) = (img.width(), img.height());
    let input = if (iw, ih) == (w, h) { to_tensor(img) } else { to_tensor(&resize_bicubic(img, iw, ih)) };
    let input = if flipped { input.flip([3]) } else { input };
    Prepared { input, gh: ih as i64 / patch, gw: iw as i64 / patch, width: w as i64, height: h as i64, flipped }
}
