//! Datasets: which images to process and their image-level labels, from a JSON labels file,
//! a tab-separated text file, or VOC XML annotations; split files; image file lookup.
use crate::config::DatasetConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Per-class scores as `clipmask tag` writes them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoresFile {
    /// What produced them ("tagclip").
    pub method: String,
    /// Class names, in score order (the config's).
    pub classes: Vec<String>,
    /// Relative threshold the labels were chosen with.
    pub threshold: f64,
    /// Per image, one score per class.
    pub scores: BTreeMap<String, Vec<f32>>,
}

impl ScoresFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path, crate::files::MAX_TEXT_BYTES)
            .with_context(|| format!("cannot read scores {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a scores file written by clipmask tag", path.display()))
    }
}

/// The scores file that goes with a labels file: `labels.json` -> `labels.scores.json`.
pub fn scores_path_for(labels: &Path) -> PathBuf {
    let stem = labels.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "labels".into());
    labels.with_file_name(format!("{stem}.scores.json"))
}

/// Labels of one image as read: class names, possibly unknown or empty (checked per image).
pub type RawLabels = BTreeMap<String, Vec<String>>;

/// `{"<id>": ["<class>", ...]}`
pub fn read_labels_json(path: &Path) -> Result<RawLabels> {
    read_labels_json_for(path, None)
}

/// [`read_labels_json`] keeping only the ids in `wanted` (all when None). The file is streamed:
/// memory follows the entries kept, not the file (a 100 MB file for a 1-id split stays small).
/// A key given twice is an error naming it (JSON parsers disagree on which one wins). A leading
/// byte-order mark is skipped.
pub fn read_labels_json_for(path: &Path, wanted: Option<&HashSet<String>>) -> Result<RawLabels> {
    use serde::de::{DeserializeSeed, MapAccess, Visitor};
    struct Filtered<'a>(Option<&'a HashSet<String>>);
    impl<'de> DeserializeSeed<'de> for Filtered<'_> {
        type Value = RawLabels;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<RawLabels, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Filtered<'_> {
        type Value = RawLabels;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawLabels, A::Error> {
            let mut out = RawLabels::new();
            while let Some(id) = map.next_key::<String>()? {
                if self.0.is_some_and(|w| !w.contains(&id)) {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
                let names: Vec<String> = map.next_value()?;
                if out.contains_key(&id) {
                    return Err(serde::de::Error::custom(format!("id {id:?} is given twice")));
                }
                out.insert(id, names);
            }
            Ok(out)
        }
    }
    let mut reader = std::io::BufReader::with_capacity(1 << 20, crate::files::open_regular(path)?);
    skip_bom(&mut reader).with_context(|| format!("cannot read labels {}", path.display()))?;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let labels = Filtered(wanted).deserialize(&mut de).and_then(|l| de.end().map(|_| l)).with_context(|| {
        format!("{}: expected a JSON object {{\"<image id>\": [\"<class name>\", ...]}}", path.display())
    })?;
    Ok(labels)
}

/// Consumes a UTF-8 byte-order mark at the start of `r`, if there is one.
fn skip_bom(r: &mut impl std::io::BufRead) -> std::io::Result<()> {
    if r.fill_buf()?.starts_with(b"\xef\xbb\xbf") {
        r.consume(3);
    }
    Ok(())
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
        if out.insert(id.trim().to_string(), labels).is_some() {
            bail!("{origin}:{}: id {:?} is given twice", i + 1, id.trim());
        }
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
    for (id, p) in crate::files::files_by_stem(dir, &["xml"], "annotations", false)? {
        {
            // Only a regular file is read (a FIFO would block), and at most 16 MiB of it.
            let parsed = crate::files::read_regular(&p, 16 << 20)
                .and_then(|b| String::from_utf8(b).map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", p.display())))
                .map_err(|e| format!("{e:#}"))
                .and_then(|t| parse_voc_xml(&t).map_err(|e| format!("{}: {e}", p.display())));
            out.insert(id, parsed);
        }
    }
    Ok(out)
}

/// Labels from a file: `.json`, or the tab-separated text form otherwise.
pub fn read_labels_file(path: &Path) -> Result<RawLabels> {
    read_labels_file_for(path, None)
}

/// [`read_labels_file`] keeping only the ids in `wanted` (all when None).
pub fn read_labels_file_for(path: &Path, wanted: Option<&HashSet<String>>) -> Result<RawLabels> {
    if path.extension().is_some_and(|e| e == "json") {
        read_labels_json_for(path, wanted)
    } else {
        let text = crate::files::read_text(path, crate::files::MAX_TEXT_BYTES)
            .with_context(|| format!("cannot read labels {}", path.display()))?;
        let mut labels = parse_labels_text(&text, &path.display().to_string())?;
        if let Some(w) = wanted {
            labels.retain(|id, _| w.contains(id));
        }
        Ok(labels)
    }
}

/// Ids of a split file, one per line, in order, duplicates dropped.
pub fn read_split(path: &Path) -> Result<Vec<String>> {
    let text = crate::files::read_text(path, crate::files::MAX_TEXT_BYTES)
        .with_context(|| format!("cannot read split file {}", path.display()))?;
    let mut seen = HashSet::new();
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        // Segmentation splits hold one id per line; detection-style "id label" lines keep
        // their first field.
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| seen.insert(id.to_string()))
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        bail!("split file {} lists no ids", path.display());
    }
    Ok(ids)
}

/// Class names to 0-based indices, first occurrence kept. An empty list or an unknown name
/// is an error for that image only. Every label source (JSON, text, VOC XML, COCO) goes
/// through here, so all share one normalisation: [`DatasetConfig::find_class`] (surrounding
/// whitespace ignored, case-insensitive when unambiguous).
pub fn resolve_labels(cfg: &DatasetConfig, names: &[String]) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for n in names {
        match cfg.find_class(n) {
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

/// Longest id accepted, in bytes: `<id>.npz` plus the temporary suffix of
/// [`crate::files::write_atomic`] (`.` + `.tmp-<pid>`) stays under the 255-byte file-name
/// limit of common file systems.
pub const MAX_ID_BYTES: usize = 200;

/// Checks that an id names one file in a directory: every output path is `OUT/<kind>/<id>.<ext>`,
/// so an id is a single relative path segment. Rejects the empty id, `.` and `..` and any id
/// starting with `.` (hidden and temporary names), `/`, `\\`, NUL and other control characters,
/// and ids over [`MAX_ID_BYTES`]. The error says why.
pub fn validate_id(id: &str) -> Result<(), String> {
    let shown: String = id.chars().take(60).collect();
    let shown = if shown.len() < id.len() { format!("{shown:?}...") } else { format!("{shown:?}") };
    if id.is_empty() {
        return Err("invalid id \"\": empty".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!("invalid id {shown}: {} bytes, at most {MAX_ID_BYTES}", id.len()));
    }
    if id.starts_with('.') {
        return Err(format!("invalid id {shown}: starts with '.' (ids name one file inside OUT)"));
    }
    if let Some(c) = id.chars().find(|&c| c == '/' || c == '\\' || c.is_control()) {
        return Err(format!("invalid id {shown}: contains {c:?} (ids name one file inside OUT, no path separators)"));
    }
    Ok(())
}

/// Image file extensions looked up for an id, in order (one list for every command).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "JPG", "JPEG", "PNG", "bmp", "BMP", "gif", "GIF", "webp", "WEBP", "tif", "tiff", "TIF",
    "TIFF",
];

/// `<dir>/<id>.<ext>` for the first extension of [`IMAGE_EXTENSIONS`] that exists. The id must
/// be valid ([`validate_id`]); an invalid one finds nothing.
pub fn find_image(dir: &Path, id: &str) -> Option<PathBuf> {
    find_image_checked(dir, id).ok().flatten()
}

/// [`find_image`], failing when two files share the id (`x.jpg` and `x.JPG`, `x.jpg` and
/// `x.png`): which one is meant cannot be guessed, and both would write the same outputs.
pub fn find_image_checked(dir: &Path, id: &str) -> Result<Option<PathBuf>, String> {
    if validate_id(id).is_err() {
        return Ok(None);
    }
    let mut found =
        IMAGE_EXTENSIONS.iter().map(|ext| dir.join(format!("{id}.{ext}"))).filter(|p| p.symlink_metadata().is_ok());
    match (found.next(), found.next()) {
        (Some(a), Some(b)) if !same_file(&a, &b) => {
            Err(format!("two images have id {id:?}: {} and {} (rename one)", a.display(), b.display()))
        }
        (a, _) => Ok(a),
    }
}

/// Whether two existing paths are one file (a case-insensitive file system lists `x.jpg` for
/// `x.JPG` too).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.symlink_metadata(), b.symlink_metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Why no image was found for `id` in `dir`, naming the directory and the extensions tried.
pub fn missing_image_reason(dir: &Path, id: &str) -> String {
    format!("no image for id {id:?} in {} (looked for <id>.{})", dir.display(), IMAGE_EXTENSIONS.join("|"))
}

/// One image to process.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    /// The image file; for an invalid id or a missing image, the images directory (nothing is
    /// looked up outside it).
    pub path: PathBuf,
    /// 0-based class indices in label order, or why the image cannot be processed (invalid id,
    /// unusable labels, no image file).
    pub labels: Result<Vec<usize>, String>,
}

/// The work list: ids from the split (or every labelled id, sorted), with labels resolved.
/// Ids are checked ([`validate_id`]) before any file is looked up for them.
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
            if let Err(e) = validate_id(&id) {
                return Item { path: images.to_path_buf(), id, labels: Err(e) };
            }
            let labels = match labels.get(&id) {
                None => Err("no labels for this id".to_string()),
                Some(Err(e)) => Err(e.clone()),
                Some(Ok(names)) => resolve_labels(cfg, names),
            };
            match find_image_checked(images, &id) {
                Err(e) => Item { path: images.to_path_buf(), id, labels: Err(e) },
                Ok(Some(path)) => Item { path, id, labels },
                Ok(None) => {
                    let labels = labels.and_then(|_| Err(missing_image_reason(images, &id)));
                    Item { path: images.to_path_buf(), id, labels }
                }
            }
        })
        .collect()
}

/// Where a run's image-level labels come from.
#[derive(Debug, Clone)]
pub enum LabelSource {
    /// A labels file: JSON `{"<id>": [...]}` or tab-separated text.
    File(PathBuf),
    /// A directory of VOC XML annotations.
    VocXml(PathBuf),
    /// A COCO `instances_*.json`.
    Coco(PathBuf),
}

/// Per id, the class names of `source` (or why the entry is unusable), keeping only the ids in
/// `wanted` where the format allows it (a labels file is streamed). COCO images without
/// annotation are skipped, and said so on stderr.
pub fn read_labels(
    source: &LabelSource,
    cfg: &DatasetConfig,
    wanted: Option<&HashSet<String>>,
) -> Result<BTreeMap<String, Result<Vec<String>, String>>> {
    Ok(match source {
        LabelSource::File(f) => read_labels_file_for(f, wanted)?.into_iter().map(|(k, v)| (k, Ok(v))).collect(),
        LabelSource::VocXml(d) => read_voc_annotations(d)?,
        LabelSource::Coco(f) => {
            let (labels, unannotated) = read_coco_instances(f, cfg)?;
            if unannotated > 0 {
                eprintln!("{unannotated} image(s) in {} have no annotation: skipped", f.display());
            }
            labels.into_iter().map(|(k, v)| (k, Ok(v))).collect()
        }
    })
}

/// The items of a run: the split's ids (else every labelled id, sorted) of `shard`, chosen
/// before any image is looked up, so that each shard stats only its own files.
pub fn run_items(
    cfg: &DatasetConfig,
    images: &Path,
    labels: &BTreeMap<String, Result<Vec<String>, String>>,
    split: Option<&[String]>,
    shard: &crate::cluster::Shard,
) -> Vec<Item> {
    let ids: Vec<String> = match split {
        Some(s) => s.iter().filter(|id| shard.contains(id)).cloned().collect(),
        None => labels.keys().filter(|id| shard.contains(id)).cloned().collect(),
    };
    work_list(cfg, images, labels, Some(&ids))
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
    let mut file_names: std::collections::HashMap<String, &String> = std::collections::HashMap::new();
    for img in &inst.images {
        let id = Path::new(&img.file_name).file_stem().unwrap_or_default().to_string_lossy().into_owned();
        if let Some(other) = file_names.insert(id.clone(), &img.file_name) {
            bail!(
                "{}: images {:?} and {:?} both have id {id:?} (outputs are named by id; rename one)",
                path.display(),
                other,
                img.file_name
            );
        }
        match per_image.get(&img.id) {
            Some(present) => {
                let names =
                    present.iter().enumerate().filter(|(_, &p)| p).map(|(k, _)| cfg.classes[k].name.clone()).collect();
                out.insert(id, names);
            }
            None => skipped += 1,
        }
    }
    Ok((out, skipped))
}
