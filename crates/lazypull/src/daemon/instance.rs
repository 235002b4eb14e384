//! One daemon per run dir. A daemon holds an exclusive `flock` on
//! `<run dir>/daemon.lock` for its whole life (the kernel drops it when the
//! process ends, however it ends) and writes its pid and control socket
//! there. A second daemon checks this before it touches anything a running
//! daemon owns — the fd store's entries (one-shot ones are given out once),
//! the kernel connection (`restore`, `FUSE_NOTIFY_RESEND`), the state files —
//! and refuses, naming the running one. The lock, not the control socket, is
//! what makes the check race-free: two daemons starting at once cannot both
//! hold it.
//!
//! It owns the lock file; it must not touch anything else in the run dir.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::control::{self, Request};

/// Held while the daemon runs: dropping it (or exiting) releases the run dir.
#[derive(Debug)]
pub(crate) struct InstanceLock {
    _file: File,
}

fn lock_path(run_dir: &Path) -> PathBuf {
    run_dir.join("daemon.lock")
}

fn refuse(pid: &str, socket: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "another lazypull daemon (pid {pid}) is serving at {}; use --takeover to replace it",
        socket.display()
    )
}

/// Makes this process the run dir's one daemon, or says which daemon already
/// is (changing nothing). Called before the daemon touches the fd store or
/// the run dir's state (after a `--takeover` handover: the old daemon has
/// exited by then, and its lock with it).
pub(crate) fn acquire(run_dir: &Path, socket: &Path) -> anyhow::Result<InstanceLock> {
    // A daemon answering on our control socket (perhaps with another run
    // dir) is running: asking it changes nothing.
    if let Ok(status) = control::call(socket, &Request::Status, Duration::from_secs(5)) {
        let pid = status["pid"]
            .as_u64()
            .map_or_else(|| "?".to_owned(), |p| p.to_string());
        return Err(refuse(&pid, socket));
    }
    // Root's only: the run dir holds state and credentials.
    lazypull_engine::private_dir(run_dir).context("the run directory")?;
    let path = lock_path(run_dir);
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening the daemon lock {}", path.display()))?
    };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            // The holder writes "pid\nsocket\n" right after locking; a reader
            // in between sees the previous holder's words or none.
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let mut lines = text.lines();
            let pid = lines.next().filter(|p| !p.is_empty()).unwrap_or("?");
            let socket = lines.next().map_or(socket.to_path_buf(), PathBuf::from);
            return Err(refuse(pid, &socket));
        }
        Err(e) => bail!("locking {}: {e}", path.display()),
    }
    let write = |file: &mut File| -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}\n{}", std::process::id(), socket.display())
    };
    write(&mut file).with_context(|| format!("writing {}", path.display()))?;
    Ok(InstanceLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let (run, socket) = (dir.path().join("run"), dir.path().join("run/ctl.sock"));
        let first = acquire(&run, &socket).unwrap();
        let err = acquire(&run, &socket).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "another lazypull daemon (pid {}) is serving at {}; use --takeover to replace it",
                std::process::id(),
                socket.display()
            )
        );
        drop(first);
        acquire(&run, &socket).expect("free again once the first let go");
    }
}
