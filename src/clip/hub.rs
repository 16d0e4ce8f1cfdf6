//! `--model org/name`: checkpoints from the Hugging Face Hub, through the standard Hugging Face
//! cache, so files a user already fetched with Python are reused and work offline.
//!
//! The cache directory is resolved here (HF_HUB_CACHE, then HF_HOME/hub, then
//! ~/.cache/huggingface/hub, as `huggingface_hub` does) and passed to `hf-hub` explicitly:
//! versions of that crate differ in which variables they read. `HF_HUB_OFFLINE=1` never touches
//! the network; `HF_ENDPOINT` replaces the hub's address (mirrors, tests).
use super::layout::Activation;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A checkpoint found in a Hub repo: the weights file and the activation its config names.
#[derive(Debug, Clone)]
pub struct HubModel {
    pub weights: PathBuf,
    pub activation: Activation,
}

/// Whether `spec` reads as a Hub repo id (`org/name`, one slash, Hub-legal characters).
pub fn is_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else { return false };
    let legal = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.contains("..")
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    legal(org) && legal(name)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Files tried, in order: Hugging Face CLIPModel (weights + config.json), then OpenCLIP.
const HF_WEIGHTS: &[&str] = &["model.safetensors", "pytorch_model.bin"];
const OPENCLIP_WEIGHTS: &[&str] =
    &["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"];

/// Resolves a Hub repo id to a local weights file, downloading into the HF cache when needed.
pub fn fetch(repo_id: &str) -> Result<HubModel> {
    let dir = super::download::hf_cache_dir();
    let cache = hf_hub::Cache::new(dir.clone());
    let cached = cache.model(repo_id.to_string());
    let api = if offline() {
        None
    } else {
        let mut b = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            b = b.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        Some(b.build().context("cannot set up the Hugging Face client")?)
    };
    // Cache first (also online: a file already fetched is not asked for again), then the hub.
    let get = |file: &str| -> Option<PathBuf> {
        if let Some(p) = cached.get(file) {
            return Some(p);
        }
        api.as_ref().and_then(|a| a.model(repo_id.to_string()).get(file).ok())
    };
    let hf_config = get("config.json");
    if hf_config.is_some() {
        if let Some(weights) = HF_WEIGHTS.iter().find_map(|f| get(f)) {
            let activation = hf_config.as_deref().map(Activation::from_hf_config).transpose()?.unwrap_or_default();
            return Ok(HubModel { weights, activation });
        }
    }
    if let Some(cfg) = get("open_clip_config.json") {
        if let Some(weights) = OPENCLIP_WEIGHTS.iter().find_map(|f| get(f)) {
            return Ok(HubModel { weights, activation: Activation::from_open_clip_config(&cfg)? });
        }
    }
    let tried = [&["config.json"], HF_WEIGHTS, &["open_clip_config.json"], OPENCLIP_WEIGHTS].concat().join(", ");
    if offline() {
        bail!(
            "model {repo_id:?}: not in the Hugging Face cache {} (HF_HUB_OFFLINE is set; looked for {tried})",
            dir.display()
        );
    }
    let released: Vec<&str> = super::download::RELEASED.iter().map(|r| r.0).collect();
    bail!(
        "model {repo_id:?} is not a file, not a released name ({}), and no CLIP checkpoint was found for it on \
         the Hugging Face Hub or in {} (looked for {tried})",
        released.join(", "),
        dir.display()
    )
}

/// The activation named by configs beside a local checkpoint (a downloaded Hub snapshot or a
/// copy of one): config.json (`hidden_act`) or open_clip_config.json (`quick_gelu`). OpenAI's
/// QuickGELU when neither is there.
pub fn activation_beside(weights: &Path) -> Result<Activation> {
    let dir = weights.parent().unwrap_or_else(|| Path::new("."));
    let name = weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let oc = dir.join("open_clip_config.json");
    // `exists`, not `is_file`: a config that is there but unreadable (a FIFO, a directory) is an
    // error, not a silent fallback to QuickGELU.
    if name.starts_with("open_clip") && oc.exists() {
        return Activation::from_open_clip_config(&oc);
    }
    let hf = dir.join("config.json");
    if hf.exists() && !name.starts_with("open_clip") {
        return Activation::from_hf_config(&hf);
    }
    Ok(Activation::default())
}
