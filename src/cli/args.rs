//! Flag groups shared by several commands, each defined once with its docs: the model and
//! config, the images and split, and the dense CRF settings. The parser names the flag in its
//! errors; the library speaks of values.
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Shared model flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// CLIP ViT checkpoint: a file (.pt OpenAI TorchScript, .safetensors, or .bin torch.save
    /// state dict; OpenAI, OpenCLIP or Hugging Face names), a released name (ViT-B/16, ViT-B/32,
    /// ViT-L/14, ViT-L/14@336px) downloaded once to ~/.cache/clipmask (CLIPMASK_CACHE), or a
    /// Hugging Face repo id org/name (openai/clip-vit-base-patch16, an OpenCLIP repo) read from
    /// or fetched into the Hugging Face cache (HF_HOME; offline with HF_HUB_OFFLINE=1).
    #[arg(long, short = 'm', default_value = "ViT-B/16")]
    pub model: String,
    /// Dataset config: a JSON path or a shipped name (voc12, coco14). Holds class names,
    /// prompt names (synonyms), background words, templates, box threshold and palette.
    #[arg(long, short = 'c', default_value = "voc12")]
    pub config: String,
    /// Device: auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision of weights and activations. auto: fp16 on CUDA (as the reference runs there),
    /// fp32 on CPU. fp16: the state OpenAI's clip.load leaves on CUDA (conv, linear and
    /// projection weights fp16, LayerNorms computed in fp32), also on CPU, where it is slow.
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::device::Precision,
    /// Same as --precision fp32 (kept for older scripts).
    #[arg(long, hide = true, conflicts_with = "precision")]
    pub fp32: bool,
}

impl ModelArgs {
    pub fn load(&self) -> Result<(crate::clip::Clip, crate::config::DatasetConfig)> {
        let cfg = crate::config::DatasetConfig::resolve(&self.config)?;
        Ok((self.load_model()?, cfg))
    }

    /// The device `--device` names; `auto` is the process's own GPU under a scheduler (the local
    /// rank's, [`crate::cluster::auto_device`]), else the first GPU, else the CPU. Also says
    /// where the choice came from.
    pub fn device(&self) -> Result<(tch::Device, String)> {
        if self.device.trim().eq_ignore_ascii_case("auto") {
            let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
            let (spec, why) = crate::cluster::auto_device(&crate::cluster::ProcessEnv, gpus);
            return Ok((crate::device::parse_device(&spec)?, format!("--device auto: {why}")));
        }
        Ok((crate::device::parse_device(&self.device)?, format!("--device {}", self.device)))
    }

    /// The model alone, for callers that have already read the config.
    pub fn load_model(&self) -> Result<crate::clip::Clip> {
        self.load_model_on(self.device()?.0)
    }

    /// The model on `device` (from [`ModelArgs::device`]).
    pub fn load_model_on(&self, device: tch::Device) -> Result<crate::clip::Clip> {
        let precision = if self.fp32 { crate::device::Precision::Fp32 } else { self.precision };
        let kind = crate::device::kind_for(device, precision);
        let _step = crate::progress::Step::start(format!(
            "loading {} ({}, {})",
            self.model,
            crate::device::kind_name(kind),
            crate::device::device_name(device)
        ));
        crate::clip::Clip::load(&self.model, device, kind)
    }
}

/// This process's part of a run (`generate`, `crf`, `tag`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ShardArgs {
    /// Process only shard I of N (0-based, "I/N"), or "auto": the shard a scheduler gave this
    /// process (a SLURM job array: SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT or MIN..MAX;
    /// srun tasks: SLURM_PROCID of SLURM_NTASKS, splitting an array task again; torchrun: RANK
    /// of WORLD_SIZE; else the whole run). An id belongs to shard hash(id) mod N, so N
    /// processes cover every id exactly once, whatever the order of the listing. Each shard
    /// writes its own failures.I-of-N.jsonl and summary.I-of-N.json; `clipmask status` checks
    /// the union.
    #[arg(long, value_name = "I/N|auto")]
    pub shard: Option<String>,
}

impl ShardArgs {
    /// The shard, the whole run without `--shard`.
    pub fn shard(&self) -> Result<crate::cluster::Shard> {
        match &self.shard {
            None => Ok(crate::cluster::Shard::all()),
            Some(s) => {
                crate::cluster::Shard::parse(s, &crate::cluster::ProcessEnv).with_context(|| format!("--shard {s}"))
            }
        }
    }
}

/// The images a command runs on.
#[derive(clap::Args, Debug, Clone)]
pub struct ImageSetArgs {
    /// Directory of images, `<id>.<ext>` with ext jpg, jpeg, png, bmp, gif, webp or tif(f), in
    /// either case. Two files for one id are an error.
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Ids to process, one per line (default: every labelled id, sorted; for `tag`, every
    /// image in --images).
    #[arg(long, value_name = "FILE")]
    pub split: Option<PathBuf>,
}

/// Dense CRF settings, shared by `generate --crf` and `clipmask crf`.
#[derive(clap::Args, Debug, Clone)]
pub struct CrfArgs {
    /// Image the CRF's bilateral kernel sees. faithful: the reference's OpenCV BGR image minus
    /// the mean (104.008, 116.669, 122.675) wrapped to uint8, which produced the published
    /// 75.0 mIoU; rgb: the plain photo (what the paper describes).
    #[arg(long, value_enum, default_value = "faithful")]
    pub crf_image: crate::crf::CrfImage,
    /// Pixels whose largest CRF marginal is below this become 255 (ignored by the
    /// segmentation loss): CLIP-ES's confidence-guided loss at this stage.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f32,
    /// Also write OUT/confidence/<id>.npy: the largest marginal per pixel (float32 H x W), for
    /// losses that weight pixels instead of cutting them.
    #[arg(long)]
    pub save_confidence: bool,
    /// Where the dense CRF runs: auto (the GPU when the model runs on CUDA, else the CPU), cpu
    /// (the CPU CRF, one image per core) or cuda (the tensor CRF on the GPU; an error without
    /// one).
    ///
    /// Both give the same labels on >= 99.9 % of pixels (docs/method.md §6). `crf` reads its
    /// maps from files, so there auto is the CPU CRF. tensor-cpu runs the GPU's algorithm on the
    /// CPU, to check its answers on a machine without a GPU (slower than cpu).
    #[arg(long, value_enum, default_value = "auto")]
    pub crf_device: crate::crf::CrfDevice,
}

impl CrfArgs {
    /// The CRF settings for maps on `maps_device` (None: maps read from files).
    pub fn options(
        &self,
        cfg: &crate::config::DatasetConfig,
        maps_device: Option<tch::Device>,
    ) -> Result<crate::label_maps::CrfOptions> {
        if !(0.0..=1.0).contains(&self.confidence) {
            bail!("--confidence must be in [0, 1], got {}", self.confidence);
        }
        let backend = self.crf_device.resolve(maps_device).map_err(|e| {
            anyhow::anyhow!("--crf-device cuda: {e}; use --crf-device cpu (the CPU CRF gives the same labels)")
        })?;
        Ok(crate::label_maps::CrfOptions {
            params: cfg.crf,
            image: self.crf_image,
            backend,
            confidence: self.confidence,
            save_confidence: self.save_confidence,
            stop: None,
        })
    }
}
