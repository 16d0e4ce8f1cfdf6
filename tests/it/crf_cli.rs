//! `generate --crf` and `clipmask crf` on saved maps give the same masks; confidence maps and
//! the 255 rule hold on the real outputs.
use crate::support::*;

#[test]
fn generate_crf_equals_crf_on_saved_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..3u32 {
        synthetic_image(180 + 17 * i, 140, 70 + i as u64).save(images.join(format!("s{i}.png"))).unwrap();
    }
    let labels = tmp.path().join("labels.json");
    std::fs::write(&labels, r#"{"s0": ["dog"], "s1": ["person", "car"], "s2": ["cat", "sofa", "person"]}"#).unwrap();
    let model = tiny_model();
    let a = tmp.path().join("a");
    let st = clipmask(&shared_cache())
        .args(["generate", "--model", model.to_str().unwrap(), "--device", "cpu", "--images", images.to_str().unwrap()])
        .args([
            "--labels",
            labels.to_str().unwrap(),
            "--out",
            a.to_str().unwrap(),
            "--crf",
            "--save-cams",
            "--save-confidence",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let b = tmp.path().join("b");
    let st = clipmask(&shared_cache())
        .args([
            "crf",
            "--cams",
            a.join("cams").to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--out",
            b.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    for i in 0..3 {
        let pa = std::fs::read(a.join(format!("masks/s{i}.png"))).unwrap();
        let pb = std::fs::read(b.join(format!("masks/s{i}.png"))).unwrap();
        assert_eq!(pa, pb, "s{i}: generate --crf and crf differ");
        // 255 exactly where the saved confidence is below 0.95; other values are 0 or a label.
        let (lab, w, h) = clipmask::outputs::read_label_png(&a.join(format!("masks/s{i}.png"))).unwrap();
        let conf: ndarray::Array2<f32> = ndarray_npy::read_npy(a.join(format!("confidence/s{i}.npy"))).unwrap();
        assert_eq!(conf.dim(), (h as usize, w as usize));
        let keys = clipmask::outputs::CamArchive::read(&a.join(format!("cams/s{i}.npz"))).unwrap().keys;
        for (l, c) in lab.iter().zip(conf.iter()) {
            assert_eq!(*l == 255, *c < 0.95);
            assert!(*l == 255 || *l == 0 || keys.iter().any(|k| *k + 1 == *l as i64));
            assert!(*c > 0.0 && *c <= 1.0 + 1e-6);
        }
    }
    // The rgb image mode is a different CRF input: it runs and gives valid masks.
    let c = tmp.path().join("c");
    let st = clipmask(&shared_cache())
        .args(["crf", "--cams", a.join("cams").to_str().unwrap(), "--images", images.to_str().unwrap()])
        .args(["--out", c.to_str().unwrap(), "--crf-image", "rgb", "--confidence", "0"])
        .status()
        .unwrap();
    assert!(st.success());
    let (lab, _, _) = clipmask::outputs::read_label_png(&c.join("masks/s2.png")).unwrap();
    assert!(lab.iter().all(|&l| l != 255), "confidence 0 keeps every pixel");
}
