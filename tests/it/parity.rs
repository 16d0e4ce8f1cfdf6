//! The model and the CLIP-ES maps against the independent PyTorch reference
//! (tests/python/clip_reference.py: pytorch-grad-cam and OpenCV, as the original calls them)
//! on the same random weights (logit scale 10, the well-conditioned regime) and pixels, with
//! the README's Fidelity tolerances; fp16 against the same reference in fp16.
use crate::support::*;
use clipmask::clip::Clip;
use clipmask::config::DatasetConfig;
use clipmask::image_input::prepare;
use clipmask::pipeline::{compute_maps, MapOptions};
use clipmask::prompts::{all_sentences, text_features, tokenize};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Model internals (block inputs, attention, text features, probabilities): well-conditioned
/// sums, compared at 1e-4 as before.
const TOL: f32 = 1e-4;
/// Fidelity tolerance (README), fp32 on CPU: raw GradCAM maps.
const RAW_TOL: f32 = 1e-5;
/// Refined maps: at any pixel, and on average (the Sinkhorn step amplifies summation order;
/// the original itself moves its refined maps by up to 3.5e-4 between 1 and 2 threads).
const REFINED_MAX_TOL: f32 = 1e-3;
const REFINED_MEAN_TOL: f64 = 1e-5;
/// Share of identical label pixels.
const LABELS_MIN: f64 = 0.999;

struct Case {
    id: String,
    image: std::path::PathBuf,
    labels: Vec<usize>,
}

/// Synthetic images (sides multiples of 16 and not, 1 to 4 labels) and `n_photos` VOC photos.
fn cases(dir: &std::path::Path, n_photos: usize) -> Vec<Case> {
    let mut out = Vec::new();
    let sizes = [
        (224u32, 160u32, vec![14usize]),
        (200, 130, vec![11, 14]),
        (97, 250, vec![0, 6, 18]),
        (320, 240, vec![2, 7, 11, 14]),
    ];
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
        let mut ids: Vec<&String> = labels.keys().collect();
        ids.sort();
        for id in ids.into_iter().take(n_photos) {
            let p = voc.join("JPEGImages").join(format!("{id}.jpg"));
            let l = labels[id].iter().map(|n| cfg.class_index(n).unwrap()).collect();
            out.push(Case { id: id.to_string(), image: p, labels: l });
        }
    } else {
        eprintln!("SKIP: ../shared/data/voc-sample not present: real-photo parity cases skipped");
    }
    out
}

/// The VOC photos shipped in examples/images with their labels.
fn example_cases() -> Vec<Case> {
    let (dir, labels) = crate::support::photos();
    let labels: HashMap<String, Vec<String>> = serde_json::from_str(&std::fs::read_to_string(labels).unwrap()).unwrap();
    let cfg = DatasetConfig::resolve("voc12").unwrap();
    let mut ids: Vec<&String> = labels.keys().collect();
    ids.sort();
    ids.into_iter()
        .map(|id| Case {
            id: id.to_string(),
            image: dir.join(format!("{id}.jpg")),
            labels: labels[id].iter().map(|n| cfg.class_index(n).unwrap()).collect(),
        })
        .collect()
}

/// Runs tests/python/run_reference.py (pytorch-grad-cam + OpenCV, see clip_reference.py).
fn reference(
    model: &std::path::Path,
    cases: &[Case],
    fp16: bool,
    threads: usize,
    zero_shot: bool,
    tmp: &std::path::Path,
) -> HashMap<String, Tensor> {
    let config_path = root().join("configs/voc12.json");
    let tag = format!("{}-t{threads}", if fp16 { "fp16" } else { "fp32" });
    let spec = serde_json::json!({
        "model": model,
        "config": config_path,
        "round_fp16": true,
        "fp16": fp16,
        "threads": threads,
        "cases": cases.iter().map(|c| serde_json::json!({"id": c.id, "image": c.image, "labels": c.labels})).collect::<Vec<_>>(),
        "zero_shot": if zero_shot { cases.iter().take(3).map(|c| c.image.clone()).collect::<Vec<_>>() } else { vec![] },
    });
    let spec_path = tmp.join(format!("spec-{tag}.json"));
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out_path = tmp.join(format!("ref-{tag}.safetensors"));
    run_python(&[
        root().join("tests/python/run_reference.py").to_str().unwrap(),
        spec_path.to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    read_safetensors(&out_path)
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len().max(1) as f64
}

/// Label pixels (reference labelling rule, alpha 1) equal between two sets of refined maps.
fn labels_of(refined: &[f32], keys: &[usize], shape: (usize, usize)) -> Vec<u8> {
    let k = keys.len();
    let arr = ndarray::Array3::from_shape_vec((k, shape.0, shape.1), refined.to_vec()).unwrap();
    let keys: Vec<i64> = keys.iter().map(|&k| k as i64).collect();
    clipmask::eval::label_map_from_cams(&arr, &keys, 1.0)
}

/// Label probabilities (the image's own classes) covered by a set of cases.
fn prob_range(r: &HashMap<String, Tensor>, cases: &[Case]) -> (f32, f32) {
    let mut lo = f32::INFINITY;
    let mut hi = 0f32;
    for c in cases {
        for &p in &to_vec(&r[&format!("{}.probs", c.id)])[..c.labels.len()] {
            lo = lo.min(p);
            hi = hi.max(p);
        }
    }
    (lo, hi)
}

#[test]
fn maps_text_and_zero_shot_match_the_pytorch_grad_cam_reference() {
    tch::set_num_threads(2);
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases(tmp.path(), 10);
    let r = reference(&fx.join("model.pt"), &cases, false, 2, true, tmp.path());
    let cfg = DatasetConfig::load(&root().join("configs/voc12.json")).unwrap();

    let model = Clip::load_path(&fx.join("model.pt"), Device::Cpu, Kind::Float).unwrap();
    let text = text_features(&model, &cfg).unwrap();
    let d = max_abs_diff(&to_vec(&text.classes), &to_vec(&r["text.classes"]));
    eprintln!("text features (classes): max |diff| = {d:.2e}");
    assert!(d <= TOL);
    let d = max_abs_diff(&to_vec(&text.background), &to_vec(&r["text.background"]));
    eprintln!("text features (background): max |diff| = {d:.2e}");
    assert!(d <= TOL);

    let opts = MapOptions { box_threshold: cfg.box_threshold, max_side: None, ..Default::default() };
    let (mut worst_raw, mut worst_ref, mut sum_ref, mut n_px) = (0f32, 0f32, 0f64, 0usize);
    let (mut same_labels, mut all_labels) = (0usize, 0usize);
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
        let ref_raw = to_vec(&r[&format!("{}.raw", c.id)]);
        let ref_refined = to_vec(&r[&format!("{}.refined", c.id)]);
        let d_raw = max_abs_diff(m.raw.as_slice().unwrap(), &ref_raw);
        let d_ref = max_abs_diff(m.refined.as_slice().unwrap(), &ref_refined);
        let mean_ref = mean_abs_diff(m.refined.as_slice().unwrap(), &ref_refined);
        let d_prob = max_abs_diff(&m.probs, &to_vec(&r[&format!("{}.probs", c.id)]));
        let shape = (p.height as usize, p.width as usize);
        let ours = labels_of(m.refined.as_slice().unwrap(), &c.labels, shape);
        let theirs = labels_of(&ref_refined, &c.labels, shape);
        let same = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
        eprintln!(
            "{} {}x{} K={} p(labels) {:?}: block-L input {d_tok:.1e}, attention {d_attn:.1e}, probs {d_prob:.1e}, \
             raw {d_raw:.1e}, refined max {d_ref:.1e} mean {mean_ref:.1e}, labels {}/{} identical",
            c.id,
            p.width,
            p.height,
            c.labels.len(),
            m.probs[..c.labels.len()].iter().map(|p| format!("{p:.3}")).collect::<Vec<_>>(),
            same,
            ours.len()
        );
        assert!(d_tok <= TOL && d_attn <= TOL && d_prob <= TOL, "{}: model internals exceed {TOL}", c.id);
        assert!(d_raw <= RAW_TOL, "{}: raw maps differ by {d_raw:.2e} > {RAW_TOL}", c.id);
        assert!(d_ref <= REFINED_MAX_TOL, "{}: refined maps differ by {d_ref:.2e} > {REFINED_MAX_TOL}", c.id);
        worst_raw = worst_raw.max(d_raw);
        worst_ref = worst_ref.max(d_ref);
        sum_ref += mean_ref * ours.len() as f64 * c.labels.len() as f64;
        n_px += ours.len() * c.labels.len();
        same_labels += same;
        all_labels += ours.len();
    }
    let mean_ref = sum_ref / n_px as f64;
    let agree = same_labels as f64 / all_labels as f64;
    let (lo, hi) = prob_range(&r, &cases);
    eprintln!(
        "fp32 parity over {} images: label probabilities covered {lo:.4}..{hi:.4}; raw max {worst_raw:.2e}; \
         refined max {worst_ref:.2e}, mean {mean_ref:.2e}; labels {:.4}% identical",
        cases.len(),
        agree * 100.0
    );
    // The fixture must be in the well-conditioned regime, or parity proves nothing.
    assert!(lo > 1e-4, "label probabilities as low as {lo:.1e}: the fixture is not well-conditioned");
    assert!(mean_ref <= REFINED_MEAN_TOL, "refined maps differ by {mean_ref:.2e} on average");
    assert!(agree >= LABELS_MIN, "only {:.4}% of label pixels identical", agree * 100.0);

    // Zero-shot classification (CLIP's standard protocol).
    for (i, c) in cases.iter().take(3).enumerate() {
        let probs = clipmask::prompts::zero_shot(&model, &text, &c.image).unwrap();
        let d = max_abs_diff(&probs, &to_vec(&r[&format!("zs.{i}.probs")]));
        eprintln!("zero-shot {}: max |diff| = {d:.2e}", c.id);
        assert!(d <= TOL);
    }
}

/// fp16 as the original runs it on CUDA (the model after OpenAI's convert_weights), here on the
/// CPU: against the same pytorch-grad-cam reference run in fp16. The bar (README, Fidelity): our
/// labels agree with the fp16 reference at least as well as that reference agrees with its
/// own fp32; the map differences are printed against the reference's own 1- vs 2-thread spread.
#[test]
fn fp16_maps_match_the_fp16_reference() {
    tch::set_num_threads(2);
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases(tmp.path(), 4);
    let r16 = reference(&fx.join("model.pt"), &cases, true, 2, false, tmp.path());
    let r16_t1 = reference(&fx.join("model.pt"), &cases, true, 1, false, tmp.path());
    let r32 = reference(&fx.join("model.pt"), &cases, false, 2, false, tmp.path());
    let cfg = DatasetConfig::resolve("voc12").unwrap();
    let model = Clip::load_path(&fx.join("model.pt"), Device::Cpu, Kind::Half).unwrap();
    let text = text_features(&model, &cfg).unwrap();
    let d_text = max_abs_diff(&to_vec(&text.classes), &to_vec(&r16["text.classes"]));
    let opts = MapOptions { box_threshold: cfg.box_threshold, max_side: None, ..Default::default() };
    let (mut ours_vs_ref, mut ref_vs_32, mut n) = (0usize, 0usize, 0usize);
    let (mut raw_d, mut ref_d, mut raw_self, mut ref_self, mut raw_16_32) = (0f32, 0f32, 0f32, 0f32, 0f32);
    for c in &cases {
        let img = clipmask::image_input::load_rgb(&c.image).unwrap();
        let p = prepare(&img, 16, None);
        let m = compute_maps(&model, &text, &p, &c.labels, &opts).unwrap();
        assert!(m.raw.iter().chain(m.refined.iter()).all(|v| v.is_finite()), "{}: non-finite fp16 maps", c.id);
        let key = |r: &HashMap<String, Tensor>, k: &str| to_vec(&r[&format!("{}.{k}", c.id)]);
        let shape = (p.height as usize, p.width as usize);
        let ours = labels_of(m.refined.as_slice().unwrap(), &c.labels, shape);
        let l16 = labels_of(&key(&r16, "refined"), &c.labels, shape);
        let l32 = labels_of(&key(&r32, "refined"), &c.labels, shape);
        ours_vs_ref += ours.iter().zip(&l16).filter(|(a, b)| a == b).count();
        ref_vs_32 += l16.iter().zip(&l32).filter(|(a, b)| a == b).count();
        n += ours.len();
        raw_d = raw_d.max(max_abs_diff(m.raw.as_slice().unwrap(), &key(&r16, "raw")));
        ref_d = ref_d.max(max_abs_diff(m.refined.as_slice().unwrap(), &key(&r16, "refined")));
        raw_self = raw_self.max(max_abs_diff(&key(&r16_t1, "raw"), &key(&r16, "raw")));
        ref_self = ref_self.max(max_abs_diff(&key(&r16_t1, "refined"), &key(&r16, "refined")));
        raw_16_32 = raw_16_32.max(max_abs_diff(&key(&r32, "raw"), &key(&r16, "raw")));
    }
    let (lo, hi) = prob_range(&r16, &cases);
    let a_ours = ours_vs_ref as f64 / n as f64;
    let a_ref = ref_vs_32 as f64 / n as f64;
    eprintln!(
        "fp16 parity over {} images, label probabilities {lo:.4}..{hi:.4}: text features {d_text:.1e}; \
         ours vs fp16 reference: raw max {raw_d:.2e}, refined max {ref_d:.2e}, labels {:.4}%; \
         fp16 reference 1 vs 2 threads: raw {raw_self:.2e}, refined {ref_self:.2e}; \
         fp16 reference vs its fp32: raw {raw_16_32:.2e}, labels {:.4}%",
        cases.len(),
        a_ours * 100.0,
        a_ref * 100.0
    );
    assert!(
        a_ours >= a_ref,
        "fp16 labels agree {:.4}% with the fp16 reference, less than its own fp32 ({:.4}%)",
        a_ours * 100.0,
        a_ref * 100.0
    );
    // The raw maps are far closer to the fp16 reference than fp16 is to fp32.
    assert!(
        raw_d < raw_16_32,
        "fp16 raw maps {raw_d:.2e} from the fp16 reference, not closer than fp32 is ({raw_16_32:.2e})"
    );
}

/// Issue 26 allows a faster fp16 formulation on CUDA only if the fp16 bar against the Python
/// reference still holds: the CUDA formulation (fused attention, batched score product, channel
/// sum and affinity; docs/method.md "Which steps differ on CUDA") run here on the CPU, each
/// image in a batch of two (itself twice, so the batched products run), against the same
/// fp16 reference and bar as [`fp16_maps_match_the_fp16_reference`].
#[test]
fn cuda_formulation_fp16_maps_match_the_fp16_reference() {
    tch::set_num_threads(2);
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    // Real photos always (the shipped examples when voc-sample is absent): the bar is about
    // photos, where the synthetic images alone are too few pixels to judge 0.5 % either way.
    let mut cases = cases(tmp.path(), 4);
    if voc_sample().is_none() {
        cases.extend(example_cases());
    }
    let r16 = reference(&fx.join("model.pt"), &cases, true, 2, false, tmp.path());
    let r32 = reference(&fx.join("model.pt"), &cases, false, 2, false, tmp.path());
    let cfg = DatasetConfig::resolve("voc12").unwrap();
    let mut model = Clip::load_path(&fx.join("model.pt"), Device::Cpu, Kind::Half).unwrap();
    let text = text_features(&model, &cfg).unwrap();
    model.set_formulation(clipmask::clip::layers::Formulation::FAST);
    let opts = MapOptions { box_threshold: cfg.box_threshold, max_side: None, ..Default::default() };
    let (mut ours_vs_ref, mut ref_vs_32, mut n, mut raw_d, mut raw_16_32) = (0usize, 0usize, 0usize, 0f32, 0f32);
    for c in &cases {
        let img = clipmask::image_input::load_rgb(&c.image).unwrap();
        let p = prepare(&img, 16, None);
        let unit = clipmask::pipeline::Unit { prepared: &p, labels: &c.labels };
        let m = clipmask::pipeline::compute_batch(&model, &text, &[unit, unit], &opts).unwrap().remove(0);
        let (raw, refined) = (to_vec(&m.raw), to_vec(&m.refined));
        assert!(raw.iter().chain(&refined).all(|v| v.is_finite()), "{}: non-finite fp16 maps", c.id);
        let key = |r: &HashMap<String, Tensor>, k: &str| to_vec(&r[&format!("{}.{k}", c.id)]);
        let shape = (p.height as usize, p.width as usize);
        let ours = labels_of(&refined, &c.labels, shape);
        let l16 = labels_of(&key(&r16, "refined"), &c.labels, shape);
        let l32 = labels_of(&key(&r32, "refined"), &c.labels, shape);
        ours_vs_ref += ours.iter().zip(&l16).filter(|(a, b)| a == b).count();
        ref_vs_32 += l16.iter().zip(&l32).filter(|(a, b)| a == b).count();
        n += ours.len();
        raw_d = raw_d.max(max_abs_diff(&raw, &key(&r16, "raw")));
        raw_16_32 = raw_16_32.max(max_abs_diff(&key(&r32, "raw"), &key(&r16, "raw")));
    }
    let (a_ours, a_ref) = (ours_vs_ref as f64 / n as f64, ref_vs_32 as f64 / n as f64);
    eprintln!(
        "CUDA formulation, fp16 on the CPU, {} images: vs the fp16 reference raw max {raw_d:.2e}, labels {:.4}%; \
         fp16 reference vs its fp32: raw {raw_16_32:.2e}, labels {:.4}%",
        cases.len(),
        a_ours * 100.0,
        a_ref * 100.0
    );
    assert!(
        a_ours >= a_ref,
        "labels agree {:.4}% with the fp16 reference, less than its fp32 ({:.4}%)",
        a_ours * 100.0,
        a_ref * 100.0
    );
    assert!(
        raw_d < raw_16_32,
        "raw maps {raw_d:.2e} from the fp16 reference, not closer than fp32 is ({raw_16_32:.2e})"
    );
}

/// OpenAI's logit scale 100 on random weights: probabilities ~1e-13 and GradCAM is noise, so
/// only that nothing crashes and nothing is NaN is asserted.
#[test]
fn logit_scale_100_runs_without_nan() {
    let fx = fixture_scaled("tiny", 0, false, 100.0);
    let model = Clip::load_path(&fx.join("model.safetensors"), Device::Cpu, Kind::Float).unwrap();
    assert!((model.logit_scale - 100.0).abs() < 1e-3);
    let cfg = DatasetConfig::resolve("voc12").unwrap();
    let text = text_features(&model, &cfg).unwrap();
    let opts = MapOptions { box_threshold: cfg.box_threshold, max_side: None, ..Default::default() };
    for (seed, labels) in [(1u64, vec![14usize]), (2, vec![0, 6, 18])] {
        let p = prepare(&synthetic_image(200, 150, seed), 16, None);
        let m = compute_maps(&model, &text, &p, &labels, &opts).unwrap();
        let p_min = m.probs[..labels.len()].iter().copied().fold(f32::INFINITY, f32::min);
        eprintln!("logit scale 100: smallest label probability {p_min:.1e}");
        assert!(m.raw.iter().chain(m.refined.iter()).chain(m.probs.iter()).all(|v| v.is_finite()));
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
    assert!((a.logit_scale - 10.0).abs() < 1e-4);
    let img = synthetic_image(150, 100, 9);
    let p = prepare(&img, 16, None);
    let fa = tch::no_grad(|| {
        a.visual
            .patch_pool(&a.visual.trunk(a.visual.embed(&p.input, &a.visual.positional(p.gh, p.gw, true)), 12).tokens)
    });
    let fb = tch::no_grad(|| {
        b.visual
            .patch_pool(&b.visual.trunk(b.visual.embed(&p.input, &b.visual.positional(p.gh, p.gw, true)), 12).tokens)
    });
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
    let all = clipmask::cam::grad_cam(&model.visual, model.logit_scale, &trunk.tokens, &cand, 4, p.gh, p.gw);
    // The reference's way: block L recomputed and one backward pass per label.
    let loop_: Vec<Tensor> = (0..4)
        .map(|i| {
            clipmask::cam::grad_cam_targets(&model.visual, model.logit_scale, &trunk.tokens, &cand, &[i], p.gh, p.gw)
                .maps
        })
        .collect();
    let d = max_abs_diff(&to_vec(&all.maps), &to_vec(&Tensor::cat(&loop_, 0)));
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
    run_python(&[
        root().join("tests/python/run_reference.py").to_str().unwrap(),
        spec.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let r = read_safetensors(&out);
    for (i, s) in sentences.iter().enumerate() {
        let ours = tokenize(s, 77).unwrap();
        let theirs = Vec::<i64>::try_from(&r[&format!("tokens.{i}")]).unwrap();
        assert_eq!(ours, theirs, "token ids differ for {s:?}");
    }
    eprintln!("{} shipped prompts tokenised identically", sentences.len());
}
