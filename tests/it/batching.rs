//! `generate --batch-size`: batching changes speed, not results. The same images (mixed sizes,
//! so batches hold several grid sizes) give the same maps (<= 1e-6) and identical masks with
//! batches of 1, 3 and 8, in fp32 and fp16; and a corrupt file in a batch of 8 fails alone.
use crate::support::*;
use std::collections::BTreeMap;
use std::path::Path;

/// The maps' bound between batch sizes.
const MAP_TOL: f32 = 1e-6;

fn dataset(dir: &Path) -> std::path::PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let sizes = [(160u32, 120u32), (120, 160), (160, 120), (200, 150), (160, 120), (120, 160), (150, 200), (160, 120)];
    let classes = [["dog", "person"], ["cat", "cat"], ["car", "bus"], ["horse", "person"]];
    let mut labels = serde_json::Map::new();
    for (i, (w, h)) in sizes.into_iter().enumerate() {
        let id = format!("im{i:02}");
        synthetic_image(w, h, 100 + i as u64).save(images.join(format!("{id}.png"))).unwrap();
        let c = classes[i % classes.len()];
        labels.insert(id, serde_json::json!(if c[0] == c[1] { vec![c[0]] } else { c.to_vec() }));
    }
    let path = dir.join("labels.json");
    std::fs::write(&path, serde_json::Value::Object(labels).to_string()).unwrap();
    path
}

fn generate(dir: &Path, labels: &Path, out: &Path, batch: usize, precision: &str) -> Run {
    let mut c = generate_cmd(&dir.join("cache"), &dir.join("images"), out);
    c.args(["--save-cams", "--precision", precision, "--labels"]).arg(labels).args([
        "--batch-size",
        &batch.to_string(),
        "--allow-failures",
    ]);
    run(&mut c)
}

/// Mask bytes, refined maps, raw maps.
type Outputs = (Vec<u8>, Vec<f32>, Vec<f32>);

/// id -> outputs.
fn outputs(out: &Path) -> BTreeMap<String, Outputs> {
    let mut m = BTreeMap::new();
    for p in files_under(&out.join("masks")) {
        let id = p.file_stem().unwrap().to_string_lossy().into_owned();
        let (labels, _, _) = clipmask::outputs::read_label_png(&out.join("masks").join(&p)).unwrap();
        let a = clipmask::outputs::CamArchive::read(&out.join("cams").join(format!("{id}.npz"))).unwrap();
        m.insert(id, (labels, a.cams.iter().copied().collect(), a.raw_cams.iter().copied().collect()));
    }
    m
}

#[test]
fn batch_sizes_1_3_and_8_give_the_same_maps_and_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let labels = dataset(tmp.path());
    for precision in ["fp32", "fp16"] {
        let base_dir = tmp.path().join(format!("{precision}-b1"));
        let r = generate(tmp.path(), &labels, &base_dir, 1, precision);
        assert_eq!(r.code, Some(0), "{}", r.show());
        let base = outputs(&base_dir);
        assert_eq!(base.len(), 8);
        for batch in [3, 8] {
            let dir = tmp.path().join(format!("{precision}-b{batch}"));
            let r = generate(tmp.path(), &labels, &dir, batch, precision);
            assert_eq!(r.code, Some(0), "{}", r.show());
            let got = outputs(&dir);
            assert_eq!(got.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
            let (mut d_ref, mut d_raw, mut same, mut total) = (0f32, 0f32, 0usize, 0usize);
            for (id, (mask, refined, raw)) in &got {
                let (bm, br, bw) = &base[id];
                same += mask.iter().zip(bm).filter(|(a, b)| a == b).count();
                total += mask.len();
                d_ref = d_ref.max(max_abs_diff(refined, br));
                d_raw = d_raw.max(max_abs_diff(raw, bw));
            }
            let agree = same as f64 / total as f64;
            eprintln!(
                "{precision}, batch {batch} vs 1: raw max {d_raw:.1e}, refined max {d_ref:.1e}, labels {:.4} % identical",
                agree * 100.0
            );
            assert_eq!(same, total, "{precision} batch {batch}: masks differ from batch 1");
            assert!(
                d_raw <= MAP_TOL && d_ref <= MAP_TOL,
                "{precision} batch {batch}: maps differ by {d_raw:.1e}/{d_ref:.1e}"
            );
        }
    }
}

#[test]
fn a_corrupt_image_in_a_batch_of_8_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let labels = dataset(tmp.path());
    // A PNG signature followed by garbage: the header decodes, the pixels do not.
    let mut bad = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    bad.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
    std::fs::write(tmp.path().join("images/im03.png"), bad).unwrap();
    let out = tmp.path().join("out");
    let r = generate(tmp.path(), &labels, &out, 8, "fp32");
    assert_eq!(r.code, Some(0), "{}", r.show());
    let masks: Vec<String> =
        files_under(&out.join("masks")).iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(masks.len(), 7, "{masks:?}");
    assert!(!masks.contains(&"im03".to_string()));
    let failures = std::fs::read_to_string(out.join("failures.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = failures.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{failures}");
    assert_eq!(lines[0]["id"], "im03");
    assert_eq!(lines[0]["stage"], "decode");
}

/// The device labelling (used when no CRF follows) is the host rule, ties included: maps drawn
/// from a few levels so that equal maxima are common, alpha 1, 2 and 0.5.
#[test]
fn labels_on_the_device_equal_labels_from_cams() {
    let mut rng = rng(5);
    for trial in 0..30 {
        let (k, h, w) = (rng.random_range(1..5usize), rng.random_range(1..20usize), rng.random_range(1..20usize));
        let levels = [0.0f32, 0.25, 0.5, 0.5, 0.75, 1.0];
        let v: Vec<f32> = (0..k * h * w).map(|_| levels[rng.random_range(0..levels.len())]).collect();
        let arr = ndarray::Array3::from_shape_vec((k, h, w), v.clone()).unwrap();
        let keys: Vec<i64> = (0..k as i64).map(|i| i * 3 + 1).collect();
        let t = tch::Tensor::from_slice(&v).reshape([k as i64, h as i64, w as i64]);
        for alpha in [1.0f32, 2.0, 0.5] {
            let host = clipmask::label_maps::label_map_from_cams(&arr, &keys, alpha);
            let device = clipmask::label_maps::label_map_on_device(&t, &keys, alpha).unwrap();
            assert_eq!(host, device, "trial {trial}, alpha {alpha}");
        }
    }
}

/// `scripts/gpu-check.sh --dry-run`: the device check's every step on the CPU with a tiny model,
/// so that the script a device session runs once is known to work. The dry run takes the device
/// run's code path: the correctness subset (8) runs from its own labels file inside a larger
/// throughput set (24), so a correctness run that picked up the whole set's ids would fail here.
#[test]
fn gpu_check_dry_run_writes_its_json_and_markdown() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/gpu-check.sh"))
        .arg("--dry-run")
        .arg("--work")
        .arg(work.path())
        .env("OUT", tmp.path())
        .env("CLIPMASK_PYTHON", python())
        .output()
        .unwrap();
    let md = std::fs::read_to_string(tmp.path().join("gpu-check.md")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}\n{md}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("gpu-check.json")).unwrap()).unwrap();
    assert_eq!(v["finished"], true, "{v}");
    assert_eq!(v["errors"].as_array().map(|e| e.len()), Some(0), "{v}");
    assert_eq!(v["checks"]["all_passed"], true, "{v}");
    // The well-conditioned fixture, and the probabilities it covered.
    assert_eq!(v["logit_scale"].as_f64(), Some(10.0));
    let p = &v["label_probabilities"];
    assert!(p["min"].as_f64().unwrap() > 1e-4 && p["max"].as_f64().unwrap() < 1.0, "{p}");
    // Correctness on exactly its 8 ids; on the CPU both sides of "device vs cpu" are the CPU.
    for run in ["cpu-fp32", "dev-fp32", "dev-fp16"] {
        assert_eq!(v["runs"][run]["done"], 8, "{run}: {v}");
    }
    assert_eq!(v["cuda_vs_cpu_fp32"]["labels_identical"].as_f64(), Some(1.0), "{v}");
    assert_eq!(v["cuda_vs_cpu_fp32"]["images"], 8);
    // Throughput over the larger set: maps, maps + CPU CRF and maps + GPU CRF (its tensor code
    // on the CPU when dry), stage speeds from the summary.
    assert_eq!(v["throughput_images"], 24);
    let runs = [
        ("fp16-b8", None),
        ("fp16-b32", None),
        ("fp32-b8", None),
        ("fp16-b8-crf-cpu", Some("cpu")),
        ("fp16-b32-crf-cpu", Some("cpu")),
        ("fp32-b8-crf-cpu", Some("cpu")),
        ("fp16-b8-crf-tensor-cpu", Some("tensor-cpu")),
        ("fp16-b32-crf-tensor-cpu", Some("tensor-cpu")),
    ];
    for (run, crf_device) in runs {
        let r = &v["clipmask"][run];
        assert_eq!(r["done"], 24, "{run}: {v}");
        assert!(r["images_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["stage_images_per_s"]["model"].as_f64().unwrap() > 0.0, "{run}: {r}");
        assert_eq!(r["crf_device"], serde_json::json!(crf_device), "{run}");
        let args = r["args"].to_string();
        match crf_device {
            Some(d) => assert!(args.contains(&format!(r#""--crf","--crf-device","{d}""#)), "{run}: {args}"),
            None => assert!(!args.contains("--crf"), "{run}: {args}"),
        }
    }
    // The CUDA formulation ran on the CPU, and --max-gpu-mem 1K ran every input alone.
    assert_eq!(v["clipmask"]["fp16-b8"]["formulation"], "fast", "{v}");
    assert_eq!(v["clipmask"]["fp16-b8-memsplit"]["model_batches"], 24, "{v}");
    assert_eq!(v["checks"]["max_gpu_mem_split_every_input"], true, "{v}");
    // CPU CRF vs GPU CRF: a ratio from the same run, and the same masks.
    let g = &v["gpu_crf"];
    assert_eq!(g["device"], "tensor-cpu");
    assert!(g["images_per_s"].as_f64().unwrap() > 0.0 && g["vs_cpu_crf"].as_f64().unwrap() > 0.0, "{g}");
    assert!(g["labels_identical_vs_cpu_crf"].as_f64().unwrap() >= 0.999, "{g}");
    assert!(md.contains("CPU CRF vs GPU CRF (`--crf-device cpu` vs `tensor-cpu`, same run): fp16-b8:"), "{md}");
    assert!(v["pytorch_baseline_images_per_s"]["fp32"].as_f64().unwrap() > 0.0);
    assert!(md.contains("| generate fp16-b8-crf-cpu | maps + CRF (CPU CRF) | cpu |"), "{md}");
    assert!(md.contains("Label probabilities covered"), "{md}");
    // Only the report under OUT (the device tool brings back a few files).
    let mut names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["gpu-check.json", "gpu-check.md"]);
}

fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The outputs of two runs: identical masks (bytes of the PNGs' label maps) and maps within
/// MAP_TOL; returns whether the maps were bit-identical too.
fn assert_same_outputs(a: &Path, b: &Path, what: &str) -> bool {
    let (x, y) = (outputs(a), outputs(b));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{what}");
    let mut bitwise = true;
    for (id, (mask, refined, raw)) in &x {
        let (m, r, w) = &y[id];
        assert_eq!(mask, m, "{what}: {id}'s mask differs");
        let d = max_abs_diff(refined, r).max(max_abs_diff(raw, w));
        assert!(d <= MAP_TOL, "{what}: {id}'s maps differ by {d:.1e}");
        bitwise &= refined == r && raw == w;
    }
    bitwise
}

/// `--max-gpu-mem`: a budget below one input's estimated attention memory runs every input
/// alone (the summary counts the model's batches), with the outputs of an unbounded run.
#[test]
fn a_tiny_gpu_memory_budget_splits_batches_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let labels = dataset(tmp.path());
    let mut runs = Vec::new();
    for budget in ["1K", "100G"] {
        let out = tmp.path().join(format!("out-{budget}"));
        let s = tmp.path().join(format!("summary-{budget}.json"));
        let mut c = generate_cmd(&tmp.path().join("cache"), &tmp.path().join("images"), &out);
        c.args(["--save-cams", "--batch-size", "8", "--max-gpu-mem", budget, "--labels"]).arg(&labels);
        c.arg("--summary-json").arg(&s);
        let r = run(&mut c);
        assert_eq!(r.code, Some(0), "{}", r.show());
        runs.push((out, summary(&s)));
    }
    // 8 inputs: alone under 1K; under 100G one batch per grid size (8x10, 10x8, 13x10, 10x13).
    assert_eq!(runs[0].1["model_batches"], 8, "{}", runs[0].1);
    assert_eq!(runs[1].1["model_batches"], 4, "{}", runs[1].1);
    let bitwise = assert_same_outputs(&runs[0].0, &runs[1].0, "--max-gpu-mem 1K vs 100G");
    eprintln!("--max-gpu-mem 1K vs 100G: masks identical, maps bit-identical: {bitwise}");
    // A size that is not one is refused by the flag parser (clap's error line names it).
    let mut c = generate_cmd(&tmp.path().join("cache"), &tmp.path().join("images"), &tmp.path().join("bad"));
    c.args(["--max-gpu-mem", "20X", "--labels"]).arg(&labels);
    let r = run(&mut c);
    assert_eq!(r.code, Some(2), "{}", r.show());
    let first = message_lines(&r.stderr)[0];
    assert!(first.starts_with("error: ") && first.contains("unknown unit 'X' in '20X'"), "{}", r.show());
}

/// Bucketing by grid size over a window of images: 16 images alternating two grid sizes, batch
/// size 4, run as 4 full batches (the 4-image chunks of before made 8 half-full ones), with the
/// outputs of batch size 1.
#[test]
fn mixed_sizes_are_bucketed_into_full_batches_with_the_same_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut labels = serde_json::Map::new();
    for i in 0..16u64 {
        let (w, h) = if i % 2 == 0 { (160, 120) } else { (120, 160) };
        synthetic_image(w, h, 300 + i).save(images.join(format!("m{i:02}.png"))).unwrap();
        labels.insert(format!("m{i:02}"), serde_json::json!(if i % 3 == 0 { vec!["dog", "cat"] } else { vec!["car"] }));
    }
    let labels_path = tmp.path().join("labels.json");
    std::fs::write(&labels_path, serde_json::Value::Object(labels).to_string()).unwrap();
    let mut runs = Vec::new();
    for batch in [1, 4] {
        let out = tmp.path().join(format!("b{batch}"));
        let s = tmp.path().join(format!("summary-{batch}.json"));
        let mut c = generate_cmd(&tmp.path().join("cache"), &images, &out);
        c.args(["--save-cams", "--batch-size", &batch.to_string(), "--labels"]).arg(&labels_path);
        c.arg("--summary-json").arg(&s);
        let r = run(&mut c);
        assert_eq!(r.code, Some(0), "{}", r.show());
        runs.push((out, summary(&s)));
    }
    assert_eq!(runs[0].1["model_batches"], 16);
    assert_eq!(runs[1].1["model_batches"], 4, "{}", runs[1].1);
    let bitwise = assert_same_outputs(&runs[0].0, &runs[1].0, "bucketed batch 4 vs batch 1");
    eprintln!("bucketed batch 4 vs batch 1: masks identical, maps bit-identical: {bitwise}");
}
