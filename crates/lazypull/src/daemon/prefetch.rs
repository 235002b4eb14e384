//! Prefetch: after a mount, fetching an image's data ahead of need — the
//! image's recorded prefetch order first (`lazypull optimize`: the ranges a
//! workload read, mapped to blob ranges and merged at register, see
//! `catalog::recorded`), stopping where it ends; then listed files, in the
//! order given; then (optionally) every data blob whole — at background
//! priority, on a thread of its own, so reads someone waits on always go
//! first.
//!
//! It owns the plan and its threads: every prefetch is registered in
//! [`Prefetches`], which stops (by a flag checked between pieces) and joins it
//! at the unmount of its image, at shutdown and at handover. The filling
//! itself is the transport's ([`Prefetch`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use lazypull_transport::Prefetch;
use tracing::{debug, info, warn};

use crate::catalog::ImageBlob;
use crate::control::PrefetchSpec;

/// One range of one data blob to fetch.
pub(crate) use crate::catalog::BlobRange as Span;

/// Largest piece filled at once: between pieces, foreground work can start.
const PIECE: u64 = 4 << 20;

/// The spans `spec` asks for of the image with data blobs `blobs` and the
/// meta blob at `meta_path`, in order. Unknown or non-regular paths are
/// reported in the returned warnings, not errors: prefetch is best effort.
pub(crate) fn plan(
    blobs: &[ImageBlob],
    meta_path: &Path,
    spec: &PrefetchSpec,
) -> anyhow::Result<(Vec<Span>, Vec<String>)> {
    let meta =
        std::fs::read(meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
    let image = lazypull_erofs::Image::from_bytes(meta)?;
    Ok(plan_spans(blobs, &image, spec))
}

/// The spans `spec` asks for of the image `meta` describes.
fn plan_spans(
    blobs: &[ImageBlob],
    meta: &lazypull_erofs::Image,
    spec: &PrefetchSpec,
) -> (Vec<Span>, Vec<String>) {
    let mut spans = Vec::new();
    let mut warnings = Vec::new();
    for path in &spec.paths {
        let inode = match meta.lookup(path.as_bytes()) {
            Ok(i) => i,
            Err(e) => {
                warnings.push(format!("prefetch path {path}: {e}"));
                continue;
            }
        };
        let Some(map) = &inode.chunks else {
            // Flat files live in the meta blob, which is local already.
            continue;
        };
        let extents = match map.extents(inode.size) {
            Ok(x) => x,
            Err(e) => {
                warnings.push(format!("prefetch path {path}: {e}"));
                continue;
            }
        };
        for x in extents {
            match blobs.get(usize::from(x.device_id).wrapping_sub(1)) {
                Some(b) => spans.push(Span {
                    blob: b.digest.clone(),
                    off: x.offset,
                    len: x.len,
                }),
                None => warnings.push(format!(
                    "prefetch path {path}: chunk on device {} which the image does not have",
                    x.device_id
                )),
            }
        }
    }
    if spec.all {
        for b in blobs {
            spans.push(Span {
                blob: b.digest.clone(),
                off: 0,
                len: b.size,
            });
        }
    }
    (spans, warnings)
}

/// How long the daemon's exit waits for prefetch threads to finish the
/// piece they are filling (a piece is at most [`PIECE`] bytes, a few range
/// requests).
const EXIT_BOUND: Duration = Duration::from_secs(30);

/// How long an unmount waits for them: less than `lazypull umount` waits for
/// its answer (10 s). A thread that has not stopped by then stays registered
/// (its flag raised) and is joined when it ends or at the daemon's exit.
const UNMOUNT_BOUND: Duration = Duration::from_secs(5);

/// The daemon's prefetch threads, each owned here until it is joined.
#[derive(Default)]
pub(crate) struct Prefetches {
    jobs: Mutex<Vec<Job>>,
}

struct Job {
    fsid: String,
    stop: Arc<AtomicBool>,
    done: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl Job {
    fn finished(&self) -> bool {
        *self.done.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the thread has finished, at most until `deadline`.
    fn wait_until(&self, deadline: Instant) -> bool {
        let mut done = self.done.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self
                .done
                .1
                .wait_timeout(done, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Marks its job finished when the thread ends, however it ends.
struct MarkDone(Arc<(Mutex<bool>, Condvar)>);

impl Drop for MarkDone {
    fn drop(&mut self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0 .1.notify_all();
    }
}

impl Prefetches {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills `spans` of image `fsid` through `prefetcher` on a thread of its
    /// own, registered here; failures are logged.
    pub(crate) fn start(
        &self,
        prefetcher: Arc<dyn Prefetch>,
        fsid: String,
        spans: Vec<Span>,
    ) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (fsid, stop, done) = (fsid.clone(), stop.clone(), done.clone());
            std::thread::Builder::new()
                .name("lazypull-prefetch".into())
                .spawn(move || {
                    let _done = MarkDone(done);
                    if let Err(e) = run(prefetcher.as_ref(), &fsid, &spans, &stop) {
                        warn!("{e:#}");
                    }
                })
                .context("starting the prefetch thread")?
        };
        let mut jobs = self.lock();
        reap(&mut jobs);
        jobs.push(Job {
            fsid,
            stop,
            done,
            thread,
        });
        Ok(())
    }

    /// The images being prefetched now (one entry per prefetch running).
    pub(crate) fn running(&self) -> Vec<String> {
        let mut jobs = self.lock();
        reap(&mut jobs);
        jobs.iter().map(|j| j.fsid.clone()).collect()
    }

    /// Stops and joins the prefetches of image `fsid` (it was unmounted).
    pub(crate) fn stop_image(&self, fsid: &str, why: &str) {
        let mine = {
            let mut jobs = self.lock();
            let (mine, others) = std::mem::take(&mut *jobs)
                .into_iter()
                .partition(|j| j.fsid == fsid);
            *jobs = others;
            mine
        };
        let stuck = stop(mine, why, UNMOUNT_BOUND);
        // Still owned: a later stop (shutdown) waits for them again.
        self.lock().extend(stuck);
    }

    /// Stops and joins every prefetch (the daemon exits); one that does not
    /// stop within the bound is logged and left to end with the process.
    pub(crate) fn stop_all(&self, why: &str) {
        let all = std::mem::take(&mut *self.lock());
        for j in stop(all, why, EXIT_BOUND) {
            warn!(fsid = %j.fsid, "prefetch thread still running as the daemon exits");
        }
    }
}

/// Joins the jobs whose threads have ended.
fn reap(jobs: &mut Vec<Job>) {
    let (ended, running): (Vec<Job>, Vec<Job>) =
        std::mem::take(jobs).into_iter().partition(Job::finished);
    *jobs = running;
    for j in ended {
        let _ = j.thread.join();
    }
}

/// Raises the stop flag of every job, then joins each within `bound`
/// overall; returns those that did not stop in time (logged).
fn stop(jobs: Vec<Job>, why: &str, bound: Duration) -> Vec<Job> {
    for j in &jobs {
        j.stop.store(true, Ordering::Release);
    }
    let deadline = Instant::now() + bound;
    let mut stuck = Vec::new();
    for j in jobs {
        if j.wait_until(deadline) {
            let _ = j.thread.join();
            debug!(fsid = %j.fsid, why, "prefetch thread joined");
        } else {
            warn!(
                fsid = %j.fsid,
                why,
                bound_secs = bound.as_secs(),
                "prefetch thread did not stop within the bound (a piece is still being fetched)"
            );
            stuck.push(j);
        }
    }
    stuck
}

/// Fills `spans` through the open objects, piece by piece, until done or
/// until `stop` is raised (checked before every piece). Windows already
/// filled are skipped by the engine, so overlapping spans cost nothing twice.
fn run(
    objects: &dyn Prefetch,
    fsid: &str,
    spans: &[Span],
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut written = 0u64;
    let mut failures = 0u64;
    for span in spans {
        let mut off = span.off;
        let end = span.off + span.len;
        while off < end {
            if stop.load(Ordering::Acquire) {
                info!(
                    %fsid,
                    bytes_written = written,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "prefetch stopped"
                );
                return Ok(written);
            }
            let len = (end - off).min(PIECE - off % PIECE);
            match objects.prefetch(&span.blob, off, len) {
                Ok(Some(out)) => written += out.bytes_written,
                Ok(None) => {
                    debug!(blob = %span.blob, "prefetch: the kernel has no object open for this blob; skipped");
                    break;
                }
                Err(e) => {
                    failures += 1;
                    warn!(blob = %span.blob, off, len, "prefetch piece failed (a later read will fetch it): {e}");
                }
            }
            off += len;
        }
    }
    info!(
        %fsid,
        bytes_written = written,
        failures,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "prefetch finished"
    );
    if failures > 0 {
        Err(anyhow::anyhow!("{failures} prefetch pieces failed")).context("prefetch")
    } else {
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazypull_engine::{FillError, FillOutcome};
    use lazypull_transport::BlobCacheInfo;

    /// A transport whose prefetch calls are counted and each wait for the
    /// test to let them through (one call per permit).
    #[derive(Default)]
    struct Gated {
        calls: Mutex<u64>,
        permits: Mutex<u64>,
        changed: Condvar,
    }

    impl Gated {
        fn calls(&self) -> u64 {
            *self.calls.lock().unwrap()
        }

        /// Waits until `n` calls have started.
        fn until_calls(&self, n: u64) {
            let mut c = self.calls.lock().unwrap();
            while *c < n {
                c = self.changed.wait(c).unwrap();
            }
        }

        fn permit(&self, n: u64) {
            *self.permits.lock().unwrap() += n;
            self.changed.notify_all();
        }
    }

    impl Prefetch for Gated {
        fn prefetch(&self, _: &str, _: u64, len: u64) -> Result<Option<FillOutcome>, FillError> {
            *self.calls.lock().unwrap() += 1;
            self.changed.notify_all();
            let mut p = self.permits.lock().unwrap();
            while *p == 0 {
                p = self.changed.wait(p).unwrap();
            }
            *p -= 1;
            Ok(Some(FillOutcome {
                bytes_written: len,
                ..FillOutcome::default()
            }))
        }

        fn blobs(&self) -> Vec<BlobCacheInfo> {
            Vec::new()
        }
    }

    /// Starts a prefetch of `fsid` that only a stop can end (2^28 pieces).
    fn endless(prefetches: &Prefetches, gated: &Arc<Gated>, fsid: &str) {
        let spans = vec![Span {
            blob: format!("{fsid}-blob"),
            off: 0,
            len: 1 << 50,
        }];
        prefetches.start(gated.clone(), fsid.into(), spans).unwrap();
    }

    /// Runs `stop` on a thread while letting pieces through one by one (the
    /// thread must reach its flag check), until `stop` has returned.
    fn stop_while_permitting(gated: &Gated, stop: impl FnOnce() + Send) {
        std::thread::scope(|s| {
            let stopper = s.spawn(stop);
            while !stopper.is_finished() {
                gated.permit(1);
                std::thread::yield_now();
            }
        });
    }

    #[test]
    fn a_stopped_prefetch_is_joined_and_fetches_no_more() {
        let gated = Arc::new(Gated::default());
        let prefetches = Prefetches::default();
        endless(&prefetches, &gated, "image-a");
        endless(&prefetches, &gated, "image-b");
        gated.until_calls(2);
        assert_eq!(prefetches.running(), ["image-a", "image-b"]);

        // An unmount of image-a: its endless prefetch ended (it could not
        // have otherwise) and was joined; image-b's runs on.
        stop_while_permitting(&gated, || prefetches.stop_image("image-a", "test"));
        assert_eq!(prefetches.running(), ["image-b"]);

        // The daemon's exit stops the rest; after it, no piece starts.
        stop_while_permitting(&gated, || prefetches.stop_all("test"));
        assert!(prefetches.running().is_empty());
        let calls = gated.calls();
        gated.permit(100);
        std::thread::yield_now();
        assert_eq!(gated.calls(), calls, "a stopped prefetch went on");
    }
}
