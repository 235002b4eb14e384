//! Bringing back, in the background, the images a previous daemon served
//! that could not be registered again at start (a registry outage during a
//! restart, say). They stay in the state file and in `lazypull status`
//! meanwhile (see `Catalog::restore`); one thread retries them with backoff
//! until each is back, and is stopped and joined at shutdown and handover.
//!
//! It owns that thread; the registering is the catalog's.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::info;

use crate::catalog::Catalog;

/// First wait before a retry; doubled after each round that leaves images
/// unrestored, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The retrying thread. Dropping it stops the thread and joins it (a round
/// under way finishes first: registering is bounded by the request timeouts).
pub(crate) struct Retrier {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Retrier {
    /// Starts retrying if the catalog has images to bring back.
    pub(crate) fn start(catalog: Arc<Catalog>) -> std::io::Result<Option<Retrier>> {
        if catalog.restoring().is_empty() {
            return Ok(None);
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lazypull-restore".into())
            .spawn(move || {
                let mut wait = FIRST_BACKOFF;
                loop {
                    match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Asked to stop, or the owner is gone.
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let (restored, left) = catalog.retry_restoring();
                    if left == 0 {
                        info!(restored, "every image a previous daemon served is back");
                        return;
                    }
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            })?;
        Ok(Some(Retrier {
            stop: Some(stop),
            thread: Some(thread),
        }))
    }
}

impl Drop for Retrier {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
