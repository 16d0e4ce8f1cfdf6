//! Running the binary with an isolated cache, checking one-line errors, listing output trees,
//! a tiny bounded HTTP server.
use super::root;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// The clipmask binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_clipmask");

/// The binary the CLI tests run: `CLIPMASK_TEST_BIN` when set (to check that a test fails on
/// an earlier build, as a regression test must), else the one built with the tests.
pub fn bin() -> PathBuf {
    std::env::var_os("CLIPMASK_TEST_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(BIN))
}

/// The clipmask binary with `CLIPMASK_CACHE` pointed at `cache` (never the user's cache) and
/// the model-URL override and `RUST_BACKTRACE` removed.
pub fn clipmask(cache: &Path) -> Command {
    let mut c = Command::new(bin());
    c.env("CLIPMASK_CACHE", cache).env_remove("CLIPMASK_MODEL_BASE_URL").env_remove("RUST_BACKTRACE");
    c
}

/// `clipmask generate` on the tiny test model on the CPU with `--images` and `--out` set and the
/// cache at `cache`: the one spelling of the command that the tests add their flags to.
pub fn generate_cmd(cache: &Path, images: &Path, out: &Path) -> Command {
    let mut c = clipmask(cache);
    c.args(["generate", "--device", "cpu", "--model"])
        .arg(super::tiny_model())
        .arg("--images")
        .arg(images)
        .arg("--out")
        .arg(out);
    c
}

/// A cache shared by the tests that download nothing (target/test-cache).
pub fn shared_cache() -> PathBuf {
    root().join("target/test-cache")
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn show(&self) -> String {
        format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

pub fn run(cmd: &mut Command) -> Run {
    let Output { status, stdout, stderr } = cmd.output().expect("spawn clipmask");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

pub const PANIC_MARKERS: &[&str] = &["panicked", "stack backtrace", "Exception raised from", "RUST_BACKTRACE"];

/// The lines of `stderr` that are neither empty nor the step lines a command logs before its
/// work when stderr is not a terminal ("clipmask: loading ...", `progress::STEP_PREFIX`).
pub fn message_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with(clipmask::progress::STEP_PREFIX)).collect()
}

/// Exit code `code`, exactly one message line on stderr (step lines aside), starting with
/// "error:", no panic or C++ backtrace text. Returns the line.
pub fn assert_one_line_error(r: &Run, code: i32) -> String {
    assert_eq!(r.code, Some(code), "expected exit {code}\n{}", r.show());
    let lines = message_lines(&r.stderr);
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr\n{}", r.show());
    for m in PANIC_MARKERS {
        assert!(!r.stderr.contains(m), "stderr contains {m:?}\n{}", r.show());
    }
    assert!(lines[0].starts_with("error: "), "error line should start with 'error: '\n{}", r.show());
    lines[0].to_string()
}

/// Every regular file under `dir`, relative paths, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A temporary file name left by `write_atomic` / `download` (".<name>.tmp-<pid>", ".<name>.part-<pid>").
pub fn is_temp_name(p: &Path) -> bool {
    let n = p.file_name().unwrap().to_string_lossy();
    n.starts_with('.') && (n.contains(".tmp-") || n.contains(".part-"))
}

/// A bounded HTTP/1.1 server on 127.0.0.1: serves `routes` (path -> body) for GET, 404 otherwise;
/// answers at most `max_requests` requests, then its thread ends. Records requested paths.
pub struct Server {
    pub base: String,
    pub requests: Arc<Mutex<Vec<String>>>,
}

pub fn serve(routes: Vec<(String, Vec<u8>)>, max_requests: usize) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for _ in 0..max_requests {
            let Ok((mut stream, _)) = listener.accept() else { return };
            stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Drain the headers.
            loop {
                let mut l = String::new();
                match reader.read_line(&mut l) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if l == "\r\n" || l == "\n" => break,
                    Ok(_) => {}
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push(path.clone());
            let body = routes.iter().find(|(p, _)| *p == path).map(|(_, b)| b.clone());
            let (status, body) = match body {
                Some(b) => ("200 OK", b),
                None => ("404 Not Found", b"not found".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    });
    Server { base: format!("http://127.0.0.1:{port}"), requests }
}

/// Decodes a PNG fully (checks it is not partial).
pub fn png_decodes(p: &Path) -> bool {
    let Ok(f) = std::fs::File::open(p) else { return false };
    let dec = png::Decoder::new(BufReader::new(f));
    let Ok(mut r) = dec.read_info() else { return false };
    let mut buf = vec![0; r.output_buffer_size().unwrap_or(0)];
    r.next_frame(&mut buf).is_ok()
}
