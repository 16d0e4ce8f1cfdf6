//! `clipmask.densecrf`'s engine: pydensecrf's `DenseCRF` / `DenseCRF2D` over the library's
//! general dense CRF (`clipmask::crf::general`). Matrices cross as float32 bytes in
//! pydensecrf's (labels, pixels) layout; python/clipmask/densecrf/ gives them pydensecrf's
//! names, defaults and error messages.
use crate::{f32s, interruptible, runtime_err, value_err};
use clipmask::crf::general::{Compat, DenseCrf as Engine, InferenceState, KernelType, Normalization};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// A pairwise term's label compatibility (as python/clipmask/densecrf encodes it), kernel type
/// and normalisation (pydensecrf's enum values).
fn term(
    kind: &str,
    values: Vec<f32>,
    labels: usize,
    kernel: i64,
    normalization: i64,
) -> PyResult<(Compat, KernelType, Normalization)> {
    let compat = match kind {
        "potts" if values.len() == 1 => Compat::Potts(values[0]),
        "diagonal" => Compat::Diagonal(values),
        "matrix" => Compat::Matrix { labels, w: values },
        _ => return Err(PyValueError::new_err(format!("unknown label compatibility {kind:?}"))),
    };
    let k = KernelType::from_code(kernel).map_err(value_err)?;
    let n = Normalization::from_code(normalization).map_err(value_err)?;
    Ok((compat, k, n))
}

fn bytes<'py>(py: Python<'py>, v: &[f32]) -> Bound<'py, PyBytes> {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    PyBytes::new(py, &b)
}

/// pydensecrf's `DenseCRF(nvar, nlabels)` (and `DenseCRF2D` through the 2-d pairwise terms).
#[pyclass(frozen, module = "clipmask._native")]
struct DenseCrf {
    engine: Arc<Mutex<Engine>>,
}

type Three<'py> = (Bound<'py, PyBytes>, Bound<'py, PyBytes>, Bound<'py, PyBytes>);

#[pymethods]
impl DenseCrf {
    #[new]
    fn new(n_pixels: usize, n_labels: usize) -> PyResult<Self> {
        Ok(DenseCrf { engine: Arc::new(Mutex::new(Engine::new(n_pixels, n_labels).map_err(value_err)?)) })
    }

    fn set_unary_energy(&self, unary: &[u8]) -> PyResult<()> {
        crate::lock(&self.engine).set_unary_energy(&f32s(unary)).map_err(value_err)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_pairwise_energy(
        &self,
        features: &[u8],
        dim: usize,
        compat_kind: &str,
        compat_values: Vec<f32>,
        compat_labels: usize,
        kernel: i64,
        normalization: i64,
    ) -> PyResult<()> {
        let (c, k, n) = term(compat_kind, compat_values, compat_labels, kernel, normalization)?;
        crate::lock(&self.engine).add_pairwise_energy(&f32s(features), dim, c, k, n).map_err(value_err)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_pairwise_gaussian_2d(
        &self,
        width: usize,
        height: usize,
        sx: f32,
        sy: f32,
        compat_kind: &str,
        compat_values: Vec<f32>,
        compat_labels: usize,
        kernel: i64,
        normalization: i64,
    ) -> PyResult<()> {
        let (c, k, n) = term(compat_kind, compat_values, compat_labels, kernel, normalization)?;
        crate::lock(&self.engine).add_pairwise_gaussian_2d(width, height, sx, sy, c, k, n).map_err(value_err)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_pairwise_bilateral_2d(
        &self,
        width: usize,
        height: usize,
        sx: f32,
        sy: f32,
        sr: f32,
        sg: f32,
        sb: f32,
        rgb: &[u8],
        compat_kind: &str,
        compat_values: Vec<f32>,
        compat_labels: usize,
        kernel: i64,
        normalization: i64,
    ) -> PyResult<()> {
        let (c, k, n) = term(compat_kind, compat_values, compat_labels, kernel, normalization)?;
        crate::lock(&self.engine)
            .add_pairwise_bilateral_2d(width, height, sx, sy, sr, sg, sb, rgb, c, k, n)
            .map_err(value_err)
    }

    /// Q after `iterations` mean-field steps, without the GIL; Ctrl-C stops between steps.
    fn inference<'py>(&self, py: Python<'py>, iterations: usize) -> PyResult<Bound<'py, PyBytes>> {
        let engine = self.engine.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let q = interruptible(py, stop, true, move || crate::lock(&engine).inference(iterations, Some(&flag)))?
            .map_err(runtime_err)?;
        Ok(bytes(py, &q))
    }

    fn start_inference<'py>(&self, py: Python<'py>) -> PyResult<Three<'py>> {
        let s = crate::lock(&self.engine).start_inference().map_err(runtime_err)?;
        Ok((bytes(py, &s.q), bytes(py, &s.tmp1), bytes(py, &s.tmp2)))
    }

    fn step_inference<'py>(&self, py: Python<'py>, q: &[u8], tmp1: &[u8], tmp2: &[u8]) -> PyResult<Three<'py>> {
        let mut s = InferenceState { q: f32s(q), tmp1: f32s(tmp1), tmp2: f32s(tmp2) };
        let engine = self.engine.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = interruptible(py, stop, true, move || crate::lock(&engine).step_inference(&mut s).map(|_| s))?
            .map_err(runtime_err)?;
        Ok((bytes(py, &s.q), bytes(py, &s.tmp1), bytes(py, &s.tmp2)))
    }

    fn kl_divergence(&self, q: &[u8]) -> PyResult<f64> {
        crate::lock(&self.engine).kl_divergence(&f32s(q)).map_err(runtime_err)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DenseCrf>()
}
