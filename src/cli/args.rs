//! Flag groups shared by several commands, each defined once with its docs: the model and
//! config, the images and split, and the dense CRF settings. The parser names the flag in its
//! errors; the library speaks of values.
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Shared model flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// CLIP ViT checkpoint: a .pt (OpenAI TorchScript) or .safetensors path, or a released
    /// name (ViT-B/16, ViT-B/32, ViT-L/14, ViT-L/14@336px) downloaded once to the cache.
    #[arg(long, short = 'm', default_value = "ViT-B/16")]
    pub model: String,
    /// Dataset config: a JSON path or a shipped name (voc12, coco14). Holds class names,
    /// prompt names (synonyms), background words, templates, box threshold and palette.
    #[arg(long, short = 'c', default_value = "voc12")]
    pub config: String,
    /// Device: auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision of weights and activations. auto: fp16 on CUDA (as the reference runs there),
    /// fp32 on CPU. fp16: the state OpenAI's clip.load leaves on CUDA (conv, linear and
    /// projection weights fp16, LayerNorms computed in fp32), also on CPU, where it is slow.
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::device::Precision,
    /// Same as --precision fp32 (kept for older scripts).
    #[arg(long, hide = true, conflicts_with = "precision")]
    pub fp32: bool,
}

impl ModelArgs {
    pub fn load(&self) -> Result<(crate::clip::Clip, crate::config::DatasetConfig)> {
        let cfg = crate::config::DatasetConfig::resolve(&self.config)?;
        Ok((self.load_model()?, cfg))
    }

    /// The model alone, for callers that have already read the config.
    pub fn load_model(&self) -> Result<crate::clip::Clip> {
        let device = crate::device::parse_device(&self.device)?;
        let precision = if self.fp32 { crate::device::Precision::Fp32 } else { self.precision };
        let kind = crate::device::kind_for(device, precision);
        crate::clip::Clip::load(&self.model, device, kind)
    }
}

/// The images a command runs on.
#[derive(clap::Args, Debug, Clone)]
pub struct ImageSetArgs {
    /// Directory of images, `<id>.<ext>` with ext jpg, jpeg, png, bmp, gif, webp or tif(f), in
    /// either case. Two files for one id are an error.
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Ids to process, one per line (default: every labelled id, sorted; for `tag`, every
    /// image in --images).
    #[arg(long, value_name = "FILE")]
    pub split: Option<PathBuf>,
}

/// Dense CRF settings, shared by `generate --crf` and `clipmask crf`.
#[derive(clap::Args, Debug, Clone)]
pub struct CrfArgs {
    /// Image the CRF's bilateral kernel sees. faithful: the reference's OpenCV BGR image minus
    /// the mean (104.008, 116.669, 122.675) wrapped to uint8, which produced the published
    /// 75.0 mIoU; rgb: the plain photo (what the paper describes).
    #[arg(long, value_enum, default_value = "faithful")]
    pub crf_image: crate::crf::CrfImage,
    /// Pixels whose largest CRF marginal is below this become 255 (ignored by the
    /// segmentation loss): CLIP-ES's confidence-guided loss at this stage.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f32,
    /// Also write OUT/confidence/<id>.npy: the largest marginal per pixel (float32 H x W), for
    /// losses that weight pixels instead of cutting them.
    #[arg(long)]
    pub save_confidence: bool,
}

impl CrfArgs {
    pub fn options(&self, cfg: &crate::config::DatasetConfig) -> Result<crate::label_maps::CrfOptions> {
        if !(0.0..=1.0).contains(&self.confidence) {
            bail!("--confidence must be in [0, 1], got {}", self.confidence);
        }
        Ok(crate::label_maps::CrfOptions {
            params: cfg.crf,
            image: self.crf_image,
            confidence: self.confidence,
            save_confidence: self.save_confidence,
            stop: None,
        })
    }
}
