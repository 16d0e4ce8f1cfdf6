//! `clipmask prompts show|rank`: what the text encoder reads, and sharpness-based template
//! selection (docs/method.md §7).
use super::args::{ImageSetArgs, ModelArgs};
use super::print_line;
use crate::config::{check_template, DatasetConfig, IMAGENET_TEMPLATES};
use crate::datasets::{read_labels_file, read_split};
use crate::prompts::{all_sentences, parse_templates, rank_templates, read_templates};
use anyhow::{Context, Result};
use std::path::PathBuf;

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
    #[command(flatten)]
    pub input: ImageSetArgs,
    /// Image-level labels: JSON {"<id>": ["<class>", ...]} or text "<id><TAB><class>,...".
    #[arg(long)]
    pub labels: PathBuf,
    /// Candidate templates, one per line with `{}` (default: CLIP's 80 ImageNet templates,
    /// prompts/imagenet-templates.txt, built into the binary).
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Print JSON: {"schema": 1, "templates": [{"template", "sharpness", "images"}]} in rank
    /// order (docs/schemas/prompts-rank.schema.json).
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
    // A closed pipe (`| head`) ends the listing quietly (print_line).
    print_line(format_args!("# config {} ({:?} fusion, {} template(s))", cfg.name, cfg.fusion, cfg.templates.len()))?;
    print_line("## classes")?;
    for (i, (name, sentences)) in classes.iter().enumerate() {
        print_line(format_args!("{:>3} {name}", i + 1))?;
        for s in sentences {
            print_line(format_args!("      {s}"))?;
        }
    }
    print_line("## background words")?;
    for (name, sentences) in &bg {
        print_line(format_args!("    {name}"))?;
        for s in sentences {
            print_line(format_args!("      {s}"))?;
        }
    }
    Ok(0)
}

fn rank(args: &RankArgs) -> Result<i32> {
    // The output is checked before the model loads and the templates are scored.
    if let Some(out) = &args.write_config {
        crate::files::check_final_name(out)?;
    }
    let (model, cfg) = args.model.load()?;
    let labels = read_labels_file(&args.labels)?;
    let ids: Vec<String> = match &args.input.split {
        Some(s) => read_split(s)?,
        None => labels.keys().cloned().collect(),
    };
    let (template_file, mut templates) = match &args.templates {
        Some(f) => (f.clone(), read_templates(f)?),
        None => (PathBuf::from("prompts/imagenet-templates.txt (built in)"), parse_templates(IMAGENET_TEMPLATES)),
    };
    for t in &cfg.templates {
        if !templates.contains(t) {
            templates.push(t.clone());
        }
    }
    for t in &templates {
        check_template(t).with_context(|| format!("templates {}", template_file.display()))?;
    }
    let ranked = rank_templates(&model, &cfg, &args.input.images, &labels, &ids, &templates)?;
    if args.json {
        let out = serde_json::json!({"schema": crate::schema::SCHEMA_VERSION, "templates": ranked});
        print_line(serde_json::to_string_pretty(&out)?)?;
    } else {
        print_line(format_args!("{:>4}  {:>10}  {:>6}  template", "rank", "sharpness", "images"))?;
        for (i, r) in ranked.iter().take(args.top).enumerate() {
            print_line(format_args!("{:>4}  {:>10.6}  {:>6}  {}", i + 1, r.sharpness, r.images, r.template))?;
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
