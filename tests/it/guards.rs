//! What a hostile or careless user meets after the planted links (planted_links.rs): commands
//! that would overwrite their own inputs, signals under `nohup` and during tagging, argument
//! and config ranges checked before any work, strict and BOM-tolerant parsing, one id rule for
//! every command, earlier results kept by a rerun, and one-line reasons (capped, no panic text).
use crate::hostile::{failures, handlers_installed, kill, mask_ids, mkfifo, summary, wait_for, wait_output, write_npz};
use crate::support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `n` small images `g00..` with two labels each, and their labels file.
fn dataset(root: &Path, n: usize, w: u32, h: u32) -> (PathBuf, PathBuf) {
    let imgs = root.join("imgs");
    let classes = ["dog", "cat", "person", "car", "bus", "sheep"];
    let mut labels = serde_json::Map::new();
    for k in 0..n {
        save_png(&imgs, &format!("g{k:02}"), w, h, 900 + k as u64);
        labels.insert(format!("g{k:02}"), serde_json::json!([classes[k % 6], classes[(k + 1) % 6]]));
    }
    let lf = root.join("labels.json");
    std::fs::write(&lf, serde_json::to_string(&labels).unwrap()).unwrap();
    (imgs, lf)
}

fn cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = clipmask(&root.join("cache"));
    c.args(args);
    c
}

fn generate(root: &Path, imgs: &Path, labels: &Path, out: &Path) -> Command {
    let mut c = generate_cmd(&root.join("cache"), imgs, out);
    c.arg("--labels").arg(labels);
    c
}

/// Bytes of every file under `dir`.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir).into_iter().map(|p| (p.clone(), std::fs::read(dir.join(&p)).unwrap())).collect()
}

#[test]
fn crf_and_eval_report_refuse_outputs_that_would_overwrite_their_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 3, 64, 48);
    let g = root.join("g");
    let r = run(generate(root, &imgs, &labels, &g).arg("--save-cams"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    // The photos as PNGs in X/masks; crf --out X would write its masks over them.
    let x = root.join("x");
    std::fs::create_dir_all(x.join("masks")).unwrap();
    for p in files_under(&imgs) {
        std::fs::copy(imgs.join(&p), x.join("masks").join(&p)).unwrap();
    }
    let photos = contents(&x);
    let mut c = cmd(root, &["crf", "--cams"]);
    c.arg(g.join("cams")).arg("--images").arg(x.join("masks")).arg("--out").arg(&x);
    let line = assert_one_line_error(&run(&mut c), 2);
    assert!(line.contains("overwrite inputs"), "{line}");
    assert_eq!(contents(&x), photos, "crf changed its input photos");
    // eval --report R with the photos or the ground truth in R/images.
    for flag in ["--images", "--gt"] {
        let report = root.join(format!("report{flag}"));
        std::fs::create_dir_all(report.join("images")).unwrap();
        for p in files_under(&g.join("masks")) {
            std::fs::copy(g.join("masks").join(&p), report.join("images").join(&p)).unwrap();
        }
        let before = contents(&report);
        let mut c = cmd(root, &["eval", "--config", "voc12", "--pred"]);
        c.arg(g.join("masks")).arg("--report").arg(&report);
        match flag {
            "--images" => c.arg("--gt").arg(g.join("masks")).arg("--images").arg(report.join("images")),
            _ => c.arg("--gt").arg(report.join("images")).arg("--images").arg(&imgs),
        };
        let line = assert_one_line_error(&run(&mut c), 2);
        assert!(line.contains("overwrite inputs"), "{flag}: {line}");
        assert_eq!(contents(&report), before, "eval --report changed its inputs ({flag})");
    }
    // generate with OUT inside --images is refused the same way.
    let line = assert_one_line_error(&run(&mut generate(root, &imgs, &labels, &imgs.join("out"))), 2);
    assert!(line.contains("overwrite inputs"), "{line}");
}

/// Runs `f` in the child before exec (signal dispositions, resource limits).
fn with_pre_exec(c: &mut Command, f: impl Fn() + Send + Sync + 'static) {
    use std::os::unix::process::CommandExt;
    unsafe {
        c.pre_exec(move || {
            f();
            Ok(())
        });
    }
}

/// Whether signal `sig` is ignored by the process (SigIgn in /proc/<pid>/status).
fn ignores(pid: u32, sig: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let Some(mask) = status.lines().find_map(|l| l.strip_prefix("SigIgn:")) else { return false };
    u64::from_str_radix(mask.trim(), 16).unwrap_or(0) & (1 << (sig - 1)) != 0
}

/// Whether the process has handlers for SIGINT and SIGTERM.
fn catches_int_term(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let Some(mask) = status.lines().find_map(|l| l.strip_prefix("SigCgt:")) else { return false };
    let mask = u64::from_str_radix(mask.trim(), 16).unwrap_or(0);
    [2u32, 15].iter().all(|s| mask & (1 << (s - 1)) != 0)
}

#[test]
fn nohup_keeps_sighup_ignored_and_the_run_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 30, 160, 120);
    let out = root.join("out");
    let mut c = generate(root, &imgs, &labels, &out);
    c.arg("--save-cams").stdout(Stdio::null()).stderr(Stdio::piped());
    // What nohup does: SIGHUP ignored before exec.
    with_pre_exec(&mut c, || unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    });
    let child = c.spawn().unwrap();
    let pid = child.id();
    assert!(wait_for(|| catches_int_term(pid), Duration::from_secs(60)), "no INT/TERM handlers");
    assert!(ignores(pid, 1), "SIGHUP must stay ignored");
    assert!(wait_for(|| !mask_ids(&out).is_empty(), Duration::from_secs(120)), "no progress");
    kill(&child, "HUP"); // the terminal closes
    let (status, stderr) = wait_output(child, Duration::from_secs(300));
    assert_eq!(status, Some(0), "the hangup must not stop a nohup run:\n{stderr}");
    assert_eq!(summary(&stderr), (30, 30, 0), "{stderr}");
}

#[test]
fn a_first_ctrl_c_during_labels_auto_stops_within_the_image_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let n = 30;
    let (imgs, _) = dataset(root, n, 224, 168);
    let out = root.join("out");
    let mut c = cmd(root, &["generate", "--device", "cpu", "--labels", "auto"]);
    c.arg("--model").arg(tiny_model()).arg("--images").arg(&imgs).arg("--out").arg(&out);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Wait for the tagging to start (its first line), then interrupt.
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n_read = std::io::BufRead::read_line(&mut err, &mut line).unwrap();
        assert!(n_read > 0, "the run ended before tagging:\n{seen}");
        seen += &line;
        if line.contains("tagging") {
            break;
        }
    }
    let sent = Instant::now();
    kill(&child, "INT");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let waited = sent.elapsed();
    seen += &rest;
    assert_eq!(status.code(), Some(130), "{seen}");
    let labels: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("labels.json")).unwrap()).unwrap();
    eprintln!("stopped {waited:?} after SIGINT with {} of {n} images tagged", labels.len());
    assert!(labels.len() < n, "tagging went on to the end after Ctrl-C:\n{seen}");
    assert!(mask_ids(&out).is_empty(), "no mask is started after a stop during tagging");
}

#[test]
fn argument_and_config_ranges_are_checked_before_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 1, 64, 48);
    let out = root.join("out");
    for (flag, value) in [
        ("--alpha", "NaN"),
        ("--alpha", "-1"),
        ("--alpha", "inf"),
        ("--box-threshold", "NaN"),
        ("--box-threshold", "-0.5"),
        ("--box-threshold", "1"),
        ("--max-pixels", "1152921504606846976"),
    ] {
        let t = Instant::now();
        let r = run(generate(root, &imgs, &labels, &out).arg(format!("{flag}={value}")));
        assert_eq!(r.code, Some(2), "{flag} {value}\n{}", r.show());
        assert!(r.stderr.contains(flag), "{flag} {value}: the error names the flag\n{}", r.show());
        assert!(t.elapsed() < Duration::from_secs(20), "{flag} {value}: checked before the work");
    }
    // CRF parameters in a config: refused when the config is read, for generate and crf.
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root_config("voc12")).unwrap()).unwrap();
    for (key, value) in [
        ("gaussian_sxy", serde_json::json!(0.0)),
        ("gaussian_sxy", serde_json::json!(-3.0)),
        ("bilateral_srgb", serde_json::json!(0.0)),
        ("gaussian_weight", serde_json::json!(-1.0)),
        ("iterations", serde_json::json!(1_000_000_000u64)),
    ] {
        let mut cfg = base.clone();
        let mut crf = serde_json::to_value(clipmask::crf::CrfParams::default()).unwrap();
        crf[key] = value.clone();
        cfg["crf"] = crf;
        let path = root.join(format!("cfg-{key}.json"));
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let r = run(generate(root, &imgs, &labels, &out).arg("--crf").arg("--config").arg(&path));
        let line = assert_one_line_error(&r, 2);
        assert!(line.contains(key), "crf.{key} = {value}: {line}");
    }
}

fn root_config(name: &str) -> PathBuf {
    root().join("configs").join(format!("{name}.json"))
}

#[test]
fn the_crf_stops_between_iterations_on_a_signal() {
    // 1000 iterations (the most accepted) on a 640x480 image take far longer than the wait.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 2, 640, 480);
    let g = root.join("g");
    assert_eq!(run(generate(root, &imgs, &labels, &g).arg("--save-cams")).code, Some(0));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root_config("voc12")).unwrap()).unwrap();
    let mut crf = serde_json::to_value(clipmask::crf::CrfParams::default()).unwrap();
    crf["iterations"] = serde_json::json!(1000);
    cfg["crf"] = crf;
    let cfg_path = root.join("slow.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = root.join("out");
    let mut c = cmd(root, &["crf", "--cams"]);
    c.arg(g.join("cams")).arg("--images").arg(&imgs).arg("--out").arg(&out).arg("--config").arg(&cfg_path);
    let child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    assert!(wait_for(|| handlers_installed(&child), Duration::from_secs(60)), "no signal handlers");
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    kill(&child, "TERM");
    let (status, stderr) = wait_output(child, Duration::from_secs(60));
    eprintln!("crf stopped {:?} after SIGTERM", sent.elapsed());
    assert_eq!(status, Some(143), "{stderr}");
    assert!(sent.elapsed() < Duration::from_secs(10), "the CRF ignored SIGTERM for {:?}", sent.elapsed());
    assert!(!out.join("failures.jsonl").exists(), "a stopped CRF is not a failure:\n{stderr}");
}

#[test]
fn eval_cams_validates_archives_as_crf_does() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (w, h) = (8usize, 6usize);
    let gt = root.join("gt");
    std::fs::create_dir_all(&gt).unwrap();
    clipmask::outputs::write_label_png(&gt.join("x.png"), &vec![0u8; w * h], w as u32, h as u32, None).unwrap();
    let good = ndarray::Array3::<f32>::from_elem((1, h, w), 0.5);
    let cases: Vec<(&str, Vec<i64>, ndarray::Array3<f32>, &str)> = vec![
        ("nan", vec![0], good.mapv(|_| f32::NAN), "non-finite"),
        ("inf", vec![0], good.mapv(|_| f32::INFINITY), "non-finite"),
        ("range", vec![0], good.mapv(|_| 3.0), "outside [0, 1]"),
        ("dup", vec![1, 1], ndarray::Array3::from_elem((2, h, w), 0.5), "twice"),
        ("empty", vec![], ndarray::Array3::zeros((0, h, w)), "no keys"),
    ];
    for (name, keys, maps, word) in cases {
        let cams = root.join(format!("cams-{name}"));
        std::fs::create_dir_all(&cams).unwrap();
        write_npz(&cams.join("x.npz"), &keys, &maps);
        let mut c = cmd(root, &["eval", "--config", "voc12", "--cams"]);
        c.arg(&cams).arg("--gt").arg(&gt);
        let line = assert_one_line_error(&run(&mut c), 2);
        assert!(line.contains(word) && line.contains("x.npz"), "{name}: {line}");
    }
}

fn tag(root: &Path, imgs: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut c = cmd(root, &["tag", "--device", "cpu"]);
    c.arg("--model").arg(tiny_model()).arg("--images").arg(imgs).arg("--out").arg(out).args(extra);
    run(&mut c)
}

#[test]
fn a_tag_rerun_on_part_of_the_images_keeps_the_other_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, _) = dataset(root, 6, 96, 64);
    let out = root.join("t/labels.json");
    let r = tag(root, &imgs, &out, &[]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let first: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(first.len(), 6);
    // What an interrupted rerun does: it reaches only some ids.
    let split = root.join("two.txt");
    std::fs::write(&split, "g01\ng04\n").unwrap();
    let r = tag(root, &imgs, &out, &["--split", split.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let second: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(second, first, "the rerun lost or changed labels");
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("t/labels.scores.json")).unwrap()).unwrap();
    assert_eq!(scores["scores"].as_object().unwrap().len(), 6);
}

#[test]
fn outputs_that_are_directories_fail_before_the_work_and_leave_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 3, 64, 48);
    // tag --out DIR: refused at once, nothing written beside it.
    let dir = root.join("labels-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let line = assert_one_line_error(&tag(root, &imgs, &dir, &[]), 2);
    assert!(line.contains("directory"), "{line}");
    assert!(t.elapsed() < Duration::from_secs(20), "refused only after {:?}", t.elapsed());
    assert!(!root.join("labels-dir.scores.json").exists());
    // A directory at one mask's name: that image fails, no temporary file is left.
    let out = root.join("out");
    std::fs::create_dir_all(out.join("masks/g01.png")).unwrap();
    let r = run(&mut generate(root, &imgs, &labels, &out));
    assert_eq!(r.code, Some(1), "{}", r.show());
    let f = failures(&out);
    assert!(f["g01"].1.contains("directory"), "{f:?}");
    let temps: Vec<PathBuf> = files_under(&out).into_iter().filter(|p| is_temp_name(p)).collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn devices_and_fifos_as_model_files_fail_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 1, 64, 48);
    let fifo = root.join("model.safetensors");
    mkfifo(&fifo);
    // A local model reads the config.json beside it: a FIFO there must not block either.
    let beside = root.join("beside");
    std::fs::create_dir_all(&beside).unwrap();
    std::fs::copy(tiny_model(), beside.join("model.safetensors")).unwrap();
    mkfifo(&beside.join("config.json"));
    for (what, model) in [
        ("/dev/zero", PathBuf::from("/dev/zero")),
        ("/dev/urandom", PathBuf::from("/dev/urandom")),
        ("fifo", fifo.clone()),
        ("fifo config.json", beside.join("model.safetensors")),
    ] {
        for sub in [&["classify"][..], &["generate"][..]] {
            let mut c = cmd(root, sub);
            c.args(["--device", "cpu", "--model"]).arg(&model);
            if sub[0] == "generate" {
                c.arg("--images").arg(&imgs).arg("--labels").arg(&labels).arg("--out").arg(root.join("out"));
            } else {
                c.arg(imgs.join("g00.png"));
            }
            let child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
            let (status, stderr) = wait_output(child, Duration::from_secs(30));
            assert_eq!(status, Some(2), "{what} ({}): {stderr}", sub[0]);
            assert!(stderr.contains("only regular files"), "{what} ({}): {stderr}", sub[0]);
        }
    }
}

#[test]
fn a_zero_size_weight_is_refused_at_load_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = read_safetensors(&tiny_model());
    let width = tensors["visual.proj"].size()[0];
    tensors.insert("visual.proj".into(), tch::Tensor::zeros([width, 0], (tch::Kind::Float, tch::Device::Cpu)));
    let named: Vec<(String, tch::Tensor)> = tensors.into_iter().collect();
    let path = tmp.path().join("zero.safetensors");
    tch::Tensor::write_safetensors(&named, &path).unwrap();
    let img = save_png(&tmp.path().join("imgs"), "x", 64, 48, 1);
    let mut c = cmd(tmp.path(), &["classify", "--device", "cpu", "--model"]);
    c.arg(&path).arg(&img);
    let line = assert_one_line_error(&run(&mut c), 2);
    assert!(line.contains("visual.proj"), "{line}");
}

#[test]
fn libtorch_errors_and_panics_become_one_line_reasons() {
    use clipmask::errors::one_line_reason;
    let trace: String = (0..36).map(|i| format!("frame #{i}: at::native::something() + 0x{i:x}\\n")).collect();
    let tch_panic = format!(
        "called `Result::unwrap()` on an `Err` value: Torch(\"shape '[2, 3]' is invalid for input of size 5\\nException \
         raised from view at aten/src/ATen/native/TensorShape.cpp:1234 (most recent call first):\\n{trace}\")"
    );
    assert!(tch_panic.len() > 1500);
    let r = one_line_reason(&tch_panic);
    assert_eq!(r, "shape '[2, 3]' is invalid for input of size 5");
    let oom = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 20.00 GiB \
               (GPU 0; 139.8 GiB total capacity)\\nException raised from malloc\")";
    let r = one_line_reason(oom);
    assert!(r.starts_with("out of GPU memory") && r.contains("--batch-size") && !r.contains("Exception"), "{r}");
    assert!(one_line_reason("attempt to divide by zero").contains("internal error"));
    // Anything long is capped.
    let long = "x".repeat(50_000);
    assert!(one_line_reason(&long).len() <= 1100);
}

#[test]
fn one_id_rule_for_tag_and_generate_and_collisions_name_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let imgs = root.join("imgs");
    save_png(&imgs, "fine", 64, 48, 1);
    let long = "l".repeat(240);
    for name in [".hidden", "new\nline", long.as_str()] {
        save_png(&imgs, name, 64, 48, 2);
    }
    let out = root.join("labels.json");
    let r = tag(root, &imgs, &out, &[]);
    assert_eq!(r.code, Some(1), "{}", r.show());
    let labels: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(labels.keys().collect::<Vec<_>>(), ["fine"], "tag must refuse the ids generate refuses");
    let f = std::fs::read_to_string(root.join("labels.failures.jsonl")).unwrap();
    assert_eq!(f.lines().count(), 3, "{f}");
    assert!(f.lines().all(|l| l.contains("\"stage\":\"tag\"")), "{f}");
    // x.jpg and x.JPG: an error naming both, in tag and in generate.
    let both = root.join("both");
    let img = synthetic_image(64, 48, 3);
    std::fs::create_dir_all(&both).unwrap();
    img.save(both.join("x.jpg")).unwrap();
    img.save_with_format(both.join("x.JPG"), image::ImageFormat::Jpeg).unwrap();
    let line = assert_one_line_error(&tag(root, &both, &root.join("b.json"), &[]), 2);
    assert!(line.contains("x.jpg") && line.contains("x.JPG"), "{line}");
    let lf = root.join("x-labels.json");
    std::fs::write(&lf, r#"{"x": ["dog"]}"#).unwrap();
    let out = root.join("out");
    let r = run(&mut generate(root, &both, &lf, &out));
    assert_eq!(r.code, Some(1), "{}", r.show());
    let reason = &failures(&out)["x"].1;
    assert!(reason.contains("x.jpg") && reason.contains("x.JPG"), "{reason}");
}

#[test]
fn duplicates_are_errors_and_byte_order_marks_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, _) = dataset(root, 2, 64, 48);
    let out = root.join("out");
    // A key given twice in labels JSON, and an id twice in text labels.
    let dup = root.join("dup.json");
    std::fs::write(&dup, r#"{"g00": ["dog"], "g01": ["cat"], "g00": ["person"]}"#).unwrap();
    let line = assert_one_line_error(&run(&mut generate(root, &imgs, &dup, &out)), 2);
    assert!(line.contains("g00") && line.contains("twice"), "{line}");
    let dup_txt = root.join("dup.txt");
    std::fs::write(&dup_txt, "g00\tdog\ng00\tcat\n").unwrap();
    let line = assert_one_line_error(&run(&mut generate(root, &imgs, &dup_txt, &out)), 2);
    assert!(line.contains("g00") && line.contains("twice"), "{line}");
    // BOMs in the labels JSON, the split file and a config.
    let bom = root.join("bom.json");
    std::fs::write(&bom, "\u{feff}{\"g00\": [\"dog\"], \"g01\": [\"cat\"]}").unwrap();
    let split = root.join("split.txt");
    std::fs::write(&split, "\u{feff}g00\ng01\n").unwrap();
    let cfg = root.join("cfg.json");
    std::fs::write(&cfg, format!("\u{feff}{}", std::fs::read_to_string(root_config("voc12")).unwrap())).unwrap();
    let r = run(generate(root, &imgs, &bom, &out).arg("--split").arg(&split).arg("--config").arg(&cfg));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(mask_ids(&out).len(), 2);
    // COCO: a/x.jpg and b/x.jpg would write one x.png.
    let coco = root.join("instances.json");
    let categories: Vec<serde_json::Value> =
        (1..=20).map(|i| serde_json::json!({"id": i, "name": format!("c{i}")})).collect();
    std::fs::write(
        &coco,
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "b/x.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 2}],
            "categories": categories,
        })
        .to_string(),
    )
    .unwrap();
    let mut c = cmd(root, &["generate", "--device", "cpu"]);
    c.arg("--model").arg(tiny_model()).arg("--images").arg(&imgs).arg("--coco").arg(&coco).arg("--out").arg(&out);
    let line = assert_one_line_error(&run(&mut c), 2);
    assert!(line.contains("a/x.jpg") && line.contains("b/x.jpg"), "{line}");
}

#[test]
fn labels_auto_on_an_empty_directory_exits_2_like_tag() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut c = cmd(root, &["generate", "--device", "cpu", "--labels", "auto"]);
    c.arg("--model").arg(tiny_model()).arg("--images").arg(&empty).arg("--out").arg(root.join("out"));
    let line = assert_one_line_error(&run(&mut c), 2);
    assert!(line.contains("no images"), "{line}");
    let line = assert_one_line_error(&tag(root, &empty, &root.join("l.json"), &[]), 2);
    assert!(line.contains("no images"), "{line}");
}

#[test]
fn a_huge_class_name_is_capped_in_failures_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, _) = dataset(root, 1, 64, 48);
    let lf = root.join("labels.json");
    std::fs::write(&lf, serde_json::json!({"g00": ["z".repeat(2_000_000)]}).to_string()).unwrap();
    let out = root.join("out");
    let r = run(&mut generate(root, &imgs, &lf, &out));
    assert_eq!(r.code, Some(1), "{}", r.show());
    let text = std::fs::read_to_string(out.join("failures.jsonl")).unwrap();
    assert!(text.len() < 2048, "failures.jsonl holds {} bytes", text.len());
    assert!(failures(&out)["g00"].1.contains("bytes cut"));
}

/// Peak resident memory (KiB) of a child run to completion. The child is reaped by `wait4`
/// (which also returns its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_measured(c: &mut Command) -> (Option<i32>, i64, Duration) {
    let t = Instant::now();
    let child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, usage.ru_maxrss, t.elapsed())
}

#[test]
fn a_large_labels_file_is_streamed_for_the_split_ids_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, small) = dataset(root, 1, 64, 48);
    // 1,000,000 ids (about 40 MB of JSON); the split asks for one.
    let big = root.join("big.json");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        write!(f, "{{\"g00\": [\"dog\", \"cat\"]").unwrap();
        for k in 0..1_000_000 {
            write!(f, ", \"img_{k:08}\": [\"person\", \"car\", \"dog\"]").unwrap();
        }
        write!(f, "}}").unwrap();
    }
    let split = root.join("one.txt");
    std::fs::write(&split, "g00\n").unwrap();
    let (code, small_kib, _) = run_measured(generate(root, &imgs, &small, &root.join("a")).arg("--split").arg(&split));
    assert_eq!(code, Some(0));
    let (code, big_kib, took) = run_measured(generate(root, &imgs, &big, &root.join("b")).arg("--split").arg(&split));
    assert_eq!(code, Some(0));
    let extra_mib = (big_kib - small_kib) as f64 / 1024.0;
    eprintln!(
        "peak RSS {small_kib} KiB with a 1-id labels file, {big_kib} KiB with 1M ids (+{extra_mib:.1} MiB), {took:?}"
    );
    assert!(extra_mib < 40.0, "memory grew by {extra_mib:.1} MiB for labels the split does not ask for");
    assert!(took < Duration::from_secs(120), "took {took:?}");
}

#[test]
fn prompts_rank_with_an_empty_templates_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 2, 64, 48);
    let empty = root.join("empty.txt");
    std::fs::write(&empty, "# only a comment\n\n").unwrap();
    let mut c = cmd(root, &["prompts", "rank", "--device", "cpu", "--model"]);
    c.arg(tiny_model()).arg("--images").arg(&imgs).arg("--labels").arg(&labels).arg("--templates").arg(&empty);
    let line = assert_one_line_error(&run(&mut c), 2);
    assert!(line.contains("no template"), "{line}");
}

#[test]
fn a_full_disk_is_one_failure_per_image_without_zip_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root, 3, 320, 240);
    let out = root.join("out");
    let mut c = generate(root, &imgs, &labels, &out);
    c.arg("--save-cams");
    // Files larger than 64 KiB cannot be written (EFBIG, as on a full disk): each archive fails.
    with_pre_exec(&mut c, || unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
        libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
    });
    let r = run(&mut c);
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(!r.stderr.contains("ZipWriter"), "{}", r.show());
    let f = failures(&out);
    assert_eq!(f.len(), 3, "{f:?}");
    for (id, (_, reason)) in &f {
        assert!(reason.contains(&format!("{id}.npz")), "{id}: {reason}");
    }
}
