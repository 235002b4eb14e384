//! The work dir's copies of meta blobs (`<work dir>/meta/<name>`): each
//! written whole, after it was verified, and atomically, so the kernel reads
//! image metadata locally and a restarted daemon need not fetch it again.
//!
//! It owns those files; it must not fetch or parse them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

pub(crate) struct MetaDir {
    dir: PathBuf,
}

impl MetaDir {
    pub(crate) fn new(work_dir: &Path) -> Self {
        MetaDir {
            dir: work_dir.join("meta"),
        }
    }

    fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the work dir {}", self.dir.display()))
    }

    /// The copy of meta blob `hex` (its sha256), if one is there and still
    /// hashes to its name.
    pub(crate) fn verified(&self, hex: &str) -> anyhow::Result<Option<PathBuf>> {
        self.create()?;
        let path = self.dir.join(hex);
        if let Ok(existing) = std::fs::read(&path) {
            if hex::encode(Sha256::digest(&existing)) == hex {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }

    /// Writes a verified meta blob into the work dir (atomically).
    pub(crate) fn keep(&self, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        self.create()?;
        let path = self.dir.join(name);
        crate::files::write_atomically(&path, bytes, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}
