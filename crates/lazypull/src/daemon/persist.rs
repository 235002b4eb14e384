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

/// What a successor needs besides the fds: written to `<run_dir>/transport.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct TransportState {
    #[serde(default)]
    pub(crate) fuse: Option<fuse::Session>,
    /// Objects parked in the fd store as `obj:<id>` at the last handover.
    #[serde(default)]
    pub(crate) objects: Vec<ParkedObject>,
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

    pub(crate) fn load(run_dir: &Path) -> TransportState {
        match std::fs::read(Self::path(run_dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!("ignoring an unreadable transport state: {e}");
                TransportState::default()
            }),
            Err(_) => TransportState::default(),
        }
    }

    pub(crate) fn save(&self, run_dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(run_dir);
        crate::files::write_atomically(&path, &serde_json::to_vec_pretty(self)?, 0o600)
            .with_context(|| format!("saving {}", path.display()))
    }
}

/// Keeps `<run_dir>/transport.json` current with the FUSE session (node ids
/// change on lookups), so a successor after a crash knows them.
pub(crate) async fn save_fuse_sessions(server: Arc<FuseServer>, run_dir: PathBuf) {
    let mut last = None;
    loop {
        let session = server.session();
        if session.is_some() && session != last {
            let state = TransportState {
                fuse: session.clone(),
                objects: Vec::new(),
            };
            match state.save(&run_dir) {
                Ok(()) => last = session,
                Err(e) => warn!("saving the FUSE session: {e:#}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
