//! Shared test helpers: the Python interpreter of the project's venv, random-weight CLIP
//! fixtures generated at test time, synthetic and real images.
#![allow(dead_code)]
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> PathBuf {
    std::env::var_os("CLIPMASK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// The clipmask binary with a cache of its own (no test touches the user's cache).
pub fn clipmask_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipmask"));
    c.env("CLIPMASK_CACHE", root().join("target/test-cache"));
    c
}

pub fn run_python(args: &[&str]) {
    let out =
        Command::new(python()).args(args).env("PYTHONPATH", root().join("tests/python")).output().expect("run python");
    assert!(
        out.status.success(),
        "python {:?} failed:\n{}\n{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A random-weight CLIP fixture (model.pt + model.safetensors) with logit scale 10, the
/// well-conditioned regime where present labels get p ~ 0.005-0.1 as with real CLIP.
pub fn fixture(size: &str, seed: u64, fp16: bool) -> PathBuf {
    fixture_scaled(size, seed, fp16, 10.0)
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

/// A smooth, structured RGB image (blobs + gradients + a little noise), deterministic.
pub fn synthetic_image(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut rnd = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64) / (1u64 << 31) as f64
    };
    let blobs: Vec<(f64, f64, f64, [f64; 3])> = (0..5)
        .map(|_| {
            (rnd() * w as f64, rnd() * h as f64, 10.0 + rnd() * 40.0, [rnd() * 255.0, rnd() * 255.0, rnd() * 255.0])
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
        let n = (rnd() - 0.5) * 20.0;
        p.0 = [
            (c[0] + n).clamp(0.0, 255.0) as u8,
            (c[1] - n).clamp(0.0, 255.0) as u8,
            (c[2] + n * 0.5).clamp(0.0, 255.0) as u8,
        ];
    }
    img
}

/// ../shared/data/voc-sample when present.
pub fn voc_sample() -> Option<PathBuf> {
    let p = root().join("../shared/data/voc-sample");
    p.join("JPEGImages").is_dir().then_some(p)
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
