//! Loading CLIP ViT checkpoints: OpenAI's TorchScript archives as released and safetensors
//! files with the same parameter names. The architecture is read off tensor shapes.
use crate::download;
use crate::text::TextTransformer;
use crate::vit::VisionTransformer;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Parameters by OpenAI name, already on the target device and in the target precision.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    kind: Kind,
    device: Device,
    source: PathBuf,
}

impl Weights {
    /// Reads every tensor of a checkpoint onto the CPU, keeping its stored precision.
    pub fn read(path: &Path) -> Result<HashMap<String, Tensor>> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read model {}", path.display()))?;
        if meta.len() == 0 {
            bail!("model {} is empty (0 bytes): expected a CLIP ViT checkpoint", path.display());
        }
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors") || {
            // safetensors starts with an 8-byte little-endian header length then '{'.
            let mut head = [0u8; 9];
            use std::io::Read;
            std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head[8] == b'{'
        };
        let list = if is_safetensors {
            read_safetensors(path).with_context(|| {
                format!("model {} is not a readable safetensors file: expected a CLIP ViT checkpoint", path.display())
            })?
        } else if path.extension().is_some_and(|e| e == "bin") {
            // torch.save'd state dicts (pytorch_model.bin, open_clip_pytorch_model.bin).
            crate::torch_pickle::read_state_dict(path)?
        } else {
            match tch::CModule::load_on_device(path, Device::Cpu) {
                Ok(module) => module.named_parameters().map_err(|e| {
                    anyhow::anyhow!("cannot list parameters of {}: {}", path.display(), first_line(&e.to_string()))
                })?,
                // Not TorchScript: perhaps a torch.save'd state dict under another extension.
                Err(e) => crate::torch_pickle::read_state_dict(path).map_err(|_| {
                    anyhow::anyhow!(
                        "model {} is not a readable TorchScript archive ({}): expected an OpenAI CLIP ViT \
                         checkpoint (.pt), a torch.save'd state dict (.bin) or a .safetensors file",
                        path.display(),
                        first_line(&e.to_string())
                    )
                })?,
            }
        };
        Ok(list.into_iter().collect())
    }

    pub fn new(tensors: HashMap<String, Tensor>, kind: Kind, device: Device, source: &Path) -> Self {
        Self { tensors, kind, device, source: source.to_path_buf() }
    }

    fn raw(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).with_context(|| {
            format!("{}: missing parameter `{name}` (not a CLIP ViT checkpoint?)", self.source.display())
        })
    }

    /// A parameter in the model's precision on the model's device.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.get_kind(name, self.kind)
    }

    pub fn get_kind(&self, name: &str, kind: Kind) -> Result<Tensor> {
        Ok(self.raw(name)?.to_device(self.device).to_kind(kind).detach())
    }

    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        Ok(self.raw(name)?.size())
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn count_blocks(&self, prefix: &str) -> i64 {
        let mut n = 0;
        while self.tensors.contains_key(&format!("{prefix}.{n}.attn.in_proj_weight")) {
            n += 1;
        }
        n
    }
}

/// Reads a safetensors file tensor by tensor (the whole file is never in memory twice, which
/// keeps peak memory near the model's own size).
fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).context("file shorter than the 8-byte header length")?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        bail!("header length {header_len} does not fit in a {file_len}-byte file");
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).context("header is not JSON")?;
    let base = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().with_context(|| format!("{name}: no dtype"))?;
        let kind = match dtype {
            "F32" => Kind::Float,
            "F16" => Kind::Half,
            "BF16" => Kind::BFloat16,
            "F64" => Kind::Double,
            "I64" => Kind::Int64,
            "I32" => Kind::Int,
            other => bail!("{name}: unsupported dtype {other}"),
        };
        let shape: Vec<i64> = info["shape"]
            .as_array()
            .with_context(|| format!("{name}: no shape"))?
            .iter()
            .map(|v| v.as_i64().context("bad shape"))
            .collect::<Result<_>>()?;
        let offs = info["data_offsets"].as_array().with_context(|| format!("{name}: no data_offsets"))?;
        let (start, end) = (
            offs.first().and_then(|v| v.as_u64()).context("bad offsets")?,
            offs.get(1).and_then(|v| v.as_u64()).context("bad offsets")?,
        );
        let numel: i64 = shape.iter().product();
        if end < start || base + end > file_len || (end - start) as usize != numel as usize * kind.elt_size_in_bytes() {
            bail!("{name}: data [{start}, {end}) does not match its shape or the file ({file_len} bytes): truncated?");
        }
        let mut buf = vec![0u8; (end - start) as usize];
        f.seek(SeekFrom::Start(base + start))?;
        f.read_exact(&mut buf)?;
        out.push((name, Tensor::f_from_data_size(&buf, &shape, kind)?));
    }
    Ok(out)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// Architecture of a CLIP ViT, inferred from parameter shapes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClipConfig {
    pub vision_width: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub patch: i64,
    /// Side of the pretrained positional grid (14 for ViT-B/16 at 224 px).
    pub grid: i64,
    pub embed_dim: i64,
    pub text_width: i64,
    pub text_layers: i64,
    pub text_heads: i64,
    pub context_length: i64,
    pub vocab_size: i64,
    /// The MLP activation, from the checkpoint's config (QuickGELU for OpenAI's).
    pub activation: crate::layout::Activation,
}

impl ClipConfig {
    pub fn input_resolution(&self) -> i64 {
        self.patch * self.grid
    }

    pub fn infer(w: &Weights) -> Result<Self> {
        let src = w.source.display().to_string();
        if !w.tensors.contains_key("visual.conv1.weight") || !w.tensors.contains_key("visual.proj") {
            bail!(
                "{src} is not a CLIP ViT checkpoint: expected OpenAI parameter names such as \
                 visual.conv1.weight, visual.proj and visual.transformer.resblocks.N.*"
            );
        }
        let conv = w.shape("visual.conv1.weight")?;
        if conv.len() != 4 || conv[1] != 3 || conv[2] != conv[3] {
            bail!("{src}: visual.conv1.weight has shape {conv:?}, expected [width, 3, patch, patch]");
        }
        let (vision_width, patch) = (conv[0], conv[2]);
        let pos = w.shape("visual.positional_embedding")?;
        let grid = ((pos[0] - 1) as f64).sqrt().round() as i64;
        if grid * grid + 1 != pos[0] {
            bail!("{src}: visual.positional_embedding has {} rows, expected G*G+1", pos[0]);
        }
        let proj = w.shape("visual.proj")?;
        let tok = w.shape("token_embedding.weight")?;
        let tpos = w.shape("positional_embedding")?;
        let vision_layers = w.count_blocks("visual.transformer.resblocks");
        let text_layers = w.count_blocks("transformer.resblocks");
        if vision_layers == 0 || text_layers == 0 {
            bail!("{src}: no transformer blocks found (visual.transformer.resblocks.N / transformer.resblocks.N)");
        }
        let text_width = tok[1];
        Ok(Self {
            vision_width,
            vision_layers,
            vision_heads: (vision_width / 64).max(1),
            patch,
            grid,
            embed_dim: proj[1],
            text_width,
            text_layers,
            text_heads: (text_width / 64).max(1),
            context_length: tpos[0],
            vocab_size: tok[0],
            activation: crate::layout::Activation::QuickGelu,
        })
    }
}

/// A loaded CLIP: the vision tower, the text tower (dropped once text features are cached,
/// to save memory) and the logit scale.
pub struct Clip {
    pub config: ClipConfig,
    pub visual: VisionTransformer,
    pub text: Option<TextTransformer>,
    /// exp(logit_scale): 100 for OpenAI weights.
    pub logit_scale: f64,
    pub device: Device,
    pub kind: Kind,
    /// SHA-256 of the checkpoint file, hex; keys the text-feature cache.
    pub digest: String,
    pub path: PathBuf,
}

impl Clip {
    /// `spec` is a path, a released name such as `ViT-B/16` (see [`download::resolve`]) or a
    /// Hugging Face Hub repo id such as `openai/clip-vit-base-patch16` (see [`crate::hub`]).
    pub fn load(spec: &str, device: Device, kind: Kind) -> Result<Self> {
        if !Path::new(spec).exists() && download::released(spec).is_none() && crate::hub::is_repo_id(spec) {
            let hub = crate::hub::fetch(spec)?;
            let digest = download::model_digest(&hub.weights)?;
            return Self::load_with_digest(&hub.weights, digest, hub.activation, device, kind);
        }
        let path = download::resolve(spec)?;
        let digest = download::model_digest(&path)?;
        if let Some((name, sha, _)) = download::released(spec) {
            if !Path::new(spec).exists() && digest != sha {
                bail!(
                    "cached {name} at {} is corrupt (SHA-256 {digest} instead of {sha}): delete it and run again",
                    path.display()
                );
            }
        }
        let activation = if path.exists() { crate::hub::activation_beside(&path)? } else { Default::default() };
        Self::load_with_digest(&path, digest, activation, device, kind)
    }

    /// A local checkpoint; the activation comes from a config.json / open_clip_config.json
    /// beside it, QuickGELU otherwise.
    pub fn load_path(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let activation = crate::hub::activation_beside(path)?;
        Self::load_with_digest(path, download::model_digest(path)?, activation, device, kind)
    }

    fn load_with_digest(
        path: &Path,
        digest: String,
        activation: crate::layout::Activation,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let (tensors, _layout) = crate::layout::to_openai(Weights::read(path)?, path)?;
        let w = Weights::new(tensors, kind, device, path);
        let mut config = ClipConfig::infer(&w)?;
        config.activation = activation;
        // The same weights with another activation are another model (text-feature cache key).
        let digest = match activation {
            crate::layout::Activation::QuickGelu => digest,
            crate::layout::Activation::Gelu => format!("{digest}+gelu"),
        };
        let visual = VisionTransformer::new(&w, &config).with_context(|| format!("loading {}", path.display()))?;
        let text = TextTransformer::new(&w, &config).with_context(|| format!("loading {}", path.display()))?;
        // exp in fp32, as the reference's `self.logit_scale.exp()` on its fp32 parameter.
        let logit_scale = w.get_kind("logit_scale", Kind::Float)?.exp().double_value(&[]);
        Ok(Self { config, visual, text: Some(text), logit_scale, device, kind, digest, path: path.to_path_buf() })
    }
}
