//! Checkpoint layouts, detected from tensor names, mapped onto OpenAI's parameter names (the
//! names the rest of the crate reads), and the MLP activation each layout's config names.
//!
//! - OpenAI (`.pt` archives) and OpenCLIP: `visual.conv1.weight`, `visual.transformer.resblocks.N.*`.
//! - Hugging Face `CLIPModel`: `vision_model.*`, `text_model.*`, q/k/v split (OpenAI's
//!   `in_proj` is their concatenation in that order) and the two projections stored transposed.
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// The MLP activation: OpenAI, DFN and MetaCLIP use QuickGELU; LAION and DataComp GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Activation {
    /// x * sigmoid(1.702 x)
    #[default]
    QuickGelu,
    /// The exact (erf) GELU of nn.GELU.
    Gelu,
}

impl Activation {
    /// Hugging Face config.json: `hidden_act` of the vision and text configs (QuickGELU when
    /// the key is missing, as transformers' CLIPConfig defaults it).
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let mut acts = Vec::new();
        for sub in ["vision_config", "text_config"] {
            if let Some(a) = v.get(sub).and_then(|c| c.get("hidden_act")).and_then(|a| a.as_str()) {
                acts.push(a.to_string());
            }
        }
        if let Some(a) = v.get("hidden_act").and_then(|a| a.as_str()) {
            acts.push(a.to_string());
        }
        let parse = |a: &str| match a {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => bail!("{}: hidden_act {other:?} is not supported (quick_gelu or gelu)", path.display()),
        };
        let parsed: Vec<Activation> = acts.iter().map(|a| parse(a)).collect::<Result<_>>()?;
        match parsed.first() {
            None => Ok(Activation::QuickGelu),
            Some(&a) if parsed.iter().all(|&b| b == a) => Ok(a),
            Some(_) => bail!("{}: the vision and text towers name different activations {acts:?}", path.display()),
        }
    }

    /// OpenCLIP's open_clip_config.json: `model_cfg.quick_gelu` (GELU when absent or false).
    pub fn from_open_clip_config(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let quick = v.get("model_cfg").and_then(|m| m.get("quick_gelu")).and_then(|q| q.as_bool()).unwrap_or(false);
        Ok(if quick { Activation::QuickGelu } else { Activation::Gelu })
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    // Regular files only (a FIFO config.json in a cache must not hang the load), at most 16 MiB.
    let text = crate::files::read_text(path, 16 << 20)?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Which layout a set of tensor names is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    OpenAi,
    HuggingFace,
}

/// Detects the layout and returns the tensors under OpenAI's names. Training checkpoints'
/// `module.` prefixes are stripped. Non-CLIP-ViT checkpoints get a one-line error naming what
/// was found.
pub fn to_openai(mut t: HashMap<String, Tensor>, source: &Path) -> Result<(HashMap<String, Tensor>, Layout)> {
    if !t.is_empty() && t.keys().all(|k| k.starts_with("module.")) {
        t = t.into_iter().map(|(k, v)| (k["module.".len()..].to_string(), v)).collect();
    }
    let src = source.display();
    let has = |k: &str| t.contains_key(k);
    let any = |p: &str| t.keys().any(|k| k.contains(p));
    if has("visual.layer1.0.conv1.weight") || has("visual.attnpool.positional_embedding") {
        bail!("{src} is a ResNet CLIP; clipmask needs a ViT CLIP (ViT-B/16, ViT-B/32, ViT-L/14, ...)");
    }
    if has("logit_bias") || any("vision_model.head.") || any("attn_pool.") {
        bail!("{src} is a SigLIP checkpoint (sigmoid loss, attention-pooling head); clipmask needs a CLIP ViT");
    }
    if any("visual.blocks.") || any("visual.trunk.") || any("visual.rope") {
        bail!("{src} is an EVA/timm-style vision tower (visual.blocks.* / visual.trunk.*); clipmask needs a CLIP ViT in OpenAI, OpenCLIP or Hugging Face CLIPModel layout");
    }
    if has("visual.conv1.weight") {
        return Ok((t, Layout::OpenAi));
    }
    if has("vision_model.embeddings.patch_embedding.weight") {
        return Ok((from_hf(t, source)?, Layout::HuggingFace));
    }
    let mut sample: Vec<&String> = t.keys().collect();
    sample.sort();
    sample.truncate(4);
    bail!(
        "{src} is not a CLIP ViT checkpoint: found tensors such as {sample:?}; expected OpenAI/OpenCLIP names \
         (visual.conv1.weight, visual.transformer.resblocks.N.*) or Hugging Face CLIPModel names \
         (vision_model.embeddings.*, text_model.*)"
    )
}

fn take(t: &mut HashMap<String, Tensor>, name: &str, source: &Path) -> Result<Tensor> {
    t.remove(name)
        .with_context(|| format!("{}: missing `{name}` (incomplete Hugging Face CLIPModel)", source.display()))
}

fn mv(
    out: &mut HashMap<String, Tensor>,
    t: &mut HashMap<String, Tensor>,
    source: &Path,
    oa: &str,
    hf: &str,
) -> Result<()> {
    out.insert(oa.to_string(), take(t, hf, source)?);
    Ok(())
}

/// Hugging Face CLIPModel names -> OpenAI names.
fn from_hf(mut t: HashMap<String, Tensor>, source: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let o = &mut out;
    // Vision tower.
    mv(o, &mut t, source, "visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")?;
    mv(o, &mut t, source, "visual.class_embedding", "vision_model.embeddings.class_embedding")?;
    mv(o, &mut t, source, "visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")?;
    for (oa, hf) in [("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm")]
    {
        mv(o, &mut t, source, &format!("{oa}.weight"), &format!("{hf}.weight"))?;
        mv(o, &mut t, source, &format!("{oa}.bias"), &format!("{hf}.bias"))?;
    }
    // Text tower.
    mv(o, &mut t, source, "token_embedding.weight", "text_model.embeddings.token_embedding.weight")?;
    mv(o, &mut t, source, "positional_embedding", "text_model.embeddings.position_embedding.weight")?;
    mv(o, &mut t, source, "ln_final.weight", "text_model.final_layer_norm.weight")?;
    mv(o, &mut t, source, "ln_final.bias", "text_model.final_layer_norm.bias")?;
    mv(o, &mut t, source, "logit_scale", "logit_scale")?;
    for (hf, oa) in [
        ("vision_model.encoder.layers", "visual.transformer.resblocks"),
        ("text_model.encoder.layers", "transformer.resblocks"),
    ] {
        let mut i = 0;
        while t.contains_key(&format!("{hf}.{i}.layer_norm1.weight")) {
            let (h, ob) = (format!("{hf}.{i}"), format!("{oa}.{i}"));
            for (hs, os) in [
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ] {
                mv(o, &mut t, source, &format!("{ob}.{os}.weight"), &format!("{h}.{hs}.weight"))?;
                mv(o, &mut t, source, &format!("{ob}.{os}.bias"), &format!("{h}.{hs}.bias"))?;
            }
            // OpenAI's packed in-projection is q, k, v concatenated in that order.
            for suffix in ["weight", "bias"] {
                let parts = ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .map(|p| take(&mut t, &format!("{h}.self_attn.{p}.{suffix}"), source))
                    .collect::<Result<Vec<_>>>()?;
                o.insert(format!("{ob}.attn.in_proj_{suffix}"), Tensor::cat(&parts, 0));
            }
            i += 1;
        }
    }
    // The projections are stored (out, in) as nn.Linear weights; OpenAI's are (in, out).
    o.insert("visual.proj".into(), take(&mut t, "visual_projection.weight", source)?.transpose(0, 1).contiguous());
    o.insert("text_projection".into(), take(&mut t, "text_projection.weight", source)?.transpose(0, 1).contiguous());
    Ok(out)
}
