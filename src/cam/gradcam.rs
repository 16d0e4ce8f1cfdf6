//! Softmax-GradCAM (docs/method.md §4): one map per image label, from the gradient of that label's
//! softmax probability (over labels + background words) with respect to block L's ln_1 output.
//!
//! The numbers follow the reference's pytorch-grad-cam exactly, including two details that
//! move the maps: the min-max normalisation runs twice (once per target layer, once when the
//! layers are aggregated), and in fp16 the channel weighting is done in NumPy float16.
use super::scale_twice;
use crate::clip::l2_normalize;
use crate::clip::vision::VisionTransformer;
use tch::{Kind, Tensor};

pub struct CamResult {
    /// (K, gh, gw) maps, ReLU'd and min-max normalised twice, fp32.
    pub maps: Tensor,
    /// Block L's head-averaged attention (n+1, n+1), from the gradient pass, model precision.
    pub last_attention: Tensor,
    /// Softmax over the candidate set, (K + M), fp32 (the same for every label).
    pub probs: Tensor,
}

/// GradCAM for all K labels with one backward pass: block L runs on K copies of its input,
/// and copy k's loss is label k's probability, so each copy's gradient is label k's alone.
///
/// `tokens`: (1, n+1, D) input of block L. `text`: (K + M, E) normalised features of the
/// image's labels then the background words.
pub fn grad_cam(
    vit: &VisionTransformer,
    logit_scale: f64,
    tokens: &Tensor,
    text: &Tensor,
    k: usize,
    gh: i64,
    gw: i64,
) -> CamResult {
    let targets: Vec<i64> = (0..k as i64).collect();
    grad_cam_targets(vit, logit_scale, tokens, text, &targets, gh, gw)
}

/// GradCAM where copy r of block L's input is differentiated for candidate `targets[r]`.
///
/// Everything up to the probabilities runs in the model's precision, as the reference's
/// `forward_last_layer` does: in fp16 the image feature, its normalisation, the logits
/// (`logit_scale * f` first, then `@ text.T`) and the softmax are all fp16.
pub fn grad_cam_targets(
    vit: &VisionTransformer,
    logit_scale: f64,
    tokens: &Tensor,
    text: &Tensor,
    targets: &[i64],
    gh: i64,
    gw: i64,
) -> CamResult {
    let request = CamRequest { index: 0, text, targets };
    let mut out = grad_cam_batch(vit, logit_scale, tokens, std::slice::from_ref(&request), gh, gw);
    out.remove(0)
}

/// One image of a batch for [`grad_cam_batch`]: its index in the batch, its candidate text
/// features (labels then background words, (K + M, E)) and the candidate each copy is
/// differentiated for.
pub struct CamRequest<'a> {
    pub index: i64,
    pub text: &'a Tensor,
    pub targets: &'a [i64],
}

/// GradCAM for several images of the same grid size with one forward of block L and one
/// backward: block L runs on one copy of its input per (image, target), each image's head
/// (pooling, logits, softmax) on its own copies, and the loss is the sum of every copy's
/// target probability, so each copy's gradient is its own target's alone.
///
/// `tokens`: (B, n+1, D) inputs of block L.
pub fn grad_cam_batch(
    vit: &VisionTransformer,
    logit_scale: f64,
    tokens: &Tensor,
    requests: &[CamRequest],
    gh: i64,
    gw: i64,
) -> Vec<CamResult> {
    let block = vit.blocks.last().expect("at least one block");
    let (_, l, d) = tokens.size3().expect("tokens are (B, n+1, D)");
    let kind = tokens.kind();
    let device = tokens.device();
    let total: i64 = requests.iter().map(|r| r.targets.len() as i64).sum();
    let x = if requests.len() == 1 {
        tokens.detach().narrow(0, requests[0].index, 1).expand([total, l, d], false)
    } else {
        let rows: Vec<i64> = requests.iter().flat_map(|r| std::iter::repeat_n(r.index, r.targets.len())).collect();
        tokens.detach().index_select(0, &Tensor::from_slice(&rows).to_device(device))
    };
    // A = ln_1(x) is a leaf: x itself needs no gradient (docs/method.md §2), so dp/dA is the same as
    // in the full graph.
    let a = {
        let _g = tch::no_grad_guard();
        block.ln_1.forward(&x)
    }
    .set_requires_grad(true);
    let (y, attn) = block.forward_from_ln1(&x, &a, None);
    let mut losses = Vec::with_capacity(requests.len());
    let mut probs_out = Vec::with_capacity(requests.len());
    let mut offset = 0;
    for r in requests {
        let k = r.targets.len() as i64;
        let f = l2_normalize(&vit.patch_pool(&y.narrow(0, offset, k)));
        // The reference normalises the (already normalised) text features once more.
        let t = l2_normalize(&r.text.to_kind(kind));
        let logits = (f * logit_scale).matmul(&t.transpose(0, 1));
        let probs = logits.softmax(-1, kind);
        let idx = Tensor::arange(k, (Kind::Int64, device));
        let cols = Tensor::from_slice(r.targets).to_device(device);
        losses.push(probs.index(&[Some(&idx), Some(&cols)]).sum(kind));
        probs_out.push(probs.get(0).detach().to_kind(Kind::Float));
        offset += k;
    }
    let loss = if losses.len() == 1 { losses.remove(0) } else { Tensor::stack(&losses, 0).sum(kind) };
    let grads = Tensor::run_backward(&[&loss], &[&a], false, false);
    let _g = tch::no_grad_guard();
    let g = grads[0].narrow(1, 1, l - 1); // (ΣK, n, D)
    let act = a.detach().narrow(1, 1, l - 1); // (ΣK, n, D)
    let cam = if kind == Kind::Half {
        weighted_sum_fp16(&act, &g, vit.formulation().batched)
    } else {
        weighted_sum_fp32(&act, &g)
    };
    // ReLU, then the reference's `.astype(np.float32)` before scaling.
    let cam = cam.relu().to_kind(Kind::Float);
    let mut out = Vec::with_capacity(requests.len());
    let mut offset = 0;
    for (r, probs) in requests.iter().zip(probs_out) {
        let k = r.targets.len() as i64;
        let maps = scale_twice(&cam.narrow(0, offset, k).reshape([k, gh, gw]));
        out.push(CamResult { maps, last_attention: attn.get(offset).detach(), probs });
        offset += k;
    }
    out
}

/// sum_c mean_positions(g_c) * A_c in fp32 (pytorch-grad-cam's `np.mean(grads, axis=(2, 3))`
/// and `(weights * activations).sum(axis=1)` on float32 arrays). (K, n).
fn weighted_sum_fp32(act: &Tensor, g: &Tensor) -> Tensor {
    let g = g.to_kind(Kind::Float);
    let weights = g.mean_dim(1, true, Kind::Float); // (K, 1, D)
    (act.to_kind(Kind::Float) * weights).sum_dim_intlist(2, false, Kind::Float)
}

/// The same on float16 arrays, as NumPy computes it: the mean accumulates in fp32 and is
/// rounded to fp16; each product is rounded to fp16; and the sum over channels, a reduction
/// over a non-innermost axis, adds one channel at a time into an fp16 result, rounding after
/// every addition (measured: bit-identical to that loop, not to an fp32 accumulation).
/// (K, n), fp16.
///
/// `batched` (the CUDA form, docs/method.md "Which steps differ on CUDA"): the same rounded
/// products summed in one fp32 reduction and rounded to fp16 once, instead of D small kernels;
/// it differs from the loop by the loop's own accumulated rounding (at most (D−1)·u·Σ|products|
/// with u = 2⁻¹¹, the recursive-summation bound).
pub fn weighted_sum_fp16(act: &Tensor, g: &Tensor, batched: bool) -> Tensor {
    let weights = g.to_kind(Kind::Float).mean_dim(1, true, Kind::Float).to_kind(Kind::Half);
    let products = act.to_kind(Kind::Half) * weights; // fp16 x fp16 -> fp16, rounded per element
    if batched {
        return products.sum_dim_intlist(2, false, Kind::Float).to_kind(Kind::Half);
    }
    let d = products.size()[2];
    let mut sum = products.select(2, 0).copy();
    for c in 1..d {
        sum += products.select(2, c);
    }
    sum
}
