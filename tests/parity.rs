//! The model and the CLIP-ES maps against the independent PyTorch reference
//! (tests/python/clip_reference.py) on the same random weights and pixels: within 1e-4.
mod common;
use clipmask::config::DatasetConfig;
use clipmask::model::Clip;
use clipmask::pipeline::{compute_maps, prepare, MapOptions};
use clipmask::prompts::{all_sentences, text_features, tokenize};
use common::*;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

const TOL: f32 = 1e-4;

struct Case {
    id: String,
    image: std::path::PathBuf,
    labels: Vec<usize>,
}

fn cases(dir: &std::path::Path) -> Vec<Case> {
    let mut out = Vec::new();
    // Synthetic images, sides multiples of 16 and not, 1 to 4 labels.
    let sizes = [(224u32, 160u32, vec![14usize]), (200, 130, vec![11, 14]), (97, 250, vec![0, 6, 18]), (320, 240, vec![2, 7, 11, 14])];
    for (i, (w, h, labels)) in sizes.into_iter().enumerate() {
        let p = dir.join(format!("syn{i}.png"));
        synthetic_image(w, h, i as u64 + 1).save(&p).unwrap();
        out.push(Case { id: format!("syn{i}"), image: p, labels });
    }
    // Real photos, as JPEG: clipmask decodes with libjpeg-turbo like PIL, so pixels are identical.
    if let Some(voc) = voc_sample() {
        let labels: HashMap<String, Vec<String>> =
            serde_json::from_str(&std::fs::read_to_string(voc.join("labels.json")).unwrap()).unwrap();
        let cfg = DatasetConfig::resolve("voc12").unwrap();
        for id in ["2011_000095", "2011_000096", "2011_000102", "2011_000137"] {
            let p = voc.join("JPEGImages").join(format!("{id}.jpg"));
            let l = labels[id].iter().map(|n| cfg.class_index(n).unwrap()).collect();
            out.push(Case { id: id.to_string(), image: p, labels: l });
        }
    } else {
        eprintln!("../shared/data/voc-sample not present: real-photo cases skipped");
    }
    out
}

#[test]
fn maps_text_and_zero_shot_match_the_pytorch_reference() {
    tch::set_num_threads(2);
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases(tmp.path());
    let config_path = root().join("configs/voc12.json");
    let cfg = DatasetConfig::load(&config_path).unwrap();
    let spec = serde_json::json!({
        "model": fx.join("model.pt"),
        "config": config_path,
        "round_fp16": true,
        "cases": cases.iter().map(|c| serde_json::json!({"id": c.id, "image": c.image, "labels": c.labels})).collect::<Vec<_>>(),
        "zero_shot": cases.iter().take(3).map(|c| c.image.clone()).collect::<Vec<_>>(),
    });
    let spec_path = tmp.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out_path = tmp.path().join("ref.safetensors");
    run_python(&[root().join("tests/python/run_reference.py").to_str().unwrap(), spec_path.to_str().unwrap(), out_path.to_str().unwrap()]);
    let r = read_safetensors(&out_path);

    let model = Clip::load_path(&fx.join("model.pt"), Device::Cpu, Kind::Float).unwrap();
    let text = text_features(&model, &cfg).unwrap();
    let d = max_abs_diff(&to_vec(&text.classes), &to_vec(&r["text.classes"]));
    eprintln!("text features (classes): max |diff| = {d:.2e}");
    assert!(d <= TOL);
    let d = max_abs_diff(&to_vec(&text.background), &to_vec(&r["text.background"]));
    eprintln!("text features (background): max |diff| = {d:.2e}");
    assert!(d <= TOL);

    let opts = MapOptions { box_threshold: cfg.box_threshold, max_side: None, round_pos_fp16: true };
    let mut worst = [0f32; 4];
    for c in &cases {
        let img = clipmask::image_input::load_rgb(&c.image).unwrap();
        let p = prepare(&img, 16, None);
        // Block inputs and attention maps, block by block.
        let pos = model.visual.positional(p.gh, p.gw, true);
        let x = tch::no_grad(|| model.visual.embed(&p.input, &pos));
        let trunk = model.visual.trunk(x, model.visual.layers() - 1);
        let d_tok = max_abs_diff(&to_vec(&trunk.tokens), &to_vec(&r[&format!("{}.tokens", c.id)]));
        let ref_attn = &r[&format!("{}.attn", c.id)];
        let mut d_attn = 0f32;
        for (i, a) in trunk.attentions.iter().enumerate() {
            d_attn = d_attn.max(max_abs_diff(&to_vec(a), &to_vec(&ref_attn.get(i as i64))));
        }
        let m = compute_maps(&model, &text, &p, &c.labels, &opts).unwrap();
        let d_raw = max_abs_diff(m.raw.as_slice().unwrap(), &to_vec(&r[&format!("{}.raw", c.id)]));
        let d_ref = max_abs_diff(m.refined.as_slice().unwrap(), &to_vec(&r[&format!("{}.refined", c.id)]));
        let d_prob = max_abs_diff(&m.probs, &to_vec(&r[&format!("{}.probs", c.id)]));
        eprintln!(
            "{} {}x{} K={}: block-L input {d_tok:.2e}, attention {d_attn:.2e}, probs {d_prob:.2e}, raw maps {d_raw:.2e}, refined maps {d_ref:.2e}",
            c.id, p.width, p.height, c.labels.len()
        );
        // Labels identical wherever the reference's top two scores differ by more than 1e-4.
        let keys: Vec<i64> = c.labels.iter().map(|&k| k as i64).collect();
        let labels = clipmask::eval::labels_from_cams(&m.refined, &keys, 1.0);
        let ref_labels = Vec::<i64>::try_from(r[&format!("{}.labels", c.id)].reshape([-1])).unwrap();
        let margin = to_vec(&r[&format!("{}.margin", c.id)]);
        let mismatched = labels.iter().zip(&ref_labels).zip(&margin).filter(|((a, b), m)| **m > 1e-4 && **a as i64 != **b).count();
        assert_eq!(mismatched, 0, "{}: {mismatched} labels differ where the margin exceeds 1e-4", c.id);
        for (w, v) in worst.iter_mut().zip([d_attn, d_prob, d_raw, d_ref]) {
            *w = w.max(v);
        }
        assert!(d_tok <= TOL && d_attn <= TOL && d_prob <= TOL && d_raw <= TOL && d_ref <= TOL, "{} exceeds {TOL}", c.id);
    }
    eprintln!("worst over cases: attention {:.2e}, probs {:.2e}, raw {:.2e}, refined {:.2e}", worst[0], worst[1], worst[2], worst[3]);

    // Zero-shot classification (CLIP's standard protocol).
    for (i, c) in cases.iter().take(3).enumerate() {
        let probs = clipmask::cli::classify::zero_shot(&model, &text, &c.image).unwrap();
        let d = max_abs_diff(&probs, &to_vec(&r[&format!("zs.{i}.probs")]));
        eprintln!("zero-shot {}: max |diff| = {d:.2e}", c.id);
        assert!(d <= TOL);
    }
}

#[test]
fn torchscript_and_safetensors_load_to_the_same_model() {
    let fx = fixture("tiny", 0, false);
    let a = Clip::load_path(&fx.join("model.pt"), Device::Cpu, Kind::Float).unwrap();
    let b = Clip::load_path(&fx.join("model.safetensors"), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(a.config, b.config);
    assert_eq!(a.config.vision_width, 128);
    assert_eq!(a.config.vision_layers, 12);
    assert_eq!(a.config.vision_heads, 2);
    assert_eq!(a.config.patch, 16);
    assert_eq!(a.config.grid, 14);
    assert_eq!(a.config.embed_dim, 64);
    assert_eq!(a.config.text_layers, 3);
    assert_eq!(a.config.vocab_size, 49408);
    assert_eq!(a.config.context_length, 77);
    assert!((a.logit_scale - 100.0).abs() < 1e-3);
    let img = synthetic_image(150, 100, 9);
    let p = prepare(&img, 16, None);
    let fa = tch::no_grad(|| a.visual.patch_pool(&a.visual.trunk(a.visual.embed(&p.input, &a.visual.positional(p.gh, p.gw, true)), 12).tokens));
    let fb = tch::no_grad(|| b.visual.patch_pool(&b.visual.trunk(b.visual.embed(&p.input, &b.visual.positional(p.gh, p.gw, true)), 12).tokens));
    assert_eq!(max_abs_diff(&to_vec(&fa), &to_vec(&fb)), 0.0);
}

#[test]
fn one_backward_for_all_labels_equals_the_per_label_loop() {
    let fx = fixture("tiny", 0, false);
    let model = Clip::load_path(&fx.join("model.safetensors"), Device::Cpu, Kind::Float).unwrap();
    let cfg = DatasetConfig::resolve("voc12").unwrap();
    let text = text_features(&model, &cfg).unwrap();
    let img = synthetic_image(260, 190, 4);
    let p = prepare(&img, 16, None);
    let x = tch::no_grad(|| model.visual.embed(&p.input, &model.visual.positional(p.gh, p.gw, true)));
    let trunk = model.visual.trunk(x, 11);
    let labels = Tensor::from_slice(&[3i64, 8, 14, 19]);
    let cand = Tensor::cat(&[text.classes.index_select(0, &labels), text.background.shallow_clone()], 0);
    let all = clipmask::cam::grad_cam(&model, &trunk.tokens, &cand, 4, p.gh, p.gw);
    let loop_ = clipmask::cam::grad_cam_per_label(&model, &trunk.tokens, &cand, 4, p.gh, p.gw);
    let d = max_abs_diff(&to_vec(&all.maps), &to_vec(&loop_.maps));
    eprintln!("batched vs per-label GradCAM: max |diff| = {d:.2e}");
    assert!(d <= 1e-5);
    // And the maps are not trivially equal to each other (distinct labels give distinct maps).
    let m = to_vec(&all.maps);
    let n = m.len() / 4;
    assert!(max_abs_diff(&m[..n], &m[n..2 * n]) > 1e-2);
}

#[test]
fn token_ids_match_openai_tokenizer_for_every_shipped_prompt() {
    let mut sentences = Vec::new();
    for name in ["voc12", "coco14"] {
        let cfg = DatasetConfig::resolve(name).unwrap();
        let (classes, bg) = all_sentences(&cfg);
        for (_, s) in classes.into_iter().chain(bg) {
            sentences.extend(s);
        }
    }
    sentences.sort();
    sentences.dedup();
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("spec.json");
    let fx = fixture("tiny", 0, false);
    std::fs::write(
        &spec,
        serde_json::json!({"model": fx.join("model.safetensors"), "config": root().join("configs/voc12.json"), "sentences": sentences}).to_string(),
    )
    .unwrap();
    let out = tmp.path().join("ref.safetensors");
    run_python(&[root().join("tests/python/run_reference.py").to_str().unwrap(), spec.to_str().unwrap(), out.to_str().unwrap()]);
    let r = read_safetensors(&out);
    for (i, s) in sentences.iter().enumerate() {
        let ours = tokenize(s, 77).unwrap();
        let theirs = Vec::<i64>::try_from(&r[&format!("tokens.{i}")]).unwrap();
        assert_eq!(ours, theirs, "token ids differ for {s:?}");
    }
    eprintln!("{} shipped prompts tokenised identically", sentences.len());
}
