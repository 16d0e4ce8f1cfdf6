//! Label maps from class maps (docs/method.md §6): the background-threshold argmax, and the
//! dense CRF with its confidence threshold.
use anyhow::{Context, Result};
use image::RgbImage;
use ndarray::Array3;

/// Label map from an image's class maps: `bg = (1 - max_k cams_k)^alpha`, argmax over
/// `[bg; cams_1..cams_K]` (the first maximum wins ties, as `np.argmax`), channel 0 -> label 0,
/// channel k -> `keys[k-1] + 1`. `cams` is K x H x W; the result is H*W labels, row-major.
/// With no channels every pixel is background. Maps are expected finite (a NaN never wins).
///
/// `alpha` 1 and 2 are computed as `x` and `x * x`, bit-identical to NumPy's `x ** 1.0` and
/// `x ** 2.0`, so that a NumPy re-implementation gives the same labels.
///
/// # Panics
/// If `keys.len()` is not K or a key is outside `0..=253`: callers validate archives first.
pub fn label_map_from_cams(cams: &Array3<f32>, keys: &[i64], alpha: f32) -> Vec<u8> {
    let (k, h, w) = cams.dim();
    assert_eq!(keys.len(), k, "label_map_from_cams: {} keys for {} maps", keys.len(), k);
    let lut = label_ids(keys).unwrap_or_else(|e| panic!("label_map_from_cams: {e}"));
    let npix = h * w;
    if k == 0 || npix == 0 {
        return vec![0; npix];
    }
    let data = cams.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let mut best = vec![f32::NEG_INFINITY; npix];
    for ch in data.chunks_exact(npix) {
        for (m, &v) in best.iter_mut().zip(ch) {
            if v > *m {
                *m = v;
            }
        }
    }
    for b in best.iter_mut() {
        let x = 1.0 - *b;
        *b = if alpha == 1.0 {
            x
        } else if alpha == 2.0 {
            x * x
        } else {
            x.powf(alpha)
        };
    }
    let mut labels = vec![0u8; npix];
    // Channel by channel with a strict `>`: the earliest channel keeps a tie.
    for (ch, &label) in data.chunks_exact(npix).zip(&lut) {
        for ((b, l), &v) in best.iter_mut().zip(labels.iter_mut()).zip(ch) {
            if v > *b {
                *b = v;
                *l = label;
            }
        }
    }
    labels
}

/// Dense CRF and confidence step (docs/method.md §6).
#[derive(Debug, Clone)]
pub struct CrfOptions {
    pub params: crate::crf::CrfParams,
    pub image: crate::crf::CrfImage,
    /// Which CRF runs, and where (`--crf-device`).
    pub backend: crate::crf::CrfBackend,
    /// Pixels whose largest marginal is below this become 255 (ignore).
    pub confidence: f32,
    /// Also write OUT/confidence/<id>.npy (largest marginal per pixel, float32 H x W).
    pub save_confidence: bool,
    /// Raised by a signal: the CRF stops between iterations ([`crate::crf::Cancelled`]).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Pseudo-labels from the CRF: P = [(1 - max_c M_c)^alpha; M_1..M_K] (alpha = 1 in CLIP-ES),
/// marginals Q (the CPU CRF or the tensor CRF, `crf.backend`), argmax with ids [0, key_1 + 1,
/// ...], 255 where max Q < confidence. Returns the labels and the largest marginal per pixel.
pub fn crf_label_map(
    img: &RgbImage,
    maps: &Array3<f32>,
    keys: &[i64],
    alpha: f32,
    crf: &CrfOptions,
) -> Result<(Vec<u8>, Vec<f32>)> {
    let (k, h, w) = maps.dim();
    let n = h * w;
    let mut probs = vec![0f32; (k + 1) * n];
    let flat = maps.as_standard_layout();
    let flat = flat.as_slice().context("maps are contiguous")?;
    for i in 0..n {
        let mx = (0..k).map(|c| flat[c * n + i]).fold(f32::NEG_INFINITY, f32::max);
        probs[i] = (1.0 - mx).powf(alpha);
    }
    probs[n..].copy_from_slice(flat);
    let image = crate::crf::crf_image(img.as_raw(), crf.image);
    let mut ids = vec![0u8];
    ids.extend(label_ids(keys)?);
    let stop = crf.stop.as_deref();
    match crf.backend {
        crate::crf::CrfBackend::Cpu => {
            let q = crate::crf::dense_crf_cancellable(&image, w, h, &probs, k + 1, &crf.params, stop)?;
            Ok(crate::crf::labels_from_marginals(&q, k + 1, &ids, crf.confidence))
        }
        crate::crf::CrfBackend::Tensor(device) => {
            let run = crate::crf::tensor::TensorRun { device, stop };
            let q = crate::crf::tensor::dense_crf(&image, w, h, &probs, k + 1, &crf.params, run)?;
            crate::crf::tensor::labels_from_marginals(&q, &ids, crf.confidence)
        }
    }
}

/// Label PNG values of 0-based class keys: key + 1 (0 is background, 255 ignore).
fn label_ids(keys: &[i64]) -> Result<Vec<u8>> {
    keys.iter()
        .map(|&key| match u8::try_from(key + 1) {
            Ok(v) if v != 255 && key >= 0 => Ok(v),
            _ => anyhow::bail!("class key {key} outside 0..=253"),
        })
        .collect()
}

/// [`label_map_from_cams`] on the maps' device, for a run that needs only the label map: the same
/// rule (`bg = (1 - max_k M_k)^alpha`, first maximum wins, keys + 1), computed where the maps
/// are so that only H*W bytes cross to the host. `refined`: (K, H, W) fp32.
pub fn label_map_on_device(refined: &tch::Tensor, keys: &[i64], alpha: f32) -> Result<Vec<u8>> {
    use tch::{Kind, Tensor};
    let size = refined.size();
    let (k, h, w) = (size[0], size[1], size[2]);
    if k == 0 {
        return Ok(vec![0; (h * w) as usize]);
    }
    let x: Tensor = 1.0 - refined.amax([0], true);
    // alpha 1 and 2 as `x` and `x * x`, like label_map_from_cams (bit-identical to NumPy).
    let bg = if alpha == 1.0 {
        x
    } else if alpha == 2.0 {
        &x * &x
    } else {
        x.pow_tensor_scalar(alpha as f64)
    };
    let scores = Tensor::cat(&[bg, refined.shallow_clone()], 0);
    // argmax returns the first maximum, as np.argmax and label_map_from_cams.
    let idx = scores.argmax(0, false);
    let mut lut = vec![0u8];
    lut.extend(label_ids(keys)?);
    let lut = Tensor::from_slice(&lut).to_device(refined.device());
    let labels = lut.index_select(0, &idx.reshape([-1])).to_kind(Kind::Uint8);
    Ok(Vec::<u8>::try_from(labels.to_device(tch::Device::Cpu))?)
}
