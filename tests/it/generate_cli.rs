//! `clipmask generate` end to end on the tiny random-weight model: output formats,
//! label sources (JSON, text, VOC XML, COCO), bad input that must not stop a run, fatal errors,
//! resume / overwrite / sharding, and interruption (SIGKILL, SIGINT).
use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn idx(names: &[&str]) -> Vec<i64> {
    let cfg = voc();
    names.iter().map(|n| cfg.class_index(n).unwrap() as i64).collect()
}

struct Mask {
    values: Vec<u8>,
    width: u32,
    height: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    palette: Vec<u8>,
}

fn read_mask(p: &Path) -> Mask {
    let mut dec =
        png::Decoder::new(BufReader::new(std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut r = dec.read_info().unwrap();
    let (width, height, color, depth) = (r.info().width, r.info().height, r.info().color_type, r.info().bit_depth);
    let palette = r.info().palette.as_ref().map(|p| p.to_vec()).unwrap_or_default();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let f = r.next_frame(&mut buf).unwrap();
    buf.truncate(f.buffer_size());
    Mask { values: buf, width, height, color, depth, palette }
}

/// The summary line "N images: D done, S skipped (already complete), F failed ...".
fn summary(stderr: &str) -> (usize, usize, usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.contains(" images: ") && l.contains(" done, "))
        .unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|s| !s.is_empty() && !s.contains('.'))
        .map(|s| s.parse().unwrap())
        .collect();
    (nums[0], nums[1], nums[2], nums[3])
}

/// Final-named files (temporary names excluded) and their bytes.
fn outputs(out: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(out)
        .into_iter()
        .filter(|p| !is_temp_name(p))
        .map(|p| (p.clone(), std::fs::read(out.join(&p)).unwrap()))
        .collect()
}

fn ids_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| !is_temp_name(p))
                .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn failures(out: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(out.join("failures.jsonl")) else { return vec![] };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad failures.jsonl line {l:?}: {e}")))
        .collect()
}

fn npz_keys(p: &Path) -> Vec<i64> {
    clipmask::outputs::CamArchive::read(p).unwrap().keys
}

// ---------------------------------------------------------------------------------------------
// Output formats
// ---------------------------------------------------------------------------------------------

#[test]
fn masks_cams_and_overlays_have_the_documented_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let (imgs, out) = (tmp.path().join("imgs"), tmp.path().join("out"));
    std::fs::create_dir_all(&imgs).unwrap();
    let sizes = [("a", 96u32, 64u32), ("b", 70, 110), ("c", 128, 128)];
    for (i, (id, w, h)) in sizes.iter().enumerate() {
        save_png(&imgs, id, *w, *h, 100 + i as u64);
    }
    let labels: BTreeMap<&str, Vec<&str>> =
        [("a", vec!["dog"]), ("b", vec!["person", "cat"]), ("c", vec!["tvmonitor", "aeroplane", "bus"])]
            .into_iter()
            .collect();
    write_json(&tmp.path().join("labels.json"), &serde_json::json!(labels));
    let r = run(generate_cmd(tmp.path(), &imgs, &out).arg("--labels").arg(tmp.path().join("labels.json")).args([
        "--save-cams",
        "--overlays",
        "--mask-format",
        "palette",
    ]));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(summary(&r.stderr), (3, 3, 0, 0), "{}", r.show());
    assert!(!out.join("failures.jsonl").exists());

    let cfg = voc();
    let palette: Vec<u8> = cfg.palette.iter().flatten().copied().collect();
    assert_eq!(palette.len(), 21 * 3);
    let mut swatches = 0;
    for (id, w, h) in sizes {
        let keys = idx(&labels[id]);
        let m = read_mask(&out.join(format!("masks/{id}.png")));
        assert_eq!((m.color, m.depth), (png::ColorType::Indexed, png::BitDepth::Eight), "{id}");
        assert_eq!((m.width, m.height), (w, h), "{id}: mask has the image's size");
        assert!(m.palette.len() >= 63, "{id}: palette has {} bytes", m.palette.len());
        assert_eq!(&m.palette[..63], &palette[..], "{id}: palette is the config's");
        let allowed: BTreeSet<u8> = std::iter::once(0).chain(keys.iter().map(|&k| k as u8 + 1)).collect();
        let present: BTreeSet<u8> = m.values.iter().copied().collect();
        assert!(present.is_subset(&allowed), "{id}: values {present:?} outside {allowed:?}");
        // Independent recomputation from the saved maps (alpha 1).
        let cams = clipmask::outputs::CamArchive::read(&out.join(format!("cams/{id}.npz"))).unwrap();
        assert_eq!(cams.keys, keys, "{id}: keys in label order");
        assert_eq!(cams.cams.dim(), (keys.len(), h as usize, w as usize));
        assert_eq!(cams.raw_cams.dim(), (keys.len(), h as usize, w as usize));
        let relabel = clipmask::eval::label_map_from_cams(&cams.cams, &cams.keys, 1.0);
        assert!(relabel == m.values, "{id}: mask differs from label_map_from_cams(cams)");
        let ov = image::open(out.join(format!("overlays/{id}.jpg"))).unwrap().to_rgb8();
        assert_eq!((ov.width(), ov.height()), (w, h));
        // The legend: row i's swatch centre has the palette colour of the i-th class present
        // (within JPEG's error).
        let present = clipmask::outputs::classes_present(&m.values);
        swatches += present.len();
        let layout = clipmask::outputs::LegendLayout::new(present.len(), 12, w.max(h));
        for (i, &l) in present.iter().enumerate() {
            let (x, y, side) = layout.swatch(i);
            let got = ov.get_pixel(x + side / 2, y + side / 2).0;
            let want = &palette[l as usize * 3..l as usize * 3 + 3];
            assert!(got.iter().zip(want).all(|(g, w)| (*g as i32 - *w as i32).abs() <= 40), "{id}: class {l} {got:?}");
        }
    }

    assert!(swatches > 0, "no class in any mask: the legend was not checked");

    // numpy reads the archives as documented.
    let script = r#"
import sys, json, numpy as np
out = {}
for p in sys.argv[1:]:
    z = np.load(p)
    out[p] = {"files": sorted(z.files), "keys": z["keys"].tolist(), "class_names": z["class_names"].tolist(),
              "dtypes": {k: str(z[k].dtype) for k in z.files},
              "shapes": {k: list(z[k].shape) for k in z.files},
              "finite": bool(np.isfinite(z["cams"]).all() and np.isfinite(z["raw_cams"]).all())}
print(json.dumps(out))
"#;
    let paths: Vec<PathBuf> = sizes.iter().map(|(id, _, _)| out.join(format!("cams/{id}.npz"))).collect();
    let o = python_cmd().arg("-c").arg(script).args(&paths).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for ((id, w, h), p) in sizes.iter().zip(&paths) {
        let e = &v[p.to_str().unwrap()];
        let k = labels[id].len() as u64;
        assert_eq!(e["files"], serde_json::json!(["cams", "class_names", "keys", "raw_cams"]), "{id}");
        let longest = labels[id].iter().map(|n| n.chars().count()).max().unwrap();
        assert_eq!(
            e["dtypes"],
            serde_json::json!({"keys": "int64", "cams": "float32", "raw_cams": "float32", "class_names": format!("<U{longest}")}),
            "{id}"
        );
        assert_eq!(e["class_names"], serde_json::json!(labels[id]), "{id}: the label names, in label order");
        assert_eq!(e["shapes"]["cams"], serde_json::json!([k, h, w]), "{id}");
        assert_eq!(e["shapes"]["raw_cams"], serde_json::json!([k, h, w]), "{id}");
        assert_eq!(e["shapes"]["keys"], serde_json::json!([k]), "{id}");
        assert_eq!(e["keys"], serde_json::json!(idx(&labels[id])), "{id}");
        assert_eq!(e["finite"], serde_json::json!(true), "{id}");
    }
    assert!(files_under(&out).iter().all(|p| !is_temp_name(p)), "temp files left: {:?}", files_under(&out));
}

// ---------------------------------------------------------------------------------------------
// Label sources
// ---------------------------------------------------------------------------------------------

fn voc_xml(objects: &[&str]) -> String {
    let mut s = String::from("<annotation>\n  <folder>VOC2012</folder>\n  <filename>x.jpg</filename>\n  <size><width>64</width><height>48</height><depth>3</depth></size>\n");
    for o in objects {
        s += &format!("  <object>\n    <name>{o}</name>\n    <pose>Left</pose>\n    <part><name>head</name></part>\n    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>\n  </object>\n");
    }
    s + "</annotation>\n"
}

#[test]
fn labels_from_voc_xml_text_files_and_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let (imgs, ann) = (tmp.path().join("imgs"), tmp.path().join("ann"));
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::create_dir_all(&ann).unwrap();
    for (i, id) in ["2007_000001", "2007_000002", "2007_000003"].iter().enumerate() {
        save_png(&imgs, id, 64, 48, 200 + i as u64);
    }
    // A repeated object is one label; order of first occurrence is kept; <part><name> is not an object.
    std::fs::write(ann.join("2007_000001.xml"), voc_xml(&["person", "dog", "person", "dog"])).unwrap();
    std::fs::write(ann.join("2007_000002.xml"), voc_xml(&["cat"])).unwrap();
    std::fs::write(ann.join("2007_000003.xml"), voc_xml(&["bus", "car"])).unwrap();
    let out = tmp.path().join("out-xml");
    let r = run(generate_cmd(tmp.path(), &imgs, &out).arg("--annotations").arg(&ann).arg("--save-cams"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(summary(&r.stderr), (3, 3, 0, 0));
    assert_eq!(npz_keys(&out.join("cams/2007_000001.npz")), idx(&["person", "dog"]));
    assert_eq!(npz_keys(&out.join("cams/2007_000002.npz")), idx(&["cat"]));
    assert_eq!(npz_keys(&out.join("cams/2007_000003.npz")), idx(&["bus", "car"]));

    // Text format with comments, blank lines, CRLF and spaces after commas; a split restricts ids.
    let txt = tmp.path().join("labels.txt");
    std::fs::write(
        &txt,
        "# id<TAB>classes\n2007_000001\tcat, dog\r\n\n2007_000002\tbus\n2007_000003\tperson,sofa,person\n",
    )
    .unwrap();
    let split = tmp.path().join("train.txt");
    std::fs::write(&split, "2007_000003\n2007_000001\n2007_000003\n").unwrap();
    let out = tmp.path().join("out-txt");
    let r = run(generate_cmd(tmp.path(), &imgs, &out)
        .arg("--labels")
        .arg(&txt)
        .arg("--split")
        .arg(&split)
        .arg("--save-cams"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(summary(&r.stderr), (2, 2, 0, 0));
    assert_eq!(ids_in(&out.join("masks")), ["2007_000001", "2007_000003"].iter().map(|s| s.to_string()).collect());
    assert_eq!(npz_keys(&out.join("cams/2007_000001.npz")), idx(&["cat", "dog"]));
    assert_eq!(npz_keys(&out.join("cams/2007_000003.npz")), idx(&["person", "sofa"]));

    // A split id without labels is a per-image failure, not a fatal error.
    std::fs::write(&split, "2007_000002\n2007_000009\n").unwrap();
    let out = tmp.path().join("out-split");
    let r = run(generate_cmd(tmp.path(), &imgs, &out).arg("--labels").arg(&txt).arg("--split").arg(&split));
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert_eq!(summary(&r.stderr), (2, 1, 0, 1));
    let f = failures(&out);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["id"], "2007_000009");
    assert!(f[0]["reason"].as_str().unwrap().contains("no labels"), "{f:?}");
}

/// COCO's 80 category ids (1..90 with gaps).
fn coco_category_ids() -> Vec<u64> {
    let gaps = [12u64, 26, 29, 30, 45, 66, 68, 69, 71, 83];
    (1..=90).filter(|i| !gaps.contains(i)).collect()
}

fn coco_categories_json() -> String {
    let names = clipmask::config::DatasetConfig::resolve("coco14").unwrap();
    coco_category_ids()
        .iter()
        .zip(names.class_names())
        .map(|(id, n)| format!(r#"{{"supercategory":"x","id":{id},"name":"{n}"}}"#))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn coco_instances_map_categories_by_rank_and_skip_unannotated_images() {
    let ids = coco_category_ids();
    assert_eq!(ids.len(), 80);
    let coco = clipmask::config::DatasetConfig::resolve("coco14").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("val2014");
    std::fs::create_dir_all(&imgs).unwrap();
    let name = |i: u64| format!("COCO_val2014_{i:012}");
    for (k, i) in [42u64, 73, 74, 133].iter().enumerate() {
        synthetic_image(64, 48, 300 + k as u64).save(imgs.join(format!("{}.jpg", name(*i)))).unwrap();
    }
    // image 42: categories 90 (last), 1 (first), 1 again; 73: 13 (rank 11, after the gap at 12);
    // 74: 84 (rank 73: ten gaps below it); 133: no annotation.
    let anns = [(42u64, 90u64), (42, 1), (42, 1), (73, 13), (74, 84)];
    let json = format!(
        r#"{{"info":{{"year":2014}},"licenses":[],"images":[{}],"annotations":[{}],"categories":[{}]}}"#,
        [42u64, 73, 74, 133].iter().map(|i| format!(r#"{{"id":{i},"file_name":"{}.jpg","width":64,"height":48}}"#, name(*i))).collect::<Vec<_>>().join(","),
        anns.iter()
            .enumerate()
            .map(|(k, (im, c))| format!(r#"{{"id":{k},"image_id":{im},"category_id":{c},"iscrowd":0,"area":1.5,"bbox":[1,2,3,4],"segmentation":[[1.0,2.0,3.0,4.0,5.0,6.0]]}}"#))
            .collect::<Vec<_>>()
            .join(","),
        coco_categories_json()
    );
    let inst = tmp.path().join("instances_val2014.json");
    std::fs::write(&inst, json).unwrap();
    let rank = |c: u64| ids.iter().position(|&x| x == c).unwrap();
    assert_eq!((rank(1), rank(13), rank(84), rank(90)), (0, 11, 73, 79));

    // Library: names by rank, ascending class order, one unannotated image counted.
    let (labels, skipped) = clipmask::datasets::read_coco_instances(&inst, &coco).unwrap();
    assert_eq!(skipped, 1);
    let cn = coco.class_names();
    assert_eq!(labels[&name(42)], vec![cn[0].to_string(), cn[79].to_string()]);
    assert_eq!(labels[&name(73)], vec![cn[11].to_string()]);
    assert_eq!(labels[&name(74)], vec![cn[73].to_string()]);
    assert!(!labels.contains_key(&name(133)));

    // CLI: the same through generate.
    let out = tmp.path().join("out");
    let r =
        run(generate_cmd(tmp.path(), &imgs, &out).args(["--config", "coco14", "--coco"]).arg(&inst).arg("--save-cams"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(r.stderr.contains("1 image(s)") && r.stderr.contains("skipped"), "skipped count reported\n{}", r.show());
    assert_eq!(summary(&r.stderr), (3, 3, 0, 0), "{}", r.show());
    assert_eq!(npz_keys(&out.join(format!("cams/{}.npz", name(42)))), vec![0, 79]);
    assert_eq!(npz_keys(&out.join(format!("cams/{}.npz", name(73)))), vec![11]);
    assert_eq!(npz_keys(&out.join(format!("cams/{}.npz", name(74)))), vec![73]);
    let m = read_mask(&out.join(format!("masks/{}.png", name(42))));
    assert!(m.values.iter().all(|&v| v == 0 || v == 1 || v == 80));

    // Category count that does not match the config: fatal, one line.
    let r =
        run(generate_cmd(tmp.path(), &imgs, &tmp.path().join("out2")).args(["--config", "voc12", "--coco"]).arg(&inst));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("80 categories") && line.contains("20 classes"), "{line}");
}

/// Child half of `coco_instances_parse_in_bounded_memory`: parses the file named by
/// CLIPMASK_TEST_COCO_RSS and prints its peak RSS. A no-op in a normal test run.
#[test]
fn coco_rss_child_helper() {
    let Some(path) = std::env::var_os("CLIPMASK_TEST_COCO_RSS") else { return };
    let cfg = clipmask::config::DatasetConfig::resolve("coco14").unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let before =
        status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().to_string();
    let (labels, skipped) = clipmask::datasets::read_coco_instances(Path::new(&path), &cfg).unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    println!("\nRESULT images={} skipped={skipped} rss_before_kb={before} {hwm}", labels.len());
}

#[test]
fn coco_instances_parse_in_bounded_memory() {
    // COCO train2014 is ~450 MB: 82,783 images, 604,907 annotations whose polygons make up most
    // of the bytes. Same shape here, size chosen to keep generation + parsing fast.
    const TARGET_BYTES: u64 = 450 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("instances_train2014.json");
    let t0 = Instant::now();
    let (n_images, n_anns) = (82_783u64, 604_907u64);
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&path).unwrap());
        write!(
            w,
            r#"{{"info":{{"description":"synthetic","year":2014}},"licenses":[{{"id":1,"name":"x"}}],"images":["#
        )
        .unwrap();
        for i in 0..n_images {
            let sep = if i == 0 { "" } else { "," };
            write!(w, r#"{sep}{{"license":1,"file_name":"COCO_train2014_{i:012}.jpg","height":480,"width":640,"id":{i},"flickr_url":"http://farm.example/{i}.jpg"}}"#).unwrap();
        }
        w.write_all(br#"],"annotations":["#).unwrap();
        // ~700 bytes of polygon per annotation, like COCO's.
        let poly: String =
            (0..96).map(|k| format!("{}.{:02}", 100 + (k * 37) % 500, (k * 13) % 100)).collect::<Vec<_>>().join(",");
        let rle: String = (0..80).map(|k| ((k * 7919) % 1000).to_string()).collect::<Vec<_>>().join(",");
        let cats = coco_category_ids();
        for a in 0..n_anns {
            let sep = if a == 0 { "" } else { "," };
            let img = (a * 7) % (n_images - 10); // the last 10 images stay unannotated
            let cat = cats[(a % 80) as usize];
            if a % 50 == 0 {
                write!(w, r#"{sep}{{"segmentation":{{"counts":[{rle}],"size":[480,640]}},"area":1234.5,"iscrowd":1,"image_id":{img},"bbox":[1.0,2.0,3.0,4.0],"category_id":{cat},"id":{a}}}"#).unwrap();
            } else {
                write!(w, r#"{sep}{{"segmentation":[[{poly}]],"area":1234.5,"iscrowd":0,"image_id":{img},"bbox":[1.0,2.0,3.0,4.0],"category_id":{cat},"id":{a}}}"#).unwrap();
            }
        }
        write!(w, r#"],"categories":[{}]}}"#, coco_categories_json()).unwrap();
        w.flush().unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    let gen_s = t0.elapsed().as_secs_f64();
    eprintln!("wrote {:.0} MB in {gen_s:.1} s", size as f64 / 1e6);
    assert!(size as f64 >= 0.9 * TARGET_BYTES as f64, "file is {size} bytes");

    let t1 = Instant::now();
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "generate_cli::coco_rss_child_helper", "--nocapture", "--test-threads=1"])
        .env("CLIPMASK_TEST_COCO_RSS", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let line = stdout
        .lines()
        .find_map(|l| l.find("RESULT ").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no RESULT in {stdout}"));
    let kb: f64 = line.split_whitespace().rev().nth(1).unwrap().parse().unwrap();
    let mib = kb / 1024.0;
    eprintln!("{line}  (parse {:.1} s)", t1.elapsed().as_secs_f64());
    assert!(line.contains(&format!("images={} skipped=10", n_images - 10)), "{line}");
    // Extrapolated to 450 MB in case the file is smaller than the target.
    let scaled = mib * (TARGET_BYTES as f64 / size as f64).max(1.0);
    assert!(
        scaled < 2048.0,
        "peak RSS {mib:.0} MiB for {size} bytes (scaled to 450 MB: {scaled:.0} MiB) exceeds 2 GiB"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input never stops a run
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_images_and_labels_are_recorded_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    save_png(&imgs, "good1", 80, 60, 1);
    synthetic_image(72, 56, 2).save(imgs.join("good2.jpg")).unwrap();
    std::fs::write(imgs.join("zero.jpg"), b"").unwrap();
    let png_bytes = std::fs::read(save_png(&imgs, "tmp_full", 80, 60, 3)).unwrap();
    std::fs::remove_file(imgs.join("tmp_full.png")).unwrap();
    std::fs::write(imgs.join("trunc_png.png"), &png_bytes[..png_bytes.len() / 2]).unwrap();
    let mut jpg = Vec::new();
    synthetic_image(80, 60, 4).write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg).unwrap();
    std::fs::write(imgs.join("trunc_jpg.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    let mut rng = rng(99);
    let noise: Vec<u8> = (0..5000).map(|_| rng.random()).collect();
    std::fs::write(imgs.join("random.jpg"), &noise).unwrap();
    // Odd but valid formats.
    let src = save_png(&imgs, "src_rgb", 80, 60, 5);
    run_python(&["-c", &format!(
        "from PIL import Image\nim = Image.open({src:?})\nim.convert('CMYK').save({:?})\nim.convert('P', palette=Image.ADAPTIVE, colors=16).save({:?})\nassert Image.open({:?}).mode == 'CMYK'\n",
        imgs.join("cmyk.jpg").to_str().unwrap(), imgs.join("palette.png").to_str().unwrap(), imgs.join("cmyk.jpg").to_str().unwrap(), src = src.to_str().unwrap()
    )]);
    std::fs::remove_file(&src).unwrap();
    let rgb = synthetic_image(80, 60, 6);
    let img16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(80, 60, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        image::Rgb([p[0] as u16 * 257, p[1] as u16 * 257, p[2] as u16 * 250])
    });
    img16.save(imgs.join("png16.png")).unwrap();
    image::DynamicImage::ImageRgb8(synthetic_image(80, 60, 7)).to_luma8().save(imgs.join("gray.png")).unwrap();
    image::DynamicImage::ImageRgb8(synthetic_image(80, 60, 8)).to_rgba8().save(imgs.join("rgba.png")).unwrap();
    save_png(&imgs, "nolabels", 80, 60, 9);
    save_png(&imgs, "unknown", 80, 60, 10);

    let ok = ["good1", "good2", "cmyk", "palette", "png16", "gray", "rgba"];
    let mut labels: BTreeMap<&str, Vec<&str>> = ok.iter().map(|id| (*id, vec!["dog"])).collect();
    for id in ["missing", "zero", "trunc_png", "trunc_jpg", "random"] {
        labels.insert(id, vec!["cat"]);
    }
    labels.insert("nolabels", vec![]);
    labels.insert("unknown", vec!["dog", "unicorn"]);
    let lf = tmp.path().join("labels.json");
    write_json(&lf, &serde_json::json!(labels));

    let out = tmp.path().join("out");
    let r = run(generate_cmd(tmp.path(), &imgs, &out).arg("--labels").arg(&lf).arg("--overlays"));
    assert_eq!(r.code, Some(1), "{}", r.show());
    for m in PANIC_MARKERS {
        assert!(!r.stderr.contains(m), "{}", r.show());
    }
    let (total, done, skipped, failed) = summary(&r.stderr);
    let masks = ids_in(&out.join("masks"));
    let f = failures(&out);
    let failed_ids: BTreeMap<String, (String, String)> = f
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                (v["path"].as_str().unwrap().to_string(), v["reason"].as_str().unwrap().to_string()),
            )
        })
        .collect();
    eprintln!("masks: {masks:?}\nfailures:\n{}", f.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n"));
    for id in ok {
        assert!(masks.contains(id), "{id} should have a mask; failure: {:?}", failed_ids.get(id));
        let m = read_mask(&out.join(format!("masks/{id}.png")));
        assert_eq!((m.width, m.height), if id == "good2" { (72, 56) } else { (80, 60) }, "{id}");
    }
    let expect_reason: &[(&str, &[&str])] = &[
        ("missing", &["no image for id \"missing\"", "looked for <id>.jpg"]),
        ("zero", &["zero.jpg", "empty"]),
        ("trunc_png", &["trunc_png.png", "decode|truncated|end of file"]),
        ("trunc_jpg", &["trunc_jpg.jpg", "decode|truncated|end of file"]),
        ("random", &["random.jpg", "decode|not an image|format"]),
        ("nolabels", &["no labels"]),
        ("unknown", &["unknown class", "unicorn"]),
    ];
    for (id, words) in expect_reason {
        let (path, reason) =
            failed_ids.get(*id).unwrap_or_else(|| panic!("{id} missing from failures.jsonl (masks: {masks:?})"));
        if *id == "missing" {
            // No image: the path is the images folder, not a made-up <id>.jpg.
            assert_eq!(Path::new(path), imgs, "{id}: path {path}");
        } else {
            assert!(path.ends_with(&format!("{id}.jpg")) || path.ends_with(&format!("{id}.png")), "{id}: path {path}");
        }
        for w in *words {
            // "a|b": either word.
            assert!(w.split('|').any(|alt| reason.contains(alt)), "{id}: reason should mention {w:?}: {reason}");
        }
        assert!(!masks.contains(*id), "{id} has a mask");
    }
    assert_eq!(failed_ids.len(), expect_reason.len(), "{failed_ids:?}");
    assert_eq!((total, done, skipped, failed), (14, 7, 0, 7), "{}", r.show());
    assert!(r.stderr.contains("failures.jsonl"), "points at failures.jsonl\n{}", r.show());

    // --allow-failures: same failures, exit 0; the good ones are already complete.
    let r =
        run(generate_cmd(tmp.path(), &imgs, &out).arg("--labels").arg(&lf).args(["--overlays", "--allow-failures"]));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(summary(&r.stderr), (14, 0, 7, 7), "{}", r.show());
    assert_eq!(failures(&out).len(), 7);
}

#[test]
fn a_large_image_is_downscaled_for_the_model_and_the_mask_keeps_its_size() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    synthetic_image(3000, 2000, 11).save(imgs.join("big.jpg")).unwrap();
    let lf = tmp.path().join("labels.txt");
    std::fs::write(&lf, "big\tperson,horse\n").unwrap();
    let out = tmp.path().join("out");
    let r = run(generate_cmd(tmp.path(), &imgs, &out)
        .arg("--labels")
        .arg(&lf)
        .args(["--max-side", "512", "--summary-json"])
        .arg(tmp.path().join("s.json")));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let m = read_mask(&out.join("masks/big.png"));
    assert_eq!((m.width, m.height), (3000, 2000));
    let allowed = [0u8, 13, 15];
    assert!(m.values.iter().all(|v| allowed.contains(v)));
    let text = std::fs::read_to_string(tmp.path().join("s.json")).unwrap();
    crate::json_schemas::assert_valid("generate-summary", &text);
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["done"], 1);
    eprintln!("peak RSS {} MiB", s["peak_rss_mib"]);
}

// ---------------------------------------------------------------------------------------------
// Fatal errors before any image
// ---------------------------------------------------------------------------------------------

#[test]
fn fatal_errors_stop_before_any_image_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    save_png(&imgs, "a", 64, 48, 1);
    let lf = d.join("labels.json");
    write_json(&lf, &serde_json::json!({"a": ["dog"]}));
    std::fs::write(d.join("bad.pt"), b"definitely not a model").unwrap();
    let voc_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("configs/voc12.json")).unwrap()).unwrap();
    let mut unknown_key = voc_json.clone();
    unknown_key["colour_map"] = serde_json::json!("jet");
    write_json(&d.join("unknown_key.json"), &unknown_key);
    let mut unknown_class_key = voc_json.clone();
    unknown_class_key["classes"][0]["colour"] = serde_json::json!([1, 2, 3]);
    write_json(&d.join("unknown_class_key.json"), &unknown_class_key);
    let mut dup = voc_json.clone();
    dup["classes"][5]["name"] = serde_json::json!("dog");
    write_json(&d.join("dup.json"), &dup);
    std::fs::write(d.join("not_json.json"), "{ classes: [").unwrap();
    std::fs::write(d.join("afile"), b"x").unwrap();

    let p = |s: &str| d.join(s).to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<String>, &[&str])> = vec![
        ("unreadable model", vec!["--model".into(), p("bad.pt")], &["bad.pt", "expected"]),
        ("missing model", vec!["--model".into(), p("nope.pt")], &["nope.pt"]),
        ("missing config", vec!["--config".into(), p("nope.json")], &["nope.json"]),
        ("config unknown key", vec!["--config".into(), p("unknown_key.json")], &["unknown field", "colour_map"]),
        (
            "config unknown class key",
            vec!["--config".into(), p("unknown_class_key.json")],
            &["unknown field", "colour"],
        ),
        ("duplicate class", vec!["--config".into(), p("dup.json")], &["duplicate class name", "dog"]),
        ("config not JSON", vec!["--config".into(), p("not_json.json")], &["not_json.json"]),
        ("unknown shipped config", vec!["--config".into(), "voc2099".into()], &["voc2099"]),
        ("images not a dir", vec!["--images".into(), p("afile")], &["not a directory"]),
        ("images missing", vec!["--images".into(), p("nodir")], &["not a directory"]),
        ("out under a file", vec!["--out".into(), p("afile/out")], &["afile"]),
        ("labels missing", vec!["--labels".into(), p("nolabels.json")], &["nolabels.json"]),
        ("bad shard", vec!["--shard".into(), "2/2".into()], &["--shard"]),
        ("shard not a number", vec!["--shard".into(), "a/2".into()], &["--shard"]),
    ];
    for (what, extra, words) in cases {
        let out = d.join(format!("out-{}", what.replace(' ', "-")));
        let mut args: Vec<String> = vec![
            "--images".into(),
            imgs.to_str().unwrap().into(),
            "--labels".into(),
            lf.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ];
        // Later flags of the same name replace earlier ones only for the model; rebuild instead.
        for pair in extra.chunks(2) {
            if let Some(i) = args.iter().position(|a| *a == pair[0]) {
                args[i + 1] = pair[1].clone();
            }
        }
        let extra_rest: Vec<String> =
            extra.chunks(2).filter(|pair| !args.contains(&pair[0])).flat_map(|p| p.to_vec()).collect();
        let mut cmd = clipmask(d);
        cmd.args(["generate", "--device", "cpu"]);
        if !extra.contains(&"--model".to_string()) {
            cmd.arg("--model").arg(tiny_model());
        }
        cmd.args(&args).args(&extra_rest);
        let r = run(&mut cmd);
        let line = assert_one_line_error(&r, 2);
        for w in words {
            assert!(line.contains(w), "{what}: message should mention {w:?}: {line}");
        }
        let written: Vec<PathBuf> = files_under(&out);
        assert!(written.is_empty(), "{what}: files written: {written:?}");
        eprintln!("{what}: {line}");
    }
}

// ---------------------------------------------------------------------------------------------
// Resume, overwrite, shards
// ---------------------------------------------------------------------------------------------

fn inode_and_mtime(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    files_under(dir)
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(dir.join(&p)).unwrap();
            (p, (m.ino(), m.modified().unwrap()))
        })
        .collect()
}

#[test]
fn rerun_skips_overwrite_redoes_and_shards_cover_the_list_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let ids = ["i0", "i1", "i2", "i3", "i4"];
    for (k, id) in ids.iter().enumerate() {
        save_png(&imgs, id, 64 + 8 * k as u32, 48, 400 + k as u64);
    }
    let lf = tmp.path().join("labels.json");
    write_json(
        &lf,
        &serde_json::json!({"i0": ["dog"], "i1": ["cat", "sofa"], "i2": ["car"], "i3": ["bird", "sheep"], "i4": ["boat"]}),
    );
    let cmd = |out: &Path| {
        let mut c = generate_cmd(tmp.path(), &imgs, out);
        c.arg("--labels").arg(&lf).args(["--save-cams", "--overlays"]);
        c
    };
    let full = tmp.path().join("full");
    let r = run(&mut cmd(&full));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(summary(&r.stderr), (5, 5, 0, 0));
    let before = inode_and_mtime(&full);
    assert_eq!(before.len(), 15, "{before:?}");

    let r = run(&mut cmd(&full));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(summary(&r.stderr), (5, 0, 5, 0), "{}", r.show());
    assert_eq!(inode_and_mtime(&full), before, "a rerun must not rewrite complete outputs");

    // A missing overlay makes that image incomplete: only it is redone.
    std::fs::remove_file(full.join("overlays/i2.jpg")).unwrap();
    let r = run(&mut cmd(&full));
    assert_eq!(summary(&r.stderr), (5, 1, 4, 0), "{}", r.show());
    let after = inode_and_mtime(&full);
    let changed: Vec<&PathBuf> = after.iter().filter(|(p, v)| before.get(*p) != Some(v)).map(|(p, _)| p).collect();
    assert!(changed.iter().all(|p| p.to_string_lossy().contains("i2")), "only i2 is rewritten: {changed:?}");
    let before = after;

    let r = run(cmd(&full).arg("--overwrite"));
    assert_eq!(summary(&r.stderr), (5, 5, 0, 0), "{}", r.show());
    let after = inode_and_mtime(&full);
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    for (p, v) in &after {
        assert_ne!(Some(v), before.get(p), "{} not rewritten by --overwrite", p.display());
    }

    // Two shards into one directory = the full run, byte for byte.
    let sharded = tmp.path().join("sharded");
    let r0 = run(cmd(&sharded).args(["--shard", "0/2"]));
    assert_eq!(summary(&r0.stderr), (3, 3, 0, 0), "{}", r0.show());
    let r1 = run(cmd(&sharded).args(["--shard", "1/2"]));
    assert_eq!(summary(&r1.stderr), (2, 2, 0, 0), "{}", r1.show());
    // Each shard also leaves its own summary; the images' files are the full run's.
    let (a, mut b) = (outputs(&full), outputs(&sharded));
    for i in 0..2 {
        assert!(b.remove(Path::new(&format!("summary.{i}-of-2.json"))).is_some(), "shard {i}'s summary");
    }
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let differing: Vec<&PathBuf> = a.iter().filter(|(p, bytes)| b[*p] != **bytes).map(|(p, _)| p).collect();
    assert!(differing.is_empty(), "sharded outputs differ from the full run: {differing:?}");

    let r = run(cmd(&tmp.path().join("bad")).args(["--shard", "2/2"]));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("2/2"), "{line}");
}

#[test]
fn shards_into_one_directory_keep_every_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for (k, id) in ["a", "b", "c", "d"].iter().enumerate() {
        save_png(&imgs, id, 64, 48, 500 + k as u64);
    }
    let lf = tmp.path().join("labels.json");
    // c fails (unknown class); each id belongs to shard hash(id) mod 2.
    write_json(
        &tmp.path().join("labels.json"),
        &serde_json::json!({"a": ["dog"], "b": ["cat"], "c": ["unicorn"], "d": ["car"]}),
    );
    let out = tmp.path().join("out");
    for s in ["0/2", "1/2"] {
        let _ = run(generate_cmd(tmp.path(), &imgs, &out).arg("--labels").arg(&lf).args(["--shard", s]));
    }
    // Each shard has its own failures file; c's is in its shard's (c fails in exactly one).
    let per_shard: Vec<Vec<serde_json::Value>> = (0..2)
        .map(|i| {
            let Ok(text) = std::fs::read_to_string(out.join(format!("failures.{i}-of-2.jsonl"))) else { return vec![] };
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        })
        .collect();
    let all: Vec<&serde_json::Value> = per_shard.iter().flatten().collect();
    assert_eq!(all.len(), 1, "c's failure must be kept by its shard's file: {per_shard:?}");
    assert_eq!(all[0]["id"], "c");
    let c_shard = clipmask::cluster::shard_of("c", 2);
    assert_eq!(per_shard[c_shard].len(), 1, "in shard {c_shard}'s file");
    assert!(!out.join("failures.jsonl").exists(), "shards never write the run's failures.jsonl");
}

// ---------------------------------------------------------------------------------------------
// Interruption
// ---------------------------------------------------------------------------------------------

fn count_masks(out: &Path) -> usize {
    ids_in(&out.join("masks")).len()
}

#[test]
fn sigkill_and_sigint_midway_leave_no_partial_file_and_a_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let n = 36;
    let mut labels = BTreeMap::new();
    let classes = ["dog", "cat", "person", "car", "bus", "sheep"];
    for k in 0..n {
        save_png(&imgs, &format!("s{k:02}"), 224, 160, 600 + k as u64);
        labels.insert(format!("s{k:02}"), vec![classes[k % 6], classes[(k + 2) % 6]]);
    }
    let lf = tmp.path().join("labels.json");
    write_json(&lf, &serde_json::json!(labels));
    let cmd = |out: &Path| {
        let mut c = generate_cmd(tmp.path(), &imgs, out);
        c.arg("--labels").arg(&lf).args(["--save-cams", "--overlays"]);
        c
    };
    let reference = tmp.path().join("reference");
    let r = run(&mut cmd(&reference));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let expected = outputs(&reference);
    assert_eq!(expected.len(), 3 * n);

    // SIGKILL once a few masks exist.
    let out = tmp.path().join("killed");
    let mut child = cmd(&out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while count_masks(&out) < 3 && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let at_kill = count_masks(&out);
    eprintln!("SIGKILL after {at_kill} masks ({status})");
    assert!(status.code().is_none(), "killed by a signal");
    assert!(at_kill >= 3 && at_kill < n, "the kill must land midway ({at_kill} of {n} masks)");
    for p in files_under(&out) {
        if is_temp_name(&p) {
            continue;
        }
        let full = out.join(&p);
        match p.extension().and_then(|e| e.to_str()) {
            Some("png") => assert!(png_decodes(&full), "partial mask {}", p.display()),
            Some("npz") => {
                assert!(clipmask::outputs::CamArchive::read(&full).is_ok(), "partial archive {}", p.display())
            }
            Some("jpg") => assert!(image::open(&full).is_ok(), "partial overlay {}", p.display()),
            _ => panic!("unexpected file {}", p.display()),
        }
        assert_eq!(std::fs::read(&full).unwrap(), expected[&p], "{} differs from the uninterrupted run", p.display());
    }
    // The mask is written last: a mask implies its map and overlay.
    for id in ids_in(&out.join("masks")) {
        assert!(out.join(format!("cams/{id}.npz")).exists() && out.join(format!("overlays/{id}.jpg")).exists(), "{id}");
    }
    let r = run(&mut cmd(&out));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let (total, done, skipped, failed) = summary(&r.stderr);
    assert_eq!((total, failed, done + skipped), (n, 0, n), "{}", r.show());
    assert!(skipped >= at_kill, "{}", r.show());
    let got = outputs(&out);
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    let differing: Vec<&PathBuf> = got.iter().filter(|(p, b)| expected[*p] != **b).map(|(p, _)| p).collect();
    assert!(differing.is_empty(), "resumed outputs differ from the uninterrupted run: {differing:?}");

    // SIGINT: the image in flight is finished, the summary printed, exit 130.
    let out = tmp.path().join("interrupted");
    let child = cmd(&out).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while count_masks(&out) < 3 && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let k = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let at_int = count_masks(&out);
    eprintln!("SIGINT after {at_int} masks:\n{stderr}");
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(at_int < n, "the interrupt must land midway ({at_int} of {n})");
    let (total, done, _, failed) = summary(&stderr);
    assert_eq!((total, failed), (n, 0));
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(done, at_int, "the summary counts the masks written\n{stderr}");
    for p in files_under(&out) {
        assert!(!is_temp_name(&p), "a clean interrupt leaves no temporary file: {}", p.display());
    }
    let r = run(&mut cmd(&out));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let got = outputs(&out);
    let differing: Vec<&PathBuf> = got.iter().filter(|(p, b)| expected.get(*p) != Some(*b)).map(|(p, _)| p).collect();
    assert_eq!(got.len(), expected.len());
    assert!(differing.is_empty(), "outputs after SIGINT + rerun differ: {differing:?}");
}
