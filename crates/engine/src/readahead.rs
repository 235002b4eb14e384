//! Read-ahead straight into the cache: when a reader moves sequentially
//! through a blob, the windows after its position are filled into the cache
//! the kernel reads (a cachefiles object, a FUSE cache file) before it asks.
//!
//! * A [`Stream`] per open object (one per cachefiles object, one per FUSE
//!   blob file) watches the reads someone waits on and says when and what to
//!   read ahead ([`Stream::observe`]): a read is *sequential* when it starts
//!   in or right after the window where the previous one ended, or within
//!   what was read ahead already (with cachefiles the kernel never asks for
//!   what is filled, so the next READ comes where read-ahead stopped). From
//!   the second sequential read on, the stream keeps windows past the
//!   reader's furthest read filled or being filled: one window, doubling with
//!   each further sequential read, up to `distance` bytes. Any other read is
//!   random access: the stream stops reading ahead and cancels what it has
//!   queued ([`Stream::generation`]) until reads are sequential again.
//! * The windows go through [`fill_ahead`](crate::fill_ahead) at background
//!   priority, which skips windows filled or being filled (the fill map's
//!   claims), so nothing is fetched twice while it is cached, and a reader's
//!   own fill of a window read-ahead is about to write waits for that write
//!   rather than fetch it again.
//! * [`ReadAheadPool`] runs the jobs on a few threads of its own, with a
//!   bounded queue (a job that does not fit is dropped and counted): memory is
//!   bounded by the threads (each holds at most one announcement's units: the
//!   unit cache budget) and the queue (a job is a range, not data).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::warn;

/// How far ahead of a sequential reader the cache is filled, by default.
pub const DEFAULT_READAHEAD: u64 = 8 << 20;

/// Read-ahead jobs waiting at most, per pool.
const QUEUE: usize = 64;

/// What one open object's reader has been doing.
#[derive(Debug, Default)]
pub struct Stream {
    state: Mutex<StreamState>,
    generation: AtomicU64,
}

#[derive(Debug, Default)]
struct StreamState {
    /// A read was seen.
    started: bool,
    /// End of the furthest read of the current sequential run.
    last_end: u64,
    /// Read-ahead asked for up to here (0: none).
    ahead_to: u64,
    /// Sequential reads in a row.
    sequential: u32,
}

/// What to read ahead: `[off, off + len)`, for the stream's `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ahead {
    pub off: u64,
    pub len: u64,
    pub generation: u64,
}

impl Ahead {
    /// This range cut into jobs of at most `job` bytes (a multiple of the
    /// window): the read-ahead threads then work on several at once, and a
    /// reader that catches up waits for one job's fetch, not for the whole
    /// distance.
    pub fn split(&self, job: u64) -> impl Iterator<Item = Ahead> + '_ {
        let job = job.max(1);
        let end = self.off + self.len;
        (self.off..end).step_by(job as usize).map(move |off| Ahead {
            off,
            len: job.min(end - off),
            generation: self.generation,
        })
    }
}

/// Windows per read-ahead job (see [`Ahead::split`]): two, so a job's units
/// still go out in one request and decode on two cores.
pub const JOB_WINDOWS: u64 = 2;

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read someone waits on, of `[off, off + len)` of an object of
    /// `size` filled in `window`s: returns what to read ahead now, if
    /// anything (`distance` 0 turns read-ahead off).
    pub fn observe(
        &self,
        off: u64,
        len: u64,
        size: u64,
        window: u64,
        distance: u64,
    ) -> Option<Ahead> {
        let end = off.saturating_add(len).min(size);
        let mut st = self.lock();
        let reach = st.last_end.max(st.ahead_to).saturating_add(window);
        let sequential = st.started && off >= st.last_end.saturating_sub(window) && off <= reach;
        st.started = true;
        if !sequential {
            if st.ahead_to > 0 {
                // Random access: what is queued for this stream is dropped.
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            st.sequential = 0;
            st.ahead_to = 0;
            st.last_end = end;
            return None;
        }
        st.sequential += 1;
        st.last_end = st.last_end.max(end);
        if distance == 0 {
            return None;
        }
        // Ramp up, as the kernel's own read-ahead does: one window ahead
        // after the second sequential read, doubling with each further one up
        // to `distance`. A short sequential run (a small file, the first
        // pages of a library the loader then leaves) costs a window or two,
        // not the whole distance; a long stream reaches it in a few reads.
        let ramp = window.saturating_mul(1 << (st.sequential - 1).min(32));
        let distance = distance.min(ramp);
        let from = st.last_end.next_multiple_of(window).max(st.ahead_to);
        let to = st
            .last_end
            .next_multiple_of(window)
            .saturating_add(distance)
            .min(size);
        if from >= to {
            return None;
        }
        st.ahead_to = to;
        Some(Ahead {
            off: from,
            len: to - from,
            generation: self.generation.load(Ordering::Acquire),
        })
    }

    /// Bumped on random access and on [`cancel`](Self::cancel): read-ahead
    /// asked for under an older generation is not done.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Drops whatever read-ahead is queued or running for this stream (the
    /// object is closed).
    pub fn cancel(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.lock().ahead_to = 0;
    }

    /// Whether read-ahead asked for under `generation` is stale.
    pub fn is_stale(&self, generation: u64) -> bool {
        self.generation() != generation
    }
}

/// Counters of read-ahead, shared by a transport and its pool.
#[derive(Debug, Default)]
pub struct ReadAheadStats {
    /// Read-ahead jobs queued.
    pub jobs: AtomicU64,
    /// Jobs dropped: the queue was full, or the pool stopped.
    pub dropped: AtomicU64,
}

type Job = Box<dyn FnOnce(&AtomicBool) + Send>;

/// A few threads that run read-ahead jobs, with a bounded queue. The owner
/// (a transport's server) stops and joins them with [`stop`](Self::stop)
/// (also on drop); a job gets the pool's stop flag to check between windows.
pub struct ReadAheadPool {
    tx: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    pub stats: ReadAheadStats,
}

impl std::fmt::Debug for ReadAheadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAheadPool").finish_non_exhaustive()
    }
}

impl ReadAheadPool {
    /// Starts `threads` (at least 1) threads named `lazypull-ra-N`.
    pub fn start(threads: usize) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let stopping = stopping.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lazypull-ra-{i}"))
                .spawn(move || run(&rx, &stopping));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The threads started so far end when the sender drops.
                    drop(tx);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(ReadAheadPool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
            stopping,
            stats: ReadAheadStats::default(),
        }))
    }

    /// Queues `job`; false (and counted as dropped) when the queue is full or
    /// the pool is stopping. Never blocks.
    pub fn submit(&self, job: impl FnOnce(&AtomicBool) + Send + 'static) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sent = match tx.as_ref() {
            Some(tx) => match tx.try_send(Box::new(job)) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        let counter = if sent {
            &self.stats.jobs
        } else {
            &self.stats.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        sent
    }

    /// Stops the threads (jobs running see the stop flag; queued ones are
    /// dropped) and joins them. Blocks: call it off any async task.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            if t.join().is_err() {
                warn!("a read-ahead thread panicked");
            }
        }
    }
}

impl Drop for ReadAheadPool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(rx: &Mutex<Receiver<Job>>, stopping: &AtomicBool) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else {
            return; // the pool stopped
        };
        if stopping.load(Ordering::Acquire) {
            continue; // drain without running
        }
        // A panicking job (a bug) must not take the thread with it.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(stopping))).is_err() {
            warn!("a read-ahead job panicked (a bug); its windows stay unfilled");
        }
    }
}

/// Threads for decoding and read-ahead: the machine's cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 1 << 20;

    #[test]
    fn sequential_reads_start_read_ahead_and_random_access_stops_it() {
        let s = Stream::default();
        let size = 100 * W;
        // The first read alone is not a stream yet.
        assert_eq!(s.observe(0, 128 << 10, size, W, 8 * W), None);
        // The next one, where it ended: one window ahead (the ramp's start).
        let a = s.observe(128 << 10, 128 << 10, size, W, 8 * W).unwrap();
        assert_eq!((a.off, a.len), (W, W));
        // Each further sequential read doubles how far ahead, adding only
        // what is new.
        let b = s.observe(256 << 10, 128 << 10, size, W, 8 * W).unwrap();
        assert_eq!((b.off, b.len), (2 * W, W));
        // With cachefiles the next READ comes where read-ahead stopped.
        let c = s.observe(3 * W, W, size, W, 8 * W).unwrap();
        assert_eq!((c.off, c.len), (4 * W, 4 * W));
        let d = s.observe(8 * W, W, size, W, 8 * W).unwrap();
        assert_eq!((d.off, d.len), (9 * W, 8 * W));
        // The distance caps the ramp.
        let e = s.observe(17 * W, W, size, W, 8 * W).unwrap();
        assert_eq!((e.off, e.len), (18 * W, 8 * W));
        let g = s.generation();
        assert!(!s.is_stale(e.generation));
        // A jump: random access. Read-ahead stops and what was asked is stale.
        assert_eq!(s.observe(60 * W, 4096, size, W, 8 * W), None);
        assert!(s.is_stale(g));
        // A backwards jump is random too; then sequential again from there,
        // ramping up from one window again.
        assert_eq!(s.observe(30 * W, 4096, size, W, 8 * W), None);
        let f = s.observe(30 * W + 4096, 4096, size, W, 8 * W).unwrap();
        assert_eq!((f.off, f.len), (31 * W, W));
        let whole = Ahead {
            off: 31 * W,
            len: 8 * W,
            generation: f.generation,
        };
        let parts: Vec<_> = whole.split(2 * W).map(|a| (a.off, a.len)).collect();
        assert_eq!(
            parts,
            [
                (31 * W, 2 * W),
                (33 * W, 2 * W),
                (35 * W, 2 * W),
                (37 * W, 2 * W)
            ]
        );
        // Never past the end of the object.
        let s = Stream::default();
        s.observe(97 * W, 10, size, W, 8 * W);
        let e = s.observe(98 * W, 10, size, W, 8 * W).unwrap();
        assert_eq!((e.off, e.len), (99 * W, W));
        assert_eq!(s.observe(99 * W, 10, size, W, 8 * W), None);
        // Distance 0: off.
        let s = Stream::default();
        s.observe(0, 10, size, W, 0);
        assert_eq!(s.observe(10, 10, size, W, 0), None);
    }

    #[test]
    fn the_pool_runs_jobs_and_stops() {
        let pool = ReadAheadPool::start(2).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        for _ in 0..10 {
            let done = done.clone();
            while !pool.submit({
                let done = done.clone();
                move |_| {
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }) {
                std::thread::yield_now();
            }
        }
        while done.load(Ordering::SeqCst) < 10 {
            std::thread::yield_now();
        }
        pool.stop();
        assert!(!pool.submit(|_| {}), "a stopped pool takes no job");
        assert_eq!(pool.stats.jobs.load(Ordering::Relaxed), 10);
    }
}
