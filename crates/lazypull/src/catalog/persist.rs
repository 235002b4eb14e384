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
use tracing::{error, warn};

use crate::control::RegisterRequest;

/// The file's format version (written as `"version"`). A file without one is
/// version 0, the form before versions, which is this one's without the field.
pub(crate) const IMAGES_VERSION: u32 = 1;

/// The file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    /// [`IMAGES_VERSION`]; absent (0) in files written before versions.
    #[serde(default)]
    version: u32,
    images: Vec<SavedImage>,
}

/// One image in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedImage {
    /// How it was registered: replayed by a successor.
    pub(crate) request: RegisterRequest,
    /// Its fsid, once registered (absent in version 0 files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fsid: Option<String>,
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
        let saved = SavedState {
            version: IMAGES_VERSION,
            images: images(),
        };
        let write = || -> std::io::Result<()> {
            crate::files::write_atomically(path, &serde_json::to_vec_pretty(&saved)?, 0o600)
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), "cannot save the daemon state (a restarted daemon will not know the mounted images): {e}");
        }
    }

    /// The images a previous daemon saved: none if there is no file. A file
    /// this daemon cannot read (not JSON of this form, or a format version it
    /// does not know: a newer daemon's) is never guessed at: it is logged as
    /// an error and kept aside as `<file>.unreadable`, so the images it names
    /// are not lost silently (the next save would replace it).
    pub(crate) fn load(&self) -> Vec<SavedImage> {
        let path = &self.path;
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                error!(path = %path.display(), "cannot read the daemon state; the images a previous daemon served are not restored: {e}");
                return Vec::new();
            }
        };
        let why = match serde_json::from_slice::<SavedState>(&bytes) {
            // Version 0 has this form without the version field.
            Ok(s) if s.version <= IMAGES_VERSION => return s.images,
            Ok(s) => format!(
                "it is in format version {}, this daemon reads versions 0 to {IMAGES_VERSION}",
                s.version
            ),
            Err(e) => format!("it is not a state file this daemon can read: {e}"),
        };
        let mut aside = path.clone().into_os_string();
        aside.push(".unreadable");
        let aside = PathBuf::from(aside);
        match std::fs::rename(path, &aside) {
            Ok(()) => error!(
                path = %path.display(),
                kept = %aside.display(),
                "NOT restoring the images a previous daemon served: {why}; the file is kept aside, their mounts will fail until they are registered again"
            ),
            Err(e) => error!(
                path = %path.display(),
                "NOT restoring the images a previous daemon served: {why}; and it cannot be kept aside ({e})"
            ),
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(reference: &str) -> SavedImage {
        SavedImage {
            request: RegisterRequest {
                reference: reference.into(),
                ..RegisterRequest::default()
            },
            fsid: None,
            mountpoints: vec!["/mnt/a".into()],
        }
    }

    #[test]
    fn the_file_says_its_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("images.json"));
        file.save(|| vec![image("r/a@sha256:1")]);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("images.json")).unwrap())
                .unwrap();
        assert_eq!(v["version"], IMAGES_VERSION);
        let loaded = file.load();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].request.reference, "r/a@sha256:1");
    }

    #[test]
    fn an_unversioned_file_is_read_as_version_0() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.json");
        // As written before files carried a version.
        std::fs::write(
            &path,
            r#"{"images":[{"request":{"reference":"r/a@sha256:1","username":null,"password":null,"insecure":false},"mountpoints":["/mnt/a"]}]}"#,
        )
        .unwrap();
        let loaded = StateFile::new(path.clone()).load();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].request.reference, "r/a@sha256:1");
        assert_eq!(loaded[0].mountpoints, [PathBuf::from("/mnt/a")]);
        assert!(path.exists(), "a file this daemon reads stays");
    }

    #[test]
    fn a_file_of_an_unknown_version_or_form_is_kept_aside_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.json");
        let aside = dir.path().join("images.json.unreadable");
        let newer = r#"{"version":99,"images":[{"request":{"reference":"r/a@sha256:1"},"mountpoints":[]}]}"#;
        std::fs::write(&path, newer).unwrap();
        let file = StateFile::new(path.clone());
        assert!(
            file.load().is_empty(),
            "a newer format is not read as this one"
        );
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_to_string(&aside).unwrap(),
            newer,
            "kept aside"
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(file.load().is_empty());
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), "{not json");
    }
}
