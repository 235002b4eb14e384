//! What a successor daemon reads in the run dir: `transport.json` (the FUSE
//! session; the cachefiles objects parked at a handover), whose form is
//! here, and `images.json` (the catalog's record of registered images). A
//! daemon that finds no kernel connection to take over, or that shuts down
//! for good, removes both: they describe mounts that are gone.
//!
//! It owns those paths and transport.json; it must not touch the fd store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lazypull_transport::fuse::{self, FuseServer};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Where the catalog records the registered images.
pub(crate) fn images_file(run_dir: &Path) -> PathBuf {
    run_dir.join("images.json")
}

/// Removes what a previous daemon recorded for its successor.
pub(crate) fn forget(run_dir: &Path) {
    let _ = std::fs::remove_file(TransportState::path(run_dir));
    let _ = std::fs::remove_file(images_file(run_dir));
}

/// transport.json's format version (written as `"version"`). A file without
/// one is version 0, the form before versions: this one's without the field.
pub(crate) const TRANSPORT_VERSION: u32 = 1;

/// What a successor needs besides the fds: written to `<run_dir>/transport.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct TransportState {
    #[serde(default)]
    pub(crate) fuse: Option<fuse::Session>,
    /// Objects parked in the fd store as `obj:<id>` at the last handover.
    #[serde(default)]
    pub(crate) objects: Vec<ParkedObject>,
    /// The fanotify transport: the daemon's fd limit (the event fd numbers
    /// of its group are below it; a successor denies every one it cannot
    /// account for). Written when the transport starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fanotify_fd_limit: Option<i32>,
}

/// A cachefiles object parked in the fd store, by its keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ParkedObject {
    pub(crate) object_id: u32,
    pub(crate) volume: Vec<u8>,
    pub(crate) cookie: Vec<u8>,
    pub(crate) size: u64,
}

impl TransportState {
    fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("transport.json")
    }

    /// What a previous daemon saved, or nothing. A file this daemon cannot
    /// read (not this form, or a format version it does not know) is never
    /// guessed at: it is discarded (kept aside as `transport.json.unreadable`)
    /// and the transport starts without it.
    pub(crate) fn load(run_dir: &Path) -> TransportState {
        let path = Self::path(run_dir);
        let Ok(bytes) = std::fs::read(&path) else {
            return TransportState::default();
        };
        let why = match serde_json::from_slice::<Versioned<TransportState>>(&bytes) {
            // Version 0 has this form without the version field.
            Ok(v) if v.version <= TRANSPORT_VERSION => return v.state,
            Ok(v) => format!(
                "it is in format version {}, this daemon reads versions 0 to {TRANSPORT_VERSION}",
                v.version
            ),
            Err(e) => format!("unreadable: {e}"),
        };
        let aside = run_dir.join("transport.json.unreadable");
        let kept = std::fs::rename(&path, &aside).map_or_else(
            |e| format!("cannot keep it aside: {e}"),
            |()| format!("kept aside as {}", aside.display()),
        );
        warn!(path = %path.display(), "ignoring the transport state a previous daemon saved ({kept}): {why}");
        TransportState::default()
    }

    pub(crate) fn save(&self, run_dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(run_dir);
        let versioned = Versioned {
            version: TRANSPORT_VERSION,
            state: self,
        };
        crate::files::write_atomically(&path, &serde_json::to_vec_pretty(&versioned)?, 0o600)
            .with_context(|| format!("saving {}", path.display()))
    }
}

/// transport.json: the state with its format version beside its fields.
#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    /// [`TRANSPORT_VERSION`]; absent (0) in files written before versions.
    #[serde(default)]
    version: u32,
    #[serde(flatten)]
    state: T,
}

/// Saves the FUSE session into `<run_dir>/transport.json` when it changed:
/// from the periodic task and from LOOKUPs that hand out a new node id (see
/// [`FuseServer::on_new_node`]). One save at a time, each of the session as
/// it is when the save starts, so an older snapshot never lands last.
pub(crate) struct SessionSaver {
    server: Arc<FuseServer>,
    run_dir: PathBuf,
    last: std::sync::Mutex<Option<lazypull_transport::fuse::Session>>,
}

impl SessionSaver {
    pub(crate) fn new(server: Arc<FuseServer>, run_dir: PathBuf) -> Arc<Self> {
        Arc::new(SessionSaver {
            server,
            run_dir,
            last: std::sync::Mutex::new(None),
        })
    }

    /// Saves the session if it changed since the last save (blocking I/O:
    /// a FUSE worker thread, or `spawn_blocking`).
    pub(crate) fn save(&self) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let session = self.server.session();
        if session.is_none() || session == *last {
            return;
        }
        let state = TransportState {
            fuse: session.clone(),
            ..TransportState::default()
        };
        match state.save(&self.run_dir) {
            Ok(()) => *last = session,
            Err(e) => warn!("saving the FUSE session: {e:#}"),
        }
    }
}

/// Keeps `<run_dir>/transport.json` current with the FUSE session (node ids
/// change on lookups; lookup counts too), so a successor after a crash
/// knows them: new ids are saved by the LOOKUP that makes them, the rest
/// every 200 ms.
pub(crate) async fn save_fuse_sessions(server: Arc<FuseServer>, run_dir: PathBuf) {
    let saver = SessionSaver::new(server.clone(), run_dir);
    // Weak: the server holds the hook, and the saver the server.
    let hook = Arc::downgrade(&saver);
    server.on_new_node(Arc::new(move || {
        if let Some(saver) = hook.upgrade() {
            saver.save();
        }
    }));
    loop {
        let s = saver.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || s.save()).await {
            warn!("saving the FUSE session: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object() -> ParkedObject {
        ParkedObject {
            object_id: 7,
            volume: b"erofs,lazypull".to_vec(),
            cookie: b"sha256-abc".to_vec(),
            size: 4096,
        }
    }

    #[test]
    fn transport_state_says_its_version_and_reads_version_0() {
        let dir = tempfile::tempdir().unwrap();
        let state = TransportState {
            objects: vec![object()],
            ..TransportState::default()
        };
        state.save(dir.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(TransportState::path(dir.path())).unwrap())
                .unwrap();
        assert_eq!(v["version"], TRANSPORT_VERSION);
        assert_eq!(TransportState::load(dir.path()).objects[0].object_id, 7);
        // As written before files carried a version.
        std::fs::write(
            TransportState::path(dir.path()),
            r#"{"fuse":null,"objects":[{"object_id":9,"volume":[1],"cookie":[2],"size":10}]}"#,
        )
        .unwrap();
        assert_eq!(TransportState::load(dir.path()).objects[0].object_id, 9);
    }

    #[test]
    fn transport_state_of_an_unknown_version_is_discarded_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let newer = r#"{"version":99,"fuse":null,"objects":[{"object_id":9,"volume":[1],"cookie":[2],"size":10}]}"#;
        std::fs::write(TransportState::path(dir.path()), newer).unwrap();
        let loaded = TransportState::load(dir.path());
        assert!(loaded.objects.is_empty() && loaded.fuse.is_none());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("transport.json.unreadable")).unwrap(),
            newer
        );
    }
}
