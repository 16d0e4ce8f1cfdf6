//! What a user sees from the first second: under a pseudo-terminal, the step spinner (model
//! load, text features) before the first image, then a bar whose first line has no "inf", no
//! "ETA 0s" and rates with one decimal; without a terminal, one log line per step; and a quiet
//! end when the reader of stdout goes away (`prompts show | head -1`).
use crate::support::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// Terminal escape sequences (CSI `ESC [ ... final`, and two-byte `ESC x`) removed.
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// The screen states a transcript went through: its text cut at carriage returns and newlines
/// (every redraw of the bar starts with `\r`), trimmed, empty ones left out.
fn screen_lines(transcript: &str) -> Vec<String> {
    strip_ansi(transcript).split(['\r', '\n']).map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

/// `n` labelled photos (every one a dog) in `dir/imgs`, their labels in `dir/labels.json`.
fn dataset(dir: &Path, n: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let imgs = dir.join("imgs");
    let mut labels = serde_json::Map::new();
    for i in 0..n {
        save_png(&imgs, &format!("im{i}"), 160, 120, 40 + i);
        labels.insert(format!("im{i}"), serde_json::json!(["dog"]));
    }
    let lf = dir.join("labels.json");
    std::fs::write(&lf, serde_json::Value::Object(labels).to_string()).unwrap();
    (imgs, lf)
}

/// The rate field of a bar line ("{pos}/{len} images  {rate}  ETA ..."): "- images/s" before a
/// measure, else a number with exactly one decimal and its unit.
fn assert_rate_field(line: &str, n: u64) {
    let after = line.split_once(&format!("/{n} images  ")).map(|x| x.1).unwrap_or_else(|| panic!("no count: {line:?}"));
    let rate = after.split("  ETA").next().unwrap_or("");
    if rate == "- images/s" {
        return;
    }
    let (num, unit) = rate.split_once(' ').unwrap_or_else(|| panic!("rate {rate:?} in {line:?}"));
    assert!(unit == "images/s" || unit == "s/image", "unit of {rate:?} in {line:?}");
    let (int, dec) = num.split_once('.').unwrap_or_else(|| panic!("rate {rate:?} has no decimal: {line:?}"));
    assert!(
        !int.is_empty()
            && int.chars().all(|c| c.is_ascii_digit())
            && dec.len() == 1
            && dec.chars().all(|c| c.is_ascii_digit()),
        "rate {rate:?} must have one decimal: {line:?}"
    );
}

/// The ETA field of a bar line: "-" until a few images were measured, then "<1s", "42s",
/// "2m 05s" or "1h 03m", never "0s".
fn assert_eta_field(line: &str) {
    let eta = line.split_once("  ETA ").map(|x| x.1).unwrap_or_else(|| panic!("no ETA: {line:?}"));
    let eta = eta.split("  ").next().unwrap_or("");
    let duration = eta.split(' ').all(|part| {
        let digits = part.trim_end_matches(['s', 'm', 'h']);
        part.len() == digits.len() + 1 && !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
    });
    assert!(eta == "-" || eta == "<1s" || (duration && eta != "0s"), "ETA {eta:?} in {line:?}");
}

#[test]
fn generate_on_a_terminal_shows_its_steps_then_a_sane_bar() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 12;
    let (imgs, labels) = dataset(tmp.path(), n);
    let transcript = tmp.path().join("terminal.txt");
    // A fresh cache: the text features are encoded, so both steps run.
    let cache = tmp.path().join("cache");
    let mut cmd = python_cmd();
    cmd.arg(root().join("tests/python/pty_run.py"))
        .arg(&transcript)
        .arg(bin())
        .args(["generate", "--device", "cpu", "--model"])
        .arg(tiny_model())
        .arg("--images")
        .arg(&imgs)
        .arg("--labels")
        .arg(&labels)
        .arg("--out")
        .arg(tmp.path().join("out"))
        .env("CLIPMASK_CACHE", &cache)
        .env_remove("CLIPMASK_MODEL_BASE_URL")
        .env_remove("RUST_BACKTRACE");
    let r = run(&mut cmd);
    let text = String::from_utf8_lossy(&std::fs::read(&transcript).unwrap()).into_owned();
    assert_eq!(r.code, Some(0), "{}\n--- terminal\n{text}", r.show());
    let lines = screen_lines(&text);
    let first = |what: &str, f: &dyn Fn(&str) -> bool| {
        lines.iter().position(|l| f(l)).unwrap_or_else(|| panic!("no {what} on the terminal:\n{}", lines.join("\n")))
    };
    let loading = first("model step", &|l| l.contains("loading ") && l.contains("(fp32, cpu)"));
    let encoding = first("text step", &|l| l.contains("encoding 20 classes x 1 template"));
    let bar = first("bar", &|l| l.contains(&format!("/{n} images  ")));
    let one_done = first("bar after an image", &|l| l.contains(&format!("1/{n} images")));
    assert!(loading < encoding && encoding < bar && bar <= one_done, "steps before the bar:\n{}", lines.join("\n"));
    // On a terminal the steps are a spinner, not the log lines written to files.
    assert!(!text.contains(clipmask::progress::STEP_PREFIX), "log lines on a terminal:\n{text}");

    let bars: Vec<&String> = lines.iter().filter(|l| l.contains(&format!("/{n} images  "))).collect();
    for (i, l) in bars.iter().enumerate() {
        let what = if i == 0 { "the first bar line" } else { "a bar line" };
        for bad in ["inf", "NaN", "ETA 0s"] {
            assert!(!l.contains(bad), "{what} shows {bad:?}: {l:?}");
        }
        assert_rate_field(l, n);
        assert_eta_field(l);
    }
    assert!(
        bars.iter().any(|l| l.contains(" images/s  ") && !l.contains("- images/s")),
        "no measured rate:\n{bars:#?}"
    );
}

#[test]
fn without_a_terminal_each_step_is_one_log_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (imgs, labels) = dataset(tmp.path(), 2);
    let r = run(generate_cmd(&tmp.path().join("cache"), &imgs, &tmp.path().join("out")).arg("--labels").arg(&labels));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let steps: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with(clipmask::progress::STEP_PREFIX)).collect();
    assert_eq!(steps.len(), 2, "one line per step:\n{}", r.stderr);
    assert!(steps[0].contains("loading ") && steps[0].contains("(fp32, cpu)"), "{}", r.stderr);
    assert!(steps[1].contains("encoding 20 classes x 1 template"), "{}", r.stderr);
    // No escape sequence or spinner frame in a log.
    assert!(!r.stderr.contains('\x1b') && !r.stderr.contains('\r'), "{:?}", r.stderr);
    // A second run reads the text features from the cache: only the model step remains.
    let summary = tmp.path().join("summary.json");
    let r = run(generate_cmd(&tmp.path().join("cache"), &imgs, &tmp.path().join("out2"))
        .arg("--labels")
        .arg(&labels)
        .arg("--summary-json")
        .arg(&summary));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with(clipmask::progress::STEP_PREFIX)).count(), 1, "{}", r.stderr);
    // The summary says over how many workers each stage's seconds are summed.
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let workers = |k: &str| s["stage_workers"][k].as_u64().unwrap_or_else(|| panic!("no stage_workers.{k}: {s}"));
    assert_eq!(workers("model"), 1, "{s}");
    assert_eq!(workers("write"), 1, "one writer without the CRF: {s}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!((1..=cores.max(4)).contains(&workers("decode")), "{s}");
}

#[test]
fn prompts_show_into_a_closed_pipe_ends_quietly() {
    // The reader is gone before the first line: every write meets EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = clipmask(&shared_cache())
        .args(["prompts", "show", "--config", "voc12"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "stderr must stay empty: {stderr:?}");

    // As typed in a shell: `| head -1` gets the first line, clipmask says nothing.
    let line = format!("set -o pipefail 2>/dev/null; {:?} prompts show --config voc12 | head -1", bin());
    let out = Command::new("bash")
        .arg("-c")
        .arg(&line)
        .env("CLIPMASK_CACHE", shared_cache())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{line}: {stderr}");
    assert!(stderr.is_empty(), "stderr must stay empty: {stderr:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("# config voc12"), "{:?}", out.stdout);
}

#[test]
fn eval_into_a_closed_pipe_ends_quietly() {
    // eval prints its table through the CLI's print_line: a closed pipe ends it quietly too.
    let tmp = tempfile::tempdir().unwrap();
    let (pred, gt) = (tmp.path().join("pred"), tmp.path().join("gt"));
    for d in [&pred, &gt] {
        std::fs::create_dir_all(d).unwrap();
        image::GrayImage::from_fn(8, 6, |x, _| image::Luma([(x < 4) as u8 * 12])).save(d.join("a.png")).unwrap();
    }
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = clipmask(&shared_cache())
        .args(["eval", "--pred"])
        .arg(&pred)
        .arg("--gt")
        .arg(&gt)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("Broken pipe") && !stderr.contains("error"), "{stderr:?}");
}
