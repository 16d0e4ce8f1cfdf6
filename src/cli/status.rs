//! `clipmask status OUT`: whether a run (sharded or not) is complete, with the same
//! `--images/--labels/--split` as the run; `--missing FILE` writes the ids to rerun.
use super::args::ImageSetArgs;
use crate::datasets::{read_labels, read_split, LabelSource};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_long_help = "An id is done when its mask (and every other kind of output the run wrote: \
cams, overlays, confidence) is there and readable, failed when a failures file lists it \
(failures.jsonl, failures.I-of-N.jsonl), missing otherwise. Exit status: 0 when every id is done \
or failed, 1 when some are missing, 2 on an error. Rerun the missing ones with --missing FILE, then \
`clipmask generate ... --split FILE --overwrite` (--overwrite redoes an id whose mask is there but \
another output is not, such as a truncated archive).")]
pub struct StatusArgs {
    /// The run's output directory.
    pub out: PathBuf,
    #[command(flatten)]
    pub input: ImageSetArgs,
    /// The run's image-level labels file (JSON or text), or `auto` for OUT/labels.json.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// The run's VOC XML annotations directory.
    #[arg(long, value_name = "DIR", conflicts_with = "labels")]
    pub annotations: Option<PathBuf>,
    /// The run's COCO instances file.
    #[arg(long, value_name = "INSTANCES.json", conflicts_with_all = ["labels", "annotations"])]
    pub coco: Option<PathBuf>,
    /// Dataset config (for --coco's category order).
    #[arg(long, short = 'c', default_value = "voc12")]
    pub config: String,
    /// Count per shard of N (default: N from the run's failures.I-of-N / summary.I-of-N files).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub shards: Option<u64>,
    /// Print the report as JSON (schema 1).
    #[arg(long)]
    pub json: bool,
    /// Write the missing ids, one per line, to FILE: the --split of the rerun.
    #[arg(long, value_name = "FILE")]
    pub missing: Option<PathBuf>,
}

pub fn run(args: &StatusArgs) -> Result<i32> {
    let cfg = crate::config::DatasetConfig::resolve(&args.config)?;
    let split = args.input.split.as_deref().map(read_split).transpose()?;
    let ids: Vec<String> = match (&split, &args.labels, &args.annotations, &args.coco) {
        (Some(s), _, _, _) => s.clone(),
        (None, Some(f), _, _) => {
            let f = if f.as_os_str() == "auto" { args.out.join("labels.json") } else { f.clone() };
            read_labels(&LabelSource::File(f), &cfg, None)?.into_keys().collect()
        }
        (None, None, Some(d), _) => read_labels(&LabelSource::VocXml(d.clone()), &cfg, None)?.into_keys().collect(),
        (None, None, None, Some(f)) => read_labels(&LabelSource::Coco(f.clone()), &cfg, None)?.into_keys().collect(),
        (None, None, None, None) => {
            bail!("give the run's ids: --split FILE, or its labels (--labels FILE, --annotations DIR, --coco FILE)")
        }
    };
    let report = crate::status::status(&args.out, &ids, args.shards.map(|n| n as usize))?;
    if let Some(f) = &args.missing {
        let text: String = report.missing.iter().map(|id| format!("{id}\n")).collect();
        crate::files::write_atomic(f, |w| Ok(std::io::Write::write_all(w, text.as_bytes())?))?;
        eprintln!("{} missing id(s) written to {}", report.missing.len(), f.display());
    }
    if args.json {
        super::print_line(serde_json::to_string_pretty(&report)?)?;
    } else {
        super::print_line(report.to_text().trim_end_matches('\n'))?;
    }
    Ok(if report.complete { 0 } else { 1 })
}
