//! clipmask under a real scheduler: a one-node SLURM cluster on this machine
//! (scripts/slurm/local-cluster.sh: munged, slurmctld, slurmd), driving the templates users copy
//! (scripts/slurm/*.sbatch) on the CPU with the tiny model. The union of the shards must be
//! byte-identical to one run; a cancelled array task leaves the run incomplete (`clipmask
//! status` exit 1) until it is requeued; srun tasks of one allocation split the ids. When the
//! daemons cannot start, the tests fail with their logs: they never skip.
use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The cluster's config, starting the daemons when they are not up.
fn cluster() -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::var_os("CLIPMASK_SLURM_DIR").map(PathBuf::from).unwrap_or_else(|| "/tmp/clipmask-slurm".into());
    let conf = dir.join("slurm.conf");
    let up = || {
        Command::new("sinfo")
            .args(["-h", "-o", "%T"])
            .env("SLURM_CONF", &conf)
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("idle"))
    };
    if !up() {
        let o = Command::new("bash")
            .arg(root().join("scripts/slurm/local-cluster.sh"))
            .arg("start")
            .env("CLIPMASK_SLURM_DIR", &dir)
            .output()
            .expect("run scripts/slurm/local-cluster.sh");
        assert!(
            o.status.success() && up(),
            "the local SLURM cluster did not start (scripts/slurm/local-cluster.sh start):\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    conf
}

/// A SLURM command with the cluster's config and clipmask's test environment.
fn slurm(conf: &Path, cache: &Path, program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("SLURM_CONF", conf)
        .env("CLIPMASK", bin())
        .env("CLIPMASK_CACHE", cache)
        .env_remove("CLIPMASK_MODEL_BASE_URL")
        .env_remove("RUST_BACKTRACE");
    c
}

fn ok(o: Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{what} failed ({:?}):\n{text}", o.status);
    text
}

/// The resources of the templates, cut to this machine: no GPU, one core, a little memory.
const SMALL: [&str; 4] = ["--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=00:20:00"];

/// `n` images with two labels each; one id with an unknown class (it fails in every run).
fn dataset(root: &Path, n: usize, w: u32, h: u32) -> (PathBuf, PathBuf, Vec<String>) {
    let imgs = root.join("imgs");
    let classes = ["dog", "cat", "person", "car", "bus", "sheep"];
    let mut labels = serde_json::Map::new();
    let mut ids = Vec::new();
    for k in 0..n {
        let id = format!("v{k:03}");
        save_png(&imgs, &id, w, h, 300 + k as u64);
        let l = if k == 3 {
            serde_json::json!(["unicorn"])
        } else {
            serde_json::json!([classes[k % 6], classes[(k + 1) % 6]])
        };
        labels.insert(id.clone(), l);
        ids.push(id);
    }
    let lf = root.join("labels.json");
    std::fs::write(&lf, serde_json::to_string(&labels).unwrap()).unwrap();
    (imgs, lf, ids)
}

/// masks/ and cams/ files by name (bytes).
fn outputs(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for kind in ["masks", "cams"] {
        for p in files_under(&out.join(kind)) {
            m.insert(format!("{kind}/{}", p.display()), std::fs::read(out.join(kind).join(&p)).unwrap());
        }
    }
    m
}

/// Ids listed in every failures file of `out`.
fn failed_ids(out: &Path) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("failures") && n.ends_with(".jsonl") {
            for l in std::fs::read_to_string(e.path()).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                ids.insert(v["id"].as_str().unwrap().to_string());
            }
        }
    }
    ids
}

/// `clipmask status OUT --json`: (exit code, report).
fn status(cache: &Path, imgs: &Path, labels: &Path, out: &Path) -> (Option<i32>, serde_json::Value) {
    let mut c = clipmask(cache);
    c.arg("status").arg(out).arg("--images").arg(imgs).arg("--labels").arg(labels).arg("--json");
    let r = run(&mut c);
    crate::json_schemas::assert_valid("status", &r.stdout);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{}", r.show()));
    (r.code, v)
}

/// The reference: one unsharded run of the same command.
fn single_run(root: &Path, imgs: &Path, labels: &Path) -> PathBuf {
    let out = root.join("single");
    let r = run(generate_cmd(&root.join("cache"), imgs, &out).arg("--labels").arg(labels).arg("--save-cams"));
    assert_eq!(r.code, Some(1), "one id has an unknown class\n{}", r.show());
    out
}

/// `sbatch [sbatch_args] SMALL --chdir ROOT --output LOG TEMPLATE IMGS LABELS OUT --model <tiny>
/// [generate_args]`: one of the templates users copy, on this machine's resources.
fn submit(
    conf: &Path,
    root: &Path,
    sbatch_args: &[&str],
    log: &str,
    template: &str,
    (imgs, labels, out): (&Path, &Path, &Path),
    generate_args: &[&str],
) -> Output {
    slurm(conf, &root.join("cache"), "sbatch")
        .args(sbatch_args)
        .arg("--chdir")
        .arg(root)
        .args(SMALL)
        .arg(format!("--output={}/{log}", root.display()))
        .arg(root_script(template))
        .args([imgs, labels, out])
        .args(generate_args)
        .arg("--model")
        .arg(tiny_model())
        .output()
        .unwrap()
}

/// The output of the jobs whose log names start with `prefix`.
fn job_logs(root: &Path, prefix: &str) -> String {
    files_under(root)
        .iter()
        .filter(|p| p.to_string_lossy().starts_with(prefix))
        .map(|p| std::fs::read_to_string(root.join(p)).unwrap())
        .collect()
}

/// Waits until no task of job `id` is pending or running.
fn wait_job(conf: &Path, cache: &Path, id: &str, limit: Duration) {
    let t = Instant::now();
    loop {
        let o = slurm(conf, cache, "squeue").args(["-h", "-j", id, "-o", "%i %T"]).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text.trim().is_empty() {
            return;
        }
        assert!(t.elapsed() < limit, "job {id} still queued after {limit:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn an_array_of_four_tasks_equals_one_run_and_status_says_complete() {
    let conf = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cache = root.join("cache");
    let (imgs, labels, ids) = dataset(root, 12, 96, 64);
    let single = single_run(root, &imgs, &labels);
    let out = root.join("array");
    // v003 fails in its task: --allow-failures keeps that task's exit status 0.
    let o = submit(
        &conf,
        root,
        &["--wait", "--array=0-3"],
        "slurm-%A_%a.out",
        "generate-array.sbatch",
        (&imgs, &labels, &out),
        &["--device", "cpu", "--save-cams", "--allow-failures"],
    );
    ok(o, "sbatch --wait --array=0-3");
    let logs = job_logs(root, "slurm-");
    assert_eq!(outputs(&out), outputs(&single), "the array's union differs from one run\n{logs}");
    assert_eq!(failed_ids(&out), failed_ids(&single));
    assert_eq!(failed_ids(&out), ["v003".to_string()].into_iter().collect());
    for i in 0..4 {
        assert!(out.join(format!("summary.{i}-of-4.json")).is_file(), "shard {i}'s summary\n{logs}");
        assert!(
            logs.contains(&format!("shard {i}/4 (SLURM_ARRAY_TASK_ID={i}")),
            "the first line names the shard\n{logs}"
        );
    }
    assert!(!out.join("failures.jsonl").exists(), "shards never write the run's failures.jsonl");
    let (code, v) = status(&cache, &imgs, &labels, &out);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!((v["done"].as_u64(), v["failed"].as_array().unwrap().len()), (Some(ids.len() as u64 - 1), 1));
    assert_eq!(v["shards"].as_array().unwrap().len(), 4, "{v:#}");
}

fn root_script(name: &str) -> PathBuf {
    root().join("scripts/slurm").join(name)
}

#[test]
fn a_cancelled_array_task_is_incomplete_until_it_is_requeued() {
    let conf = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cache = root.join("cache");
    let (imgs, labels, _) = dataset(root, 24, 224, 168);
    let single = single_run(root, &imgs, &labels);
    let out = root.join("array");
    let o = submit(
        &conf,
        root,
        &["--parsable", "--array=0-1"],
        "slurm-%A_%a.out",
        "generate-array.sbatch",
        (&imgs, &labels, &out),
        &["--device", "cpu", "--save-cams"],
    );
    let submitted = ok(o, "sbatch --array=0-1");
    let job = submitted.trim().split(';').next().unwrap().to_string();
    // Cancel task 0 once it has written a mask of its own shard.
    let shard0 = |id: &str| clipmask::cluster::shard_of(id, 2) == 0;
    let t = Instant::now();
    loop {
        let masks: Vec<PathBuf> = files_under(&out.join("masks"));
        if masks.iter().any(|p| !is_temp_name(p) && shard0(p.file_stem().unwrap().to_str().unwrap())) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(240), "task 0 wrote no mask");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(slurm(&conf, &cache, "scancel").arg(format!("{job}_0")).output().unwrap(), "scancel");
    wait_job(&conf, &cache, &job, Duration::from_secs(300));
    let (code, v) = status(&cache, &imgs, &labels, &out);
    assert_eq!(code, Some(1), "a cancelled task leaves the run incomplete: {v:#}");
    let missing: Vec<String> = v["missing"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().into()).collect();
    assert!(!missing.is_empty() && missing.iter().all(|id| shard0(id)), "only shard 0's ids are missing: {missing:?}");
    // Requeued, the task finishes its shard; then the run is complete and equals one run.
    ok(slurm(&conf, &cache, "scontrol").args(["requeue", &format!("{job}_0")]).output().unwrap(), "scontrol requeue");
    std::thread::sleep(Duration::from_secs(1));
    wait_job(&conf, &cache, &job, Duration::from_secs(300));
    let (code, v) = status(&cache, &imgs, &labels, &out);
    assert_eq!(code, Some(0), "complete after the requeue: {v:#}");
    assert_eq!(outputs(&out), outputs(&single), "the requeued run differs from one run");
    assert_eq!(failed_ids(&out), failed_ids(&single));
}

#[test]
fn two_srun_tasks_of_one_allocation_split_the_ids() {
    let conf = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cache = root.join("cache");
    let (imgs, labels, _) = dataset(root, 10, 96, 64);
    let single = single_run(root, &imgs, &labels);
    let out = root.join("node");
    let o = submit(
        &conf,
        root,
        &["--wait", "--ntasks-per-node=2"],
        "slurm-node-%j.out",
        "generate-node.sbatch",
        (&imgs, &labels, &out),
        &["--save-cams", "--allow-failures"],
    );
    ok(o, "sbatch generate-node.sbatch");
    let logs = job_logs(root, "slurm-node-");
    for i in 0..2 {
        assert!(logs.contains(&format!("shard {i}/2 (SLURM_PROCID={i} SLURM_NTASKS=2)")), "{logs}");
        assert!(out.join(format!("summary.{i}-of-2.json")).is_file(), "{logs}");
    }
    assert!(logs.contains("device Cpu (--device auto: no GPU visible)"), "{logs}");
    assert_eq!(outputs(&out), outputs(&single), "the two tasks' union differs from one run\n{logs}");
    let (code, _) = status(&cache, &imgs, &labels, &out);
    assert_eq!(code, Some(0));
}
