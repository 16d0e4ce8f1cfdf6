//! Thin binary over the `clipmask` library: everything, including how errors and panics are
//! printed, is `clipmask::cli::main`, which the Python package's console command runs too.
fn main() {
    std::process::exit(clipmask::cli::main(std::env::args_os().collect()));
}
