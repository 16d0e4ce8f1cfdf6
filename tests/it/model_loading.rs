//! Loading models (bad files, fp16, download by name), `--help`, `classify --json`,
//! `--device cuda` without a GPU. Everything through the binary except the download function.
use crate::support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn classify_with_model(model: &Path, img: &Path) -> Run {
    let cache = tempfile::tempdir().unwrap();
    run(clipmask(cache.path())
        .args(["classify", "--device", "cpu", "--config", "voc12", "--model"])
        .arg(model)
        .arg(img))
}

fn voc_names() -> Vec<String> {
    clipmask::config::DatasetConfig::resolve("voc12").unwrap().class_names().iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Bad checkpoints: one line, exit 2, no backtrace, says what was expected.
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_checkpoints_give_one_line_errors() {
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = save_png(d, "img", 64, 48, 1);

    let pt = std::fs::read(fx.join("model.pt")).unwrap();
    let st = std::fs::read(fx.join("model.safetensors")).unwrap();
    std::fs::write(d.join("trunc.pt"), &pt[..pt.len() / 2]).unwrap();
    std::fs::write(d.join("trunc.safetensors"), &st[..st.len() / 2]).unwrap();
    let mut random = vec![0u8; 100_000];
    rng(0x1234_5678_9abc_def0).fill(&mut random[..]);
    std::fs::write(d.join("random.pt"), &random).unwrap();
    std::fs::write(d.join("random.bin"), &random).unwrap();
    std::fs::write(d.join("notes.txt"), "These are my notes, not a model.\nline two\n").unwrap();
    std::fs::write(d.join("empty.pt"), b"").unwrap();
    std::fs::write(d.join("empty.safetensors"), b"").unwrap();

    // A ResNet-style CLIP (RN50 parameter names) and a safetensors of some other network.
    let t = tch::Tensor::zeros([4, 4, 1, 1], (tch::Kind::Float, tch::Device::Cpu));
    let pe = tch::Tensor::zeros([50, 8], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(
        &[
            ("visual.layer1.0.conv1.weight", &t),
            ("visual.attnpool.positional_embedding", &pe),
            ("logit_scale", &tch::Tensor::from(4.6f32)),
        ],
        d.join("rn50.safetensors"),
    )
    .unwrap();
    tch::Tensor::write_safetensors(
        &[("encoder.layer.0.weight", &t), ("decoder.bias", &pe)],
        d.join("other.safetensors"),
    )
    .unwrap();
    // The same tensors in a file without the extension (detected by the header).
    std::fs::copy(d.join("other.safetensors"), d.join("other.bin")).unwrap();

    let cases: &[(&str, &[&str])] = &[
        ("trunc.pt", &["expected"]),
        ("trunc.safetensors", &["expected"]),
        ("random.pt", &["expected"]),
        ("random.bin", &["expected"]),
        ("notes.txt", &["expected"]),
        ("empty.pt", &["empty", "expected"]),
        ("empty.safetensors", &["empty", "expected"]),
        ("rn50.safetensors", &["ResNet", "ViT"]),
        ("other.safetensors", &["not a CLIP ViT checkpoint", "expected"]),
        ("other.bin", &["not a CLIP ViT checkpoint", "expected"]),
        ("does-not-exist.pt", &["does-not-exist.pt"]),
    ];
    let mut report = Vec::new();
    for (name, must) in cases {
        let r = classify_with_model(&d.join(name), &img);
        let line = assert_one_line_error(&r, 2);
        for m in *must {
            assert!(line.contains(m), "{name}: message should mention {m:?}: {line}");
        }
        assert!(line.contains(name), "{name}: message should name the file: {line}");
        assert!(r.stdout.is_empty(), "{name}: nothing on stdout\n{}", r.show());
        report.push(format!("{name}: {line}"));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn device_cuda_without_gpu_is_a_one_line_error() {
    if tch::Cuda::is_available() {
        eprintln!("CUDA is available here: nothing to check");
        return;
    }
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let img = save_png(tmp.path(), "img", 64, 48, 1);
    for dev in ["cuda", "cuda:0", "cuda:3"] {
        let r =
            run(clipmask(tmp.path()).args(["classify", "--device", dev, "--model"]).arg(fx.join("model.pt")).arg(&img));
        let line = assert_one_line_error(&r, 2);
        assert!(line.contains("CUDA"), "{dev}: {line}");
    }
    let r =
        run(clipmask(tmp.path()).args(["classify", "--device", "tpu", "--model"]).arg(fx.join("model.pt")).arg(&img));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("expected auto, cpu, cuda or cuda:N"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// fp16 checkpoints
// ---------------------------------------------------------------------------------------------

fn classify_json(cache: &Path, model: &Path, images: &[PathBuf]) -> Vec<(String, BTreeMap<String, f64>)> {
    let r = run(clipmask(cache).args(["classify", "--json", "--device", "cpu", "--model"]).arg(model).args(images));
    assert_eq!(r.code, Some(0), "{}", r.show());
    parse_json_lines(&r.stdout)
}

fn parse_json_lines(stdout: &str) -> Vec<(String, BTreeMap<String, f64>)> {
    crate::json_schemas::assert_valid("classify", stdout);
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            let obj = v.as_object().expect("object per line");
            assert_eq!(obj.len(), 3, "exactly `schema`, `image` and `probs`: {l}");
            assert_eq!(obj["schema"], 1, "{l}");
            let image = obj["image"].as_str().expect("image is a string").to_string();
            let probs = obj["probs"]
                .as_object()
                .expect("probs is an object")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                .collect();
            (image, probs)
        })
        .collect()
}

#[test]
fn fp16_checkpoint_loads_and_classifies_like_fp32() {
    let fx32 = fixture("tiny", 0, false);
    let fx16 = fixture("tiny", 0, true);
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> =
        (0..3).map(|i| save_png(tmp.path(), &format!("i{i}"), 200 + 20 * i, 150, 10 + i as u64)).collect();
    // The fp16 weights upcast to fp32: on the CPU clipmask computes in fp32, so the fp16 file
    // must give exactly what its upcast copy gives (the only difference is storage).
    let up = tmp.path().join("upcast.safetensors");
    let script = format!(
        "from safetensors.torch import load_file, save_file\nsd = load_file({:?})\nassert all(v.dtype.is_floating_point for v in sd.values())\nassert any(str(v.dtype) == 'torch.float16' for v in sd.values())\nsave_file({{k: v.float().contiguous() for k, v in sd.items()}}, {:?})\n",
        fx16.join("model.safetensors").to_str().unwrap(),
        up.to_str().unwrap()
    );
    run_python(&["-c", &script]);

    let cache = tmp.path().join("cache");
    let p16pt = classify_json(&cache, &fx16.join("model.pt"), &images);
    let p16st = classify_json(&cache, &fx16.join("model.safetensors"), &images);
    let pup = classify_json(&cache, &up, &images);
    let p32 = classify_json(&cache, &fx32.join("model.pt"), &images);
    let names = voc_names();
    let mut worst_storage = 0f64;
    let mut worst_rounding = 0f64;
    for i in 0..images.len() {
        for n in &names {
            worst_storage =
                worst_storage.max((p16pt[i].1[n] - pup[i].1[n]).abs()).max((p16st[i].1[n] - pup[i].1[n]).abs());
            worst_rounding = worst_rounding.max((p16pt[i].1[n] - p32[i].1[n]).abs());
        }
    }
    eprintln!("fp16 file vs its fp32 upcast: max |dp| = {worst_storage:.3e}; fp16 vs original fp32 weights: max |dp| = {worst_rounding:.3e}");
    // Same fp32 numbers on the CPU: only float formatting (JSON f32 -> f64) separates them.
    assert!(worst_storage <= 1e-6, "fp16 checkpoint differs from its own fp32 upcast by {worst_storage}");
    // Rounding every weight to fp16 (relative error <= 2^-11 ~ 4.9e-4) moves the cosine
    // similarities by O(1e-3) through 12 random layers; times the logit scale 100 that is a
    // logit change of O(0.1), i.e. a relative change of a probability of ~10%, so an absolute
    // probability difference below 0.05 is what fp16 rounding allows, and a broken load
    // (wrong weights, wrong dtype handling) gives differences of O(1).
    assert!(worst_rounding <= 0.05, "fp16 vs fp32 fixture: {worst_rounding}");
}

// ---------------------------------------------------------------------------------------------
// classify --json
// ---------------------------------------------------------------------------------------------

#[test]
fn classify_json_prints_one_object_per_image_and_goes_on_after_a_missing_one() {
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let a = save_png(tmp.path(), "a", 120, 90, 1);
    let b = save_png(tmp.path(), "b", 90, 160, 2);
    let missing = tmp.path().join("missing.jpg");
    let r = run(clipmask(tmp.path())
        .args(["classify", "--json", "--device", "cpu", "--model"])
        .arg(fx.join("model.safetensors"))
        .arg(&a)
        .arg(&missing)
        .arg(&b));
    assert_eq!(r.code, Some(1), "{}", r.show());
    let lines = parse_json_lines(&r.stdout);
    assert_eq!(lines.len(), 2, "{}", r.show());
    assert_eq!(lines[0].0, a.display().to_string());
    assert_eq!(lines[1].0, b.display().to_string());
    let names = voc_names();
    for (img, probs) in &lines {
        let keys: Vec<&String> = probs.keys().collect();
        let mut expect: Vec<&String> = names.iter().collect();
        expect.sort();
        assert_eq!(keys, expect, "{img}: probs must have the 20 VOC class names");
        let s: f64 = probs.values().sum();
        assert!((s - 1.0).abs() <= 1e-4, "{img}: probabilities sum to {s}");
        assert!(probs.values().all(|&p| (0.0..=1.0).contains(&p)));
    }
    let err = message_lines(&r.stderr);
    assert_eq!(err.len(), 1, "{}", r.show());
    assert!(err[0].starts_with("error: ") && err[0].contains("missing.jpg"), "{}", r.show());
    for m in PANIC_MARKERS {
        assert!(!r.stderr.contains(m));
    }
    // And all good: exit 0, one line per image in argument order.
    let r = run(clipmask(tmp.path())
        .args(["classify", "--json", "--device", "cpu", "--model"])
        .arg(fx.join("model.safetensors"))
        .arg(&b)
        .arg(&a));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let lines = parse_json_lines(&r.stdout);
    assert_eq!(
        lines.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        vec![b.display().to_string(), a.display().to_string()]
    );
}

// ---------------------------------------------------------------------------------------------
// --help
// ---------------------------------------------------------------------------------------------

#[test]
fn help_of_every_command_describes_every_flag() {
    // Every (sub)command of the clap tree, found by walking it rather than by a list, so a new
    // subcommand cannot be missed; each command and each argument has a description.
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        if cmd.get_name() != "help" {
            out.push(path.clone());
        }
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            walk(sub, p, out);
        }
    }
    fn check(cmd: &clap::Command, path: &str) {
        if cmd.get_name() == "help" {
            return;
        }
        assert!(cmd.get_about().is_some() || path.is_empty(), "`{path}` has no description");
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            assert!(
                arg.get_help().is_some() || arg.get_long_help().is_some(),
                "`{path}` argument {id} has no description"
            );
        }
        for sub in cmd.get_subcommands() {
            check(sub, format!("{path} {}", sub.get_name()).trim());
        }
    }
    let root_cmd = clipmask::cli::Cli::command();
    check(&root_cmd, "");
    let mut commands = Vec::new();
    walk(&root_cmd, vec![], &mut commands);
    assert!(commands.len() >= 9, "{commands:?}");
    // And the binary prints each one's help.
    let tmp = tempfile::tempdir().unwrap();
    for cmd in &commands {
        for flag in ["--help", "-h"] {
            let r = run(clipmask(tmp.path()).args(cmd).arg(flag));
            assert_eq!(r.code, Some(0), "{cmd:?} {flag}\n{}", r.show());
            assert!(r.stdout.contains("Usage:"), "{cmd:?} {flag}\n{}", r.show());
        }
    }
    // The flags documented in the README exist.
    let r = run(clipmask(tmp.path()).args(["generate", "--help"]));
    for f in [
        "--model",
        "--config",
        "--device",
        "--images",
        "--out",
        "--labels",
        "--annotations",
        "--coco",
        "--split",
        "--shard",
        "--save-cams",
        "--overlays",
        "--overwrite",
        "--allow-failures",
        "--max-side",
    ] {
        assert!(r.stdout.contains(f), "generate --help lacks {f}");
    }
}

// ---------------------------------------------------------------------------------------------
// Download by name
// ---------------------------------------------------------------------------------------------

#[test]
fn download_verifies_the_checksum_and_leaves_nothing_partial() {
    let fx = fixture("tiny", 0, false);
    let body = std::fs::read(fx.join("model.pt")).unwrap();
    let sha = clipmask::clip::download::sha256_file(&fx.join("model.pt")).unwrap();
    assert_eq!(sha.len(), 64);
    let server = serve(vec![("/good/model.pt".into(), body.clone())], 3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");

    // Right digest: the file appears with identical bytes, nothing else in the directory.
    let dest = dir.join("model.pt");
    clipmask::clip::download::download(&format!("{}/good/model.pt", server.base), &dest, &sha).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert_eq!(files_under(&dir), vec![PathBuf::from("model.pt")]);

    // Wrong digest: an error naming the mismatch, no file, no partial file.
    let dest2 = dir.join("other.pt");
    let wrong = "0".repeat(64);
    let e = clipmask::clip::download::download(&format!("{}/good/model.pt", server.base), &dest2, &wrong).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert!(msg.contains(&sha) && msg.contains(&wrong), "both digests are named: {msg}");
    assert!(!dest2.exists());
    assert_eq!(files_under(&dir), vec![PathBuf::from("model.pt")]);

    // 404: an error, nothing left.
    let dest3 = dir.join("missing.pt");
    let e = clipmask::clip::download::download(&format!("{}/nope/model.pt", server.base), &dest3, &sha).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("404"), "{msg}");
    assert!(!dest3.exists());
    assert_eq!(files_under(&dir), vec![PathBuf::from("model.pt")]);
    assert_eq!(*server.requests.lock().unwrap(), vec!["/good/model.pt", "/good/model.pt", "/nope/model.pt"]);

    // Nothing listening: an error, nothing left.
    let dest4 = dir.join("refused.pt");
    assert!(clipmask::clip::download::download("http://127.0.0.1:1/x.pt", &dest4, &sha).is_err());
    assert_eq!(files_under(&dir), vec![PathBuf::from("model.pt")]);
}

#[test]
fn model_by_name_downloads_from_the_base_url_and_rejects_a_bad_digest() {
    let (_, sha, file) = clipmask::clip::download::released("ViT-B/16").unwrap();
    assert_eq!(file, "ViT-B-16.pt");
    let path = format!("/{sha}/{file}");
    let server = serve(vec![(path.clone(), b"these bytes are not ViT-B/16".to_vec())], 1);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let img = save_png(tmp.path(), "img", 64, 48, 1);
    let r = run(clipmask(&cache)
        .env("CLIPMASK_MODEL_BASE_URL", &server.base)
        .args(["classify", "--device", "cpu", "--model", "ViT-B/16"])
        .arg(&img));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("checksum mismatch"), "{line}");
    assert!(line.contains("ViT-B/16"), "{line}");
    assert_eq!(*server.requests.lock().unwrap(), vec![path], "fetched URL");
    assert!(files_under(&cache).is_empty(), "files left in the cache: {:?}", files_under(&cache));

    // A trailing slash on the base URL is tolerated.
    let server = serve(vec![], 1);
    let r = run(clipmask(&cache)
        .env("CLIPMASK_MODEL_BASE_URL", format!("{}/", server.base))
        .args(["classify", "--device", "cpu", "--model", "ViT-B/16"])
        .arg(&img));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("404"), "{line}");
    assert_eq!(*server.requests.lock().unwrap(), vec![format!("/{sha}/{file}")]);
    assert!(files_under(&cache).is_empty(), "files left in the cache: {:?}", files_under(&cache));

    // A cached file with the wrong content: reported as corrupt, nothing fetched.
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join(file), b"half a download").unwrap();
    let r = run(clipmask(&cache)
        .env("CLIPMASK_MODEL_BASE_URL", "http://127.0.0.1:1")
        .args(["classify", "--device", "cpu", "--model", "ViT-B/16"])
        .arg(&img));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("corrupt"), "{line}");
    assert!(line.contains("delete"), "says what to do: {line}");

    // An unknown name is neither a file nor a released model.
    let r = run(clipmask(&cache).args(["classify", "--device", "cpu", "--model", "ViT-H/99"]).arg(&img));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("ViT-B/16"), "lists the released names: {line}");
}
