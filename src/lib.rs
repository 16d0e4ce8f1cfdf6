//! clipmask: pixel pseudo-masks from image-level labels with a frozen CLIP ViT (CLIP-ES).
//!
//! Data flow (see [`pipeline::generate`]): [`clip`] loads CLIP, [`prompts`] turns the
//! [`config`] into text features, [`image_input`] prepares each image, [`clip::vision`] runs the
//! vision tower, [`cam`] computes softmax-GradCAM, [`affinity`] refines with attention, [`crf`]
//! optionally sharpens, [`labels`] turns maps into labels, [`outputs`] writes masks and maps. [`eval`] scores label maps.
// Doc comments of clap arguments are the --help text, where `<id>` and `<class>` are
// placeholders, not HTML.
#![allow(rustdoc::invalid_html_tags)]
pub mod affinity;
pub mod cam;
pub mod cli;
pub mod clip;
pub mod config;
pub mod crf;
pub mod datasets;
pub mod device;
pub mod errors;
pub mod eval;
pub mod files;
pub mod image_input;
pub mod label_metrics;
pub mod labels;
pub mod outputs;
pub mod pipeline;
pub mod prompts;
pub mod signals;
pub mod tagclip;
