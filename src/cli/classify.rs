//! `clipmask classify`: CLIP's standard zero-shot protocol (bicubic resize of the shorter side
//! to the model's resolution, centre crop, class-token feature, softmax over the config's
//! classes with the model's logit scale).
use super::ModelArgs;
use crate::prompts::zero_shot;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// How many classes to show per image in the table.
    #[arg(long, short = 'k', default_value_t = 5)]
    pub top: usize,
    /// One JSON object per line: {"schema": 1, "image": "<path>", "probs": {"<class>": p, ...}}
    /// (docs/schemas/classify.schema.json).
    #[arg(long)]
    pub json: bool,
    /// Images to classify.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(args: &ClassifyArgs) -> Result<i32> {
    let (model, cfg) = args.model.load()?;
    let text = crate::prompts::text_features(&model, &cfg)?;
    let names = cfg.class_names();
    let mut failed = 0;
    for path in &args.images {
        let probs = match zero_shot(&model, &text, path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {}", super::format_error(&e));
                failed += 1;
                continue;
            }
        };
        if args.json {
            let map: serde_json::Map<String, serde_json::Value> =
                names.iter().zip(&probs).map(|(n, p)| (n.to_string(), serde_json::json!(p))).collect();
            let line = serde_json::json!({
                "schema": crate::schema::SCHEMA_VERSION,
                "image": path.display().to_string(),
                "probs": map
            });
            super::print_line(line)?;
        } else {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            super::print_line(path.display())?;
            for &i in order.iter().take(args.top) {
                super::print_line(format_args!("  {:>7.3}%  {}", probs[i] * 100.0, names[i]))?;
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}
