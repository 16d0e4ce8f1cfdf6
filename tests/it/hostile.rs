//! Hostile but realistic input. Ids that try to leave OUT, images whose headers lie
//! about their size, signals that clusters send, FIFOs and devices among the images, corrupt
//! `.npz` maps for `clipmask crf`, and the smaller items (eval's mismatch message, --max-side,
//! palettes, .gif, label normalisation, OUT/masks as a file).
use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `clipmask generate --device cpu --model <tiny> --images imgs --out out` plus `extra`.
fn generate(tmp: &Path, imgs: &Path, out: &Path) -> Command {
    generate_cmd(&tmp.join("cache"), imgs, out)
}

/// The summary line "N images: D done, S skipped ..., F failed ..." as (N, D, F).
pub(crate) fn summary(stderr: &str) -> (usize, usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.contains(" images: ") && l.contains(" done, "))
        .unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    let count = |word: &str| -> usize {
        line.split([',', ':'])
            .find_map(|part| {
                let t: Vec<&str> = part.split_whitespace().collect();
                (t.len() >= 2 && t[1] == word).then(|| t[0].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {word:?} count in {line:?}"))
    };
    (count("images"), count("done"), count("failed"))
}

pub(crate) fn failures(out: &Path) -> BTreeMap<String, (String, String)> {
    let Ok(text) = std::fs::read_to_string(out.join("failures.jsonl")) else { return BTreeMap::new() };
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad failures.jsonl line {l:?}: {e}"));
            (
                v["id"].as_str().unwrap().to_string(),
                (v["path"].as_str().unwrap().to_string(), v["reason"].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

/// Ids with a mask (temporary names excluded).
pub(crate) fn mask_ids(out: &Path) -> BTreeSet<String> {
    let Ok(rd) = std::fs::read_dir(out.join("masks")) else { return BTreeSet::new() };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .map(|n| n.trim_end_matches(".png").to_string())
        .collect()
}

/// Every file and directory under `root` except the subtrees in `skip`: relative path ->
/// bytes (directories map to None). Symlinks are recorded, not followed.
fn tree(root: &Path, skip: &[PathBuf]) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(root: &Path, d: &Path, skip: &[PathBuf], out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if skip.contains(&p) {
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.insert(rel, None);
                walk(root, &p, skip, out);
            } else if ft.is_file() {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            } else {
                out.insert(rel, Some(b"<special>".to_vec()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

fn assert_tree_unchanged(
    before: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    after: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    what: &str,
) {
    let added: Vec<&PathBuf> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<&PathBuf> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<&PathBuf> =
        before.iter().filter(|(k, v)| after.get(*k).is_some_and(|a| a != *v)).map(|(k, _)| k).collect();
    assert!(
        added.is_empty() && removed.is_empty() && changed.is_empty(),
        "{what}: files outside OUT changed: added {added:?}, removed {removed:?}, changed {changed:?}"
    );
}

pub(crate) fn no_temp_files(out: &Path) {
    let temps: Vec<PathBuf> = files_under(out).into_iter().filter(|p| is_temp_name(p)).collect();
    assert!(temps.is_empty(), "temporary files left in {}: {temps:?}", out.display());
}

// ---------------------------------------------------------------------------------------------
// 1. Ids never leave OUT
// ---------------------------------------------------------------------------------------------

/// Ids that must fail with a reason, and a word of that reason.
fn hostile_ids(victim: &Path) -> Vec<(String, &'static str)> {
    vec![
        ("".to_string(), "empty"),
        (".".to_string(), "starts with '.'"),
        ("..".to_string(), "starts with '.'"),
        (".hidden".to_string(), "starts with '.'"),
        ("../../x".to_string(), "starts with '.'"),
        ("sub/../../../x".to_string(), "'/'"),
        (victim.to_str().unwrap().to_string(), "'/'"),
        ("a\\b".to_string(), "'\\\\'"),
        ("nul\0id".to_string(), "'\\0'"),
        ("x".repeat(250), "at most 200"),
    ]
}

#[test]
fn hostile_ids_fail_alone_and_nothing_outside_out_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("work");
    let imgs = root.join("data/imgs");
    // The victim: a photo outside the images folder, and images where "../../x" and the long id
    // would find them, so the old code found an image for every hostile id and wrote outputs.
    let photos = root.join("photos");
    let victim = photos.join("victim");
    save_png(&photos, "victim", 64, 48, 1);
    std::fs::copy(photos.join("victim.png"), photos.join("victim.jpg")).unwrap();
    save_png(&root.join("data"), "x", 64, 48, 2);
    save_png(&root, "x", 64, 48, 3);
    save_png(&imgs, "good", 64, 48, 4);
    let long_ok = "y".repeat(200);
    save_png(&imgs, &long_ok, 64, 48, 5);
    save_png(&imgs, &"x".repeat(250), 64, 48, 6);
    save_png(&imgs, ".hidden", 64, 48, 7);
    save_png(&imgs, "a\\b", 64, 48, 8);
    let hostile = hostile_ids(&victim);
    let good = ["good".to_string(), long_ok.clone()];

    let outs = root.join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    let kinds = ["json", "split", "text", "xml", "coco"];
    let skip: Vec<PathBuf> = kinds.iter().map(|k| outs.join(k)).chain([root.join("cache")]).collect();

    // Every label source, written before the snapshot.
    // JSON labels: every hostile id.
    let mut labels = serde_json::Map::new();
    for id in good.iter().chain(hostile.iter().map(|(id, _)| id)) {
        labels.insert(id.clone(), serde_json::json!(["dog"]));
    }
    let lj = outs.join("labels.json");
    std::fs::write(&lj, serde_json::to_string(&labels).unwrap()).unwrap();
    // --split naming the hostile ids (labels from the JSON).
    let split = outs.join("split.txt");
    let split_ids: Vec<(String, &str)> =
        hostile.iter().filter(|(id, _)| !id.is_empty() && !id.contains(['\0', '\n'])).cloned().collect();
    let text: String = good.iter().chain(split_ids.iter().map(|(id, _)| id)).map(|id| format!("{id}\n")).collect();
    std::fs::write(&split, text).unwrap();
    // Text labels (an empty id is a line starting with a tab).
    let lt = outs.join("labels.txt");
    let text_ids: Vec<(String, &str)> = hostile.iter().filter(|(id, _)| !id.contains('\0')).cloned().collect();
    let text: String = good.iter().chain(text_ids.iter().map(|(id, _)| id)).map(|id| format!("{id}\tdog\n")).collect();
    std::fs::write(&lt, text).unwrap();
    // VOC XML: ids are file stems ("..xml" is the id ".", "a\b.xml" the id "a\b").
    let ann = outs.join("ann");
    std::fs::create_dir_all(&ann).unwrap();
    let xml = "<annotation><object><name>dog</name></object></annotation>";
    let xml_ids: Vec<(String, &str)> = hostile
        .iter()
        .filter(|(id, _)| [".", ".hidden", "a\\b"].contains(&id.as_str()) || id.len() == 250)
        .cloned()
        .collect();
    for id in good.iter().chain(xml_ids.iter().map(|(id, _)| id)) {
        std::fs::write(ann.join(format!("{id}.xml")), xml).unwrap();
    }
    // COCO: ids are the stems of file_name ("../../x.jpg" would be the harmless "x").
    let voc = clipmask::config::DatasetConfig::resolve("voc12").unwrap();
    let cats: Vec<String> = (1..=voc.classes.len()).map(|i| format!(r#"{{"id":{i},"name":"c{i}"}}"#)).collect();
    let files: Vec<String> = good
        .iter()
        .map(|g| format!("{g}.jpg"))
        .chain([
            ".hidden.jpg".to_string(),
            "..".to_string(),
            "a\\b.jpg".to_string(),
            format!("{}.jpg", "x".repeat(250)),
        ])
        .collect();
    let images: Vec<String> = files
        .iter()
        .enumerate()
        .map(|(i, f)| format!(r#"{{"id":{i},"file_name":{}}}"#, serde_json::json!(f)))
        .collect();
    // Category 12 is the 12th by rank: "dog".
    let anns: Vec<String> = (0..files.len()).map(|i| format!(r#"{{"image_id":{i},"category_id":12}}"#)).collect();
    let cj = outs.join("instances.json");
    std::fs::write(
        &cj,
        format!(
            r#"{{"images":[{}],"annotations":[{}],"categories":[{}]}}"#,
            images.join(","),
            anns.join(","),
            cats.join(",")
        ),
    )
    .unwrap();
    let coco_ids: Vec<(String, &str)> = hostile
        .iter()
        .filter(|(id, _)| ["", ".hidden", "a\\b"].contains(&id.as_str()) || id.len() == 250)
        .cloned()
        .collect();

    let before = tree(&root, &skip);
    let check = |name: &str, out: &Path, r: &Run, expect_failed: &[(String, &str)]| {
        assert_eq!(r.code, Some(1), "{name}: {}", r.show());
        for m in PANIC_MARKERS {
            assert!(!r.stderr.contains(m), "{name}: {}", r.show());
        }
        let f = failures(out);
        for (id, word) in expect_failed {
            let (path, reason) = f.get(id).unwrap_or_else(|| panic!("{name}: {id:?} not in failures.jsonl: {f:?}"));
            assert!(
                reason.contains("invalid id") && reason.contains(word),
                "{name}: {id:?}: reason {reason:?} should say {word:?}"
            );
            assert!(Path::new(path).starts_with(&imgs) || path.ends_with(".xml"), "{name}: {id:?}: path {path}");
        }
        assert_eq!(mask_ids(out), good.iter().cloned().collect(), "{name}: only the good ids have masks");
        assert_eq!(f.len(), expect_failed.len(), "{name}: {f:?}");
        assert_tree_unchanged(&before, &tree(&root, &skip), name);
        // Everything the run wrote is OUT/<kind>/<id>.<ext> for a good id, or failures.jsonl.
        for p in files_under(out) {
            let ok = p == Path::new("failures.jsonl")
                || (p.components().count() == 2
                    && good.iter().any(|g| p.file_stem().unwrap().to_str() == Some(g.as_str())));
            assert!(ok, "{name}: unexpected output {}", p.display());
        }
    };
    let flags = ["--save-cams", "--overlays", "--crf", "--save-confidence"];

    let out = outs.join("json");
    let r = run(generate(tmp.path(), &imgs, &out).arg("--labels").arg(&lj).args(flags));
    check("json", &out, &r, &hostile);
    let out = outs.join("split");
    let r = run(generate(tmp.path(), &imgs, &out).arg("--labels").arg(&lj).arg("--split").arg(&split).args(flags));
    check("split", &out, &r, &split_ids);
    let out = outs.join("text");
    let r = run(generate(tmp.path(), &imgs, &out).arg("--labels").arg(&lt).args(flags));
    check("text", &out, &r, &text_ids);
    let out = outs.join("xml");
    let r = run(generate(tmp.path(), &imgs, &out).arg("--annotations").arg(&ann).args(flags));
    check("xml", &out, &r, &xml_ids);
    let out = outs.join("coco");
    let r = run(generate(tmp.path(), &imgs, &out).arg("--coco").arg(&cj).args(flags));
    check("coco", &out, &r, &coco_ids);
}

#[test]
fn ids_are_validated_and_output_paths_stay_in_out() {
    use clipmask::datasets::validate_id;
    for ok in ["2007_000032", "COCO_val2014_000000000042", "a b", "é中", &"y".repeat(200)] {
        assert!(validate_id(ok).is_ok(), "{ok:?}");
    }
    for bad in ["", ".", "..", ".x", "../x", "a/b", "/abs", "a\\b", "a\0b", "a\nb", &"y".repeat(201)] {
        let e = validate_id(bad).expect_err(bad);
        assert!(e.starts_with("invalid id"), "{e}");
    }
    let out = Path::new("/o");
    assert_eq!(clipmask::outputs::output_path(out, "masks", "a", "png").unwrap(), PathBuf::from("/o/masks/a.png"));
    assert!(clipmask::outputs::output_path(out, "masks", "../../etc/x", "png").is_err());
    assert!(clipmask::outputs::output_path(out, "masks", "/etc/x", "png").is_err());
}

// ---------------------------------------------------------------------------------------------
// 2. Pixel budget
// ---------------------------------------------------------------------------------------------

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A small valid JPEG whose SOF header claims `w` x `h`.
pub fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpg = Vec::new();
    synthetic_image(16, 16, 9).write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg).unwrap();
    let sof = jpg.windows(2).position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1])).expect("SOF marker");
    jpg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpg
}

/// A PNG signature + IHDR (valid CRC) claiming `w` x `h` 8-bit RGB, one tiny IDAT, IEND.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        c.extend(&body);
        c.extend(crc32(&body).to_be_bytes());
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// A 24-bit BMP header claiming `w` x `h` with a few bytes of pixels.
fn bmp_claiming(w: i32, h: i32) -> Vec<u8> {
    let mut b = b"BM".to_vec();
    b.extend(70u32.to_le_bytes());
    b.extend([0; 4]);
    b.extend(54u32.to_le_bytes());
    b.extend(40u32.to_le_bytes());
    b.extend(w.to_le_bytes());
    b.extend(h.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(24u16.to_le_bytes());
    b.extend([0; 24]);
    b.extend([0x7f; 16]);
    b
}

#[test]
fn images_over_the_pixel_budget_fail_alone_under_a_memory_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    save_png(&imgs, "a_good", 80, 60, 11);
    save_png(&imgs, "z_good", 80, 60, 12);
    // Sorted between the good ones, so images before and after them must both be done.
    let jpg = jpeg_claiming(60000, 60000);
    assert!(jpg.len() < 1000, "{} bytes", jpg.len());
    std::fs::write(imgs.join("m_jpeg.jpg"), &jpg).unwrap();
    std::fs::write(imgs.join("m_png.png"), png_claiming(60000, 60000)).unwrap();
    std::fs::write(imgs.join("m_bmp.bmp"), bmp_claiming(60000, 60000)).unwrap();
    std::fs::write(imgs.join("m_wide.png"), png_claiming(2_000_000_000, 1)).unwrap();
    // Within the default budget but over a small --max-pixels: a valid image.
    synthetic_image(100, 100, 13).save(imgs.join("m_valid.gif")).unwrap();
    let ids = ["a_good", "m_jpeg", "m_png", "m_bmp", "m_wide", "m_valid", "z_good"];
    let labels: serde_json::Map<String, serde_json::Value> =
        ids.iter().map(|id| (id.to_string(), serde_json::json!(["dog"]))).collect();
    let lf = tmp.path().join("labels.json");
    std::fs::write(&lf, serde_json::to_string(&labels).unwrap()).unwrap();

    // Under a 6 GiB address-space limit: the 60000 x 60000 JPEG alone asked for 10.8 GB.
    let out = tmp.path().join("out");
    let mut cmd = Command::new("bash");
    let gen = generate(tmp.path(), &imgs, &out);
    let mut line = format!("ulimit -v {}; exec", 6 * 1024 * 1024);
    for a in std::iter::once(gen.get_program()).chain(gen.get_args()) {
        line += &format!(" '{}'", a.to_str().unwrap());
    }
    line += &format!(" --labels '{}' --max-pixels 9000 --overlays", lf.display());
    cmd.args(["-c", &line]).env("CLIPMASK_CACHE", tmp.path().join("cache"));
    let r = run(&mut cmd);
    assert_eq!(r.code, Some(1), "{}", r.show());
    for m in PANIC_MARKERS.iter().chain(&["memory allocation", "Aborted"]) {
        assert!(!r.stderr.contains(m), "{}", r.show());
    }
    assert_eq!(mask_ids(&out), ["a_good", "z_good"].iter().map(|s| s.to_string()).collect());
    let f = failures(&out);
    for id in ["m_jpeg", "m_png", "m_bmp", "m_wide"] {
        let (_, reason) = f.get(id).unwrap_or_else(|| panic!("{id} not in failures: {f:?}"));
        assert!(reason.contains("pixel budget") && reason.contains("--max-pixels"), "{id}: {reason}");
    }
    assert!(f["m_jpeg"].1.contains("60000x60000"), "{:?}", f["m_jpeg"]);
    assert!(f["m_valid"].1.contains("100x100") && f["m_valid"].1.contains("pixel budget"), "{:?}", f["m_valid"]);
    assert_eq!(f.len(), 5, "{f:?}");
    assert_eq!(summary(&r.stderr), (7, 2, 5), "{}", r.show());

    // The default budget (100 MP) takes the 100 x 100 GIF.
    let r = run(generate(tmp.path(), &imgs, &out).arg("--labels").arg(&lf));
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(mask_ids(&out).contains("m_valid"), "{}", r.show());
    assert_eq!(failures(&out).len(), 4);

    // Bad --max-pixels values are usage errors.
    for v in ["0", "-5", "lots"] {
        let r = run(generate(tmp.path(), &imgs, &out).arg("--labels").arg(&lf).args(["--max-pixels", v]));
        assert_eq!(r.code, Some(2), "--max-pixels {v}: {}", r.show());
    }
    let help = run(clipmask(&tmp.path().join("cache")).args(["generate", "--help"]));
    assert!(help.stdout.contains("--max-pixels") && help.stdout.contains("100000000"), "{}", help.stdout);
}

// ---------------------------------------------------------------------------------------------
// 3. Signals
// ---------------------------------------------------------------------------------------------

pub(crate) fn kill(child: &Child, sig: &str) {
    let st = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
    assert!(st.success(), "kill -{sig}");
}

pub(crate) fn wait_for(mut cond: impl FnMut() -> bool, limit: Duration) -> bool {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    true
}

/// Whether the process catches SIGHUP, SIGINT and SIGTERM yet (SigCgt in /proc/<pid>/status).
pub(crate) fn handlers_installed(child: &Child) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) else { return false };
    let Some(mask) = status.lines().find_map(|l| l.strip_prefix("SigCgt:")) else { return false };
    let mask = u64::from_str_radix(mask.trim(), 16).unwrap_or(0);
    [1, 2, 15].iter().all(|sig| mask & (1 << (sig - 1)) != 0)
}

/// Waits for the child, killing it after `limit` (then panics).
pub(crate) fn wait_output(child: Child, limit: Duration) -> (Option<i32>, String) {
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let watchdog = std::thread::spawn(move || {
        let t = Instant::now();
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            if t.elapsed() > limit {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    let o = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let timed_out = watchdog.join().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!timed_out, "the run did not finish within {limit:?}:\n{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(o.status.signal().is_none(), "killed by signal {:?} (139 = segfault):\n{stderr}", o.status.signal());
    (o.status.code(), stderr)
}

struct SignalSetup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    imgs: PathBuf,
    labels: PathBuf,
    n: usize,
}

fn signal_setup(n: usize) -> SignalSetup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let imgs = root.join("imgs");
    let classes = ["dog", "cat", "person", "car", "bus", "sheep"];
    let mut labels = serde_json::Map::new();
    for k in 0..n {
        save_png(&imgs, &format!("s{k:02}"), 224, 160, 700 + k as u64);
        labels.insert(format!("s{k:02}"), serde_json::json!([classes[k % 6], classes[(k + 2) % 6]]));
    }
    let lf = root.join("labels.json");
    std::fs::write(&lf, serde_json::to_string(&labels).unwrap()).unwrap();
    SignalSetup { _tmp: tmp, root, imgs, labels: lf, n }
}

impl SignalSetup {
    fn cmd(&self, out: &Path) -> Command {
        let mut c = generate(&self.root, &self.imgs, out);
        c.arg("--labels")
            .arg(&self.labels)
            .args(["--save-cams", "--overlays"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }
}

/// One run stopped by `sig` once `after` masks exist (0: as soon as the handlers are installed,
/// during the model load), checked, then completed by a rerun.
fn stop_and_resume(s: &SignalSetup, out: &Path, sig: &str, code: i32, after: usize) {
    let child = s.cmd(out).spawn().unwrap();
    assert!(wait_for(|| handlers_installed(&child), Duration::from_secs(60)), "no signal handlers");
    assert!(wait_for(|| mask_ids(out).len() >= after, Duration::from_secs(120)), "SIG{sig}: no progress");
    kill(&child, sig);
    let (status, stderr) = wait_output(child, Duration::from_secs(120));
    let written = mask_ids(out).len();
    eprintln!("SIG{sig} after {after} masks: exit {status:?}, {written} masks written");
    assert_eq!(status, Some(code), "SIG{sig} after {after} masks:\n{stderr}");
    assert!(stderr.contains(&format!("SIG{sig}")), "the signal is named:\n{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let (total, done, failed) = summary(&stderr);
    assert_eq!((total, failed), (s.n, 0), "{stderr}");
    assert_eq!(done, written, "the summary counts the masks written:\n{stderr}");
    assert!(written < s.n, "SIG{sig}: the signal must land midway ({written} of {})", s.n);
    no_temp_files(out);
    // The rerun completes the rest.
    let (status, stderr) = wait_output(s.cmd(out).spawn().unwrap(), Duration::from_secs(300));
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(summary(&stderr), (s.n, s.n - written, 0), "{stderr}");
    assert_eq!(mask_ids(out).len(), s.n);
    no_temp_files(out);
}

#[test]
fn sigterm_at_several_moments_stops_cleanly_with_143_and_a_rerun_completes() {
    let s = signal_setup(16);
    for (i, after) in [0, 1, 6].into_iter().enumerate() {
        stop_and_resume(&s, &s.root.join(format!("term{i}")), "TERM", 143, after);
    }
}

#[test]
fn sighup_at_several_moments_stops_cleanly_with_129_and_a_rerun_completes() {
    let s = signal_setup(16);
    for (i, after) in [0, 3, 9].into_iter().enumerate() {
        stop_and_resume(&s, &s.root.join(format!("hup{i}")), "HUP", 129, after);
    }
}

#[test]
fn stale_temp_files_of_dead_processes_are_swept_and_live_ones_kept() {
    let s = signal_setup(3);
    let out = s.root.join("out");
    // A process that has exited: its pid is free.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let live_pid = std::process::id();
    let stale = [
        out.join(format!("masks/.s00.png.tmp-{dead_pid}")),
        out.join(format!("cams/.s01.npz.tmp-{dead_pid}")),
        out.join(format!(".failures.jsonl.tmp-{dead_pid}")),
    ];
    let live = out.join(format!("overlays/.s02.jpg.tmp-{live_pid}"));
    let unrelated = out.join("masks/.keep-me");
    for p in stale.iter().chain([&live, &unrelated]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"partial").unwrap();
    }
    let (status, stderr) = wait_output(s.cmd(&out).spawn().unwrap(), Duration::from_secs(300));
    assert_eq!(status, Some(0), "{stderr}");
    for p in &stale {
        assert!(!p.exists(), "stale {} not swept", p.display());
    }
    assert!(live.exists(), "a live process's temporary file must be kept");
    assert!(unrelated.exists(), "only temporary names are swept");

    // SIGKILL leaves temporary files behind at worst; the rerun removes them.
    let out = s.root.join("killed");
    let child = s.cmd(&out).spawn().unwrap();
    assert!(wait_for(|| !mask_ids(&out).is_empty(), Duration::from_secs(120)));
    let pid = child.id();
    kill(&child, "KILL");
    let _ = child.wait_with_output();
    std::fs::write(out.join(format!("masks/.s02.png.tmp-{pid}")), b"partial").unwrap();
    let (status, stderr) = wait_output(s.cmd(&out).spawn().unwrap(), Duration::from_secs(300));
    assert_eq!(status, Some(0), "{stderr}");
    no_temp_files(&out);
}

#[test]
fn a_second_signal_quits_at_once_without_crashing_many_times_over() {
    let s = signal_setup(40);
    let out = s.root.join("out");
    let (mut codes, mut quick) = (Vec::new(), 0);
    for i in 0..20u64 {
        // --overwrite: every run has all images to do, so the signals land in real work.
        let child = s.cmd(&out).arg("--overwrite").spawn().unwrap();
        assert!(wait_for(|| handlers_installed(&child), Duration::from_secs(60)), "no signal handlers");
        // Varied moments: during the model load, the forward and backward passes, the writes.
        std::thread::sleep(Duration::from_millis((i * 97) % 500));
        kill(&child, "INT");
        std::thread::sleep(Duration::from_millis((i * 7) % 25));
        kill(&child, "INT");
        let (status, stderr) = wait_output(child, Duration::from_secs(60));
        // On a fast machine a late pair of signals can find the run already finished (exit 0,
        // every image done); anything else but 130 (a crash: 134, 139, ...) fails.
        let finished_first = status == Some(0) && stderr.contains(&format!("{} done", s.n));
        assert!(status == Some(130) || finished_first, "double SIGINT #{i}: exit {status:?}\n{stderr}");
        codes.push(status);
        quick += stderr.contains("quitting at once") as usize;
    }
    eprintln!("20 double interrupts: {codes:?}, {quick} quit at once, {} masks", mask_ids(&out).len());
    let interrupted = codes.iter().filter(|c| **c == Some(130)).count();
    assert!(
        interrupted >= 15,
        "only {interrupted} of 20 runs were interrupted: the signals came too late to test anything"
    );
    assert!(quick >= 1, "the second signal should usually arrive while the first is handled");
    // The next run sweeps whatever the quick exits left and completes the list.
    let (status, stderr) = wait_output(s.cmd(&out).spawn().unwrap(), Duration::from_secs(300));
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(mask_ids(&out).len(), s.n);
    no_temp_files(&out);
}

// ---------------------------------------------------------------------------------------------
// 4. Only regular files are read
// ---------------------------------------------------------------------------------------------

pub(crate) fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success(), "mkfifo {}", p.display());
}

#[test]
fn fifos_devices_and_sockets_among_the_images_fail_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    save_png(&imgs, "a_good", 64, 48, 21);
    save_png(&imgs, "z_good", 64, 48, 22);
    mkfifo(&imgs.join("fifo.jpg"));
    std::os::unix::fs::symlink("/dev/zero", imgs.join("device.png")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(imgs.join("sock.jpg")).unwrap();
    // A FIFO among the VOC annotations must not block either.
    let ann = tmp.path().join("ann");
    std::fs::create_dir_all(&ann).unwrap();
    for id in ["a_good", "z_good", "fifo", "device", "sock"] {
        std::fs::write(ann.join(format!("{id}.xml")), "<annotation><object><name>dog</name></object></annotation>")
            .unwrap();
    }
    save_png(&imgs, "ann_fifo", 64, 48, 23);
    mkfifo(&ann.join("ann_fifo.xml"));
    let out = tmp.path().join("out");
    let child = generate(tmp.path(), &imgs, &out)
        .arg("--annotations")
        .arg(&ann)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = wait_output(child, Duration::from_secs(120));
    assert_eq!(status, Some(1), "{stderr}");
    assert_eq!(mask_ids(&out), ["a_good", "z_good"].iter().map(|s| s.to_string()).collect());
    let f = failures(&out);
    for (id, what) in [("fifo", "FIFO"), ("device", "device"), ("sock", "socket"), ("ann_fifo", "FIFO")] {
        let (_, reason) = f.get(id).unwrap_or_else(|| panic!("{id} not in failures: {f:?}"));
        assert!(reason.contains(what) && reason.contains("only regular files"), "{id}: {reason}");
    }
    assert_eq!(f.len(), 4, "{f:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. `clipmask crf` validates its archives
// ---------------------------------------------------------------------------------------------

pub(crate) fn write_npz(p: &Path, keys: &[i64], cams: &ndarray::Array3<f32>) {
    let f = std::fs::File::create(p).unwrap();
    let mut npz = ndarray_npy::NpzWriter::new(f);
    npz.add_array("keys", &ndarray::Array1::from(keys.to_vec())).unwrap();
    npz.add_array("cams", cams).unwrap();
    npz.add_array("raw_cams", cams).unwrap();
    npz.finish().unwrap();
}

#[test]
fn crf_validates_every_archive_and_bad_ones_fail_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    let (w, h) = (48usize, 40usize);
    let cams = tmp.path().join("cams");
    std::fs::create_dir_all(&cams).unwrap();
    let good =
        ndarray::Array3::from_shape_fn(
            (2, h, w),
            |(k, y, x)| if k == 0 { x as f32 / w as f32 } else { y as f32 / h as f32 },
        );
    let one = good.slice(ndarray::s![0..1, .., ..]).to_owned();
    let with = |v: f32| {
        let mut m = good.clone();
        m[[1, 3, 4]] = v;
        m
    };
    // id, keys, maps, words of the reason (empty = must succeed)
    type Case<'a> = (&'a str, Vec<i64>, ndarray::Array3<f32>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        ("a_good", vec![11, 14], good.clone(), &[]),
        ("a_tolerance", vec![11, 14], with(1.0005), &[]),
        ("key_300", vec![11, 300], good.clone(), &["key 300", "class index"]),
        ("key_minus1", vec![-1, 14], good.clone(), &["key -1", "class index"]),
        ("key_20", vec![20, 14], good.clone(), &["key 20", "0..=19"]),
        ("dup_keys", vec![14, 14], good.clone(), &["appears twice"]),
        ("few_keys", vec![11], good.clone(), &["1 keys but 2 maps"]),
        ("many_keys", vec![11, 14], one.clone(), &["2 keys but 1 maps"]),
        ("no_keys", vec![], ndarray::Array3::zeros((0, h, w)), &["no keys"]),
        ("nan", vec![11, 14], with(f32::NAN), &["non-finite", "NaN"]),
        ("inf", vec![11, 14], with(f32::INFINITY), &["non-finite", "inf"]),
        ("big", vec![11, 14], with(5.0), &["outside [0, 1]"]),
        ("negative", vec![11, 14], with(-0.5), &["outside [0, 1]"]),
        ("wrong_size", vec![11, 14], ndarray::Array3::zeros((2, h, w + 1)), &["maps", "49x40", "48x40"]),
    ];
    for (i, (id, keys, maps, _)) in cases.iter().enumerate() {
        write_npz(&cams.join(format!("{id}.npz")), keys, maps);
        save_png(&imgs, id, w as u32, h as u32, 30 + i as u64);
    }
    std::fs::write(cams.join("garbage.npz"), b"PK\x03\x04 not really").unwrap();
    save_png(&imgs, "garbage", w as u32, h as u32, 60);
    mkfifo(&cams.join("fifo.npz"));
    save_png(&imgs, "fifo", w as u32, h as u32, 61);
    write_npz(&cams.join("no_image.npz"), &[11], &one);
    write_npz(&cams.join(".hidden.npz"), &[11], &one);

    let out = tmp.path().join("out");
    let child = clipmask(&tmp.path().join("cache"))
        .args([
            "crf",
            "--cams",
            cams.to_str().unwrap(),
            "--images",
            imgs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = wait_output(child, Duration::from_secs(120));
    assert_eq!(status, Some(1), "{stderr}");
    for m in PANIC_MARKERS {
        assert!(!stderr.contains(m), "{stderr}");
    }
    let f = failures(&out);
    eprintln!("{stderr}\n{f:#?}");
    let masks = mask_ids(&out);
    for (id, _, _, words) in &cases {
        if words.is_empty() {
            assert!(masks.contains(*id), "{id} should have a mask: {:?}", f.get(*id));
            let (labels, _, _) = clipmask::outputs::read_label_png(&out.join(format!("masks/{id}.png"))).unwrap();
            assert!(labels.iter().all(|&l| [0, 12, 15, 255].contains(&l)), "{id}: labels are 0, key + 1 or 255");
            continue;
        }
        assert!(!masks.contains(*id), "{id} must not have a mask");
        let (path, reason) = f.get(*id).unwrap_or_else(|| panic!("{id} not in failures.jsonl: {f:?}"));
        assert!(!path.is_empty());
        for w in *words {
            assert!(w.split('|').any(|alt| reason.contains(alt)), "{id}: reason should mention {w:?}: {reason}");
        }
    }
    for (id, word) in [("garbage", "npz"), ("fifo", "FIFO"), ("no_image", "no image for id"), (".hidden", "invalid id")]
    {
        let (_, reason) = f.get(id).unwrap_or_else(|| panic!("{id} not in failures.jsonl: {f:?}"));
        assert!(reason.contains(word), "{id}: {reason}");
    }
    assert_eq!(masks.len(), 2, "{masks:?}");
    assert_eq!(f.len(), cases.len() - 2 + 4, "{f:?}");
    assert!(stderr.contains("failures.jsonl"), "{stderr}");
    no_temp_files(&out);

    // The dead `crf --crf` flag is gone.
    let r =
        run(clipmask(&tmp.path().join("cache")).args(["crf", "--crf", "--cams", "c", "--images", "i", "--out", "o"]));
    assert_eq!(r.code, Some(2), "{}", r.show());
    assert!(r.stderr.contains("--crf"), "{}", r.show());
}

// ---------------------------------------------------------------------------------------------
// 6. Smaller items
// ---------------------------------------------------------------------------------------------

#[test]
fn eval_names_the_mismatched_ids_and_the_allow_missing_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let (gt, pred) = (tmp.path().join("gt"), tmp.path().join("pred"));
    std::fs::create_dir_all(&gt).unwrap();
    std::fs::create_dir_all(&pred).unwrap();
    let pal = clipmask::config::DatasetConfig::resolve("voc12").unwrap().png_palette();
    for id in ["im0", "im1", "im2"] {
        clipmask::outputs::write_label_png(&gt.join(format!("{id}.png")), &[0, 1, 1, 0], 2, 2, Some(&pal)).unwrap();
    }
    clipmask::outputs::write_label_png(&pred.join("im0.png"), &[0, 1, 1, 0], 2, 2, Some(&pal)).unwrap();
    clipmask::outputs::write_label_png(&pred.join("stray.png"), &[0, 1, 1, 0], 2, 2, Some(&pal)).unwrap();
    let r = run(clipmask(&tmp.path().join("cache")).args([
        "eval",
        "--config",
        "voc12",
        "--pred",
        pred.to_str().unwrap(),
        "--gt",
        gt.to_str().unwrap(),
    ]));
    let line = assert_one_line_error(&r, 2);
    for w in ["ids do not match", "im1", "im2", "stray", "--allow-missing"] {
        assert!(line.contains(w), "{w:?} missing from: {line}");
    }
}

#[test]
fn max_side_below_two_patches_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (imgs, lf) = one_image_dataset(tmp.path(), 41);
    for v in ["0", "1", "15", "16", "31"] {
        let r = run(generate(tmp.path(), &imgs, &tmp.path().join(format!("out{v}")))
            .arg("--labels")
            .arg(&lf)
            .args(["--max-side", v]));
        let line = assert_one_line_error(&r, 2);
        assert!(line.contains("--max-side") && line.contains("32 px"), "{line}");
        assert!(!tmp.path().join(format!("out{v}/masks/a.png")).exists());
    }
    let r =
        run(generate(tmp.path(), &imgs, &tmp.path().join("out32")).arg("--labels").arg(&lf).args(["--max-side", "32"]));
    assert_eq!(r.code, Some(0), "{}", r.show());
}

#[test]
fn a_palette_shorter_than_the_classes_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("configs/voc12.json")).unwrap()).unwrap();
    cfg["palette"] = serde_json::json!(cfg["palette"].as_array().unwrap()[..5].to_vec());
    let p = tmp.path().join("short.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = format!("{:#}", clipmask::config::DatasetConfig::load(&p).unwrap_err());
    assert!(e.contains("palette") && e.contains("5 colours") && e.contains("needs 21"), "{e}");
    // Through the CLI: exit 2 with one line, before the model loads.
    let r = run(clipmask(&tmp.path().join("cache"))
        .args(["generate", "--config", p.to_str().unwrap(), "--images", tmp.path().to_str().unwrap()])
        .args(["--labels", "x.json", "--out"])
        .arg(tmp.path().join("o")));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("palette"), "{line}");
    // No palette at all: the PASCAL VOC colour map, not black.
    cfg.as_object_mut().unwrap().remove("palette");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let c = clipmask::config::DatasetConfig::load(&p).unwrap();
    let voc = clipmask::config::DatasetConfig::resolve("voc12").unwrap();
    assert_eq!(c.png_palette()[..63], voc.png_palette()[..63]);
}

#[test]
fn gif_images_are_found_and_a_missing_image_names_no_made_up_path() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    synthetic_image(64, 48, 51).save(imgs.join("anim.gif")).unwrap();
    let lf = tmp.path().join("labels.json");
    std::fs::write(&lf, r#"{"anim": ["dog"], "gone": ["cat"]}"#).unwrap();
    let out = tmp.path().join("out");
    let r = run(generate(tmp.path(), &imgs, &out).arg("--labels").arg(&lf));
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(mask_ids(&out).contains("anim"), "{}", r.show());
    let f = failures(&out);
    let (path, reason) = &f["gone"];
    assert!(!path.ends_with(".jpg") && !reason.contains("gone.jpg"), "{path} / {reason}");
    assert!(
        reason.contains("no image for id") && reason.contains("|gif|") && reason.contains(imgs.to_str().unwrap()),
        "{reason}"
    );
}

#[test]
fn json_and_text_labels_share_one_normalisation() {
    use clipmask::datasets::{parse_labels_text, resolve_labels};
    let cfg = clipmask::config::DatasetConfig::resolve("voc12").unwrap();
    let dog = cfg.class_index("dog").unwrap();
    let cat = cfg.class_index("cat").unwrap();
    let tv = cfg.class_index("tvmonitor").unwrap();
    let json: clipmask::datasets::RawLabels =
        serde_json::from_str(r#"{"a": ["Dog", " dog", "CAT ", "TVMonitor"]}"#).unwrap();
    let text = parse_labels_text("a\tDog, dog,CAT ,TVMonitor\n", "t").unwrap();
    assert_eq!(resolve_labels(&cfg, &json["a"]), Ok(vec![dog, cat, tv]));
    assert_eq!(resolve_labels(&cfg, &text["a"]), resolve_labels(&cfg, &json["a"]));
    assert!(resolve_labels(&cfg, &["dogs".to_string()]).is_err());
    // End to end: the JSON form with odd case and spaces gives the same mask as the plain one.
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    save_png(&imgs, "a", 64, 48, 52);
    let (plain, odd) = (tmp.path().join("plain.json"), tmp.path().join("odd.json"));
    std::fs::write(&plain, r#"{"a": ["dog", "cat"]}"#).unwrap();
    std::fs::write(&odd, r#"{"a": [" Dog", "CAT"]}"#).unwrap();
    for (lf, out) in [(&plain, "p"), (&odd, "o")] {
        let r = run(generate(tmp.path(), &imgs, &tmp.path().join(out)).arg("--labels").arg(lf));
        assert_eq!(r.code, Some(0), "{}", r.show());
    }
    assert_eq!(
        std::fs::read(tmp.path().join("p/masks/a.png")).unwrap(),
        std::fs::read(tmp.path().join("o/masks/a.png")).unwrap()
    );
}

#[test]
fn out_masks_being_a_file_is_blamed_on_out_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let (imgs, lf) = one_image_dataset(tmp.path(), 53);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("masks"), b"not a directory").unwrap();
    let r = run(generate(tmp.path(), &imgs, &out).arg("--labels").arg(&lf));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains(out.join("masks").to_str().unwrap()), "{line}");
    // And an images folder that is one of OUT's output folders is refused.
    let out2 = tmp.path().join("out2");
    std::fs::create_dir_all(out2.join("overlays")).unwrap();
    save_png(&out2.join("overlays"), "a", 64, 48, 54);
    let r = run(generate(tmp.path(), &out2.join("overlays"), &out2).arg("--labels").arg(&lf).arg("--overlays"));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("overwrite inputs"), "{line}");
}
