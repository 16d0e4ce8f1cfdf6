//! Which model inputs run together (docs/method.md §12): inputs of one grid size, at most
//! `--batch-size` of them, bucketed by grid size over a window of upcoming images (so that
//! mixed-size datasets such as COCO fill their batches), and split further when the attention
//! memory CAA keeps would pass `--max-gpu-mem`.
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::ops::Range;

/// Images the model stage takes at once, in batches: inputs are grouped by grid size over this
/// many batches' worth of images, so a grid size seen once in every few images still fills a
/// batch. Results do not depend on it (batching moves maps by <= 1e-6, masks not at all).
pub const BUCKET_WINDOW: usize = 4;

/// `--max-gpu-mem`: a byte count with an optional binary unit (`20G`, `512MiB`, `1.5T`,
/// `4096`), or `auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    /// 80 % of the device's memory on CUDA (`nvidia-smi`), no bound elsewhere.
    Auto,
    Bytes(u64),
}

impl std::str::FromStr for MemoryBudget {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudget::Auto);
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num.parse().with_context(|| format!("'{s}' is not a size such as 20G, 512M or auto"))?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            u => bail!("unknown unit '{u}' in '{s}': use K, M, G or T (powers of 1024), or auto"),
        };
        let bytes = value * (1u64 << shift) as f64;
        if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
            bail!("'{s}' is not a positive size");
        }
        Ok(MemoryBudget::Bytes(bytes as u64))
    }
}

/// The attention a model input keeps on the device (docs/method.md §12, "Memory").
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Attention heads of the vision tower.
    pub heads: u64,
    /// Bytes per element of the model's precision (2 in fp16, 4 in fp32).
    pub elem_bytes: u64,
    /// Blocks whose head-averaged map CAA keeps (8).
    pub kept_blocks: u64,
    /// GradCAM: block L runs on one copy per label and keeps its probabilities for the backward.
    pub backward: bool,
}

/// Estimated device bytes of the attention of one input with `tokens` = n + 1 tokens and
/// `labels` labels, all n² terms (L = tokens):
/// - the kept head-averaged maps: `kept_blocks · L²` elements;
/// - one explicit block's scores and probabilities, per head: `2 · heads · L²`;
/// - block L: with `backward`, its probabilities and their gradient on every label's copy,
///   `2 · heads · L² · labels`; without, one more explicit block, `2 · heads · L²`;
///
/// times `elem_bytes`; plus CAA's fp32 affinity (R, the Sinkhorn iterate and S: `3 · 4 · n²`).
pub fn attention_bytes(tokens: u64, labels: u64, shape: &AttentionShape) -> u64 {
    let l2 = tokens * tokens;
    let n2 = (tokens - 1) * (tokens - 1);
    let last = if shape.backward { 2 * shape.heads * l2 * labels.max(1) } else { 2 * shape.heads * l2 };
    (shape.kept_blocks * l2 + 2 * shape.heads * l2 + last) * shape.elem_bytes + 3 * 4 * n2
}

/// Consecutive runs of `costs` (one per input, in order), each at most `max_len` long and, when
/// a `budget` is given, of total cost at most `budget` (an input over the budget alone runs
/// alone: it cannot be split).
pub fn split_by_budget(costs: &[u64], max_len: usize, budget: Option<u64>) -> Vec<Range<usize>> {
    let max_len = max_len.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut sum = 0u64;
    for (i, &c) in costs.iter().enumerate() {
        let over = budget.is_some_and(|b| i > start && sum.saturating_add(c) > b);
        if i - start == max_len || over {
            out.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(c);
    }
    if start < costs.len() {
        out.push(start..costs.len());
    }
    out
}

/// Inputs `(image, variant)` with their grid sizes, in order, grouped by grid size (first
/// appearance order kept inside a group; groups by grid size).
pub fn group_by_grid(grids: &[Vec<(i64, i64)>]) -> BTreeMap<(i64, i64), Vec<(usize, usize)>> {
    let mut groups: BTreeMap<(i64, i64), Vec<(usize, usize)>> = BTreeMap::new();
    for (i, variants) in grids.iter().enumerate() {
        for (v, &g) in variants.iter().enumerate() {
            groups.entry(g).or_default().push((i, v));
        }
    }
    groups
}

/// The budget in bytes `auto` means on `device`: 80 % of the GPU's memory as `nvidia-smi`
/// reports it; none on the CPU or when the GPU's size is unknown.
pub fn resolve_budget(budget: MemoryBudget, device: tch::Device) -> Option<u64> {
    match (budget, device) {
        (MemoryBudget::Bytes(b), _) => Some(b),
        (MemoryBudget::Auto, tch::Device::Cuda(i)) => gpu_total_bytes(i).map(|t| t / 10 * 8),
        (MemoryBudget::Auto, _) => None,
    }
}

fn gpu_total_bytes(index: usize) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", &index.to_string()])
        .output()
        .ok()?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()?;
    Some(mib << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        let b = |s: &str| match s.parse::<MemoryBudget>().unwrap() {
            MemoryBudget::Bytes(b) => b,
            MemoryBudget::Auto => panic!("auto"),
        };
        assert_eq!(b("20G"), 20 << 30);
        assert_eq!(b("512MiB"), 512 << 20);
        assert_eq!(b("1.5k"), 1536);
        assert_eq!(b("4096"), 4096);
        assert_eq!("AUTO".parse::<MemoryBudget>().unwrap(), MemoryBudget::Auto);
        for bad in ["", "G", "-1G", "20X", "0", "1..2G"] {
            assert!(bad.parse::<MemoryBudget>().is_err(), "{bad}");
        }
    }

    /// A hand-computed case: a 500x375 VOC photo at patch 16 is a 32 x 24 grid, n = 768,
    /// L = 769; ViT-B/16 has 12 heads; fp16; 2 labels, GradCAM.
    /// kept 8 L² + one block 2·12 L² + block L on 2 copies 2·12·L²·2 = 80 L² elements
    /// = 80 · 591 361 · 2 bytes = 94 617 760; CAA 12 · 768² = 7 077 888; total 101 695 648.
    #[test]
    fn attention_memory_of_a_voc_photo() {
        let shape = AttentionShape { heads: 12, elem_bytes: 2, kept_blocks: 8, backward: true };
        assert_eq!(attention_bytes(769, 2, &shape), 101_695_648);
        // Without the backward, block L is one more explicit block: 8 + 24 + 24 = 56 L².
        let dense = AttentionShape { backward: false, ..shape };
        assert_eq!(attention_bytes(769, 2, &dense), 56 * 591_361 * 2 + 7_077_888);
    }

    #[test]
    fn batches_split_by_length_and_budget() {
        assert_eq!(split_by_budget(&[1; 5], 2, None), vec![0..2, 2..4, 4..5]);
        assert_eq!(split_by_budget(&[4, 4, 4, 4], 8, Some(8)), vec![0..2, 2..4]);
        // An input over the budget runs alone.
        assert_eq!(split_by_budget(&[3, 20, 3, 3], 8, Some(8)), vec![0..1, 1..2, 2..4]);
        assert_eq!(split_by_budget(&[], 8, Some(8)), Vec::<Range<usize>>::new());
    }
}
