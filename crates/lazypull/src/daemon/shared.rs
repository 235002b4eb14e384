//! What the daemon's tasks share while it serves: the catalog, the view of
//! the transport and why it was chosen, and the way to ask the daemon to exit.
//! It produces the status snapshot ([`StatusSource`]) that `lazypull status`
//! and the metrics show.
//!
//! It owns no serving: the control server and the metrics use it, the
//! daemon's lifecycle (`daemon::serve`) creates it and acts on exit requests.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tracing::info;

use super::prefetch::Prefetches;
use super::view::TransportView;
use crate::catalog::Catalog;
use crate::status::{Status, StatusSource, TransportStatus};

/// How the daemon ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitMode {
    /// Stop for good: unbind the cache / unmount the blob files, release the fd store.
    Shutdown,
    /// Leave everything to a successor (upgrade): park fds, save state, exit.
    Handover,
}

/// An exit asked for, and who waits to hear how it went.
pub(crate) type ExitRequest = (
    ExitMode,
    Option<std::sync::mpsc::Sender<anyhow::Result<()>>>,
);

/// What request handlers share.
pub(crate) struct Daemon {
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) view: TransportView,
    /// The prefetch threads, joined at unmount, shutdown and handover.
    pub(crate) prefetches: Prefetches,
    started: Instant,
    /// Why this transport was chosen.
    reason: String,
    exit: Mutex<Option<tokio::sync::oneshot::Sender<ExitRequest>>>,
    /// Where the kubelet credentials are parked for a successor (None: no
    /// fd store, and they die with this daemon).
    fd_store: Option<crate::fdstore::Client>,
    /// Whether "no fd store" was said already.
    told_no_store: std::sync::atomic::AtomicBool,
    /// Serialises parking the kubelet credentials (snapshot, then put), so
    /// the last put is of the newest snapshot. Held on blocking threads only.
    parking: Mutex<()>,
}

impl Daemon {
    pub(crate) fn new(
        catalog: Arc<Catalog>,
        view: TransportView,
        started: Instant,
        reason: String,
        exit: tokio::sync::oneshot::Sender<ExitRequest>,
        fd_store: Option<crate::fdstore::Client>,
    ) -> Self {
        Daemon {
            catalog,
            view,
            prefetches: Prefetches::default(),
            started,
            reason,
            exit: Mutex::new(Some(exit)),
            fd_store,
            told_no_store: Default::default(),
            parking: Mutex::new(()),
        }
    }

    /// Parks the kubelet credentials as they are now in the fd store, for a
    /// successor; whether they are parked. A failure is logged: they are
    /// still used by this daemon. Blocking (the fd store): call it from a
    /// control handler (the blocking pool).
    pub(crate) fn park_kubelet_credentials(&self) -> bool {
        let Some(store) = &self.fd_store else {
            if !self
                .told_no_store
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!("no fd store: the credentials kubelet sent are held by this daemon only, and a restart loses them (its images then fail to read until they are pulled again)");
            }
            return false;
        };
        let _one = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = self.catalog.kubelet_credentials().snapshot();
        match super::handover::park_kubelet_credentials(store, &bytes) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "{e:#}: a restarted daemon will not have the credentials kubelet sent"
                );
                false
            }
        }
    }

    /// Asks the daemon to exit `mode`; `done` hears how it went.
    pub(crate) fn request_exit(
        &self,
        mode: ExitMode,
        done: Option<std::sync::mpsc::Sender<anyhow::Result<()>>>,
    ) -> anyhow::Result<()> {
        let tx = self
            .exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .context("the daemon is already exiting")?;
        info!(?mode, "exit requested over the control socket");
        tx.send((mode, done))
            .map_err(|_| anyhow::anyhow!("the daemon is already exiting"))
    }
}

/// The daemon's status, as `lazypull status --json` and the metrics see it.
impl StatusSource for Daemon {
    fn status(&self) -> Status {
        Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.started.elapsed().as_secs(),
            transport: TransportStatus {
                kind: self.view.name(),
                reason: self.reason.clone(),
                counters: self.view.stats_json(),
                kernel: self.view.kernel_counters(),
            },
            fetch: self.catalog.fetch_context().stats.snapshot(),
            backend_http: lazypull_backend::http_totals(),
            backends: self.catalog.backends(),
            images: self.catalog.images(),
            blobs: self.view.blobs(),
            prefetching: self.prefetches.running(),
            restoring: self.catalog.restoring(),
            cache: self.view.cache_budget(),
            kubelet_credentials: self.catalog.kubelet_credentials().scopes(),
        }
    }
}
