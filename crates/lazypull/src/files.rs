//! Small file helpers the daemon's state and work files share. Plain std I/O,
//! blocking: callers on the async runtime must not use them on a task.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably: a temporary file of a
/// unique name in the same directory (so concurrent writers never share one),
/// written and fsynced, renamed over `path`, then the directory fsynced (so
/// the rename itself survives a crash). Creates the directory if needed; a new
/// file gets `mode` (before the umask). Readers see the old file or the new
/// one, never a half-written one, also after a crash.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("creating a temporary file in {}: {e}", dir.display()),
            )
        })?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    // On failure the temporary is removed when `e.file` drops.
    tmp.persist(path).map_err(|e| {
        io::Error::new(
            e.error.kind(),
            format!(
                "renaming {} to {}: {}",
                e.file.path().display(),
                path.display(),
                e.error
            ),
        )
    })?;
    sync_dir(dir)
}

/// Fsyncs a directory: makes the renames and removals done in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("syncing {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_with_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        write_atomically(&path, b"one", 0o600).unwrap();
        write_atomically(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn two_writers_of_one_path_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let a = vec![b'a'; 256 << 10];
        let b = vec![b'b'; 256 << 10];
        std::thread::scope(|s| {
            let writers: Vec<_> = [&a, &b]
                .into_iter()
                .map(|bytes| {
                    let path = &path;
                    s.spawn(move || {
                        for _ in 0..200 {
                            write_atomically(path, bytes, 0o600)?;
                        }
                        io::Result::Ok(())
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap().expect("each write succeeds");
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert!(got == a || got == b, "the file is one write, whole");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}
