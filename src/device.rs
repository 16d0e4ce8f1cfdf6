//! `--device auto|cpu|cuda|cuda:N` and `--precision auto|fp32|fp16` (docs/method.md §1: fp16 on
//! CUDA like the reference, fp32 on CPU).
use anyhow::{bail, Result};
use tch::{Device, Kind};

pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "auto" => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        s if s.starts_with("cuda:") => match s[5..].parse::<usize>() {
            Ok(i) => cuda(i),
            Err(_) => bail!("invalid device {spec:?}: expected auto, cpu, cuda or cuda:N"),
        },
        _ => bail!("invalid device {spec:?}: expected auto, cpu, cuda or cuda:N"),
    }
}

fn cuda(i: usize) -> Result<Device> {
    if !tch::Cuda::is_available() {
        bail!("CUDA requested but not available (no GPU or driver visible to libtorch)");
    }
    let n = tch::Cuda::device_count() as usize;
    if i >= n {
        bail!("cuda:{i} requested but only {n} CUDA device(s) are visible");
    }
    Ok(Device::Cuda(i))
}

/// `--precision`: what the weights and activations are computed in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// fp16 on CUDA (the reference's state there), fp32 on CPU.
    #[default]
    Auto,
    Fp32,
    /// The state OpenAI's `clip.load` leaves on CUDA: conv, linear and attention projection
    /// weights, `text_projection` and `visual.proj` in fp16, LayerNorms computed in fp32 and
    /// cast back, embeddings cast to fp16. Runs on CPU too (slowly), which is how it is tested.
    Fp16,
}

/// Activation/weight precision for a device.
pub fn kind_for(device: Device, precision: Precision) -> Kind {
    match precision {
        Precision::Auto if device.is_cuda() => Kind::Half,
        Precision::Auto | Precision::Fp32 => Kind::Float,
        Precision::Fp16 => Kind::Half,
    }
}

/// A precision as the flags spell it: "fp16", "fp32".
pub fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Half => "fp16".into(),
        Kind::Float => "fp32".into(),
        k => format!("{k:?}").to_lowercase(),
    }
}

/// A device as `--device` spells it: "cpu", "cuda:0".
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        d => format!("{d:?}").to_lowercase(),
    }
}
