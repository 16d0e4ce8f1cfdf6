//! The main job, top to bottom: image -> model inputs -> vision trunk -> map source
//! (softmax-GradCAM or a dense source) -> CAA -> maps at original size -> labels -> files.
//!
//! [`generate`] runs a dataset as three stages joined by bounded queues, so that the model
//! device and the CPUs work at the same time:
//! 1. decode + resize on rayon threads, ahead of the model (`Run::spawn_decoder`);
//! 2. the model on the calling thread, images of one grid size batched (`maps.rs`, [`compute_batch`]);
//! 3. labels (CRF) and files on a pool of writer threads (`Run::spawn_writers`).
//!
//! A failure (bad file, model error, full disk) fails its image, never the batch or the run.
mod batches;
pub mod crf;
mod maps;
mod write;

pub use batches::{
    attention_bytes, resolve_budget as batches_budget, split_by_budget, AttentionShape, MemoryBudget, BUCKET_WINDOW,
};
pub use maps::{
    compute_batch, compute_maps, finish_image, image_maps, prepare_variants, HostCopies, HostMaps, ImageMaps,
    MapOptions, StageTimes, Unit, UnitMaps,
};
pub use write::write_confidence;

use crate::clip::Clip;
use crate::config::DatasetConfig;
use crate::datasets::Item;
use crate::errors::{panic_message, ImageError};
use crate::failures::{write_failures_file, Failure};
use crate::image_input::{load_rgb_limited, Prepared};
use crate::outputs::output_path;
use crate::progress::{peak_rss_mib, progress_bar};
use crate::prompts::TextFeatures;
use anyhow::{Context, Result};
use image::RgbImage;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Options of a `generate` run.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub out: PathBuf,
    pub maps: MapOptions,
    /// Background exponent for labels without CRF (docs/method.md §6).
    pub alpha: f32,
    /// Dense CRF + confidence instead of the plain argmax.
    pub crf: Option<crate::label_maps::CrfOptions>,
    pub save_cams: bool,
    /// How `--save-cams` stores the maps (dtype, stride).
    pub cams_storage: crate::outputs::CamStorage,
    pub overlays: bool,
    pub overwrite: bool,
    /// Pixel budget: images whose header claims more are failures (`--max-pixels`).
    pub max_pixels: u64,
    /// Grayscale (default) or palette label PNGs.
    pub mask_format: crate::outputs::MaskFormat,
    /// Model inputs per batch (images of one grid size; each scale and flip is an input).
    pub batch_size: usize,
    /// Device bytes a batch's attention may take (`--max-gpu-mem`, resolved): a batch whose
    /// estimate ([`attention_bytes`]) is larger runs as several smaller ones. None: no bound.
    pub max_gpu_mem: Option<u64>,
    /// This process's shard: its failures go to `failures.I-of-N.jsonl` (the whole run's to
    /// `failures.jsonl`), so that shards never write the same file.
    pub shard: crate::cluster::Shard,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    pub total: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub interrupted: bool,
    pub seconds: f64,
    /// Images per second over the run (done / seconds).
    pub images_per_s: f64,
    /// Stage seconds summed over images, and so over the stage's workers (`stage_workers`):
    /// decode and write (with the CRF) run on several threads at once, so their sums are
    /// worker-seconds; stages also overlap. Any of them can exceed `seconds`.
    pub stages: StageTimes,
    /// Per stage, images per second of one worker of that stage (images / summed stage seconds);
    /// the stage's throughput is up to `stage_workers` times this.
    pub stage_images_per_s: BTreeMap<String, f64>,
    /// Threads working on each stage at once (decode, model, write): the stages whose times
    /// are summed over more than one worker.
    pub stage_workers: BTreeMap<String, usize>,
    /// Model inputs per batch.
    pub batch_size: usize,
    /// Batches the model ran (`compute_batch` calls, retries of a failed batch not counted):
    /// more than the inputs / batch size when grid sizes or `--max-gpu-mem` split them.
    pub model_batches: usize,
    /// Peak resident memory of the process, MiB (Linux).
    pub peak_rss_mib: Option<f64>,
}

/// What the decode stage hands to the model stage.
struct Decoded {
    item: Item,
    image: Result<(RgbImage, Vec<Prepared>), ImageError>,
    seconds: f64,
}

/// An image with its maps.
type Computed = (RgbImage, ImageMaps);

/// An image ready for the writers.
type ToWrite = (Item, RgbImage, ImageMaps);

/// What a writer reports: the write seconds, or why the image failed.
type Outcome = (Item, Result<f64, ImageError>);

fn is_complete(item: &Item, opts: &GenerateOptions) -> bool {
    // An invalid id has no output path: never complete (it fails with its reason).
    // Regular files only: a link planted at an output name is not a finished output.
    let exists = |kind: &str, ext: &str| {
        output_path(&opts.out, kind, &item.id, ext).is_ok_and(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
    };
    exists("masks", "png")
        && (!opts.save_cams || exists("cams", "npz"))
        && (!opts.crf.as_ref().is_some_and(|c| c.save_confidence) || exists("confidence", "npy"))
        && (!opts.overlays || exists("overlays", "jpg"))
}

/// Images the decoder hands to rayon at once.
fn decode_chunk(batch: usize) -> usize {
    batch.max(4)
}

/// Writer threads: with the CRF as many as its backend runs images at once (one per core for
/// the CPU CRF, about as costly as the model on CPU), else one.
fn writer_threads(opts: &GenerateOptions) -> usize {
    opts.crf.as_ref().map_or(1, |c| c.backend.concurrent_images())
}

/// Threads working on each stage at once (`Summary::stage_workers`).
fn stage_workers(opts: &GenerateOptions) -> BTreeMap<String, usize> {
    let decode = rayon::current_num_threads().min(decode_chunk(opts.batch_size.max(1)));
    [("decode", decode), ("model", 1), ("write", writer_threads(opts))]
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect()
}

/// The directories a run writes temporary files into.
pub fn temp_dirs(out: &std::path::Path) -> Vec<PathBuf> {
    std::iter::once(out.to_path_buf())
        .chain(["masks", "cams", "overlays", "confidence"].iter().map(|k| out.join(k)))
        .collect()
}

/// Runs the whole dataset (see the module docs). A bad image is recorded in
/// `OUT/failures.jsonl` and skipped; `stop` (set by the first signal, [`crate::signals`]) ends
/// the run after the batch in flight.
pub fn generate(
    model: &Clip,
    text: &TextFeatures,
    cfg: &DatasetConfig,
    items: Vec<Item>,
    opts: &GenerateOptions,
    stop: Arc<AtomicBool>,
) -> Result<Summary> {
    let (mut run, todo) = Run::start(opts, items, stop)?;
    let decoded = run.spawn_decoder(todo, model.visual.patch);
    let (to_write, outcomes, writers) =
        run.spawn_writers(cfg.png_palette(), cfg.class_names().iter().map(|s| s.to_string()).collect());
    run.model_stage(model, text, decoded.0, &to_write, &outcomes);
    drop(to_write);
    let _ = decoded.1.join();
    for w in writers {
        let _ = w.join();
    }
    for (item, r) in outcomes.try_iter() {
        run.record(item, r);
    }
    run.finish()
}

/// State of one `generate` run.
struct Run<'a> {
    opts: &'a GenerateOptions,
    stop: Arc<AtomicBool>,
    start: Instant,
    summary: Summary,
    failures: Vec<(Item, ImageError)>,
    attempted: HashSet<String>,
    bar: indicatif::ProgressBar,
    last_line: Instant,
}

impl<'a> Run<'a> {
    /// Creates OUT, sweeps stale temporaries, and splits the items into work and images already
    /// complete.
    fn start(opts: &'a GenerateOptions, items: Vec<Item>, stop: Arc<AtomicBool>) -> Result<(Self, Vec<Item>)> {
        let masks_dir = opts.out.join("masks");
        std::fs::create_dir_all(&masks_dir)
            .with_context(|| format!("cannot create output directory {}", masks_dir.display()))?;
        // Temporary files of runs that were killed (SIGKILL, power loss) are removed.
        crate::files::sweep_temp_files(&temp_dirs(&opts.out), false);
        let total = items.len();
        let (todo, done_before): (Vec<Item>, Vec<Item>) =
            items.into_iter().partition(|it| opts.overwrite || !is_complete(it, opts));
        let summary = Summary {
            total,
            skipped: done_before.len(),
            batch_size: opts.batch_size.max(1),
            stage_workers: stage_workers(opts),
            ..Default::default()
        };
        let bar = progress_bar(todo.len() as u64, "image");
        let run = Run {
            opts,
            stop,
            start: Instant::now(),
            summary,
            failures: Vec::new(),
            attempted: HashSet::new(),
            bar,
            last_line: Instant::now(),
        };
        Ok((run, todo))
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Stage 1: decode + resize (every scale and flip) ahead of the model, on rayon, into a
    /// queue of a few batches.
    fn spawn_decoder(&self, todo: Vec<Item>, patch: i64) -> (mpsc::Receiver<Decoded>, JoinHandle<()>) {
        let batch = self.opts.batch_size.max(1);
        let (tx, rx) = mpsc::sync_channel::<Decoded>(2 * batch + 4);
        let (stop, max_pixels, map_opts) = (self.stop.clone(), self.opts.max_pixels, self.opts.maps.clone());
        let handle = std::thread::spawn(move || {
            use rayon::prelude::*;
            for chunk in todo.chunks(decode_chunk(batch)) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let decoded: Vec<Decoded> = chunk
                    .par_iter()
                    .map(|item| {
                        let t = Instant::now();
                        let image = match &item.labels {
                            Err(e) => Err(ImageError::Labels(e.clone())),
                            Ok(_) => load_rgb_limited(&item.path, max_pixels)
                                .map(|img| {
                                    let p = prepare_variants(&img, patch, &map_opts);
                                    (img, p)
                                })
                                .map_err(|e| ImageError::Decode(format!("{e:#}"))),
                        };
                        Decoded { item: item.clone(), image, seconds: t.elapsed().as_secs_f64() }
                    })
                    .collect();
                for d in decoded {
                    if tx.send(d).is_err() {
                        return;
                    }
                }
            }
        });
        (rx, handle)
    }

    /// Stage 3: labels and files off the model thread. With the CRF (about as costly as the
    /// model on CPU) one writer per core, behind a bounded queue.
    fn spawn_writers(
        &self,
        palette: Vec<u8>,
        class_names: Vec<String>,
    ) -> (mpsc::SyncSender<ToWrite>, mpsc::Receiver<Outcome>, Vec<JoinHandle<()>>) {
        let n = writer_threads(self.opts);
        let (tx, rx) = mpsc::sync_channel::<ToWrite>(2 * n);
        let (res_tx, res_rx) = mpsc::channel::<Outcome>();
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..n)
            .map(|_| {
                let (opts, palette, names, rx, res_tx, stop) = (
                    self.opts.clone(),
                    palette.clone(),
                    class_names.clone(),
                    rx.clone(),
                    res_tx.clone(),
                    self.stop.clone(),
                );
                std::thread::spawn(move || loop {
                    let next = rx.lock().map(|rx| rx.recv());
                    let Ok(Ok((item, img, maps))) = next else { return };
                    // Stopping: images still queued are left for the next run.
                    if stop.load(Ordering::SeqCst) {
                        continue;
                    }
                    let t = Instant::now();
                    let r = write::write_outputs(&item, &img, &maps, &opts, &palette, &names)
                        .map(|_| t.elapsed().as_secs_f64())
                        .map_err(|e| ImageError::Write(format!("{e:#}")));
                    if res_tx.send((item, r)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        (tx, res_rx, handles)
    }

    /// Stage 2: the model, on this thread, a batch of decoded images at a time.
    fn model_stage(
        &mut self,
        model: &Clip,
        text: &TextFeatures,
        decoded: mpsc::Receiver<Decoded>,
        to_write: &mpsc::SyncSender<ToWrite>,
        outcomes: &mpsc::Receiver<Outcome>,
    ) {
        // A window of a few batches' images, so that inputs of one grid size fill batches
        // (bucketing, pipeline/batches.rs).
        let window = self.opts.batch_size.max(1) * BUCKET_WINDOW;
        loop {
            let Ok(first) = decoded.recv() else { break };
            let mut chunk = vec![first];
            while chunk.len() < window {
                match decoded.recv() {
                    Ok(d) => chunk.push(d),
                    Err(_) => break,
                }
            }
            if self.stopping() {
                self.summary.interrupted = true;
                break;
            }
            for (item, r) in self.model_chunk(model, text, chunk) {
                match r {
                    Ok((img, maps)) => {
                        self.summary.stages.add(&maps.times);
                        if to_write.send((item, img, maps)).is_err() {
                            return;
                        }
                    }
                    Err(e) => self.record(item, Err(e)),
                }
            }
            while let Ok((item, r)) = outcomes.try_recv() {
                self.record(item, r);
            }
            self.report_progress();
        }
        if self.stopping() {
            self.summary.interrupted = true;
        }
    }

    /// Maps of a chunk of decoded images: their inputs grouped by grid size into batches of
    /// at most `batch_size`; a batch that fails is retried one input at a time, so that only
    /// the input at fault fails (with its image).
    fn model_chunk(
        &mut self,
        model: &Clip,
        text: &TextFeatures,
        chunk: Vec<Decoded>,
    ) -> Vec<(Item, Result<Computed, ImageError>)> {
        let opts = self.opts;
        let host = HostCopies {
            maps: opts.save_cams || opts.crf.is_some(),
            labels_alpha: opts.crf.is_none().then_some(opts.alpha),
        };
        // Images that reach the model, with their labels.
        let mut ready: Vec<(Item, RgbImage, Vec<Prepared>, Vec<usize>)> = Vec::new();
        let mut out = Vec::new();
        for Decoded { item, image, seconds } in chunk {
            self.summary.stages.decode += seconds;
            let checked = image.and_then(|(img, variants)| {
                let labels = item.labels.clone().map_err(ImageError::Labels)?;
                // The maps at full size (raw and refined, each on the device and on the host, per
                // input) must fit: probed first, as a failed allocation in Rust aborts.
                let map_bytes =
                    (labels.len() as u64) * (img.width() as u64 * img.height() as u64) * 4 * 4 * variants.len() as u64;
                crate::files::probe_alloc(map_bytes, &format!("maps of {}", item.path.display()))
                    .map_err(|e| ImageError::Model(format!("{e:#}")))?;
                Ok((img, variants, labels))
            });
            match checked {
                Ok((img, variants, labels)) => ready.push((item, img, variants, labels)),
                Err(e) => out.push((item, Err(e))),
            }
        }
        let inputs: Vec<(&[Prepared], &[usize])> =
            ready.iter().map(|(_, _, variants, labels)| (variants.as_slice(), labels.as_slice())).collect();
        let (maps, batches) = images_maps(model, text, &inputs, &opts.maps, opts.batch_size, opts.max_gpu_mem, host);
        self.summary.model_batches += batches;
        for ((item, img, _, _), r) in ready.into_iter().zip(maps) {
            out.push((item, r.map(|maps| (img, maps))));
        }
        out
    }

    /// Counts one image's outcome.
    fn record(&mut self, item: Item, r: Result<f64, ImageError>) {
        self.bar.inc(1);
        self.attempted.insert(item.id.clone());
        match r {
            Ok(write_s) => {
                self.summary.done += 1;
                self.summary.stages.write += write_s;
            }
            Err(e) => {
                self.summary.failed += 1;
                self.failures.push((item, e));
            }
        }
    }

    /// Stage speeds on the bar, or a line every 10 s when stderr is not a terminal.
    fn report_progress(&mut self) {
        let s = &self.summary.stages;
        let n = self.bar.position() as f64;
        // Stage seconds are summed over the stage's workers: these are one worker's speeds.
        let rate = |t: f64| if n > 0.0 && t > 0.0 { format!("{:.1}", n / t) } else { "-".to_string() };
        let workers = |k: &str| self.summary.stage_workers.get(k).copied().unwrap_or(1);
        let msg = format!(
            "img/s per worker: decode {} x{}, model {}, write {} x{}",
            rate(s.decode),
            workers("decode"),
            rate(s.forward + s.backward + s.caa),
            rate(s.write),
            workers("write")
        );
        self.bar.set_message(msg.clone());
        if self.bar.is_hidden() && self.last_line.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{} / {} images, {} ({msg})",
                self.bar.position(),
                self.bar.length().unwrap_or(0),
                crate::progress::rate_text(
                    Some(self.bar.position() as f64 / self.start.elapsed().as_secs_f64().max(1e-9)),
                    "image"
                )
            );
            self.last_line = Instant::now();
        }
    }

    /// failures.jsonl and the summary.
    fn finish(mut self) -> Result<Summary> {
        if self.stopping() {
            self.summary.interrupted = true;
        }
        self.bar.finish_and_clear();
        let failures: Vec<Failure> = std::mem::take(&mut self.failures)
            .into_iter()
            .map(|(item, e)| Failure {
                id: item.id,
                path: item.path.display().to_string(),
                stage: e.stage().to_string(),
                reason: e.to_string(),
            })
            .collect();
        let failures_file = self.opts.out.join(self.opts.shard.file_name("failures", "jsonl"));
        write_failures_file(&failures_file, &failures, &self.attempted)?;
        let mut s = self.summary;
        s.seconds = self.start.elapsed().as_secs_f64();
        s.images_per_s = s.done as f64 / s.seconds.max(1e-9);
        let processed = (s.done + s.failed) as f64;
        let st = s.stages;
        for (name, secs) in [
            ("decode", st.decode),
            ("model", st.forward + st.backward + st.caa),
            ("forward", st.forward),
            ("backward", st.backward),
            ("caa", st.caa),
            ("write", st.write),
        ] {
            if secs > 0.0 {
                s.stage_images_per_s.insert(name.to_string(), processed / secs);
            }
        }
        s.peak_rss_mib = peak_rss_mib();
        Ok(s)
    }
}

/// Maps of several images, each given as its prepared inputs (every scale and flip, from
/// [`prepare_variants`]) and its labels: inputs grouped by grid size into batches of at most
/// `batch_size`, split further so that a batch's attention estimate stays within
/// `max_gpu_mem` (pipeline/batches.rs); a batch that fails is retried one input at a time, so
/// that only the input at fault fails (with its image). One result per image, in order, and
/// the number of batches run. The model stage of [`generate`], and the Python API's batch form.
pub fn images_maps(
    model: &Clip,
    text: &TextFeatures,
    images: &[(&[Prepared], &[usize])],
    opts: &MapOptions,
    batch_size: usize,
    max_gpu_mem: Option<u64>,
    host: HostCopies,
) -> (Vec<Result<ImageMaps, ImageError>>, usize) {
    let grids: Vec<Vec<(i64, i64)>> = images.iter().map(|r| r.0.iter().map(|p| (p.gh, p.gw)).collect()).collect();
    let groups = batches::group_by_grid(&grids);
    let mut unit_maps: Vec<Vec<Option<Result<UnitMaps, ImageError>>>> =
        images.iter().map(|r| (0..r.0.len()).map(|_| None).collect()).collect();
    let batch = batch_size.max(1);
    let shape = AttentionShape {
        heads: model.config.vision_heads as u64,
        elem_bytes: model.kind.elt_size_in_bytes() as u64,
        kept_blocks: crate::affinity::AFFINITY_BLOCKS as u64,
        backward: opts.source.needs_backward(),
    };
    let mut n_batches = 0;
    for members in groups.values() {
        let costs: Vec<u64> = members
            .iter()
            .map(|&(i, v)| {
                let p = &images[i].0[v];
                attention_bytes((p.gh * p.gw + 1) as u64, images[i].1.len() as u64, &shape)
            })
            .collect();
        for range in split_by_budget(&costs, batch, max_gpu_mem) {
            let part = &members[range];
            n_batches += 1;
            let units: Vec<Unit> =
                part.iter().map(|&(i, v)| Unit { prepared: &images[i].0[v], labels: images[i].1 }).collect();
            let results = match guarded(|| compute_batch(model, text, &units, opts)) {
                Ok(maps) => maps.into_iter().map(Ok).collect(),
                // Alone, each input fails (or not) for its own reasons.
                Err(_) if units.len() > 1 => units
                    .iter()
                    .map(|u| {
                        guarded(|| compute_batch(model, text, std::slice::from_ref(u), opts)).map(|mut m| m.remove(0))
                    })
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            for (&(i, v), r) in part.iter().zip(results) {
                unit_maps[i][v] = Some(r);
            }
        }
    }
    let maps = images
        .iter()
        .zip(unit_maps)
        .map(|((_, labels), units)| {
            let units: Result<Vec<UnitMaps>, ImageError> =
                units.into_iter().map(|u| u.unwrap_or_else(|| Err(ImageError::Model("not computed".into())))).collect();
            units.and_then(|units| guarded(|| finish_image(labels, units, host)))
        })
        .collect();
    (maps, n_batches)
}

/// Runs `f`, turning an error or a panic (tch reports libtorch errors, such as running out of
/// memory on a huge input, as panics) into an image's model failure.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T, ImageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ImageError::Model(crate::errors::one_line_reason(&format!("{e:#}")))),
        Err(p) => Err(ImageError::Model(panic_message(p.as_ref()))),
    }
}
