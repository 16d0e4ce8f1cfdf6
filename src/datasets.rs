//! Datasets: which images to process and their image-level labels, from a JSON labels file,
//! a tab-separated text file, or VOC XML annotations; split files; image file lookup.
use crate::config::DatasetConfig;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Labels of one image as read: class names, possibly unknown or empty (checked per image).
pub type RawLabels = BTreeMap<String, Vec<String>>;

/// `{"<id>": ["<class>", ...]}`
pub fn read_labels_json(path: &Path) -> Result<RawLabels> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read labels {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("{}: expected a JSON object {{\"<image id>\": [\"<class name>\", ...]}}", path.display())
    })
}

/// One line per image: `<id><TAB><class>,<class>,...` (blank lines and `#` comments skipped).
pub fn parse_labels_text(text: &str, origin: &str) -> Result<RawLabels> {
    let mut out = RawLabels::new();
    // Editors on Windows may prepend a byte-order mark; it is not part of the first id.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((id, classes)) = line.split_once('\t') else {
            bail!("{origin}:{}: expected `<id><TAB><class>,<class>,...`", i + 1);
        };
        let labels = classes.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        out.insert(id.trim().to_string(), labels);
    }
    Ok(out)
}

/// Object names of a VOC XML annotation, in document order.
pub fn parse_voc_xml(text: &str) -> Result<Vec<String>> {
    let doc = roxmltree::Document::parse(text)?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("object"))
        .filter_map(|o| o.children().find(|c| c.has_tag_name("name")).and_then(|c| c.text()))
        .map(|s| s.trim().to_string())
        .collect())
}

/// Labels from a directory of VOC XML files (`<id>.xml`). A file that does not parse gives
/// the image an error entry rather than stopping the read.
pub fn read_voc_annotations(dir: &Path) -> Result<BTreeMap<String, Result<Vec<String>, String>>> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read annotations {}", dir.display()))?;
    for e in entries {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "xml") {
            let id = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let parsed = std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_voc_xml(&t).map_err(|e| format!("{}: {e}", p.display())));
            out.insert(id, parsed);
        }
    }
    Ok(out)
}

/// Labels from a file: `.json`, or the tab-separated text form otherwise.
pub fn read_labels_file(path: &Path) -> Result<RawLabels> {
    if path.extension().is_some_and(|e| e == "json") {
        read_labels_json(path)
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read labels {}", path.display()))?;
        parse_labels_text(&text, &path.display().to_string())
    }
}

/// Ids of a split file, one per line, in order, duplicates dropped.
pub fn read_split(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read split {}", path.display()))?;
    let mut seen = HashSet::new();
    Ok(text
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().next().unwrap_or(l).to_string())
        .filter(|id| seen.insert(id.clone()))
        .collect())
}

/// Class names to 0-based indices, first occurrence kept. An empty list or an unknown name
/// is an error for that image only.
pub fn resolve_labels(cfg: &DatasetConfig, names: &[String]) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for n in names {
        match cfg.class_index(n) {
            Some(i) if !out.contains(&i) => out.push(i),
            Some(_) => {}
            None => return Err(format!("unknown class {n:?} (not in config {})", cfg.name)),
        }
    }
    if out.is_empty() {
        return Err("no labels: CLIP-ES needs at least one class per image".into());
    }
    Ok(out)
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "JPG", "JPEG", "PNG", "bmp", "webp", "tif", "tiff"];

/// `<dir>/<id>.<ext>` for the first extension that exists; `<dir>/<id>.jpg` otherwise (so the
/// error names a plausible file).
pub fn find_image(dir: &Path, id: &str) -> PathBuf {
    for ext in IMAGE_EXTENSIONS {
        let p = dir.join(format!("{id}.{ext}"));
        if p.exists() {
            return p;
        }
    }
    dir.join(format!("{id}.jpg"))
}

/// One image to process.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub path: PathBuf,
    /// 0-based class indices in label order, or why the labels are unusable.
    pub labels: Result<Vec<usize>, String>,
}

/// The work list: ids from the split (or every labelled id, sorted), with labels resolved.
pub fn work_list(
    cfg: &DatasetConfig,
    images: &Path,
    labels: &BTreeMap<String, Result<Vec<String>, String>>,
    split: Option<&[String]>,
) -> Vec<Item> {
    let ids: Vec<String> = match split {
        Some(s) => s.to_vec(),
        None => labels.keys().cloned().collect(),
    };
    ids.into_iter()
        .map(|id| {
            let labels = match labels.get(&id) {
                None => Err("no labels for this id".to_string()),
                Some(Err(e)) => Err(e.clone()),
                Some(Ok(names)) => resolve_labels(cfg, names),
            };
            Item { path: find_image(images, &id), id, labels }
        })
        .collect()
}

/// Deterministic shard `i` of `n` (0-based): every n-th id starting at i.
pub fn shard<T>(items: Vec<T>, i: usize, n: usize) -> Vec<T> {
    items.into_iter().enumerate().filter(|(k, _)| k % n == i).map(|(_, t)| t).collect()
}

/// Image-level labels from a COCO `instances_*.json`: each image's categories, in ascending
/// class order, named with the config's class names. COCO's category ids (1..90 with gaps) map
/// to the config's classes by rank: the k-th smallest category id is the config's k-th class
/// (the order of configs/coco14.json). The file is streamed through serde, keeping only ids,
/// so the 450 MB train2014 file stays far below 2 GiB. Returns the labels and how many images
/// had no annotation (skipped).
pub fn read_coco_instances(path: &Path, cfg: &DatasetConfig) -> Result<(RawLabels, usize)> {
    use serde::Deserialize;
    #[derive(Deserialize)]
    struct Image {
        id: u64,
        file_name: String,
    }
    #[derive(Deserialize)]
    struct Annotation {
        image_id: u64,
        category_id: u64,
    }
    #[derive(Deserialize)]
    struct Category {
        id: u64,
    }
    #[derive(Deserialize)]
    struct Instances {
        images: Vec<Image>,
        annotations: Vec<Annotation>,
        categories: Vec<Category>,
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open COCO annotations {}", path.display()))?;
    let inst: Instances = serde_json::from_reader(std::io::BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("{}: not a COCO instances file (images, annotations, categories)", path.display()))?;
    let mut cat_ids: Vec<u64> = inst.categories.iter().map(|c| c.id).collect();
    cat_ids.sort_unstable();
    cat_ids.dedup();
    if cat_ids.len() != cfg.classes.len() {
        bail!(
            "{}: {} categories, but config {} has {} classes (categories map to classes by rank)",
            path.display(),
            cat_ids.len(),
            cfg.name,
            cfg.classes.len()
        );
    }
    let rank: std::collections::HashMap<u64, usize> = cat_ids.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let mut per_image: std::collections::HashMap<u64, Vec<bool>> = std::collections::HashMap::new();
    for a in &inst.annotations {
        let Some(&k) = rank.get(&a.category_id) else {
            bail!("{}: annotation with unknown category_id {}", path.display(), a.category_id);
        };
        per_image.entry(a.image_id).or_insert_with(|| vec![false; cat_ids.len()])[k] = true;
    }
    let mut out = RawLabels::new();
    let mut skipped = 0;
    for img in &inst.images {
        let id = Path::new(&img.file_name).file_stem().unwrap_or_default().to_string_lossy().into_owned();
        match per_image.get(&img.id) {
            Some(present) => {
                let names = present.iter().enumerate().filter(|(_, &p)| p).map(|(k, _)| cfg.classes[k].name.clone()).collect();
                out.insert(id, names);
            }
            None => skipped += 1,
        }
    }
    Ok((out, skipped))
}
