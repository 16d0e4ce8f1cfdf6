//! The dense CRF from tensor operations (docs/method.md §6, "The CRF as tensors"): the same
//! algorithm as the CPU CRF of this module's parent (unary, Gaussian and bilateral Potts kernels
//! on a permutohedral lattice, symmetric normalisation, mean field), written with tch so that one
//! code runs on CUDA and, for the tests and `--crf-device tensor-cpu`, on the CPU.
//!
//! Every label of a pixel is one row: splat, blur, slice and the softmax are each one tensor
//! operation for all labels. The lattice is built once per kernel (`lattice`); its vertex count
//! is the only value that comes back to the host before the marginals. Mean-field iterations
//! enqueue work without waiting for it, and check the stop flag between iterations.
//!
//! What differs from the CPU CRF is the order of floating-point sums: the splat's `index_add`
//! (atomic, in any order, on CUDA), and torch's `exp`, `log` and row sums instead of Eigen's
//! polynomial and reduction order. Keys, weights, neighbours and the other operations are the
//! CPU CRF's, in its order of operations.

mod lattice;

use super::{Cancelled, CrfParams};
use anyhow::{ensure, Result};
use lattice::{Order, TensorLattice};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// Where the tensor CRF runs, and the flag that stops it between iterations.
#[derive(Clone, Copy)]
pub struct TensorRun<'a> {
    pub device: Device,
    /// Raised by a signal: inference fails with [`Cancelled`] before the next iteration.
    pub stop: Option<&'a AtomicBool>,
}

/// One pairwise kernel: its lattice, 1 / sqrt(K·1 + 1e-20) per pixel (n x 1) and its weight.
struct Kernel {
    lattice: TensorLattice,
    norm: Tensor,
    weight: f32,
}

impl Kernel {
    fn new(features: &Tensor, d: usize, weight: f32) -> Result<Kernel> {
        let lattice = TensorLattice::new(features, d)?;
        let n = features.size()[0];
        // NORMALIZE_SYMMETRIC with K·1 from a one-value filter (pydensecrf's `seqCompute`),
        // the reciprocal square root in double as in pairwise.cpp.
        let ones = Tensor::ones([n, 1], (Kind::Float, features.device()));
        let k1 = lattice.filter(&ones, Order::Seq).to_kind(Kind::Double);
        let norm = ((k1 + 1e-20).sqrt().reciprocal()).to_kind(Kind::Float);
        Ok(Kernel { lattice, norm, weight })
    }
}

/// A tensor on `device` holding `v` (a divisor that is not a CPU scalar: torch may multiply by
/// the reciprocal of a scalar divisor, and the CPU CRF divides).
fn divisor(v: f32, device: Device) -> Tensor {
    Tensor::from_slice(&[v]).to_device(device)
}

/// Gaussian features (x / sxy, y / sxy), n x 2, pixel-major, divided in f32 as the C++ does.
fn gaussian_features(width: usize, height: usize, sxy: f32, device: Device) -> Tensor {
    let opts = (Kind::Float, device);
    let (w, h) = (width as i64, height as i64);
    let s = divisor(sxy, device);
    let x = (Tensor::arange(w, opts) / &s).unsqueeze(0).expand([h, w], false);
    let y = (Tensor::arange(h, opts) / &s).unsqueeze(1).expand([h, w], false);
    Tensor::stack(&[x, y], 2).reshape([h * w, 2])
}

/// Bilateral features (x / sxy, y / sxy, c0 / srgb, c1 / srgb, c2 / srgb), n x 5.
fn bilateral_features(image: &Tensor, width: usize, height: usize, sxy: f32, srgb: f32) -> Tensor {
    let dev = image.device();
    let xy = gaussian_features(width, height, sxy, dev);
    let c = image.to_kind(Kind::Float) / divisor(srgb, dev);
    Tensor::cat(&[xy, c], 1)
}

/// pydensecrf's `expAndNormalize` on rows: subtract the row maximum, exp, divide by the sum.
fn softmax_rows(x: &Tensor) -> Tensor {
    let e = (x - x.amax([1], true)).exp();
    let s = e.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
    e / s
}

/// Mean-field inference as tensors, on `run.device`. `image`: H*W*3 u8 (already converted by
/// [`super::crf_image`]); `probs`: C*H*W f32 (channel-major), as [`super::dense_crf`].
/// Returns the marginals Q as an (H*W) x C f32 tensor on the device (pixel-major: use
/// [`channel_major`] for the CPU CRF's layout, [`labels_from_marginals`] for labels).
///
/// Fails with [`Cancelled`] when `run.stop` is raised between iterations; libtorch errors (a
/// device out of memory) are errors, not panics.
pub fn dense_crf(
    image: &[u8],
    width: usize,
    height: usize,
    probs: &[f32],
    n_labels: usize,
    params: &CrfParams,
    run: TensorRun,
) -> Result<Tensor> {
    params.validate()?;
    let n = width * height;
    ensure!(n > 0, "dense_crf: empty image ({width}x{height})");
    ensure!(n_labels > 0, "dense_crf: no labels");
    ensure!(image.len() == n * 3, "dense_crf: image has {} bytes, expected {height}x{width}x3", image.len());
    ensure!(
        probs.len() == n * n_labels,
        "dense_crf: probs has {} values, expected {n_labels} labels x {n} pixels",
        probs.len()
    );
    ensure!(n < (u32::MAX as usize) / 8, "dense_crf: image too large");
    let body = || tch::no_grad(|| inference(image, width, height, probs, n_labels, params, run));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(p) => anyhow::bail!("tensor CRF: {}", crate::errors::panic_message(p.as_ref())),
    }
}

fn inference(
    image: &[u8],
    width: usize,
    height: usize,
    probs: &[f32],
    l: usize,
    params: &CrfParams,
    run: TensorRun,
) -> Result<Tensor> {
    let dev = run.device;
    let n = (width * height) as i64;
    let mut kernels = Vec::new();
    if params.gaussian_weight != 0.0 {
        let f = gaussian_features(width, height, params.gaussian_sxy, dev);
        kernels.push(Kernel::new(&f, 2, params.gaussian_weight)?);
    }
    if params.bilateral_weight != 0.0 {
        let img = Tensor::from_slice(image).to_device(dev).view([n, 3]);
        let f = bilateral_features(&img, width, height, params.bilateral_sxy, params.bilateral_srgb);
        kernels.push(Kernel::new(&f, 5, params.bilateral_weight)?);
    }
    // -unary = log(clip(P, 1e-5, 1)) (np.clip = min(max), NaN -> 1e-5 as the CPU CRF).
    let p = Tensor::from_slice(probs).to_device(dev).view([l as i64, n]).transpose(0, 1).contiguous();
    let p = p.where_scalarother(&p.gt(1e-5f32 as f64), 1e-5f32 as f64);
    let p = p.where_scalarother(&p.lt(1.0), 1.0);
    let neg_unary = p.log();
    let mut q = softmax_rows(&neg_unary);
    // pydensecrf's scalar path for 1 or 2 values per pixel, its SSE path for more.
    let order = if l <= 2 { Order::Seq } else { Order::Sse };
    for _ in 0..params.iterations {
        if run.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(Cancelled.into());
        }
        // tmp = -unary - Σ_k (-w_k) norm_k ⊙ K_k(norm_k ⊙ Q) (Potts: -w times the message).
        let mut tmp = neg_unary.copy(); // updated in place below
        for k in &kernels {
            let message = k.lattice.filter(&(&q * &k.norm), order);
            tmp -= (message * &k.norm) * (-k.weight) as f64;
        }
        q = softmax_rows(&tmp);
    }
    Ok(q)
}

/// The marginals of [`dense_crf`] in the CPU CRF's layout: C*H*W f32 on the host.
pub fn channel_major(q: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(q.transpose(0, 1).contiguous().to_device(Device::Cpu).view([-1]))?)
}

/// [`super::labels_from_marginals`] on the marginals' device: argmax per pixel (first maximum on
/// ties) mapped through `ids`, 255 where the maximum is below `confidence`; and the maximum per
/// pixel. Only these H*W bytes and floats come back to the host.
pub fn labels_from_marginals(q: &Tensor, ids: &[u8], confidence: f32) -> Result<(Vec<u8>, Vec<f32>)> {
    let l = q.size()[1] as usize;
    ensure!(ids.len() >= l, "labels_from_marginals: {} ids for {l} labels", ids.len());
    let dev = q.device();
    let arg = q.argmax(1, false);
    let best = q.gather(1, &arg.unsqueeze(1), false).squeeze_dim(1);
    let lut = Tensor::from_slice(&ids[..l]).to_device(dev);
    let labels = lut.index_select(0, &arg).masked_fill(&best.lt(confidence as f64), 255);
    let labels = Vec::<u8>::try_from(labels.to_device(Device::Cpu))?;
    let best = Vec::<f32>::try_from(best.to_device(Device::Cpu))?;
    Ok((labels, best))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crf::tests::TestRng;

    fn cpu_run() -> TensorRun<'static> {
        TensorRun { device: Device::Cpu, stop: None }
    }

    /// Against the CPU CRF (itself checked against pydensecrf in tests/it/crf_parity.rs):
    /// every kernel choice, 1, 2, 3 and 5 labels, sizes that are and are not multiples of 4.
    #[test]
    fn marginals_match_the_cpu_crf() {
        let mut rng = TestRng::new(3);
        for (w, h, l) in [(16usize, 12usize, 3usize), (23, 17, 2), (31, 9, 5), (10, 7, 1)] {
            let n = w * h;
            let img: Vec<u8> = (0..n * 3).map(|_| (rng.next() * 255.0) as u8).collect();
            let probs: Vec<f32> = (0..n * l).map(|_| rng.next()).collect();
            for (gw, bw) in [(3.0, 4.0), (3.0, 0.0), (0.0, 4.0), (0.0, 0.0)] {
                let params = CrfParams { gaussian_weight: gw, bilateral_weight: bw, ..CrfParams::default() };
                let want = crate::crf::dense_crf(&img, w, h, &probs, l, &params).unwrap();
                let q = dense_crf(&img, w, h, &probs, l, &params, cpu_run()).unwrap();
                let got = channel_major(&q).unwrap();
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // exp, log and the sums round differently: a few ulp, grown by 10 iterations.
                assert!(d < 1e-4, "{w}x{h}, {l} labels, weights {gw}/{bw}: max |dQ| {d}");
                // Labels and confidence as the host's rule gives them on the same marginals.
                let ids: Vec<u8> = (0..l as u8).map(|c| c * 3).collect();
                let (lab, conf) = labels_from_marginals(&q, &ids, 0.6).unwrap();
                assert_eq!((lab, conf), crate::crf::labels_from_marginals(&got, l, &ids, 0.6));
            }
        }
    }

    #[test]
    fn stop_flag_cancels_and_bad_input_is_an_error() {
        let (w, h, l) = (8usize, 8usize, 2usize);
        let img = vec![7u8; w * h * 3];
        let probs = vec![0.5f32; w * h * l];
        let stop = AtomicBool::new(true);
        let run = TensorRun { device: Device::Cpu, stop: Some(&stop) };
        let e = dense_crf(&img, w, h, &probs, l, &CrfParams::default(), run).unwrap_err();
        assert!(e.downcast_ref::<Cancelled>().is_some(), "{e}");
        assert!(dense_crf(&img, w, h, &probs[1..], l, &CrfParams::default(), cpu_run()).is_err());
        let bad = CrfParams { bilateral_srgb: 0.0, ..CrfParams::default() };
        assert!(dense_crf(&img, w, h, &probs, l, &bad, cpu_run()).is_err());
    }
}
