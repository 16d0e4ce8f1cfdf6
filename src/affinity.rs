//! Class-aware attention affinity, CAA (docs/method.md §5): an affinity from the last blocks'
//! attention, restricted per label to boxes around its GradCAM map, propagates each map.
use crate::cam::min_max;
use tch::{Kind, Tensor};

/// How many final blocks' attention the affinity averages.
pub const AFFINITY_BLOCKS: usize = 8;

/// R = S @ S with S the symmetrised Sinkhorn-normalised mean attention of the given blocks,
/// class token removed. `attentions`: (n+1, n+1) maps, the last `AFFINITY_BLOCKS` are used.
///
/// The mean over blocks runs in the attentions' precision and is then cast to fp32, as the
/// reference averages its fp16 attention on the GPU before `.float()`.
pub fn affinity(attentions: &[Tensor]) -> Tensor {
    let start = attentions.len().saturating_sub(AFFINITY_BLOCKS);
    let kind = attentions[start].kind();
    let used: Vec<Tensor> = attentions[start..].iter().map(|a| a.to_kind(kind)).collect();
    let w = Tensor::stack(&used, 0).mean_dim(0, false, kind).to_kind(Kind::Float);
    let n = w.size()[0];
    let mut t = w.narrow(0, 1, n - 1).narrow(1, 1, n - 1);
    // Three rounds: columns then rows (the reference's one + two).
    for _ in 0..3 {
        t = &t / t.sum_dim_intlist(0, true, Kind::Float);
        t = &t / t.sum_dim_intlist(1, true, Kind::Float);
    }
    let s = (&t + t.transpose(0, 1)) / 2.0;
    s.matmul(&s)
}

/// [`affinity`] for a batch of images in one set of kernels (the CUDA form, docs/method.md
/// "Which steps differ on CUDA"): `attentions` are the blocks' (B, n+1, n+1) maps, the last
/// `AFFINITY_BLOCKS` used, and image b's R is row b of the result (B, n, n). The same
/// operations per image as [`affinity`]: the block mean in the attentions' precision, three
/// Sinkhorn rounds in fp32, symmetrisation and one squaring.
pub fn affinity_batch(attentions: &[Tensor]) -> Tensor {
    let start = attentions.len().saturating_sub(AFFINITY_BLOCKS);
    let kind = attentions[start].kind();
    let used: Vec<Tensor> = attentions[start..].iter().map(|a| a.to_kind(kind)).collect();
    let w = Tensor::stack(&used, 1).mean_dim(1, false, kind).to_kind(Kind::Float);
    let n = w.size()[1];
    let mut t = w.narrow(1, 1, n - 1).narrow(2, 1, n - 1);
    for _ in 0..3 {
        t = &t / t.sum_dim_intlist(1, true, Kind::Float);
        t = &t / t.sum_dim_intlist(2, true, Kind::Float);
    }
    let s = (&t + t.transpose(1, 2)) / 2.0;
    s.bmm(&s)
}

/// Bounding boxes (x0, y0, x1, y1), end-exclusive, of the 8-connected components of `fg` on an
/// h x w grid: what OpenCV's findContours(RETR_EXTERNAL) + boundingRect give for a binary map
/// (components nested in another's hole lie inside its box, so dropping them changes nothing).
pub fn component_boxes(fg: &[bool], h: usize, w: usize) -> Vec<(usize, usize, usize, usize)> {
    let mut seen = vec![false; h * w];
    let mut boxes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..h * w {
        if !fg[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        while let Some(i) = stack.pop() {
            let (y, x) = (i / w, i % w);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                    if ny < 0 || nx < 0 || ny >= h as i64 || nx >= w as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if fg[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        boxes.push((x0, y0, x1, y1));
    }
    boxes
}

/// Box mask over the gh x gw grid for one normalised map (docs/method.md §5): threshold
/// uint8(255 M) > floor(thr * max), bounding box of every 8-connected region with the
/// reference's right/bottom edge clipping, union.
pub fn box_mask(map: &[f32], gh: usize, gw: usize, threshold: f64) -> Vec<f32> {
    let u8map: Vec<u8> = map.iter().map(|&v| (v * 255.0) as u8).collect();
    let max = u8map.iter().copied().max().unwrap_or(0);
    let thr = (threshold * max as f64) as u8;
    let fg: Vec<bool> = u8map.iter().map(|&v| v > thr).collect();
    let mut mask = vec![0f32; gh * gw];
    for (x0, y0, x1, y1) in component_boxes(&fg, gh, gw) {
        // cv2.boundingRect's end is exclusive; the reference clips it to w - 1 / h - 1,
        // dropping the last column/row at the right/bottom edge.
        let (xe, ye) = (x1.min(gw - 1), y1.min(gh - 1));
        for y in y0..ye {
            mask[y * gw + x0..y * gw + xe.max(x0)].iter_mut().for_each(|m| *m = 1.0);
        }
    }
    mask
}

/// Refined maps (K, gh, gw), min-max normalised: column-masked R applied to each map, which
/// equals R @ (B_c ⊙ vec(M_c)).
pub fn refine(r: &Tensor, maps: &Tensor, masks: &Tensor) -> Tensor {
    let size = maps.size();
    let k = size[0];
    let m = maps.to_kind(Kind::Float).reshape([k, -1]) * masks.to_kind(Kind::Float).to_device(maps.device());
    let refined = m.matmul(&r.transpose(0, 1));
    min_max(&refined.reshape(size))
}
