//! Which content each blob name is bound to, for as long as a cache may hold
//! bytes of it: a name is the digest of a blob's bytes, but what the daemon
//! verifies them against is the chunk table an image's chain vouches for, and
//! two images can declare one name with different tables (at most one of them
//! honestly). So one name maps to exactly one binding, the sha256 of its chunk
//! table (`plain` for a local plain file, which has none), and an image
//! declaring a bound name with another binding is refused.
//!
//! In memory that holds for the daemon's life (the catalog's blobs). The
//! cachefiles kernel cache outlives the daemon: the kernel keeps cached bytes
//! by volume (domain_id or fsid) and cookie (the blob name) and serves them
//! without asking, so under cachefiles the bindings are also kept in
//! `<work dir>/kernel-bindings.json` (0600, versioned) and checked by every
//! later daemon. (The FUSE cache records its binding in each map instead; see
//! `lazypull_engine::CacheFile`.)
//!
//! It owns the file; it must not register anything.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// The file's format version.
const VERSION: u32 = 1;

/// What a name's bytes are verified against: a chunk table's sha256, or
/// nothing (a plain local file).
pub(crate) type Binding = Option<[u8; 32]>;

/// `sha256:<hex>` of a table, or `plain`.
pub(crate) fn describe(b: &Binding) -> String {
    match b {
        Some(t) => format!("chunk table sha256:{}", hex::encode(t)),
        None => "no chunk table (a plain local file)".into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    version: u32,
    /// Name → binding (`<hex>` or `plain`) and the image that bound it.
    blobs: BTreeMap<String, SavedBlob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedBlob {
    pub(crate) table: String,
    pub(crate) image: String,
}

/// The bindings of the kernel's cache, persisted.
pub(crate) struct KernelBindings {
    path: PathBuf,
    blobs: BTreeMap<String, SavedBlob>,
}

fn encode(b: &Binding) -> String {
    b.map(hex::encode).unwrap_or_else(|| "plain".into())
}

impl KernelBindings {
    /// Loads `path` (an absent file: no bindings yet). A file this daemon
    /// cannot read is not trusted to be empty: it is an error.
    pub(crate) fn load(path: PathBuf) -> anyhow::Result<KernelBindings> {
        let blobs = match std::fs::read(&path) {
            Ok(bytes) => {
                let saved: Saved = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{} is not a lazypull kernel bindings file (remove it only together \
                         with the cachefiles cache it describes)",
                        path.display()
                    )
                })?;
                if saved.version != VERSION {
                    anyhow::bail!(
                        "{} is of format version {}; this daemon reads version {VERSION} \
                         (remove it only together with the cachefiles cache it describes)",
                        path.display(),
                        saved.version
                    );
                }
                saved.blobs
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(KernelBindings { path, blobs })
    }

    /// The binding `name` has in the kernel's cache, and the image that bound it.
    pub(crate) fn get(&self, name: &str) -> Option<(Binding, &str)> {
        let saved = self.blobs.get(name)?;
        let binding = if saved.table == "plain" {
            None
        } else {
            let mut t = [0u8; 32];
            // A damaged entry binds the name to nothing any image can match.
            hex::decode_to_slice(&saved.table, &mut t).ok()?;
            Some(t)
        };
        Some((binding, saved.image.as_str()))
    }

    /// Records new bindings (names already bound are left as they are), in
    /// memory: [`snapshot`](Self::snapshot) then [`save`] writes them.
    pub(crate) fn add<'a>(&mut self, new: impl IntoIterator<Item = (&'a str, Binding, &'a str)>) {
        for (name, binding, image) in new {
            self.blobs
                .entry(name.to_owned())
                .or_insert_with(|| SavedBlob {
                    table: encode(&binding),
                    image: image.to_owned(),
                });
        }
    }

    /// The file's path and bytes as of now.
    pub(crate) fn snapshot(&self) -> (PathBuf, Vec<u8>) {
        let saved = Saved {
            version: VERSION,
            blobs: self.blobs.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&saved).expect("serialisable");
        (self.path.clone(), bytes)
    }
}

/// Writes a [`KernelBindings::snapshot`] (0600, atomically). A failure is
/// logged: the bindings hold in memory for this daemon's life.
pub(crate) fn save((path, bytes): (PathBuf, Vec<u8>)) {
    if let Err(e) = crate::files::write_atomically(&path, &bytes, 0o600) {
        warn!(file = %path.display(), "cannot save the kernel cache's blob bindings: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_survive_a_reload_and_first_binding_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel-bindings.json");
        let mut b = KernelBindings::load(path.clone()).unwrap();
        assert!(b.get("n").is_none());
        b.add([("n", Some([1; 32]), "img-a"), ("p", None, "img-a")]);
        b.add([("n", Some([2; 32]), "img-b")]);
        save(b.snapshot());
        let b = KernelBindings::load(path.clone()).unwrap();
        assert_eq!(b.get("n"), Some((Some([1; 32]), "img-a")));
        assert_eq!(b.get("p"), Some((None, "img-a")));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, r#"{"version":7,"blobs":{}}"#).unwrap();
        let e = KernelBindings::load(path).err().unwrap().to_string();
        assert!(e.contains("format version 7"), "{e}");
    }
}
