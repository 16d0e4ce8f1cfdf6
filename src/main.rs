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
            let msg = clipmask::errors::panic_message(p.as_ref());
            // `println!` on a pipe its reader closed (`| head`): a quiet end, as Unix tools do.
            if clipmask::cli::is_stdout_closed_panic(&msg) {
                std::process::exit(0);
            }
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
        Ok(r) => r,
    };
    let code = match code {
        Ok(code) => code,
        // Standard output closed by its reader: stop quietly, exit 0.
        Err(e) if clipmask::cli::is_stdout_closed(&e) => 0,
        Err(e) => {
            eprintln!("error: {}", clipmask::cli::format_error(&e));
            2
        }
    };
    std::process::exit(code);
}
