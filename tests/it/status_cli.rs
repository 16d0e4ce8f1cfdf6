//! `clipmask status` finds every gap a run can leave (a deleted mask, a truncated archive, a
//! stale temporary file, a failed id), its `--missing` file is the split of the rerun that
//! completes the run, and `crf` and `tag` shard like `generate`: their shards' union is the
//! unsharded run.
use crate::support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn dataset(root: &Path) -> (PathBuf, PathBuf) {
    let imgs = root.join("imgs");
    let mut labels = serde_json::Map::new();
    for (k, l) in
        [["dog", "cat"], ["person", "car"], ["bus", "sheep"], ["unicorn", "dog"], ["cat", "sofa"], ["car", "bus"]]
            .iter()
            .enumerate()
    {
        save_png(&imgs, &format!("s{k}"), 96, 64, 70 + k as u64);
        labels.insert(format!("s{k}"), serde_json::json!(l));
    }
    let lf = root.join("labels.json");
    std::fs::write(&lf, serde_json::to_string(&labels).unwrap()).unwrap();
    (imgs, lf)
}

fn status(root: &Path, imgs: &Path, labels: &Path, out: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut c = clipmask(&root.join("cache"));
    c.arg("status").arg(out).arg("--images").arg(imgs).arg("--labels").arg(labels).arg("--json").args(extra);
    let r = run(&mut c);
    crate::json_schemas::assert_valid("status", &r.stdout);
    (r.code, serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}\n{}", r.show())))
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir).into_iter().map(|p| (p.clone(), std::fs::read(dir.join(&p)).unwrap())).collect()
}

#[test]
fn status_finds_every_gap_and_its_missing_file_completes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (imgs, labels) = dataset(root);
    let out = root.join("out");
    let r = run(generate_cmd(&root.join("cache"), &imgs, &out).arg("--labels").arg(&labels).arg("--save-cams"));
    assert_eq!(r.code, Some(1), "s3 has an unknown class\n{}", r.show());
    let complete = files(&out);
    // The archives name their classes (label order), as numpy reads them.
    let o = python_cmd()
        .args(["-c", "import numpy as np, sys; z = np.load(sys.argv[1]); print(z['class_names'].dtype.kind, z['class_names'].tolist(), z['keys'].tolist())"])
        .arg(out.join("cams/s4.npz"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "U ['cat', 'sofa'] [7, 17]",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (code, v) = status(root, &imgs, &labels, &out, &[]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!((v["done"].as_u64(), v["complete"].as_bool()), (Some(5), Some(true)), "{v:#}");
    assert_eq!(v["failed"][0]["id"], "s3");
    assert!(v["failed"][0]["reason"].as_str().unwrap().contains("unicorn"), "{v:#}");

    // The gaps: a deleted mask, a truncated archive, a stale temporary file of a dead process.
    std::fs::remove_file(out.join("masks/s0.png")).unwrap();
    let npz = out.join("cams/s1.npz");
    let bytes = std::fs::read(&npz).unwrap();
    std::fs::write(&npz, &bytes[..bytes.len() / 2]).unwrap();
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    std::fs::write(out.join(format!("masks/.s2.png.tmp-{dead}-abcdef12")), b"partial").unwrap();
    let missing_file = root.join("rerun.txt");
    let (code, v) = status(root, &imgs, &labels, &out, &["--missing", missing_file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(strings(&v["missing"]), ["s0", "s1"], "{v:#}");
    assert!(v["incomplete"]["s1"].as_str().unwrap().contains("s1.npz"), "the truncated archive is named: {v:#}");
    assert!(v["incomplete"]["s0"].as_str().unwrap().contains("no mask"), "{v:#}");
    assert_eq!(v["failed"].as_array().unwrap().len(), 1);
    assert_eq!(v["stale_temp_files"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["done"].as_u64(), Some(3));
    assert_eq!(std::fs::read_to_string(&missing_file).unwrap(), "s0\ns1\n");

    // The rerun of the missing ids completes the run, byte for byte.
    let r = run(generate_cmd(&root.join("cache"), &imgs, &out)
        .arg("--labels")
        .arg(&labels)
        .arg("--save-cams")
        .arg("--overwrite")
        .arg("--split")
        .arg(&missing_file));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let (code, v) = status(root, &imgs, &labels, &out, &[]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["stale_temp_files"].as_array().unwrap().len(), 0, "the rerun swept the stale file");
    assert_eq!(files(&out), complete, "the completed run differs from the first complete one");
}

#[test]
fn crf_and_tag_shards_together_equal_the_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cache = root.join("cache");
    let (imgs, labels) = dataset(root);
    let g = root.join("g");
    let r = run(generate_cmd(&cache, &imgs, &g).arg("--labels").arg(&labels).arg("--save-cams"));
    assert_eq!(r.code, Some(1), "{}", r.show());
    let crf = |out: &Path, shard: Option<&str>| {
        let mut c = clipmask(&cache);
        c.arg("crf").arg("--cams").arg(g.join("cams")).arg("--images").arg(&imgs).arg("--out").arg(out);
        if let Some(s) = shard {
            c.args(["--shard", s]);
        }
        let r = run(&mut c);
        assert_eq!(r.code, Some(0), "{}", r.show());
        r
    };
    crf(&root.join("crf-all"), None);
    let r0 = crf(&root.join("crf-sharded"), Some("0/2"));
    crf(&root.join("crf-sharded"), Some("1/2"));
    assert!(r0.stderr.contains("shard 0/2"), "{}", r0.show());
    assert_eq!(files(&root.join("crf-all/masks")), files(&root.join("crf-sharded/masks")));
    assert!(!files(&root.join("crf-all/masks")).is_empty());
    // A rerun of crf skips what is complete, like generate; --overwrite redoes it.
    let mask = root.join("crf-all/masks/s0.png");
    let before = std::fs::metadata(&mask).unwrap().modified().unwrap();
    let r = crf(&root.join("crf-all"), None);
    assert!(r.stderr.contains("5 images: 0 done, 5 skipped"), "{}", r.show());
    assert_eq!(std::fs::metadata(&mask).unwrap().modified().unwrap(), before, "a complete id is not rewritten");
    let mut c = clipmask(&cache);
    c.arg("crf").arg("--cams").arg(g.join("cams")).arg("--images").arg(&imgs).arg("--out").arg(root.join("crf-all"));
    let r = run(c.arg("--overwrite"));
    assert!(r.stderr.contains("5 images: 5 done, 0 skipped"), "{}", r.show());

    let tag = |out: &Path, shard: Option<&str>| {
        let mut c = clipmask(&cache);
        c.args(["tag", "--device", "cpu", "--model"])
            .arg(tiny_model())
            .arg("--images")
            .arg(&imgs)
            .arg("--out")
            .arg(out);
        if let Some(s) = shard {
            c.args(["--shard", s]);
        }
        let r = run(&mut c);
        assert_eq!(r.code, Some(0), "{}", r.show());
    };
    tag(&root.join("tag-all/labels.json"), None);
    tag(&root.join("tag-sharded/labels.json"), Some("0/2"));
    tag(&root.join("tag-sharded/labels.json"), Some("1/2"));
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(p)).unwrap()).unwrap()
    };
    assert_eq!(read("tag-sharded/labels.json"), read("tag-all/labels.json"), "the shards' merged labels");
    assert_eq!(read("tag-sharded/labels.json").as_object().unwrap().len(), 6);
    assert_eq!(read("tag-sharded/labels.scores.json")["scores"], read("tag-all/labels.scores.json")["scores"]);
}
