//! Dense CRF benchmark (scripts/bench_crf.py runs it next to pydensecrf).
//!
//! crf_bench single     [--photos DIR] [--labels 21,3] [--repeats 5] [--dump DIR]
//!     Time per image of `dense_crf` on one 500x375 photo (faithful image, CLIP-ES parameters),
//!     after one warm-up run; `dense_crf` runs an image on one thread. --dump writes the exact
//!     inputs as .npy
//!     (image_{L}.npy, probs_{L}.npy) so that pydensecrf can be timed on the same data.
//! crf_bench throughput [--photos DIR] [--labels 21,3] [--repeats 3]
//!     Images per second over all photos of DIR, rayon across images, all threads.
//! crf_bench dims       [--photos DIR] [--labels 21,3] [--repeats 3] [--dims 2,3,5,6,16]
//!     The general engine (`DenseCrf`, one thread) on one 500x375 photo with one
//!     addPairwiseEnergy term of D dimensions: the bilateral features (x/67, y/67, r/3, g/3,
//!     b/3), their first D when D < 5, zero columns after them when D > 5. Seconds to build
//!     the term and per mean-field iteration, per D: 2 and 5 take the specialised paths
//!     (vectorised simplex, fixed-size loops), the others the generic ones.
//! Prints one JSON object.
use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use clipmask::crf::{crf_image, dense_crf, Compat, CrfImage, CrfParams, DenseCrf, KernelType, Normalization};
use ndarray::ArrayView3;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Seconds per image on one 500x375 photo, one thread per image.
    Single,
    /// Images per second over all photos, rayon across images.
    Throughput,
    /// The general engine with features of several dimensions, one thread.
    Dims,
}

#[derive(Parser)]
#[command(about = "Time clipmask's dense CRF (CLIP-ES parameters, faithful image); prints one JSON object")]
struct Args {
    /// What to time.
    #[arg(value_enum, default_value_t = Mode::Single)]
    mode: Mode,
    /// Photos (.jpg, .png); synthetic images stand in when there are none.
    #[arg(long, default_value_os_t = default_photos())]
    photos: PathBuf,
    /// Label counts (background included), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "21,3")]
    labels: Vec<usize>,
    /// Timed runs per label count [default: 5 single, 3 throughput].
    #[arg(long)]
    repeats: Option<usize>,
    /// single: write the timed inputs as image_{L}.npy and probs_{L}.npy into DIR.
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
    /// dims: feature dimensions to time (1 to 16), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8,12,16")]
    dims: Vec<usize>,
}

fn default_photos() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/voc-sample/JPEGImages")
}

#[derive(Serialize)]
struct SingleResult {
    labels: usize,
    median_s: f64,
    times_s: Vec<f64>,
}

#[derive(Serialize)]
struct SingleReport {
    mode: &'static str,
    photo: String,
    width: usize,
    height: usize,
    threads: usize,
    repeats: usize,
    results: Vec<SingleResult>,
}

#[derive(Serialize)]
struct ThroughputResult {
    labels: usize,
    images: usize,
    median_s: f64,
    images_per_s: f64,
}

#[derive(Serialize)]
struct ThroughputReport {
    mode: &'static str,
    threads: usize,
    repeats: usize,
    results: Vec<ThroughputResult>,
}

struct Photo {
    name: String,
    rgb: Vec<u8>,
    w: usize,
    h: usize,
}

fn load_photos(dir: &Path) -> Vec<Photo> {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("png")));
    paths.sort();
    paths
        .iter()
        .filter_map(|p| {
            let img = image::open(p).ok()?.to_rgb8();
            Some(Photo {
                name: p.file_name()?.to_string_lossy().into_owned(),
                w: img.width() as usize,
                h: img.height() as usize,
                rgb: img.into_raw(),
            })
        })
        .collect()
}

/// Deterministic synthetic 500x375 stand-in when no photo is available.
fn synthetic(w: usize, h: usize) -> Photo {
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let v = ((x / 40 + y / 30) % 4) as u8 * 50;
            rgb.extend_from_slice(&[v.wrapping_add((x % 7) as u8), 255 - v, (x * 255 / w) as u8]);
        }
    }
    Photo { name: "synthetic".into(), rgb, w, h }
}

/// CLIP-ES-like P = [bg; maps]: smooth blobs per label scaled to [0, 1], bg = 1 - max.
fn probs(w: usize, h: usize, labels: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = w * h;
    let mut p = vec![0f32; labels * n];
    let sc = w.max(h) as f32;
    for k in 1..labels {
        let (bx, by) = (rng.random::<f32>() * w as f32, rng.random::<f32>() * h as f32);
        let r = sc * rng.random_range(0.05..0.3);
        for i in 0..n {
            let (x, y) = ((i % w) as f32, (i / w) as f32);
            p[k * n + i] = (-((x - bx).powi(2) + (y - by).powi(2)) / (2.0 * r * r)).exp();
        }
    }
    for i in 0..n {
        p[i] = 1.0 - (1..labels).map(|k| p[k * n + i]).fold(0f32, f32::max);
    }
    p
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn single(args: &Args, mut photos: Vec<Photo>, params: &CrfParams) -> Result<SingleReport> {
    let repeats = args.repeats.unwrap_or(5).max(1);
    let photo = match photos.iter().position(|p| p.w == 500 && p.h == 375) {
        Some(i) => photos.swap_remove(i),
        None => synthetic(500, 375),
    };
    let (w, h) = (photo.w, photo.h);
    let img = crf_image(&photo.rgb, CrfImage::Faithful);
    let mut results = vec![];
    for &l in &args.labels {
        let p = probs(w, h, l, 1);
        if let Some(dir) = &args.dump {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            ndarray_npy::write_npy(dir.join(format!("image_{l}.npy")), &ArrayView3::from_shape((h, w, 3), &img[..])?)?;
            ndarray_npy::write_npy(dir.join(format!("probs_{l}.npy")), &ArrayView3::from_shape((l, h, w), &p[..])?)?;
        }
        let _ = dense_crf(&img, w, h, &p, l, params)?; // warm-up
        let times_s = (0..repeats)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(dense_crf(&img, w, h, &p, l, params)?);
                Ok(t.elapsed().as_secs_f64())
            })
            .collect::<Result<Vec<f64>>>()?;
        results.push(SingleResult { labels: l, median_s: median(times_s.clone()), times_s });
    }
    Ok(SingleReport {
        mode: "single",
        photo: photo.name,
        width: w,
        height: h,
        threads: rayon::current_num_threads(),
        repeats,
        results,
    })
}

fn throughput(args: &Args, mut photos: Vec<Photo>, params: &CrfParams) -> Result<ThroughputReport> {
    let repeats = args.repeats.unwrap_or(3).max(1);
    if photos.is_empty() {
        photos = (0..8).map(|_| synthetic(500, 375)).collect();
    }
    let imgs: Vec<Vec<u8>> = photos.iter().map(|p| crf_image(&p.rgb, CrfImage::Faithful)).collect();
    let mut results = vec![];
    for &l in &args.labels {
        let ps: Vec<Vec<f32>> = photos.iter().enumerate().map(|(i, p)| probs(p.w, p.h, l, i as u64)).collect();
        let times = (0..repeats)
            .map(|_| {
                let t = Instant::now();
                photos.par_iter().zip(&imgs).zip(&ps).try_for_each(|((ph, img), p)| -> Result<()> {
                    std::hint::black_box(dense_crf(img, ph.w, ph.h, p, l, params)?);
                    Ok(())
                })?;
                Ok(t.elapsed().as_secs_f64())
            })
            .collect::<Result<Vec<f64>>>()?;
        let t = median(times);
        results.push(ThroughputResult {
            labels: l,
            images: photos.len(),
            median_s: t,
            images_per_s: photos.len() as f64 / t,
        });
    }
    Ok(ThroughputReport { mode: "throughput", threads: rayon::current_num_threads(), repeats, results })
}

#[derive(Serialize)]
struct DimsResult {
    labels: usize,
    dim: usize,
    build_s: f64,
    iteration_s: f64,
}

#[derive(Serialize)]
struct DimsReport {
    mode: &'static str,
    photo: String,
    repeats: usize,
    iterations: usize,
    results: Vec<DimsResult>,
}

fn dims(args: &Args, mut photos: Vec<Photo>) -> Result<DimsReport> {
    const ITERATIONS: usize = 10;
    let repeats = args.repeats.unwrap_or(3).max(1);
    let photo = match photos.iter().position(|p| p.w == 500 && p.h == 375) {
        Some(i) => photos.swap_remove(i),
        None => synthetic(500, 375),
    };
    let (w, h, n) = (photo.w, photo.h, photo.w * photo.h);
    // The bilateral features, feature-major (D, N).
    let mut base = vec![0f32; 5 * n];
    for i in 0..n {
        let (x, y) = ((i % w) as f32, (i / w) as f32);
        let px = &photo.rgb[i * 3..i * 3 + 3];
        for (k, v) in
            [x / 67.0, y / 67.0, px[0] as f32 / 3.0, px[1] as f32 / 3.0, px[2] as f32 / 3.0].into_iter().enumerate()
        {
            base[k * n + i] = v;
        }
    }
    let mut results = vec![];
    for &l in &args.labels {
        let p = probs(w, h, l, 1);
        let unary: Vec<f32> = p.iter().map(|&v| -v.clamp(1e-5, 1.0).ln()).collect();
        for &d in &args.dims {
            let mut f = base[..d.min(5) * n].to_vec();
            f.resize(d * n, 0.0);
            let mut build = vec![];
            let mut iter = vec![];
            for _ in 0..repeats {
                let mut crf = DenseCrf::new(n, l)?;
                crf.set_unary_energy(&unary)?;
                let t = Instant::now();
                crf.add_pairwise_energy(&f, d, Compat::Potts(4.0), KernelType::Diag, Normalization::Symmetric)?;
                build.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                std::hint::black_box(crf.inference(ITERATIONS, None)?);
                iter.push(t.elapsed().as_secs_f64() / ITERATIONS as f64);
            }
            results.push(DimsResult { labels: l, dim: d, build_s: median(build), iteration_s: median(iter) });
        }
    }
    Ok(DimsReport { mode: "dims", photo: photo.name, repeats, iterations: ITERATIONS, results })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let params = CrfParams::default();
    let photos = load_photos(&args.photos);
    let json = match args.mode {
        Mode::Single => serde_json::to_string(&single(&args, photos, &params)?)?,
        Mode::Throughput => serde_json::to_string(&throughput(&args, photos, &params)?)?,
        Mode::Dims => serde_json::to_string(&dims(&args, photos)?)?,
    };
    println!("{json}");
    Ok(())
}
