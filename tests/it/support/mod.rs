//! The one helper module of the integration tests: paths and the project's Python, the seeded
//! random number generator, fixtures and images (`fixtures`), and running the binary, checking
//! its errors, listing output trees and a tiny HTTP server (`cli`).
mod cli;
mod fixtures;

pub use cli::*;
pub use fixtures::*;
pub use rand::rngs::StdRng;
pub use rand::Rng;

use rand::SeedableRng;
use std::path::PathBuf;
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's Python: `$CLIPMASK_PYTHON`, else `.venv/bin/python`.
pub fn python() -> PathBuf {
    std::env::var_os("CLIPMASK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// A command running the project's Python with tests/python importable.
pub fn python_cmd() -> Command {
    let mut c = Command::new(python());
    c.env("PYTHONPATH", root().join("tests/python"));
    c
}

/// Runs the project's Python with `args`; panics with its output when it fails.
pub fn run_python(args: &[&str]) {
    let out = python_cmd().args(args).output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", python()));
    assert!(
        out.status.success(),
        "python {:?} failed:\n{}\n{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The one random number generator of the tests: rand's `StdRng` (ChaCha12) seeded from `seed`,
/// so that every generated input is reproducible from its seed (the version is pinned by
/// Cargo.lock).
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}
