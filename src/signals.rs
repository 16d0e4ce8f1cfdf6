//! Stopping a run on a signal: SIGINT (Ctrl-C), SIGTERM (what SLURM, Docker and Kubernetes send
//! at a time limit) and SIGHUP (a closed terminal) all stop it the same way: the image in flight
//! is finished or abandoned, the summary and `failures.jsonl` are written, temporary files are
//! gone, and the exit status is 128 + the signal number (130, 143, 129).
//!
//! A second signal quits at once. It must not race libtorch: the old handler called `exit()`
//! from its own thread, and `exit()` runs atexit handlers and C++ static destructors (libtorch's
//! allocators and thread pools) while the main thread may still be inside libtorch, which
//! segfaulted about one time in ten. The signal itself only wakes a thread (signal-hook's
//! self-pipe; nothing but a write happens in the async handler). On the second signal that
//! thread removes this process's temporary files and calls `_exit(2)`, which ends the process
//! in the kernel without running any in-process teardown, so nothing can be destroyed under
//! the main thread. Outputs under final names are complete (they are renamed into place), so
//! the worst case is a temporary file created between the sweep and `_exit`, which the next
//! run sweeps ([`crate::files::sweep_temp_files`]).
use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// Set by the first SIGINT, SIGTERM or SIGHUP; the run checks it between images.
#[derive(Clone)]
pub struct Interrupt {
    stop: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "interrupted (SIGINT)",
        SIGTERM => "terminated (SIGTERM)",
        SIGHUP => "hung up (SIGHUP)",
        _ => "signal",
    }
}

/// Whether `sig` is ignored (SIG_IGN) in this process, as inherited from the parent.
fn is_ignored(sig: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current disposition into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

impl Interrupt {
    /// Handles SIGINT, SIGTERM and SIGHUP from now on. `temp_dirs`: where this process writes
    /// temporary files, swept when a second signal quits at once.
    pub fn install(temp_dirs: Vec<PathBuf>) -> Result<Interrupt> {
        let me = Interrupt { stop: Arc::new(AtomicBool::new(false)), signal: Arc::new(AtomicI32::new(0)) };
        // A signal the parent set to ignored stays ignored, as POSIX tools leave it:
        // `nohup clipmask ... &` must survive the hangup.
        let wanted: Vec<i32> = [SIGINT, SIGTERM, SIGHUP].into_iter().filter(|&s| !is_ignored(s)).collect();
        let mut signals = signal_hook::iterator::Signals::new(wanted).context("cannot install signal handlers")?;
        let (stop, first) = (me.stop.clone(), me.signal.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    match first.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst) {
                        Ok(_) => {
                            stop.store(true, Ordering::SeqCst);
                            eprintln!("\n{}: finishing the image in flight (send it again to quit at once)", name(sig));
                        }
                        Err(first) => {
                            eprintln!("\n{}: quitting at once", name(sig));
                            crate::files::sweep_temp_files(&temp_dirs, true);
                            // SAFETY: _exit only makes the exit_group system call (see the module docs).
                            unsafe { libc::_exit(128 + first) };
                        }
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(me)
    }

    /// The flag a run polls to stop (set by the first signal).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The first signal received, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Exit status of a run stopped by a signal: 128 + its number (SIGINT 130, SIGTERM 143,
    /// SIGHUP 129); 130 when the run was stopped otherwise.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal().unwrap_or(SIGINT)
    }
}
