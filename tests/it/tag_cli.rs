//! End to end: `clipmask tag`, `generate --labels auto` (equal to `tag` followed by
//! `generate --labels`), and label quality in `clipmask eval --labels-pred` on hand-made cases
//! with known precision, recall, F1 and AP.
use crate::support::*;
use clipmask::eval::image_labels::{average_precision, label_metrics};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn dir_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir).into_iter().map(|p| (p.clone(), std::fs::read(dir.join(&p)).unwrap())).collect()
}

#[test]
fn generate_labels_auto_equals_tag_then_generate_labels() {
    let Some(voc) = voc_sample() else {
        eprintln!("SKIP: ../shared/data/voc-sample not present");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let ids = ["2011_000095", "2011_000098", "2011_000114"];
    for id in ids {
        std::fs::copy(voc.join("JPEGImages").join(format!("{id}.jpg")), images.join(format!("{id}.jpg"))).unwrap();
    }
    // A bad image is a failure of that image only.
    std::fs::write(images.join("broken.jpg"), b"\xff\xd8 not a jpeg").unwrap();
    let m = tiny_model();
    let common = |c: &mut std::process::Command| {
        c.args(["--device", "cpu", "--config", "voc12", "--model"]).arg(&m).arg("--images").arg(&images);
    };

    // tag, then generate --labels
    let a = tmp.path().join("a");
    let mut c = clipmask(&cache);
    c.arg("tag").arg("--out").arg(a.join("labels.json"));
    common(&mut c);
    let r = run(&mut c);
    assert_eq!(r.code, Some(1), "one image is broken\n{}", r.show());
    assert!(r.stderr.contains("4 images: 3 tagged"), "{}", r.show());
    let labels = read_json(&a.join("labels.json"));
    assert_eq!(labels.as_object().unwrap().keys().collect::<Vec<_>>(), ids.iter().collect::<Vec<_>>());
    let scores = read_json(&a.join("labels.scores.json"));
    assert_eq!(scores["method"], "tagclip");
    assert_eq!(scores["classes"].as_array().unwrap().len(), 20);
    for id in ids {
        assert_eq!(scores["scores"][id].as_array().unwrap().len(), 20);
        assert!(!labels[id].as_array().unwrap().is_empty());
    }
    let failures = std::fs::read_to_string(a.join("labels.failures.jsonl")).unwrap();
    assert_eq!(failures.lines().count(), 1);
    assert!(failures.contains("\"broken\""), "{failures}");
    let b = tmp.path().join("b");
    let mut c = clipmask(&cache);
    c.arg("generate").arg("--out").arg(&b).arg("--labels").arg(a.join("labels.json"));
    common(&mut c);
    let r = run(&mut c);
    assert_eq!(r.code, Some(0), "{}", r.show());

    // generate --labels auto
    let out = tmp.path().join("auto");
    let mut c = clipmask(&cache);
    c.arg("generate").arg("--out").arg(&out).args(["--labels", "auto"]);
    common(&mut c);
    let r = run(&mut c);
    assert_eq!(r.code, Some(1), "the broken image fails\n{}", r.show());
    assert_eq!(std::fs::read(out.join("labels.json")).unwrap(), std::fs::read(a.join("labels.json")).unwrap());
    assert_eq!(
        std::fs::read(out.join("labels.scores.json")).unwrap(),
        std::fs::read(a.join("labels.scores.json")).unwrap()
    );
    let masks_auto = dir_bytes(&out.join("masks"));
    let masks_two_step = dir_bytes(&b.join("masks"));
    assert_eq!(masks_auto.len(), 3);
    assert!(masks_auto == masks_two_step, "masks differ between --labels auto and tag + generate --labels");
    let failures = std::fs::read_to_string(out.join("failures.jsonl")).unwrap();
    assert_eq!(failures.lines().count(), 1, "{failures}");
    assert!(failures.contains("\"broken\"") && failures.contains("no labels predicted"), "{failures}");
    eprintln!("--labels auto: labels, scores and 3 masks byte-identical to tag + generate --labels; labels {labels}");

    // Label quality of the prediction against the sample's labels (meaningless numbers: random model).
    let split = tmp.path().join("ids.txt");
    std::fs::write(&split, ids.join("\n")).unwrap();
    let mut c = clipmask(&cache);
    c.args(["eval", "--config", "voc12", "--json", "--labels-pred"]).arg(out.join("labels.json"));
    c.arg("--labels-gt").arg(voc.join("labels.json")).arg("--split").arg(&split);
    let r = run(&mut c);
    assert_eq!(r.code, Some(0), "{}", r.show());
    crate::json_schemas::assert_valid("eval-labels", &r.stdout);
    let rep: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rep["images"], 3);
    assert!(rep["map"].is_number(), "the scores file next to the labels gives the mAP\n{}", r.stdout);
    eprintln!(
        "eval --labels-pred (random model): mean P {:.3} R {:.3} F1 {:.3}, mAP {:.3}",
        rep["mean_precision"], rep["mean_recall"], rep["mean_f1"], rep["map"]
    );
}

#[test]
fn tag_rejects_bad_flags_before_loading_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let r = run(clipmask(&cache).args(["tag", "--images", "/nonexistent", "--out", "x.json"]));
    assert!(assert_one_line_error(&r, 2).contains("not a directory"));
    let r =
        run(clipmask(&cache).args(["tag", "--images"]).arg(tmp.path()).args(["--out", "x.json", "--threshold", "1.5"]));
    assert!(assert_one_line_error(&r, 2).contains("--threshold"));
    let r = run(clipmask(&cache)
        .args(["generate", "--images"])
        .arg(tmp.path())
        .args(["--out", "o", "--labels", "auto", "--shard", "0/2"]));
    assert!(assert_one_line_error(&r, 2).contains("cannot be sharded"));
    let r = run(clipmask(&cache).args(["eval", "--config", "voc12", "--labels-pred", "x.json"]));
    assert!(assert_one_line_error(&r, 2).contains("ground truth"));
    // --gt stays required for mask evaluation.
    let r = run(clipmask(&cache).args(["eval", "--config", "voc12", "--pred"]).arg(tmp.path()));
    assert_eq!(r.code, Some(2), "{}", r.show());
    assert!(r.stderr.contains("--gt"), "{}", r.show());
}

/// Hand-made case: classes a, b, c, d (d nowhere), four images.
///   img0 gt {a}    pred {a}     scores [0.9, 0.1, 0.3, 0]
///   img1 gt {a,b}  pred {b}     scores [0.4, 0.8, 0.2, 0]
///   img2 gt {b}    pred {a,b}   scores [0.6, 0.7, 0.1, 0]
///   img3 gt {c}    pred {}      scores [0.2, 0.3, 0.5, 0]
/// a: tp 1 / predicted 2 / support 2 -> P 0.5, R 0.5, F1 0.5; b: P R F1 1; c: 0, 0, 0.
/// Means over a, b, c: 0.5. Overall: tp 3, predicted 4, support 5 -> P 0.75, R 0.6, F1 2/3.
/// AP a: ranks img0 (+), img2, img1 (+) -> (1 + 2/3) / 2; AP b = AP c = 1; mAP 17/18.
const NAMES: [&str; 4] = ["cat", "dog", "person", "sheep"];
const GT: [&[usize]; 4] = [&[0], &[0, 1], &[1], &[2]];
const PRED: [&[usize]; 4] = [&[0], &[1], &[0, 1], &[]];
const SCORES: [[f32; 4]; 4] = [[0.9, 0.1, 0.3, 0.0], [0.4, 0.8, 0.2, 0.0], [0.6, 0.7, 0.1, 0.0], [0.2, 0.3, 0.5, 0.0]];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn check_hand_made(rep: &serde_json::Value, names: &[&str]) {
    let cls = |n: &str| rep["classes"].as_array().unwrap().iter().find(|c| c["name"] == n).unwrap().clone();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let (a, b, c, d) = (cls(names[0]), cls(names[1]), cls(names[2]), cls(names[3]));
    assert_eq!((a["support"].as_u64(), a["predicted"].as_u64(), a["tp"].as_u64()), (Some(2), Some(2), Some(1)));
    assert!(close(f(&a["precision"]), 0.5) && close(f(&a["recall"]), 0.5) && close(f(&a["f1"]), 0.5));
    assert!(close(f(&b["precision"]), 1.0) && close(f(&b["recall"]), 1.0) && close(f(&b["f1"]), 1.0));
    assert!(close(f(&c["precision"]), 0.0) && close(f(&c["recall"]), 0.0) && close(f(&c["f1"]), 0.0));
    assert!(close(f(&a["ap"]), 5.0 / 6.0) && close(f(&b["ap"]), 1.0) && close(f(&c["ap"]), 1.0));
    assert!(d["ap"].is_null() && d["support"] == 0);
    assert_eq!(rep["mean_over"], 3);
    assert!(
        close(f(&rep["mean_precision"]), 0.5) && close(f(&rep["mean_recall"]), 0.5) && close(f(&rep["mean_f1"]), 0.5)
    );
    assert!(close(f(&rep["overall_precision"]), 0.75) && close(f(&rep["overall_recall"]), 0.6));
    assert!(close(f(&rep["overall_f1"]), 2.0 / 3.0));
    assert!(close(f(&rep["map"]), 17.0 / 18.0));
}

#[test]
fn label_metrics_on_a_hand_made_case() {
    let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let set = |v: &[usize]| v.iter().copied().collect::<BTreeSet<usize>>();
    let gt: Vec<_> = GT.iter().map(|g| set(g)).collect();
    let pred: Vec<_> = PRED.iter().map(|p| set(p)).collect();
    let scores: Vec<Vec<f32>> = SCORES.iter().map(|s| s.to_vec()).collect();
    let rep = label_metrics(&names, &pred, &gt, Some(&scores));
    check_hand_made(&serde_json::to_value(&rep).unwrap(), &["a", "b", "c", "d"]);
    // AP by hand on two more rankings: a negative first halves the first positive's precision.
    assert_eq!(average_precision(&[0.9, 0.8, 0.1], &[false, true, true]), Some((0.5 + 2.0 / 3.0) / 2.0));
    assert_eq!(average_precision(&[0.1, 0.2], &[false, false]), None);
    // Without scores there is no AP.
    assert!(label_metrics(&names, &pred, &gt, None).map.is_none());
}

/// The same case through `clipmask eval --labels-pred`, with ground truth from a labels file, VOC
/// XML annotations and masks (classes present other than 0 and 255): the same report each time.
#[test]
fn eval_labels_pred_reads_every_ground_truth_source() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = clipmask::config::DatasetConfig::resolve("voc12").unwrap();
    let ids: Vec<String> = (0..4).map(|i| format!("img{i}")).collect();
    let names_of = |v: &[usize]| v.iter().map(|&k| NAMES[k].to_string()).collect::<Vec<_>>();
    let pred: BTreeMap<&String, Vec<String>> = ids.iter().zip(PRED).map(|(id, p)| (id, names_of(p))).collect();
    let gt: BTreeMap<&String, Vec<String>> = ids.iter().zip(GT).map(|(id, g)| (id, names_of(g))).collect();
    std::fs::write(d.join("pred.json"), serde_json::to_string(&pred).unwrap()).unwrap();
    std::fs::write(d.join("gt.json"), serde_json::to_string(&gt).unwrap()).unwrap();
    let mut rows = BTreeMap::new();
    for (id, s) in ids.iter().zip(SCORES) {
        let mut row = vec![0f32; 20];
        for (k, name) in NAMES.iter().enumerate() {
            row[cfg.class_index(name).unwrap()] = s[k];
        }
        rows.insert(id.clone(), row);
    }
    let scores =
        serde_json::json!({"method": "tagclip", "classes": cfg.class_names(), "threshold": 0.5, "scores": rows});
    std::fs::write(d.join("pred.scores.json"), scores.to_string()).unwrap();
    let (ann, masks) = (d.join("Annotations"), d.join("SegmentationClass"));
    std::fs::create_dir_all(&ann).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    for (id, g) in ids.iter().zip(GT) {
        let objects: String = g.iter().map(|&k| format!("<object><name>{}</name></object>", NAMES[k])).collect();
        std::fs::write(ann.join(format!("{id}.xml")), format!("<annotation>{objects}</annotation>")).unwrap();
        // 4 x 4 mask: background, a 255 border pixel, and each class's id somewhere.
        let mut px = vec![0u8; 16];
        px[15] = 255;
        for (j, &k) in g.iter().enumerate() {
            px[j] = (cfg.class_index(NAMES[k]).unwrap() + 1) as u8;
        }
        clipmask::outputs::write_label_png(&masks.join(format!("{id}.png")), &px, 4, 4, Some(&cfg.png_palette()))
            .unwrap();
    }
    let cache = d.join("cache");
    for source in [
        vec!["--labels-gt".to_string(), d.join("gt.json").display().to_string()],
        vec!["--annotations".into(), ann.display().to_string()],
        vec!["--gt".into(), masks.display().to_string()],
    ] {
        let r = run(clipmask(&cache)
            .args(["eval", "--config", "voc12", "--json", "--labels-pred"])
            .arg(d.join("pred.json"))
            .args(&source));
        assert_eq!(r.code, Some(0), "{source:?}\n{}", r.show());
        crate::json_schemas::assert_valid("eval-labels", &r.stdout);
        let rep: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(rep["images"], 4);
        check_hand_made(&rep, &NAMES);
    }
    // The table names every class and the means.
    let r = run(clipmask(&cache)
        .args(["eval", "--config", "voc12", "--labels-pred"])
        .arg(d.join("pred.json"))
        .arg("--labels-gt")
        .arg(d.join("gt.json")));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(
        r.stdout.contains("mean (3)") && r.stdout.contains("overall (micro)") && r.stdout.contains("tvmonitor"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("94.4"), "mAP 17/18 in the table\n{}", r.stdout);
    // An id of the ground truth without prediction is an error, or skipped with --allow-missing.
    let mut gt2 = gt.clone();
    let extra = "img9".to_string();
    gt2.insert(&extra, vec!["cat".into()]);
    std::fs::write(d.join("gt2.json"), serde_json::to_string(&gt2).unwrap()).unwrap();
    let r = run(clipmask(&cache)
        .args(["eval", "--config", "voc12", "--labels-pred"])
        .arg(d.join("pred.json"))
        .arg("--labels-gt")
        .arg(d.join("gt2.json")));
    assert!(assert_one_line_error(&r, 2).contains("img9"));
    let r = run(clipmask(&cache)
        .args(["eval", "--config", "voc12", "--json", "--allow-missing", "--labels-pred"])
        .arg(d.join("pred.json"))
        .arg("--labels-gt")
        .arg(d.join("gt2.json")));
    assert_eq!(r.code, Some(0), "{}", r.show());
    crate::json_schemas::assert_valid("eval-labels", &r.stdout);
    let rep: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((&rep["skipped"], &rep["skipped_ids"]), (&serde_json::json!(1), &serde_json::json!(["img9"])));
}
