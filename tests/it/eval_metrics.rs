//! `clipmask eval` against independent expectations: confusion matrices worked out by hand,
//! a NumPy re-implementation (tests/python/eval_reference.py) for the alpha sweep and for real
//! VOC ground truth, the error messages, and the HTML report (rendered by Chromium if present).
// Confusion matrices read most clearly with explicit (gt, pred) indices.
#![allow(clippy::needless_range_loop)]
use crate::support::*;
use clipmask::eval::{self, label_map_from_cams, CamKey, ConfusionMatrix, EvalOptions, LabelError};
use clipmask::outputs::{write_label_png, CamArchive};
use ndarray::Array3;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOL: f64 = 1e-12;

/// Runs the NumPy reference and parses its JSON.
fn numpy_reference(args: &[&str]) -> serde_json::Value {
    let script = root().join("tests/python/eval_reference.py");
    let out = python_cmd()
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set CLIPMASK_PYTHON): {e}", python().display()));
    assert!(out.status.success(), "eval_reference.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reference prints JSON")
}

fn write_png(dir: &Path, id: &str, labels: &[u8], w: u32, h: u32) {
    write_label_png(&dir.join(format!("{id}.png")), labels, w, h, Some(&voc().png_palette())).unwrap();
}

fn write_ids(path: &Path, ids: &[&str]) {
    std::fs::write(path, ids.join("\n") + "\n").unwrap();
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < TOL, "{what}: {a} != {b}");
}

fn json_f64(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

// ------------------------------------------------------------------------------------------
// Hand-computed matrices
// ------------------------------------------------------------------------------------------

#[test]
fn hand_built_confusion_matrix() {
    // (gt, pred) pairs: (0,0)x3 (0,1) (1,1)x3 (1,0) (2,2)x2 (2,1), and one GT-255 pixel.
    let gt = [0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 255, 0];
    let pred = [0, 1, 1, 1, 0, 2, 1, 2, 0, 1, 2, 0];
    let mut cm = ConfusionMatrix::new(3);
    cm.accumulate(&gt, &pred).unwrap();
    let expect = [[3, 1, 0], [1, 3, 0], [0, 1, 2]];
    for g in 0..3 {
        for p in 0..3 {
            assert_eq!(cm.count(g, p), expect[g][p], "M[{g}][{p}]");
        }
        assert_eq!(cm.ignored(g), 0);
    }
    let m = cm.metrics();
    // G = (4, 4, 3), P = (4, 5, 2), TP = (3, 3, 2), N = 11.
    assert_eq!(m.valid_pixels, 11);
    close(m.pixel_accuracy, 8.0 / 11.0, "pixel accuracy");
    let iou = [3.0 / 5.0, 3.0 / 6.0, 2.0 / 3.0];
    for (c, want) in iou.iter().enumerate() {
        close(m.per_class[c].iou.unwrap(), *want, "IoU");
    }
    close(m.miou, iou.iter().sum::<f64>() / 3.0, "mIoU");
    close(m.mean_accuracy, (0.75 + 0.75 + 2.0 / 3.0) / 3.0, "mean accuracy");
    close(m.fw_iou, (4.0 * 0.6 + 4.0 * 0.5 + 3.0 * 2.0 / 3.0) / 11.0, "fwIoU");
    close(m.ignored_fraction, 0.0, "ignored fraction");
    close(m.miou_kept, m.miou, "mIoU kept without predicted 255");
    assert_eq!(m.classes_in_gt, 3);

    // Merging two halves gives the same matrix as one pass.
    let (mut a, mut b) = (ConfusionMatrix::new(3), ConfusionMatrix::new(3));
    a.accumulate(&gt[..5], &pred[..5]).unwrap();
    b.accumulate(&gt[5..], &pred[5..]).unwrap();
    a.merge(&b);
    assert_eq!(a, cm);
}

#[test]
fn ignore_handling_gt_skipped_prediction_counted() {
    // (1,1)x2, (1,255)x2, (2,2), (2,1); GT 255 twice (once predicted 255): skipped.
    let gt = [1, 1, 1, 1, 2, 2, 255, 255];
    let pred = [1, 1, 255, 255, 2, 1, 1, 255];
    let mut cm = ConfusionMatrix::new(3);
    cm.accumulate(&gt, &pred).unwrap();
    assert_eq!(cm.count(1, 1), 2);
    assert_eq!(cm.ignored(1), 2);
    assert_eq!(cm.count(2, 2), 1);
    assert_eq!(cm.count(2, 1), 1);
    assert_eq!(cm.ignored(2), 0);
    let m = cm.metrics();
    // G = (0, 4, 2), P = (0, 3, 1), TP = (0, 2, 1), N = 6; predicted 255 is a miss of class 1.
    assert_eq!(m.valid_pixels, 6);
    assert_eq!(m.ignored_pixels, 2);
    assert_eq!(m.per_class[0].iou, None, "background absent from GT");
    close(m.per_class[1].iou.unwrap(), 2.0 / 5.0, "IoU 1");
    close(m.per_class[2].iou.unwrap(), 1.0 / 2.0, "IoU 2");
    close(m.miou, 0.45, "mIoU");
    close(m.pixel_accuracy, 3.0 / 6.0, "pixel accuracy");
    close(m.mean_accuracy, (2.0 / 4.0 + 1.0 / 2.0) / 2.0, "mean accuracy");
    close(m.fw_iou, (4.0 * 0.4 + 2.0 * 0.5) / 6.0, "fwIoU");
    close(m.ignored_fraction, 2.0 / 6.0, "ignored fraction");
    // Kept pixels: G' = (0, 2, 2): IoU'1 = 2/(2+3-2), IoU'2 = 1/(2+1-1).
    close(m.miou_kept, (2.0 / 3.0 + 0.5) / 2.0, "mIoU kept");
}

#[test]
fn label_values_out_of_range_are_rejected() {
    let mut cm = ConfusionMatrix::new(3);
    assert_eq!(
        cm.accumulate(&[0, 3], &[0, 0]),
        Err(LabelError::OutOfRange { in_ground_truth: true, value: 3, n_classes: 3 })
    );
    assert_eq!(
        cm.accumulate(&[0, 255], &[0, 200]),
        Err(LabelError::OutOfRange { in_ground_truth: false, value: 200, n_classes: 3 })
    );
    assert_eq!(cm.accumulate(&[0, 1], &[0]), Err(LabelError::LengthMismatch { gt: 2, pred: 1 }));
    assert_eq!(cm, ConfusionMatrix::new(3), "a rejected pair adds nothing");
    cm.accumulate(&[2, 255, 255], &[255, 255, 2]).unwrap();
    assert_eq!(cm.ignored(2), 1);
}

#[test]
fn absent_classes_are_null_and_not_averaged() {
    let dir = tempfile::tempdir().unwrap();
    let (gt_dir, pred_dir) = (dir.path().join("gt"), dir.path().join("pred"));
    // GT: background and person (15); prediction adds one car (7) pixel.
    write_png(&gt_dir, "a", &[0, 0, 0, 0, 15, 15, 15, 15], 4, 2);
    write_png(&pred_dir, "a", &[0, 0, 7, 0, 15, 15, 0, 15], 4, 2);
    let report = eval::evaluate(&EvalOptions::new(&pred_dir, &gt_dir, "voc12")).unwrap();
    let m = report.best_metrics();
    // G0 = 4, G15 = 4, P0 = 4, P7 = 1, P15 = 3, TP0 = 3, TP15 = 3.
    close(m.per_class[0].iou.unwrap(), 3.0 / 5.0, "background IoU");
    close(m.per_class[15].iou.unwrap(), 3.0 / 4.0, "person IoU");
    assert_eq!(m.per_class[7].iou, None, "car is only predicted");
    assert_eq!(m.per_class[7].pred_pixels, 1);
    close(m.miou, (0.6 + 0.75) / 2.0, "mIoU over the 2 GT classes");
    assert_eq!(m.classes_in_gt, 2);

    let text = report.to_json().unwrap();
    assert!(text.contains("\"per_class_iou\":{\"background\":0.6"), "background first: {text}");
    crate::json_schemas::assert_valid("eval", &text);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["per_class_iou"]["car"].is_null());
    assert!(v["per_class_iou"]["aeroplane"].is_null());
    assert_eq!(v["per_class_iou"].as_object().unwrap().len(), 21);
    close(json_f64(&v, "miou"), 0.675, "json mIoU");
    for key in ["pixel_accuracy", "mean_accuracy", "fw_iou", "ignored_fraction", "miou_kept"] {
        json_f64(&v, key);
    }
    assert_eq!(v["images"], 1);
}

// ------------------------------------------------------------------------------------------
// Labels from CAMs
// ------------------------------------------------------------------------------------------

#[test]
fn labels_from_cams_by_hand() {
    // Two maps for keys 4 (label 5) and 14 (label 15) over 4 pixels.
    let cams = Array3::from_shape_vec((2, 1, 4), vec![0.9, 0.2, 0.5, 0.3, 0.1, 0.6, 0.5, 0.3]).unwrap();
    // alpha 1: bg = (0.1, 0.4, 0.5, 0.7); pixel 2 ties bg with map 0: bg (first) wins.
    assert_eq!(label_map_from_cams(&cams, &[4, 14], 1.0), vec![5, 15, 0, 0]);
    // alpha 2: bg = (0.01, 0.16, 0.25, 0.49); pixel 2 ties the two maps: the first wins.
    assert_eq!(label_map_from_cams(&cams, &[4, 14], 2.0), vec![5, 15, 5, 0]);
    // No labels: everything background.
    let none = Array3::<f32>::zeros((0, 2, 3));
    assert_eq!(label_map_from_cams(&none, &[], 1.0), vec![0; 6]);
    // A non-standard layout gives the same result.
    let t = Array3::from_shape_vec((4, 1, 2), cams.t().iter().copied().collect()).unwrap();
    let back = t.permuted_axes([2, 1, 0]); // 2 x 1 x 4 again, column-major in memory
    assert_eq!(back, cams);
    assert!(!back.is_standard_layout());
    assert_eq!(label_map_from_cams(&back, &[4, 14], 2.0), vec![5, 15, 5, 0]);
}

/// Synthetic archives with maps quantised to 1/16 (so that ties between channels and with the
/// background really happen) and GT derived from them with noise and some 255.
fn synthetic_cams(dir: &Path, n_images: usize) -> Vec<String> {
    let mut rng = rng(7);
    let (cams_dir, gt_dir) = (dir.join("cams"), dir.join("gt"));
    let mut ids = Vec::new();
    for i in 0..n_images {
        let (w, h) = (rng.random_range(20..50), rng.random_range(15..45));
        let k = rng.random_range(1..4);
        let mut keys: Vec<i64> = Vec::new();
        while keys.len() < k {
            let c = rng.random_range(0..20);
            if !keys.contains(&c) {
                keys.push(c);
            }
        }
        let quant = |rng: &mut StdRng| rng.random_range(0..17) as f32 / 16.0;
        let mut cams = Array3::<f32>::zeros((k, h, w));
        let mut raw = cams.clone();
        cams.iter_mut().for_each(|v| *v = quant(&mut rng));
        raw.iter_mut().for_each(|v| *v = quant(&mut rng));
        let mut gt = label_map_from_cams(&cams, &keys, 1.5);
        for g in gt.iter_mut() {
            match rng.random_range(0..10) {
                0 => *g = 255,
                1 => *g = keys[rng.random_range(0..k)] as u8 + 1,
                2 => *g = 0,
                _ => {}
            }
        }
        let id = format!("img{i:02}");
        write_png(&gt_dir, &id, &gt, w as u32, h as u32);
        CamArchive { keys, cams, raw_cams: raw }.write(&cams_dir.join(format!("{id}.npz"))).unwrap();
        ids.push(id);
    }
    ids
}

#[test]
fn alpha_sweep_matches_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let ids = synthetic_cams(dir.path(), 12);
    let ids_file = dir.path().join("ids.txt");
    write_ids(&ids_file, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    let dump = dir.path().join("dump");
    std::fs::create_dir_all(&dump).unwrap();
    for key in [CamKey::Cams, CamKey::RawCams] {
        let key_name = if key == CamKey::Cams { "cams" } else { "raw_cams" };
        let mut args = EvalOptions::new("", dir.path().join("gt"), "voc12");
        args.pred = vec![];
        args.cams = vec![dir.path().join("cams")];
        args.alpha = vec![1.0, 2.0, 3.0];
        args.cam_key = key;
        args.split = Some(ids_file.clone());
        if key == CamKey::Cams {
            args.report = Some(dir.path().join("report"));
        }
        let report = eval::evaluate(&args).unwrap();
        if key == CamKey::Cams {
            // The report shows the best alpha's labels.
            let html = std::fs::read_to_string(dir.path().join("report/index.html")).unwrap();
            let best = report.variants[report.best].alpha.unwrap();
            assert!(html.contains(&format!("at the best alpha = {best}")), "report names the alpha");
            assert!(ids.iter().all(|id| dir.path().join(format!("report/images/{id}.png")).is_file()));
        }
        let reference = numpy_reference(&[
            "cams",
            "--cams",
            dir.path().join("cams").to_str().unwrap(),
            "--gt",
            dir.path().join("gt").to_str().unwrap(),
            "--ids",
            ids_file.to_str().unwrap(),
            "--n",
            "21",
            "--alphas",
            "1,2,3",
            "--key",
            key_name,
            "--dump",
            dump.to_str().unwrap(),
        ]);
        let ours: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        assert_eq!(ours["best_alpha"].as_f64(), reference["best_alpha"].as_f64(), "best alpha ({key_name})");
        // The best alpha's scores at top level, as for label PNGs.
        let best = reference["alphas"].as_array().unwrap().iter().find(|a| a["alpha"] == reference["best_alpha"]);
        close(json_f64(&ours, "miou"), json_f64(best.unwrap(), "miou"), "top-level mIoU = the best alpha's");
        crate::json_schemas::assert_valid("eval", &report.to_json().unwrap());
        for (i, (v, r)) in report.variants.iter().zip(reference["alphas"].as_array().unwrap()).enumerate() {
            // Same labels pixel for pixel.
            for id in &ids {
                let archive = CamArchive::read(&dir.path().join("cams").join(format!("{id}.npz"))).unwrap();
                let maps = if key == CamKey::Cams { &archive.cams } else { &archive.raw_cams };
                let alpha = v.alpha.unwrap();
                let ours = label_map_from_cams(maps, &archive.keys, alpha);
                let theirs: ndarray::Array2<u8> =
                    ndarray_npy::read_npy(dump.join(format!("{id}_a{alpha}.npy"))).unwrap();
                assert_eq!(ours, theirs.iter().copied().collect::<Vec<_>>(), "labels {id} alpha {alpha} ({key_name})");
            }
            let conf = r["confusion"].as_array().unwrap();
            for g in 0..21 {
                for p in 0..21 {
                    assert_eq!(v.confusion.count(g, p), conf[g][p].as_u64().unwrap(), "M[{g}][{p}] alpha #{i}");
                }
            }
            let a = &ours["alphas"][i];
            close(json_f64(a, "alpha"), json_f64(r, "alpha"), "alpha");
            for k in ["miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "ignored_fraction", "miou_kept"] {
                close(json_f64(a, k), json_f64(r, k), k);
            }
            let pc = r["per_class_iou"].as_array().unwrap();
            for (c, name) in report.class_names.iter().enumerate() {
                match pc[c].as_f64() {
                    Some(want) => close(a["per_class_iou"][name].as_f64().unwrap(), want, name),
                    None => assert!(a["per_class_iou"][name].is_null(), "{name} should be null"),
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Real VOC ground truth
// ------------------------------------------------------------------------------------------

/// ../shared/data/voc-sample with its SegmentationClass ground truth, when present.
fn voc_ground_truth() -> Option<PathBuf> {
    let dir = voc_sample().filter(|d| d.join("SegmentationClass").is_dir());
    if dir.is_none() {
        eprintln!("note: ../shared/data/voc-sample/SegmentationClass absent, test skipped");
    }
    dir
}

#[test]
fn voc_sample_against_itself_is_perfect() {
    let Some(voc_dir) = voc_ground_truth() else { return };
    let gt = voc_dir.join("SegmentationClass");
    let mut args = EvalOptions::new(&gt, &gt, "voc12");
    args.split = Some(voc_dir.join("ids.txt"));
    let report = eval::evaluate(&args).unwrap();
    assert_eq!(report.images, 40);
    let m = report.best_metrics();
    assert_eq!(m.miou, 1.0);
    assert_eq!(m.pixel_accuracy, 1.0);
    assert_eq!(m.fw_iou, 1.0);
    assert!(m.classes_in_gt > 10, "the sample covers many classes");
    assert!(!eval::run(&args, false).unwrap().is_empty());
}

#[test]
fn voc_sample_shifted_matches_numpy() {
    let Some(voc_dir) = voc_ground_truth() else { return };
    let gt = voc_dir.join("SegmentationClass");
    let dir = tempfile::tempdir().unwrap();
    let pred = dir.path().join("pred");
    let ids: Vec<String> = std::fs::read_to_string(voc_dir.join("ids.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    let (dx, dy) = (9usize, 6usize);
    for id in &ids {
        let (labels, w, h) = clipmask::outputs::read_label_png(&gt.join(format!("{id}.png"))).unwrap();
        let (wu, hu) = (w as usize, h as usize);
        let mut shifted = vec![0u8; labels.len()];
        for y in dy..hu {
            for x in dx..wu {
                shifted[y * wu + x] = labels[(y - dy) * wu + (x - dx)];
            }
        }
        // Some predicted 255 too, so that the ignored column is exercised on real data.
        for v in shifted.iter_mut().take(wu * 3) {
            *v = 255;
        }
        write_png(&pred, id, &shifted, w, h);
    }
    let mut args = EvalOptions::new(&pred, &gt, "voc12");
    args.split = Some(voc_dir.join("ids.txt"));
    let report = eval::evaluate(&args).unwrap();
    let reference = numpy_reference(&[
        "labels",
        "--pred",
        pred.to_str().unwrap(),
        "--gt",
        gt.to_str().unwrap(),
        "--ids",
        voc_dir.join("ids.txt").to_str().unwrap(),
        "--n",
        "21",
    ]);
    let ours: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    let cm = &report.variants[0].confusion;
    let conf = reference["confusion"].as_array().unwrap();
    let ign = reference["ignored"].as_array().unwrap();
    for g in 0..21 {
        for p in 0..21 {
            assert_eq!(cm.count(g, p), conf[g][p].as_u64().unwrap(), "M[{g}][{p}]");
        }
        assert_eq!(cm.ignored(g), ign[g].as_u64().unwrap(), "ignored[{g}]");
    }
    for k in ["miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "ignored_fraction", "miou_kept"] {
        close(json_f64(&ours, k), json_f64(&reference, k), k);
    }
    let miou = json_f64(&ours, "miou");
    assert!(miou > 0.5 && miou < 1.0, "a shift by a few pixels costs some IoU: {miou}");
    assert!(json_f64(&ours, "ignored_fraction") > 0.0);
}

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

fn err_text(args: &EvalOptions) -> String {
    format!("{:#}", eval::run(args, false).expect_err("should fail"))
}

#[test]
fn missing_and_extra_ids_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    let ids: Vec<String> = (0..8).map(|i| format!("im{i}")).collect();
    for id in &ids {
        write_png(&gt, id, &[0, 1, 1, 0], 2, 2);
    }
    write_png(&pred, "im0", &[0, 1, 1, 0], 2, 2);
    // Ground truth a superset of the predictions (VOC's SegmentationClass against train): the
    // predicted id is scored, the 7 others are left out and counted, not skipped.
    let args = EvalOptions::new(&pred, &gt, "voc12");
    let report = eval::evaluate(&args).unwrap();
    assert_eq!((report.images, report.skipped.len(), report.gt_left_out), (1, 0, 7));
    assert_eq!(report.best_metrics().miou, 1.0);
    let v: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!((v["skipped"].as_u64(), v["gt_left_out"].as_u64()), (Some(0), Some(7)));
    crate::json_schemas::assert_valid("eval", &report.to_json().unwrap());

    // Strict: every ground-truth id needs a prediction.
    let mut strict = args.clone();
    strict.strict = true;
    let e = err_text(&strict);
    assert!(e.contains("7 of 8 ids have no prediction"), "{e}");
    assert!(e.contains("im1, im2, im3, im4, im5 and 2 more"), "{e}");
    assert!(e.contains("--allow-missing"), "{e}");

    let mut lenient = strict.clone();
    lenient.allow_missing = true;
    let report = eval::evaluate(&lenient).unwrap();
    assert_eq!(report.images, 1);
    assert_eq!((report.skipped.len(), report.gt_left_out), (7, 0));
    assert_eq!(report.best_metrics().miou, 1.0);
    let v: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(v["skipped"], 7);

    // A prediction without ground truth (no split): the directories do not match.
    for id in &ids {
        write_png(&pred, id, &[0, 1, 1, 0], 2, 2);
    }
    write_png(&pred, "stray", &[0, 1, 1, 0], 2, 2);
    let e = err_text(&args);
    assert!(e.contains("1 predictions in") && e.contains("have no ground truth") && e.contains("stray"), "{e}");

    // With a split, ids of the split without ground truth are named; extra predictions are fine.
    let split = dir.path().join("split.txt");
    write_ids(&split, &["im0", "im1", "nogt"]);
    let mut with_split = args.clone();
    with_split.split = Some(split.clone());
    let e = err_text(&with_split);
    assert!(e.contains("1 of 3 ids in") && e.contains("no ground truth") && e.contains("nogt"), "{e}");
    with_split.allow_missing = true;
    let report = eval::evaluate(&with_split).unwrap();
    assert_eq!((report.images, report.skipped.clone()), (2, vec!["nogt".to_string()]));
}

#[test]
fn size_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    write_png(&gt, "a", &[0; 20], 4, 5);
    write_png(&pred, "a", &[0; 20], 5, 4);
    let e = err_text(&EvalOptions::new(&pred, &gt, "voc12"));
    assert!(e.contains("size mismatch"), "{e}");
    assert!(e.contains(&pred.join("a.png").display().to_string()) && e.contains("5x4"), "{e}");
    assert!(e.contains(&gt.join("a.png").display().to_string()) && e.contains("4x5"), "{e}");
}

#[test]
fn out_of_range_label_names_file_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    write_png(&gt, "a", &[0, 1, 255, 20], 2, 2);
    write_png(&pred, "a", &[0, 21, 1, 20], 2, 2);
    let e = err_text(&EvalOptions::new(&pred, &gt, "voc12"));
    assert!(e.contains(&pred.join("a.png").display().to_string()), "{e}");
    assert!(e.contains("predicted label value 21"), "{e}");

    write_png(&gt, "a", &[0, 99, 255, 20], 2, 2);
    write_png(&pred, "a", &[0, 1, 1, 20], 2, 2);
    let e = err_text(&EvalOptions::new(&pred, &gt, "voc12"));
    assert!(e.contains(&gt.join("a.png").display().to_string()), "{e}");
    assert!(e.contains("ground-truth label value 99"), "{e}");
}

#[test]
fn bad_cam_archives_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, cams) = (dir.path().join("gt"), dir.path().join("cams"));
    write_png(&gt, "a", &[0; 6], 3, 2);
    let maps = Array3::<f32>::zeros((1, 2, 3));
    let mut args = EvalOptions::new("", &gt, "voc12");
    args.pred = vec![];
    args.cams = vec![cams.clone()];
    CamArchive { keys: vec![20], cams: maps.clone(), raw_cams: maps.clone() }.write(&cams.join("a.npz")).unwrap();
    let e = err_text(&args);
    assert!(e.contains("a.npz") && e.contains("key 20 is not a class index"), "{e}");
    let wrong = Array3::<f32>::zeros((1, 3, 2));
    CamArchive { keys: vec![3], cams: wrong.clone(), raw_cams: wrong }.write(&cams.join("a.npz")).unwrap();
    let e = err_text(&args);
    assert!(e.contains("size mismatch") && e.contains("2x3") && e.contains("3x2"), "{e}");
    std::fs::write(cams.join("a.npz"), b"not a zip").unwrap();
    let e = err_text(&args);
    assert!(e.contains("a.npz"), "{e}");
}

#[test]
fn cli_arguments_parse() {
    use clap::Parser;
    use clipmask::cli::eval::EvalArgs;
    use clipmask::eval::CamKey;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EvalArgs,
    }
    let cli = Cli::try_parse_from([
        "eval",
        "--gt",
        "g",
        "--config",
        "voc12",
        "--cams",
        "c",
        "--alpha",
        "1,2,3.5",
        "--cam-key",
        "raw_cams",
    ])
    .unwrap();
    assert_eq!(cli.args.alpha, vec![1.0, 2.0, 3.5]);
    assert_eq!(cli.args.cam_key, CamKey::RawCams);
    assert!(cli.args.pred.is_empty());
    let cli = Cli::try_parse_from(["eval", "--gt", "g", "--config", "voc12", "--pred", "p"]).unwrap();
    assert_eq!(cli.args.alpha, vec![1.0, 2.0]);
    assert_eq!(cli.args.cam_key, CamKey::Cams);
    assert!(Cli::try_parse_from(["eval", "--gt", "g", "--config", "voc12"]).is_err(), "needs --pred or --cams");
    // Label PNG runs and CAM runs may be compared in one call.
    let cli = Cli::try_parse_from(["eval", "--gt", "g", "--pred", "p", "--pred", "q", "--cams", "c"]).unwrap();
    assert_eq!(cli.args.pred.len(), 2);
    assert_eq!(cli.args.config, "voc12", "the default config");
}

// ------------------------------------------------------------------------------------------
// Report
// ------------------------------------------------------------------------------------------

/// Three images of decreasing quality plus photos; returns (args, ids worst-first).
fn report_fixture(dir: &Path, photos: bool) -> (EvalOptions, Vec<&'static str>) {
    let (gt, pred, img) = (dir.join("gt"), dir.join("pred"), dir.join("img"));
    let (w, h) = (64u32, 48u32);
    let mut base = vec![0u8; (w * h) as usize];
    for y in 10..40 {
        for x in 12..50 {
            base[y * w as usize + x] = 15;
        }
    }
    for (id, shift) in [("good", 0usize), ("bad", 30), ("medium", 6)] {
        write_png(&gt, id, &base, w, h);
        let mut p = vec![0u8; base.len()];
        for y in 0..h as usize {
            for x in shift..w as usize {
                p[y * w as usize + x] = base[y * w as usize + x - shift];
            }
        }
        write_png(&pred, id, &p, w, h);
        if photos {
            let photo = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
            std::fs::create_dir_all(&img).unwrap();
            photo.save(img.join(format!("{id}.jpg"))).unwrap();
        }
    }
    let mut args = EvalOptions::new(&pred, &gt, "voc12");
    args.report = Some(dir.join("report"));
    if photos {
        args.images = Some(img);
    }
    (args, vec!["bad", "medium", "good"])
}

#[test]
fn report_lists_images_worst_first() {
    for photos in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (args, worst_first) = report_fixture(dir.path(), photos);
        assert!(!eval::run(&args, false).unwrap().is_empty());
        let report = dir.path().join("report");
        let html = std::fs::read_to_string(report.join("index.html")).unwrap();
        let pos: Vec<usize> = worst_first.iter().map(|id| html.find(&format!("thumbs/{id}.")).unwrap()).collect();
        assert!(pos.windows(2).all(|p| p[0] < p[1]), "not worst-first: {pos:?}");
        assert!(html.contains("person") && html.contains("background"), "per-class table");
        let ext = if photos { "jpg" } else { "png" };
        // photo | prediction | GT, or prediction | GT.
        let panels = if photos { 3 } else { 2 };
        for id in &worst_first {
            let rel = format!("images/{id}.{ext}");
            assert!(html.contains(&format!("\"{rel}\"")), "relative link {rel}");
            let img = image::open(report.join(&rel)).unwrap();
            // The panels side by side with 4-pixel gaps.
            assert_eq!((img.width(), img.height()), (panels * 64 + (panels - 1) * 4, 48));
            // One thumbnail per panel (64x48 is under the 160 px cap: kept as is).
            for k in 0..panels {
                let rel = format!("thumbs/{id}.{k}.{ext}");
                assert!(html.contains(&format!("\"{rel}\"")), "relative link {rel}");
                assert_eq!(image::image_dimensions(report.join(&rel)).unwrap(), (64, 48), "{rel}");
            }
            assert!(!report.join(format!("thumbs/{id}.{panels}.{ext}")).exists());
        }
        assert!(
            !html.contains("file://") && !html.contains(&dir.path().display().to_string()),
            "paths must be relative"
        );
    }
}

#[test]
fn report_renders_in_chromium() {
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        eprintln!("note: /usr/bin/chromium absent, render check skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (args, _) = report_fixture(dir.path(), true);
    eval::run(&args, false).unwrap();
    let index = dir.path().join("report/index.html");
    let artifacts = root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("eval_report.png");
    let _ = std::fs::remove_file(&shot);
    let profile = dir.path().join("chromium-profile");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1200,900")
        .arg(format!("file://{}", index.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Chromium can hang on a broken set-up: give it a minute, then fail rather than block.
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(shot.exists(), "no screenshot; chromium said:\n{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1200, 900));
    let non_white = img.pixels().filter(|p| p.0.iter().any(|&c| c < 200)).count();
    // Text, table borders and the thumbnails: far more than a blank page's zero.
    assert!(non_white > 2000, "screenshot looks blank: {non_white} non-white pixels");
    // The thumbnails are on screen: the fixture photos' blue channel is 90 everywhere, which no
    // palette swatch, text or border has.
    let photo = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            (80..=100).contains(&b) && r.max(g).max(b) - r.min(g).min(b) > 30
        })
        .count();
    assert!(photo > 1000, "no thumbnails rendered: {photo} photo pixels");
    eprintln!("screenshot: {}", shot.display());
}
