//! Directories only root may enter. The daemon's caches, work files and state
//! hold raw image bytes (also of files the image itself keeps from other
//! users) and credentials: every directory that holds them is 0700, and one
//! found with a looser mode (left by an older daemon, or an admin's `mkdir`) is
//! tightened, with a log line, rather than trusted.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use tracing::warn;

/// Creates `path` (and missing parents) mode 0700, or tightens it to 0700 if
/// it exists and others may enter it. Blocking; only the leaf is tightened
/// (its parents may be shared directories like /var/cache).
pub fn private_dir(path: &Path) -> io::Result<()> {
    let err = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| err("creating the directory", e))?;
    let mode = std::fs::metadata(path)
        .map_err(|e| err("reading the mode of", e))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("restricting to root (0700)", e))?;
        warn!(
            "{}: tightened from mode {mode:04o} to 0700 (it holds image bytes or daemon state other users must not read)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_0700_and_tightens_what_exists_looser() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700, "created parents too");
        let loose = dir.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&loose).unwrap();
        assert_eq!(mode(&loose), 0o700);
        // Only the leaf: a shared parent keeps its mode.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir.path().join("c")).unwrap();
        assert_eq!(mode(dir.path()), 0o755);
    }
}
