//! The pieces both CLIP towers share: layer norm, the residual attention block
//! (docs/method.md §2: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), QuickGELU for OpenAI weights,
//! GELU where the checkpoint's config says so), weights by name.
use super::layout::Activation;
use crate::clip::Weights;
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// LayerNorm that runs in fp32 whatever the activations are, as OpenAI's CLIP does.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(w: &Weights, prefix: &str) -> Result<Self> {
        Ok(Self {
            weight: w.get_kind(&format!("{prefix}.weight"), Kind::Float)?,
            bias: w.get_kind(&format!("{prefix}.bias"), Kind::Float)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let d = self.weight.size()[0];
        x.to_kind(Kind::Float).layer_norm([d], Some(&self.weight), Some(&self.bias), 1e-5, true).to_kind(kind)
    }
}

pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(w: &Weights, prefix: &str) -> Result<Self> {
        Ok(Self { weight: w.get(&format!("{prefix}.weight"))?, bias: w.get(&format!("{prefix}.bias"))? })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// Which of two formulations runs where clipmask has both (docs/method.md, "Which steps differ
/// on CUDA"). They agree to rounding; the CPU default is the one the parity tests hold bit for
/// bit against the reference, and tests select the other on the CPU to prove the two agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formulation {
    /// `scaled_dot_product_attention` (flash / memory-efficient kernels) in the blocks whose
    /// attention probabilities nothing reads; explicit softmax where CAA or GradCAM reads them.
    pub fused_attention: bool,
    /// One batched kernel where the reference path loops over images, labels or channels only
    /// for CPU bit-parity (the fp16 score product, GradCAM's fp16 channel sum).
    pub batched: bool,
}

impl Formulation {
    /// The reference's computation, loops and explicit softmax included (the CPU default).
    pub const REFERENCE: Formulation = Formulation { fused_attention: false, batched: false };
    /// Fused attention and batched kernels (the CUDA default).
    pub const FAST: Formulation = Formulation { fused_attention: true, batched: true };

    /// The default on a device: [`Self::FAST`] on CUDA, [`Self::REFERENCE`] elsewhere; the
    /// environment variable `CLIPMASK_FORMULATION=fast|reference` overrides it (so that
    /// `scripts/gpu-check.sh --dry-run` runs the CUDA formulation on the CPU).
    pub fn for_device(device: Device) -> Formulation {
        match std::env::var("CLIPMASK_FORMULATION").as_deref() {
            Ok("fast") => Formulation::FAST,
            Ok("reference") => Formulation::REFERENCE,
            _ if device.is_cuda() => Formulation::FAST,
            _ => Formulation::REFERENCE,
        }
    }
}

/// `nn.MultiheadAttention` with packed in-projection, returning head-averaged probabilities.
pub struct Attention {
    in_proj: Linear,
    out_proj: Linear,
    heads: i64,
    pub formulation: Formulation,
}

impl Attention {
    pub fn new(w: &Weights, prefix: &str, heads: i64) -> Result<Self> {
        Ok(Self {
            in_proj: Linear {
                weight: w.get(&format!("{prefix}.in_proj_weight"))?,
                bias: w.get(&format!("{prefix}.in_proj_bias"))?,
            },
            out_proj: Linear::new(w, &format!("{prefix}.out_proj"))?,
            heads,
            formulation: Formulation::for_device(w.device()),
        })
    }

    /// x: (B, L, D). Returns the output (B, L, D) and the attention probabilities averaged
    /// over heads (B, L, L), which CAA needs (docs/method.md §5). Always the explicit softmax.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> (Tensor, Tensor) {
        let (q, k, v) = self.qkv(x);
        let probs = self.probs(&q, &k, mask);
        (self.project_out(&probs.matmul(&v)), probs.mean_dim(1, false, probs.kind()))
    }

    /// The output alone (B, L, D), for blocks whose probabilities nothing reads: fused
    /// attention when the formulation asks for it, else [`Self::forward`]'s explicit softmax.
    /// With `causal`, `mask` is the causal mask (the explicit form adds it; the fused form
    /// passes `is_causal`, which flash kernels take and an explicit mask tensor is not).
    pub fn output(&self, x: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        let (q, k, v) = self.qkv(x);
        if self.formulation.fused_attention {
            let mask = if causal { None } else { mask };
            let heads = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, self.scale(), false);
            return self.project_out(&heads);
        }
        self.project_out(&self.probs(&q, &k, mask).matmul(&v))
    }

    /// softmax(q s kᵀ + mask) per head, (B, heads, L, L).
    fn probs(&self, q: &Tensor, k: &Tensor, mask: Option<&Tensor>) -> Tensor {
        // Scale q before the product, as nn.MultiheadAttention does.
        let q = q * self.scale();
        let mut scores = scores(&q, k, self.formulation.batched);
        if let Some(m) = mask {
            scores += m;
        }
        scores.softmax(-1, scores.kind())
    }

    /// Queries, keys and values per head, each (B, heads, L, D / heads).
    pub fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, l, d) = x.size3().expect("attention input is (B, L, D)");
        let qkv = self.in_proj.forward(x).view([b, l, 3, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]);
        (qkv.get(0), qkv.get(1), qkv.get(2))
    }

    /// `1 / sqrt(D / heads)`, the attention's scaling.
    pub fn scale(&self) -> f64 {
        let d = self.out_proj.weight.size()[0];
        1.0 / ((d / self.heads) as f64).sqrt()
    }

    /// Heads (B, heads, L, D / heads) merged and through out_proj: (B, L, D).
    pub fn project_out(&self, heads: &Tensor) -> Tensor {
        let (b, h, l, dh) = heads.size4().expect("heads are (B, heads, L, D / heads)");
        self.out_proj.forward(&heads.permute([0, 2, 1, 3]).reshape([b, l, h * dh]))
    }
}

/// `a bᵀ` over (B, heads, L, d) tensors. In fp16, libtorch's CPU product on the transposed view
/// rounds differently with the batch size (one fp16 ulp, which GradCAM amplifies), so unless
/// `batched`, a batch is computed one image at a time, exactly as a single image (which is also
/// what PyTorch's nn.MultiheadAttention computes). fp32 is batch-invariant and runs as one
/// product; so does `batched` (the CUDA form: one kernel, exact to fp16 rounding).
pub fn scores(a: &Tensor, b: &Tensor, batched: bool) -> Tensor {
    let n = a.size()[0];
    if batched || a.kind() != tch::Kind::Half || n == 1 {
        return a.matmul(&b.transpose(-2, -1));
    }
    let per: Vec<Tensor> = (0..n).map(|i| a.narrow(0, i, 1).matmul(&b.narrow(0, i, 1).transpose(-2, -1))).collect();
    Tensor::cat(&per, 0)
}

pub struct ResidualBlock {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    activation: Activation,
}

impl ResidualBlock {
    pub fn new(w: &Weights, prefix: &str, heads: i64, activation: Activation) -> Result<Self> {
        Ok(Self {
            activation,
            ln_1: LayerNorm::new(w, &format!("{prefix}.ln_1"))?,
            attn: Attention::new(w, &format!("{prefix}.attn"), heads)?,
            ln_2: LayerNorm::new(w, &format!("{prefix}.ln_2"))?,
            c_fc: Linear::new(w, &format!("{prefix}.mlp.c_fc"))?,
            c_proj: Linear::new(w, &format!("{prefix}.mlp.c_proj"))?,
        })
    }

    pub fn mlp(&self, x: &Tensor) -> Tensor {
        let h = self.activation.apply(&self.c_fc.forward(x));
        self.c_proj.forward(&h)
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> (Tensor, Tensor) {
        self.forward_from_ln1(x, &self.ln_1.forward(x), mask)
    }

    /// The block's output alone, for blocks whose attention nothing reads ([`Attention::output`]:
    /// fused where the formulation asks for it).
    pub fn output(&self, x: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        let x = x + self.attn.output(&self.ln_1.forward(x), mask, causal);
        &x + self.mlp(&self.ln_2.forward(&x))
    }

    /// The block given its input `x` and `a = ln_1(x)` computed by the caller, so the caller
    /// can take gradients with respect to `a` (docs/method.md §4).
    pub fn forward_from_ln1(&self, x: &Tensor, a: &Tensor, mask: Option<&Tensor>) -> (Tensor, Tensor) {
        let (attn_out, probs) = self.attn.forward(a, mask);
        let x = x + attn_out;
        let y = &x + self.mlp(&self.ln_2.forward(&x));
        (y, probs)
    }
}
