//! The README's commands run as written: the fenced `sh` blocks under "Reproducing the paper" and
//! "Map sources, test-time augmentation, runs side by side" are taken from README.md itself and
//! run by bash on a miniature VOC tree (JPEGImages, Annotations, ImageSets/Segmentation/train.txt,
//! and SegmentationClass with more ground truth than train lists, as VOC2012 has), with the
//! test binary for `clipmask`, the tiny test model for ViT-B/16 and the tree for VOC2012. Each
//! command must exit 0 and each `eval` must print the mIoU of the NumPy reference
//! (tests/python/eval_reference.py) on exactly the predicted ids, so the docs cannot drift from
//! the code.
use crate::support::*;
use std::path::{Path, PathBuf};

/// The first fenced `sh` block after the heading that contains `title`.
fn sh_block(readme: &str, title: &str) -> String {
    let mut lines = readme.lines().skip_while(|l| !(l.starts_with('#') && l.contains(title)));
    assert!(lines.next().is_some(), "README.md has no heading {title:?}");
    let mut block = Vec::new();
    let mut inside = false;
    for l in lines {
        if !inside && l.starts_with('#') {
            break;
        }
        if l.trim_start().starts_with("```") {
            if inside {
                return block.join("\n");
            }
            inside = l.trim() == "```sh";
            continue;
        }
        if inside {
            block.push(l);
        }
    }
    panic!("no ```sh block under the heading {title:?} of README.md");
}

/// Shell commands of a block: lines ending in a backslash joined, blank and comment lines
/// dropped (a comment after a command stays: bash ignores it).
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for l in block.lines() {
        if cur.is_empty() && (l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        match l.strip_suffix('\\') {
            Some(head) => cur.push_str(head),
            None => {
                cur.push_str(l);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    assert!(cur.is_empty(), "a command ends in a backslash: {cur}");
    out
}

/// `s` quoted for bash.
fn quote(s: &Path) -> String {
    format!("'{}'", s.display().to_string().replace('\'', r"'\''"))
}

/// The classes of each image of the tree: (id, [(class name, class id)]).
const IMAGES: [(&str, &[(&str, u8)]); 5] = [
    ("2007_000032", &[("aeroplane", 1), ("person", 15)]),
    ("2007_000039", &[("tvmonitor", 20)]),
    ("2007_000063", &[("dog", 12), ("chair", 9)]),
    ("2007_000068", &[("bird", 3)]),
    ("2007_000121", &[("bus", 6), ("car", 7)]),
];
/// The ids of train.txt: ground truth has two more.
const TRAIN: [&str; 3] = ["2007_000032", "2007_000063", "2007_000121"];
/// The ids of val.txt.
const VAL: [&str; 2] = ["2007_000039", "2007_000068"];

/// `dir/VOC2012` in VOC's layout: photos (JPEG), XML annotations, train and val splits and palette
/// ground truth for every image (a band of each class, background elsewhere, a 255 border).
fn voc_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("VOC2012");
    let palette = voc().png_palette();
    for sub in ["JPEGImages", "Annotations", "ImageSets/Segmentation", "SegmentationClass"] {
        std::fs::create_dir_all(tree.join(sub)).unwrap();
    }
    for (i, (id, classes)) in IMAGES.iter().enumerate() {
        let (w, h) = (96 + 8 * i as u32, 72);
        synthetic_image(w, h, 500 + i as u64).save(tree.join(format!("JPEGImages/{id}.jpg"))).unwrap();
        let objects: String = classes.iter().map(|(n, _)| format!("<object><name>{n}</name></object>")).collect();
        std::fs::write(tree.join(format!("Annotations/{id}.xml")), format!("<annotation>{objects}</annotation>"))
            .unwrap();
        let mut px = vec![0u8; (w * h) as usize];
        for (k, &(_, class)) in classes.iter().enumerate() {
            for y in 10..60 {
                for x in (10 + 40 * k as u32)..(40 + 40 * k as u32).min(w) {
                    px[(y * w + x) as usize] = class;
                }
            }
        }
        for x in 0..w {
            px[x as usize] = 255;
        }
        clipmask::outputs::write_label_png(
            &tree.join(format!("SegmentationClass/{id}.png")),
            &px,
            w,
            h,
            Some(&palette),
        )
        .unwrap();
    }
    std::fs::write(tree.join("ImageSets/Segmentation/train.txt"), TRAIN.join("\n") + "\n").unwrap();
    std::fs::write(tree.join("ImageSets/Segmentation/val.txt"), VAL.join("\n") + "\n").unwrap();
    tree
}

/// A directory holding `clipmask`, a link to the binary under test, to put first on PATH.
fn bin_dir(dir: &Path) -> PathBuf {
    let d = dir.join("bin");
    std::fs::create_dir_all(&d).unwrap();
    std::os::unix::fs::symlink(bin(), d.join("clipmask")).unwrap();
    d
}

/// Runs one command with bash in `work`, `clipmask` from `bin`, the cache at `cache`.
fn bash(cmd: &str, work: &Path, bin: &Path, cache: &Path) -> Run {
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    run(std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", cmd])
        .current_dir(work)
        .env("PATH", path)
        .env("CLIPMASK_CACHE", cache)
        .env_remove("CLIPMASK_MODEL_BASE_URL")
        .env_remove("RUST_BACKTRACE"))
}

/// The mIoU line of eval's table, in percent.
fn printed_miou(stdout: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with("mIoU ")).unwrap_or_else(|| panic!("no mIoU line:\n{stdout}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number in {line:?}"))
}

/// The NumPy reference's mIoU (percent) for `args` on the train ids (`ids`).
fn reference_miou(mode: &str, args: &[&str], ids: &Path) -> f64 {
    let out = python_cmd()
        .arg(root().join("tests/python/eval_reference.py"))
        .arg(mode)
        .args(args)
        .arg("--ids")
        .arg(ids)
        .args(["--n", "21"])
        .output()
        .unwrap();
    assert!(out.status.success(), "eval_reference.py: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let miou = if mode == "cams" {
        let best = v["best_alpha"].as_f64().unwrap();
        v["alphas"].as_array().unwrap().iter().find(|a| a["alpha"].as_f64() == Some(best)).unwrap()["miou"].clone()
    } else {
        v["miou"].clone()
    };
    miou.as_f64().unwrap() * 100.0
}

/// The value a flag has in a command (`--cams out/train/cams` -> "out/train/cams").
fn flag<'a>(cmd: &'a str, name: &str) -> &'a str {
    let mut words = cmd.split_whitespace();
    words.find(|w| *w == name).and_then(|_| words.next()).unwrap_or_else(|| panic!("{name} missing from {cmd}"))
}

#[test]
fn reproducing_the_paper_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let cmds = commands(&sh_block(&readme, "Reproducing the paper"));
    assert!(cmds.len() >= 4, "{cmds:?}");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let voc = voc_tree(&data);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let bin = bin_dir(tmp.path());
    let model = tiny_model();
    let (mut evals, mut generated) = (0, false);
    for cmd in &cmds {
        assert!(cmd.starts_with("clipmask "), "not a clipmask command: {cmd}");
        assert!(cmd.contains("VOC2012/"), "the commands work on a VOC tree: {cmd}");
        // ViT-B/16 -> the test model; the relative VOC2012/ -> the tree (elsewhere than the
        // working directory, so that a command that did not use the prefix would fail).
        let written = cmd
            .replace("--model ViT-B/16", &format!("--model {}", quote(&model)))
            .replace(" VOC2012/", &format!(" {}/", quote(&voc)));
        let r = bash(&written, &work, &bin, &tmp.path().join("cache"));
        assert_eq!(r.code, Some(0), "README command failed: {cmd}\n{}", r.show());
        if cmd.starts_with("clipmask generate") {
            generated = true;
            let masks = work.join(flag(cmd, "--out")).join("masks");
            let mut made: Vec<String> = std::fs::read_dir(&masks)
                .unwrap()
                .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
                .collect();
            made.sort();
            assert_eq!(made, TRAIN, "generate makes masks for the split's images only");
        }
        if cmd.starts_with("clipmask eval") {
            evals += 1;
            // Ground truth for 5 images, predictions for the 3 of train: those 3 are scored.
            assert!(r.stdout.contains("images             3 evaluated, 0 skipped"), "{cmd}\n{}", r.stdout);
            assert!(r.stderr.contains("2 of the 5 ground-truth ids"), "{cmd}\n{}", r.stderr);
            let gt = voc.join("SegmentationClass");
            let ids = voc.join("ImageSets/Segmentation/train.txt");
            let expected = if cmd.contains("--cams") {
                let cams = work.join(flag(cmd, "--cams"));
                let alphas = flag(cmd, "--alpha");
                let args = ["--cams", cams.to_str().unwrap(), "--gt", gt.to_str().unwrap(), "--alphas", alphas];
                reference_miou("cams", &args, &ids)
            } else {
                let pred = work.join(flag(cmd, "--pred"));
                reference_miou("labels", &["--pred", pred.to_str().unwrap(), "--gt", gt.to_str().unwrap()], &ids)
            };
            let printed = printed_miou(&r.stdout);
            eprintln!("{cmd}\n  mIoU {printed} (NumPy reference {expected:.4})");
            assert!((printed - expected).abs() <= 0.0051, "{cmd}: printed mIoU {printed}, reference {expected:.4}");
        }
    }
    assert!(generated && evals >= 2, "the section generates and evaluates: {cmds:?}");
}

#[test]
fn the_comparison_example_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = sh_block(&readme, "Map sources, test-time augmentation");
    let model = tiny_model();
    let tmp = tempfile::tempdir().unwrap();
    let voc = voc_tree(&tmp.path().join("data"));
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // M and V are the block's own assignments: M must name the model file (from the repository
    // root, where the README says to run it), V is pointed at the tree.
    let mut script = String::new();
    let mut assigned = Vec::new();
    for line in block.lines() {
        let var = line.split_once('=').map(|(k, _)| k).filter(|k| ["M", "V"].contains(k));
        match var {
            Some("M") => {
                let value = line["M=".len()..].split_whitespace().next().unwrap();
                assert_eq!(root().join(value), model, "README's M is the test model's file");
                script += &format!("M={}\n", quote(&model));
                assigned.push("M");
            }
            Some(_) => {
                script += &format!("V={}\n", quote(&voc));
                assigned.push("V");
            }
            None => script += &format!("{line}\n"),
        }
    }
    assert_eq!(assigned, ["M", "V"], "the block sets M and V:\n{block}");
    let bin = bin_dir(tmp.path());
    let r = bash(&script, &work, &bin, &tmp.path().join("cache"));
    assert_eq!(r.code, Some(0), "README comparison example failed:\n{script}\n{}", r.show());
    // Six runs compared on the split's images, and the report written.
    let rows = r.stdout.lines().filter(|l| l.trim_end().ends_with("/masks")).count();
    assert_eq!(rows, 6, "{}", r.stdout);
    assert!(r.stdout.contains("images             2 evaluated, 0 skipped"), "{}", r.stdout);
    assert!(work.join("ex/report/index.html").is_file());
}
