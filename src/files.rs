//! Reading inputs defensively and cleaning up after killed runs: only regular files are read
//! (a FIFO, device or socket named `x.jpg` is refused instead of blocking the run), reads are
//! bounded, and temporary files of dead processes are swept from output directories.
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
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
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut data)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if data.len() as u64 > max_bytes {
        bail!("{} grew past the {} bytes allowed for it while being read", path.display(), max_bytes);
    }
    Ok(data)
}

/// A UTF-8 text file (labels, split, config, templates) of at most `max_bytes`, from a regular
/// file, with a leading byte-order mark removed (Windows editors write one; JSON parsers and
/// id matching must not see it).
pub fn read_text(path: &Path, max_bytes: u64) -> Result<String> {
    let data = read_regular(path, max_bytes)?;
    let mut text = String::from_utf8(data).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Largest text input read (labels, split files, configs, templates).
pub const MAX_TEXT_BYTES: u64 = 4 << 30;

/// Fails with a clear reason if `bytes` cannot be allocated now (address-space limits such as
/// `ulimit -v`, or a heap too fragmented), without touching the memory. Rust aborts the process
/// on a failed allocation, so large per-image buffers are probed before they are made.
pub fn probe_alloc(bytes: u64, what: &str) -> Result<()> {
    let mut v: Vec<u8> = Vec::new();
    let n = usize::try_from(bytes).map_err(|_| anyhow::anyhow!("{what}: {bytes} bytes do not fit in memory"))?;
    v.try_reserve_exact(n)
        .map_err(|_| anyhow::anyhow!("{what}: cannot allocate {:.1} MiB", bytes as f64 / (1 << 20) as f64))
}

/// The temporary name of `final_name` written by this process: `.<final_name>.tmp-<pid>-`,
/// then random characters ([`create_temp`]). The pid lets a later run tell a dead writer's file
/// from a live one's; the random tail makes the name unpredictable, so nobody can plant a link
/// at it in advance.
fn temp_prefix(final_name: &str) -> String {
    format!(".{final_name}.tmp-{}-", std::process::id())
}

/// The pid in a temporary name written by [`create_temp`] (`.<name>.tmp-<pid>-<random>`), or
/// by earlier versions (`.<name>.tmp-<pid>`).
pub fn temp_file_pid(file_name: &str) -> Option<u32> {
    if !file_name.starts_with('.') {
        return None;
    }
    let (_, tail) = file_name.rsplit_once(".tmp-")?;
    let pid = tail.split_once('-').map_or(tail, |(pid, _)| pid);
    pid.parse().ok()
}

/// Creates a new, empty temporary file for `final_path` in the same directory, exclusively
/// (`O_CREAT|O_EXCL`: never through a link or over a file already there) under an
/// unpredictable name, with the usual mode (0666 less the umask, like any output). The
/// returned `TempPath` removes the file when dropped unless it is persisted.
pub fn create_temp(final_path: &Path) -> Result<(File, tempfile::TempPath)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = final_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(&name))
        .rand_bytes(8)
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file for {} in {}", name, dir.display()))?;
    Ok(tmp.into_parts())
}

/// Refuses to replace `path` if it is a symbolic link or a directory: a link planted at an
/// output name is somebody else's, and is neither followed nor silently removed.
pub fn check_final_name(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            bail!("{} is a symbolic link: refusing to write through or over it (remove it)", path.display())
        }
        Ok(m) if m.is_dir() => bail!("{} is a directory: cannot write a file there", path.display()),
        _ => Ok(()),
    }
}

/// Refuses an output folder that is a symbolic link (it would send every file written there
/// elsewhere); a folder that does not exist yet is fine.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!("{} is a symbolic link: output folders must be real directories (remove it)", dir.display());
    }
    Ok(())
}

/// Writes a file through `write` to an exclusive temporary sibling ([`create_temp`]), then
/// renames it into place, so an interrupted run never leaves a partial file under a final name
/// and nothing is ever written through a link planted in the output directory.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    check_final_name(path)?;
    let (file, tmp) = create_temp(path)?;
    // Held until the file is closed: tells `sweep_temp_files` in another process (maybe on
    // another machine sharing OUT) that this temporary file is being written.
    let _ = file.try_lock();
    let mut w = BufWriter::new(file);
    let written = (|| -> Result<()> {
        write(&mut w)?;
        w.flush()?;
        w.get_ref().sync_data().ok();
        Ok(())
    })();
    // On error `tmp` is dropped here, which removes the temporary file.
    written.with_context(|| format!("cannot write {}", path.display()))?;
    drop(w);
    check_final_name(path)?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("cannot rename {} to {}: {}", e.path.display(), path.display(), e.error))
}

/// Checks that `dir` can take new files, with an exclusive temporary file (removed at once).
pub fn check_writable(dir: &Path) -> Result<()> {
    tempfile::Builder::new()
        .prefix(&temp_prefix("clipmask-write-test"))
        .tempfile_in(dir)
        .map(drop)
        .with_context(|| format!("output directory {} is not writable", dir.display()))
}

/// Reads a small text file that clipmask itself wrote into OUT (failures.jsonl), never through
/// a symbolic link: a link planted there must not pull another file's lines into OUT. A
/// missing file reads as empty.
pub fn read_own_text(path: &Path, max_bytes: u64) -> Result<String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Ok(m) if m.file_type().is_symlink() => {
            bail!("{} is a symbolic link: refusing to read or replace it (remove it)", path.display())
        }
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!("{} is {}: only regular files are read", path.display(), kind(&meta.file_type()));
    }
    let mut text = String::new();
    file.take(max_bytes).read_to_string(&mut text).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text)
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes temporary files (`.<name>.tmp-<pid>-<random>`) left in `dirs` by processes that died
/// without cleaning up (SIGKILL, power loss). A file is stale when its pid is not a live process
/// here and no process holds the lock `write_atomic` takes while writing (so a shard on another
/// machine sharing OUT over a network file system keeps its file). Temporary files of this
/// process are removed too when `include_own` (a run that is quitting). A symbolic link with a
/// temporary name is never clipmask's (temporary files are created exclusively) and is always
/// removed. Returns how many entries were removed; errors are ignored (it is housekeeping).
pub fn sweep_temp_files(dirs: &[PathBuf], include_own: bool) -> usize {
    stale_temp_files(dirs, include_own).iter().filter(|p| std::fs::remove_file(p).is_ok()).count()
}

/// The temporary files in `dirs` that [`sweep_temp_files`] would remove (`clipmask status`
/// reports them without removing anything).
pub fn stale_temp_files(dirs: &[PathBuf], include_own: bool) -> Vec<PathBuf> {
    let me = std::process::id();
    let mut stale_files = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = temp_file_pid(&name.to_string_lossy()) else { continue };
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            let stale = if ft.is_symlink() {
                true
            } else if !ft.is_file() {
                false
            } else if pid == me {
                include_own
            } else if process_alive(pid) {
                false
            } else {
                // Not a local process; free of locks means no writer anywhere.
                open_regular(&path).is_ok_and(|f| f.try_lock().is_ok())
            };
            if stale {
                stale_files.push(path);
            }
        }
    }
    stale_files.sort();
    stale_files
}

/// Fails when an output directory is, or lies inside, an input directory (or the reverse:
/// an input inside an output folder): outputs would overwrite inputs, or the next run would
/// read its own outputs. `outputs` and `inputs` are (what, path) pairs for the messages; paths
/// that do not exist yet are compared through their nearest existing ancestor.
pub fn check_apart(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (in_what, input) in inputs {
        let Ok(input_real) = input.canonicalize() else { continue };
        for (out_what, output) in outputs {
            let output_real = resolve_lenient(output);
            if output_real.starts_with(&input_real)
                || (input_real.starts_with(&output_real) && output_real != input_real)
            {
                bail!(
                    "{out_what} {} and {in_what} {} overlap: outputs would overwrite inputs (choose an output \
                     directory apart from the inputs)",
                    output.display(),
                    input.display()
                );
            }
        }
    }
    Ok(())
}

/// `path` with symbolic links resolved as far as it exists; the rest appended as given.
fn resolve_lenient(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(real) = cur.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Regular files `<dir>/<stem>.<ext>` whose extension is one of `exts`, by stem, sorted. A stem with
/// several files is an error naming them. Entries that are not regular files
/// are listed too: reading them fails their image with a reason. With `skip_hidden`, stems
/// starting with '.' (macOS `._x.png` forks) are left out. `what` names the directory in errors.
pub fn files_by_stem(
    dir: &Path,
    exts: &[&str],
    what: &str,
    skip_hidden: bool,
) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut out: std::collections::BTreeMap<String, PathBuf> = std::collections::BTreeMap::new();
    let err = || format!("cannot read {what} {}", dir.display());
    for entry in std::fs::read_dir(dir).with_context(err)? {
        let path = entry.with_context(err)?.path();
        if !path.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e)) {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        if skip_hidden && stem.starts_with('.') {
            continue;
        }
        // Two files for one id (x.jpg and x.JPG): which is meant cannot be guessed.
        if let Some(other) = out.get(stem) {
            bail!(
                "{what} {}: {} and {} have the same id {stem:?} (rename one)",
                dir.display(),
                other.display(),
                path.display()
            );
        }
        out.insert(stem.to_string(), path);
    }
    Ok(out)
}
