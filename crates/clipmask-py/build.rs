//! The extension finds libtorch in the installed `torch` package, never in a vendored copy:
//! its RUNPATH is `$ORIGIN/../torch/lib` (site-packages/clipmask/_native.abi3.so ->
//! site-packages/torch/lib), and `clipmask/__init__.py` imports torch first as well. Like the
//! binary (../../build.rs), libtorch_cuda is linked even though no symbol of it is used, so that
//! CUDA is available when the installed torch has it.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
    let python = match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => std::path::PathBuf::from(venv).join("bin").join("python"),
        None => std::path::PathBuf::from("python3"),
    };
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let lib = std::process::Command::new(python)
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = lib.filter(|d| d.join("libtorch_cuda.so").exists()) {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-arg-cdylib=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-cdylib=-ltorch_cuda");
        println!("cargo:rustc-link-arg-cdylib=-Wl,--as-needed");
    }
}
