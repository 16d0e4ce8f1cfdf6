//! Thin binary over the `clipmask` library: parse, dispatch, print errors without backtraces.
fn main() {
    // libtorch prints C++ backtraces with its errors unless told not to.
    if std::env::var_os("TORCH_SHOW_CPP_STACKTRACES").is_none() {
        std::env::set_var("TORCH_SHOW_CPP_STACKTRACES", "0");
    }
    let code = match clipmask::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", clipmask::cli::format_error(&e));
            2
        }
    };
    std::process::exit(code);
}
