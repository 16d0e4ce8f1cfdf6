//! `clipmask eval --pred A --pred B ...`: runs compared on hand-made masks whose IoUs are
//! worked out by hand.
use crate::support::*;
use std::path::Path;

fn write_mask(dir: &Path, id: &str, px: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    clipmask::outputs::write_label_png(&dir.join(format!("{id}.png")), px, 4, 4, None).unwrap();
}

/// Ground truth and three runs over two 4x4 images.
/// - `y_diff`: left half class 1 (aeroplane), right half background.
///   A is exact; B says class 1 everywhere; C is exact but marks 4 class-1 pixels 255.
/// - `x_same`: class 2 everywhere, predicted exactly by all three runs.
///
/// Over both images (32 pixels): A has IoU 1 for background, 1 and 2 (mIoU 1). B: background
/// TP 0 (IoU 0), class 1 TP 8 / (8 + 16 - 8) = 0.5, class 2 1 (mIoU 0.5). C: background 1,
/// class 1 TP 4 / (8 + 4 - 4) = 0.5, class 2 1 (mIoU 2.5 / 3), ignored 4 / 32.
fn fixture(dir: &Path) {
    let half: Vec<u8> = (0..16).map(|i| if i % 4 < 2 { 1 } else { 0 }).collect();
    let ones = vec![1u8; 16];
    let mut holes = half.clone();
    for i in [0, 4, 8, 12] {
        holes[i] = 255;
    }
    let twos = vec![2u8; 16];
    write_mask(&dir.join("gt"), "y_diff", &half);
    write_mask(&dir.join("gt"), "x_same", &twos);
    for (run, y) in [("A", &half), ("B", &ones), ("C", &holes)] {
        write_mask(&dir.join(run), "y_diff", y);
        write_mask(&dir.join(run), "x_same", &twos);
    }
}

fn eval(dir: &Path, extra: &[&str]) -> Run {
    let mut c = clipmask(&dir.join("cache"));
    c.arg("eval");
    for run in ["A", "B", "C"] {
        c.arg("--pred").arg(dir.join(run));
    }
    c.arg("--gt").arg(dir.join("gt")).args(extra);
    run(&mut c)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn runs_are_compared_with_their_differences_to_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    fixture(tmp.path());
    let r = eval(tmp.path(), &["--json"]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    crate::json_schemas::assert_valid("eval", &r.stdout);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert_eq!(v["images"], 2);
    // The first run's scores at top level too.
    assert_eq!((&v["miou"], &v["per_class_iou"]), (&runs[0]["miou"], &runs[0]["per_class_iou"]));
    let expect = [(1.0, 0.0, [1.0, 1.0, 1.0]), (0.5, 0.0, [0.0, 0.5, 1.0]), (2.5 / 3.0, 4.0 / 32.0, [1.0, 0.5, 1.0])];
    for (run, (miou, ignored, ious)) in runs.iter().zip(expect) {
        assert!(close(run["miou"].as_f64().unwrap(), miou), "{run}");
        assert!(close(run["delta_miou"].as_f64().unwrap(), miou - 1.0), "{run}");
        assert!(close(run["ignored_fraction"].as_f64().unwrap(), ignored), "{run}");
        let per = &run["per_class_iou"];
        for (name, iou) in ["background", "aeroplane", "bicycle"].iter().zip(ious) {
            assert!(close(per[name].as_f64().unwrap(), iou), "{name}: {run}");
        }
        // Classes absent from the ground truth have no IoU and no difference.
        assert!(per["bird"].is_null());
        let deltas = run["delta_per_class_iou"].as_array().unwrap();
        assert!(close(deltas[1].as_f64().unwrap(), ious[1] - 1.0));
        assert!(deltas[3].is_null());
    }
    assert!(runs[0]["source"].as_str().unwrap().ends_with('A'));

    // The table: one row per run with mIoU and its difference, per-class columns.
    let r = eval(tmp.path(), &[]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let row = |n: &str| r.stdout.lines().find(|l| l.trim_start().starts_with(n)).unwrap_or("").to_string();
    assert!(row("1 ").contains("100.00"), "{}", r.stdout);
    assert!(row("2 ").contains("50.00") && row("2 ").contains("-50.00"), "{}", r.stdout);
    assert!(row("3 ").contains("83.33") && row("3 ").contains("-16.67") && row("3 ").contains("12.50"), "{}", r.stdout);
    let aeroplane = row("aeroplane");
    assert!(aeroplane.contains("100.00") && aeroplane.contains("-50.00"), "{}", r.stdout);
}

#[test]
fn the_comparison_report_shows_the_images_where_runs_differ_most_first() {
    let tmp = tempfile::tempdir().unwrap();
    fixture(tmp.path());
    let report = tmp.path().join("report");
    let r = eval(tmp.path(), &["--report", report.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    // The first run is exact on both: on that tie y_diff (runs at 1, 0.25 and 0.75) comes
    // before x_same (all 1), though x_same sorts first by id.
    let (y, x) = (html.find("thumbs/y_diff.0.png").unwrap(), html.find("thumbs/x_same.0.png").unwrap());
    assert!(y < x, "y_diff should come first");
    assert!(html.contains("largest difference"));
    // Each row: the three runs and the ground truth side by side (4 panels of 4 px + 3 gaps).
    let img = image::open(report.join("images/y_diff.png")).unwrap();
    assert_eq!(img.width(), 4 * 4 + 3 * 4);
    // Differences to the first run, worked out by hand (see `fixture`): per image, y_diff's
    // mIoU is 1 (A), 0.25 (B: background 0, class 1 8/16) and 0.75 (C: background 1, class 1
    // 4/8); x_same is 1 everywhere.
    let row = |id: &str| {
        let start = html.find(&format!("<td class=\"l\">{id}</td>")).unwrap();
        html[start..].split("</tr>").next().unwrap().to_string()
    };
    let cells = |id: &str| row(id).split("<td").skip(2).take(5).map(|c| c.to_string()).collect::<Vec<_>>().join("<td");
    assert_eq!(
        cells("y_diff"),
        ">100.00</td><td>25.00</td><td class=\"neg\">-75.00</td><td>75.00</td><td class=\"neg\">-25.00</td>"
    );
    assert_eq!(cells("x_same"), ">100.00</td><td>100.00</td><td>+0.00</td><td>100.00</td><td>+0.00</td>");
    // The summary's mIoU difference (B 0.5 - 1, C 2.5/3 - 1) and the per-class columns
    // (aeroplane: A 1, B 0.5, C 0.5; background: A 1, B 0, C 1).
    assert!(html.contains(
        "<th class=\"l\">Δ mIoU vs #1</th><td>-</td><td class=\"neg\">-50.00</td><td class=\"neg\">-16.67</td>"
    ));
    assert!(html.contains(
        "aeroplane</td><td>100.00</td><td>50.00</td><td class=\"neg\">-50.00</td><td>50.00</td><td class=\"neg\">-50.00</td>"
    ));
    assert!(html.contains(
        "background</td><td>100.00</td><td>0.00</td><td class=\"neg\">-100.00</td><td>100.00</td><td>+0.00</td>"
    ));
    // Wide tables scroll in their own box; thumbnails wrap.
    assert!(html.contains(".scroll{overflow-x:auto") && html.contains("flex-wrap:wrap"));
}

fn write_cams(dir: &Path, id: &str, key: i64, map: &[f32]) {
    std::fs::create_dir_all(dir).unwrap();
    let cams = ndarray::Array3::from_shape_vec((1, 4, 4), map.to_vec()).unwrap();
    let archive = clipmask::outputs::CamArchive { keys: vec![key], raw_cams: cams.clone(), cams };
    archive.write(&dir.join(format!("{id}.npz"))).unwrap();
}

/// Label PNGs and saved maps compared in one call: maps that label exactly (1 where the class
/// is, 0 elsewhere: the background score 1 - max wins only where the map is 0) and maps that
/// claim the whole image; each CAM run at its best alpha.
#[test]
fn label_and_cam_runs_are_compared_together() {
    let tmp = tempfile::tempdir().unwrap();
    fixture(tmp.path());
    let d = tmp.path();
    let left: Vec<f32> = (0..16).map(|i| if i % 4 < 2 { 1.0 } else { 0.0 }).collect();
    for (run, y_map) in [("camsA", left.clone()), ("camsB", vec![1.0; 16])] {
        write_cams(&d.join(run), "y_diff", 0, &y_map);
        write_cams(&d.join(run), "x_same", 1, &[1.0; 16]);
    }
    let mut c = clipmask(&d.join("cache"));
    c.arg("eval").arg("--pred").arg(d.join("A")).arg("--cams").arg(d.join("camsA")).arg("--cams").arg(d.join("camsB"));
    c.arg("--gt").arg(d.join("gt")).args(["--alpha", "1,2", "--json"]);
    let r = run(&mut c);
    assert_eq!(r.code, Some(0), "{}", r.show());
    crate::json_schemas::assert_valid("eval", &r.stdout);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs[0]["best_alpha"].is_null() && runs[0]["cam_key"].is_null());
    assert!(close(runs[1]["miou"].as_f64().unwrap(), 1.0), "{v}");
    assert_eq!(runs[1]["best_alpha"].as_f64(), Some(1.0), "the first of equal alphas");
    assert_eq!(runs[1]["cam_key"], "cams");
    // camsB: background IoU 0, class 1 0.5, class 2 1.
    assert!(close(runs[2]["miou"].as_f64().unwrap(), 0.5), "{v}");
    assert!(close(runs[2]["delta_miou"].as_f64().unwrap(), -0.5), "{v}");
}
