//! Reading inputs defensively and cleaning up after killed runs: only regular files are read
//! (a FIFO, device or socket named `x.jpg` is refused instead of blocking the run), reads are
//! bounded, and temporary files of dead processes are swept from output directories.
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a non-regular file is, for error messages.
fn kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading only if it is a regular file (symlinks followed). The type is
/// checked before opening (opening some devices has side effects) and again on the open file
/// (the path may have been swapped meanwhile); the open is non-blocking, so a FIFO swapped in
/// between cannot block either.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!("{} is {}: only regular files are read", path.display(), kind(&meta.file_type()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!("{} is {}: only regular files are read", path.display(), kind(&meta.file_type()));
    }
    Ok(file)
}

/// The bytes of a regular file of at most `max_bytes`; the buffer is reserved fallibly, so a
/// file too large for the memory left fails alone instead of aborting the process.
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max_bytes {
        bail!("{} is {} bytes, more than the {} bytes allowed for it", path.display(), len, max_bytes);
    }
    let mut data = Vec::new();
    data.try_reserve_exact(len as usize)
        .map_err(|_| anyhow::anyhow!("{}: not enough memory to read {} bytes", path.display(), len))?;
    // The file may grow after the size check: read at most one byte past the limit.
    file.take(max_bytes + 1).read_to_end(&mut data).with_context(|| format!("cannot read {}", path.display()))?;
    if data.len() as u64 > max_bytes {
        bail!("{} grew past the {} bytes allowed for it while being read", path.display(), max_bytes);
    }
    Ok(data)
}

/// Fails with a clear reason if `bytes` cannot be allocated now (address-space limits such as
/// `ulimit -v`, or a heap too fragmented), without touching the memory. Rust aborts the process
/// on a failed allocation, so large per-image buffers are probed before they are made.
pub fn probe_alloc(bytes: u64, what: &str) -> Result<()> {
    let mut v: Vec<u8> = Vec::new();
    let n = usize::try_from(bytes).map_err(|_| anyhow::anyhow!("{what}: {bytes} bytes do not fit in memory"))?;
    v.try_reserve_exact(n)
        .map_err(|_| anyhow::anyhow!("{what}: cannot allocate {:.1} MiB", bytes as f64 / (1 << 20) as f64))
}

/// The pid in a temporary name `.<name>.tmp-<pid>` written by [`crate::outputs::write_atomic`].
pub fn temp_file_pid(file_name: &str) -> Option<u32> {
    if !file_name.starts_with('.') {
        return None;
    }
    let (_, pid) = file_name.rsplit_once(".tmp-")?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes temporary files (`.<name>.tmp-<pid>`) left in `dirs` by processes that died without
/// cleaning up (SIGKILL, power loss). A file is stale when its pid is not a live process here
/// and no process holds the lock `write_atomic` takes while writing (so a shard on another
/// machine sharing OUT over a network file system keeps its file). Temporary files of this
/// process are removed too when `include_own` (a run that is quitting). Returns how many
/// files were removed; errors are ignored (it is housekeeping).
pub fn sweep_temp_files(dirs: &[PathBuf], include_own: bool) -> usize {
    let me = std::process::id();
    let mut removed = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = temp_file_pid(&name.to_string_lossy()) else { continue };
            if !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = e.path();
            let stale = if pid == me {
                include_own
            } else if process_alive(pid) {
                false
            } else {
                // Not a local process; free of locks means no writer anywhere.
                File::open(&path).is_ok_and(|f| f.try_lock().is_ok())
            };
            if stale && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Regular files `<dir>/<stem>.<ext>` whose extension is one of `exts`, by stem, sorted. When a
/// stem has several, the earlier extension of `exts` wins. Entries that are not regular files
/// are listed too: reading them fails their image with a reason. With `skip_hidden`, stems
/// starting with '.' (macOS `._x.png` forks) are left out. `what` names the directory in errors.
pub fn files_by_stem(
    dir: &Path,
    exts: &[&str],
    what: &str,
    skip_hidden: bool,
) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut out: std::collections::BTreeMap<String, (usize, PathBuf)> = std::collections::BTreeMap::new();
    let err = || format!("cannot read {what} {}", dir.display());
    for entry in std::fs::read_dir(dir).with_context(err)? {
        let path = entry.with_context(err)?.path();
        let Some(rank) = path.extension().and_then(|e| e.to_str()).and_then(|e| exts.iter().position(|x| *x == e))
        else {
            continue;
        };
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        if skip_hidden && stem.starts_with('.') {
            continue;
        }
        match out.get(stem) {
            Some((r, _)) if *r <= rank => {}
            _ => {
                out.insert(stem.to_string(), (rank, path));
            }
        }
    }
    Ok(out.into_iter().map(|(k, (_, p))| (k, p)).collect())
}
