//! Random-weight CLIP fixtures generated at test time, synthetic and real images, tensor helpers.
use super::{rng, root, run_python, Rng};
use clipmask::config::DatasetConfig;
use image::RgbImage;
use std::path::{Path, PathBuf};

/// A random-weight CLIP fixture (model.pt + model.safetensors) with logit scale 10, the
/// well-conditioned regime where present labels get p ~ 0.005-0.1 as with real CLIP.
pub fn fixture(size: &str, seed: u64, fp16: bool) -> PathBuf {
    fixture_scaled(size, seed, fp16, 10.0)
}

/// The default fixture's safetensors: the tiny model, seed 0, fp32.
pub fn tiny_model() -> PathBuf {
    fixture("tiny", 0, false).join("model.safetensors")
}

/// A random-weight CLIP fixture with exp(logit_scale) = `logit_scale`, generated once per name.
pub fn fixture_scaled(size: &str, seed: u64, fp16: bool, logit_scale: f64) -> PathBuf {
    // Tests in one binary run on threads: generate each fixture once.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("{size}-seed{seed}-ls{logit_scale}{}", if fp16 { "-fp16" } else { "" });
    let dir = root().join("target/test-fixtures").join(&name);
    if !dir.join(".complete").exists() {
        let tmp = root().join("target/test-fixtures").join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let script = root().join("tests/python/make_fixture.py");
        let seed_s = seed.to_string();
        let scale_s = logit_scale.to_string();
        let mut args = vec![
            script.to_str().unwrap(),
            tmp.to_str().unwrap(),
            "--seed",
            &seed_s,
            "--size",
            size,
            "--logit-scale",
            &scale_s,
        ];
        if fp16 {
            args.push("--fp16");
        }
        run_python(&args);
        std::fs::write(tmp.join(".complete"), b"").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::rename(&tmp, &dir).is_err() && dir.join(".complete").exists() {
            // Another test process made it meanwhile.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    dir
}

/// The smallest dataset: `dir/imgs/a.png` (80x60) labelled `dog` in `dir/labels.json`.
/// Returns (images folder, labels file).
pub fn one_image_dataset(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let imgs = dir.join("imgs");
    save_png(&imgs, "a", 80, 60, seed);
    let labels = dir.join("labels.json");
    std::fs::write(&labels, r#"{"a": ["dog"]}"#).unwrap();
    (imgs, labels)
}

/// A smooth, structured RGB image (blobs + gradients + a little noise), deterministic.
pub fn synthetic_image(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = rng(seed);
    let blobs: Vec<(f64, f64, f64, [f64; 3])> = (0..5)
        .map(|_| {
            let (x, y, r) =
                (rng.random::<f64>() * w as f64, rng.random::<f64>() * h as f64, rng.random_range(10.0..50.0));
            (x, y, r, [rng.random_range(0.0..255.0), rng.random_range(0.0..255.0), rng.random_range(0.0..255.0)])
        })
        .collect();
    let mut img = RgbImage::new(w, h);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let mut c = [x as f64 / w as f64 * 120.0, y as f64 / h as f64 * 120.0, 60.0];
        for (bx, by, r, col) in &blobs {
            let d2 = ((x as f64 - bx).powi(2) + (y as f64 - by).powi(2)) / (r * r);
            let a = (-d2).exp();
            for i in 0..3 {
                c[i] = c[i] * (1.0 - a) + col[i] * a;
            }
        }
        let n = rng.random_range(-10.0..10.0);
        p.0 = [
            (c[0] + n).clamp(0.0, 255.0) as u8,
            (c[1] - n).clamp(0.0, 255.0) as u8,
            (c[2] + n * 0.5).clamp(0.0, 255.0) as u8,
        ];
    }
    img
}

/// `synthetic_image` saved as `dir/<id>.png` (`dir` is created).
pub fn save_png(dir: &Path, id: &str, w: u32, h: u32, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(format!("{id}.png"));
    synthetic_image(w, h, seed).save(&p).unwrap();
    p
}

/// The shipped voc12 dataset config.
pub fn voc() -> DatasetConfig {
    DatasetConfig::resolve("voc12").expect("shipped voc12 config")
}

/// ../shared/data/voc-sample when present.
pub fn voc_sample() -> Option<PathBuf> {
    let p = root().join("../shared/data/voc-sample");
    p.join("JPEGImages").is_dir().then_some(p)
}

/// Real photos for tests that need some: voc-sample's JPEGImages when present, else the four
/// VOC photos shipped in examples/images (with examples/labels.json), so that a clone without
/// ../shared still runs them.
pub fn photos() -> (PathBuf, PathBuf) {
    match voc_sample() {
        Some(v) => (v.join("JPEGImages"), v.join("labels.json")),
        None => (root().join("examples/images"), root().join("examples/labels.json")),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn read_safetensors(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path).expect("read safetensors").into_iter().collect()
}

pub fn to_vec(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).reshape([-1])).unwrap()
}
