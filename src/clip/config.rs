//! The architecture of a CLIP ViT, read off its parameter shapes (docs/method.md §2).
use super::weights::Weights;
use anyhow::{bail, Result};

/// Architecture of a CLIP ViT, inferred from parameter shapes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClipConfig {
    pub vision_width: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub patch: i64,
    /// Side of the pretrained positional grid (14 for ViT-B/16 at 224 px).
    pub grid: i64,
    pub embed_dim: i64,
    pub text_width: i64,
    pub text_layers: i64,
    pub text_heads: i64,
    pub context_length: i64,
    pub vocab_size: i64,
    /// The MLP activation, from the checkpoint's config (QuickGELU for OpenAI's).
    pub activation: super::layout::Activation,
}

impl ClipConfig {
    pub fn input_resolution(&self) -> i64 {
        self.patch * self.grid
    }

    pub fn infer(w: &Weights) -> Result<Self> {
        let src = w.source.display().to_string();
        if !w.tensors.contains_key("visual.conv1.weight") || !w.tensors.contains_key("visual.proj") {
            bail!(
                "{src} is not a CLIP ViT checkpoint: expected OpenAI parameter names such as \
                 visual.conv1.weight, visual.proj and visual.transformer.resblocks.N.*"
            );
        }
        let conv = w.shape("visual.conv1.weight")?;
        if conv.len() != 4 || conv[1] != 3 || conv[2] != conv[3] {
            bail!("{src}: visual.conv1.weight has shape {conv:?}, expected [width, 3, patch, patch]");
        }
        let (vision_width, patch) = (conv[0], conv[2]);
        let pos = w.shape("visual.positional_embedding")?;
        let grid = ((pos[0] - 1) as f64).sqrt().round() as i64;
        if grid * grid + 1 != pos[0] {
            bail!("{src}: visual.positional_embedding has {} rows, expected G*G+1", pos[0]);
        }
        let proj = w.shape("visual.proj")?;
        let tok = w.shape("token_embedding.weight")?;
        let tpos = w.shape("positional_embedding")?;
        let vision_layers = w.count_blocks("visual.transformer.resblocks");
        let text_layers = w.count_blocks("transformer.resblocks");
        if vision_layers == 0 || text_layers == 0 {
            bail!("{src}: no transformer blocks found (visual.transformer.resblocks.N / transformer.resblocks.N)");
        }
        let text_width = tok[1];
        // Every size must be positive (a zero-size weight would divide by zero later), and
        // each tensor must have the rank its use assumes: checked here, not per image.
        for (name, shape, rank) in [
            ("visual.positional_embedding", &pos, 2),
            ("visual.proj", &proj, 2),
            ("token_embedding.weight", &tok, 2),
            ("positional_embedding", &tpos, 2),
        ] {
            if shape.len() != rank || shape.iter().any(|&d| d <= 0) {
                bail!("{src}: {name} has shape {shape:?}: expected {rank} positive sizes");
            }
        }
        if conv.iter().any(|&d| d <= 0) {
            bail!("{src}: visual.conv1.weight has shape {conv:?}: expected positive sizes");
        }
        if pos[1] != vision_width || proj[0] != vision_width {
            bail!(
                "{src}: visual.positional_embedding {pos:?} and visual.proj {proj:?} do not match the vision width \
                 {vision_width} of visual.conv1.weight"
            );
        }
        Ok(Self {
            vision_width,
            vision_layers,
            vision_heads: (vision_width / 64).max(1),
            patch,
            grid,
            embed_dim: proj[1],
            text_width,
            text_layers,
            text_heads: (text_width / 64).max(1),
            context_length: tpos[0],
            vocab_size: tok[0],
            activation: super::layout::Activation::QuickGelu,
        })
    }
}
