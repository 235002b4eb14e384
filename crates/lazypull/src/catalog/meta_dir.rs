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

    /// The work dir and its `meta`, both root's only (0700, tightened if
    /// found looser): meta blobs are image metadata other users must not read.
    fn create(&self) -> anyhow::Result<()> {
        if let Some(work_dir) = self.dir.parent() {
            lazypull_engine::private_dir(work_dir).context("the work dir")?;
        }
        lazypull_engine::private_dir(&self.dir).context("the work dir")
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
        crate::files::write_atomically(&path, bytes, 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}
