//! Softmax-GradCAM (method.md §4): one map per image label, from the gradient of that label's
//! softmax probability (over labels + background words) with respect to block L's ln_1 output.
use crate::model::Clip;
use tch::{Kind, Tensor};

pub struct CamResult {
    /// (K, gh, gw) maps, ReLU'd and min-max normalised, fp32.
    pub maps: Tensor,
    /// Block L's head-averaged attention (n+1, n+1), from the gradient pass.
    pub last_attention: Tensor,
    /// Softmax over the candidate set, (K + M), fp32 (the same for every label).
    pub probs: Tensor,
}

/// (M - min) / (max(M - min) + 1e-7) over the last two dims, per leading index.
pub fn min_max(maps: &Tensor) -> Tensor {
    let k = maps.size()[0];
    let flat = maps.reshape([k, -1]);
    let shifted = &flat - flat.amin([1], true);
    (&shifted / (shifted.amax([1], true) + 1e-7)).reshape(maps.size())
}

/// GradCAM for all K labels with one backward pass: block L runs on K copies of its input,
/// and copy k's loss is label k's probability, so each copy's gradient is label k's alone.
///
/// `tokens`: (1, n+1, D) input of block L. `text`: (K + M, E) normalised features of the
/// image's labels then the background words.
pub fn grad_cam(model: &Clip, tokens: &Tensor, text: &Tensor, k: usize, gh: i64, gw: i64) -> CamResult {
    let targets: Vec<i64> = (0..k as i64).collect();
    grad_cam_targets(model, tokens, text, &targets, gh, gw)
}

/// The reference's way: block L recomputed and one backward pass per label. Same numbers as
/// [`grad_cam`], K times the work; kept for tests and benchmarks.
pub fn grad_cam_per_label(model: &Clip, tokens: &Tensor, text: &Tensor, k: usize, gh: i64, gw: i64) -> CamResult {
    let parts: Vec<CamResult> = (0..k as i64).map(|i| grad_cam_targets(model, tokens, text, &[i], gh, gw)).collect();
    let maps = Tensor::cat(&parts.iter().map(|p| p.maps.shallow_clone()).collect::<Vec<_>>(), 0);
    let first = &parts[0];
    CamResult { maps, last_attention: first.last_attention.shallow_clone(), probs: first.probs.shallow_clone() }
}

/// GradCAM where copy r of block L's input is differentiated for candidate `targets[r]`.
pub fn grad_cam_targets(model: &Clip, tokens: &Tensor, text: &Tensor, targets: &[i64], gh: i64, gw: i64) -> CamResult {
    let vit = &model.visual;
    let block = vit.blocks.last().expect("at least one block");
    let k = targets.len() as i64;
    let (_, l, d) = tokens.size3().expect("tokens are (1, n+1, D)");
    let x = tokens.detach().expand([k, l, d], false);
    // A = ln_1(x) is a leaf: x itself needs no gradient (method.md §2), so dp/dA is the same as
    // in the full graph.
    let a = {
        let _g = tch::no_grad_guard();
        block.ln_1.forward(&x)
    }
    .set_requires_grad(true);
    let (y, attn) = block.forward_from_ln1(&x, &a, None);
    let f = vit.patch_pool(&y).to_kind(Kind::Float);
    let f = &f / f.norm_scalaropt_dim(2, [-1], true);
    let t = text.to_kind(Kind::Float);
    let logits = f.matmul(&t.transpose(0, 1)) * model.logit_scale;
    let probs = logits.softmax(-1, Kind::Float);
    let rows = Tensor::arange(k, (Kind::Int64, probs.device()));
    let cols = Tensor::from_slice(targets).to_device(probs.device());
    let loss = probs.index(&[Some(&rows), Some(&cols)]).sum(Kind::Float);
    let grads = Tensor::run_backward(&[&loss], &[&a], false, false);
    let _g = tch::no_grad_guard();
    let g = grads[0].narrow(1, 1, l - 1).to_kind(Kind::Float); // (K, n, D)
    let act = a.detach().narrow(1, 1, l - 1).to_kind(Kind::Float); // (K, n, D)
    let weights = g.mean_dim(1, true, Kind::Float); // (K, 1, D): mean over positions
    let cam = (act * weights).sum_dim_intlist(2, false, Kind::Float).relu(); // (K, n)
    let maps = min_max(&cam.reshape([k, gh, gw]));
    CamResult { maps, last_attention: attn.get(0).detach(), probs: probs.get(0).detach() }
}
