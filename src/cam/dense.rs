//! Gradient-free map sources (docs/method.md §10): the last block's attention is changed so that
//! patch tokens align with text, and one forward pass gives every label's map.
//!
//! | source    | last block's attention                        | residual + FFN | temperature |
//! |-----------|-----------------------------------------------|----------------|-------------|
//! | maskclip  | none: each token's value (v path)             | kept           | CLIP's      |
//! | sclip     | softmax(q qᵀ s) + softmax(k kᵀ s)             | kept           | 40          |
//! | clearclip | softmax(q qᵀ s)                               | removed        | 50          |
//! | naclip    | softmax(k kᵀ s + Gaussian(patch distance))    | removed        | 40          |
//!
//! with `s = 1 / sqrt(head dim)`. The patch tokens then go through ln_post and proj, are
//! L2-normalised and compared with the normalised text features of the image's labels and
//! the background words; a softmax over those candidates at the temperature gives each
//! label's map, min-max normalised like GradCAM's.
use super::{scale_twice, CamSource};
use crate::clip::l2_normalize;
use crate::clip::layers::scores;
use crate::clip::vision::VisionTransformer;
use tch::{Kind, Tensor};

/// The temperature (logit scale) of SCLIP's and NACLIP's official segmentors.
pub const SCLIP_LOGIT_SCALE: f64 = 40.0;

/// ClearCLIP's official default temperature.
pub const CLEARCLIP_LOGIT_SCALE: f64 = 50.0;

/// NACLIP's Gaussian standard deviation, in patches.
pub const NACLIP_STD: f64 = 5.0;

/// The temperature a source's softmax uses; `clip_scale` is the model's own logit scale.
pub fn temperature(source: CamSource, clip_scale: f64) -> f64 {
    match source {
        CamSource::MaskClip | CamSource::GradCam => clip_scale,
        CamSource::Sclip | CamSource::Naclip => SCLIP_LOGIT_SCALE,
        CamSource::ClearClip => CLEARCLIP_LOGIT_SCALE,
    }
}

/// NACLIP's attention addition over the n + 1 tokens of a gh x gw grid: for patches i, j at
/// (yi, xi), (yj, xj), `exp(-((yi - yj)² + (xi - xj)²) / (2 std²))`; zero in the class token's
/// row and column. (n + 1, n + 1), computed in f64 on `device` (one tensor op per step, not a
/// host loop: n² is 9 M entries at 1024 px) and returned in fp32.
pub fn gaussian_addition(gh: i64, gw: i64, std: f64, device: tch::Device) -> Tensor {
    let idx = Tensor::arange(gh * gw, (Kind::Int64, device));
    let y = idx.divide_scalar_mode(gw, "floor").to_kind(Kind::Double);
    let x = idx.remainder(gw).to_kind(Kind::Double);
    let dy = y.unsqueeze(1) - y.unsqueeze(0);
    let dx = x.unsqueeze(1) - x.unsqueeze(0);
    let g = ((&dy * &dy + &dx * &dx) / (-2.0 * std * std)).exp().to_kind(Kind::Float);
    // The class token's row and column are zero.
    g.constant_pad_nd([1, 0, 1, 0])
}

/// Patch features (B, n, E), L2-normalised, from the tokens entering the last block (B, n+1, D)
/// with the source's modified last block (docs/method.md §10). Model precision.
pub fn dense_features(vit: &VisionTransformer, tokens: &Tensor, source: CamSource, gh: i64, gw: i64) -> Tensor {
    let _g = tch::no_grad_guard();
    let block = vit.blocks.last().expect("at least one block");
    let attn = &block.attn;
    let (q, k, v) = attn.qkv(&block.ln_1.forward(tokens));
    let s = attn.scale();
    let kind = v.kind();
    let f = vit.formulation();
    let self_attention = |a: &Tensor, b: &Tensor, bias: Option<&Tensor>| {
        let mut scores = scores(a, b, f.batched) * s;
        if let Some(bias) = bias {
            scores += bias;
        }
        scores.softmax(-1, kind)
    };
    // Nothing reads these probabilities: with fused attention, softmax(a bᵀ s + bias) v is one
    // kernel (SCLIP's sum of two softmaxes times v is the sum of two such products).
    let fused = |a: &Tensor, b: &Tensor, bias: Option<&Tensor>| {
        Tensor::scaled_dot_product_attention(a, b, &v, bias, 0.0, false, s, false)
    };
    let heads = match source {
        CamSource::MaskClip => v.shallow_clone(),
        CamSource::Sclip if f.fused_attention => fused(&q, &q, None) + fused(&k, &k, None),
        CamSource::Sclip => (self_attention(&q, &q, None) + self_attention(&k, &k, None)).matmul(&v),
        CamSource::ClearClip if f.fused_attention => fused(&q, &q, None),
        CamSource::ClearClip => self_attention(&q, &q, None).matmul(&v),
        CamSource::Naclip => {
            let bias = gaussian_addition(gh, gw, NACLIP_STD, v.device()).to_kind(kind);
            if f.fused_attention {
                fused(&k, &k, Some(&bias))
            } else {
                self_attention(&k, &k, Some(&bias)).matmul(&v)
            }
        }
        CamSource::GradCam => unreachable!("GradCAM is not a dense source"),
    };
    let out = attn.project_out(&heads);
    // MaskCLIP and SCLIP keep the block's residual and FFN; ClearCLIP and NACLIP drop both.
    let x = match source {
        CamSource::MaskClip | CamSource::Sclip => {
            let h = tokens + out;
            &h + block.mlp(&block.ln_2.forward(&h))
        }
        _ => out,
    };
    l2_normalize(&vit.patch_features(&x))
}

/// Per patch, the softmax over the candidates (the image's labels then the background words)
/// of `temperature * cos`: the cosine in the model's precision, then fp32 as the official code
/// does. `features`: (n, E) of one image; `text`: (K + M, E). (n, K + M), fp32.
pub fn patch_probs(features: &Tensor, text: &Tensor, temperature: f64) -> Tensor {
    let _g = tch::no_grad_guard();
    let t = l2_normalize(&text.to_kind(features.kind()));
    let cos = features.matmul(&t.transpose(0, 1)).to_kind(Kind::Float);
    (cos * temperature).softmax(-1, Kind::Float)
}

/// Maps (K, gh, gw), fp32, from [`patch_probs`]: the K label channels, min-max normalised twice
/// as GradCAM's.
pub fn dense_maps(probs: &Tensor, k: i64, gh: i64, gw: i64) -> Tensor {
    let maps = probs.narrow(1, 0, k).transpose(0, 1).reshape([k, gh, gw]);
    scale_twice(&maps)
}
