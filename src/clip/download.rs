//! Model names (`ViT-B/16`) to checkpoint files: a cache under `~/.cache/clipmask`
//! (`CLIPMASK_CACHE` overrides it), filled from OpenAI's public URLs and verified against the
//! SHA-256 digest that is part of each URL.
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Released CLIP ViT checkpoints: (name, SHA-256, file name).
pub const RELEASED: &[(&str, &str, &str)] = &[
    ("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    ("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    ("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    ("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
];

const OPENAI_BASE: &str = "https://openaipublic.azureedge.net/clip/models";

pub fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CLIPMASK_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache").join("clipmask")
}

/// The download URL of a released checkpoint. `CLIPMASK_MODEL_BASE_URL` replaces OpenAI's
/// host (for mirrors and for tests).
pub fn url_for(sha: &str, file: &str) -> String {
    let base = std::env::var("CLIPMASK_MODEL_BASE_URL").unwrap_or_else(|_| OPENAI_BASE.to_string());
    format!("{}/{sha}/{file}", base.trim_end_matches('/'))
}

pub fn released(name: &str) -> Option<(&'static str, &'static str, &'static str)> {
    RELEASED.iter().copied().find(|(n, _, _)| n.eq_ignore_ascii_case(name))
}

/// A path is returned as is; a released name resolves to its cached file, downloaded and
/// verified when missing.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let Some((name, sha, file)) = released(spec) else {
        let names: Vec<&str> = RELEASED.iter().map(|r| r.0).collect();
        bail!("model {spec:?} is neither an existing file nor a released name ({})", names.join(", "));
    };
    let path = cache_dir().join(file);
    if !path.exists() {
        let url = url_for(sha, file);
        // The next step comes after the cause: what to pass instead, and where it looked.
        download(&url, &path, sha).map_err(|e| {
            anyhow::anyhow!(
                "cannot fetch {name}: {}. {file} is not in the cache {} (CLIPMASK_CACHE); without \
                 network, pass a local checkpoint file instead (a CLIP .pt, .safetensors or .bin, such as {file} \
                 copied from a machine that has it) or a Hugging Face repo id already in the Hugging Face cache \
                 {} (org/name, such as {})",
                crate::errors::format_error(&e),
                cache_dir().display(),
                hf_cache_dir().display(),
                hub_equivalent(name)
            )
        })?;
    }
    Ok(path)
}

/// The Hugging Face repo of OpenAI's own upload of a released checkpoint.
fn hub_equivalent(name: &str) -> &'static str {
    match name {
        "ViT-B/32" => "openai/clip-vit-base-patch32",
        "ViT-L/14" => "openai/clip-vit-large-patch14",
        "ViT-L/14@336px" => "openai/clip-vit-large-patch14-336",
        _ => "openai/clip-vit-base-patch16",
    }
}

/// SHA-256 of a checkpoint, remembered in the cache by (path, size, modification time) so a
/// 600 MB file is hashed once, not at every start.
pub fn model_digest(path: &Path) -> Result<String> {
    // Regular files only: /dev/zero or a FIFO would hang the hashing.
    let meta =
        crate::files::open_regular(path)?.metadata().with_context(|| format!("cannot read {}", path.display()))?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let key = format!("{}|{}|{}", canonical.display(), meta.len(), mtime);
    let index = cache_dir().join("digests.json");
    let mut map: std::collections::BTreeMap<String, String> =
        std::fs::read_to_string(&index).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    if let Some(d) = map.get(&key) {
        return Ok(d.clone());
    }
    let digest = sha256_file(path)?;
    map.insert(key, digest.clone());
    // Best effort: a read-only cache only costs the hashing next time.
    if let Ok(json) = serde_json::to_string_pretty(&map) {
        let _ = crate::files::write_atomic(&index, |w| Ok(w.write_all(json.as_bytes())?));
    }
    Ok(digest)
}

/// SHA-256 of a file as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = crate::files::open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams `url` to `dest` through a temporary file, checking the SHA-256 before the rename,
/// so a failed or corrupt download never sits under the final name.
pub fn download(url: &str, dest: &Path, expected_sha: &str) -> Result<()> {
    // write_atomic: an exclusive temporary file, removed when the closure fails (a broken
    // connection or a checksum mismatch), renamed into place otherwise.
    crate::files::write_atomic(dest, |out| {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(std::time::Duration::from_secs(20)))
            .timeout_recv_body(Some(std::time::Duration::from_secs(3600)))
            .build()
            .into();
        let resp = agent.get(url).call().with_context(|| format!("GET {url}"))?;
        let total = resp.body().content_length();
        let mut reader = resp.into_body().into_reader();
        // Drawn under the step spinner ("loading ViT-B/16 ...") rather than over it.
        let bar = crate::progress::attach(match total {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        });
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("downloading {}", dest.file_name().unwrap_or_default().to_string_lossy()));
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).with_context(|| format!("reading {url}"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        let sha = hex(&h.finalize());
        if sha != expected_sha {
            bail!("checksum mismatch for {url}: expected SHA-256 {expected_sha}, got {sha}; nothing was saved");
        }
        Ok(())
    })
}

/// The Hugging Face hub cache (read by `hub.rs`, named in download errors): HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn hf_cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("HF_HUB_CACHE") {
        return d;
    }
    if let Some(d) = var("HF_HOME") {
        return d.join("hub");
    }
    let home = var("HOME").unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}
