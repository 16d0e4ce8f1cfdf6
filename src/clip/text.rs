//! The CLIP text transformer (docs/method.md §3): causal mask, EOT pooling, projection.
use super::layers::{Formulation, LayerNorm, ResidualBlock};
use super::{ClipConfig, Weights};
use anyhow::Result;
use tch::{Kind, Tensor};

pub struct TextTransformer {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    blocks: Vec<ResidualBlock>,
    ln_final: LayerNorm,
    text_projection: Tensor,
    mask: Tensor,
    pub context_length: i64,
}

impl TextTransformer {
    pub fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let blocks = (0..cfg.text_layers)
            .map(|i| ResidualBlock::new(w, &format!("transformer.resblocks.{i}"), cfg.text_heads, cfg.activation))
            .collect::<Result<Vec<_>>>()?;
        let l = cfg.context_length;
        // Causal mask: -inf above the diagonal.
        let mask = Tensor::full([l, l], f64::NEG_INFINITY, (Kind::Float, w.device())).triu(1).to_kind(w.kind());
        Ok(Self {
            token_embedding: w.get("token_embedding.weight")?,
            positional_embedding: w.get("positional_embedding")?,
            blocks,
            ln_final: LayerNorm::new(w, "ln_final")?,
            text_projection: w.get("text_projection")?,
            mask,
            context_length: l,
        })
    }

    /// Runs every block in `f` from now on.
    pub fn set_formulation(&mut self, f: Formulation) {
        for b in &mut self.blocks {
            b.attn.formulation = f;
        }
    }

    /// tokens: (N, context) int64 -> (N, E) unnormalised text features.
    pub fn encode(&self, tokens: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let tokens = tokens.to_device(self.token_embedding.device());
        let mut x = self.token_embedding.index_select(0, &tokens.reshape([-1])).reshape([
            tokens.size()[0],
            tokens.size()[1],
            -1,
        ]);
        x += &self.positional_embedding;
        // Nothing reads the text tower's attention: fused where the formulation asks for it.
        for block in &self.blocks {
            x = block.output(&x, Some(&self.mask), true);
        }
        let x = self.ln_final.forward(&x);
        // EOT is the largest token id in each row.
        let eot = tokens.argmax(-1, false);
        let n = tokens.size()[0];
        let rows = Tensor::arange(n, (Kind::Int64, x.device()));
        let pooled = x.index(&[Some(rows), Some(eot)]);
        pooled.matmul(&self.text_projection)
    }
}
