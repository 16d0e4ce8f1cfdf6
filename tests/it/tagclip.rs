//! TagCLIP tagging (src/tagclip.rs) against the independent PyTorch reference
//! (tests/python/tagclip_reference.py, written from the official classify.py with OpenCV boxes)
//! on the same random weights (logit scale 10) and pixels: scores within 1e-5, identical tags.
use crate::support::*;
use clipmask::affinity::component_boxes;
use clipmask::clip::Clip;
use clipmask::config::DatasetConfig;
use clipmask::image_input::prepare;
use clipmask::tagclip::{box_region, crop_span, select, tag_image, text_features, TagOptions};
use std::collections::HashMap;
use tch::{Device, Kind};

const SCORE_TOL: f32 = 1e-5;

struct Case {
    id: String,
    image: std::path::PathBuf,
}

/// Synthetic images (one exactly at the model grid, sides not multiples of 16) and VOC photos.
fn cases(dir: &std::path::Path, n_photos: usize) -> Vec<Case> {
    let mut out = Vec::new();
    for (i, (w, h)) in [(224u32, 224u32), (200, 130), (97, 250), (320, 240)].into_iter().enumerate() {
        let p = dir.join(format!("syn{i}.png"));
        synthetic_image(w, h, i as u64 + 11).save(&p).unwrap();
        out.push(Case { id: format!("syn{i}"), image: p });
    }
    if let Some(voc) = voc_sample() {
        let mut ids: Vec<String> = std::fs::read_dir(voc.join("JPEGImages"))
            .unwrap()
            .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        for id in ids.into_iter().take(n_photos) {
            let p = voc.join("JPEGImages").join(format!("{id}.jpg"));
            out.push(Case { id, image: p });
        }
    } else {
        eprintln!("SKIP: ../shared/data/voc-sample not present: real-photo cases skipped");
    }
    out
}

fn reference(model: &std::path::Path, cases: &[Case], tmp: &std::path::Path) -> HashMap<String, tch::Tensor> {
    let spec = serde_json::json!({
        "model": model,
        "threads": 2,
        "round_fp16": true,
        "threshold": 0.5,
        "cases": cases.iter().map(|c| serde_json::json!({"id": c.id, "image": c.image})).collect::<Vec<_>>(),
    });
    let spec_path = tmp.join("tagclip-spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out_path = tmp.join("tagclip-ref.safetensors");
    run_python(&[
        root().join("tests/python/tagclip_reference.py").to_str().unwrap(),
        spec_path.to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    read_safetensors(&out_path)
}

fn ints(t: &tch::Tensor) -> Vec<usize> {
    Vec::<i64>::try_from(t.reshape([-1])).unwrap().into_iter().map(|v| v as usize).collect()
}

#[test]
fn tags_match_the_pytorch_tagclip_reference() {
    tch::set_num_threads(2);
    let fx = fixture("tiny", 0, false);
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases(tmp.path(), 6);
    let r = reference(&fx.join("model.pt"), &cases, tmp.path());
    let cfg = DatasetConfig::load(&root().join("configs/voc12.json")).unwrap();
    let model = Clip::load_path(&fx.join("model.pt"), Device::Cpu, Kind::Float).unwrap();
    let text = text_features(&model, &cfg, false, None).unwrap();
    let d = max_abs_diff(&to_vec(&text.all), &to_vec(&r["text"]));
    eprintln!("text features (20 class names + 25 background words, 85 templates): max |diff| = {d:.2e}");
    assert!(d <= 1e-4, "text features differ by {d}");

    let opts = TagOptions::default();
    let (mut worst, mut worst_local) = (0f32, 0f32);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    let (mut n_reid, mut n_labels) = (0usize, 0usize);
    for c in &cases {
        let img = clipmask::image_input::load_rgb(&c.image).unwrap();
        let p = prepare(&img, model.visual.patch, opts.max_side);
        let t = tag_image(&model, &text, &p, &opts).unwrap();
        let want_scores = to_vec(&r[&format!("{}.scores", c.id)]);
        let want_local = to_vec(&r[&format!("{}.local", c.id)]);
        let dl = max_abs_diff(&t.local, &want_local);
        let ds = max_abs_diff(&t.scores, &want_scores);
        assert_eq!(t.reidentified, ints(&r[&format!("{}.reid", c.id)]), "{}: re-identified classes", c.id);
        let labels = select(&t.scores, 0.5);
        assert_eq!(labels, ints(&r[&format!("{}.labels", c.id)]), "{}: tags", c.id);
        assert!(ds <= SCORE_TOL, "{}: scores differ by {ds:.2e}", c.id);
        assert!(dl <= SCORE_TOL, "{}: local scores differ by {dl:.2e}", c.id);
        eprintln!(
            "{:>12} {}x{}: scores max |diff| {ds:.1e} (local {dl:.1e}); re-identified {:?}; tags {:?}",
            c.id,
            img.width(),
            img.height(),
            t.reidentified,
            labels
        );
        worst = worst.max(ds);
        worst_local = worst_local.max(dl);
        for &s in &t.scores {
            lo = lo.min(s);
            hi = hi.max(s);
        }
        n_reid += t.reidentified.len();
        n_labels += labels.len();
    }
    eprintln!(
        "{} images: scores in [{lo:.4}, {hi:.4}], worst |diff| {worst:.2e} (local {worst_local:.2e}); \
         {n_reid} crops re-identified; {n_labels} tags, all identical",
        cases.len()
    );
    assert!(n_reid > 0, "no crop was re-identified: the cases do not cover class-wise re-identification");
}

#[test]
fn components_boxes_and_spans_on_hand_made_grids() {
    // Two 8-connected components (the diagonal joins (0,0) and (1,1)) and one apart.
    #[rustfmt::skip]
    let fg = [
        true,  false, false, false, false,
        false, true,  false, false, true,
        false, false, false, false, true,
        false, false, false, false, false,
    ];
    let mut boxes = component_boxes(&fg, 4, 5);
    boxes.sort();
    assert_eq!(boxes, vec![(0, 0, 2, 2), (4, 1, 5, 3)]);
    // box_region: threshold int(mean * 255); far edges clipped to w-1 / h-1 as the official code.
    let norm = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0];
    let mean = norm.iter().sum::<f32>() / 20.0;
    let r = box_region(&norm, mean, 4, 5);
    let filled: Vec<usize> = (0..20).filter(|&i| r[i]).collect();
    // (0,0)-(2,2) fully; (4,1)-(5,3) clipped to x1 = 4: empty.
    assert_eq!(filled, vec![0, 1, 5, 6]);
    // crop_span: rows/cols with values > 0.5, ends exclusive then clipped to h-1 / w-1.
    assert_eq!(crop_span(&norm, 4, 5), Some((0, 3, 0, 4)));
    let only_last_col = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(crop_span(&only_last_col, 2, 5), None);
    assert_eq!(crop_span(&[0.0; 4], 2, 2), None);
}

#[test]
fn relative_threshold_and_argmax_fallback() {
    assert_eq!(select(&[0.0, 0.5, 0.75, 1.0], 0.5), vec![2, 3]); // thr = 0.5: 0.5 is not above
    assert_eq!(select(&[0.2, 0.2, 0.2], 0.5), vec![0]); // none above: the first maximum
    assert_eq!(select(&[0.0, 1.0, 0.2], 0.1), vec![1, 2]);
    assert_eq!(select(&[], 0.5), Vec::<usize>::new());
}
