//! Links planted in an output directory by someone else who can write there (OUT is often a
//! shared scratch directory). Every file name a run uses is planted as a symbolic link into a
//! victim directory outside OUT, for the pids the run may get: temporary files
//! (`.<name>.tmp-<pid>`, the names earlier versions used), the write probe, failures.jsonl,
//! the final names and the output folders themselves. Whatever the command (`generate`, `crf`,
//! `tag`, `eval --report`, `prompts rank --write-config`), nothing in the victim directory may
//! change, and a link at a final name fails that output with a reason instead of being followed.
use crate::support::*;
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// How many pids after the last one allocated get planted names.
const PIDS: u32 = 1500;

/// The victim directory and its contents (relative path -> bytes; links recorded as targets).
struct Victim {
    dir: PathBuf,
    before: BTreeMap<PathBuf, Vec<u8>>,
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for p in files_under(dir) {
        let full = dir.join(&p);
        let bytes = match std::fs::read_link(&full) {
            Ok(target) => format!("link -> {}", target.display()).into_bytes(),
            Err(_) => std::fs::read(&full).unwrap(),
        };
        out.insert(p, bytes);
    }
    out
}

impl Victim {
    fn new(root: &Path) -> Victim {
        let dir = root.join("victim");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for (name, text) in [("precious.txt", "keep me"), ("photo.png", "not a png"), ("sub/notes.md", "# notes")] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let before = snapshot(&dir);
        Victim { dir, before }
    }

    /// The k-th target: an existing victim file, or a name that does not exist yet there
    /// (a followed link would create it).
    fn target(&self, k: usize) -> PathBuf {
        match k % 3 {
            0 => self.dir.join("precious.txt"),
            1 => self.dir.join("photo.png"),
            _ => self.dir.join(format!("created-{k}")),
        }
    }

    fn assert_unchanged(&self, what: &str) {
        let after = snapshot(&self.dir);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            self.before.keys().collect::<Vec<_>>(),
            "{what}: files appeared in or vanished from the victim directory"
        );
        for (k, v) in &self.before {
            assert_eq!(&after[k], v, "{what}: victim file {} changed", k.display());
        }
    }
}

/// The last pid the kernel handed out (the next processes get the ones after it).
fn last_pid() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(std::process::id)
}

/// Plants, in `dir`, a link for every temporary name of each of `finals` for the next
/// [`PIDS`] pids, plus the write probe's names. Returns how many links were planted.
fn plant_temp_names(dir: &Path, finals: &[String], victim: &Victim) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    let first = last_pid() + 1;
    let mut k = 0;
    for pid in first..first + PIDS {
        for name in finals.iter().map(|f| format!(".{f}.tmp-{pid}")).chain([format!(".clipmask-write-test-{pid}")]) {
            symlink(victim.target(k), dir.join(name)).unwrap();
            k += 1;
        }
    }
    k
}

fn names(ids: &[&str], ext: &str) -> Vec<String> {
    ids.iter().map(|id| format!("{id}.{ext}")).collect()
}

/// Four small images and their labels.
fn dataset(root: &Path) -> (PathBuf, PathBuf, Vec<&'static str>) {
    let imgs = root.join("imgs");
    let ids = vec!["a0", "a1", "a2", "a3"];
    let mut labels = serde_json::Map::new();
    for (k, id) in ids.iter().enumerate() {
        save_png(&imgs, id, 96, 64, 40 + k as u64);
        labels.insert(id.to_string(), serde_json::json!(["dog", "person"]));
    }
    let lf = root.join("labels.json");
    std::fs::write(&lf, serde_json::to_string(&labels).unwrap()).unwrap();
    (imgs, lf, ids)
}

fn generate(root: &Path, imgs: &Path, labels: &Path, out: &Path) -> std::process::Command {
    let mut c = generate_cmd(&root.join("cache"), imgs, out);
    c.arg("--labels").arg(labels);
    c
}

#[test]
fn generate_and_crf_never_write_through_links_planted_in_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let victim = Victim::new(root);
    let (imgs, labels, ids) = dataset(root);
    let out = root.join("out");
    let mut planted = 0;
    for (kind, ext) in [("masks", "png"), ("cams", "npz"), ("overlays", "jpg"), ("confidence", "npy")] {
        planted += plant_temp_names(&out.join(kind), &names(&ids, ext), &victim);
    }
    planted += plant_temp_names(&out, &["failures.jsonl".to_string()], &victim);
    eprintln!("planted {planted} links for pids after {}", last_pid());
    // A link at one final name: that image fails with a reason, the others are written.
    symlink(victim.dir.join("precious.txt"), out.join("masks/a2.png")).unwrap();
    let r = run(generate(root, &imgs, &labels, &out).args(["--save-cams", "--overlays", "--crf", "--save-confidence"]));
    victim.assert_unchanged("generate");
    assert_eq!(r.code, Some(1), "one image has a planted final name\n{}", r.show());
    let failures = std::fs::read_to_string(out.join("failures.jsonl")).unwrap();
    assert_eq!(failures.lines().count(), 1, "{failures}");
    assert!(failures.contains("\"a2\"") && failures.contains("symbolic link"), "{failures}");
    for id in ["a0", "a1", "a3"] {
        let m = out.join(format!("masks/{id}.png"));
        assert!(m.symlink_metadata().unwrap().is_file() && png_decodes(&m), "{id}: mask written as a regular file");
    }
    // The planted temporary names are swept (a link is never clipmask's own temporary file).
    let left: Vec<PathBuf> = files_under(&out).into_iter().filter(|p| is_temp_name(p)).collect();
    assert!(left.is_empty(), "planted links left: {} e.g. {:?}", left.len(), left.first());

    // crf on the saved maps, into a second OUT planted the same way.
    let out2 = root.join("out-crf");
    for (kind, ext) in [("masks", "png"), ("confidence", "npy")] {
        plant_temp_names(&out2.join(kind), &names(&ids, ext), &victim);
    }
    plant_temp_names(&out2, &["failures.jsonl".to_string()], &victim);
    symlink(victim.dir.join("photo.png"), out2.join("masks/a0.png")).unwrap();
    let mut c = clipmask(&root.join("cache"));
    c.args(["crf", "--save-confidence", "--cams"])
        .arg(out.join("cams"))
        .arg("--images")
        .arg(&imgs)
        .arg("--out")
        .arg(&out2);
    let r = run(&mut c);
    victim.assert_unchanged("crf");
    assert_eq!(r.code, Some(1), "a0's mask name is a planted link\n{}", r.show());
    let failures = std::fs::read_to_string(out2.join("failures.jsonl")).unwrap();
    assert!(failures.contains("\"a0\"") && failures.contains("symbolic link"), "{failures}");
    assert!(png_decodes(&out2.join("masks/a1.png")));
}

#[test]
fn links_at_output_folders_and_at_failures_jsonl_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let victim = Victim::new(root);
    let (imgs, labels, _) = dataset(root);
    // OUT/cams pointing at the victim folder: refused, nothing written there.
    let out = root.join("out-dirlink");
    std::fs::create_dir_all(&out).unwrap();
    symlink(&victim.dir, out.join("cams")).unwrap();
    let r = run(generate(root, &imgs, &labels, &out).arg("--save-cams"));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("cams") && line.contains("symbolic link"), "{line}");
    victim.assert_unchanged("OUT/cams link");
    // OUT/failures.jsonl pointing at a victim file: never read (its lines are not merged into
    // OUT) and never replaced.
    let out = root.join("out-faillink");
    std::fs::create_dir_all(&out).unwrap();
    symlink(victim.dir.join("precious.txt"), out.join("failures.jsonl")).unwrap();
    let r = run(&mut generate(root, &imgs, &labels, &out));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("failures.jsonl") && line.contains("symbolic link"), "{line}");
    victim.assert_unchanged("OUT/failures.jsonl link");
    assert!(!out.join("masks/a0.png").exists(), "refused before any image");
}

#[test]
fn tag_eval_report_and_prompts_rank_never_write_through_planted_links() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cache = root.join("cache");
    let victim = Victim::new(root);
    let (imgs, labels, ids) = dataset(root);
    let m = tiny_model();

    // tag: temporary names of labels.json, its scores and failures files.
    let tag_dir = root.join("tagged");
    let finals: Vec<String> =
        ["labels.json", "labels.scores.json", "labels.failures.jsonl"].iter().map(|s| s.to_string()).collect();
    plant_temp_names(&tag_dir, &finals, &victim);
    let tag = |out: &Path| {
        let mut c = clipmask(&cache);
        c.args(["tag", "--device", "cpu", "--model"]).arg(&m).arg("--images").arg(&imgs).arg("--out").arg(out);
        run(&mut c)
    };
    let r = tag(&tag_dir.join("labels.json"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    victim.assert_unchanged("tag");
    assert!(tag_dir.join("labels.json").symlink_metadata().unwrap().is_file());
    // A link at the labels file itself: refused before the model loads.
    let linked = root.join("tag-linked");
    std::fs::create_dir_all(&linked).unwrap();
    symlink(victim.dir.join("precious.txt"), linked.join("labels.json")).unwrap();
    let r = tag(&linked.join("labels.json"));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("symbolic link"), "{line}");
    victim.assert_unchanged("tag onto a link");

    // eval --report: every panel and index.html name, planted.
    let out = root.join("out");
    let r = run(&mut generate(root, &imgs, &labels, &out));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let report = root.join("report");
    plant_temp_names(&report, &["index.html".to_string()], &victim);
    for sub in ["images", "thumbs"] {
        let mut finals = names(&ids, "jpg");
        finals.extend(names(&ids, "png"));
        plant_temp_names(&report.join(sub), &finals, &victim);
    }
    let eval = |report: &Path| {
        let mut c = clipmask(&cache);
        c.args(["eval", "--config", "voc12", "--pred"])
            .arg(out.join("masks"))
            .arg("--gt")
            .arg(out.join("masks"))
            .arg("--images")
            .arg(&imgs)
            .arg("--report")
            .arg(report);
        run(&mut c)
    };
    let r = eval(&report);
    assert_eq!(r.code, Some(0), "{}", r.show());
    victim.assert_unchanged("eval --report");
    assert!(report.join("index.html").symlink_metadata().unwrap().is_file());
    // The report's panel folder as a link into the victim: refused.
    let report2 = root.join("report2");
    std::fs::create_dir_all(&report2).unwrap();
    symlink(&victim.dir, report2.join("thumbs")).unwrap();
    let r = eval(&report2);
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("symbolic link"), "{line}");
    victim.assert_unchanged("eval --report with a linked folder");

    // prompts rank --write-config: its temporary names planted, then the file itself a link.
    let ranked = root.join("ranked");
    plant_temp_names(&ranked, &["best.json".to_string()], &victim);
    let templates = root.join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\na drawing of a {}.\n").unwrap();
    let rank = |out: &Path| {
        let mut c = clipmask(&cache);
        c.args(["prompts", "rank", "--device", "cpu", "--config", "voc12", "--model"])
            .arg(&m)
            .arg("--images")
            .arg(&imgs)
            .arg("--labels")
            .arg(&labels)
            .arg("--templates")
            .arg(&templates)
            .arg("--write-config")
            .arg(out);
        run(&mut c)
    };
    let r = rank(&ranked.join("best.json"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    victim.assert_unchanged("prompts rank");
    assert!(ranked.join("best.json").symlink_metadata().unwrap().is_file());
    symlink(victim.dir.join("precious.txt"), ranked.join("linked.json")).unwrap();
    let r = rank(&ranked.join("linked.json"));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("symbolic link"), "{line}");
    victim.assert_unchanged("prompts rank onto a link");
}

/// The names earlier versions used for temporary files were predictable (`.<name>.tmp-<pid>`);
/// `write_atomic` must not write through a link planted at exactly that name, nor at the final
/// name, and must leave no temporary file behind when it refuses.
#[test]
fn write_atomic_never_follows_a_link_at_the_old_temporary_name_or_the_final_name() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = Victim::new(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let old_tmp = out.join(format!(".x.png.tmp-{}", std::process::id()));
    symlink(victim.dir.join("precious.txt"), &old_tmp).unwrap();
    clipmask::files::write_atomic(&out.join("x.png"), |w| Ok(std::io::Write::write_all(w, b"new")?)).unwrap();
    assert_eq!(std::fs::read(out.join("x.png")).unwrap(), b"new");
    victim.assert_unchanged("old temporary name");
    // Written with the usual mode (0666 less the umask), not tempfile's private 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("x.png")).unwrap().permissions().mode() & 0o777;
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    assert_eq!(mode, 0o666 & !(umask as u32), "mode {mode:o}");
    // A link at the final name is refused; no temporary file is left.
    symlink(victim.dir.join("photo.png"), out.join("y.png")).unwrap();
    let e = clipmask::files::write_atomic(&out.join("y.png"), |w| Ok(std::io::Write::write_all(w, b"new")?));
    assert!(format!("{:#}", e.unwrap_err()).contains("symbolic link"));
    // A directory at the final name: refused too.
    std::fs::create_dir(out.join("z.png")).unwrap();
    let e = clipmask::files::write_atomic(&out.join("z.png"), |w| Ok(std::io::Write::write_all(w, b"new")?));
    assert!(format!("{:#}", e.unwrap_err()).contains("directory"));
    victim.assert_unchanged("final-name link");
    let temps: Vec<PathBuf> =
        files_under(&out).into_iter().filter(|p| is_temp_name(p) && out.join(p) != old_tmp).collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    // The sweep removes a stale link with a temporary name (it is never clipmask's own).
    assert_eq!(clipmask::files::sweep_temp_files(std::slice::from_ref(&out), false), 1);
    assert!(old_tmp.symlink_metadata().is_err());
    victim.assert_unchanged("sweep");
}
