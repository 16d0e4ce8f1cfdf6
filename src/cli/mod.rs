//! Command-line interface: one file per subcommand, each a clap `Args` struct with every flag
//! documented, and a `run` that calls the library.
use anyhow::Result;

pub use args::ModelArgs;
use clap::{Parser, Subcommand};

pub mod args;
pub mod classify;
pub mod crf;
pub mod eval;
pub mod generate;
pub mod prompts;
pub mod status;
pub mod tag;

#[derive(Parser, Debug)]
#[command(
    name = "clipmask",
    version,
    about = "Pixel pseudo-masks from image-level labels with a frozen CLIP ViT (CLIP-ES, CVPR 2023)",
    long_about = "clipmask turns image-level labels (\"this photo contains a dog and a person\") into \
pixel-level pseudo-masks for weakly supervised semantic segmentation, computing CLIP-ES exactly: \
softmax-GradCAM over labels and background words, class-aware attention affinity, optional dense CRF.\n\n\
Models: a path to a CLIP ViT checkpoint (OpenAI .pt TorchScript archive, .safetensors, or .bin \
torch.save state dict, with OpenAI, OpenCLIP or Hugging Face parameter names), a released name \
(ViT-B/16, ViT-B/32, ViT-L/14, ViT-L/14@336px) fetched once into ~/.cache/clipmask (CLIPMASK_CACHE) \
and verified by SHA-256, or a Hugging Face repo id org/name (openai/clip-vit-base-patch16) through \
the Hugging Face cache."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Zero-shot class probabilities per image (CLIP's standard protocol): check a model works.
    Classify(classify::ClassifyArgs),
    /// Pseudo-masks (and optionally the maps) for a dataset with image-level labels.
    Generate(generate::GenerateArgs),
    /// Dense CRF + confidence on maps saved by `generate --save-cams` (try CRF settings without recomputing maps).
    Crf(crf::CrfCmdArgs),
    /// Score label maps against ground truth (mIoU and more), or sweep the background exponent on saved maps.
    Eval(eval::EvalArgs),
    /// Prompt tools: show what the text encoder reads; rank templates by sharpness.
    Prompts(prompts::PromptsArgs),
    /// Predict image-level labels with CLIP itself (TagCLIP, AAAI 2024), for data without labels.
    Tag(tag::TagArgs),
    /// Is a run complete? Done, failed and missing ids per shard and in total, stale temporary files.
    Status(status::StatusArgs),
}

/// `clipmask --version`: the crate, the libtorch it was built against, and whether CUDA is
/// visible (the first thing to check when a GPU run falls back or fails).
pub fn version_text() -> String {
    let cuda = if tch::Cuda::is_available() {
        format!(
            "available, {} device(s), cuDNN {}",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() { "yes" } else { "no" }
        )
    } else {
        "no device visible to libtorch (no GPU, no driver, a CPU-only torch, or CUDA_VISIBLE_DEVICES)".to_string()
    };
    format!(
        "clipmask {}\nlibtorch {} (built against)\nCUDA: {cuda}",
        env!("CARGO_PKG_VERSION"),
        env!("CLIPMASK_TORCH_VERSION")
    )
}

/// Standard output was closed by its reader (`clipmask prompts show | head -1`): the command
/// stops there and exits 0 without a message, as Unix filters do.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// Writes `line` and a newline to standard output; a closed pipe becomes [`StdoutClosed`].
pub fn print_line(line: impl std::fmt::Display) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
        _ => anyhow::Error::new(e).context("cannot write to standard output"),
    })
}

/// Whether `e` is [`StdoutClosed`].
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StdoutClosed>().is_some()
}

/// Whether a panic's message is the one `println!` panics with on a closed standard output
/// (std's wording), for the paths that still print with `println!`.
pub fn is_stdout_closed_panic(message: &str) -> bool {
    message.contains("failed printing to stdout") && message.contains("Broken pipe")
}

/// Parses the process's command line and runs it; returns the process exit code.
pub fn run() -> Result<i32> {
    run_from(std::env::args_os().collect())
}

/// Parses `args` (the program name first) and runs the command; returns the exit code.
/// Usage errors, `--help` and `--version` print and exit as clap does.
pub fn run_from(args: Vec<std::ffi::OsString>) -> Result<i32> {
    // Checked before clap, so that CUDA is only probed when the version is asked for.
    if matches!(args.get(1).and_then(|a| a.to_str()), Some("--version" | "-V")) {
        print_line(version_text())?;
        return Ok(0);
    }
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Classify(a) => classify::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Crf(a) => crf::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Prompts(a) => prompts::run(&a),
        Command::Tag(a) => tag::run(&a),
        Command::Status(a) => status::run(&a),
    }
}

pub use crate::errors::format_error;

/// The whole program for `args` (the program name first): what `main` of the binary and the
/// Python package's console command both run, so that they behave the same. Returns the exit
/// code: 0 done, 1 some images failed (the command's own rule), 2 an error (one line on
/// stderr, never a backtrace), 130/143 interrupted.
pub fn main(args: Vec<std::ffi::OsString>) -> i32 {
    // libtorch prints C++ backtraces with its errors unless told not to.
    if std::env::var_os("TORCH_SHOW_CPP_STACKTRACES").is_none() {
        std::env::set_var("TORCH_SHOW_CPP_STACKTRACES", "0");
    }
    // Panics are caught per image; print one line, never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = crate::errors::panic_message(info.payload());
        if std::env::var_os("CLIPMASK_DEBUG").is_some() {
            eprintln!("internal error: {msg} ({:?})", info.location());
        }
    }));
    let code = match std::panic::catch_unwind(|| run_from(args)) {
        Err(p) => {
            let msg = crate::errors::panic_message(p.as_ref());
            // `println!` on a pipe its reader closed (`| head`): a quiet end, as Unix tools do.
            if is_stdout_closed_panic(&msg) {
                return 0;
            }
            eprintln!("error: {msg}");
            return 2;
        }
        Ok(r) => r,
    };
    match code {
        Ok(code) => code,
        // Standard output closed by its reader: stop quietly, exit 0.
        Err(e) if is_stdout_closed(&e) => 0,
        Err(e) => {
            eprintln!("error: {}", format_error(&e));
            2
        }
    }
}
