//! CLIP, one small struct per component, each built from weights by name (the layout of
//! candle-transformers' CLIP): [`weights`] and [`config`] at the bottom, [`layers`] (LayerNorm,
//! attention, residual block) on them, the [`vision`] and [`text`] towers on those, and
//! [`Clip`] on top. Checkpoints come from paths, OpenAI's released names ([`download`]) or the
//! Hugging Face Hub ([`hub`]), in any of the layouts [`layout`] detects.
pub mod config;
pub mod download;
pub mod hub;
pub mod layers;
pub mod layout;
pub mod text;
pub mod torch_pickle;
pub mod vision;
pub mod weights;

pub use config::ClipConfig;
pub use weights::Weights;

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Device, Kind};
use text::TextTransformer;
use vision::VisionTransformer;

/// `x / ||x||` along the last dimension, in `x`'s precision (CLIP's feature normalisation).
pub fn l2_normalize(x: &tch::Tensor) -> tch::Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

/// A loaded CLIP: the vision tower, the text tower (dropped once text features are cached,
/// to save memory) and the logit scale.
pub struct Clip {
    pub config: ClipConfig,
    pub visual: VisionTransformer,
    pub text: Option<TextTransformer>,
    /// exp(logit_scale): 100 for OpenAI weights.
    pub logit_scale: f64,
    pub device: Device,
    pub kind: Kind,
    /// SHA-256 of the checkpoint file, hex; keys the text-feature cache.
    pub digest: String,
}

impl Clip {
    /// CLIP's standard image feature of a photo (bicubic resize of the shorter side, centre
    /// crop, class token through every block), L2-normalised, fp32 (1, E). The zero-shot
    /// protocol of `classify` and `prompts rank`.
    pub fn image_feature(&self, img: &image::RgbImage) -> tch::Tensor {
        use crate::image_input::{to_tensor, zero_shot_crop};
        let res = self.config.input_resolution() as u32;
        let x = to_tensor(&zero_shot_crop(img, res)).to_device(self.device);
        l2_normalize(&self.visual.encode_standard(&x).to_kind(Kind::Float))
    }

    /// Runs both towers in `f` from now on (the default is [`layers::Formulation::for_device`]);
    /// tests select [`layers::Formulation::FAST`] on the CPU to compare it with the reference's.
    pub fn set_formulation(&mut self, f: layers::Formulation) {
        self.visual.set_formulation(f);
        if let Some(t) = &mut self.text {
            t.set_formulation(f);
        }
    }

    /// `spec` is a path, a released name such as `ViT-B/16` (see [`download::resolve`]) or a
    /// Hugging Face Hub repo id such as `openai/clip-vit-base-patch16` (see [`hub`]).
    pub fn load(spec: &str, device: Device, kind: Kind) -> Result<Self> {
        if !Path::new(spec).exists() && download::released(spec).is_none() && hub::is_repo_id(spec) {
            // hf-hub draws its own download bars: the step spinner steps aside meanwhile.
            let found = crate::progress::suspend(|| hub::fetch(spec))?;
            let digest = download::model_digest(&found.weights)?;
            return Self::load_with_digest(&found.weights, digest, found.activation, device, kind);
        }
        let path = download::resolve(spec)?;
        let digest = download::model_digest(&path)?;
        if let Some((name, sha, _)) = download::released(spec) {
            if !Path::new(spec).exists() && digest != sha {
                bail!(
                    "cached {name} at {} is corrupt (SHA-256 {digest} instead of {sha}): delete it and run again",
                    path.display()
                );
            }
        }
        let activation = if path.exists() { hub::activation_beside(&path)? } else { Default::default() };
        Self::load_with_digest(&path, digest, activation, device, kind)
    }

    /// A local checkpoint; the activation comes from a config.json / open_clip_config.json
    /// beside it, QuickGELU otherwise.
    pub fn load_path(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let activation = hub::activation_beside(path)?;
        Self::load_with_digest(path, download::model_digest(path)?, activation, device, kind)
    }

    fn load_with_digest(
        path: &Path,
        digest: String,
        activation: layout::Activation,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let (tensors, _layout) = layout::to_openai(Weights::read(path)?, path)?;
        let w = Weights::new(tensors, kind, device, path);
        let mut config = ClipConfig::infer(&w)?;
        config.activation = activation;
        // The same weights with another activation are another model (text-feature cache key).
        let digest = match activation {
            layout::Activation::QuickGelu => digest,
            layout::Activation::Gelu => format!("{digest}+gelu"),
        };
        let visual = VisionTransformer::new(&w, &config).with_context(|| format!("loading {}", path.display()))?;
        let text = TextTransformer::new(&w, &config).with_context(|| format!("loading {}", path.display()))?;
        // exp in fp32, as the reference's `self.logit_scale.exp()` on its fp32 parameter.
        let logit_scale = w.get_kind("logit_scale", Kind::Float)?.exp().double_value(&[]);
        Ok(Self { config, visual, text: Some(text), logit_scale, device, kind, digest })
    }
}
