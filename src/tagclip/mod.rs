//! TagCLIP (Lin et al., AAAI 2024): image-level labels predicted by the frozen CLIP itself, so
//! CLIP-ES can make masks without any labels. Local-to-global: coarse patch-level
//! classification, dual-masking attention refinement, class-wise re-identification on crops,
//! score fusion and a relative threshold. Every formula, the official function it follows
//! (linyq2117/TagCLIP, classify.py and clip/) and each deviation are in docs/tagclip.md.
mod run;

pub use run::{auto_labels, items_for, tag_images, write_outputs, TagRun};

use crate::affinity::component_boxes;
use crate::clip::Clip;
use crate::config::DatasetConfig;
use crate::image_input::Prepared;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// TagCLIP's prompt ensemble (clip/clip.py, `encode_text_with_prompt_ensemble`): CLIP's 80
/// ImageNet templates and five scene templates, in the official order.
pub const TEMPLATES: &str = include_str!("../../prompts/tagclip-templates.txt");

/// Relative threshold on the per-image score range for the final labels (classify.py, VOC and
/// COCO; the official code uses 0.1 for COCO-Stuff).
pub const DEFAULT_THRESHOLD: f64 = 0.5;
/// Relative threshold on the refined logits for choosing the classes re-identified on crops
/// (classify.py `cwr`: 0.5, 0.1 for COCO-Stuff).
pub const DEFAULT_CANDIDATE_THRESHOLD: f64 = 0.5;
/// Blend of local and crop scores (classify.py `cwr`: 0.5 each).
const FUSION_WEIGHT: f32 = 0.5;
/// Mask added to off-diagonal attention logits of the last block in the local pass
/// (clip/clip_model.py `ResidualAttentionBlock.attention`, layer 11).
const SELF_ATTENTION_MASK: f64 = -100.0;
/// Mask that keeps the class token of a crop from attending outside the class region
/// (classify.py `cwr`).
const CROP_CLASS_MASK: f32 = -1000.0;

pub fn templates() -> Vec<String> {
    TEMPLATES.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

/// Settings of the tagger.
#[derive(Debug, Clone)]
pub struct TagOptions {
    /// Labels are the classes above this relative threshold ([`select`], [`DEFAULT_THRESHOLD`]).
    pub threshold: f64,
    /// See [`DEFAULT_CANDIDATE_THRESHOLD`].
    pub candidate_threshold: f64,
    /// Round the interpolated positional table to fp16 as the official `upsample_pos_emb` does.
    pub round_pos_fp16: bool,
    /// Cap on the longer side of the model input (none in the official code).
    pub max_side: Option<u32>,
}

impl Default for TagOptions {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
            candidate_threshold: DEFAULT_CANDIDATE_THRESHOLD,
            round_pos_fp16: true,
            max_side: None,
        }
    }
}

/// The text side: classes then background words, each L2-normalised, (C + B, E) fp32.
pub struct TagText {
    pub all: Tensor,
    pub n_classes: usize,
}

/// Text features as TagCLIP builds them: every class read by its name (`class_names_voc` and
/// `class_names_coco` are the label names; `use_prompts` reads the config's prompt names
/// instead) and every background word of the config, with `templates` (TagCLIP's ensemble when
/// `None`). Cached like the CLIP-ES features.
pub fn text_features(
    model: &Clip,
    cfg: &DatasetConfig,
    use_prompts: bool,
    templates: Option<Vec<String>>,
) -> Result<TagText> {
    let mut c = cfg.clone();
    c.templates = templates.unwrap_or_else(self::templates);
    if !use_prompts {
        for class in &mut c.classes {
            class.prompt = None;
        }
    }
    c.validate().context("TagCLIP text settings")?;
    let t = crate::prompts::text_features(model, &c)?;
    let all =
        Tensor::cat(&[t.classes.to_kind(Kind::Float), t.background.to_kind(Kind::Float)], 0).to_device(model.device);
    Ok(TagText { all, n_classes: cfg.classes.len() })
}

/// What the tagger found for one image.
#[derive(Debug, Clone)]
pub struct Tags {
    /// Final score per class (C): the local score, blended with the crop score for the classes
    /// re-identified.
    pub scores: Vec<f32>,
    /// Local score per class after dual masking, before re-identification (C).
    pub local: Vec<f32>,
    /// Classes re-identified on a crop, in order.
    pub reidentified: Vec<usize>,
}

/// Labels from scores: every class above min + t (max - min) of this image's scores; the
/// best class when none is (classify.py, `--save_file` branch).
pub fn select(scores: &[f32], threshold: f64) -> Vec<usize> {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &s in scores {
        lo = lo.min(s);
        hi = hi.max(s);
    }
    // As the reference computes it: float32 tensors, mi + t * step.
    let thr = lo + (threshold as f32) * (hi - lo);
    let out: Vec<usize> = (0..scores.len()).filter(|&c| scores[c] > thr).collect();
    if !out.is_empty() || scores.is_empty() {
        return out;
    }
    // np.argmax: the first maximum (NaN scores never pass the threshold and are not chosen).
    let mut best = 0;
    for (c, &s) in scores.iter().enumerate() {
        if s > scores[best] || scores[best].is_nan() {
            best = c;
        }
    }
    vec![best]
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(Device::Cpu).reshape([-1]))?)
}

/// Min-max normalised column (x - min) / max(x - min), as the official code writes it.
fn normalise(col: &Tensor) -> Tensor {
    let t = col - col.min();
    let m = t.max();
    t / m
}

/// Dual-masking box mask of one class (classify.py `mask_attn` with utils.py `scoremap2bbox`):
/// the map scaled to uint8, thresholded above int(mean * 255), the boxes of its components
/// with their far edges clipped to w - 1 and h - 1, filled. An empty map gives an empty mask.
pub fn box_region(norm: &[f32], mean: f32, h: usize, w: usize) -> Vec<bool> {
    let mut region = vec![false; h * w];
    if !mean.is_finite() || norm.iter().any(|v| !v.is_finite()) {
        return region;
    }
    let thresh = (mean * 255.0) as i64;
    let fg: Vec<bool> = norm.iter().map(|&v| ((v * 255.0) as u8) as i64 > thresh).collect();
    for (x0, y0, x1, y1) in component_boxes(&fg, h, w) {
        let (x1, y1) = (x1.min(w - 1), y1.min(h - 1));
        for y in y0..y1 {
            for x in x0..x1 {
                region[y * w + x] = true;
            }
        }
    }
    region
}

/// Row and column span (y1, y2, x1, x2) of `mask > 0.5` (classify.py `cwr`): ends exclusive,
/// then clipped to h - 1 and w - 1 as the official code does. `None` when the span is empty.
pub fn crop_span(norm: &[f32], h: usize, w: usize) -> Option<(usize, usize, usize, usize)> {
    let (mut y1, mut y2, mut x1, mut x2) = (usize::MAX, 0, usize::MAX, 0);
    for y in 0..h {
        for x in 0..w {
            if norm[y * w + x] > 0.5 {
                y1 = y1.min(y);
                x1 = x1.min(x);
                y2 = y2.max(y + 1);
                x2 = x2.max(x + 1);
            }
        }
    }
    if y1 == usize::MAX {
        return None;
    }
    let (y2, x2) = (y2.min(h - 1), x2.min(w - 1));
    (y1 < y2 && x1 < x2).then_some((y1, y2, x1, x2))
}

/// The layers whose attention is averaged for refinement and the vote count (classify.py:
/// blocks 8..10 of 12, patches kept where at least 4 of the 12 blocks attend above their
/// mean). Other depths keep the proportions: blocks L-4..L-2, L/3 votes.
fn layer_plan(layers: usize) -> (std::ops::Range<usize>, f64) {
    (layers.saturating_sub(4)..layers.saturating_sub(1), ((layers as f64) / 3.0).round())
}

/// Tags one prepared image (the CLIP-ES input: sides rounded up to patch multiples).
pub fn tag_image(model: &Clip, text: &TagText, p: &Prepared, opts: &TagOptions) -> Result<Tags> {
    let _g = tch::no_grad_guard();
    let vit = &model.visual;
    let dev = model.device;
    let layers = vit.layers();
    if layers < 2 {
        bail!("TagCLIP needs a vision transformer of at least 2 blocks, this one has {layers}");
    }
    let (gh, gw) = (p.gh, p.gw);
    let n = gh * gw;
    let c = text.n_classes;
    let k = text.all.size()[0];
    let scale = model.logit_scale;

    // Local pass: all blocks plain but the last, which attends (almost) only to itself; the
    // attention it reports is the unmasked one.
    let at_grid = gh == vit.grid && gw == vit.grid;
    let pos = vit.positional(gh, gw, opts.round_pos_fp16 && !at_grid).to_device(dev);
    let x = vit.embed(&p.input.to_device(dev), &pos);
    let trunk = vit.trunk(x, layers - 1);
    let last = &vit.blocks[layers - 1];
    let (_, last_attention) = last.forward(&trunk.tokens, None);
    let l1 = n + 1;
    let eye_mask = ((Tensor::ones([l1, l1], (Kind::Float, dev)) - Tensor::eye(l1, (Kind::Float, dev)))
        * SELF_ATTENTION_MASK)
        .to_kind(trunk.tokens.kind());
    let tokens = last.output(&trunk.tokens, Some(&eye_mask), false);

    // Coarse patch-level classification: softmax over classes and background words.
    let feats = vit.class_pool(&tokens.transpose(0, 1)).to_kind(Kind::Float); // (n+1, E)
    let feats = crate::clip::l2_normalize(&feats);
    let logits = (feats * scale).matmul(&text.all.transpose(0, 1));
    let coarse = logits.narrow(0, 1, n).softmax(-1, Kind::Float); // (n, K)

    // Attention: patch-to-patch part of every block.
    let mut attn: Vec<Tensor> = trunk.attentions.iter().map(|a| a.get(0)).collect();
    attn.push(last_attention.get(0));
    let attn: Vec<Tensor> = attn.iter().map(|a| a.narrow(0, 1, n).narrow(1, 1, n).to_kind(Kind::Float)).collect();
    let stacked = Tensor::stack(&attn, 0); // (L, n, n)
    let layer_mean =
        stacked.reshape([layers as i64, -1]).mean_dim(-1, true, Kind::Float).reshape([layers as i64, 1, 1]);
    let votes = stacked.gt_tensor(&layer_mean).to_kind(Kind::Float).sum_dim_intlist(0, false, Kind::Float);
    let (avg_layers, min_votes) = layer_plan(layers);
    let avg = stacked.narrow(0, avg_layers.start as i64, avg_layers.len() as i64).mean_dim(0, false, Kind::Float);
    let affinity = avg * votes.ge(min_votes).to_kind(Kind::Float); // (n, n)
    let refined0 = affinity.matmul(&coarse); // (n, K)

    // Dual masking: each class's refinement restricted to the boxes of its own map.
    let (h, w) = (gh as usize, gw as usize);
    let maxima = to_vec(&refined0.amax([0], false))?;
    let mut region = vec![0f32; n as usize * k as usize];
    let mut keep = vec![0f32; k as usize]; // classes the official loop leaves as they are
    for cls in 0..k as usize {
        if maxima[cls] > 0.0 {
            let norm = normalise(&refined0.select(1, cls as i64));
            let mean = norm.mean(Kind::Float).double_value(&[]) as f32;
            for (i, inside) in box_region(&to_vec(&norm)?, mean, h, w).into_iter().enumerate() {
                region[i * k as usize + cls] = inside as u8 as f32;
            }
        } else {
            keep[cls] = 1.0;
        }
    }
    let region = Tensor::from_slice(&region).reshape([n, k]).to_device(dev);
    let keep = Tensor::from_slice(&keep).to_device(dev).gt(0.5);
    let masked = affinity.matmul(&(&coarse * region));
    let refined = refined0.where_self(&keep, &masked); // (n, K)
    let local = to_vec(&refined.narrow(1, 0, c as i64).amax([0], false))?;

    // Class-wise re-identification on crops.
    let all_refined = to_vec(&refined)?;
    let (lo, hi) = all_refined.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let thr = lo + (opts.candidate_threshold as f32) * (hi - lo);
    let candidates: Vec<usize> = (0..c).filter(|&cls| local[cls] > thr).collect();
    let mut scores = local.clone();
    let mut reidentified = Vec::new();
    for cls in candidates {
        let norm = to_vec(&normalise(&refined.select(1, cls as i64)))?;
        // The official loop returns at the first class whose span is empty.
        let Some((y1, y2, x1, x2)) = crop_span(&norm, h, w) else { break };
        let p_crop = crop_score(model, text, p, &norm, (y1, y2, x1, x2), cls)?;
        scores[cls] = FUSION_WEIGHT * scores[cls] + (1.0 - FUSION_WEIGHT) * p_crop;
        reidentified.push(cls);
    }
    Ok(Tags { scores, local, reidentified })
}

/// Probability of class `cls` for the crop (y1..y2, x1..x2 in patches) resized to the model's
/// own resolution, the class token attending only to the class region of the crop.
fn crop_score(
    model: &Clip,
    text: &TagText,
    p: &Prepared,
    norm: &[f32],
    span: (usize, usize, usize, usize),
    cls: usize,
) -> Result<f32> {
    let vit = &model.visual;
    let dev = model.device;
    let (y1, y2, x1, x2) = span;
    let w = p.gw as usize;
    let g = vit.grid;
    let patch = vit.patch;
    let res = g * patch;
    // The class region of the crop, nearest-resized to the model grid.
    let sub: Vec<f32> = (y1..y2).flat_map(|y| (x1..x2).map(move |x| (norm[y * w + x] > 0.5) as u8 as f32)).collect();
    let sub = Tensor::from_slice(&sub).reshape([1, 1, (y2 - y1) as i64, (x2 - x1) as i64]);
    let inside = to_vec(&sub.upsample_nearest2d([g, g], None, None))?;
    let l1 = (g * g + 1) as usize;
    let mut mask = vec![0f32; l1 * l1];
    for (j, &v) in inside.iter().enumerate() {
        if v <= 0.0 {
            mask[j + 1] = CROP_CLASS_MASK;
        }
    }
    let crop = p
        .input
        .to_device(dev)
        .narrow(2, y1 as i64 * patch, (y2 - y1) as i64 * patch)
        .narrow(3, x1 as i64 * patch, (x2 - x1) as i64 * patch)
        .upsample_bilinear2d([res, res], false, None, None);
    let pos = vit.positional(g, g, false).to_device(dev);
    let mut x = vit.embed(&crop, &pos);
    let mask = Tensor::from_slice(&mask).reshape([l1 as i64, l1 as i64]).to_device(dev).to_kind(x.kind());
    for block in &vit.blocks {
        x = block.output(&x, Some(&mask), false);
    }
    let f = vit.class_pool(&x).to_kind(Kind::Float);
    let f = crate::clip::l2_normalize(&f);
    let probs = (f * model.logit_scale).matmul(&text.all.transpose(0, 1)).softmax(-1, Kind::Float);
    Ok(probs.double_value(&[0, cls as i64]) as f32)
}

/// Image files of a directory as (id, path), sorted by id; the earlier extension of
/// [`crate::datasets::IMAGE_EXTENSIONS`] wins when an id has several.
pub fn list_images(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let all = crate::files::files_by_stem(dir, crate::datasets::IMAGE_EXTENSIONS, "image directory", false)?;
    Ok(all.into_iter().filter(|(_, p)| p.is_file()).collect())
}
