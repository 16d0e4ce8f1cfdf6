//! Prompts and text features (docs/method.md §3): template x class sentences, CLIP's BPE
//! tokenisation, encoding, per-template normalisation and averaging, and a disk cache keyed by
//! model digest and prompt text.
use crate::clip::Clip;
use crate::config::{DatasetConfig, Fusion};
use anyhow::{bail, Context, Result};
use instant_clip_tokenizer::{Token, Tokenizer};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tch::{Kind, Tensor};

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(Tokenizer::new)
}

/// Token ids for one text: SOT, BPE tokens, EOT, zero padding to `context` (OpenAI's
/// `clip.tokenize`). Whitespace is collapsed and text lowercased as OpenAI's cleaner does.
pub fn tokenize(text: &str, context: usize) -> Result<Vec<i64>> {
    let t = tokenizer();
    let clean = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut toks: Vec<Token> = vec![t.start_of_text()];
    t.encode(&clean, &mut toks);
    toks.push(t.end_of_text());
    if toks.len() > context {
        bail!("prompt {text:?} is {} tokens long, more than the context length {context}", toks.len());
    }
    let mut ids: Vec<i64> = toks.iter().map(|t| t.to_u16() as i64).collect();
    ids.resize(context, 0);
    Ok(ids)
}

/// The sentences encoded for one name: one per (alternative, template). With sentence fusion the
/// name is one alternative holding all synonyms.
pub fn sentences_for(alternatives: &[&str], templates: &[String]) -> Vec<String> {
    alternatives.iter().flat_map(|a| templates.iter().map(move |t| t.replacen("{}", a, 1))).collect()
}

/// The sentences of every class for the given templates, with the config's fusion mode.
pub fn class_sentences(cfg: &DatasetConfig, templates: &[String]) -> Sentences {
    cfg.classes
        .iter()
        .map(|c| {
            let prompt = c.prompt();
            let alts = match cfg.fusion {
                Fusion::Sentence => vec![prompt.alternatives().join(",")],
                Fusion::Feature => prompt.alternatives().iter().map(|s| s.to_string()).collect(),
            };
            let alts: Vec<&str> = alts.iter().map(|s| s.as_str()).collect();
            (c.name.clone(), sentences_for(&alts, templates))
        })
        .collect()
}

/// (label, the sentences encoded for it) per class or background word.
pub type Sentences = Vec<(String, Vec<String>)>;

/// Everything the text encoder reads for a config: (label, sentences) for every class, then
/// for every background word.
pub fn all_sentences(cfg: &DatasetConfig) -> (Sentences, Sentences) {
    let classes = class_sentences(cfg, &cfg.templates);
    let bg = cfg.background_words.iter().map(|w| (w.clone(), sentences_for(&[w.as_str()], &cfg.templates))).collect();
    (classes, bg)
}

/// Text features for the classes (C, E) and the background words (M, E), L2-normalised.
pub struct TextFeatures {
    pub classes: Tensor,
    pub background: Tensor,
}

use crate::clip::l2_normalize as l2norm;

/// Encodes groups of sentences: each group's embeddings are normalised, averaged, normalised
/// again (docs/method.md §3), in the model's precision as the reference does (in fp16 every
/// normalisation and the mean are fp16). Returns (groups, E) in fp32 on the CPU.
pub fn encode_groups(model: &Clip, groups: &[Vec<String>]) -> Result<Tensor> {
    let text = model.text.as_ref().context("the text tower was already dropped")?;
    let ctx = text.context_length as usize;
    // All sentences in batches of 256, then per-group normalise / average / normalise.
    let all: Vec<&String> = groups.iter().flatten().collect();
    let mut feats = Vec::new();
    for chunk in all.chunks(256) {
        let ids: Vec<i64> = chunk.iter().map(|s| tokenize(s, ctx)).collect::<Result<Vec<_>>>()?.concat();
        let tokens = Tensor::from_slice(&ids).reshape([chunk.len() as i64, ctx as i64]);
        feats.push(l2norm(&text.encode(&tokens)).to_device(tch::Device::Cpu));
    }
    let feats = Tensor::cat(&feats, 0);
    let mut out = Vec::with_capacity(groups.len());
    let mut start = 0i64;
    for group in groups {
        let g = feats.narrow(0, start, group.len() as i64);
        start += group.len() as i64;
        out.push(l2norm(&g.mean_dim(0, false, g.kind())));
    }
    Ok(Tensor::stack(&out, 0).to_kind(Kind::Float))
}

/// Text features of a config, from the cache when present.
pub fn text_features(model: &Clip, cfg: &DatasetConfig) -> Result<TextFeatures> {
    let (classes, bg) = all_sentences(cfg);
    let key = cache_key(model, &classes, &bg);
    let path = crate::clip::download::cache_dir().join("text").join(format!("{key}.safetensors"));
    if let Ok(list) = Tensor::read_safetensors(&path) {
        let get = |n: &str| list.iter().find(|(k, _)| k == n).map(|(_, t)| t.shallow_clone());
        if let (Some(c), Some(b)) = (get("classes"), get("background")) {
            return Ok(TextFeatures { classes: c.to_device(model.device), background: b.to_device(model.device) });
        }
    }
    let sentences: usize = classes.iter().chain(&bg).map(|(_, s)| s.len()).sum();
    let step = crate::progress::Step::start(format!(
        "encoding {} classes x {} template{} (and {} background words: {sentences} sentences)",
        classes.len(),
        cfg.templates.len(),
        if cfg.templates.len() == 1 { "" } else { "s" },
        bg.len()
    ));
    let c = encode_groups(model, &classes.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>())?;
    let b = encode_groups(model, &bg.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>())?;
    drop(step);
    // Best effort: a read-only cache only costs recomputation.
    let _ = write_cache(&path, &c, &b);
    Ok(TextFeatures { classes: c.to_device(model.device), background: b.to_device(model.device) })
}

fn write_cache(path: &std::path::Path, c: &Tensor, b: &Tensor) -> Result<()> {
    let dir = path.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(dir)?;
    crate::files::check_final_name(path)?;
    // libtorch writes to a path: an exclusive temporary file of ours, then the rename.
    let (_, tmp) = crate::files::create_temp(path)?;
    Tensor::write_safetensors(&[("classes", c), ("background", b)], &tmp)?;
    tmp.persist(path)?;
    Ok(())
}

fn cache_key(model: &Clip, classes: &[(String, Vec<String>)], bg: &[(String, Vec<String>)]) -> String {
    let mut h = Sha256::new();
    h.update(model.digest.as_bytes());
    h.update(format!("{:?}", model.kind).as_bytes());
    for (_, s) in classes.iter().chain([("--background--".to_string(), vec![])].iter()).chain(bg.iter()) {
        for t in s {
            h.update(t.as_bytes());
            h.update([0u8]);
        }
        h.update([1u8]);
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Sharpness of one template (docs/method.md §7): over images with at least two ground-truth
/// classes, the zero-shot softmax scores (over all dataset classes) of the image's own classes
/// have dispersion variance / mean (population variance); the template's sharpness is the mean
/// of that over those images. Lower is better. Returns (sharpness, images used).
pub fn sharpness(scores: &[Vec<f32>], classes: &[Vec<usize>]) -> (f64, usize) {
    let mut total = 0.0;
    let mut n = 0;
    for (s, gt) in scores.iter().zip(classes) {
        if gt.len() < 2 {
            continue;
        }
        let v: Vec<f64> = gt.iter().map(|&c| s[c] as f64).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        total += var / mean.max(1e-12);
        n += 1;
    }
    (if n > 0 { total / n as f64 } else { f64::NAN }, n)
}

/// Zero-shot softmax scores of each image feature (N, E; normalised) against class features
/// (C, E) with the model's logit scale.
pub fn zero_shot_scores(model: &Clip, image_features: &Tensor, classes: &Tensor) -> Result<Vec<Vec<f32>>> {
    let logits =
        image_features.to_kind(Kind::Float).matmul(&classes.to_kind(Kind::Float).transpose(0, 1)) * model.logit_scale;
    let probs = logits.softmax(-1, Kind::Float).to_device(tch::Device::Cpu);
    let n = probs.size()[0];
    (0..n).map(|i| Ok(Vec::<f32>::try_from(probs.get(i))?)).collect()
}

/// Templates from a file, one per line with one `{}` (blank lines and `#` comments skipped, a
/// byte-order mark ignored). A file with no template is an error, not a silent fallback.
pub fn read_templates(path: &std::path::Path) -> Result<Vec<String>> {
    let text =
        crate::files::read_text(path, 64 << 20).with_context(|| format!("cannot read templates {}", path.display()))?;
    let t = parse_templates(&text);
    if t.is_empty() {
        bail!("templates {}: no template", path.display());
    }
    Ok(t)
}

/// The templates of a text: one per line, blank lines and `#` comments skipped.
pub fn parse_templates(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

/// One template's sharpness (`prompts rank`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ranked {
    pub template: String,
    /// Mean over images of var(s\[labels\]) / mean(s\[labels\]) (CLIP-ES §3.3): lower is better.
    pub sharpness: f64,
    /// Images it was measured on.
    pub images: usize,
}

/// Ranks `templates` by sharpness on the multi-label images among `ids` (image features once,
/// CLIP's zero-shot protocol; the text features once per template), best first. Images that
/// cannot be read or whose labels are not the config's are skipped with a warning.
pub fn rank_templates(
    model: &Clip,
    cfg: &DatasetConfig,
    images: &std::path::Path,
    labels: &crate::datasets::RawLabels,
    ids: &[String],
    templates: &[String],
) -> Result<Vec<Ranked>> {
    let mut feats = Vec::new();
    let mut gts = Vec::new();
    let mut skipped = 0;
    let step =
        crate::progress::Step::start(format!("image features of the multi-label images among {} ids", ids.len()));
    for id in ids {
        let Some(names) = labels.get(id) else { continue };
        let Ok(gt) = crate::datasets::resolve_labels(cfg, names) else {
            skipped += 1;
            continue;
        };
        if gt.len() < 2 {
            continue;
        }
        let loaded = crate::datasets::find_image(images, id)
            .ok_or_else(|| anyhow::anyhow!(crate::datasets::missing_image_reason(images, id)))
            .and_then(|path| crate::image_input::load_rgb(&path));
        match loaded {
            Ok(img) => {
                feats.push(model.image_feature(&img));
                gts.push(gt);
            }
            Err(e) => {
                crate::progress::note(&format!("warning: {}", crate::errors::format_error(&e)));
                skipped += 1;
            }
        }
    }
    drop(step);
    if feats.is_empty() {
        bail!("no usable image with at least two labels: sharpness needs multi-label images");
    }
    if skipped > 0 {
        eprintln!("warning: {skipped} image(s) skipped (unreadable or labels not in the config)");
    }
    let feats = Tensor::cat(&feats, 0);
    let bar = crate::progress::progress_bar(templates.len() as u64, "template");
    bar.set_message(format!("{} classes, {} images", cfg.classes.len(), gts.len()));
    let mut ranked = Vec::new();
    for t in templates {
        let groups: Vec<Vec<String>> =
            class_sentences(cfg, std::slice::from_ref(t)).into_iter().map(|(_, s)| s).collect();
        let classes = encode_groups(model, &groups)?.to_device(model.device);
        let scores = zero_shot_scores(model, &feats, &classes)?;
        let (s, n) = sharpness(&scores, &gts);
        ranked.push(Ranked { template: t.clone(), sharpness: s, images: n });
        bar.inc(1);
    }
    bar.finish_and_clear();
    ranked.sort_by(|a, b| a.sharpness.total_cmp(&b.sharpness).then_with(|| a.template.cmp(&b.template)));
    Ok(ranked)
}

/// Zero-shot probabilities over the config's classes, in config order.
pub fn zero_shot(model: &Clip, text: &TextFeatures, path: &std::path::Path) -> Result<Vec<f32>> {
    zero_shot_image(model, text, &crate::image_input::load_rgb(path)?)
}

/// [`zero_shot`] of a decoded image.
pub fn zero_shot_image(model: &Clip, text: &TextFeatures, img: &image::RgbImage) -> Result<Vec<f32>> {
    let f = model.image_feature(img);
    let logits = f.matmul(&text.classes.to_kind(Kind::Float).transpose(0, 1)) * model.logit_scale;
    let probs = logits.softmax(-1, Kind::Float).get(0).to_device(tch::Device::Cpu);
    Ok(Vec::<f32>::try_from(probs)?)
}
