//! Dense CRF against pydensecrf, the implementation CLIP-ES uses (marginals within 1e-3, labels >= 99.9 % identical):
//! marginals within 1e-3 and >= 99.9 % identical argmax labels, on real photos from
//! ../shared/data/voc-sample (when present) and synthetic images; 2, 3, 5 and 21 labels;
//! Gaussian kernel alone, bilateral alone and both; faithful and RGB CRF images.
//! The reference is tests/python/crf_reference.py run with $CLIPMASK_PYTHON (default .venv/bin/python).
use crate::support::{python, python_cmd, rng, root, synthetic_image, Rng};
use clipmask::crf::{crf_image, dense_crf, CrfImage, CrfParams};
use ndarray::{Array3, ArrayView3};
use ndarray_npy::{read_npy, write_npy};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

const TOL_Q: f32 = 1e-3;
const MIN_AGREEMENT: f64 = 0.999;

fn script() -> PathBuf {
    root().join("tests/python/crf_reference.py")
}

pub(crate) fn spawn_python(args: &[String]) -> Child {
    python_cmd()
        .arg(script())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", python()))
}

pub(crate) fn wait_python(child: Child, what: &str) {
    let out = child.wait_with_output().expect("wait for python");
    assert!(
        out.status.success(),
        "crf_reference.py {what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `support::synthetic_image` as RGB bytes.
fn synthetic_rgb(w: usize, h: usize, seed: u64) -> Vec<u8> {
    synthetic_image(w as u32, h as u32, seed).into_raw()
}

/// CLIP-ES-like probabilities P = [bg; maps], C x H x W, not renormalised: each map is a few
/// Gaussian blobs min-max normalised to [0, 1] (as CAMs are), bg = 1 - max_k map_k.
pub(crate) fn clip_es_probs(w: usize, h: usize, n_labels: usize, seed: u64) -> Vec<f32> {
    let mut rng = rng(seed ^ 0x5eed);
    let n = w * h;
    let mut p = vec![0f32; n_labels * n];
    let s = w.max(h) as f64;
    for k in 1..n_labels {
        let blobs: Vec<(f64, f64, f64, f64)> = (0..rng.random_range(1..=3))
            .map(|_| {
                let (x, y) = (rng.random::<f64>() * w as f64, rng.random::<f64>() * h as f64);
                (x, y, s * rng.random_range(0.05..0.3), rng.random_range(0.3..1.0))
            })
            .collect();
        let mut m: Vec<f64> = (0..n)
            .map(|i| {
                let (x, y) = ((i % w) as f64, (i / w) as f64);
                blobs
                    .iter()
                    .map(|(bx, by, r, a)| a * (-((x - bx).powi(2) + (y - by).powi(2)) / (2.0 * r * r)).exp())
                    .sum()
            })
            .collect();
        let (lo, hi) = m.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        for v in &mut m {
            *v = (*v - lo) / (hi - lo + 1e-5);
        }
        for i in 0..n {
            p[k * n + i] = m[i] as f32;
        }
    }
    for i in 0..n {
        let mx = (1..n_labels).map(|k| p[k * n + i]).fold(0f32, f32::max);
        p[i] = 1.0 - mx;
    }
    p
}

pub(crate) fn crop(rgb: &[u8], w: usize, x0: usize, y0: usize, cw: usize, ch: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(cw * ch * 3);
    for y in y0..y0 + ch {
        out.extend_from_slice(&rgb[(y * w + x0) * 3..(y * w + x0 + cw) * 3]);
    }
    out
}

#[derive(Clone, Copy)]
enum Kernels {
    Gaussian,
    Bilateral,
    Both,
}

struct Case {
    name: String,
    rgb: Vec<u8>,
    w: usize,
    h: usize,
    labels: usize,
    mode: CrfImage,
    kernels: Kernels,
}

fn params(k: Kernels) -> CrfParams {
    let mut p = CrfParams::default();
    match k {
        Kernels::Gaussian => p.bilateral_weight = 0.0,
        Kernels::Bilateral => p.gaussian_weight = 0.0,
        Kernels::Both => {}
    }
    p
}

/// (name, RGB bytes, width, height)
pub(crate) type Photo = (String, Vec<u8>, usize, usize);

pub(crate) fn voc_photos() -> Option<Vec<Photo>> {
    photos_in(&root().join("../shared/data/voc-sample/JPEGImages"))
}

/// The first 8 JPEG photos of `dir`, by name.
pub(crate) fn photos_in(dir: &std::path::Path) -> Option<Vec<Photo>> {
    let mut names: Vec<_> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.retain(|p| p.extension().is_some_and(|e| e == "jpg"));
    names.sort();
    let photos: Vec<_> = names
        .iter()
        .take(8)
        .map(|p| {
            let img = image::open(p).unwrap().to_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            (p.file_stem().unwrap().to_string_lossy().into_owned(), img.into_raw(), w, h)
        })
        .collect();
    (!photos.is_empty()).then_some(photos)
}

fn cases() -> Vec<Case> {
    use CrfImage::{Faithful, Rgb};
    use Kernels::{Bilateral, Both, Gaussian};
    let mut out = Vec::new();
    if let Some(photos) = voc_photos() {
        // Two full 500x375 photos (or the first two photos whatever their size) with both kernels.
        let mut full: Vec<usize> = (0..photos.len()).filter(|&i| photos[i].2 == 500 && photos[i].3 == 375).collect();
        let rest: Vec<usize> = (0..photos.len()).filter(|i| !full.contains(i)).collect();
        full.extend(rest);
        let crops: Vec<usize> = full[2..].to_vec();
        for (j, (labels, mode)) in [(21, Faithful), (3, Rgb)].into_iter().enumerate() {
            let (id, rgb, w, h) = &photos[full[j % full.len()]];
            out.push(Case { name: format!("{id} full"), rgb: rgb.clone(), w: *w, h: *h, labels, mode, kernels: Both });
        }
        let spec = [
            (240, 180, 5, Faithful, Both),
            (201, 149, 2, Rgb, Both),
            (201, 149, 2, Faithful, Gaussian),
            (203, 151, 3, Faithful, Bilateral),
            (160, 120, 21, Rgb, Bilateral),
            (180, 140, 5, Rgb, Gaussian),
        ];
        for (k, (cw, ch, labels, mode, kernels)) in spec.into_iter().enumerate() {
            let (id, rgb, w, h) = &photos[crops.get(k % crops.len().max(1)).copied().unwrap_or(0)];
            let (cw, ch) = (cw.min(*w), ch.min(*h));
            let (x0, y0) = ((w - cw) / 2, (h - ch) / 2);
            out.push(Case {
                name: format!("{id} crop {cw}x{ch}"),
                rgb: crop(rgb, *w, x0, y0, cw, ch),
                w: cw,
                h: ch,
                labels,
                mode,
                kernels,
            });
        }
    } else {
        eprintln!("../shared/data/voc-sample not present: real-photo cases skipped");
    }
    let spec = [
        (97, 61, 2, Rgb, Both),
        (128, 96, 5, Faithful, Gaussian),
        (151, 113, 21, Faithful, Bilateral),
        (200, 150, 3, Faithful, Both),
        (120, 90, 5, Rgb, Both),
        (99, 77, 3, Rgb, Bilateral),
        (64, 48, 21, Rgb, Both),
        // With the cases above, every label count meets every kernel choice.
        (90, 70, 2, Faithful, Bilateral),
        (111, 83, 3, Rgb, Gaussian),
        (77, 59, 5, Faithful, Bilateral),
        (80, 61, 21, Faithful, Gaussian),
    ];
    for (k, (w, h, labels, mode, kernels)) in spec.into_iter().enumerate() {
        out.push(Case {
            name: format!("synthetic {w}x{h}"),
            rgb: synthetic_rgb(w, h, 100 + k as u64),
            w,
            h,
            labels,
            mode,
            kernels,
        });
    }
    out
}

pub(crate) fn write_u8(path: &Path, data: &[u8], h: usize, w: usize) {
    write_npy(path, &ArrayView3::from_shape((h, w, 3), data).unwrap()).unwrap();
}

#[test]
fn faithful_image_matches_numpy() {
    let tmp = tempfile::tempdir().unwrap();
    let mut imgs: Vec<Photo> = vec![];
    // every byte value in every channel, then real photos
    let all: Vec<u8> = (0..=255u8).flat_map(|v| [v, v.wrapping_mul(7), 255 - v]).collect();
    imgs.push(("all values".into(), all, 256, 1));
    imgs.push(("synthetic".into(), synthetic_rgb(150, 100, 1), 150, 100));
    if let Some(photos) = voc_photos() {
        imgs.extend(photos.into_iter().take(3));
    }
    for (name, rgb, w, h) in imgs {
        let (i, o) = (tmp.path().join("rgb.npy"), tmp.path().join("faithful.npy"));
        write_u8(&i, &rgb, h, w);
        wait_python(spawn_python(&["faithful".into(), i.display().to_string(), o.display().to_string()]), "faithful");
        let want: Array3<u8> = read_npy(&o).unwrap();
        let got = crf_image(&rgb, CrfImage::Faithful);
        assert_eq!(got.as_slice(), want.as_slice().unwrap(), "faithful image differs from numpy on {name}");
    }
}

#[test]
fn marginals_match_pydensecrf() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = vec![];
    println!("| case | size | labels | kernels | image | max abs dQ | labels identical |");
    println!("|---|---|---|---|---|---|---|");
    for (ci, case) in cases().into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{ci}"));
        std::fs::create_dir_all(&dir).unwrap();
        let img = crf_image(&case.rgb, case.mode);
        let probs = clip_es_probs(case.w, case.h, case.labels, ci as u64);
        write_u8(&dir.join("image.npy"), &img, case.h, case.w);
        write_npy(dir.join("probs.npy"), &ArrayView3::from_shape((case.labels, case.h, case.w), &probs[..]).unwrap())
            .unwrap();
        let p = params(case.kernels);
        let args: Vec<String> = vec![
            "crf".into(),
            dir.display().to_string(),
            format!("--iterations={}", p.iterations),
            format!("--gaussian-sxy={}", p.gaussian_sxy),
            format!("--gaussian-weight={}", p.gaussian_weight),
            format!("--bilateral-sxy={}", p.bilateral_sxy),
            format!("--bilateral-srgb={}", p.bilateral_srgb),
            format!("--bilateral-weight={}", p.bilateral_weight),
        ];
        // The reference runs while we compute ours.
        let child = spawn_python(&args);
        let q = dense_crf(&img, case.w, case.h, &probs, case.labels, &p).unwrap();
        wait_python(child, "crf");
        let want: Array3<f32> = read_npy(dir.join("q.npy")).unwrap();
        let want = want.as_slice().unwrap();
        assert_eq!(want.len(), q.len());
        let max_dq = q.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let n = case.w * case.h;
        let argmax = |v: &[f32], i: usize| {
            (1..case.labels).fold(0, |best, c| if v[c * n + i] > v[best * n + i] { c } else { best })
        };
        let same = (0..n).filter(|&i| argmax(&q, i) == argmax(want, i)).count();
        let agree = same as f64 / n as f64;
        let kname = match case.kernels {
            Kernels::Gaussian => "gaussian",
            Kernels::Bilateral => "bilateral",
            Kernels::Both => "both",
        };
        println!(
            "| {} | {}x{} | {} | {} | {:?} | {:.2e} | {:.4} % |",
            case.name,
            case.w,
            case.h,
            case.labels,
            kname,
            case.mode,
            max_dq,
            100.0 * agree
        );
        if !(max_dq <= TOL_Q && agree >= MIN_AGREEMENT) {
            failures.push(format!(
                "{} ({} labels, {kname}, {:?}): max |dQ| {max_dq:e}, agreement {agree}",
                case.name, case.labels, case.mode
            ));
        }
    }
    assert!(failures.is_empty(), "CRF differs from pydensecrf:\n{}", failures.join("\n"));
}
