//! The CRF's pairwise kernels with symmetric normalisation (pydensecrf `DenseKernel` with
//! NORMALIZE_SYMMETRIC), and the mean-field loop of `DenseCRF::inference` (docs/method.md §6).
//!
//! It owns the data layout (pixel-major rows of the labels padded to a multiple of 4) and the
//! order of the passes: per iteration each kernel's blur, then one pixel pass that slices,
//! updates Q and splats. The loops themselves are the safe entry points of `kernels`.

use super::eigen::softmax_rows;
use super::kernels::{blur, detect_isa, splat, update, PassKernel, SliceOrder, VertexBuf};
use super::lattice::Lattice;

pub(super) struct Kernel {
    lattice: Lattice,
    /// 1 / sqrt(K·1 + 1e-20), per pixel.
    norm: Vec<f32>,
    weight: f32,
}

impl Kernel {
    pub(super) fn new(features: &[f32], d: usize, n: usize, weight: f32) -> Kernel {
        let lattice = Lattice::new(features, d, n);
        // NORMALIZE_SYMMETRIC: norm = 1.0 / sqrt(K·1 + 1e-20), evaluated in double as in
        // pairwise.cpp, with K·1 from `seqCompute` (value_size 1).
        let norm = lattice
            .filter_scalar(&vec![1f32; n], false)
            .iter()
            .map(|&k| (1.0 / (k as f64 + 1e-20).sqrt()) as f32)
            .collect();
        Kernel { lattice, norm, weight }
    }
}

/// Mean-field loop of pydensecrf `DenseCRF::inference`, on pixel-major rows of the labels padded
/// to a multiple of 4 (one filter pass carries all labels: the blur is bound by memory, so
/// fewer, wider rows beat more, narrower ones). One or two labels are not padded: the vertex
/// rows are then half as wide or less, which matters more than alignment (3 labels in rows of
/// 3 were slower than in aligned rows of 4). Each iteration
/// blurs every kernel's splatted input, then one pass over the pixels slices the messages,
/// updates Q and splats it for the next iteration, so each pixel's vertex rows are visited
/// once per iteration.
/// None when `stop` was raised between iterations.
pub(super) fn mean_field(
    probs: &[f32],
    n: usize,
    l: usize,
    kernels: &[Kernel],
    iterations: usize,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Option<Vec<f32>> {
    let isa = detect_isa();
    let w = if l <= 2 { l } else { l.div_ceil(4) * 4 };
    // -unary = log(clip(P, 1e-5, 1)) (pydensecrf.utils.unary_from_softmax; np.clip = min(max)).
    let mut neg_unary = vec![0f32; n * w];
    for (i, row) in neg_unary.chunks_exact_mut(w).enumerate() {
        for (lab, x) in row[..l].iter_mut().enumerate() {
            let p = probs[lab * n + i];
            let p = if p > 1e-5 { p } else { 1e-5 };
            let p = if p < 1.0 { p } else { 1.0 };
            *x = p.ln();
        }
    }
    // Q0 = softmax(-unary)
    let mut q = neg_unary.clone();
    softmax_rows(&mut q, w, l);
    let order = if l <= 2 { SliceOrder::Seq } else { SliceOrder::Sse };
    let mut bufs: Vec<VertexBuf> = kernels.iter().map(|k| VertexBuf::new(k.lattice.m(), w)).collect();
    if iterations > 0 {
        let mut pass: Vec<PassKernel> = kernels
            .iter()
            .zip(bufs.iter_mut())
            .map(|(k, b)| PassKernel {
                lat: &k.lattice,
                norm: &k.norm,
                neg_w: -k.weight,
                blurred: &[],
                next: Some(b.both().0),
                zeroed: k.lattice.m(),
            })
            .collect();
        splat(isa, w, &q, &mut pass);
    }
    for it in 0..iterations {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            return None;
        }
        // Blur each kernel's input (always in buffer a at this point) in place of its pair.
        let mut pass = Vec::with_capacity(kernels.len());
        for (k, b) in kernels.iter().zip(bufs.iter_mut()) {
            let lat = &k.lattice;
            let (mut src, mut dst) = b.both();
            for j in 0..=lat.d() {
                blur(isa, w, lat, j, src, dst);
                std::mem::swap(&mut src, &mut dst);
            }
            // `src` holds the blurred values; the other buffer receives the next splat.
            let next = (it + 1 < iterations).then_some(dst);
            pass.push(PassKernel { lat, norm: &k.norm, neg_w: -k.weight, blurred: src, next, zeroed: 0 });
        }
        update(isa, w, l, order, &neg_unary, &mut q, &mut pass);
        drop(pass);
        // Keep "the input is in buffer a": swap when the blur count was odd.
        for (k, b) in kernels.iter().zip(bufs.iter_mut()) {
            if k.lattice.d() % 2 == 1 {
                std::mem::swap(&mut b.a, &mut b.b);
            }
        }
    }
    // Back to channel-major.
    let mut out = vec![0f32; l * n];
    for (i, row) in q.chunks_exact(w).enumerate() {
        for (lab, &x) in row[..l].iter().enumerate() {
            out[lab * n + i] = x;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use crate::crf::tests::TestRng;
    use crate::crf::{dense_crf, CrfParams};

    #[test]
    fn mean_field_properties() {
        let (w, h, l) = (16usize, 12usize, 3usize);
        let n = w * h;
        let mut rng = TestRng::new(11);
        let img: Vec<u8> = (0..n * 3).map(|_| (rng.next() * 255.0) as u8).collect();
        let probs: Vec<f32> = (0..n * l).map(|_| rng.next()).collect();
        let q = dense_crf(&img, w, h, &probs, l, &CrfParams::default()).unwrap();
        for i in 0..n {
            let s: f32 = (0..l).map(|c| q[c * n + i]).sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
        assert!(dense_crf(&img, w, h, &probs[1..], l, &CrfParams::default()).is_err());
    }
}
