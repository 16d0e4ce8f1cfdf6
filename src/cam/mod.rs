//! Map sources: one map per image label on the patch grid, min-max normalised, before CAA.
//!
//! [`gradcam`] is CLIP-ES's softmax-GradCAM (docs/method.md §4), the default. [`dense`] holds
//! the training-free dense-CLIP sources (MaskCLIP, SCLIP, ClearCLIP, NACLIP; docs/method.md
//! §10), which change the last block's attention and need no backward pass. A new source goes
//! in its own file here, with a [`CamSource`] variant; everything after the maps (CAA, labels,
//! CRF) is shared.
pub mod dense;
pub mod gradcam;

pub use gradcam::{grad_cam, grad_cam_targets, CamResult};
use tch::Tensor;

/// Which method produces the maps (`generate --cam`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum CamSource {
    /// CLIP-ES: softmax-GradCAM on block L's ln_1 output (one backward pass).
    #[default]
    GradCam,
    /// MaskCLIP (ECCV 2022): the value path of the last block.
    MaskClip,
    /// SCLIP (ECCV 2024): correlative q-q + k-k attention in the last block.
    Sclip,
    /// ClearCLIP (ECCV 2024): q-q attention, no residual, no FFN in the last block.
    ClearClip,
    /// NACLIP (WACV 2025): k-k attention with a Gaussian neighbourhood bias, reduced block.
    Naclip,
}

impl CamSource {
    /// Whether the source takes gradients (only GradCAM does).
    pub fn needs_backward(self) -> bool {
        self == CamSource::GradCam
    }
}

/// One pass of pytorch-grad-cam's `scale_cam_image`: (M - min) / (max(M - min) + 1e-7) over
/// the last two dims, per leading index. CAA's refined maps get one pass; GradCAM maps get
/// two (see [`scale_twice`]).
pub fn min_max(maps: &Tensor) -> Tensor {
    let k = maps.size()[0];
    let flat = maps.reshape([k, -1]);
    let shifted = &flat - flat.amin([1], true);
    (&shifted / (shifted.amax([1], true) + 1e-7)).reshape(maps.size())
}

/// The reference's GradCAM scaling (docs/method.md §4): `compute_cam_per_layer` scales each layer's
/// map, `aggregate_multi_layers` takes ReLU and the mean over the (single) layer, which leave
/// it unchanged, and scales again. The second pass is not a no-op: when the map's maximum is
/// small, the 1e-7 is a visible fraction of it.
pub fn scale_twice(maps: &Tensor) -> Tensor {
    min_max(&min_max(maps).relu())
}
