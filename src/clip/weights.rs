//! Checkpoint tensors by OpenAI name (the bottom layer of the model): reading OpenAI's
//! TorchScript archives, safetensors and torch.save state dicts onto the CPU, then handing
//! parameters out on the model's device and in its precision.
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Parameters by OpenAI name, already on the target device and in the target precision.
pub struct Weights {
    pub(super) tensors: HashMap<String, Tensor>,
    kind: Kind,
    device: Device,
    pub(super) source: PathBuf,
}

impl Weights {
    /// Reads every tensor of a checkpoint onto the CPU, keeping its stored precision.
    pub fn read(path: &Path) -> Result<HashMap<String, Tensor>> {
        let meta = crate::files::open_regular(path)
            .and_then(|f| Ok(f.metadata()?))
            .with_context(|| format!("cannot read model {}", path.display()))?;
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
            super::torch_pickle::read_state_dict(path)?
        } else {
            match tch::CModule::load_on_device(path, Device::Cpu) {
                Ok(module) => module.named_parameters().map_err(|e| {
                    anyhow::anyhow!("cannot list parameters of {}: {}", path.display(), first_line(&e.to_string()))
                })?,
                // Not TorchScript: perhaps a torch.save'd state dict under another extension.
                Err(e) => super::torch_pickle::read_state_dict(path).map_err(|_| {
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

    pub(super) fn count_blocks(&self, prefix: &str) -> i64 {
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
    let mut f = crate::files::open_regular(path)?;
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
