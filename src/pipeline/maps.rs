//! Maps of images on the model device: preparation (docs/method.md §1), the map source (§4 or
//! §10), CAA (§5), upsampling, test-time augmentation, and labels when no CRF follows.
//!
//! Images of the same grid size are computed as one batch: one trunk forward, one GradCAM
//! backward for every label of every image (or one dense forward), then CAA per image.
use crate::affinity::{affinity, affinity_batch, box_mask, refine, AFFINITY_BLOCKS};
use crate::cam::dense::{dense_features, dense_maps, patch_probs, temperature};
use crate::cam::gradcam::{grad_cam_batch, CamRequest};
use crate::cam::CamSource;
use crate::clip::Clip;
use crate::image_input::{clipes_size, prepare, prepare_at, Prepared};
use crate::prompts::TextFeatures;
use anyhow::{bail, Result};
use image::RgbImage;
use ndarray::Array3;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Settings of the map computation that change numbers.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// CAA box threshold (docs/method.md §5).
    pub box_threshold: f64,
    /// Cap on the longer side of the model input; maps are upsampled back to the original.
    pub max_side: Option<u32>,
    /// Round the interpolated positional table to fp16 as the reference does (docs/method.md §1).
    pub round_pos_fp16: bool,
    /// Which method gives the maps before CAA (`--cam`).
    pub source: CamSource,
    /// Input scales for test-time augmentation (`--scales`); `[1.0]` is no augmentation.
    pub scales: Vec<f64>,
    /// Also run each scale on the horizontally flipped image (`--flip`).
    pub flip: bool,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            box_threshold: 0.4,
            max_side: None,
            round_pos_fp16: true,
            source: CamSource::GradCam,
            scales: vec![1.0],
            flip: false,
        }
    }
}

impl MapOptions {
    /// Whether more than the plain scale-1 input is computed.
    pub fn augmented(&self) -> bool {
        self.flip || self.scales.len() != 1 || self.scales[0] != 1.0
    }
}

/// Maps of one image at its original resolution.
pub struct ImageMaps {
    /// 0-based class indices, label order.
    pub keys: Vec<usize>,
    /// Maps before CAA (K, H, W), resized from the grid; on the host only when asked for.
    pub raw: Option<Array3<f32>>,
    /// CAA-refined maps (K, H, W); on the host only when asked for.
    pub refined: Option<Array3<f32>>,
    /// The label map (H * W, row-major) when it was computed on the device (no CRF).
    pub labels: Option<Vec<u8>>,
    /// Softmax over labels + background words (GradCAM) or its mean over patches (dense).
    pub probs: Vec<f32>,
    /// Seconds spent in each model-side stage for this image (its share of its batches).
    pub times: StageTimes,
}

/// Where the time goes, in seconds (summed over images for a run). On CUDA the stages are
/// asynchronous, so only their sum is meaningful there.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct StageTimes {
    pub decode: f64,
    pub forward: f64,
    pub backward: f64,
    pub caa: f64,
    pub write: f64,
}

impl StageTimes {
    pub fn add(&mut self, o: &StageTimes) {
        self.decode += o.decode;
        self.forward += o.forward;
        self.backward += o.backward;
        self.caa += o.caa;
        self.write += o.write;
    }
}

/// Every input of an image: each scale, and its mirror image with `flip`. Scale s resizes to
/// ceil(s * side / patch) * patch, as CLIP-ES's `img_ms_and_flip` (after `--max-side`).
pub fn prepare_variants(img: &RgbImage, patch: i64, opts: &MapOptions) -> Vec<Prepared> {
    if !opts.augmented() {
        return vec![prepare(img, patch, opts.max_side)];
    }
    let (w, h) = (img.width(), img.height());
    let (bw, bh) = match opts.max_side {
        // The cap applies to the base size; scales multiply it.
        Some(_) => {
            let (cw, ch) = clipes_size(w, h, 1, opts.max_side);
            (cw as f64, ch as f64)
        }
        None => (w as f64, h as f64),
    };
    let mut out = Vec::new();
    for &s in &opts.scales {
        let up = |v: f64| ((s * v / patch as f64).ceil() as u32).max(1) * patch as u32;
        let (iw, ih) = (up(bw), up(bh));
        out.push(prepare_at(img, patch, iw, ih, false));
        if opts.flip {
            out.push(prepare_at(img, patch, iw, ih, true));
        }
    }
    out
}

/// One input of a batch: its prepared tensor and the image's labels.
#[derive(Clone, Copy)]
pub struct Unit<'a> {
    pub prepared: &'a Prepared,
    pub labels: &'a [usize],
}

/// Maps of one input, on the device, at the original image size.
pub struct UnitMaps {
    pub raw: Tensor,
    pub refined: Tensor,
    pub probs: Tensor,
    pub times: StageTimes,
}

/// docs/method.md §2, §4 (or §10), §5 for inputs of the same grid size, as one batch. Returns
/// one result per unit, in order.
pub fn compute_batch(model: &Clip, text: &TextFeatures, units: &[Unit], opts: &MapOptions) -> Result<Vec<UnitMaps>> {
    let Some(first) = units.first() else { return Ok(Vec::new()) };
    let (gh, gw) = (first.prepared.gh, first.prepared.gw);
    if units.iter().any(|u| (u.prepared.gh, u.prepared.gw) != (gh, gw)) {
        bail!("a batch must hold inputs of one grid size");
    }
    let vit = &model.visual;
    let device = model.device;
    let b = units.len() as f64;
    let t0 = Instant::now();
    let inputs: Vec<&Tensor> = units.iter().map(|u| &u.prepared.input).collect();
    let input = if inputs.len() == 1 { inputs[0].shallow_clone() } else { Tensor::cat(&inputs, 0) };
    let input = to_device_async(&input, device);
    let pos = vit.positional(gh, gw, opts.round_pos_fp16).to_device(device);
    let x = {
        let _g = tch::no_grad_guard();
        vit.embed(&input, &pos)
    };
    // Block L's attention comes from the gradient pass (or a plain forward for dense sources);
    // CAA needs the 7 before it.
    let trunk = vit.trunk_keeping(x, vit.layers() - 1, AFFINITY_BLOCKS - 1);
    let candidates: Vec<Tensor> = units.iter().map(|u| candidate_text(text, u.labels, device)).collect();
    let forward = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    // (maps (K, gh, gw) fp32, block L attention (n+1, n+1), probs) per unit.
    let cams: Vec<(Tensor, Tensor, Tensor)> = if opts.source == CamSource::GradCam {
        let targets: Vec<Vec<i64>> = units.iter().map(|u| (0..u.labels.len() as i64).collect()).collect();
        let requests: Vec<CamRequest> = candidates
            .iter()
            .zip(&targets)
            .enumerate()
            .map(|(i, (t, targets))| CamRequest { index: i as i64, text: t, targets })
            .collect();
        grad_cam_batch(vit, model.logit_scale, &trunk.tokens, &requests, gh, gw)
            .into_iter()
            .map(|c| (c.maps, c.last_attention, c.probs))
            .collect()
    } else {
        let _g = tch::no_grad_guard();
        let block = vit.blocks.last().expect("at least one block");
        let (_, attn) = block.forward(&trunk.tokens, None);
        let feats = dense_features(vit, &trunk.tokens, opts.source, gh, gw);
        let temp = temperature(opts.source, model.logit_scale);
        candidates
            .iter()
            .zip(units)
            .enumerate()
            .map(|(i, (t, u))| {
                let probs = patch_probs(&feats.get(i as i64), t, temp);
                let maps = dense_maps(&probs, u.labels.len() as i64, gh, gw);
                let probs = probs.mean_dim(0, false, Kind::Float);
                (maps, attn.get(i as i64), probs)
            })
            .collect()
    };
    let backward = t1.elapsed().as_secs_f64();

    let t2 = Instant::now();
    let _g = tch::no_grad_guard();
    // CAA's R: for the whole batch in one set of kernels where the formulation is batched
    // (CUDA), else one image at a time as the reference (docs/method.md "Which steps differ on CUDA").
    let r_batch = vit.formulation().batched.then(|| {
        let mut attentions: Vec<Tensor> = trunk.attentions.iter().map(|a| a.shallow_clone()).collect();
        attentions.push(Tensor::stack(&cams.iter().map(|c| &c.1).collect::<Vec<_>>(), 0));
        affinity_batch(&attentions)
    });
    // The boxes need the maps on the host (OpenCV's contour rules, docs/method.md §5); they
    // are K grid-sized maps per input, small next to the full-size ones: one copy for the batch.
    let all_maps = Tensor::cat(&cams.iter().map(|c| c.0.reshape([-1])).collect::<Vec<_>>(), 0);
    let host_maps: Vec<f32> = Vec::<f32>::try_from(all_maps.to_device(Device::Cpu).to_kind(Kind::Float))?;
    // The box masks of the whole batch, uploaded in one copy.
    let (ghu, gwu) = (gh as usize, gw as usize);
    let mut masks = Vec::with_capacity(host_maps.len());
    for map in host_maps.chunks(ghu * gwu) {
        masks.extend(box_mask(map, ghu, gwu, opts.box_threshold));
    }
    let masks = Tensor::from_slice(&masks).reshape([-1, (ghu * gwu) as i64]).to_device(device);
    let mut offset = 0;
    let mut out = Vec::with_capacity(units.len());
    for (i, (u, (maps, last_attention, probs))) in units.iter().zip(cams).enumerate() {
        let r = match &r_batch {
            Some(r) => r.get(i as i64),
            None => {
                let mut attentions: Vec<Tensor> = trunk.attentions.iter().map(|a| a.get(i as i64)).collect();
                attentions.push(last_attention);
                affinity(&attentions)
            }
        };
        let k = u.labels.len() as i64;
        let masks = masks.narrow(0, offset, k);
        offset += k;
        let refined = refine(&r, &maps, &masks);
        let p = u.prepared;
        let (mut raw, mut refined) = (upsample(&maps, p.height, p.width), upsample(&refined, p.height, p.width));
        if p.flipped {
            raw = raw.flip([2]);
            refined = refined.flip([2]);
        }
        out.push(UnitMaps {
            raw,
            refined,
            probs,
            times: StageTimes { forward: forward / b, backward: backward / b, ..Default::default() },
        });
    }
    let caa = t2.elapsed().as_secs_f64() / b;
    for u in &mut out {
        u.times.caa = caa;
    }
    Ok(out)
}

/// Features of the image's labels then the background words, (K + M, E), on `device`.
fn candidate_text(text: &TextFeatures, labels: &[usize], device: Device) -> Tensor {
    let idx: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let idx = Tensor::from_slice(&idx).to_device(text.classes.device());
    Tensor::cat(&[text.classes.index_select(0, &idx), text.background.shallow_clone()], 0).to_device(device)
}

/// Host to device; on CUDA through pinned memory without blocking the host thread.
fn to_device_async(t: &Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => t.shallow_clone(),
        _ => t.pin_memory(device).to_device_(device, t.kind(), true, false),
    }
}

/// Bilinear resize with half-pixel centres (cv2.resize INTER_LINEAR), (K,h,w) -> (K,H,W), fp32,
/// on the maps' device.
fn upsample(maps: &Tensor, height: i64, width: i64) -> Tensor {
    maps.to_kind(Kind::Float).unsqueeze(0).upsample_bilinear2d([height, width], false, None, None).squeeze_dim(0)
}

/// What the caller needs on the host.
#[derive(Debug, Clone, Copy)]
pub struct HostCopies {
    /// Raw and refined maps (`--save-cams`, the CRF).
    pub maps: bool,
    /// The label map computed on the device with this background exponent (no CRF).
    pub labels_alpha: Option<f32>,
}

/// An image's maps from its inputs' maps: the mean over the inputs (raw and refined
/// separately; one input is taken as is), then the host copies asked for.
pub fn finish_image(labels: &[usize], units: Vec<UnitMaps>, host: HostCopies) -> Result<ImageMaps> {
    let n = units.len();
    let mut times = StageTimes::default();
    for u in &units {
        times.add(&u.times);
    }
    let t = Instant::now();
    let (raw, refined, probs) = if n == 1 {
        let u = units.into_iter().next().expect("one unit");
        (u.raw, u.refined, u.probs)
    } else {
        let mean = |ts: Vec<&Tensor>| Tensor::stack(&ts, 0).mean_dim(0, false, Kind::Float);
        (
            mean(units.iter().map(|u| &u.raw).collect()),
            mean(units.iter().map(|u| &u.refined).collect()),
            mean(units.iter().map(|u| &u.probs).collect()),
        )
    };
    let keys: Vec<i64> = labels.iter().map(|&k| k as i64).collect();
    let labels_out = match host.labels_alpha {
        Some(alpha) => Some(crate::label_maps::label_map_on_device(&refined, &keys, alpha)?),
        None => None,
    };
    let (raw, refined) = if host.maps { (Some(to_array(&raw)?), Some(to_array(&refined)?)) } else { (None, None) };
    let probs = Vec::<f32>::try_from(probs.to_device(Device::Cpu))?;
    times.caa += t.elapsed().as_secs_f64();
    Ok(ImageMaps { keys: labels.to_vec(), raw, refined, labels: labels_out, probs, times })
}

fn to_array(maps: &Tensor) -> Result<Array3<f32>> {
    let s = maps.size();
    let v = Vec::<f32>::try_from(maps.to_device(Device::Cpu).reshape([-1]))?;
    Ok(Array3::from_shape_vec((s[0] as usize, s[1] as usize, s[2] as usize), v)?)
}

/// Maps of one image on the host (the library's one-image entry point).
pub struct HostMaps {
    pub keys: Vec<usize>,
    /// (K, H, W) before CAA.
    pub raw: Array3<f32>,
    /// (K, H, W) after CAA.
    pub refined: Array3<f32>,
    pub probs: Vec<f32>,
}

/// docs/method.md §2, §4 (or §10), §5 for one prepared image, maps on the host.
pub fn compute_maps(
    model: &Clip,
    text: &TextFeatures,
    p: &Prepared,
    labels: &[usize],
    opts: &MapOptions,
) -> Result<HostMaps> {
    host_maps(labels, compute_batch(model, text, &[Unit { prepared: p, labels }], opts)?)
}

/// Maps of one image with every input `opts` asks for (scales, flip; docs/method.md §11),
/// averaged, on the host. Without augmentation this is [`compute_maps`] on [`prepare`].
pub fn image_maps(
    model: &Clip,
    text: &TextFeatures,
    img: &RgbImage,
    labels: &[usize],
    opts: &MapOptions,
) -> Result<HostMaps> {
    let variants = prepare_variants(img, model.visual.patch, opts);
    let mut units = Vec::with_capacity(variants.len());
    for p in &variants {
        units.extend(compute_batch(model, text, &[Unit { prepared: p, labels }], opts)?);
    }
    host_maps(labels, units)
}

/// An image's inputs' maps, averaged, on the host.
fn host_maps(labels: &[usize], units: Vec<UnitMaps>) -> Result<HostMaps> {
    let m = finish_image(labels, units, HostCopies { maps: true, labels_alpha: None })?;
    match (m.raw, m.refined) {
        (Some(raw), Some(refined)) => Ok(HostMaps { keys: m.keys, raw, refined, probs: m.probs }),
        _ => bail!("internal: maps were not copied to the host"),
    }
}
