//! `--device auto|cpu|cuda|cuda:N` and the precision that goes with it (method.md §1:
//! fp16 on CUDA like the reference, fp32 on CPU).
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

/// Activation/weight precision for a device; `force_fp32` keeps fp32 on CUDA.
pub fn kind_for(device: Device, force_fp32: bool) -> Kind {
    if device.is_cuda() && !force_fp32 {
        Kind::Half
    } else {
        Kind::Float
    }
}
