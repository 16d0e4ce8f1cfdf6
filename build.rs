//! Link-time set-up for libtorch from the project's Python environment.
//!
//! torch-sys finds libtorch through `python` (LIBTORCH_USE_PYTORCH=1) but sets no rpath and
//! lets the linker drop libtorch_cuda as "not needed". We add both so that the binary runs
//! without LD_LIBRARY_PATH and `tch::Cuda::is_available()` works on a GPU machine.
use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH_LIB") {
        return Some(PathBuf::from(dir));
    }
    let python = match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin").join("python"),
        None => PathBuf::from("python3"),
    };
    let out = Command::new(python)
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // The real path: `.venv` is a symlink into a shared cache and differs between clones.
    let dir = dir.canonicalize().unwrap_or(dir);
    dir.is_dir().then_some(dir)
}

/// `torch.__version__` of the Python environment libtorch comes from, for `clipmask --version`.
fn torch_version() -> String {
    let python = match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin").join("python"),
        None => PathBuf::from("python3"),
    };
    Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn main() {
    println!("cargo:rustc-env=CLIPMASK_TORCH_VERSION={}", torch_version());
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(dir) = torch_lib_dir() else {
        println!("cargo:warning=could not locate torch/lib; the binary will need LD_LIBRARY_PATH");
        return;
    };
    // Re-run when the environment moves (the rpath points at it).
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
