//! How `generate --save-cams` stores maps (`--cams-dtype`, `--cams-stride`) and how readers
//! bring them back. A stride N average-pools each map over N x N blocks (blocks cut by the
//! image's edge average the pixels they hold), which keeps each block's mean and, unlike
//! picking every N-th pixel, does not alias; the maps are smooth to begin with (upsampled from
//! a 16 px patch grid, method.md §3). Readers resize them back to the original size with
//! bilinear interpolation on pixel centres, the arithmetic of PyTorch's
//! `F.interpolate(mode="bilinear", align_corners=False)` (and of OpenCV's `INTER_LINEAR` when
//! enlarging), in float32. float16 halves the bytes; maps lie in [0, 1], where float16 keeps
//! 11 significant bits (an error of at most 2.4e-4).
use anyhow::{bail, Result};
use ndarray::Array3;

/// Largest `--cams-stride`: 256x fewer pixels, and a reader never expands an archive's data by
/// more than 16² x 2 (float16 to float32), well inside the bound on deflate's own expansion.
pub const MAX_CAM_STRIDE: u32 = 16;

/// The element type of stored maps (`--cams-dtype`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CamDtype {
    /// 4 bytes a value, exact.
    #[default]
    #[value(name = "float32")]
    Float32,
    /// 2 bytes a value (IEEE half, numpy's float16), rounded to nearest.
    #[value(name = "float16")]
    Float16,
}

/// How maps are stored: element type and stride (1 = full resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CamStorage {
    pub dtype: CamDtype,
    pub stride: u32,
}

impl Default for CamStorage {
    fn default() -> Self {
        CamStorage { dtype: CamDtype::Float32, stride: 1 }
    }
}

impl CamStorage {
    /// A storage with its stride checked (1..=[`MAX_CAM_STRIDE`]).
    pub fn new(dtype: CamDtype, stride: u32) -> Result<Self> {
        check_stride(stride as i64)?;
        Ok(CamStorage { dtype, stride })
    }
}

/// A stride must be 1..=[`MAX_CAM_STRIDE`].
pub fn check_stride(stride: i64) -> Result<u32> {
    if !(1..=MAX_CAM_STRIDE as i64).contains(&stride) {
        bail!("stride {stride} is not in 1..={MAX_CAM_STRIDE}");
    }
    Ok(stride as u32)
}

/// The stored size of an `h` x `w` map at `stride`: ceil(h / stride) x ceil(w / stride).
pub fn pooled_size(h: usize, w: usize, stride: usize) -> (usize, usize) {
    (h.div_ceil(stride), w.div_ceil(stride))
}

/// Each map averaged over `stride` x `stride` blocks (those at the right and bottom edges over
/// the pixels they hold): PyTorch's `avg_pool2d(kernel_size=stride, ceil_mode=True)`.
pub fn downsample(maps: &Array3<f32>, stride: usize) -> Array3<f32> {
    let (k, h, w) = maps.dim();
    let (ph, pw) = pooled_size(h, w, stride);
    let mut out = Array3::<f32>::zeros((k, ph, pw));
    for c in 0..k {
        for by in 0..ph {
            let ys = by * stride..((by + 1) * stride).min(h);
            for bx in 0..pw {
                let xs = bx * stride..((bx + 1) * stride).min(w);
                let mut sum = 0f64;
                for y in ys.clone() {
                    for x in xs.clone() {
                        sum += maps[[c, y, x]] as f64;
                    }
                }
                out[[c, by, bx]] = (sum / (ys.len() * xs.len()) as f64) as f32;
            }
        }
    }
    out
}

/// Source index and weights of one output coordinate: PyTorch's `area_pixel_compute_source_index`
/// (align_corners=False) in float32: src = (dst + 0.5) * in / out - 0.5, clamped at 0.
fn taps(out_len: usize, in_len: usize) -> Vec<(usize, usize, f32)> {
    let scale = in_len as f32 / out_len as f32;
    (0..out_len)
        .map(|d| {
            let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(in_len - 1);
            let i1 = if i0 + 1 < in_len { i0 + 1 } else { i0 };
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// Each map resized to `h` x `w`, bilinear on pixel centres (align_corners=False).
pub fn upsample(maps: &Array3<f32>, h: usize, w: usize) -> Array3<f32> {
    let (k, ih, iw) = maps.dim();
    let (ty, tx) = (taps(h, ih), taps(w, iw));
    let mut out = Array3::<f32>::zeros((k, h, w));
    for c in 0..k {
        for (y, &(y0, y1, ly)) in ty.iter().enumerate() {
            for (x, &(x0, x1, lx)) in tx.iter().enumerate() {
                let top = (1.0 - lx) * maps[[c, y0, x0]] + lx * maps[[c, y0, x1]];
                let bottom = (1.0 - lx) * maps[[c, y1, x0]] + lx * maps[[c, y1, x1]];
                out[[c, y, x]] = (1.0 - ly) * top + ly * bottom;
            }
        }
    }
    out
}

/// float32 values as little-endian IEEE half bits (round to nearest even).
pub fn to_f16_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(|v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect()
}

/// Little-endian IEEE half values as float32 (exact).
pub fn from_f16_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect()
}
