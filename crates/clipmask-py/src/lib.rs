//! `clipmask._native`: the Python package's extension. It converts between Python and the
//! `clipmask` library and does nothing else; `python/clipmask/` wraps it in the public API
//! (numpy arrays, PIL images, keyword arguments, docstrings).
//!
//! Arrays cross as bytes (little-endian, C order) with their shapes, so that the extension
//! uses only the stable ABI (abi3) and needs no numpy headers; Python views them with
//! `numpy.frombuffer`.
//!
//! Long calls run on a worker thread with the GIL released; the calling thread waits for it
//! and checks for signals every 50 ms, so that Ctrl-C raises KeyboardInterrupt promptly: a
//! batch job is then stopped as the CLI stops it (the image in flight finishes, the failure
//! report is written); an in-memory computation is abandoned (its result is dropped).
use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use clipmask::clip::Clip;
use clipmask::config::DatasetConfig;
use clipmask::pipeline::{HostCopies, MapOptions};
use clipmask::prompts::TextFeatures;
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

mod densecrf;

/// An error as a Python exception with the CLI's one-line message: a missing file is
/// FileNotFoundError, bad input ValueError, anything else RuntimeError.
fn py_err(e: anyhow::Error, input_error: bool) -> PyErr {
    let msg = clipmask::errors::format_error(&e);
    let not_found = e
        .chain()
        .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound));
    if not_found {
        PyFileNotFoundError::new_err(msg)
    } else if input_error {
        PyValueError::new_err(msg)
    } else {
        PyRuntimeError::new_err(msg)
    }
}

fn value_err(e: anyhow::Error) -> PyErr {
    py_err(e, true)
}

fn runtime_err(e: anyhow::Error) -> PyErr {
    py_err(e, false)
}

/// Runs `f` on a worker thread without the GIL; the calling thread checks for signals while
/// it waits. On a pending signal (KeyboardInterrupt) `stop` is raised; with `finish` the worker
/// is waited for (it ends at its next stop check), else abandoned. A panic in `f` becomes a
/// RuntimeError with its message.
fn interruptible<T: Send + 'static>(
    py: Python<'_>,
    stop: Arc<AtomicBool>,
    finish: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> PyResult<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    // A Receiver is not Sync; behind a mutex it can be waited on without the GIL.
    let rx = Mutex::new(rx);
    let recv = |timeout: Option<Duration>| {
        let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        match timeout {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        }
    };
    std::thread::Builder::new()
        .name("clipmask".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a worker thread: {e}")))?;
    loop {
        match py.detach(|| recv(Some(Duration::from_millis(50)))) {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(p)) => return Err(PyRuntimeError::new_err(clipmask::errors::panic_message(p.as_ref()))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err("internal: the worker thread ended without a result"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    stop.store(true, Ordering::SeqCst);
                    if finish {
                        // The worker ends at its next stop check; its files stay consistent.
                        let _ = py.detach(|| recv(None));
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// The whole `clipmask` program (the console command and `python -m clipmask`): the same code
/// as the binary, with its own signal handling while it runs. Returns the exit code.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<String>) -> i32 {
    let args: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    py.detach(|| clipmask::cli::main(args))
}

/// libtorch tensors are Send but not Sync: a model (or text features) shared between Python
/// threads is used by one computation at a time. The lock is taken on the worker thread, so
/// waiting for it never holds the GIL.
type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a computation is reported as an error; the model is unchanged by it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loaded CLIP model (weights on one device at one precision).
#[pyclass(frozen, module = "clipmask._native")]
struct Model {
    clip: Shared<Clip>,
    patch: i64,
    device_v: tch::Device,
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    device: String,
    #[pyo3(get)]
    precision: String,
}

#[pymethods]
impl Model {
    #[new]
    fn new(py: Python<'_>, name: String, device: String, precision: String) -> PyResult<Self> {
        let precision_v = <clipmask::device::Precision as clap::ValueEnum>::from_str(&precision, true)
            .map_err(|_| PyValueError::new_err(format!("precision {precision:?}: expected auto, fp32 or fp16")))?;
        let args = clipmask::cli::ModelArgs {
            model: name.clone(),
            config: "voc12".into(),
            device,
            precision: precision_v,
            fp32: false,
        };
        let (dev, _) = args.device().map_err(value_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        // A name that is not a released one, a repo id or a file: the file the user meant is missing.
        let spec = std::path::Path::new(&name);
        let looks_like_file = !spec.exists()
            && (name.starts_with('.')
                || name.starts_with('/')
                || name.starts_with('~')
                || [".pt", ".pth", ".bin", ".safetensors"].iter().any(|x| name.ends_with(x)));
        let clip = interruptible(py, stop, false, move || args.load_model_on(dev))?.map_err(|e| {
            if looks_like_file {
                PyFileNotFoundError::new_err(clipmask::errors::format_error(&e))
            } else {
                py_err(e, true)
            }
        })?;
        let device = clipmask::device::device_name(clip.device);
        let precision = clipmask::device::kind_name(clip.kind);
        let (patch, device_v) = (clip.visual.patch, clip.device);
        Ok(Model { clip: Arc::new(Mutex::new(clip)), patch, device_v, name, device, precision })
    }

    #[getter]
    fn patch(&self) -> i64 {
        self.patch
    }
}

/// A dataset config (classes, prompts, background words, templates, palette, CRF settings).
#[pyclass(frozen, module = "clipmask._native")]
struct Config {
    cfg: Arc<DatasetConfig>,
}

#[pymethods]
impl Config {
    /// A shipped name (voc12, coco14) or a JSON path.
    #[staticmethod]
    fn resolve(spec: &str) -> PyResult<Self> {
        Ok(Config { cfg: Arc::new(DatasetConfig::resolve(spec).map_err(value_err)?) })
    }

    /// A config from its JSON text.
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        Ok(Config { cfg: Arc::new(DatasetConfig::parse(text, "the config given").map_err(value_err)?) })
    }

    #[getter]
    fn class_names(&self) -> Vec<String> {
        self.cfg.class_names().iter().map(|s| s.to_string()).collect()
    }

    #[getter]
    fn name(&self) -> String {
        self.cfg.name.clone()
    }

    /// The palette as a flat list of 768 RGB bytes (PIL's `putpalette` order).
    #[getter]
    fn palette(&self) -> Vec<u8> {
        self.cfg.png_palette()
    }

    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&*self.cfg).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }
}

/// An image from Python: a path (decoded as `generate` decodes files) or RGB pixels.
enum ImageArg {
    Path(PathBuf),
    Pixels(Vec<u8>, u32, u32),
}

fn image_arg(obj: &Bound<'_, PyAny>) -> PyResult<ImageArg> {
    if let Ok(p) = obj.extract::<PathBuf>() {
        return Ok(ImageArg::Path(p));
    }
    let (data, h, w): (Bound<'_, PyBytes>, u32, u32) = obj.extract().map_err(|_| {
        PyValueError::new_err("an image is a path, or (bytes, height, width) of H x W x 3 uint8 RGB pixels")
    })?;
    let bytes = data.as_bytes().to_vec();
    if bytes.len() as u64 != h as u64 * w as u64 * 3 || h == 0 || w == 0 {
        return Err(PyValueError::new_err(format!(
            "image pixels: {} bytes for {h} x {w} x 3 (an image needs at least one pixel)",
            bytes.len()
        )));
    }
    Ok(ImageArg::Pixels(bytes, h, w))
}

fn load_image(arg: ImageArg, max_pixels: u64) -> Result<image::RgbImage> {
    match arg {
        ImageArg::Path(p) => clipmask::image_input::load_rgb_limited(&p, max_pixels),
        ImageArg::Pixels(data, h, w) => {
            anyhow::ensure!(
                h as u64 * w as u64 <= max_pixels,
                "image of {w} x {h} pixels is over the budget of {max_pixels} (max_pixels)"
            );
            image::RgbImage::from_raw(w, h, data).context("image pixels do not match their size")
        }
    }
}

/// Image `i` of a call, decoded, with the name its errors use (its path, or "image i").
fn load_named(arg: ImageArg, i: usize, max_pixels: u64) -> Result<(image::RgbImage, String)> {
    let what = match &arg {
        ImageArg::Path(p) => p.display().to_string(),
        ImageArg::Pixels(..) => format!("image {i}"),
    };
    let img = load_image(arg, max_pixels).with_context(|| format!("cannot read {what}"))?;
    Ok((img, what))
}

/// An error of a call over images: one that could not be read is bad input (ValueError, or
/// FileNotFoundError), any other a RuntimeError.
fn images_err(e: anyhow::Error) -> PyErr {
    let decode = format!("{e:#}").contains("cannot read");
    py_err(e, decode)
}

/// Computes maps for images with their labels: text features once, the vision side per call.
#[pyclass(frozen, module = "clipmask._native")]
struct Generator {
    model: Shared<Clip>,
    device: tch::Device,
    cfg: Arc<DatasetConfig>,
    text: Shared<TextFeatures>,
    opts: MapOptions,
}

/// One image's maps for Python: every array as bytes with its shape.
fn maps_dict<'py>(py: Python<'py>, m: &clipmask::pipeline::ImageMaps, h: u32, w: u32) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let keys: Vec<u8> = m.keys.iter().flat_map(|&k| (k as i64).to_le_bytes()).collect();
    d.set_item("keys", PyBytes::new(py, &keys))?;
    for (name, arr) in [("cams", &m.refined), ("raw_cams", &m.raw)] {
        let arr = arr.as_ref().ok_or_else(|| PyRuntimeError::new_err("internal: maps were not copied"))?;
        let arr = arr.as_standard_layout();
        let bytes: Vec<u8> = arr.iter().flat_map(|v| v.to_le_bytes()).collect();
        d.set_item(name, PyByteArray::new(py, &bytes))?;
    }
    let probs: Vec<u8> = m.probs.iter().flat_map(|v| v.to_le_bytes()).collect();
    d.set_item("probs", PyBytes::new(py, &probs))?;
    d.set_item("height", h)?;
    d.set_item("width", w)?;
    Ok(d)
}

#[pymethods]
impl Generator {
    #[new]
    #[pyo3(signature = (model, config, cam, scales, flip, box_threshold=None, max_side=1024, exact_positions=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &Model,
        config: &Config,
        cam: &str,
        scales: Vec<f64>,
        flip: bool,
        box_threshold: Option<f64>,
        max_side: u32,
        exact_positions: bool,
    ) -> PyResult<Self> {
        let source = <clipmask::cam::CamSource as clap::ValueEnum>::from_str(cam, true).map_err(|_| {
            let names: Vec<String> = <clipmask::cam::CamSource as clap::ValueEnum>::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            PyValueError::new_err(format!("cam {cam:?}: expected one of {}", names.join(", ")))
        })?;
        if scales.is_empty() || scales.iter().any(|s| !s.is_finite() || *s <= 0.0 || *s > 4.0) {
            return Err(PyValueError::new_err(format!(
                "scales {scales:?}: each scale must be in (0, 4], at least one"
            )));
        }
        if let Some(t) = box_threshold.filter(|t| !(0.0..1.0).contains(t)) {
            return Err(PyValueError::new_err(format!("box_threshold must be in [0, 1), got {t}")));
        }
        let patch = model.patch as u32;
        if max_side < 2 * patch {
            return Err(PyValueError::new_err(format!(
                "max_side {max_side}: at least 2 patches ({} px) for this model",
                2 * patch
            )));
        }
        let cfg = config.cfg.clone();
        let opts = MapOptions {
            box_threshold: box_threshold.unwrap_or(cfg.box_threshold),
            max_side: Some(max_side),
            round_pos_fp16: !exact_positions,
            source,
            scales,
            flip,
        };
        let (clip, c) = (model.clip.clone(), cfg.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let text = interruptible(py, stop, false, move || -> Result<TextFeatures> {
            let clip = lock(&clip);
            let mut t = clipmask::prompts::text_features(&clip, &c)?;
            t.classes = t.classes.to_device(clip.device);
            Ok(t)
        })?
        .map_err(runtime_err)?;
        Ok(Generator { model: model.clip.clone(), device: model.device_v, cfg, text: Arc::new(Mutex::new(text)), opts })
    }

    /// Maps of several images (`images[i]` with `labels[i]`, class names), batched by grid
    /// size; one dict per image, or an exception for the first image that failed.
    #[pyo3(signature = (images, labels, batch_size=1, max_pixels=None))]
    fn compute<'py>(
        &self,
        py: Python<'py>,
        images: Vec<Bound<'py, PyAny>>,
        labels: Vec<Vec<String>>,
        batch_size: usize,
        max_pixels: Option<u64>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        if images.len() != labels.len() {
            return Err(PyValueError::new_err(format!("{} images but {} label lists", images.len(), labels.len())));
        }
        let max_pixels = max_pixels.unwrap_or(clipmask::image_input::DEFAULT_MAX_PIXELS);
        let mut keys = Vec::with_capacity(labels.len());
        for (i, names) in labels.iter().enumerate() {
            let k = clipmask::datasets::resolve_labels(&self.cfg, names)
                .map_err(|e| PyValueError::new_err(format!("labels of image {i}: {e}")))?;
            keys.push(k);
        }
        let args: Vec<ImageArg> = images.iter().map(image_arg).collect::<PyResult<_>>()?;
        let (model, text, opts) = (self.model.clone(), self.text.clone(), self.opts.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let results =
            interruptible(py, stop, false, move || -> Result<Vec<(u32, u32, clipmask::pipeline::ImageMaps)>> {
                let (model, text) = (lock(&model), lock(&text));
                let mut decoded = Vec::with_capacity(args.len());
                for (i, a) in args.into_iter().enumerate() {
                    let (img, what) = load_named(a, i, max_pixels)?;
                    let variants = clipmask::pipeline::prepare_variants(&img, model.visual.patch, &opts);
                    decoded.push((img.width(), img.height(), variants, what));
                }
                let inputs: Vec<(&[clipmask::image_input::Prepared], &[usize])> =
                    decoded.iter().zip(&keys).map(|(d, k)| (d.2.as_slice(), k.as_slice())).collect();
                let host = HostCopies { maps: true, labels_alpha: None };
                // GPU memory bounded as `generate --max-gpu-mem auto` bounds it.
                let budget = clipmask::pipeline::batches_budget(clipmask::pipeline::MemoryBudget::Auto, model.device);
                let (maps, _) =
                    clipmask::pipeline::images_maps(&model, &text, &inputs, &opts, batch_size, budget, host);
                decoded
                    .iter()
                    .zip(maps)
                    .map(|(d, m)| m.map(|m| (d.0, d.1, m)).map_err(|e| anyhow::anyhow!("{}: {e}", d.3)))
                    .collect()
            })?;
        let results = results.map_err(images_err)?;
        results.iter().map(|(w, h, m)| maps_dict(py, m, *h, *w)).collect()
    }

    /// `generate` with this generator's model, config and map settings: `argv` holds the
    /// `generate` flags (without --model/--config/--cam/--scales/--flip/--box-threshold/
    /// --max-side). Returns the summary as JSON text (None when stopped while tagging).
    fn run(&self, py: Python<'_>, argv: Vec<String>) -> PyResult<Option<String>> {
        let args: clipmask::cli::generate::GenerateArgs = parse_flags("generate", argv)?;
        let checked =
            clipmask::cli::generate::check(&args, Some((*self.cfg).clone()), Some(self.device)).map_err(|e| {
                let not_found = !args.input.images.exists();
                if not_found {
                    PyFileNotFoundError::new_err(clipmask::errors::format_error(&e))
                } else {
                    value_err(e)
                }
            })?;
        let (model, text, opts) = (self.model.clone(), self.text.clone(), self.opts.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let r = interruptible(py, stop, true, move || {
            let (model, text) = (lock(&model), lock(&text));
            clipmask::cli::generate::run_with(&args, checked, &model, &text, opts, flag)
        })?
        .map_err(runtime_err)?;
        r.map(|s| {
            serde_json::to_string(&clipmask::schema::versioned(&s)).map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
        .transpose()
    }

    #[getter]
    fn class_names(&self) -> Vec<String> {
        self.cfg.class_names().iter().map(|s| s.to_string()).collect()
    }

    /// `generate --crf`'s labels for one image's refined maps (label_maps::crf_label_map, with
    /// this config's CRF parameters): (labels H*W uint8, confidence H*W float32), as bytes.
    #[pyo3(signature = (image, cams, shape, keys, alpha, image_mode, confidence))]
    #[allow(clippy::too_many_arguments)]
    fn crf_labels<'py>(
        &self,
        py: Python<'py>,
        image: &[u8],
        cams: &[u8],
        shape: (usize, usize, usize),
        keys: Vec<i64>,
        alpha: f32,
        image_mode: &str,
        confidence: f32,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let (k, h, w) = shape;
        if cams.len() != k * h * w * 4 || keys.len() != k || image.len() != h * w * 3 {
            return Err(PyValueError::new_err(format!(
                "image {} bytes, cams {} bytes and {} keys for shape ({k}, {h}, {w})",
                image.len(),
                cams.len(),
                keys.len()
            )));
        }
        check_alpha_keys(alpha, &keys)?;
        let image_v = crf_mode(image_mode)?;
        if !(0.0..=1.0).contains(&confidence) {
            return Err(PyValueError::new_err(format!("confidence must be in [0, 1], got {confidence}")));
        }
        let values: Vec<f32> = f32s(cams);
        let maps =
            ndarray::Array3::from_shape_vec((k, h, w), values).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let img = image::RgbImage::from_raw(w as u32, h as u32, image.to_vec())
            .ok_or_else(|| PyValueError::new_err("image pixels do not match their size"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let opts = clipmask::label_maps::CrfOptions {
            params: self.cfg.crf,
            image: image_v,
            // As `generate --crf-device auto`: the GPU CRF when the model is on CUDA.
            backend: if self.device.is_cuda() {
                clipmask::crf::CrfBackend::Tensor(self.device)
            } else {
                clipmask::crf::CrfBackend::Cpu
            },
            confidence,
            save_confidence: false,
            stop: Some(stop.clone()),
        };
        let (labels, conf) = interruptible(py, stop, true, move || {
            clipmask::label_maps::crf_label_map(&img, &maps, &keys, alpha, &opts)
        })?
        .map_err(runtime_err)?;
        let conf: Vec<u8> = conf.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok((PyBytes::new(py, &labels), PyBytes::new(py, &conf)))
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn check_alpha_keys(alpha: f32, keys: &[i64]) -> PyResult<()> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PyValueError::new_err(format!("alpha must be a finite number > 0, got {alpha}")));
    }
    if let Some(bad) = keys.iter().find(|&&k| !(0..=253).contains(&k)) {
        return Err(PyValueError::new_err(format!("class key {bad} outside 0..=253")));
    }
    Ok(())
}

fn crf_mode(name: &str) -> PyResult<clipmask::crf::CrfImage> {
    <clipmask::crf::CrfImage as clap::ValueEnum>::from_str(name, true).map_err(|_| {
        let names: Vec<String> = <clipmask::crf::CrfImage as clap::ValueEnum>::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        PyValueError::new_err(format!("image_mode {name:?}: expected one of {}", names.join(", ")))
    })
}

/// A subcommand's flags parsed as the command line parses them (defaults, checks, conflicts);
/// a usage error is a ValueError with clap's first line.
fn parse_flags<A: clap::Args>(command: &str, argv: Vec<String>) -> PyResult<A> {
    #[derive(Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    let full = std::iter::once(format!("clipmask {command}")).chain(argv);
    Wrap::<A>::try_parse_from(full).map(|w| w.args).map_err(|e| {
        let text = e.to_string();
        PyValueError::new_err(
            text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string(),
        )
    })
}

/// The label map of maps (`generate`'s rule without CRF, docs/method.md §6): `cams` float32
/// (K, H, W) bytes, `keys` 0-based class indices. Returns H*W uint8 bytes.
#[pyfunction]
fn label_map<'py>(
    py: Python<'py>,
    cams: &[u8],
    shape: (usize, usize, usize),
    keys: Vec<i64>,
    alpha: f32,
) -> PyResult<Bound<'py, PyBytes>> {
    let (k, h, w) = shape;
    if cams.len() != k * h * w * 4 || keys.len() != k {
        return Err(PyValueError::new_err(format!(
            "cams: {} bytes and {} keys for shape ({k}, {h}, {w})",
            cams.len(),
            keys.len()
        )));
    }
    check_alpha_keys(alpha, &keys)?;
    let values = f32s(cams);
    let t = tch::Tensor::from_slice(&values).reshape([k as i64, h as i64, w as i64]);
    let labels = clipmask::label_maps::label_map_on_device(&t, &keys, alpha).map_err(runtime_err)?;
    Ok(PyBytes::new(py, &labels))
}

/// Dense CRF with CLIP-ES's pipeline (docs/method.md §6): `image` H x W x 3 RGB bytes, `probs`
/// float32 (C, H, W) bytes. Returns (labels H*W uint8: argmax channel, 255 below
/// `confidence`; confidence H*W float32 bytes).
#[pyfunction]
#[pyo3(signature = (image, height, width, probs, n_labels, image_mode, confidence, params_json=None))]
#[allow(clippy::too_many_arguments)]
fn crf<'py>(
    py: Python<'py>,
    image: &[u8],
    height: usize,
    width: usize,
    probs: &[u8],
    n_labels: usize,
    image_mode: &str,
    confidence: f32,
    params_json: Option<&str>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let mode = crf_mode(image_mode)?;
    let params: clipmask::crf::CrfParams = match params_json {
        Some(j) => serde_json::from_str(j).map_err(|e| PyValueError::new_err(format!("crf parameters: {e}")))?,
        None => clipmask::crf::CrfParams::default(),
    };
    params.validate().map_err(value_err)?;
    if !(0.0..=1.0).contains(&confidence) {
        return Err(PyValueError::new_err(format!("confidence must be in [0, 1], got {confidence}")));
    }
    if n_labels == 0 || n_labels > 255 {
        return Err(PyValueError::new_err(format!("probs: {n_labels} labels, expected 1 to 255")));
    }
    let n = height * width;
    if image.len() != n * 3 || probs.len() != n * n_labels * 4 {
        return Err(PyValueError::new_err(format!(
            "image has {} bytes and probs {} bytes; expected {height} x {width} x 3 and {n_labels} x {height} x {width} float32",
            image.len(),
            probs.len()
        )));
    }
    let p = f32s(probs);
    if p.iter().any(|v| !v.is_finite()) {
        return Err(PyValueError::new_err("probs hold a NaN or an infinity"));
    }
    let img = clipmask::crf::crf_image(image, mode);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let q = interruptible(py, stop, true, move || {
        clipmask::crf::dense_crf_cancellable(&img, width, height, &p, n_labels, &params, Some(&flag))
    })?
    .map_err(runtime_err)?;
    let ids: Vec<u8> = (0..n_labels as u8).collect();
    let (labels, conf) = clipmask::crf::labels_from_marginals(&q, n_labels, &ids, confidence);
    let conf: Vec<u8> = conf.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok((PyBytes::new(py, &labels), PyBytes::new(py, &conf)))
}

/// `eval` with `argv` as its flags (`--json` added): the JSON text it prints.
#[pyfunction]
fn evaluate(py: Python<'_>, argv: Vec<String>) -> PyResult<String> {
    let args: clipmask::cli::eval::EvalArgs = parse_flags("eval", argv)?;
    let opts = args.options();
    let stop = Arc::new(AtomicBool::new(false));
    interruptible(py, stop, false, move || clipmask::eval::run(&opts, true))?.map_err(|e| {
        let missing =
            e.chain().any(|c| c.to_string().contains("No such file") || c.to_string().contains("not a directory"));
        if missing {
            PyFileNotFoundError::new_err(clipmask::errors::format_error(&e))
        } else {
            value_err(e)
        }
    })
}

/// Zero-shot class probabilities of each image (`classify`), one list per image.
#[pyfunction]
fn classify(py: Python<'_>, model: &Model, config: &Config, images: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<Vec<f32>>> {
    let args: Vec<ImageArg> = images.iter().map(image_arg).collect::<PyResult<_>>()?;
    let (clip, cfg) = (model.clip.clone(), config.cfg.clone());
    let stop = Arc::new(AtomicBool::new(false));
    interruptible(py, stop, false, move || -> Result<Vec<Vec<f32>>> {
        let clip = lock(&clip);
        let text = clipmask::prompts::text_features(&clip, &cfg)?;
        let mut out = Vec::new();
        for (i, a) in args.into_iter().enumerate() {
            let (img, what) = load_named(a, i, clipmask::image_input::DEFAULT_MAX_PIXELS)?;
            out.push(clipmask::prompts::zero_shot_image(&clip, &text, &img).with_context(|| what)?);
        }
        Ok(out)
    })?
    .map_err(images_err)
}

/// Image-level labels predicted by TagCLIP (`tag`): per image, (scores per class, chosen class
/// indices).
#[pyfunction]
#[pyo3(signature = (model, config, images, threshold=None, max_side=None))]
fn tag(
    py: Python<'_>,
    model: &Model,
    config: &Config,
    images: Vec<Bound<'_, PyAny>>,
    threshold: Option<f64>,
    max_side: Option<u32>,
) -> PyResult<Vec<(Vec<f32>, Vec<usize>)>> {
    let threshold = threshold.unwrap_or(clipmask::tagclip::DEFAULT_THRESHOLD);
    clipmask::cli::tag::check_threshold("threshold", threshold).map_err(value_err)?;
    let args: Vec<ImageArg> = images.iter().map(image_arg).collect::<PyResult<_>>()?;
    let (clip, cfg) = (model.clip.clone(), config.cfg.clone());
    let stop = Arc::new(AtomicBool::new(false));
    interruptible(py, stop, false, move || -> Result<Vec<(Vec<f32>, Vec<usize>)>> {
        let clip = lock(&clip);
        let opts =
            clipmask::tagclip::TagOptions { threshold, max_side: Some(max_side.unwrap_or(1024)), ..Default::default() };
        let text = clipmask::tagclip::text_features(&clip, &cfg, false, None)?;
        let mut out = Vec::new();
        for (i, a) in args.into_iter().enumerate() {
            let (img, what) = load_named(a, i, clipmask::image_input::DEFAULT_MAX_PIXELS)?;
            let p = clipmask::image_input::prepare(&img, clip.visual.patch, opts.max_side);
            let tags = clipmask::tagclip::tag_image(&clip, &text, &p, &opts).with_context(|| what)?;
            let chosen = clipmask::tagclip::select(&tags.scores, threshold);
            out.push((tags.scores, chosen));
        }
        Ok(out)
    })?
    .map_err(images_err)
}

/// The version line of `clipmask --version`.
#[pyfunction]
fn version_text() -> String {
    clipmask::cli::version_text()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(label_map, m)?)?;
    m.add_function(wrap_pyfunction!(crf, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(classify, m)?)?;
    m.add_function(wrap_pyfunction!(tag, m)?)?;
    m.add_function(wrap_pyfunction!(version_text, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<Config>()?;
    m.add_class::<Generator>()?;
    densecrf::register(m)?;
    Ok(())
}
