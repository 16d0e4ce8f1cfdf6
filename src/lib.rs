//! clipmask: pixel pseudo-masks from image-level labels with a frozen CLIP ViT (CLIP-ES).
//!
//! Data flow (see [`pipeline::generate`]): [`clip`] loads CLIP, [`prompts`] turns the
//! [`config`] into text features, [`image_input`] prepares each image, [`clip::vision`] runs the
//! vision tower, [`cam`] computes softmax-GradCAM, [`affinity`] refines with attention, [`crf`]
//! optionally sharpens, [`label_maps`] turns maps into label maps, [`outputs`] writes masks and
//! maps, [`failures`] records what failed. [`tagclip`] predicts image-level labels when there
//! are none; [`eval`] scores label maps (and image-level labels). [`cli`] parses and prints.
// Doc comments of clap arguments are the --help text, where `<id>` and `<class>` are
// placeholders, not HTML.
#![allow(rustdoc::invalid_html_tags)]
pub mod affinity;
pub mod cam;
pub mod cli;
pub mod clip;
pub mod cluster;
pub mod config;
pub mod crf;
pub mod datasets;
pub mod device;
pub mod errors;
pub mod eval;
pub mod failures;
pub mod files;
pub mod image_input;
pub mod label_maps;
pub mod outputs;
pub mod pipeline;
pub mod progress;
pub mod prompts;
pub mod schema;
pub mod signals;
pub mod status;
pub mod tagclip;
