//! Text side: sharpness against NumPy, stable ranking, fusion modes, `prompts show`.
use crate::support::*;
use clipmask::clip::Clip;
use clipmask::config::{DatasetConfig, Fusion, PromptName};
use clipmask::prompts::{sharpness, text_features};
use tch::{Device, Kind};

#[test]
fn sharpness_matches_numpy_on_hand_made_scores() {
    // Deterministic pseudo-random softmax rows over 6 classes; images with 1..4 labels.
    let mut scores = Vec::new();
    let mut gts = Vec::new();
    for i in 0..9usize {
        let raw: Vec<f32> = (0..6).map(|c| (((i * 7 + c * 13) % 11) as f32 * 0.37).exp()).collect();
        let s: f32 = raw.iter().sum();
        scores.push(raw.iter().map(|v| v / s).collect::<Vec<f32>>());
        gts.push((0..(i % 4 + 1)).map(|k| (i + 2 * k) % 6).collect::<Vec<usize>>());
    }
    let (ours, n) = sharpness(&scores, &gts);
    let script = format!(
        "import numpy as np, json\nS=np.array({:?},dtype=np.float32)\nG={:?}\nv=[np.var(S[i][g].astype(np.float64))/np.mean(S[i][g].astype(np.float64)) for i,g in enumerate(G) if len(g)>1]\nprint(json.dumps([float(np.mean(v)), len(v)]))",
        scores, gts
    );
    let out = python_cmd().args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (np_s, np_n): (f64, usize) = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n, np_n);
    assert!((ours - np_s).abs() < 1e-9, "ours {ours} numpy {np_s}");
    // A hand case: scores 0.2 and 0.4 -> mean 0.3, variance 0.01 -> 1/30.
    let (s, n) = sharpness(&[vec![0.2, 0.4, 0.4]], &[vec![0, 1]]);
    assert_eq!(n, 1);
    assert!((s - 0.01 / 0.3).abs() < 1e-7);
    // Single-label images are not used.
    assert_eq!(sharpness(&[vec![1.0]], &[vec![0]]).1, 0);
}

#[test]
fn feature_fusion_of_one_synonym_equals_sentence_fusion() {
    let fx = fixture("tiny", 0, false);
    let model = Clip::load_path(&fx.join("model.safetensors"), Device::Cpu, Kind::Float).unwrap();
    let base = DatasetConfig::resolve("voc12").unwrap();
    let mut feature = base.clone();
    feature.fusion = Fusion::Feature;
    for c in &mut feature.classes {
        c.prompt = Some(PromptName::Many(vec![c.prompt().alternatives().join(",")]));
    }
    let a = text_features(&model, &base).unwrap();
    let b = text_features(&model, &feature).unwrap();
    assert!(max_abs_diff(&to_vec(&a.classes), &to_vec(&b.classes)) < 1e-6);
    // With two real alternatives, feature fusion is the normalised mean of the two embeddings.
    let mut two = base.clone();
    two.fusion = Fusion::Feature;
    two.classes[14].prompt = Some(PromptName::Many(vec!["person".into(), "human".into()]));
    let t = text_features(&model, &two).unwrap();
    let mut single = base.clone();
    single.classes[14].prompt = Some(PromptName::One("person".into()));
    single.classes[13].prompt = Some(PromptName::One("human".into()));
    let s = text_features(&model, &single).unwrap();
    let mean = (s.classes.get(14) + s.classes.get(13)) / 2.0;
    let expect = &mean / mean.norm();
    assert!(max_abs_diff(&to_vec(&t.classes.get(14)), &to_vec(&expect)) < 1e-5);
    assert!(max_abs_diff(&to_vec(&t.classes.get(14)), &to_vec(&s.classes.get(14))) > 1e-3);
}

#[test]
fn prompts_show_prints_every_sentence_of_the_shipped_configs() {
    for (name, n_classes, n_bg) in [("voc12", 20, 25), ("coco14", 80, 23)] {
        let out = clipmask(&shared_cache()).args(["prompts", "show", "--config", name]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let cfg = DatasetConfig::resolve(name).unwrap();
        assert_eq!(cfg.classes.len(), n_classes);
        assert_eq!(cfg.background_words.len(), n_bg);
        for c in &cfg.classes {
            let p = c.prompt().alternatives().join(",");
            assert!(text.contains(&format!("      a clean origami {p}.\n")), "{name}: missing sentence for {}", c.name);
        }
        for w in &cfg.background_words {
            assert!(text.contains(&format!("      a clean origami {w}.\n")), "{name}: missing background {w}");
        }
        let sentences = text.lines().filter(|l| l.starts_with("      ")).count();
        assert_eq!(sentences, n_classes + n_bg);
    }
    let out = clipmask(&shared_cache()).args(["prompts", "show", "--config", "voc12"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("a clean origami person with clothes,people,human."));
    assert!(text.contains("a clean origami tvmonitor screen."));
}

#[test]
fn ranking_is_stable_and_writes_a_config() {
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut labels = serde_json::Map::new();
    for i in 0..6u32 {
        synthetic_image(200 + 10 * i, 150, i as u64 + 40).save(images.join(format!("im{i}.png"))).unwrap();
        let l: Vec<&str> = ["person", "dog", "car", "cat"]
            .iter()
            .copied()
            .cycle()
            .skip(i as usize)
            .take(2 + (i as usize % 2))
            .collect();
        labels.insert(format!("im{i}"), serde_json::json!(l));
    }
    labels.insert("single".into(), serde_json::json!(["dog"]));
    synthetic_image(120, 90, 99).save(images.join("single.png")).unwrap();
    let labels_path = tmp.path().join("labels.json");
    std::fs::write(&labels_path, serde_json::Value::Object(labels).to_string()).unwrap();
    let templates = tmp.path().join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\na clean origami {}.\nart of the {}.\na rendering of a weird {}.\n")
        .unwrap();
    let out_cfg = tmp.path().join("best.json");
    let run = |extra: &[&str]| {
        let mut c = clipmask(&shared_cache());
        c.args([
            "prompts",
            "rank",
            "--model",
            fx.join("model.pt").to_str().unwrap(),
            "--config",
            "voc12",
            "--device",
            "cpu",
        ])
        .args(["--images", images.to_str().unwrap(), "--labels", labels_path.to_str().unwrap()])
        .args(["--templates", templates.to_str().unwrap(), "--json"])
        .args(extra);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        crate::json_schemas::assert_valid("prompts-rank", &text);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["schema"], 1);
        v["templates"].as_array().unwrap().clone()
    };
    let a = run(&[]);
    let b = run(&["--write-config", out_cfg.to_str().unwrap()]);
    assert_eq!(a, b, "ranking changed between runs");
    assert_eq!(a.len(), 4, "config template is already in the list: no duplicate");
    for w in a.windows(2) {
        assert!(w[0]["sharpness"].as_f64().unwrap() <= w[1]["sharpness"].as_f64().unwrap());
    }
    assert!(a.iter().all(|r| r["images"] == 6), "the single-label image is not used");
    let best = DatasetConfig::load(&out_cfg).unwrap();
    assert_eq!(best.templates, vec![a[0]["template"].as_str().unwrap().to_string()]);
    assert_eq!(best.classes, DatasetConfig::resolve("voc12").unwrap().classes);
}
