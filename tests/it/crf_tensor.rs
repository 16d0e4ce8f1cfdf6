//! The tensor CRF (`crf::tensor`, the GPU's algorithm) run on the CPU, against pydensecrf and
//! the CPU CRF on real photos from ../shared/data/voc-sample, in both CRF image modes (issue 26
//! §2): labels with the 255 ignore mask agree on >= 99.9 % of pixels with both, and the
//! confidence maps (largest marginal) agree with the CPU CRF's to 1e-3. The reference is
//! tests/python/crf_reference.py, as in crf_parity.rs.
use crate::crf_parity::{clip_es_probs, crop, spawn_python, voc_photos, wait_python, write_u8};
use clipmask::crf::tensor::{self, TensorRun};
use clipmask::crf::{crf_image, dense_crf, labels_from_marginals, CrfImage, CrfParams};
use ndarray::{Array3, ArrayView3};
use ndarray_npy::{read_npy, write_npy};

const MIN_AGREEMENT: f64 = 0.999;
const TOL_CONFIDENCE: f32 = 1e-3;
/// CLIP-ES's confidence threshold: pixels below it are 255.
const CONFIDENCE: f32 = 0.95;

fn agreement(a: &[u8], b: &[u8]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

#[test]
fn tensor_crf_agrees_with_pydensecrf_and_the_cpu_crf_on_photos() {
    // voc-sample's photos, or the VOC photos shipped in examples/images.
    let photos = voc_photos()
        .or_else(|| crate::crf_parity::photos_in(&crate::support::photos().0))
        .expect("photos in examples/images");
    let tmp = tempfile::tempdir().unwrap();
    let p = CrfParams::default();
    // Two whole photos and two crops; 21 and 3 labels; each in both CRF image modes.
    let mut cases = vec![];
    for (k, labels) in [(0usize, 21usize), (1, 3)] {
        let (id, rgb, w, h) = &photos[k % photos.len()];
        cases.push((format!("{id} full"), rgb.clone(), *w, *h, labels));
    }
    for (k, (cw, ch, labels)) in [(240usize, 180usize, 5usize), (201, 149, 2)].into_iter().enumerate() {
        let (id, rgb, w, h) = &photos[(2 + k) % photos.len()];
        let (cw, ch) = (cw.min(*w), ch.min(*h));
        cases.push((format!("{id} crop"), crop(rgb, *w, (w - cw) / 2, (h - ch) / 2, cw, ch), cw, ch, labels));
    }
    // One libtorch thread: the tensor CRF's operations are short and, on a busy machine, more
    // threads spin against each other (4x slower on 2 loaded cores). Restored at the end.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let mut failures = vec![];
    println!("| case | size | labels | image | labels vs pydensecrf | labels vs CPU CRF | max |d conf| vs CPU CRF |");
    println!("|---|---|---|---|---|---|---|");
    for (ci, (name, rgb, w, h, l)) in cases.into_iter().enumerate() {
        for mode in [CrfImage::Faithful, CrfImage::Rgb] {
            let dir = tmp.path().join(format!("case{ci}-{mode:?}"));
            std::fs::create_dir_all(&dir).unwrap();
            let img = crf_image(&rgb, mode);
            let probs = clip_es_probs(w, h, l, 40 + ci as u64);
            write_u8(&dir.join("image.npy"), &img, h, w);
            write_npy(dir.join("probs.npy"), &ArrayView3::from_shape((l, h, w), &probs[..]).unwrap()).unwrap();
            let child = spawn_python(&["crf".into(), dir.display().to_string()]);
            let run = TensorRun { device: tch::Device::Cpu, stop: None };
            let q = tensor::dense_crf(&img, w, h, &probs, l, &p, run).unwrap();
            let ids: Vec<u8> = (0..l as u8).collect();
            let (got, got_conf) = tensor::labels_from_marginals(&q, &ids, CONFIDENCE).unwrap();
            let cpu_q = dense_crf(&img, w, h, &probs, l, &p).unwrap();
            let (cpu, cpu_conf) = labels_from_marginals(&cpu_q, l, &ids, CONFIDENCE);
            wait_python(child, "crf");
            let want: Array3<f32> = read_npy(dir.join("q.npy")).unwrap();
            let (reference, _) = labels_from_marginals(want.as_slice().unwrap(), l, &ids, CONFIDENCE);
            let (vs_ref, vs_cpu) = (agreement(&got, &reference), agreement(&got, &cpu));
            let d_conf = got_conf.iter().zip(&cpu_conf).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!(
                "| {name} | {w}x{h} | {l} | {mode:?} | {:.4} % | {:.4} % | {d_conf:.2e} |",
                100.0 * vs_ref,
                100.0 * vs_cpu
            );
            if !(vs_ref >= MIN_AGREEMENT && vs_cpu >= MIN_AGREEMENT && d_conf <= TOL_CONFIDENCE) {
                failures.push(format!(
                    "{name} ({l} labels, {mode:?}): labels {vs_ref} vs pydensecrf, {vs_cpu} vs the CPU CRF, \
                     confidence max |diff| {d_conf:e}"
                ));
            }
        }
    }
    tch::set_num_threads(threads);
    assert!(failures.is_empty(), "tensor CRF differs:\n{}", failures.join("\n"));
}

/// `clipmask crf --crf-device tensor-cpu` (the GPU's CRF, on the CPU) against `--crf-device
/// cpu` on maps of real photos: masks (with their 255 pixels) agree on >= 99.9 % of pixels and
/// the confidence maps to 1e-3. Without CUDA, `--crf-device cuda` is a one-line error.
#[test]
fn crf_cli_tensor_cpu_agrees_with_cpu() {
    use crate::support::{assert_one_line_error, clipmask, run, shared_cache};
    let tmp = tempfile::tempdir().unwrap();
    let (images, cams) = (tmp.path().join("images"), tmp.path().join("cams"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&cams).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(crate::support::photos().0).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    // Past the photos the parity test uses when there are enough (voc-sample).
    let skip = if names.len() >= 7 { 4 } else { 0 };
    // Three photos, CLIP-ES-like maps (min-max normalised blobs) for 1, 2 and 3 classes.
    let keys_of: [&[i64]; 3] = [&[14], &[11, 14], &[2, 6, 14]];
    for (k, (p, keys)) in names.iter().skip(skip).zip(keys_of).enumerate() {
        let id = p.file_stem().unwrap().to_string_lossy().into_owned();
        std::fs::copy(p, images.join(format!("{id}.jpg"))).unwrap();
        let (w, h) = image::image_dimensions(p).unwrap();
        let (w, h) = (w as usize, h as usize);
        let probs = clip_es_probs(w, h, keys.len() + 1, 70 + k as u64);
        let maps = ndarray::Array3::from_shape_vec((keys.len(), h, w), probs[w * h..].to_vec()).unwrap();
        let archive = clipmask::outputs::CamArchive { keys: keys.to_vec(), cams: maps.clone(), raw_cams: maps };
        archive.write_named(&cams.join(format!("{id}.npz")), None).unwrap();
    }
    let crf = |device: &str, out: &std::path::Path| {
        let mut cmd = clipmask(&shared_cache());
        cmd.args(["crf", "--cams", cams.to_str().unwrap(), "--images", images.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--save-confidence", "--crf-device", device])
            // One libtorch thread (see the test above): fast on a busy machine, same numbers.
            .env("OMP_NUM_THREADS", "1");
        run(&mut cmd)
    };
    let (a, b) = (tmp.path().join("cpu"), tmp.path().join("tensor"));
    let r = crf("cpu", &a);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let r = crf("tensor-cpu", &b);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let mut ids: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 3);
    for id in &ids {
        let (la, _, _) = clipmask::outputs::read_label_png(&a.join(format!("masks/{id}.png"))).unwrap();
        let (lb, _, _) = clipmask::outputs::read_label_png(&b.join(format!("masks/{id}.png"))).unwrap();
        let ca: ndarray::Array2<f32> = ndarray_npy::read_npy(a.join(format!("confidence/{id}.npy"))).unwrap();
        let cb: ndarray::Array2<f32> = ndarray_npy::read_npy(b.join(format!("confidence/{id}.npy"))).unwrap();
        let agree = agreement(&la, &lb);
        let d = ca.iter().zip(cb.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let ignored = la.iter().filter(|&&l| l == 255).count() as f64 / la.len() as f64;
        println!(
            "{id}: masks agree on {:.4} % ({:.1} % ignored), confidence max |diff| {d:.2e}",
            100.0 * agree,
            100.0 * ignored
        );
        assert!(agree >= MIN_AGREEMENT && d <= TOL_CONFIDENCE, "{id}: masks {agree}, confidence {d}");
    }
    if !tch::Cuda::is_available() {
        let r = crf("cuda", &tmp.path().join("cuda"));
        let line = assert_one_line_error(&r, 2);
        assert!(line.contains("--crf-device cuda") && line.contains("--crf-device cpu"), "{line}");
    }
}
