//! Fitting the pipelines users already have. The weights they have: One random-weight CLIP written in OpenAI's,
//! Hugging Face's (by transformers' own CLIPModel.save_pretrained) and OpenCLIP's layouts gives
//! identical maps; the activation comes from each layout's config; `--model org/name` fetches
//! through a local stand-in for the Hub into the standard HF cache and then works offline from
//! a cache laid out by Python's huggingface_hub.
use crate::support::*;
use clipmask::clip::Clip;
use clipmask::config::DatasetConfig;
use clipmask::image_input::prepare;
use clipmask::pipeline::{compute_maps, MapOptions};
use clipmask::prompts::text_features;
use std::path::{Path, PathBuf};
use std::process::Child;
use tch::{Device, Kind};

/// The layouts of the default fixture, made once per test process.
fn layouts() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let fx = fixture("tiny", 0, false);
        let out = fx.join("layouts");
        if !out.join(".complete-v2").exists() {
            run_python(&[
                root().join("tests/python/make_layouts.py").to_str().unwrap(),
                fx.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            std::fs::write(out.join(".complete-v2"), b"").unwrap();
        }
        out
    })
    .clone()
}

fn maps(weights: &Path) -> (Vec<f32>, Vec<f32>) {
    let model =
        Clip::load_path(weights, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{}: {e:#}", weights.display()));
    let cfg = DatasetConfig::resolve("voc12").unwrap();
    let text = text_features(&model, &cfg).unwrap();
    let opts = MapOptions { box_threshold: cfg.box_threshold, max_side: None, ..Default::default() };
    let p = prepare(&synthetic_image(200, 150, 5), 16, None);
    let m = compute_maps(&model, &text, &p, &[6, 14], &opts).unwrap();
    (m.raw.iter().copied().collect(), m.refined.iter().copied().collect())
}

#[test]
fn openai_huggingface_and_openclip_layouts_give_identical_maps() {
    let fx = fixture("tiny", 0, false);
    let l = layouts();
    let (raw, refined) = maps(&fx.join("model.safetensors"));
    for dir in [
        "hf/model.safetensors",
        "hf-bin/pytorch_model.bin",
        "openclip/open_clip_model.safetensors",
        "openclip-bin/open_clip_pytorch_model.bin",
    ] {
        let (r, f) = maps(&l.join(dir));
        let (dr, df) = (max_abs_diff(&raw, &r), max_abs_diff(&refined, &f));
        eprintln!("{dir}: raw {dr:.1e}, refined {df:.1e} from the OpenAI layout");
        // q/k/v concatenation and the transposes are exact: the same numbers.
        assert!(dr <= 1e-6 && df <= 1e-6, "{dir} differs from the OpenAI layout");
    }
    // GELU twins: the same weights with the activation the config names.
    let (hr, hf) = maps(&l.join("hf-gelu/model.safetensors"));
    let (or, of) = maps(&l.join("openclip-gelu/open_clip_model.safetensors"));
    assert!(max_abs_diff(&hr, &or) <= 1e-6 && max_abs_diff(&hf, &of) <= 1e-6, "the two GELU layouts disagree");
    let d = max_abs_diff(&raw, &hr);
    eprintln!("GELU vs QuickGELU twin: raw maps differ by {d:.2e}");
    assert!(d > 1e-3, "the GELU model gives the QuickGELU maps: the config's activation is not used");
}

#[test]
fn non_clip_vit_checkpoints_get_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tch::Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
    for (name, tensors, expect) in [
        ("siglip", vec![("vision_model.embeddings.patch_embedding.weight", &t), ("logit_bias", &t)], "SigLIP"),
        ("eva", vec![("visual.blocks.0.attn.q_proj.weight", &t), ("visual.patch_embed.proj.weight", &t)], "EVA"),
        ("other", vec![("encoder.layer.0.weight", &t)], "not a CLIP ViT checkpoint"),
    ] {
        let p = tmp.path().join(format!("{name}.safetensors"));
        tch::Tensor::write_safetensors(&tensors, &p).unwrap();
        let err = match Clip::load_path(&p, Device::Cpu, Kind::Float) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(expect) && !err.contains('\n'), "{name}: {err}");
    }
}

struct Hub {
    child: Child,
    url: String,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_hub(hub_root: &Path, tmp: &Path) -> Hub {
    let port_file = tmp.join("hub.port");
    let child = python_cmd()
        .arg(root().join("tests/python/fake_hub.py"))
        .arg(hub_root)
        .arg(&port_file)
        .spawn()
        .expect("start the fake hub");
    let t0 = std::time::Instant::now();
    while !port_file.exists() {
        assert!(t0.elapsed().as_secs() < 30, "fake hub did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let port = std::fs::read_to_string(&port_file).unwrap();
    Hub { child, url: format!("http://127.0.0.1:{}", port.trim()) }
}

/// `clipmask classify --json` on one image, with the HF variables cleared except `env`.
fn classify(model: &str, image: &Path, env: &[(&str, &Path)], extra: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut c = clipmask(&shared_cache());
    for k in ["HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE"] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    for (k, v) in extra {
        c.env(k, v);
    }
    c.args(["classify", "--json", "--device", "cpu", "--model", model]).arg(image);
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn probs(stdout: &str) -> Vec<f64> {
    crate::json_schemas::assert_valid("classify", stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().next().expect("a JSON line")).unwrap();
    let mut p: Vec<(String, f64)> =
        v["probs"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect();
    p.sort_by(|a, b| a.0.cmp(&b.0));
    p.into_iter().map(|x| x.1).collect()
}

#[test]
fn hub_repo_ids_download_into_the_hf_cache_and_work_offline() {
    let l = layouts();
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("im.png");
    synthetic_image(160, 120, 3).save(&image).unwrap();
    // The hub: test-org/tiny-hf (transformers layout), test-org/tiny-openclip (OpenCLIP, GELU).
    let hub_root = tmp.path().join("hub-root");
    for (repo, src) in [("test-org/tiny-hf", "hf"), ("test-org/tiny-openclip", "openclip-gelu")] {
        let d = hub_root.join(repo);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(l.join(src)).unwrap().flatten() {
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    let hub = start_hub(&hub_root, tmp.path());

    // 1. Download through hf-hub into HF_HUB_CACHE, laid out as the HF cache.
    let cache = tmp.path().join("hf-cache");
    let (code, out, err) =
        classify("test-org/tiny-hf", &image, &[("HF_HUB_CACHE", &cache)], &[("HF_ENDPOINT", &hub.url)]);
    assert_eq!(code, Some(0), "{err}");
    let (code, local, err) = classify(l.join("hf/model.safetensors").to_str().unwrap(), &image, &[], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(probs(&out), probs(&local), "hub download and local file give different probabilities");
    let snap = cache.join("models--test-org--tiny-hf/snapshots");
    assert!(std::fs::read_dir(&snap).unwrap().flatten().any(|d| d.path().join("model.safetensors").exists()));
    // Python's huggingface_hub finds what clipmask downloaded.
    let code = format!(
        "from huggingface_hub import try_to_load_from_cache as t; import sys; \
         p = t('test-org/tiny-hf', 'model.safetensors', cache_dir={:?}); sys.exit(0 if isinstance(p, str) else 1)",
        cache.to_str().unwrap()
    );
    run_python(&["-c", &code]);

    // 2. Python's huggingface_hub fills an HF_HOME cache; clipmask reads it offline.
    let home = tmp.path().join("hf-home");
    let code = format!(
        "import os; os.environ['HF_ENDPOINT'] = {:?}; from huggingface_hub import hf_hub_download as d; \
         [d('test-org/tiny-openclip', f, cache_dir={:?}) for f in ('open_clip_config.json', 'open_clip_model.safetensors')]",
        hub.url,
        home.join("hub").to_str().unwrap()
    );
    run_python(&["-c", &code]);
    drop(hub); // no network from here on
    let (code, out, err) =
        classify("test-org/tiny-openclip", &image, &[("HF_HOME", &home)], &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(code, Some(0), "{err}");
    let (_, local, _) =
        classify(l.join("openclip-gelu/open_clip_model.safetensors").to_str().unwrap(), &image, &[], &[]);
    assert_eq!(probs(&out), probs(&local));
    // A repo that is not cached, offline: one line naming the cache.
    let (code, _, err) = classify("test-org/absent", &image, &[("HF_HOME", &home)], &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("HF_HUB_OFFLINE") && message_lines(&err).len() == 1, "{err}");
}

#[test]
fn truncated_or_foreign_bin_files_fail_with_an_error_not_a_panic() {
    let l = layouts();
    let tmp = tempfile::tempdir().unwrap();
    let full = std::fs::read(l.join("hf-bin/pytorch_model.bin")).unwrap();
    for (name, bytes) in [
        ("half.bin", full[..full.len() / 2].to_vec()),
        ("tail.bin", full[full.len() / 3..].to_vec()),
        ("text.bin", b"not a zip archive at all".to_vec()),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let r = std::panic::catch_unwind(|| Clip::load_path(&p, Device::Cpu, Kind::Float).map(|_| ()));
        match r {
            Ok(Err(e)) => eprintln!("{name}: {}", format!("{e:#}").lines().next().unwrap_or("")),
            Ok(Ok(())) => panic!("{name} loaded"),
            Err(_) => panic!("{name}: panicked"),
        }
    }
}

/// An installed binary needs no source tree: configs and templates are compiled in, and
/// `--version` says which libtorch it runs on and whether CUDA is visible.
#[test]
fn the_binary_runs_from_anywhere_and_reports_its_libtorch() {
    let bin = std::fs::read(BIN).unwrap();
    let manifest = env!("CARGO_MANIFEST_DIR");
    for dir in ["configs", "prompts"] {
        let needle = format!("{manifest}/{dir}");
        assert!(!bin.windows(needle.len()).any(|w| w == needle.as_bytes()), "the binary refers to {needle}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = clipmask(&shared_cache())
        .current_dir(tmp.path())
        .env_remove("CLIPMASK_CONFIGS")
        .args(["prompts", "show", "-c", "coco14"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("a clean origami backpack,bag."));
    let out = clipmask(&shared_cache()).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")) && text.contains("libtorch 2.11.0") && text.contains("CUDA: "),
        "{text}"
    );
}

/// The label PNGs users train on, read by the real clients: PIL, cv2.imread (GRAYSCALE and
/// UNCHANGED), imageio v2 and v3. Gray masks give every reader the ids clipmask wrote; palette
/// masks give them to PIL only (documented in the README's table).
#[test]
fn gray_masks_decode_to_the_same_ids_in_every_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for (i, (w, h)) in [(120u32, 90u32), (75, 140)].into_iter().enumerate() {
        synthetic_image(w, h, 60 + i as u64).save(imgs.join(format!("im{i}.png"))).unwrap();
    }
    // Labels with high class ids too (palette colours there are far from their index).
    let labels = tmp.path().join("labels.json");
    std::fs::write(&labels, r#"{"im0": ["tvmonitor", "train", "sofa"], "im1": ["person", "pottedplant"]}"#).unwrap();
    let model = tiny_model();
    let mut results = Vec::new();
    for (format, crf) in [("gray", false), ("palette", false), ("gray", true)] {
        let out = tmp.path().join(format!("out-{format}-{crf}"));
        let mut c = clipmask(&shared_cache());
        c.args(["generate", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--images")
            .arg(&imgs)
            .arg("--labels")
            .arg(&labels)
            .arg("--out")
            .arg(&out)
            .args(["--mask-format", format]);
        if crf {
            c.args(["--crf", "--confidence", "0.5"]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The ids as stored, through the png crate without transformations, saved as .npy.
        let expected = tmp.path().join(format!("expected-{format}-{crf}"));
        std::fs::create_dir_all(&expected).unwrap();
        let mut distinct = std::collections::BTreeSet::new();
        for id in ["im0", "im1"] {
            let (px, w, h) = clipmask::outputs::read_label_png(&out.join("masks").join(format!("{id}.png"))).unwrap();
            distinct.extend(px.iter().copied());
            let arr = ndarray::Array2::from_shape_vec((h as usize, w as usize), px).unwrap();
            ndarray_npy::write_npy(expected.join(format!("{id}.npy")), &arr).unwrap();
        }
        assert!(distinct.iter().any(|&v| v > 8), "{format}: no high class id to tell readers apart: {distinct:?}");
        let py = python_cmd()
            .arg(root().join("tests/python/read_masks.py"))
            .arg(out.join("masks"))
            .arg(&expected)
            .output()
            .unwrap();
        assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
        let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
        eprintln!("{format}{}: {v}", if crf { " (crf)" } else { "" });
        results.push((format, v));
    }
    for (format, v) in &results {
        let ok = |r: &str| v[r].as_bool().unwrap();
        if *format == "gray" {
            for r in ["pil", "cv2_grayscale", "cv2_unchanged", "imageio_v2", "imageio_v3", "pil_convert_L"] {
                assert!(ok(r), "gray masks: {r} does not read the ids");
            }
        } else {
            // What the README's table says: PIL reads palette ids, OpenCV and imageio do not.
            assert!(ok("pil"));
            for r in ["cv2_grayscale", "cv2_unchanged", "imageio_v2", "imageio_v3", "pil_convert_L"] {
                assert!(!ok(r), "palette masks: {r} unexpectedly reads the ids");
            }
        }
    }
}

/// eval reads ground truth as gray ids, palette ids or RGB colours of the palette, and names
/// a colour that is not in the palette.
#[test]
fn eval_reads_gray_palette_and_rgb_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = DatasetConfig::resolve("voc12").unwrap();
    let pal = cfg.png_palette();
    let (w, h) = (6u32, 4u32);
    let gt: Vec<u8> = (0..w * h).map(|i| [0u8, 15, 20, 255][(i % 4) as usize]).collect();
    let pred: Vec<u8> = (0..w * h).map(|i| if i < 12 { gt[i as usize] } else { 0 }).collect();
    let pred_dir = tmp.path().join("pred");
    clipmask::outputs::write_label_png(&pred_dir.join("a.png"), &pred, w, h, None).unwrap();
    let mut mious = Vec::new();
    for kind in ["gray", "palette", "rgb"] {
        let d = tmp.path().join(format!("gt-{kind}"));
        std::fs::create_dir_all(&d).unwrap();
        match kind {
            "gray" => clipmask::outputs::write_label_png(&d.join("a.png"), &gt, w, h, None).unwrap(),
            "palette" => clipmask::outputs::write_label_png(&d.join("a.png"), &gt, w, h, Some(&pal)).unwrap(),
            _ => {
                let rgb: Vec<u8> = gt.iter().flat_map(|&v| pal[v as usize * 3..v as usize * 3 + 3].to_vec()).collect();
                image::RgbImage::from_raw(w, h, rgb).unwrap().save(d.join("a.png")).unwrap();
            }
        }
        let out = clipmask(&shared_cache())
            .args(["eval", "--config", "voc12", "--json", "--pred"])
            .arg(&pred_dir)
            .arg("--gt")
            .arg(&d)
            .output()
            .unwrap();
        assert!(out.status.success(), "{kind}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        crate::json_schemas::assert_valid("eval", &v.to_string());
        mious.push(v["miou"].as_f64().unwrap());
    }
    assert!(mious.iter().all(|m| (m - mious[0]).abs() < 1e-12), "{mious:?}");
    // A colour outside the palette.
    let d = tmp.path().join("gt-bad");
    std::fs::create_dir_all(&d).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3])).save(d.join("a.png")).unwrap();
    let out = clipmask(&shared_cache())
        .args(["eval", "--config", "voc12", "--pred"])
        .arg(&pred_dir)
        .arg("--gt")
        .arg(&d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("[1, 2, 3]") && err.contains("palette"), "{err}");
}
