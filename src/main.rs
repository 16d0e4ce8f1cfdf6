//! Thin binary over the `clipmask` library: parse, dispatch, print errors without backtraces.
fn main() {
    // libtorch prints C++ backtraces with its errors unless told not to.
    if std::env::var_os("TORCH_SHOW_CPP_STACKTRACES").is_none() {
        std::env::set_var("TORCH_SHOW_CPP_STACKTRACES", "0");
    }
    // Panics are caught per image; print one line, never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = clipmask::errors::panic_message(info.payload());
        if std::env::var_os("CLIPMASK_DEBUG").is_some() {
            eprintln!("internal error: {msg} ({:?})", info.location());
        }
    }));
    let code = match std::panic::catch_unwind(clipmask::cli::run) {
        Err(p) => {
            eprintln!("error: {}", clipmask::errors::panic_message(p.as_ref()));
            std::process::exit(2);
        }
        Ok(r) => r,
    };
    let code = match code {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", clipmask::cli::format_error(&e));
            2
        }
    };
    std::process::exit(code);
}
