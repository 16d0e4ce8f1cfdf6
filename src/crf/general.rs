//! The general dense CRF: pydensecrf's `DenseCRF` / `DenseCRF2D` API on the CRF engine of this
//! module (docs/method.md §6), for `clipmask.densecrf`, the drop-in for `pydensecrf.densecrf`.
//!
//! It owns the API's semantics and checks: shapes as pydensecrf's (unary and features are
//! (M, N) and (D, N), label- / feature-major), one-line errors naming what is wrong and the
//! expected shape, and the conversions to and from the engine's rows. The arithmetic is the
//! engine's, shared with [`crate::crf::dense_crf`]: the lattice for any feature dimension
//! 1..=16, the kernels with every normalisation, Potts / diagonal / matrix compatibilities,
//! and the mean-field loop (`DenseCRF::inference`, `startInference`, `stepInference`).

use super::eigen::eigen_sum;
use super::kernels::Capture;
use super::keytable::MAX_D;
use super::mean_field::{from_rows, initial_q, mean_field, row_width, to_rows, Kernel};
use super::{bilateral_features_xy, gaussian_features_xy, Cancelled};
use anyhow::{bail, ensure};
use std::sync::atomic::AtomicBool;

/// A pairwise term's label compatibility (pydensecrf's `compat` argument).
#[derive(Debug, Clone, PartialEq)]
pub enum Compat {
    /// A number: `PottsCompatibility`, message -w · K(Q).
    Potts(f32),
    /// A vector of M weights: `DiagonalCompatibility`, message diag(w) · K(Q).
    Diagonal(Vec<f32>),
    /// An M x M matrix, row-major: `MatrixCompatibility`, message W · K(Q) with W the
    /// symmetrised (M + Mᵀ)/2, as pydensecrf builds it.
    Matrix { labels: usize, w: Vec<f32> },
}

/// pydensecrf's kernel types. They choose which kernel parameters a learner may change; those
/// start as the identity, so at inference all three filter the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelType {
    /// CONST_KERNEL = 0
    Const,
    /// DIAG_KERNEL = 1 (pydensecrf's default)
    Diag,
    /// FULL_KERNEL = 2
    Full,
}

/// pydensecrf's `DenseKernel` normalisations (n = K·1, per pixel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// NO_NORMALIZATION = 0: message K·Q.
    None,
    /// NORMALIZE_BEFORE = 1: K·(Q / n).
    Before,
    /// NORMALIZE_AFTER = 2: (K·Q) / n.
    After,
    /// NORMALIZE_SYMMETRIC = 3 (pydensecrf's default): K·(Q / √n) / √n.
    Symmetric,
}

impl KernelType {
    /// From pydensecrf's integer constant.
    pub fn from_code(code: i64) -> anyhow::Result<Self> {
        Ok(match code {
            0 => KernelType::Const,
            1 => KernelType::Diag,
            2 => KernelType::Full,
            _ => bail!("kernel type {code} is not one of CONST_KERNEL=0, DIAG_KERNEL=1, FULL_KERNEL=2"),
        })
    }
}

impl Normalization {
    /// From pydensecrf's integer constant.
    pub fn from_code(code: i64) -> anyhow::Result<Self> {
        Ok(match code {
            0 => Normalization::None,
            1 => Normalization::Before,
            2 => Normalization::After,
            3 => Normalization::Symmetric,
            _ => bail!(
                "normalization {code} is not one of NO_NORMALIZATION=0, NORMALIZE_BEFORE=1, \
                 NORMALIZE_AFTER=2, NORMALIZE_SYMMETRIC=3"
            ),
        })
    }
}

/// A dense CRF over N pixels (variables) and M labels, as pydensecrf's `DenseCRF`: a unary
/// energy and pairwise terms whose lattices are built when they are added.
pub struct DenseCrf {
    n: usize,
    m: usize,
    /// -unary as the engine's rows; None until `set_unary_energy`.
    neg_unary: Option<Vec<f32>>,
    kernels: Vec<Kernel>,
}

/// pydensecrf's inference state (`startInference` / `stepInference`): Q, tmp1 and tmp2, each
/// (M, N) label-major. After a step, tmp1 holds the energies Q was normalised from and tmp2
/// the last pairwise term's message (compatibility applied); both start as zeros (pydensecrf
/// starts them empty).
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceState {
    pub q: Vec<f32>,
    pub tmp1: Vec<f32>,
    pub tmp2: Vec<f32>,
}

fn ensure_finite(what: &str, x: &[f32]) -> anyhow::Result<()> {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!("{what} has a non-finite value ({}) at flat index {i}", x[i]);
    }
    Ok(())
}

impl DenseCrf {
    /// pydensecrf `DenseCRF(N, M)`.
    pub fn new(n_pixels: usize, n_labels: usize) -> anyhow::Result<Self> {
        ensure!(n_pixels > 0, "DenseCRF needs at least one pixel (variable), got 0");
        ensure!(n_labels > 0, "DenseCRF needs at least one label, got 0");
        // Lattice vertex rows are u32 (at most N (D+1) + 1 of them).
        ensure!(
            n_pixels < (u32::MAX as usize) / (MAX_D + 2),
            "DenseCRF: {n_pixels} pixels is too many (at most {})",
            (u32::MAX as usize) / (MAX_D + 2) - 1
        );
        ensure!(n_labels < 1 << 16, "DenseCRF: {n_labels} labels is too many (at most 65535)");
        Ok(DenseCrf { n: n_pixels, m: n_labels, neg_unary: None, kernels: Vec::new() })
    }

    /// Number of pixels (variables) N.
    pub fn n_pixels(&self) -> usize {
        self.n
    }

    /// Number of labels M.
    pub fn n_labels(&self) -> usize {
        self.m
    }

    /// pydensecrf `setUnaryEnergy(U)`: U is (M, N) label-major (e.g. `unary_from_softmax`).
    /// Replaces a previous unary.
    pub fn set_unary_energy(&mut self, unary: &[f32]) -> anyhow::Result<()> {
        let (m, n) = (self.m, self.n);
        ensure!(
            unary.len() == m * n,
            "unary energy has {} values, expected shape (M, N) = ({m}, {n}) = {} values",
            unary.len(),
            m * n
        );
        ensure_finite("unary energy", unary)?;
        self.neg_unary = Some(to_rows(unary, n, m, |u| -u));
        Ok(())
    }

    fn check_compat(&self, compat: &Compat) -> anyhow::Result<()> {
        let m = self.m;
        match compat {
            Compat::Potts(w) => ensure_finite("compat", std::slice::from_ref(w)),
            Compat::Diagonal(w) => {
                ensure!(w.len() == m, "compat vector has {} values, expected one per label ({m})", w.len());
                ensure_finite("compat vector", w)
            }
            Compat::Matrix { labels, w } => {
                ensure!(
                    *labels == m && w.len() == m * m,
                    "compat matrix is {labels} x {} ({} values), expected labels x labels = {m} x {m}",
                    w.len().checked_div(*labels).unwrap_or(0),
                    w.len()
                );
                ensure_finite("compat matrix", w)
            }
        }
    }

    /// Adds a term from pixel-major features (n x d), checked.
    fn add_kernel(&mut self, f: &[f32], d: usize, compat: Compat, norm: Normalization) -> anyhow::Result<()> {
        self.check_compat(&compat)?;
        ensure_finite("pairwise features", f)?;
        self.kernels.push(Kernel::new(f, d, self.n, compat, norm));
        Ok(())
    }

    /// pydensecrf `addPairwiseEnergy(features, compat, kernel, normalization)`: features are
    /// (D, N), feature-major, D in 1..=16.
    pub fn add_pairwise_energy(
        &mut self,
        features: &[f32],
        dim: usize,
        compat: Compat,
        kernel: KernelType,
        norm: Normalization,
    ) -> anyhow::Result<()> {
        let _ = kernel; // identity parameters: no effect at inference (see KernelType)
        let n = self.n;
        ensure!((1..=MAX_D).contains(&dim), "pairwise features have dimension {dim}, expected 1 to {MAX_D}");
        ensure!(
            features.len() == dim * n,
            "pairwise features have {} values, expected shape (D, N) = ({dim}, {n}) = {} values",
            features.len(),
            dim * n
        );
        let mut f = vec![0f32; n * dim];
        for k in 0..dim {
            for (i, &x) in features[k * n..(k + 1) * n].iter().enumerate() {
                f[i * dim + k] = x;
            }
        }
        self.add_kernel(&f, dim, compat, norm)
    }

    fn check_grid(&self, what: &str, width: usize, height: usize) -> anyhow::Result<()> {
        ensure!(
            width.checked_mul(height) == Some(self.n),
            "{what}: a {width} x {height} image has {} pixels, but the CRF has {}",
            width.saturating_mul(height),
            self.n
        );
        Ok(())
    }

    /// pydensecrf `DenseCRF2D.addPairwiseGaussian(sxy=(sx, sy), ...)`: features (x/sx, y/sy).
    #[allow(clippy::too_many_arguments)]
    pub fn add_pairwise_gaussian_2d(
        &mut self,
        width: usize,
        height: usize,
        sx: f32,
        sy: f32,
        compat: Compat,
        kernel: KernelType,
        norm: Normalization,
    ) -> anyhow::Result<()> {
        let _ = kernel;
        self.check_grid("addPairwiseGaussian", width, height)?;
        for (name, s) in [("sx", sx), ("sy", sy)] {
            ensure!(s.is_finite() && s != 0.0, "addPairwiseGaussian: {name} must be finite and non-zero, got {s}");
        }
        let f = gaussian_features_xy(width, height, sx, sy);
        self.add_kernel(&f, 2, compat, norm)
    }

    /// pydensecrf `DenseCRF2D.addPairwiseBilateral(sxy=(sx, sy), srgb=(sr, sg, sb), rgbim, ...)`:
    /// features (x/sx, y/sy, r/sr, g/sg, b/sb); `rgb` is H x W x 3, row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn add_pairwise_bilateral_2d(
        &mut self,
        width: usize,
        height: usize,
        sx: f32,
        sy: f32,
        sr: f32,
        sg: f32,
        sb: f32,
        rgb: &[u8],
        compat: Compat,
        kernel: KernelType,
        norm: Normalization,
    ) -> anyhow::Result<()> {
        let _ = kernel;
        self.check_grid("addPairwiseBilateral", width, height)?;
        ensure!(
            rgb.len() == self.n * 3,
            "addPairwiseBilateral: image has {} bytes, expected shape (H, W, 3) = ({height}, {width}, 3) = {} bytes",
            rgb.len(),
            self.n * 3
        );
        for (name, s) in [("sx", sx), ("sy", sy), ("sr", sr), ("sg", sg), ("sb", sb)] {
            ensure!(s.is_finite() && s != 0.0, "addPairwiseBilateral: {name} must be finite and non-zero, got {s}");
        }
        let f = bilateral_features_xy(rgb, width, height, [sx, sy], [sr, sg, sb]);
        self.add_kernel(&f, 5, compat, norm)
    }

    fn neg_unary(&self) -> anyhow::Result<&[f32]> {
        match &self.neg_unary {
            Some(u) => Ok(u),
            None => {
                bail!("no unary energy set: call setUnaryEnergy with an (M, N) = ({}, {}) array first", self.m, self.n)
            }
        }
    }

    /// pydensecrf `inference(iterations)`: Q, (M, N) label-major. Checks `stop` between
    /// iterations and fails with [`Cancelled`] once it is set.
    pub fn inference(&self, iterations: usize, stop: Option<&AtomicBool>) -> anyhow::Result<Vec<f32>> {
        let neg_unary = self.neg_unary()?;
        let q0 = initial_q(neg_unary, self.m);
        let q = mean_field(neg_unary, q0, self.m, &self.kernels, iterations, stop, None).ok_or(Cancelled)?;
        Ok(from_rows(&q, self.n, self.m))
    }

    /// pydensecrf `startInference()`: Q = softmax(-unary), tmp1 = tmp2 = 0.
    pub fn start_inference(&self) -> anyhow::Result<InferenceState> {
        let q = from_rows(&initial_q(self.neg_unary()?, self.m), self.n, self.m);
        let zeros = vec![0f32; self.m * self.n];
        Ok(InferenceState { q, tmp1: zeros.clone(), tmp2: zeros })
    }

    /// pydensecrf `stepInference(Q, tmp1, tmp2)`: one mean-field iteration from `state.q`,
    /// the same numbers as one iteration of [`DenseCrf::inference`].
    pub fn step_inference(&self, state: &mut InferenceState) -> anyhow::Result<()> {
        let (m, n) = (self.m, self.n);
        let neg_unary = self.neg_unary()?;
        ensure!(
            state.q.len() == m * n,
            "Q has {} values, expected shape (M, N) = ({m}, {n}) = {} values",
            state.q.len(),
            m * n
        );
        ensure_finite("Q", &state.q)?;
        let w = row_width(m);
        let (mut tmp1, mut tmp2) = (vec![0f32; n * w], vec![0f32; n * w]);
        let capture = Capture { tmp1: &mut tmp1, tmp2: &mut tmp2 };
        let q = to_rows(&state.q, n, m, |x| x);
        let q = mean_field(neg_unary, q, m, &self.kernels, 1, None, Some(capture)).ok_or(Cancelled)?;
        state.q = from_rows(&q, n, m);
        state.tmp1 = from_rows(&tmp1, n, m);
        if !self.kernels.is_empty() {
            state.tmp2 = from_rows(&tmp2, n, m);
        }
        Ok(())
    }

    /// pydensecrf `klDivergence(Q)`: Σ Q log max(Q, 1e-20) + Σ unary·Q + Σ_k Σ Q ⊙ message_k
    /// (message_k with its compatibility applied), accumulated in f64 as the C++ does, each
    /// pairwise sum in f32 with Eigen's reduction order.
    pub fn kl_divergence(&self, q: &[f32]) -> anyhow::Result<f64> {
        let (m, n) = (self.m, self.n);
        let neg_unary = self.neg_unary()?;
        ensure!(q.len() == m * n, "Q has {} values, expected shape (M, N) = ({m}, {n}) = {} values", q.len(), m * n);
        ensure_finite("Q", q)?;
        let w = row_width(m);
        let mut kl = 0f64;
        for i in 0..n {
            for l in 0..m {
                let x = q[l * n + i];
                kl += (x * x.max(1e-20).ln()) as f64;
            }
        }
        for i in 0..n {
            for l in 0..m {
                kl += (-neg_unary[i * w + l] * q[l * n + i]) as f64;
            }
        }
        let q_rows = to_rows(q, n, m, |x| x);
        for k in &self.kernels {
            // One iteration with this kernel alone captures its message as tmp2.
            let (mut tmp1, mut tmp2) = (vec![0f32; n * w], vec![0f32; n * w]);
            let capture = Capture { tmp1: &mut tmp1, tmp2: &mut tmp2 };
            let zero = vec![0f32; n * w];
            mean_field(&zero, q_rows.clone(), m, std::slice::from_ref(k), 1, None, Some(capture)).ok_or(Cancelled)?;
            // Eigen's (Q.array() * tmp.array()).sum() over the (M, N) column-major arrays,
            // i.e. pixel by pixel, the labels of each in turn.
            let prod: Vec<f32> = (0..n * m).map(|j| q_rows[j / m * w + j % m] * tmp2[j / m * w + j % m]).collect();
            kl += eigen_sum::<1>(prod.len(), |c| [prod[c]])[0] as f64;
        }
        Ok(kl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn codes_and_thread_safety() {
        assert_send_sync::<DenseCrf>();
        assert_eq!(KernelType::from_code(2).unwrap(), KernelType::Full);
        assert_eq!(Normalization::from_code(0).unwrap(), Normalization::None);
        let e = Normalization::from_code(4).unwrap_err().to_string();
        assert!(e.contains("NORMALIZE_SYMMETRIC=3"), "{e}");
        let e = KernelType::from_code(-1).unwrap_err().to_string();
        assert!(e.contains("CONST_KERNEL=0"), "{e}");
    }

    #[test]
    fn no_pairwise_is_the_softmax_of_minus_unary() {
        // Without pairwise terms every iteration gives softmax(-unary) again.
        let (n, m) = (5usize, 3usize);
        let unary: Vec<f32> = (0..n * m).map(|j| (j as f32 * 0.37).sin() * 3.0).collect();
        let mut crf = DenseCrf::new(n, m).unwrap();
        crf.set_unary_energy(&unary).unwrap();
        let q = crf.inference(4, None).unwrap();
        for i in 0..n {
            let e: Vec<f64> = (0..m).map(|l| (-unary[l * n + i] as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            for l in 0..m {
                assert!((q[l * n + i] as f64 - e[l] / s).abs() < 1e-6);
            }
        }
    }
}
