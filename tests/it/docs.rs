//! The docs name the code: every file path and every `module::name` cited in backticks in
//! ARCHITECTURE.md, README.md and docs/*.md must exist in the tree, so the docs cannot drift
//! from the code unnoticed when a file or a function moves.
use crate::support::root;
use std::path::{Path, PathBuf};

/// Backticked spans of a markdown text (inline code; fenced blocks skipped).
fn code_spans(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(code), Some(_)) = (parts.next(), parts.next()) {
            out.push(code.to_string());
        }
    }
    out
}

/// Every `.rs` file under src/.
fn rust_files() -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("src"), &mut out);
    out
}

/// A file of this project cited in the docs: any `.rs` path (`tests/it/hostile.rs`,
/// `cam/gradcam.rs`, `files.rs`), and other files under the project's own folders
/// (`scripts/gpu-check.sh`, `tests/python/clip_reference.py`). Names of other projects' files
/// (`classify.py`, `config.json`) are not checked. Looked up from the root, src/, tests/it/,
/// tests/python/ and docs/.
fn is_file_citation(s: &str) -> bool {
    let exts = [".rs", ".py", ".sh", ".md", ".json", ".txt"];
    let ours = ["src/", "tests/", "scripts/", "bench/", "docs/", "prompts/", "examples/"];
    (s.ends_with(".rs") || ours.iter().any(|d| s.starts_with(d)) || (s.starts_with("configs/") && s.ends_with(".json")))
        && !s.contains(' ')
        && !s.contains('<')
        && !s.contains('*')
        && !s.starts_with("OUT/")
        && !s.starts_with('~')
        && exts.iter().any(|e| s.ends_with(e))
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
}

/// A path with a folder is looked up from the root, src/, tests/it/, tests/python/ and docs/;
/// a bare file name (ARCHITECTURE.md lists a folder's files by name) anywhere under src/ and
/// tests/.
fn file_exists(s: &str) -> bool {
    let r = root();
    if !s.contains('/') {
        fn find(d: &Path, name: &str) -> bool {
            std::fs::read_dir(d).unwrap().flatten().any(|e| {
                let p = e.path();
                if p.is_dir() {
                    find(&p, name)
                } else {
                    p.file_name().is_some_and(|n| n == name)
                }
            })
        }
        return r.join(s).exists() || find(&r.join("src"), s) || find(&r.join("tests"), s);
    }
    ["", "src", "tests/it", "tests/python", "docs"].iter().any(|base| r.join(base).join(s).exists())
}

/// The files of module path `segments` (`["pipeline"]` -> src/pipeline/*.rs, `["clip",
/// "layout"]` -> src/clip/layout.rs); a module named anywhere (`layout`) is found by name.
fn module_files(segments: &[&str], all: &[PathBuf]) -> Vec<PathBuf> {
    let src = root().join("src");
    let rel: PathBuf = segments.iter().collect();
    let dir = src.join(&rel);
    if dir.is_dir() {
        return all.iter().filter(|p| p.starts_with(&dir)).cloned().collect();
    }
    let file = src.join(&rel).with_extension("rs");
    if file.is_file() {
        return vec![file];
    }
    // By name anywhere (docs write `layout::to_openai` for clip/layout.rs).
    let last = segments[segments.len() - 1];
    all.iter()
        .filter(|p| {
            p.file_stem().is_some_and(|s| s == last)
                || (p.file_name().is_some_and(|n| n == "mod.rs")
                    && p.parent().and_then(|d| d.file_name()).is_some_and(|d| d == last))
        })
        .flat_map(|p| {
            if p.file_name().is_some_and(|n| n == "mod.rs") {
                let d = p.parent().unwrap().to_path_buf();
                all.iter().filter(|q| q.starts_with(&d)).cloned().collect::<Vec<_>>()
            } else {
                vec![p.clone()]
            }
        })
        .collect()
}

/// Whether `name` is defined (or re-exported) in one of `files`.
fn defines(files: &[PathBuf], name: &str) -> bool {
    let kinds = ["fn", "struct", "enum", "const", "static", "type", "trait", "mod"];
    files.iter().any(|f| {
        let text = std::fs::read_to_string(f).unwrap();
        text.lines().any(|l| {
            // A re-export makes the name the module's own; a private `use` does not.
            let reexport = l.trim_start().starts_with("pub use ") && l.contains(name);
            let t = l.trim_start().trim_start_matches("pub(crate) ").trim_start_matches("pub(super) ");
            let t = t.trim_start_matches("pub ").trim_start_matches("unsafe ");
            kinds.iter().any(|k| {
                t.strip_prefix(k).and_then(|r| r.strip_prefix(' ')).is_some_and(|r| {
                    r.starts_with(name) && !r[name.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                })
            }) || reexport
                // enum variants: `    Name,` / `    Name {` / `    Name(`
                || (name.starts_with(char::is_uppercase)
                    && t.strip_prefix(name).is_some_and(|r| r.starts_with(',') || r.starts_with(" {") || r.starts_with('(')))
        })
    })
}

/// Checks one `a::b::c` citation; None when it holds, else why not.
fn check_path(cite: &str, all: &[PathBuf]) -> Option<String> {
    let segs: Vec<&str> = cite.split("::").map(|s| s.trim_end_matches("()")).collect();
    let (mods, names): (Vec<&str>, Vec<&str>) = {
        let k = segs.iter().position(|s| s.starts_with(char::is_uppercase)).unwrap_or(segs.len() - 1);
        (segs[..k].to_vec(), segs[k..].to_vec())
    };
    let files = if mods.is_empty() { all.to_vec() } else { module_files(&mods, all) };
    if files.is_empty() {
        return Some(format!("no module {}", mods.join("::")));
    }
    for n in names {
        if !defines(&files, n) && !defines(all, n) {
            return Some(format!("{n} is not defined in {}", mods.join("::")));
        }
        if !defines(&files, n) {
            return Some(format!("{n} is not in module {}", mods.join("::")));
        }
    }
    None
}

#[test]
fn every_code_path_cited_in_the_docs_exists() {
    let all = rust_files();
    let mut docs = vec![root().join("ARCHITECTURE.md"), root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            docs.push(e.path());
        }
    }
    let external = ["std::", "tch::", "clap::", "serde", "anyhow::", "torch.", "np.", "cv2.", "pydensecrf"];
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for span in code_spans(&text) {
            let span = span.trim();
            if is_file_citation(span) {
                checked += 1;
                if !file_exists(span) {
                    missing.push(format!("{}: file `{span}`", doc.display()));
                }
            } else if span.contains("::")
                && !span.contains(' ')
                && !span.contains('(')
                && !external.iter().any(|e| span.starts_with(e))
                && span.split("::").all(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'))
            {
                checked += 1;
                if let Some(why) = check_path(span, &all) {
                    missing.push(format!("{}: `{span}`: {why}", doc.display()));
                }
            }
        }
    }
    eprintln!("{checked} citations checked in {} documents", docs.len());
    assert!(checked > 50, "too few citations found ({checked}): is the parser broken?");
    assert!(missing.is_empty(), "cited in the docs but not in the tree:\n{}", missing.join("\n"));
}

#[test]
fn the_checker_catches_a_moved_name_and_a_missing_file() {
    let all = rust_files();
    assert!(check_path("pipeline::compute_batch", &all).is_none());
    assert!(check_path("files::write_atomic", &all).is_none());
    assert!(check_path("Lattice::assemble", &all).is_none());
    // What the docs cited before the code moved: found wanting.
    assert!(check_path("vit::encode_standard", &all).is_some());
    assert!(check_path("outputs::write_atomic", &all).is_some());
    assert!(check_path("pipeline::compute_maps_gone", &all).is_some());
    assert!(is_file_citation("cam.rs") && !file_exists("cam.rs"));
    assert!(file_exists("cam/gradcam.rs") && file_exists("tests/it/hostile.rs"));
}
