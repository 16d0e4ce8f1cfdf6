//! One JSON Schema per output, versioned (`"schema": 1`): docs/schemas/*.schema.json (draft
//! 2020-12), checked with Python's `jsonschema` (tests/python/validate_json.py). Every JSON
//! output the commands can print is produced here and validated against its schema, with its
//! numbers checked against hand-made cases: `eval --json` in each mode (label PNGs, saved maps,
//! several runs, skipped and left-out ids, nothing to average), `eval --labels-pred --json`,
//! `classify --json`, `prompts rank --json`, `generate --summary-json` and `eval --report`'s
//! index.json. The other tests that read a JSON output validate it too, through
//! [`assert_valid`]. The schemas also reject the old shapes, so they are not vacuous.
use crate::support::*;
use std::path::Path;

/// One document (or JSON Lines text) to check against `docs/schemas/<schema>.schema.json`.
struct Case<'a> {
    name: String,
    schema: &'a str,
    text: String,
    valid: bool,
}

fn check(cases: &[Case]) {
    let manifest: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "schema": root().join(format!("docs/schemas/{}.schema.json", c.schema)),
                "text": c.text,
                // classify prints one object per line.
                "lines": c.schema == "classify",
                "valid": c.valid,
            })
        })
        .collect();
    let mut child = python_cmd()
        .arg(root().join("tests/python/validate_json.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", python()));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(serde_json::Value::Array(manifest).to_string().as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "JSON schema check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics unless `text` (a command's JSON output) is valid against
/// `docs/schemas/<schema>.schema.json` (`classify`: every line).
pub fn assert_valid(schema: &str, text: &str) {
    check(&[Case { name: schema.to_string(), schema, text: text.to_string(), valid: true }]);
}

fn close(a: &serde_json::Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-9)
}

fn write_mask(dir: &Path, id: &str, px: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    clipmask::outputs::write_label_png(&dir.join(format!("{id}.png")), px, 4, 4, None).unwrap();
}

fn write_cams(dir: &Path, id: &str, key: i64, map: &[f32]) {
    std::fs::create_dir_all(dir).unwrap();
    let cams = ndarray::Array3::from_shape_vec((1, 4, 4), map.to_vec()).unwrap();
    let archive = clipmask::outputs::CamArchive { keys: vec![key], raw_cams: cams.clone(), cams };
    archive.write(&dir.join(format!("{id}.npz"))).unwrap();
}

/// Ground truth for three 4x4 images, and runs over two of them (`z_left` has no prediction in
/// any run, so it is left out):
/// - `y_diff`: left half class 1 (aeroplane), right half background; `x_same`: class 2.
/// - `A`: exact (mIoU 1). `C`: exact but 4 class-1 pixels 255 (background 1, class 1
///   4 / 8 = 0.5, class 2 1: mIoU 2.5 / 3, ignored 4 / 32). `P`: `y_diff` only (exact).
/// - `camsD`: 1 on the left of `y_diff`, 0.45 on its right, 1 on `x_same`. At alpha 1 the
///   background score 1 - 0.45 = 0.55 beats 0.45 (exact, mIoU 1); at alpha 2, 0.3025 does not
///   (class 1 on all of `y_diff`: background 0, class 1 8 / 16, class 2 1: mIoU 0.5).
fn fixture(d: &Path) {
    let half: Vec<u8> = (0..16).map(|i| if i % 4 < 2 { 1 } else { 0 }).collect();
    let mut holes = half.clone();
    for i in [0, 4, 8, 12] {
        holes[i] = 255;
    }
    let twos = vec![2u8; 16];
    write_mask(&d.join("gt"), "y_diff", &half);
    write_mask(&d.join("gt"), "x_same", &twos);
    write_mask(&d.join("gt"), "z_left", &twos);
    for (run, y) in [("A", &half), ("C", &holes)] {
        write_mask(&d.join(run), "y_diff", y);
        write_mask(&d.join(run), "x_same", &twos);
    }
    write_mask(&d.join("P"), "y_diff", &half);
    let map: Vec<f32> = (0..16).map(|i| if i % 4 < 2 { 1.0 } else { 0.45 }).collect();
    write_cams(&d.join("camsD"), "y_diff", 0, &map);
    write_cams(&d.join("camsD"), "x_same", 1, &[1.0; 16]);
    // Ground truth that is all 255: nothing to average.
    write_mask(&d.join("gt-void"), "v", &[255; 16]);
    write_mask(&d.join("pred-void"), "v", &[0; 16]);
}

fn eval_json(d: &Path, args: &[&str]) -> (serde_json::Value, Run) {
    let mut c = clipmask(&d.join("cache"));
    c.current_dir(d).arg("eval").args(args).arg("--json");
    let r = run(&mut c);
    assert_eq!(r.code, Some(0), "{args:?}\n{}", r.show());
    let v = serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e})\n{}", r.stdout));
    (v, r)
}

/// The metrics a run has at top level and in `runs`.
const METRICS: [&str; 8] = [
    "miou",
    "pixel_accuracy",
    "mean_accuracy",
    "fw_iou",
    "ignored_fraction",
    "miou_kept",
    "valid_pixels",
    "per_class_iou",
];

#[test]
fn eval_json_has_one_shape_in_every_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fixture(d);
    let mut cases = Vec::new();
    let mut add = |name: &str, r: &Run| {
        cases.push(Case { name: name.into(), schema: "eval", text: r.stdout.clone(), valid: true });
    };

    // One run of label PNGs: its metrics at top level, no `runs`, no `alphas`; the ground-truth
    // id nobody predicted is left out and counted.
    let (v, r) = eval_json(d, &["--pred", "A", "--gt", "gt"]);
    add("labels", &r);
    assert_eq!(v["schema"], 1);
    assert!(close(&v["miou"], 1.0), "{v}");
    assert!(v["runs"].is_null() && v["alphas"].is_null() && v["cam_key"].is_null() && v["best_alpha"].is_null());
    assert_eq!((v["images"].as_u64(), v["gt_left_out"].as_u64()), (Some(2), Some(1)), "{v}");
    assert!(r.stderr.contains("1 of the 3 ground-truth ids"), "{}", r.stderr);
    let names: Vec<&str> = v["class_names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert_eq!(names.len(), 21);
    let keys: Vec<&str> = v["per_class_iou"].as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted_names = names.clone();
    sorted_names.sort();
    let mut sorted_keys = keys.clone();
    sorted_keys.sort();
    assert_eq!(sorted_keys, sorted_names, "per_class_iou has one entry per class");
    let per_class: Vec<&str> = v["per_class"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(per_class, names, "per_class in class order");

    // One run of saved maps: the best alpha's metrics at top level, every alpha in `alphas`
    // (alpha 2 first here, so the best is not simply the first).
    let (v, r) = eval_json(d, &["--cams", "camsD", "--gt", "gt", "--alpha", "2,1"]);
    add("cams", &r);
    assert_eq!(v["cam_key"], "cams");
    assert_eq!(v["best_alpha"].as_f64(), Some(1.0), "{v}");
    assert!(close(&v["miou"], 1.0), "{v}");
    let alphas = v["alphas"].as_array().unwrap();
    assert_eq!(alphas.len(), 2);
    assert_eq!((alphas[0]["alpha"].as_f64(), alphas[1]["alpha"].as_f64()), (Some(2.0), Some(1.0)));
    assert!(close(&alphas[0]["miou"], 0.5) && close(&alphas[1]["miou"], 1.0), "{v}");
    assert!(close(&alphas[0]["per_class_iou"]["background"], 0.0), "{v}");
    for k in METRICS {
        assert_eq!(v[k], alphas[1][k], "top level = the best alpha's {k}");
    }
    let (v, r) = eval_json(d, &["--cams", "camsD", "--gt", "gt", "--alpha", "2", "--cam-key", "raw_cams"]);
    add("raw cams", &r);
    assert_eq!((v["cam_key"].as_str(), v["best_alpha"].as_f64()), (Some("raw_cams"), Some(2.0)));
    assert!(close(&v["miou"], 0.5), "{v}");

    // Several runs: the first's metrics at top level, every run in `runs` with its difference.
    let (v, r) = eval_json(d, &["--pred", "A", "--pred", "C", "--cams", "camsD", "--gt", "gt", "--alpha", "1,2"]);
    add("three runs", &r);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for k in METRICS.iter().chain(&["source", "cam_key", "best_alpha"]) {
        assert_eq!(v[k], runs[0][*k], "top level = the first run's {k}");
    }
    assert!(close(&runs[1]["miou"], 2.5 / 3.0) && close(&runs[1]["delta_miou"], 2.5 / 3.0 - 1.0), "{v}");
    assert!(close(&runs[1]["ignored_fraction"], 4.0 / 32.0), "{v}");
    assert!(runs[0]["alphas"].is_null() && runs[2]["alphas"].as_array().is_some_and(|a| a.len() == 2), "{v}");
    assert!(close(&runs[2]["miou"], 1.0) && close(&runs[2]["delta_miou"], 0.0), "{v}");

    // Skipped under --allow-missing: P has no x_same, so both runs are scored on y_diff only.
    let (v, r) = eval_json(d, &["--pred", "A", "--pred", "P", "--gt", "gt", "--allow-missing"]);
    add("skipped", &r);
    assert_eq!((v["images"].as_u64(), v["skipped"].as_u64()), (Some(1), Some(1)), "{v}");
    assert_eq!(v["skipped_ids"], serde_json::json!(["x_same"]));
    assert_eq!(v["gt_left_out"], 1, "z_left: in no run");

    // A split: nothing is left out.
    std::fs::write(d.join("split.txt"), "x_same\ny_diff\n").unwrap();
    let (v, r) = eval_json(d, &["--pred", "A", "--gt", "gt", "--split", "split.txt"]);
    add("split", &r);
    assert_eq!((v["images"].as_u64(), v["gt_left_out"].as_u64()), (Some(2), Some(0)), "{v}");

    // Ground truth all 255: the means are over nothing (null), and still match the schema.
    let (v, r) = eval_json(d, &["--pred", "pred-void", "--gt", "gt-void"]);
    add("void", &r);
    assert!(v["miou"].is_null() && v["per_class_iou"]["background"].is_null(), "{v}");
    assert_eq!(v["valid_pixels"], 0);

    check(&cases);
}

#[test]
fn eval_labels_json_matches_its_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // a: dog, right. b: cat and dog predicted, cat true. c: no prediction (skipped).
    // dog: support 1, predicted 2, tp 1 (P 0.5, R 1); cat: support 1, predicted 1, tp 1.
    std::fs::write(d.join("pred.json"), r#"{"a": ["dog"], "b": ["cat", "dog"]}"#).unwrap();
    std::fs::write(d.join("gt.json"), r#"{"a": ["dog"], "b": ["cat"], "c": ["cow"]}"#).unwrap();
    let r = run(clipmask(&d.join("cache")).current_dir(d).args([
        "eval",
        "--json",
        "--allow-missing",
        "--labels-pred",
        "pred.json",
        "--labels-gt",
        "gt.json",
    ]));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!((v["images"].as_u64(), v["skipped"].as_u64()), (Some(2), Some(1)), "{v}");
    assert_eq!(v["skipped_ids"], serde_json::json!(["c"]));
    let class = |n: &str| v["classes"].as_array().unwrap().iter().find(|c| c["name"] == n).unwrap().clone();
    let dog = class("dog");
    assert_eq!((dog["support"].as_u64(), dog["predicted"].as_u64(), dog["tp"].as_u64()), (Some(1), Some(2), Some(1)));
    assert!(close(&dog["precision"], 0.5) && close(&dog["recall"], 1.0), "{dog}");
    assert!(close(&class("cat")["precision"], 1.0));
    assert!(v["map"].is_null(), "no scores file: no mAP");
    assert_valid("eval-labels", &r.stdout);
}

#[test]
fn model_command_outputs_match_their_schemas() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model();
    let cache = shared_cache();
    let images = d.join("imgs");
    std::fs::create_dir_all(&images).unwrap();
    let mut labels = serde_json::Map::new();
    for (i, l) in [["dog", "person"], ["cat", "car"]].iter().enumerate() {
        synthetic_image(96, 80, 300 + i as u64).save(images.join(format!("im{i}.png"))).unwrap();
        labels.insert(format!("im{i}"), serde_json::json!(l));
    }
    let labels_path = d.join("labels.json");
    std::fs::write(&labels_path, serde_json::Value::Object(labels).to_string()).unwrap();
    let mut cases = Vec::new();

    // classify: one line per image, probabilities over the 20 classes summing to 1.
    let r = run(clipmask(&cache)
        .args(["classify", "--json", "--device", "cpu", "--model"])
        .arg(&model)
        .arg(images.join("im0.png"))
        .arg(images.join("im1.png")));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let lines: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["schema"], 1);
        let probs: Vec<f64> = l["probs"].as_object().unwrap().values().map(|p| p.as_f64().unwrap()).collect();
        assert_eq!(probs.len(), 20);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probs:?}");
    }
    cases.push(Case { name: "classify".into(), schema: "classify", text: r.stdout, valid: true });

    // prompts rank: every template once, best (lowest sharpness) first.
    let templates = d.join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\nart of the {}.\n").unwrap();
    let r = run(clipmask(&cache)
        .args(["prompts", "rank", "--json", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--images")
        .arg(&images)
        .arg("--labels")
        .arg(&labels_path)
        .arg("--templates")
        .arg(&templates));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let ranked = v["templates"].as_array().unwrap();
    let voc_templates = clipmask::config::DatasetConfig::resolve("voc12").unwrap().templates;
    let given = ["a photo of a {}.", "art of the {}."];
    let added = voc_templates.iter().filter(|t| !given.contains(&t.as_str())).count();
    assert_eq!(ranked.len(), given.len() + added, "the file's templates and the config's, once each: {v}");
    for w in ranked.windows(2) {
        assert!(w[0]["sharpness"].as_f64().unwrap() <= w[1]["sharpness"].as_f64().unwrap(), "{v}");
    }
    assert!(ranked.iter().all(|t| t["images"] == 2), "{v}");
    cases.push(Case { name: "prompts rank".into(), schema: "prompts-rank", text: r.stdout, valid: true });

    // generate --summary-json: counts of the run.
    let summary = d.join("summary.json");
    let r = run(generate_cmd(&cache, &images, &d.join("out"))
        .arg("--labels")
        .arg(&labels_path)
        .arg("--summary-json")
        .arg(&summary));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let text = std::fs::read_to_string(&summary).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((v["schema"].as_u64(), v["total"].as_u64(), v["done"].as_u64()), (Some(1), Some(2), Some(2)), "{v}");
    cases.push(Case { name: "generate summary".into(), schema: "generate-summary", text, valid: true });
    check(&cases);
}

/// `eval --report DIR` writes DIR/index.json: label and CAM runs compared on the fixture.
/// y_diff scores 1 (A), 0.75 (C: background 1, class 1 4/8) and 1 (camsD at alpha 1); x_same
/// 1 everywhere. A ties, so y_diff (spread 0.25) comes first. The schema rejects other shapes.
#[test]
fn eval_report_index_matches_its_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fixture(d);
    let mut c = clipmask(&d.join("cache"));
    c.current_dir(d).args(["eval", "--pred", "A", "--pred", "C", "--cams", "camsD", "--gt", "gt", "--report", "R"]);
    let r = run(&mut c);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let text = std::fs::read_to_string(d.join("R/index.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = v["images"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["y_diff", "x_same"]);
    let y = &v["images"][0];
    for (k, (miou, delta)) in [(1.0, 0.0), (0.75, -0.25), (1.0, 0.0)].into_iter().enumerate() {
        assert!(close(&y["miou"][k], miou) && close(&y["delta_miou"][k], delta), "{y}");
    }
    assert_eq!(
        (&y["rank"], &y["page"], &y["pictures"]),
        (&serde_json::json!(1), &serde_json::json!(1), &serde_json::json!(true))
    );
    assert_eq!(v["runs"][2]["cam_key"], "cams");
    assert!(close(&v["runs"][2]["best_alpha"], 1.0));
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = v.clone();
        edit(&mut v);
        v.to_string()
    };
    let mut cases =
        vec![Case { name: "report index".into(), schema: "eval-report-index", text: text.clone(), valid: true }];
    for (name, text) in [
        ("report index: no schema version", with(&|v| drop(v.as_object_mut().unwrap().remove("schema")))),
        ("report index: no page count", with(&|v| drop(v.as_object_mut().unwrap().remove("pages")))),
        ("report index: percent instead of a fraction", with(&|v| v["images"][0]["miou"][1] = serde_json::json!(75.0))),
        ("report index: page 0", with(&|v| v["images"][0]["page"] = serde_json::json!(0))),
        ("report index: an undocumented field", with(&|v| v["images"][0]["spread"] = serde_json::json!(0.25))),
    ] {
        cases.push(Case { name: name.into(), schema: "eval-report-index", text, valid: false });
    }
    check(&cases);
}

/// The schemas are not vacuous: the shapes before version 1, a missing version, percent where a
/// fraction belongs and an undocumented field are all rejected.
#[test]
fn schemas_reject_other_shapes() {
    let metrics = serde_json::json!({
        "miou": 0.5, "pixel_accuracy": 0.5, "mean_accuracy": 0.5, "fw_iou": 0.5, "ignored_fraction": 0.0,
        "miou_kept": 0.5, "valid_pixels": 16, "ignored_pixels": 0, "classes_in_gt": 2,
        "per_class_iou": {"background": 0.5, "aeroplane": 0.5},
        "per_class": [],
    });
    let mut good = metrics.clone();
    for (k, v) in serde_json::json!({
        "schema": 1, "source": "A", "cam_key": null, "best_alpha": null, "config": "voc12", "images": 1,
        "skipped": 0, "skipped_ids": [], "gt_left_out": 0, "class_names": ["background", "aeroplane"],
    })
    .as_object()
    .unwrap()
    {
        good[k] = v.clone();
    }
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        edit(&mut v);
        v.to_string()
    };
    let mut old_cams = serde_json::json!({"best_alpha": 1.0, "best_miou": 0.5, "cam_key": "cams", "config": "voc12",
        "images": 1, "skipped": 0, "skipped_ids": []});
    old_cams["alphas"] = serde_json::json!([metrics]);
    let rejected = [
        ("eval: the old --cams shape (no top-level miou)", old_cams.to_string()),
        ("eval: the old several-runs shape", serde_json::json!({"runs": [good.clone(), good.clone()]}).to_string()),
        ("eval: no schema version", with(&|v| drop(v.as_object_mut().unwrap().remove("schema")))),
        ("eval: version 2", with(&|v| v["schema"] = serde_json::json!(2))),
        ("eval: percent instead of a fraction", with(&|v| v["miou"] = serde_json::json!(70.8))),
        ("eval: an undocumented field", with(&|v| v["best_miou"] = serde_json::json!(0.5))),
        ("eval: saved maps without their alphas", with(&|v| v["cam_key"] = serde_json::json!("cams"))),
        ("eval: an empty list of runs", with(&|v| v["runs"] = serde_json::json!([]))),
    ];
    let mut cases: Vec<Case> = rejected
        .into_iter()
        .map(|(name, text)| Case { name: name.into(), schema: "eval", text, valid: false })
        .collect();
    cases.push(Case { name: "eval: the well-formed base".into(), schema: "eval", text: good.to_string(), valid: true });
    cases.push(Case {
        name: "classify: the old line without schema".into(),
        schema: "classify",
        text: r#"{"image": "a.jpg", "probs": {"dog": 1.0}}"#.into(),
        valid: false,
    });
    cases.push(Case {
        name: "prompts rank: the old bare list".into(),
        schema: "prompts-rank",
        text: r#"[{"template": "a {}.", "sharpness": 0.1, "images": 2}]"#.into(),
        valid: false,
    });
    cases.push(Case {
        name: "eval labels: the old list of skipped ids".into(),
        schema: "eval-labels",
        text: r#"{"schema": 1, "images": 1, "skipped": ["c"], "classes": [], "mean_over": 0, "mean_precision": 0,
            "mean_recall": 0, "mean_f1": 0, "overall_precision": 0, "overall_recall": 0, "overall_f1": 0, "map": null}"#
            .into(),
        valid: false,
    });
    check(&cases);
}
