//! `clipmask eval --report` at dataset scale: 1,000 synthetic images and three runs with
//! photos. The report stays within the size budget (50 MB for VOC train's 1,464 images, scaled
//! to 1,000), is paged, lists the images worst first by scores computed here independently,
//! and its index.json is valid and agrees with the pages.
use crate::support::*;
use std::collections::BTreeMap;
use std::path::Path;

const W: u32 = 64;
const H: u32 = 48;

/// Background plus one rectangle of `class`.
fn rect(w: u32, h: u32, class: u8, (x0, y0, x1, y1): (i64, i64, i64, i64)) -> Vec<u8> {
    let mut m = vec![0u8; (w * h) as usize];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if (x0..x1).contains(&x) && (y0..y1).contains(&y) {
                m[(y * w as i64 + x) as usize] = class;
            }
        }
    }
    m
}

/// The image's mIoU as the method defines it (docs/method.md §8), counted here: per class
/// present in the ground truth (255 skipped), TP / (TP + FP + FN), averaged.
fn image_miou(gt: &[u8], pred: &[u8]) -> f64 {
    let mut ious = Vec::new();
    for c in 0..=254u8 {
        if !gt.contains(&c) {
            continue;
        }
        let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
        for (&g, &p) in gt.iter().zip(pred) {
            if g == 255 {
                continue;
            }
            match (g == c, p == c) {
                (true, true) => tp += 1,
                (false, true) => fp += 1,
                (true, false) => fn_ += 1,
                _ => {}
            }
        }
        ious.push(tp as f64 / (tp + fp + fn_) as f64);
    }
    ious.iter().sum::<f64>() / ious.len() as f64
}

fn save(dir: &Path, id: &str, m: &[u8], w: u32, h: u32) {
    clipmask::outputs::write_label_png(&dir.join(format!("{id}.png")), m, w, h, None).unwrap();
}

/// Rows of the report's pages in order: (rank, id).
fn page_rows(html: &str) -> Vec<(usize, String)> {
    html.split("<tr><td>")
        .skip(1)
        .filter_map(|r| {
            let (rank, rest) = r.split_once("</td><td class=\"l\">")?;
            let (id, _) = rest.split_once("</td>")?;
            Some((rank.parse().ok()?, id.to_string()))
        })
        .collect()
}

fn dir_size(dir: &Path) -> u64 {
    files_under(dir).iter().map(|p| std::fs::metadata(dir.join(p)).unwrap().len()).sum()
}

#[test]
fn a_report_for_a_thousand_images_is_paged_worst_first_and_small() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let runs = ["A", "B", "C"];
    for sub in ["gt", "photos", "A", "B", "C"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let mut r = rng(25);
    // Per id and run, the image mIoU counted here.
    let mut expected: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in 0..999 {
        let id = format!("img{i:04}");
        let class = r.random_range(1..=20u8);
        let (x0, y0) = (r.random_range(0..32i64), r.random_range(0..24i64));
        let b = (x0, y0, x0 + r.random_range(4..32i64), y0 + r.random_range(4..24i64));
        let gt = rect(W, H, class, b);
        save(&d.join("gt"), &id, &gt, W, H);
        let mut scores = Vec::new();
        for run in runs {
            // The rectangle shifted, sometimes with the wrong class: the background always
            // overlaps (the rectangle covers at most a quarter), so every score is above 0.
            let (dx, dy) = (r.random_range(-12..=12i64), r.random_range(-9..=9i64));
            let c = if r.random_range(0..5) == 0 { class % 20 + 1 } else { class };
            let pred = rect(W, H, c, (b.0 + dx, b.1 + dy, b.2 + dx, b.3 + dy));
            save(&d.join(run), &id, &pred, W, H);
            scores.push(image_miou(&gt, &pred));
        }
        expected.insert(id.clone(), scores);
        if i % 10 != 9 {
            // Most ids have a photo; the others show a grey canvas.
            synthetic_image(W, H, i).save(d.join(format!("photos/{id}.png"))).unwrap();
        }
    }
    // A larger image that run A gets entirely wrong (score 0, so first): its pictures are
    // scaled down to the caps (640 px full size, 160 px thumbnails).
    let (bw, bh) = (700, 500);
    let gt = rect(bw, bh, 5, (100, 100, 400, 300));
    save(&d.join("gt"), "big", &gt, bw, bh);
    save(&d.join("A"), "big", &vec![9u8; (bw * bh) as usize], bw, bh);
    save(&d.join("B"), "big", &gt, bw, bh);
    save(&d.join("C"), "big", &gt, bw, bh);
    synthetic_image(bw, bh, 7).save(d.join("photos/big.png")).unwrap();
    expected.insert("big".into(), vec![0.0, 1.0, 1.0]);

    let report = d.join("report");
    let mut c = clipmask(&d.join("cache"));
    c.arg("eval");
    for run in runs {
        c.arg("--pred").arg(d.join(run));
    }
    c.arg("--gt").arg(d.join("gt")).arg("--images").arg(d.join("photos")).arg("--report").arg(&report);
    let out = run(&mut c);
    assert_eq!(out.code, Some(0), "{}", out.show());

    // Size: under the budget of 50 MB for 1,464 images, scaled to 1,000.
    let size = dir_size(&report);
    let budget = 50_000_000 * 1000 / 1464;
    assert!(size < budget, "report is {size} bytes, budget {budget}");

    // Pages: 100 rows each, index.html first, nothing past page 10.
    let mut rows = Vec::new();
    for page in 1..=10 {
        let name = if page == 1 { "index.html".to_string() } else { format!("page-{page}.html") };
        let html = std::fs::read_to_string(report.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let on_page = page_rows(&html);
        assert_eq!(on_page.len(), 100, "{name}");
        for p in 1..=10 {
            // Every page links every other one.
            let other = if p == 1 { "index.html".to_string() } else { format!("page-{p}.html") };
            assert_eq!(html.contains(&format!("href=\"{other}\"")), p != page, "{name} -> {other}");
        }
        rows.extend(on_page);
    }
    assert!(!report.join("page-11.html").exists());
    assert!(rows.iter().enumerate().all(|(k, (rank, _))| *rank == k + 1), "ranks 1..1000 in order");

    // Worst first: the first run's scores ascending; equal scores with the largest spread
    // between the runs first.
    let ids: Vec<&String> = rows.iter().map(|(_, id)| id).collect();
    let mut sorted: Vec<&String> = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 1000, "every image exactly once");
    assert_eq!(ids[0], "big");
    let spread = |v: &[f64]| v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min);
    for pair in ids.windows(2) {
        let (a, b) = (&expected[pair[0]], &expected[pair[1]]);
        assert!(a[0] <= b[0] + 1e-12, "{} ({}) before {} ({})", pair[0], a[0], pair[1], b[0]);
        if (a[0] - b[0]).abs() < 1e-12 {
            assert!(spread(a) >= spread(b) - 1e-12, "tie {} / {}: spread order", pair[0], pair[1]);
        }
    }

    // index.json: valid, the pages' order, every score as counted here, pictures for the
    // first 100 only.
    let text = std::fs::read_to_string(report.join("index.json")).unwrap();
    crate::json_schemas::assert_valid("eval-report-index", &text);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((v["pages"].as_u64(), v["page_size"].as_u64()), (Some(10), Some(100)));
    assert_eq!(v["runs"].as_array().unwrap().len(), 3);
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 1000);
    for (k, e) in images.iter().enumerate() {
        let id = e["id"].as_str().unwrap();
        assert_eq!(id, ids[k]);
        assert_eq!((e["rank"].as_u64(), e["page"].as_u64()), (Some(k as u64 + 1), Some(k as u64 / 100 + 1)));
        for (run, want) in expected[id].iter().enumerate() {
            let got = e["miou"][run].as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{id} run {run}: {got} vs {want}");
            let delta = e["delta_miou"][run].as_f64().unwrap();
            assert!((delta - (want - expected[id][0])).abs() < 1e-9, "{id} run {run}: delta {delta}");
        }
        assert_eq!(e["pictures"].as_bool(), Some(k < 100), "{id}");
    }

    // Pictures: the first 100 images only, five thumbnails each (photo, three runs, ground
    // truth), every one within the caps.
    let listed = |sub: &str| files_under(&report.join(sub));
    assert_eq!(listed("images").len(), 100);
    assert_eq!(listed("thumbs").len(), 500);
    for p in listed("thumbs") {
        let (w, h) = image::image_dimensions(report.join("thumbs").join(&p)).unwrap();
        assert!(w.max(h) <= 160, "{}: {w}x{h}", p.display());
    }
    for k in 0..5 {
        assert_eq!(image::image_dimensions(report.join(format!("thumbs/big.{k}.jpg"))).unwrap(), (160, 114));
    }
    // Five 640x457 panels with 4-pixel gaps.
    assert_eq!(image::image_dimensions(report.join("images/big.jpg")).unwrap(), (5 * 640 + 4 * 4, 457));
    assert!(!report.join(format!("images/{}.jpg", ids[100])).exists());

    // A smaller --report-images: fewer pictures in a rewritten report, the pages the same.
    let mut c = clipmask(&d.join("cache"));
    c.arg("eval");
    for run in runs {
        c.arg("--pred").arg(d.join(run));
    }
    let report2 = d.join("report2");
    c.arg("--gt").arg(d.join("gt")).arg("--images").arg(d.join("photos")).arg("--report").arg(&report2);
    let out = run(c.args(["--report-images", "3"]));
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(files_under(&report2.join("images")).len(), 3);
    assert!(report2.join("page-10.html").exists());
}
