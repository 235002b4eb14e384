//! `<run dir>/images.json`: what was registered, how, and where it is
//! mounted, for a successor daemon to register again before the kernel asks
//! (see `Catalog::restore`). It holds registry credentials, so it is written
//! mode 0600 (under /run by default, gone at reboot with the mounts it
//! describes).
//!
//! It owns the file's form and its writing; it must not register anything.

use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::control::RegisterRequest;

/// The file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    images: Vec<SavedImage>,
}

/// One image in the file.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SavedImage {
    /// How it was registered: replayed by a successor.
    pub(crate) request: RegisterRequest,
    pub(crate) mountpoints: Vec<PathBuf>,
}

/// The state file at one path.
pub(crate) struct StateFile {
    path: PathBuf,
    /// Serialises writers.
    one_writer: Mutex<()>,
}

impl StateFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        StateFile {
            path,
            one_writer: Mutex::new(()),
        }
    }

    /// Replaces the file with the images `images` lists (called with no
    /// other writer running, so the newest list is the one written). A
    /// failure is logged: serving goes on without it.
    pub(crate) fn save(&self, images: impl FnOnce() -> Vec<SavedImage>) {
        let path = &self.path;
        let _one_writer = self.one_writer.lock().unwrap_or_else(|p| p.into_inner());
        let saved = SavedState { images: images() };
        let write = || -> std::io::Result<()> {
            crate::files::write_atomically(path, &serde_json::to_vec_pretty(&saved)?, 0o600)
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), "cannot save the daemon state (a restarted daemon will not know the mounted images): {e}");
        }
    }

    /// The images a previous daemon saved: none if there is no file, or an
    /// unreadable one (logged).
    pub(crate) fn load(&self) -> Vec<SavedImage> {
        let path = &self.path;
        let saved: SavedState = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    warn!(path = %path.display(), "ignoring an unreadable state file: {e}");
                    return Vec::new();
                }
            },
            Err(_) => return Vec::new(),
        };
        saved.images
    }
}
