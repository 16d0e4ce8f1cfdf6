//! `clipmask prompts show|rank`: what the text encoder reads, and sharpness-based template
//! selection (docs/method.md §7).
use super::ModelArgs;
use crate::config::DatasetConfig;
use crate::datasets::{find_image, read_labels_file, read_split, resolve_labels};
use crate::image_input::load_rgb;
use crate::prompts::{all_sentences, class_sentences, encode_groups, sharpness, zero_shot_scores};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use tch::Tensor;

#[derive(clap::Args, Debug)]
pub struct PromptsArgs {
    #[command(subcommand)]
    pub command: PromptsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum PromptsCommand {
    /// Print the exact sentences encoded for each class and background word.
    Show(ShowArgs),
    /// Rank templates by sharpness on your labelled images (lower is better) and optionally
    /// write a config with the winner.
    #[command(long_about = "Rank templates by sharpness (method §7, CLIP-ES).\n\n\
For each template, every image with at least two ground-truth classes gets zero-shot softmax \
scores s over the config's classes (CLIP's standard protocol: resize, centre crop, class token, \
logit scale). With G its ground-truth classes:\n\n    \
dispersion(image) = var(s[G]) / mean(s[G])   (population variance)\n    \
sharpness(template) = mean of dispersion over those images\n\n\
A lower value means the image's own classes do not suppress each other, which predicts better \
CAMs. Templates: --templates FILE (one per line, {} for the class), default \
prompts/imagenet-templates.txt (CLIP's 80 ImageNet templates), plus the config's own.")]
    Rank(RankArgs),
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// Dataset config: a JSON path or a shipped name (voc12, coco14).
    #[arg(long, short = 'c', default_value = "voc12")]
    pub config: String,
}

#[derive(clap::Args, Debug)]
pub struct RankArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Directory of images (<id>.jpg etc.).
    #[arg(long)]
    pub images: PathBuf,
    /// Image-level labels: JSON {"<id>": ["<class>", ...]} or text "<id><TAB><class>,...".
    #[arg(long)]
    pub labels: PathBuf,
    /// Ids to use, one per line (default: all labelled ids).
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// Candidate templates, one per line with `{}` (default: CLIP's 80 ImageNet templates,
    /// prompts/imagenet-templates.txt, built into the binary).
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Print a JSON list [{"template", "sharpness", "images"}] in rank order.
    #[arg(long)]
    pub json: bool,
    /// How many ranked templates to print in the table (all with --json).
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Write the config with the winning template to this file.
    #[arg(long, value_name = "OUT.json")]
    pub write_config: Option<PathBuf>,
}

pub fn run(args: &PromptsArgs) -> Result<i32> {
    match &args.command {
        PromptsCommand::Show(a) => show(a),
        PromptsCommand::Rank(a) => rank(a),
    }
}

fn show(args: &ShowArgs) -> Result<i32> {
    let cfg = DatasetConfig::resolve(&args.config)?;
    let (classes, bg) = all_sentences(&cfg);
    println!("# config {} ({:?} fusion, {} template(s))", cfg.name, cfg.fusion, cfg.templates.len());
    println!("## classes");
    for (i, (name, sentences)) in classes.iter().enumerate() {
        println!("{:>3} {name}", i + 1);
        for s in sentences {
            println!("      {s}");
        }
    }
    println!("## background words");
    for (name, sentences) in &bg {
        println!("    {name}");
        for s in sentences {
            println!("      {s}");
        }
    }
    Ok(0)
}

#[derive(serde::Serialize)]
pub struct Ranked {
    pub template: String,
    pub sharpness: f64,
    pub images: usize,
}

fn rank(args: &RankArgs) -> Result<i32> {
    // The output is checked before the model loads and the templates are scored.
    if let Some(out) = &args.write_config {
        crate::files::check_final_name(out)?;
    }
    let (model, cfg) = args.model.load()?;
    let labels = read_labels_file(&args.labels)?;
    let ids: Vec<String> = match &args.split {
        Some(s) => read_split(s)?,
        None => labels.keys().cloned().collect(),
    };
    let (template_file, mut templates) = match &args.templates {
        Some(f) => (f.clone(), crate::prompts::read_templates(f)?),
        None => (
            PathBuf::from("prompts/imagenet-templates.txt (built in)"),
            crate::config::IMAGENET_TEMPLATES
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect(),
        ),
    };
    for t in &cfg.templates {
        if !templates.contains(t) {
            templates.push(t.clone());
        }
    }
    for t in &templates {
        crate::prompts::check_template(t).with_context(|| format!("templates {}", template_file.display()))?;
    }

    // Image features once (standard zero-shot protocol), multi-label images only.
    let mut feats = Vec::new();
    let mut gts = Vec::new();
    let mut skipped = 0;
    for id in &ids {
        let Some(names) = labels.get(id) else { continue };
        let Ok(gt) = resolve_labels(&cfg, names) else {
            skipped += 1;
            continue;
        };
        if gt.len() < 2 {
            continue;
        }
        let loaded = find_image(&args.images, id)
            .ok_or_else(|| anyhow::anyhow!(crate::datasets::missing_image_reason(&args.images, id)))
            .and_then(|path| load_rgb(&path));
        match loaded {
            Ok(img) => {
                feats.push(model.image_feature(&img));
                gts.push(gt);
            }
            Err(e) => {
                eprintln!("warning: {}", super::format_error(&e));
                skipped += 1;
            }
        }
    }
    if feats.is_empty() {
        bail!("no usable image with at least two labels: sharpness needs multi-label images");
    }
    if skipped > 0 {
        eprintln!("warning: {skipped} image(s) skipped (unreadable or labels not in the config)");
    }
    let feats = Tensor::cat(&feats, 0);

    let bar = crate::pipeline::progress_bar(templates.len() as u64);
    bar.set_message("templates");
    let mut ranked = Vec::new();
    for t in &templates {
        let groups: Vec<Vec<String>> =
            class_sentences(&cfg, std::slice::from_ref(t)).into_iter().map(|(_, s)| s).collect();
        let classes = encode_groups(&model, &groups)?.to_device(model.device);
        let scores = zero_shot_scores(&model, &feats, &classes)?;
        let (s, n) = sharpness(&scores, &gts);
        ranked.push(Ranked { template: t.clone(), sharpness: s, images: n });
        bar.inc(1);
    }
    bar.finish_and_clear();
    ranked.sort_by(|a, b| a.sharpness.total_cmp(&b.sharpness).then_with(|| a.template.cmp(&b.template)));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ranked)?);
    } else {
        println!("{:>4}  {:>10}  {:>6}  template", "rank", "sharpness", "images");
        for (i, r) in ranked.iter().take(args.top).enumerate() {
            println!("{:>4}  {:>10.6}  {:>6}  {}", i + 1, r.sharpness, r.images, r.template);
        }
    }
    if let Some(out) = &args.write_config {
        let mut new = cfg.clone();
        new.templates = vec![ranked[0].template.clone()];
        let json = serde_json::to_string_pretty(&new)?;
        crate::files::write_atomic(out, |w| Ok(std::io::Write::write_all(w, json.as_bytes())?))?;
        eprintln!("wrote {} with template {:?}", out.display(), ranked[0].template);
    }
    Ok(0)
}
