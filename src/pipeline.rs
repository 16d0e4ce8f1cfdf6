//! The main job, top to bottom: image -> model input -> vision trunk -> softmax-GradCAM ->
//! CAA -> maps at original size -> labels -> files. [`compute_maps`] is one image;
//! [`generate`] runs a dataset with decoding and writing overlapped with the model.
use crate::affinity::{affinity, box_mask, refine};
use crate::cam::grad_cam;
use crate::clip::Clip;
use crate::config::DatasetConfig;
use crate::datasets::Item;
use crate::image_input::{clipes_size, load_rgb_limited, resize_bicubic, to_tensor};
use crate::outputs::{output_path, write_label_png, write_overlay, CamArchive};
use crate::prompts::TextFeatures;
use anyhow::{Context, Result};
use image::RgbImage;
use ndarray::Array3;
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Settings of the map computation that change numbers.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// CAA box threshold (docs/method.md §5).
    pub box_threshold: f64,
    /// Cap on the longer side of the model input; maps are upsampled back to the original.
    pub max_side: Option<u32>,
    /// Round the interpolated positional table to fp16 as the reference does (docs/method.md §1).
    pub round_pos_fp16: bool,
}

/// Maps of one image at its original resolution.
pub struct ImageMaps {
    /// 0-based class indices, label order.
    pub keys: Vec<usize>,
    /// GradCAM maps (K, H, W), resized from the grid.
    pub raw: Array3<f32>,
    /// CAA-refined maps (K, H, W).
    pub refined: Array3<f32>,
    /// Softmax over labels + background words (diagnostics).
    pub probs: Vec<f32>,
    /// Seconds spent in each model-side stage for this image.
    pub times: StageTimes,
}

/// Where the time goes, in seconds (summed over images for a run). On CUDA the stages are
/// asynchronous, so only their sum is meaningful there.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct StageTimes {
    pub decode: f64,
    pub forward: f64,
    pub backward: f64,
    pub caa: f64,
    pub write: f64,
}

impl StageTimes {
    fn add(&mut self, o: &StageTimes) {
        self.decode += o.decode;
        self.forward += o.forward;
        self.backward += o.backward;
        self.caa += o.caa;
        self.write += o.write;
    }
}

/// The model-side input of an image: the resized, normalised tensor and its grid.
pub struct Prepared {
    pub input: Tensor,
    pub gh: i64,
    pub gw: i64,
    pub width: i64,
    pub height: i64,
}

/// docs/method.md §1: resize to patch multiples (Pillow bicubic), normalise.
pub fn prepare(img: &RgbImage, patch: i64, max_side: Option<u32>) -> Prepared {
    let (w, h) = (img.width(), img.height());
    let (iw, ih) = clipes_size(w, h, patch as u32, max_side);
    let input = if (iw, ih) == (w, h) { to_tensor(img) } else { to_tensor(&resize_bicubic(img, iw, ih)) };
    Prepared { input, gh: ih as i64 / patch, gw: iw as i64 / patch, width: w as i64, height: h as i64 }
}

/// docs/method.md §2, §4, §5 for one prepared image.
pub fn compute_maps(
    model: &Clip,
    text: &TextFeatures,
    p: &Prepared,
    labels: &[usize],
    opts: &MapOptions,
) -> Result<ImageMaps> {
    let vit = &model.visual;
    let device = model.device;
    let k = labels.len();
    let mut times = StageTimes::default();
    let t0 = Instant::now();
    let pos = vit.positional(p.gh, p.gw, opts.round_pos_fp16).to_device(device);
    let x = {
        let _g = tch::no_grad_guard();
        vit.embed(&p.input.to_device(device), &pos)
    };
    // Block L's attention comes from the gradient pass; CAA needs the 7 before it.
    let trunk = vit.trunk_keeping(x, vit.layers() - 1, crate::affinity::AFFINITY_BLOCKS - 1);
    let idx: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let idx = Tensor::from_slice(&idx).to_device(text.classes.device());
    let candidates =
        Tensor::cat(&[text.classes.index_select(0, &idx), text.background.shallow_clone()], 0).to_device(device);
    times.forward = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let cam = grad_cam(vit, model.logit_scale, &trunk.tokens, &candidates, k, p.gh, p.gw);
    times.backward = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();

    let _g = tch::no_grad_guard();
    let mut attentions: Vec<Tensor> = trunk.attentions.iter().map(|a| a.get(0)).collect();
    attentions.push(cam.last_attention.shallow_clone());
    let r = affinity(&attentions);

    let (gh, gw) = (p.gh as usize, p.gw as usize);
    let raw_cpu: Vec<f32> = Vec::<f32>::try_from(cam.maps.to_device(tch::Device::Cpu).reshape([-1]))?;
    let mut masks = Vec::with_capacity(k * gh * gw);
    for c in 0..k {
        masks.extend(box_mask(&raw_cpu[c * gh * gw..(c + 1) * gh * gw], gh, gw, opts.box_threshold));
    }
    let masks = Tensor::from_slice(&masks).reshape([k as i64, (gh * gw) as i64]);
    let refined = refine(&r, &cam.maps, &masks);

    let raw = upsample(&cam.maps, p.height, p.width)?;
    let refined = upsample(&refined, p.height, p.width)?;
    let probs = Vec::<f32>::try_from(cam.probs.to_device(tch::Device::Cpu))?;
    times.caa = t2.elapsed().as_secs_f64();
    Ok(ImageMaps { keys: labels.to_vec(), raw, refined, probs, times })
}

/// Bilinear resize with half-pixel centres (cv2.resize INTER_LINEAR), (K,h,w) -> (K,H,W).
fn upsample(maps: &Tensor, height: i64, width: i64) -> Result<Array3<f32>> {
    let k = maps.size()[0];
    let up = maps.to_kind(Kind::Float).unsqueeze(0).upsample_bilinear2d([height, width], false, None, None);
    let v = Vec::<f32>::try_from(up.to_device(tch::Device::Cpu).reshape([-1]))?;
    Ok(Array3::from_shape_vec((k as usize, height as usize, width as usize), v)?)
}

/// Dense CRF and confidence step (docs/method.md §6).
#[derive(Debug, Clone)]
pub struct CrfOptions {
    pub params: crate::crf::CrfParams,
    pub image: crate::crf::CrfImage,
    /// Pixels whose largest marginal is below this become 255 (ignore).
    pub confidence: f32,
    /// Also write OUT/confidence/<id>.npy (largest marginal per pixel, float32 H x W).
    pub save_confidence: bool,
}

/// Pseudo-labels from the CRF: P = [(1 - max_c M_c)^alpha; M_1..M_K] (alpha = 1 in CLIP-ES),
/// marginals Q, argmax with ids [0, key_1 + 1, ...], 255 where max Q < confidence. Returns the
/// labels and the largest marginal per pixel.
pub fn crf_labels(
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
    let q = crate::crf::dense_crf(&image, w, h, &probs, k + 1, &crf.params)?;
    let mut ids = vec![0u8];
    ids.extend(keys.iter().map(|&c| (c + 1) as u8));
    Ok(crate::crf::labels_from_marginals(&q, k + 1, &ids, crf.confidence))
}

/// Options of a `generate` run.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub out: PathBuf,
    pub maps: MapOptions,
    /// Background exponent for labels without CRF (docs/method.md §6).
    pub alpha: f32,
    /// Dense CRF + confidence instead of the plain argmax.
    pub crf: Option<CrfOptions>,
    pub save_cams: bool,
    pub overlays: bool,
    pub overwrite: bool,
    /// Pixel budget: images whose header claims more are failures (`--max-pixels`).
    pub max_pixels: u64,
    /// Grayscale (default) or palette label PNGs.
    pub mask_format: crate::outputs::MaskFormat,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    pub total: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub interrupted: bool,
    pub seconds: f64,
    /// Stage times summed over images (stages overlap, so they can exceed `seconds`).
    pub stages: StageTimes,
    /// Peak resident memory of the process, MiB (Linux).
    pub peak_rss_mib: Option<f64>,
}

/// One line of `OUT/failures.jsonl`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub id: String,
    pub path: String,
    pub reason: String,
}

/// What the decode stage hands to the model stage.
struct Decoded {
    item: Item,
    image: Result<(RgbImage, Prepared), String>,
    seconds: f64,
}

fn is_complete(item: &Item, opts: &GenerateOptions) -> bool {
    // An invalid id has no output path: never complete (it fails with its reason).
    let exists = |kind: &str, ext: &str| output_path(&opts.out, kind, &item.id, ext).is_ok_and(|p| p.exists());
    exists("masks", "png")
        && (!opts.save_cams || exists("cams", "npz"))
        && (!opts.crf.as_ref().is_some_and(|c| c.save_confidence) || exists("confidence", "npy"))
        && (!opts.overlays || exists("overlays", "jpg"))
}

/// The directories a run writes temporary files into.
pub fn temp_dirs(out: &std::path::Path) -> Vec<PathBuf> {
    std::iter::once(out.to_path_buf())
        .chain(["masks", "cams", "overlays", "confidence"].iter().map(|k| out.join(k)))
        .collect()
}

/// Runs the whole dataset: decode (parallel, ahead of the model) -> maps (model thread) ->
/// labels and files (writer thread). A bad image is recorded in `OUT/failures.jsonl` and
/// skipped; `stop` (set by the first signal, [`crate::signals`]) ends the run after the image
/// in flight.
pub fn generate(
    model: &Clip,
    text: &TextFeatures,
    cfg: &DatasetConfig,
    items: Vec<Item>,
    opts: &GenerateOptions,
    stop: Arc<AtomicBool>,
) -> Result<Summary> {
    let masks_dir = opts.out.join("masks");
    std::fs::create_dir_all(&masks_dir)
        .with_context(|| format!("cannot create output directory {}", masks_dir.display()))?;
    // Temporary files of runs that were killed (SIGKILL, power loss) are removed.
    crate::files::sweep_temp_files(&temp_dirs(&opts.out), false);
    let start = Instant::now();
    let total = items.len();
    let (todo, done_before): (Vec<Item>, Vec<Item>) =
        items.into_iter().partition(|it| opts.overwrite || !is_complete(it, opts));
    let mut summary = Summary { total, skipped: done_before.len(), ..Default::default() };
    let mut failures: Vec<(Item, String)> = Vec::new();

    let bar = progress_bar(todo.len() as u64);
    let patch = model.visual.patch;
    let max_side = opts.maps.max_side;
    let max_pixels = opts.max_pixels;

    // Stage 1: decode + resize ahead of the model, a few images at a time, on rayon.
    let (dec_tx, dec_rx) = mpsc::sync_channel::<Decoded>(8);
    let stop_dec = stop.clone();
    let decoder = std::thread::spawn(move || {
        use rayon::prelude::*;
        for chunk in todo.chunks(4) {
            if stop_dec.load(Ordering::SeqCst) {
                break;
            }
            let decoded: Vec<Decoded> = chunk
                .par_iter()
                .map(|item| {
                    let t = Instant::now();
                    let image = match &item.labels {
                        Err(e) => Err(e.clone()),
                        Ok(_) => load_rgb_limited(&item.path, max_pixels)
                            .map(|img| {
                                let p = prepare(&img, patch, max_side);
                                (img, p)
                            })
                            .map_err(|e| format!("{e:#}")),
                    };
                    Decoded { item: item.clone(), image, seconds: t.elapsed().as_secs_f64() }
                })
                .collect();
            for d in decoded {
                if dec_tx.send(d).is_err() {
                    return;
                }
            }
        }
    });

    // Stage 3: labels and files, off the model thread.
    let (out_tx, out_rx) = mpsc::sync_channel::<(Item, RgbImage, ImageMaps)>(4);
    let (res_tx, res_rx) = mpsc::channel::<(Item, Result<f64, String>)>();
    // Several writers when the CRF runs (it costs about as much as the model on CPU).
    let n_writers = if opts.crf.is_some() { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { 1 };
    let out_rx = Arc::new(std::sync::Mutex::new(out_rx));
    let writers: Vec<_> = (0..n_writers)
        .map(|_| {
            let (wopts, palette, out_rx, res_tx) = (opts.clone(), cfg.png_palette(), out_rx.clone(), res_tx.clone());
            let stop = stop.clone();
            std::thread::spawn(move || loop {
                let next = out_rx.lock().map(|rx| rx.recv());
                let Ok(Ok((item, img, maps))) = next else { return };
                // Stopping: images still queued are left for the next run.
                if stop.load(Ordering::SeqCst) {
                    continue;
                }
                let t = Instant::now();
                let r = write_outputs(&item, &img, &maps, &wopts, &palette)
                    .map(|_| t.elapsed().as_secs_f64())
                    .map_err(|e| format!("{e:#}"));
                if res_tx.send((item, r)).is_err() {
                    return;
                }
            })
        })
        .collect();
    drop(res_tx);

    let mut last_line = Instant::now();
    let mut attempted: HashSet<String> = HashSet::new();
    let mut handle_result =
        |summary: &mut Summary, failures: &mut Vec<(Item, String)>, item: Item, r: Result<f64, String>| {
            attempted.insert(item.id.clone());
            match r {
                Ok(write_s) => {
                    summary.done += 1;
                    summary.stages.write += write_s;
                }
                Err(e) => {
                    summary.failed += 1;
                    failures.push((item, e));
                }
            }
        };

    // Stage 2: the model, on this thread.
    for d in dec_rx.iter() {
        if stop.load(Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let Decoded { item, image, seconds } = d;
        summary.stages.decode += seconds;
        let computed = image.and_then(|(img, prepared)| {
            let labels = item.labels.clone()?;
            // The maps at full size (raw and refined, each as a tensor and a copy) must fit:
            // probed first, as a failed allocation in Rust aborts the process.
            let map_bytes = (labels.len() as u64) * (prepared.width * prepared.height) as u64 * 4 * 4;
            crate::files::probe_alloc(map_bytes, &format!("maps of {}", item.path.display()))
                .map_err(|e| format!("{e:#}"))?;
            // libtorch errors (out of memory on a huge input, ...) surface as panics in tch:
            // they fail this image, not the run.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                compute_maps(model, text, &prepared, &labels, &opts.maps)
            }));
            match r {
                Ok(m) => m.map(|m| (img, m)).map_err(|e| format!("{e:#}")),
                Err(p) => Err(format!("model error: {}", panic_message(&p))),
            }
        });
        match computed {
            Ok((img, maps)) => {
                summary.stages.add(&maps.times);
                if out_tx.send((item, img, maps)).is_err() {
                    break;
                }
            }
            Err(e) => {
                bar.inc(1);
                handle_result(&mut summary, &mut failures, item, Err(e));
            }
        }
        while let Ok((item, r)) = res_rx.try_recv() {
            bar.inc(1);
            handle_result(&mut summary, &mut failures, item, r);
        }
        if bar.is_hidden() && last_line.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{} / {} images, {:.2} images/s",
                bar.position(),
                bar.length().unwrap_or(0),
                bar.position() as f64 / start.elapsed().as_secs_f64()
            );
            last_line = Instant::now();
        }
    }
    if stop.load(Ordering::SeqCst) {
        summary.interrupted = true;
    }
    drop(dec_rx);
    drop(out_tx);
    let _ = decoder.join();
    for w in writers {
        let _ = w.join();
    }
    for (item, r) in res_rx.try_iter() {
        bar.inc(1);
        handle_result(&mut summary, &mut failures, item, r);
    }
    bar.finish_and_clear();
    let failures: Vec<Failure> = failures
        .into_iter()
        .map(|(item, reason)| Failure { id: item.id, path: item.path.display().to_string(), reason })
        .collect();
    write_failures(&opts.out, &failures, &attempted)?;
    summary.seconds = start.elapsed().as_secs_f64();
    summary.peak_rss_mib = peak_rss_mib();
    Ok(summary)
}

fn write_outputs(item: &Item, img: &RgbImage, maps: &ImageMaps, opts: &GenerateOptions, palette: &[u8]) -> Result<()> {
    let keys: Vec<i64> = maps.keys.iter().map(|&k| k as i64).collect();
    let (w, h) = (img.width(), img.height());
    let labels = match &opts.crf {
        None => crate::eval::labels_from_cams(&maps.refined, &keys, opts.alpha),
        Some(crf) => {
            let (labels, conf) = crf_labels(img, &maps.refined, &keys, opts.alpha, crf)?;
            if crf.save_confidence {
                write_confidence(&output_path(&opts.out, "confidence", &item.id, "npy")?, conf, h, w)?;
            }
            labels
        }
    };
    // Maps and overlays first, the mask last: the mask's presence marks the image complete.
    if opts.save_cams {
        let archive = CamArchive { keys: keys.clone(), cams: maps.refined.clone(), raw_cams: maps.raw.clone() };
        archive.write(&output_path(&opts.out, "cams", &item.id, "npz")?)?;
    }
    if opts.overlays {
        write_overlay(&output_path(&opts.out, "overlays", &item.id, "jpg")?, img, &labels, palette, 0.55)?;
    }
    let png_palette = (opts.mask_format == crate::outputs::MaskFormat::Palette).then_some(palette);
    write_label_png(&output_path(&opts.out, "masks", &item.id, "png")?, &labels, w, h, png_palette)
}

/// Largest CRF marginal per pixel as a float32 H x W `.npy`.
pub fn write_confidence(path: &std::path::Path, conf: Vec<f32>, h: u32, w: u32) -> Result<()> {
    use ndarray_npy::WriteNpyExt;
    let arr = ndarray::Array2::from_shape_vec((h as usize, w as usize), conf)?;
    crate::outputs::write_atomic(path, |f| Ok(arr.write_npy(f)?))
}

/// Updates OUT/failures.jsonl: entries of images this run attempted are replaced by this run's
/// outcome, others (other shards, images not reached) are kept. A lock on the output directory
/// serialises shards that finish at the same time.
pub fn write_failures(out: &std::path::Path, failures: &[Failure], attempted: &HashSet<String>) -> Result<()> {
    let path = out.join("failures.jsonl");
    let lock = std::fs::File::open(out).with_context(|| format!("cannot open {}", out.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let id = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["id"].as_str().map(String::from));
            id.is_some_and(|id| !attempted.contains(&id))
        })
        .map(String::from)
        .collect();
    for f in failures {
        lines.push(serde_json::to_string(f)?);
    }
    let r = if lines.is_empty() {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    } else {
        crate::outputs::write_atomic(&path, |w| {
            use std::io::Write;
            for l in &lines {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })
    };
    let _ = lock.unlock();
    r
}

pub fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::hidden())
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// VmHWM from /proc/self/status.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The first line of a panic payload (tch wraps libtorch's C++ exceptions in panics).
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown error".into());
    msg.lines().next().unwrap_or("").to_string()
}
