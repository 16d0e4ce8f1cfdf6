//! The CLIP vision transformer for any input size (docs/method.md §1–2).
use super::layers::{Formulation, LayerNorm, ResidualBlock};
use super::{ClipConfig, Weights};
use anyhow::Result;
use tch::{Kind, Tensor};

pub struct VisionTransformer {
    conv1: Tensor,
    class_embedding: Tensor,
    /// Pretrained (G*G+1, D) table, kept in fp32 for interpolation.
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    pub blocks: Vec<ResidualBlock>,
    pub ln_post: LayerNorm,
    proj: Tensor,
    pub patch: i64,
    pub grid: i64,
    kind: Kind,
}

/// Output of the blocks before the last one (docs/method.md §2): tokens entering block L and the
/// head-averaged attention of each block run so far.
pub struct Trunk {
    /// (B, n+1, D), no gradient.
    pub tokens: Tensor,
    /// One (B, n+1, n+1) map per block 1..L-1.
    pub attentions: Vec<Tensor>,
}

impl VisionTransformer {
    pub fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let blocks = (0..cfg.vision_layers)
            .map(|i| {
                ResidualBlock::new(w, &format!("visual.transformer.resblocks.{i}"), cfg.vision_heads, cfg.activation)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1: w.get("visual.conv1.weight")?,
            class_embedding: w.get("visual.class_embedding")?,
            positional_embedding: w.get_kind("visual.positional_embedding", Kind::Float)?,
            ln_pre: LayerNorm::new(w, "visual.ln_pre")?,
            blocks,
            ln_post: LayerNorm::new(w, "visual.ln_post")?,
            proj: w.get("visual.proj")?,
            patch: cfg.patch,
            grid: cfg.grid,
            kind: w.kind(),
        })
    }

    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// The formulation the blocks run ([`Formulation::for_device`] unless set).
    pub fn formulation(&self) -> Formulation {
        self.blocks.first().map_or(Formulation::REFERENCE, |b| b.attn.formulation)
    }

    /// Runs every block in `f` from now on.
    pub fn set_formulation(&mut self, f: Formulation) {
        for b in &mut self.blocks {
            b.attn.formulation = f;
        }
    }

    /// Positional table for an gh x gw grid (docs/method.md §1): the G x G part resized bilinearly
    /// (align_corners = false), class row first; `round_fp16` reproduces the reference, which
    /// rounds the interpolated table to fp16 even in fp32.
    pub fn positional(&self, gh: i64, gw: i64, round_fp16: bool) -> Tensor {
        let pe = &self.positional_embedding;
        let d = pe.size()[1];
        let first = pe.narrow(0, 0, 1);
        let grid = pe.narrow(0, 1, self.grid * self.grid).transpose(0, 1).reshape([1, d, self.grid, self.grid]);
        let grid = if gh == self.grid && gw == self.grid {
            grid
        } else {
            grid.upsample_bilinear2d([gh, gw], false, None, None)
        };
        let grid = grid.reshape([d, gh * gw]).transpose(0, 1);
        let table = Tensor::cat(&[first, grid], 0);
        if round_fp16 {
            table.to_kind(Kind::Half).to_kind(Kind::Float)
        } else {
            table
        }
    }

    /// Patch embedding + class token + positions + ln_pre: (B,3,H,W) -> (B, n+1, D).
    pub fn embed(&self, image: &Tensor, positional: &Tensor) -> Tensor {
        let x = image.to_kind(self.kind).conv2d::<Tensor>(&self.conv1, None, [self.patch], [0], [1], 1);
        let (b, d, _, _) = x.size4().expect("conv output is 4-d");
        let x = x.reshape([b, d, -1]).transpose(1, 2);
        let cls = self.class_embedding.reshape([1, 1, d]).expand([b, 1, d], false);
        let x = Tensor::cat(&[cls, x], 1) + positional.to_kind(self.kind);
        self.ln_pre.forward(&x)
    }

    /// Runs blocks `0..upto` without gradient, keeping each block's attention.
    pub fn trunk(&self, x: Tensor, upto: usize) -> Trunk {
        self.trunk_keeping(x, upto, upto)
    }

    /// As [`Self::trunk`], keeping only the last `keep` blocks' attention (n² each: for large
    /// inputs, keeping all would dominate memory). The blocks before those run
    /// [`ResidualBlock::output`]: fused attention where the formulation asks for it, since
    /// nothing reads their probabilities.
    pub fn trunk_keeping(&self, x: Tensor, upto: usize, keep: usize) -> Trunk {
        let _guard = tch::no_grad_guard();
        let mut x = x;
        let mut attentions = Vec::with_capacity(keep.min(upto));
        for (i, block) in self.blocks[..upto].iter().enumerate() {
            if i + keep >= upto {
                let (y, a) = block.forward(&x, None);
                x = y;
                attentions.push(a);
            } else {
                x = block.output(&x, None, false);
            }
        }
        Trunk { tokens: x, attentions }
    }

    /// CLIP-ES image feature (docs/method.md §2): ln_post, mean over PATCH tokens, @ proj.
    pub fn patch_pool(&self, x: &Tensor) -> Tensor {
        let n = x.size()[1];
        let patches = self.ln_post.forward(&x.narrow(1, 1, n - 1));
        patches.mean_dim(1, false, patches.kind()).matmul(&self.proj)
    }

    /// Per-patch features in the joint space: ln_post of every patch token @ proj, (B, n, E).
    pub fn patch_features(&self, x: &Tensor) -> Tensor {
        let n = x.size()[1];
        self.ln_post.forward(&x.narrow(1, 1, n - 1)).matmul(&self.proj)
    }

    /// Standard CLIP image feature: ln_post of the class token @ proj.
    pub fn class_pool(&self, x: &Tensor) -> Tensor {
        self.ln_post.forward(&x.select(1, 0)).matmul(&self.proj)
    }

    /// Standard CLIP image features for a batch of fixed-size crops (zero-shot protocol).
    pub fn encode_standard(&self, images: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let (_, _, h, w) = images.size4().expect("images are (B,3,H,W)");
        let pos = self.positional(h / self.patch, w / self.patch, false);
        let x = self.embed(images, &pos);
        let t = self.trunk_keeping(x, self.layers(), 0);
        self.class_pool(&t.tokens)
    }
}
