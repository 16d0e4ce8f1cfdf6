//! The CRF's pairwise kernels (pydensecrf `DenseKernel` with its normalisations, and the label
//! compatibility of its `PairwisePotential`), and the mean-field loop of `DenseCRF::inference`
//! (docs/method.md §6), shared by the CLIP-ES entry point and the general engine.
//!
//! It owns the data layout (pixel-major rows of the labels padded to a multiple of 4) and the
//! order of the passes: per iteration each kernel's blur, then one pixel pass that slices,
//! updates Q and splats. The loops themselves are the safe entry points of `kernels`.

use super::compat::{symmetrise, PassCompat};
use super::eigen::softmax_rows;
use super::general::{Compat, Normalization};
use super::kernels::{blur, detect_isa, splat, update, Capture, PassKernel, SliceOrder, VertexBuf};
use super::lattice::Lattice;

/// A kernel's label compatibility as stored: Potts holds -w, Matrix the symmetrised matrix.
enum KernelCompat {
    Potts(f32),
    Diagonal(Vec<f32>),
    Matrix(Vec<f32>),
}

/// A pairwise term (pydensecrf `PairwisePotential` with a `DenseKernel`): its lattice, its
/// normalisation and its label compatibility. The kernel type (CONST/DIAG/FULL) is not here:
/// it only chooses which parameters a learner may change, and they start as the identity.
pub(super) struct Kernel {
    lattice: Lattice,
    /// Per pixel, 1 / sqrt(K·1 + 1e-20) (symmetric) or 1 / (K·1 + 1e-20) (before / after);
    /// empty without normalisation.
    norm: Vec<f32>,
    /// All ones, for the side(s) of the filter that `normalization` leaves alone.
    ones: Vec<f32>,
    normalization: Normalization,
    compat: KernelCompat,
}

impl Kernel {
    /// `features`: n x d, pixel-major. A `Compat::Matrix` must be l x l (checked by callers).
    pub(super) fn new(features: &[f32], d: usize, n: usize, compat: Compat, normalization: Normalization) -> Kernel {
        let lattice = Lattice::new(features, d, n);
        // DenseKernel::initLattice: K·1 from `seqCompute` (value_size 1), then the factor in
        // double as in pairwise.cpp. NO_NORMALIZATION computes a mean there that `filter`
        // never reads, so it is skipped.
        let k1 = || lattice.filter_scalar(&vec![1f32; n], false);
        let norm: Vec<f32> = match normalization {
            Normalization::None => Vec::new(),
            Normalization::Symmetric => k1().iter().map(|&k| (1.0 / (k as f64 + 1e-20).sqrt()) as f32).collect(),
            Normalization::Before | Normalization::After => {
                k1().iter().map(|&k| (1.0 / (k as f64 + 1e-20)) as f32).collect()
            }
        };
        let ones = if normalization == Normalization::Symmetric { Vec::new() } else { vec![1f32; n] };
        let compat = match compat {
            Compat::Potts(w) => KernelCompat::Potts(-w),
            Compat::Diagonal(w) => KernelCompat::Diagonal(w),
            Compat::Matrix { labels, w } => KernelCompat::Matrix(symmetrise(&w, labels)),
        };
        Kernel { lattice, norm, ones, normalization, compat }
    }

    /// `DenseKernel::filter` (not transposed): the factor before the lattice filter.
    fn pre(&self) -> &[f32] {
        match self.normalization {
            Normalization::Symmetric | Normalization::Before => &self.norm,
            Normalization::None | Normalization::After => &self.ones,
        }
    }

    /// The factor after the lattice filter.
    fn post(&self) -> &[f32] {
        match self.normalization {
            Normalization::Symmetric | Normalization::After => &self.norm,
            Normalization::None | Normalization::Before => &self.ones,
        }
    }

    /// -w for a Potts kernel (0 otherwise: the Potts-only loop never runs then).
    fn neg_w(&self) -> f32 {
        match self.compat {
            KernelCompat::Potts(neg_w) => neg_w,
            _ => 0.0,
        }
    }

    fn pass_compat(&self) -> PassCompat<'_> {
        match &self.compat {
            KernelCompat::Potts(neg_w) => PassCompat::Potts(*neg_w),
            KernelCompat::Diagonal(w) => PassCompat::Diagonal(w),
            KernelCompat::Matrix(w) => PassCompat::Matrix(w),
        }
    }
}

/// Width of a pixel's row for l labels: padded to a multiple of 4 (one filter pass carries
/// all labels: the blur is bound by memory, so fewer, wider rows beat more, narrower ones).
/// One or two labels are not padded: the vertex rows are then half as wide or less, which
/// matters more than alignment (3 labels in rows of 3 were slower than in aligned rows of 4).
pub(super) fn row_width(l: usize) -> usize {
    if l <= 2 {
        l
    } else {
        l.div_ceil(4) * 4
    }
}

/// Label-major l x n values, mapped through `f`, as pixel-major rows of `row_width(l)`
/// (padding lanes 0).
pub(super) fn to_rows(x: &[f32], n: usize, l: usize, f: impl Fn(f32) -> f32) -> Vec<f32> {
    let w = row_width(l);
    let mut rows = vec![0f32; n * w];
    for (i, row) in rows.chunks_exact_mut(w).enumerate() {
        for (lab, v) in row[..l].iter_mut().enumerate() {
            *v = f(x[lab * n + i]);
        }
    }
    rows
}

/// Back from rows of `row_width(l)` to label-major l x n.
pub(super) fn from_rows(rows: &[f32], n: usize, l: usize) -> Vec<f32> {
    let mut out = vec![0f32; l * n];
    for (i, row) in rows.chunks_exact(row_width(l)).enumerate().take(n) {
        for (lab, &x) in row[..l].iter().enumerate() {
            out[lab * n + i] = x;
        }
    }
    out
}

/// -unary = log(clip(P, 1e-5, 1)) (pydensecrf.utils.unary_from_softmax; np.clip = min(max)),
/// as rows, from label-major probabilities.
pub(super) fn neg_unary_from_probs(probs: &[f32], n: usize, l: usize) -> Vec<f32> {
    to_rows(probs, n, l, |p| {
        let p = if p > 1e-5 { p } else { 1e-5 };
        let p = if p < 1.0 { p } else { 1.0 };
        p.ln()
    })
}

/// Q0 = softmax(-unary) (pydensecrf `expAndNormalize(Q, -unary)`), as rows.
pub(super) fn initial_q(neg_unary: &[f32], l: usize) -> Vec<f32> {
    let mut q = neg_unary.to_vec();
    softmax_rows(&mut q, row_width(l), l);
    q
}

/// Mean-field loop of pydensecrf `DenseCRF::inference`, from Q = `q` (rows of `row_width(l)`),
/// with -unary as rows. Each iteration blurs every kernel's splatted input, then one pass
/// over the pixels slices the messages, updates Q and splats it for the next iteration, so
/// each pixel's vertex rows are visited once per iteration. Starting from a given Q makes one
/// call with n iterations the same, number for number, as n calls with one (the splat of Q
/// is the same whether fused with the update or not). `capture` receives the last
/// iteration's tmp1 and tmp2. None when `stop` was raised between iterations.
pub(super) fn mean_field(
    neg_unary: &[f32],
    mut q: Vec<f32>,
    l: usize,
    kernels: &[Kernel],
    iterations: usize,
    stop: Option<&std::sync::atomic::AtomicBool>,
    mut capture: Option<Capture>,
) -> Option<Vec<f32>> {
    let isa = detect_isa();
    let w = row_width(l);
    assert!(q.len() == neg_unary.len() && q.len().is_multiple_of(w));
    let order = if l <= 2 { SliceOrder::Seq } else { SliceOrder::Sse };
    let mut bufs: Vec<VertexBuf> = kernels.iter().map(|k| VertexBuf::new(k.lattice.m(), w)).collect();
    if iterations > 0 {
        let mut pass: Vec<PassKernel> = kernels
            .iter()
            .zip(bufs.iter_mut())
            .map(|(k, b)| PassKernel {
                lat: &k.lattice,
                pre: k.pre(),
                post: k.post(),
                compat: k.pass_compat(),
                neg_w: k.neg_w(),
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
            pass.push(PassKernel {
                lat,
                pre: k.pre(),
                post: k.post(),
                compat: k.pass_compat(),
                neg_w: k.neg_w(),
                blurred: src,
                next,
                zeroed: 0,
            });
        }
        update(isa, w, l, order, neg_unary, &mut q, &mut pass, capture.as_mut());
        drop(pass);
        // Keep "the input is in buffer a": swap when the blur count was odd.
        for (k, b) in kernels.iter().zip(bufs.iter_mut()) {
            if k.lattice.d() % 2 == 1 {
                std::mem::swap(&mut b.a, &mut b.b);
            }
        }
    }
    Some(q)
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
