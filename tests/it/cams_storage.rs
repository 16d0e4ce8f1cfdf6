//! `generate --cams-dtype / --cams-stride`: archives stored in float16 and/or at 1/N
//! resolution. Pooling and the readers' resize are checked against PyTorch
//! (`avg_pool2d(ceil_mode=True)`, `interpolate(mode="bilinear", align_corners=False)`) on the
//! archives numpy reads; float16 at full resolution moves labels only where the float32 maps
//! are within a float16 step of a tie; bad strides are clean errors.
use crate::support::*;
use clipmask::outputs::{CamArchive, CamDtype, CamStorage};
use ndarray::Array3;
use std::path::Path;

/// Smooth maps in [0, 1] (sums of bumps), K x H x W, with sizes that no stride divides.
fn smooth_maps(k: usize, h: usize, w: usize, seed: u64) -> Array3<f32> {
    let mut r = rng(seed);
    let mut m = Array3::<f32>::zeros((k, h, w));
    for c in 0..k {
        let (cx, cy, s) = (r.random_range(0.0..w as f64), r.random_range(0.0..h as f64), r.random_range(4.0..15.0));
        for y in 0..h {
            for x in 0..w {
                let d2 = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)) / (s * s);
                m[[c, y, x]] = ((-d2).exp() * 0.9 + r.random_range(0.0..0.1)) as f32;
            }
        }
    }
    m
}

const REFERENCE: &str = r#"
import sys, json, numpy as np, torch
import torch.nn.functional as F
orig = np.load(sys.argv[1])
out = {}
for p in sys.argv[2:]:
    z = np.load(p)
    e = {"files": sorted(z.files), "dtype": str(z["cams"].dtype), "stored": list(z["cams"].shape)}
    stride = int(z["stride"]) if "stride" in z.files else 1
    H, W = (int(v) for v in z["size"]) if "size" in z.files else z["cams"].shape[1:]
    e["stride"], e["size"] = stride, [H, W]
    # What the writer should store: the average over stride x stride blocks, then the dtype.
    pooled = F.avg_pool2d(torch.from_numpy(orig)[None], stride, stride, ceil_mode=True)[0].numpy()
    want = pooled.astype(z["cams"].dtype)
    e["pool_max_diff"] = float(np.abs(z["cams"].astype(np.float64) - want.astype(np.float64)).max())
    # What readers should see: bilinear back to H x W on pixel centres, in float32.
    up = F.interpolate(torch.from_numpy(z["cams"].astype(np.float32))[None], size=(H, W), mode="bilinear",
                       align_corners=False)[0].numpy()
    np.save(p + ".ref.npy", up)
    out[p] = e
print(json.dumps(out))
"#;

#[test]
fn stored_maps_match_torch_pooling_and_bilinear_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let (k, h, w) = (2, 37, 53);
    let maps = smooth_maps(k, h, w, 11);
    let orig = tmp.path().join("orig.npy");
    ndarray_npy::write_npy(&orig, &maps).unwrap();
    let archive = CamArchive { keys: vec![3, 7], cams: maps.clone(), raw_cams: maps.clone() };
    let storages = [
        (CamDtype::Float32, 1),
        (CamDtype::Float16, 1),
        (CamDtype::Float32, 2),
        (CamDtype::Float16, 4),
        (CamDtype::Float32, 8),
        (CamDtype::Float16, 16),
    ];
    let mut paths = Vec::new();
    for (dtype, stride) in storages {
        let p = tmp.path().join(format!("{dtype:?}-{stride}.npz"));
        let names = vec!["bird".to_string(), "cat".to_string()];
        archive.write_stored(&p, Some(&names), CamStorage::new(dtype, stride).unwrap()).unwrap();
        paths.push(p);
    }
    let o = python_cmd().arg("-c").arg(REFERENCE).arg(&orig).args(&paths).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for ((dtype, stride), p) in storages.iter().zip(&paths) {
        let e = &v[p.to_str().unwrap()];
        let name = format!("{dtype:?} stride {stride}");
        let (ph, pw) = (h.div_ceil(*stride as usize), w.div_ceil(*stride as usize));
        assert_eq!(e["stored"], serde_json::json!([k, ph, pw]), "{name}");
        assert_eq!(e["dtype"], if *dtype == CamDtype::Float16 { "float16" } else { "float32" }, "{name}");
        assert_eq!((e["stride"].as_u64(), &e["size"]), (Some(*stride as u64), &serde_json::json!([h, w])), "{name}");
        let mut files = vec!["cams", "class_names", "keys", "raw_cams"];
        if *stride > 1 {
            files.extend(["size", "stride"]);
            files.sort();
        }
        assert_eq!(e["files"], serde_json::json!(files), "{name}: entries");
        // float32 pooling in another order of summation: within 1e-6; float16: the same
        // rounding of the same value, at most one float16 step apart.
        let tol = if *dtype == CamDtype::Float16 { 1e-3 } else { 1e-6 };
        assert!(e["pool_max_diff"].as_f64().unwrap() <= tol, "{name}: pooled maps {}", e["pool_max_diff"]);
        // The reader: full size, float32, torch's bilinear values.
        let read = CamArchive::read(p).unwrap();
        assert_eq!(read.keys, vec![3, 7]);
        let reference: Array3<f32> = ndarray_npy::read_npy(format!("{}.ref.npy", p.display())).unwrap();
        for got in [&read.cams, &read.raw_cams] {
            assert_eq!(got.dim(), (k, h, w), "{name}");
            let diff = got.iter().zip(reference.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 2e-6, "{name}: reader vs torch bilinear: {diff}");
        }
        // Stride 1 float32 is exact; the others stay close to the original smooth maps.
        let err = read.cams.iter().zip(maps.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        match (dtype, stride) {
            (CamDtype::Float32, 1) => assert_eq!(err, 0.0),
            (CamDtype::Float16, 1) => assert!(err <= 2.5e-4, "{name}: {err}"),
            (_, 2) => assert!(err < 0.15, "{name}: {err}"),
            _ => {}
        }
    }
    // Stored smaller: float16 halves, stride N divides by about N².
    let len = |i: usize| std::fs::metadata(&paths[i]).unwrap().len() as f64;
    assert!(len(1) < len(0) * 0.6, "float16 {} vs float32 {}", len(1), len(0));
    assert!(len(2) < len(0) * 0.35, "stride 2 {} vs {}", len(2), len(0));
}

/// An archive written by numpy itself with the given extra entries.
fn numpy_archive(path: &Path, extra: &str) {
    let script = format!(
        "import numpy as np\nc = np.full((1, 3, 4), 0.5, np.float32)\n\
         np.savez({:?}, keys=np.array([0], np.int64), cams=c, raw_cams=c{extra})",
        path.to_str().unwrap()
    );
    run_python(&["-c", &script]);
}

#[test]
fn bad_strides_are_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Readers: stride 0, a huge stride, a size the stored maps do not have, half of the pair.
    let cases = [
        ("zero", ", stride=np.int64(0), size=np.array([5, 7], np.int64)", "stride 0 is not in 1..=16"),
        ("huge", ", stride=np.int64(1 << 40), size=np.array([5, 7], np.int64)", "is not in 1..=16"),
        ("size", ", stride=np.int64(2), size=np.array([50, 70], np.int64)", "not the size 50x70 at stride 2"),
        ("negative", ", stride=np.int64(2), size=np.array([-5, 7], np.int64)", "not the size -5x7"),
        ("alone", ", stride=np.int64(2)", "go together"),
        ("float", ", stride=np.float32(2), size=np.array([5, 7], np.int64)", "has dtype <f4"),
    ];
    for (name, extra, want) in cases {
        let p = d.join(format!("cams/{name}.npz"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        numpy_archive(&p, extra);
        let e = format!("{:#}", CamArchive::read(&p).err().unwrap_or_else(|| panic!("{name}: read")));
        assert!(e.contains(want) && e.contains(&format!("{name}.npz")), "{name}: {e}");
    }
    // numpy's own stride-2 archive of a 5 x 7 map (3 x 4 stored) is read at 5 x 7.
    let p = d.join("good.npz");
    numpy_archive(&p, ", stride=np.int64(2), size=np.array([5, 7], np.int64)");
    let a = CamArchive::read(&p).unwrap();
    assert_eq!(a.cams.dim(), (1, 5, 7));
    assert!(a.cams.iter().all(|&v| v == 0.5));

    // eval --cams on such an archive: one line naming the file and the problem.
    std::fs::create_dir_all(d.join("gt")).unwrap();
    clipmask::outputs::write_label_png(&d.join("gt/zero.png"), &[0; 35], 7, 5, None).unwrap();
    let mut c = clipmask(&d.join("cache"));
    c.arg("eval").arg("--cams").arg(d.join("cams")).arg("--gt").arg(d.join("gt")).arg("--split");
    std::fs::write(d.join("split.txt"), "zero\n").unwrap();
    let r = run(c.arg(d.join("split.txt")));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("zero.npz") && line.contains("stride 0 is not in 1..=16"), "{line}");

    // generate: a stride outside 1..=16 is refused before the model loads; the flags need --save-cams.
    let (imgs, labels) = one_image_dataset(d, 3);
    for (flags, want) in [
        (vec!["--save-cams", "--cams-stride", "0"], "1..=16"),
        (vec!["--save-cams", "--cams-stride", "17"], "1..=16"),
        (vec!["--save-cams", "--cams-dtype", "float8"], "float16"),
        (vec!["--cams-stride", "2"], "--save-cams"),
    ] {
        let r = run(generate_cmd(&d.join("cache"), &imgs, &d.join("out")).arg("--labels").arg(&labels).args(&flags));
        assert_eq!(r.code, Some(2), "{flags:?}\n{}", r.show());
        assert!(r.stderr.contains(want), "{flags:?}: {}", r.stderr);
        for m in PANIC_MARKERS {
            assert!(!r.stderr.contains(m), "{flags:?}: {}", r.stderr);
        }
        assert!(!d.join("out/cams").exists(), "{flags:?}: nothing written");
    }
}

/// Whether the float32 maps at one pixel are within `eps` of a tie of the labelling at `alpha`
/// (method.md §6): the background score (1 - max)^alpha against the largest map, or the two
/// largest maps against each other. Rounding to float16 can only move a label there.
fn near_tie(values: &[f32], alpha: f32, eps: f32) -> bool {
    let mut v = values.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let top = v[0];
    let second = v.get(1).copied().unwrap_or(f32::NEG_INFINITY);
    ((1.0 - top).powf(alpha) - top).abs() <= eps || top - second <= eps
}

/// float16 at full resolution: maps within one float16 step (2.4e-4 below 1) of float32, and
/// labels that differ only where the float32 maps are that close to a tie (the labelling's
/// argmax, `eval --cams` at alpha 1 and 2), a handful of pixels (measured on voc-sample in
/// docs/cams-storage.md). `crf` labels move as little. A stride of 4 stores fewer bytes and
/// still gives valid masks of the original size.
#[test]
fn float16_archives_change_labels_only_at_ties() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let images = d.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..3u32 {
        synthetic_image(150 + 23 * i, 110, 40 + i as u64).save(images.join(format!("s{i}.png"))).unwrap();
    }
    let labels = d.join("labels.json");
    std::fs::write(&labels, r#"{"s0": ["dog", "person"], "s1": ["car"], "s2": ["cat", "sofa", "person"]}"#).unwrap();
    let mut outs = Vec::new();
    for (dtype, stride) in [("float32", "1"), ("float16", "1"), ("float16", "4")] {
        let out = d.join(format!("{dtype}-{stride}"));
        let r = run(generate_cmd(&shared_cache(), &images, &out).arg("--labels").arg(&labels).args([
            "--save-cams",
            "--cams-dtype",
            dtype,
            "--cams-stride",
            stride,
        ]));
        assert_eq!(r.code, Some(0), "{}", r.show());
        let r = run(clipmask(&shared_cache())
            .arg("crf")
            .arg("--cams")
            .arg(out.join("cams"))
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(out.join("crf")));
        assert_eq!(r.code, Some(0), "{}", r.show());
        outs.push(out);
    }
    let (mut pixels, mut moved, mut crf_moved) = (0usize, 0usize, 0usize);
    for i in 0..3 {
        let cams = |out: &Path| CamArchive::read(&out.join(format!("cams/s{i}.npz"))).unwrap();
        let (a, b, c) = (cams(&outs[0]), cams(&outs[1]), cams(&outs[2]));
        let step = a.cams.iter().zip(b.cams.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(step <= 2.5e-4, "s{i}: float16 moved a value by {step}");
        let (k, h, w) = a.cams.dim();
        for alpha in [1.0, 2.0] {
            let la = clipmask::eval::label_map_from_cams(&a.cams, &a.keys, alpha);
            let lb = clipmask::eval::label_map_from_cams(&b.cams, &b.keys, alpha);
            for (p, (x, y)) in la.iter().zip(&lb).enumerate() {
                pixels += 1;
                if x != y {
                    moved += 1;
                    let v: Vec<f32> = (0..k).map(|c| a.cams[[c, p / w, p % w]]).collect();
                    assert!(near_tie(&v, alpha, 1e-3), "s{i} alpha {alpha} pixel {p}: {x} -> {y} at {v:?}");
                }
            }
        }
        let mask = |out: &Path| clipmask::outputs::read_label_png(&out.join(format!("crf/masks/s{i}.png"))).unwrap();
        let (ma, mb) = (mask(&outs[0]), mask(&outs[1]));
        crf_moved += ma.0.iter().zip(&mb.0).filter(|(x, y)| x != y).count();
        assert_eq!(c.cams.dim(), (k, h, w), "s{i}: stride 4 read back at full size");
        let size = |out: &Path| std::fs::metadata(out.join(format!("cams/s{i}.npz"))).unwrap().len();
        assert!(size(&outs[1]) < size(&outs[0]) && size(&outs[2]) < size(&outs[1]) / 4, "s{i}: archive sizes");
        let (m, mw, mh) = mask(&outs[2]);
        assert_eq!((mw as usize, mh as usize), (w, h));
        assert!(m.iter().all(|&l| l == 0 || l == 255 || a.keys.contains(&(l as i64 - 1))));
    }
    // A few boundary pixels at most (0.05 % here), never a region.
    assert!(moved * 200 < pixels, "{moved} of {pixels} labels moved");
    assert!(crf_moved * 400 < pixels, "crf: {crf_moved} of {} labels moved", pixels / 2);
}
