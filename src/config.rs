//! Dataset configuration (`configs/*.json`): class names, the words the text encoder reads for
//! each class, background words, prompt templates, the CAA box threshold and the palette.
//! Everything a user may want to change for their own data lives here, not in code.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// How several names for one class become one text embedding (docs/method.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// The prompt string already holds the synonyms ("person with clothes,people,human"):
    /// one sentence per template. CLIP-ES's default.
    #[default]
    Sentence,
    /// Each alternative is encoded on its own and the embeddings are averaged.
    Feature,
}

/// The text a class is encoded from: one string, or a list of alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptName {
    One(String),
    Many(Vec<String>),
}

impl PromptName {
    /// The alternatives, in order (a single string is one alternative).
    pub fn alternatives(&self) -> Vec<&str> {
        match self {
            PromptName::One(s) => vec![s.as_str()],
            PromptName::Many(v) => v.iter().map(|s| s.as_str()).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassEntry {
    /// Name as it appears in label files and annotations.
    pub name: String,
    /// What the text encoder reads for it; defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptName>,
}

impl ClassEntry {
    pub fn prompt(&self) -> PromptName {
        self.prompt.clone().unwrap_or_else(|| PromptName::One(self.name.clone()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub name: String,
    /// Foreground classes; class id in label maps = index + 1 (0 is background).
    pub classes: Vec<ClassEntry>,
    /// Words that compete with the labels in the softmax (docs/method.md §3–4).
    pub background_words: Vec<String>,
    /// Templates with one `{}` each; embeddings are averaged over templates.
    pub templates: Vec<String>,
    #[serde(default)]
    pub fusion: Fusion,
    /// CAA box threshold as a fraction of the map maximum (docs/method.md §5): 0.4 VOC, 0.7 COCO.
    pub box_threshold: f64,
    /// RGB colours for label ids 0..; ids past the end get black, 255 gets white.
    #[serde(default)]
    pub palette: Vec<[u8; 3]>,
    /// Dense CRF parameters (docs/method.md §6); CLIP-ES's when absent.
    #[serde(default, skip_serializing_if = "is_default_crf")]
    pub crf: crate::crf::CrfParams,
}

fn is_default_crf(p: &crate::crf::CrfParams) -> bool {
    *p == crate::crf::CrfParams::default()
}

impl DatasetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path, 64 << 20)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// A config from its JSON text (the Python API's `Config(dict)`); `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: DatasetConfig = serde_json::from_str(text).with_context(|| format!("invalid config {origin}"))?;
        cfg.validate().with_context(|| format!("invalid config {origin}"))?;
        Ok(cfg)
    }

    /// Resolves a path (anything with a `/`, ending in `.json`, or existing) or a shipped name
    /// (`voc12`, `coco14`). Shipped configs are compiled into the binary, so an installed
    /// clipmask works from any directory; `CLIPMASK_CONFIGS=DIR` looks there first.
    pub fn resolve(spec: &str) -> Result<Self> {
        let p = PathBuf::from(spec);
        if p.exists() || spec.contains('/') || spec.ends_with(".json") {
            return Self::load(&p);
        }
        if let Ok(dir) = std::env::var("CLIPMASK_CONFIGS") {
            let p = PathBuf::from(dir).join(format!("{spec}.json"));
            if p.exists() {
                return Self::load(&p);
            }
        }
        if let Some((_, text)) = SHIPPED.iter().find(|(n, _)| *n == spec) {
            return Self::parse(text, &format!("shipped config {spec}"));
        }
        let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
        bail!("config '{spec}' is neither a file nor a shipped config ({})", names.join(", "))
    }

    pub fn validate(&self) -> Result<()> {
        if self.classes.is_empty() {
            bail!("`classes` is empty");
        }
        if self.classes.len() > 254 {
            bail!("{} classes: label PNGs hold at most 254 (ids 1..254; 255 is ignore)", self.classes.len());
        }
        if self.background_words.is_empty() {
            bail!("`background_words` is empty");
        }
        if self.templates.is_empty() {
            bail!("`templates` is empty");
        }
        for t in &self.templates {
            check_template(t)?;
        }
        // Labels find their class ignoring case and surrounding spaces (`find_class`), so class
        // names must differ in more than that.
        let mut seen: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        for c in &self.classes {
            if c.name.trim().is_empty() {
                bail!("a class has an empty name");
            }
            if let Some(first) = seen.insert(c.name.trim().to_lowercase(), c.name.as_str()) {
                if first == c.name {
                    bail!("duplicate class name {:?}", c.name);
                }
                bail!(
                    "class names {first:?} and {:?} differ only in case or surrounding spaces, but labels match \
                     class names ignoring both: rename one, or merge them into one class",
                    c.name
                );
            }
            let alts = c.prompt();
            if alts.alternatives().is_empty() || alts.alternatives().iter().any(|a| a.trim().is_empty()) {
                bail!("class {:?} has an empty prompt name", c.name);
            }
        }
        let mut seen = HashSet::new();
        for w in &self.background_words {
            if !seen.insert(w.as_str()) {
                bail!("duplicate background word {w:?}");
            }
        }
        if !self.palette.is_empty() && self.palette.len() < self.classes.len() + 1 {
            bail!(
                "`palette` has {} colours but needs {} (background + {} classes); give one [r, g, b] per \
                 label id 0..={}, or leave `palette` out for the PASCAL VOC colour map",
                self.palette.len(),
                self.classes.len() + 1,
                self.classes.len(),
                self.classes.len()
            );
        }
        if !(0.0..1.0).contains(&self.box_threshold) {
            bail!("`box_threshold` must be in [0, 1), got {}", self.box_threshold);
        }
        self.crf.validate()?;
        Ok(())
    }

    pub fn class_names(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.name.as_str()).collect()
    }

    /// 0-based index of a class name.
    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.classes.iter().position(|c| c.name == name)
    }

    /// The class a label names: the exact name, else the name with surrounding whitespace
    /// removed, else a case-insensitive match when exactly one class matches. The one
    /// normalisation of every label source.
    pub fn find_class(&self, name: &str) -> Option<usize> {
        if let Some(i) = self.class_index(name) {
            return Some(i);
        }
        let name = name.trim();
        if let Some(i) = self.class_index(name) {
            return Some(i);
        }
        let lower = name.to_lowercase();
        let mut matches = self.classes.iter().enumerate().filter(|(_, c)| c.name.trim().to_lowercase() == lower);
        match (matches.next(), matches.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    }

    /// 768-byte PNG palette: config colours (the PASCAL VOC colour map when the config has no
    /// `palette`), then black; 255 is white (ignore).
    pub fn png_palette(&self) -> Vec<u8> {
        let mut pal = vec![0u8; 256 * 3];
        if self.palette.is_empty() {
            for (i, c) in pal.chunks_exact_mut(3).enumerate() {
                c.copy_from_slice(&voc_colour(i as u8));
            }
        }
        for (i, c) in self.palette.iter().take(256).enumerate() {
            pal[i * 3..i * 3 + 3].copy_from_slice(c);
        }
        if self.palette.len() < 256 {
            pal[255 * 3..].copy_from_slice(&[255, 255, 255]);
        }
        pal
    }
}

/// Colour of label id `i` in the PASCAL VOC colour map (bits of `i` spread over r, g, b).
fn voc_colour(i: u8) -> [u8; 3] {
    let mut c = [0u8; 3];
    let mut id = i;
    for shift in (0..8).rev() {
        for (ch, v) in c.iter_mut().enumerate() {
            *v |= ((id >> ch) & 1) << shift;
        }
        id >>= 3;
    }
    c
}

/// The shipped configs, compiled in: (name, JSON).
pub const SHIPPED: &[(&str, &str)] =
    &[("voc12", include_str!("../configs/voc12.json")), ("coco14", include_str!("../configs/coco14.json"))];

/// CLIP's 80 ImageNet templates (`prompts/imagenet-templates.txt`), compiled in: the default
/// candidates of `prompts rank`.
pub const IMAGENET_TEMPLATES: &str = include_str!("../prompts/imagenet-templates.txt");

/// A prompt template must hold exactly one `{}` (where the class name goes).
pub fn check_template(t: &str) -> Result<()> {
    if t.matches("{}").count() != 1 {
        bail!("template {t:?} must contain exactly one `{{}}`");
    }
    Ok(())
}
