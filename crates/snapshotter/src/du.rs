//! Disk usage of a directory tree the way containerd's `fs.DiskUsage` counts
//! it: every inode once (hard links count once), size = allocated 512-byte
//! blocks, the root itself included, symlinks not followed.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Bytes allocated and inodes used under a tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Allocated bytes (st_blocks * 512).
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

/// Walks `root` (blocking I/O: call from a blocking thread).
pub fn disk_usage(root: &Path) -> Result<Usage, Error> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut size: i64 = 0;
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = std::fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
        if seen.insert((md.dev(), md.ino())) {
            size = size.saturating_add((md.blocks() as i64).saturating_mul(512));
        }
        if md.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(Error::io("read directory", &path))? {
                let entry = entry.map_err(Error::io("read directory", &path))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(Usage {
        size,
        inodes: seen.len() as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_count_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10000]).unwrap();
        let one = disk_usage(dir.path()).unwrap();
        assert_eq!(one.inodes, 2);
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let linked = disk_usage(dir.path()).unwrap();
        assert_eq!(linked.inodes, 2);
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("d/l")).unwrap();
        let more = disk_usage(dir.path()).unwrap();
        assert_eq!(more.inodes, 4);
        assert!(more.size >= one.size);
    }

    #[test]
    fn missing_root_names_the_path() {
        let err = disk_usage(Path::new("/nonexistent/xyz")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/xyz"), "{err}");
    }
}
