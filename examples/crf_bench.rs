//! Dense CRF benchmark (scripts/bench_crf.py runs it next to pydensecrf).
//!
//! crf_bench single     [--photos DIR] [--labels 21,3] [--repeats 5] [--dump DIR]
//!     Time per image of `dense_crf` on one 500x375 photo (faithful image, CLIP-ES parameters),
//!     after one warm-up run; `dense_crf` runs an image on one thread. --dump writes the exact
//!     inputs as .npy
//!     (image_{L}.npy, probs_{L}.npy) so that pydensecrf can be timed on the same data.
//! crf_bench throughput [--photos DIR] [--labels 21,3] [--repeats 3]
//!     Images per second over all photos of DIR, rayon across images, all threads.
//! Prints one JSON object.
use clipmask::crf::{crf_image, dense_crf, CrfImage, CrfParams};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) as f32) / (1u64 << 31) as f32
    };
    let n = w * h;
    let mut p = vec![0f32; labels * n];
    let sc = w.max(h) as f32;
    for k in 1..labels {
        let (bx, by, r) = (rnd() * w as f32, rnd() * h as f32, sc * (0.05 + 0.25 * rnd()));
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

fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "single".into());
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let photos_dir = opt("--photos")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/voc-sample/JPEGImages"));
    let labels: Vec<usize> =
        opt("--labels").unwrap_or_else(|| "21,3".into()).split(',').map(|s| s.trim().parse().unwrap()).collect();
    let params = CrfParams::default();
    let mut photos = load_photos(&photos_dir);
    let threads = rayon::current_num_threads();
    let mut results = vec![];
    match mode.as_str() {
        "single" => {
            let repeats: usize = opt("--repeats").map(|s| s.parse().unwrap()).unwrap_or(5);
            let photo = match photos.iter().position(|p| p.w == 500 && p.h == 375) {
                Some(i) => photos.swap_remove(i),
                None => synthetic(500, 375),
            };
            let img = crf_image(&photo.rgb, CrfImage::Faithful);
            for &l in &labels {
                let p = probs(photo.w, photo.h, l, 1);
                if let Some(dir) = opt("--dump") {
                    let dir = PathBuf::from(dir);
                    std::fs::create_dir_all(&dir).unwrap();
                    write_npy(&dir.join(format!("image_{l}.npy")), "|u1", &[photo.h, photo.w, 3], &img);
                    let bytes: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
                    write_npy(&dir.join(format!("probs_{l}.npy")), "<f4", &[l, photo.h, photo.w], &bytes);
                }
                let _ = dense_crf(&img, photo.w, photo.h, &p, l, &params).unwrap(); // warm-up
                let times: Vec<f64> = (0..repeats)
                    .map(|_| {
                        let t = Instant::now();
                        std::hint::black_box(dense_crf(&img, photo.w, photo.h, &p, l, &params).unwrap());
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                results.push(format!(
                    "{{\"labels\": {l}, \"median_s\": {:.6}, \"times_s\": [{}]}}",
                    median(times.clone()),
                    times.iter().map(|t| format!("{t:.6}")).collect::<Vec<_>>().join(", ")
                ));
            }
            println!(
                "{{\"mode\": \"single\", \"photo\": \"{}\", \"width\": {}, \"height\": {}, \"threads\": {threads}, \"repeats\": {repeats}, \"results\": [{}]}}",
                photo.name,
                photo.w,
                photo.h,
                results.join(", ")
            );
        }
        "throughput" => {
            let repeats: usize = opt("--repeats").map(|s| s.parse().unwrap()).unwrap_or(3);
            if photos.is_empty() {
                photos = (0..8).map(|_| synthetic(500, 375)).collect();
            }
            let imgs: Vec<Vec<u8>> = photos.iter().map(|p| crf_image(&p.rgb, CrfImage::Faithful)).collect();
            for &l in &labels {
                let ps: Vec<Vec<f32>> = photos.iter().enumerate().map(|(i, p)| probs(p.w, p.h, l, i as u64)).collect();
                let times: Vec<f64> = (0..repeats)
                    .map(|_| {
                        let t = Instant::now();
                        photos.par_iter().zip(&imgs).zip(&ps).for_each(|((ph, img), p)| {
                            std::hint::black_box(dense_crf(img, ph.w, ph.h, p, l, &params).unwrap());
                        });
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                let t = median(times);
                results.push(format!(
                    "{{\"labels\": {l}, \"images\": {}, \"median_s\": {t:.6}, \"images_per_s\": {:.4}}}",
                    photos.len(),
                    photos.len() as f64 / t
                ));
            }
            println!(
                "{{\"mode\": \"throughput\", \"threads\": {threads}, \"repeats\": {repeats}, \"results\": [{}]}}",
                results.join(", ")
            );
        }
        other => {
            eprintln!("unknown mode {other:?}: use single or throughput");
            std::process::exit(2);
        }
    }
}
