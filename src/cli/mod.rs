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
pub mod tag;

#[derive(Parser, Debug)]
#[command(
    name = "clipmask",
    version,
    about = "Pixel pseudo-masks from image-level labels with a frozen CLIP ViT (CLIP-ES, CVPR 2023)",
    long_about = "clipmask turns image-level labels (\"this photo contains a dog and a person\") into \
pixel-level pseudo-masks for weakly supervised semantic segmentation, computing CLIP-ES exactly: \
softmax-GradCAM over labels and background words, class-aware attention affinity, optional dense CRF.\n\n\
Models: a path to an OpenAI CLIP ViT checkpoint (.pt TorchScript archive) or a .safetensors file \
with the same parameter names, or a released name (ViT-B/16, ViT-B/32, ViT-L/14, ViT-L/14@336px) \
fetched once into ~/.cache/clipmask (CLIPMASK_CACHE) and verified by SHA-256."
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

/// Parses the command line and runs it; returns the process exit code.
pub fn run() -> Result<i32> {
    // Checked before clap, so that CUDA is only probed when the version is asked for.
    if matches!(std::env::args().nth(1).as_deref(), Some("--version" | "-V")) {
        println!("{}", version_text());
        return Ok(0);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Classify(a) => classify::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Crf(a) => crf::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Prompts(a) => prompts::run(&a),
        Command::Tag(a) => tag::run(&a),
    }
}

pub use crate::errors::format_error;
