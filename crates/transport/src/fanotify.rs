//! The fanotify pre-content transport (Linux 6.14+): data blobs are sparse
//! cache files on a local file system, EROFS mounts them file-backed as
//! `device=` files, and a read of a range not filled yet raises a
//! `FAN_PRE_ACCESS` event that this server answers after filling the range
//! (fetched and verified by the engine, exactly as for FUSE). Warm reads
//! never leave the kernel.
//!
//! Failing closed: the group fd is meant to be parked in the fd store (so the
//! kernel never allows pending events by itself when the daemon dies), every
//! event is recorded in a journal before it is filled, and a successor calls
//! [`FanotifyServer::recover`] before it serves: recorded events are filled and
//! allowed, every other pending event denied with EIO
//! (`lazypull_fanotify::journal`). A fill that fails is denied with EIO:
//! readers get the right bytes or EIO, never a hole's zeros.
//!
//! Kernel behaviour relied on (shown by `lazypull-fanotify`'s tests): the
//! kernel decides at open whether a file raises pre-content events, so each
//! cache file is opened (by [`CacheFile`], which writes through that fd) before
//! its mark is added, and EROFS opens it after; writes through the early fd
//! raise no event. A blob that is complete is not marked.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lazypull_engine::local_cache::CacheFile;
use lazypull_engine::FillPolicy;
use lazypull_fanotify::group::Pending;
use lazypull_fanotify::journal::{self, Journal, Record, Recovered};
use lazypull_fanotify::{Group, Response};
use lazypull_source::{BlobSource, Priority};
use rustix::event::{PollFd, PollFlags};
use tracing::{debug, error, warn};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the cache files live (a file system with pre-content events:
    /// ext4, xfs, btrfs; not tmpfs).
    pub cache_dir: PathBuf,
    pub policy: FillPolicy,
    /// Threads reading and answering events.
    pub threads: usize,
    /// The journal of events being served (in the run directory).
    pub journal: PathBuf,
    /// How far ahead of a sequential reader of a blob its cache file is
    /// filled, in bytes (0: no read-ahead), as for FUSE.
    pub readahead: u64,
    /// The cache's byte budget (`cache_limit`), if any. Under one, every
    /// cache file stays marked, complete or not (an evicted window must
    /// raise an event again), and windows are evicted only once idle for
    /// the budget's `min_idle` ([`EVICT_MIN_IDLE`]).
    pub budget: Option<Arc<lazypull_engine::CacheBudget>>,
}

/// How long a window of a fanotify cache file must have gone unread before
/// it may be evicted. An event's response lets the kernel go on with the
/// read, which then reads the cache file with no lock of ours held: a
/// window punched in between would read as zeros. Nothing in the kernel
/// tells when that read is done, so eviction leaves every window alone
/// for this long after its last event (a read allowed a tenth of a second
/// ago has long copied its pages), and never touches a window an event is
/// being answered for (it is pinned from the fill to the response).
pub const EVICT_MIN_IDLE: Duration = Duration::from_millis(100);

/// Counters of the server.
#[derive(Debug, Default)]
pub struct Stats {
    pub events: AtomicU64,
    pub filled_bytes: AtomicU64,
    pub denied: AtomicU64,
    /// Bytes filled by prefetch (also in `filled_bytes`).
    pub prefetched_bytes: AtomicU64,
    /// Blobs whose mark was removed once complete.
    pub unmarked_blobs: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Pre-content events answered (each a read of a range not filled yet).
    pub events: u64,
    pub filled_bytes: u64,
    /// Events answered EIO (a fill that failed).
    pub denied: u64,
    pub prefetched_bytes: u64,
    pub unmarked_blobs: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            events: g(&self.events),
            filled_bytes: g(&self.filled_bytes),
            denied: g(&self.denied),
            prefetched_bytes: g(&self.prefetched_bytes),
            unmarked_blobs: g(&self.unmarked_blobs),
        }
    }
}

struct Blob {
    cache: Arc<CacheFile>,
    source: Arc<dyn BlobSource>,
    /// Its mark is gone (see [`FanotifyServer::unmark_if_complete`]).
    unmarked: AtomicBool,
    /// The reader's pattern, for read-ahead.
    stream: lazypull_engine::Stream,
}

/// The server: one group, the blobs it fills, its threads.
pub struct FanotifyServer {
    group: Group,
    config: Config,
    /// Blobs by the (device, inode) of their cache file: how an event's fd
    /// is matched to its blob.
    by_inode: Mutex<HashMap<(u64, u64), Arc<Blob>>>,
    journal: Mutex<Journal>,
    inherited: Mutex<Vec<Record>>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Cache files a predecessor opened before marking them, by blob name
    /// (see [`hand_in_files`](Self::hand_in_files)).
    handed: Mutex<HashMap<String, OwnedFd>>,
    /// Where each new cache file's fd is parked for a successor.
    park: Mutex<Option<ParkHook>>,
    /// Fills ahead of sequential readers while serving (started by
    /// [`serve`](Self::serve), stopped and joined by [`stop`](Self::stop)).
    readahead: Mutex<Option<Arc<lazypull_engine::ReadAheadPool>>>,
    pub stats: Stats,
    /// Whether the cache file system refuses writes now (logged once per episode).
    write_trouble: lazypull_engine::WriteTrouble,
}

/// Parks a blob's cache file fd (named by the blob) where a successor finds
/// it: the daemon's fd store.
pub type ParkHook = Box<dyn Fn(&str, std::os::fd::BorrowedFd<'_>) -> io::Result<()> + Send + Sync>;

impl std::fmt::Debug for FanotifyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanotifyServer")
            .field("cache_dir", &self.config.cache_dir)
            .finish_non_exhaustive()
    }
}

fn inode_of(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

impl FanotifyServer {
    /// A server on a new group, or on `adopted` (a predecessor's group from
    /// the fd store). The predecessor's unfinished events are read from the
    /// journal; register the blobs again, then call [`recover`](Self::recover)
    /// before [`serve`](Self::serve).
    pub fn new(config: Config, adopted: Option<OwnedFd>) -> io::Result<Arc<FanotifyServer>> {
        let group = match adopted {
            Some(fd) => Group::from_fd(fd),
            None => Group::new(true)?,
        };
        let (journal, inherited) = Journal::open(&config.journal).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the event journal {}: {e}", config.journal.display()),
            )
        })?;
        Ok(Arc::new(FanotifyServer {
            group,
            config,
            by_inode: Mutex::new(HashMap::new()),
            journal: Mutex::new(journal),
            inherited: Mutex::new(inherited),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            handed: Mutex::new(HashMap::new()),
            park: Mutex::new(None),
            readahead: Mutex::new(None),
            stats: Stats::default(),
            write_trouble: lazypull_engine::WriteTrouble::default(),
        }))
    }

    /// Has every cache file this server opens from now on parked by `hook`
    /// (before it is marked): a successor must write through an fd opened
    /// before the mark, as one opened after it raises events of its own,
    /// and must fill the very inode the mounts read (a new file would leave
    /// their holes unfilled).
    pub fn set_park_hook(&self, hook: ParkHook) {
        *self.park.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// The cache files a predecessor parked, by blob name: [`add_blob`]
    /// serves a blob handed in from that same open file.
    ///
    /// [`add_blob`]: Self::add_blob
    pub fn hand_in_files(&self, files: Vec<(String, OwnedFd)>) {
        self.handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(files);
    }

    /// Checks that the cache directory's file system allows pre-content
    /// marks (ext4, xfs, btrfs do; tmpfs does not): a probe file is marked
    /// and unmarked, so a daemon that cannot serve says so when it starts,
    /// not at its first mount.
    pub fn probe(&self) -> io::Result<()> {
        let probe = self.config.cache_dir.join(".fanotify-probe");
        std::fs::write(&probe, b"")
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", probe.display())))?;
        let marked = self
            .group
            .mark_pre_access(&probe)
            .and_then(|()| self.group.unmark(&probe));
        let _ = std::fs::remove_file(&probe);
        marked
    }

    /// A dup of the group fd, to park in the fd store.
    pub fn group_fd(&self) -> io::Result<OwnedFd> {
        self.group.as_fd().try_clone_to_owned()
    }

    /// Serves blob `source` (verified under chunk table `binding`): opens
    /// its cache file, marks it unless complete, and returns the path EROFS
    /// is to mount as its `device=`.
    pub fn add_blob(&self, source: Arc<dyn BlobSource>, binding: [u8; 32]) -> io::Result<PathBuf> {
        // Held while the blob is set up (a blocking thread; a file open and
        // a mark): two mounts of images sharing a blob get one cache file
        // and one fill map.
        let mut blobs = self.by_inode.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = blobs.values().find(|b| b.cache.name() == source.name()) {
            return Ok(b.cache.data_path().to_path_buf());
        }
        let handed = self
            .handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source.name());
        let (dir, name, size, policy) = (
            &self.config.cache_dir,
            source.name(),
            source.size(),
            self.config.policy,
        );
        let budget = self.config.budget.as_ref();
        let cache = match handed {
            // The predecessor's open file: the inode the mounts read, and
            // an fd that raises no events.
            Some(fd) => CacheFile::adopt_under(
                budget,
                dir,
                name,
                size,
                policy,
                binding,
                std::fs::File::from(fd),
            )?,
            None => {
                let cache = CacheFile::open_under(budget, dir, name, size, policy, binding)?;
                if self.needs_mark(&cache) {
                    if let Some(park) = &*self.park.lock().unwrap_or_else(|p| p.into_inner()) {
                        park(source.name(), cache.data_file().as_fd()).map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("parking the cache file of {}: {e}", source.name()),
                            )
                        })?;
                    }
                }
                cache
            }
        };
        let path = cache.data_path().to_path_buf();
        let key = inode_of(cache.data_file())?;
        if self.needs_mark(&cache) {
            // After the open above, before any reader's: see the module doc.
            // (Marking a file marked already, by a predecessor's group that
            // is this one, changes nothing.)
            self.group.mark_pre_access(&path)?;
        }
        let unmarked = AtomicBool::new(!self.needs_mark(&cache));
        blobs.insert(
            key,
            Arc::new(Blob {
                cache,
                source,
                unmarked,
                stream: lazypull_engine::Stream::default(),
            }),
        );
        Ok(path)
    }

    /// Whether reads of `cache` must raise events: while it has holes, and
    /// always under a budget (eviction makes new holes).
    fn needs_mark(&self, cache: &CacheFile) -> bool {
        !cache.is_complete() || cache.is_budgeted()
    }

    /// The cache's budget, if it has one.
    pub fn budget(&self) -> Option<&Arc<lazypull_engine::CacheBudget>> {
        self.config.budget.as_ref()
    }

    fn blob_by_key(&self, key: &str) -> Option<Arc<Blob>> {
        let blobs = self.by_inode.lock().unwrap_or_else(|p| p.into_inner());
        blobs.values().find(|b| b.cache.name() == key).cloned()
    }

    /// Answers every event the predecessor left pending (see the module
    /// doc); `fd_limit` is the predecessor's fd limit.
    pub fn recover(&self, fd_limit: i32) -> io::Result<Recovered> {
        let inherited =
            std::mem::take(&mut *self.inherited.lock().unwrap_or_else(|p| p.into_inner()));
        let done = journal::recover(&self.group, &inherited, fd_limit, |r| {
            let blob = self.blob_by_key(&r.key).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("blob {} not registered", r.key),
                )
            })?;
            blob.cache
                .fill(
                    blob.source.as_ref(),
                    r.offset,
                    r.count,
                    Priority::Foreground,
                )
                .map(drop)
                .map_err(io::Error::other)
        })?;
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear()?;
        Ok(done)
    }

    /// Starts the threads that read and answer events.
    pub fn serve(self: &Arc<Self>) -> io::Result<()> {
        if self.config.readahead > 0 {
            *self.readahead.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(lazypull_engine::ReadAheadPool::start(
                    lazypull_engine::readahead::default_threads(),
                )?);
        }
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..self.config.threads.max(1) {
            let me = self.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("lazypull-fan-{i}"))
                    .spawn(move || me.run())?,
            );
        }
        Ok(())
    }

    /// Stops and joins the threads (events pending stay pending: the group
    /// lives on where it is parked).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        // No event thread queues read-ahead any more.
        let pool = self
            .readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(pool) = pool {
            pool.stop();
        }
    }

    fn run(&self) {
        let mut buf = vec![0u8; 16 << 10];
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(&self.group, PollFlags::IN)];
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    error!("fanotify: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let events = match self.group.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // A malformed read loses its events' ids: their readers
                    // wait until a successor denies them (see recover).
                    error!("fanotify: reading events: {e}");
                    continue;
                }
            };
            // Every event of the batch is recorded before any is filled:
            // killed while filling the first, this daemon leaves the others
            // to a successor as known events (filled and allowed) rather
            // than unknown ones (denied EIO).
            let targets: Vec<_> = events.iter().map(|p| self.record(p)).collect();
            for (p, target) in events.into_iter().zip(targets) {
                self.answer(p, target);
            }
        }
    }

    /// The blob and range an event asks for, recorded in the journal.
    fn record(&self, p: &Pending) -> io::Result<(Arc<Blob>, u64, u64)> {
        let ev = &p.event;
        if ev.is_overflow() {
            return Err(io::Error::other("an overflow event"));
        }
        let file = p
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("an event without an fd"))?;
        let key = inode_of(file)?;
        let blob = self
            .by_inode
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
            .ok_or_else(|| io::Error::other("an event on a file no blob is served from"))?;
        // Without a range (an older kernel's event): the whole blob.
        let (off, count) = ev.range.unwrap_or((0, blob.cache.size()));
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .begin(&Record {
                fd: ev.fd,
                offset: off,
                count,
                key: blob.cache.name().to_owned(),
            })?;
        Ok((blob, off, count))
    }

    fn answer(&self, p: Pending, target: io::Result<(Arc<Blob>, u64, u64)>) {
        let ev = &p.event;
        if ev.is_overflow() {
            // Overflows carry no fd; pre-content events are not dropped by
            // the kernel (they block instead), so there is nothing to answer.
            warn!("fanotify: the event queue overflowed");
            return;
        }
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let deny = |e: &dyn std::fmt::Display| {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            warn!(pid = ev.pid, range = ?ev.range, "fanotify: the read gets EIO: {e}");
            Response::DenyErrno(libc::EIO)
        };
        match target {
            Ok((blob, off, count)) => {
                // Queued before this event's own fill: the windows after it
                // are fetched while this one is.
                self.read_ahead(&blob, off, count);
                // Pinned until the response is written (see EVICT_MIN_IDLE).
                let filled = self.fill(&blob, off, count);
                let response = match &filled {
                    Ok(_) => Response::Allow,
                    Err(e) => deny(e),
                };
                self.respond(ev.fd, response);
                drop(filled);
            }
            Err(e) => {
                let response = deny(&e);
                self.respond(ev.fd, response);
            }
        }
    }

    /// Answers event `fd` and ends its journal record.
    fn respond(&self, fd: i32, response: Response) {
        if let Err(e) = self.group.respond(fd, response) {
            error!(fd, "fanotify: answering an event: {e}");
        }
        if let Err(e) = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .end(fd)
        {
            warn!("fanotify: journal: {e}");
        }
    }

    /// Queues the fill of what a sequential reader of `blob` reads next.
    fn read_ahead(&self, blob: &Arc<Blob>, off: u64, count: u64) {
        let (Some(ahead), _) =
            blob.cache
                .read_ahead_for(&blob.stream, off, count, self.config.readahead)
        else {
            return;
        };
        let Some(pool) = self
            .readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let window = blob.cache.policy().window;
        for ahead in ahead.split(lazypull_engine::readahead::JOB_WINDOWS * window) {
            let blob = blob.clone();
            pool.submit(move |stopping| {
                let cancelled =
                    || stopping.load(Ordering::Acquire) || blob.stream.is_stale(ahead.generation);
                if let Err(e) =
                    blob.cache
                        .fill_ahead(blob.source.as_ref(), ahead.off, ahead.len, &cancelled)
                {
                    debug!(
                        blob = blob.cache.name(),
                        "fanotify: read-ahead failed (an event for it fills it again): {e}"
                    );
                }
            });
        }
    }

    /// Fills `[off, off + count)` of `blob` (the event is recorded already)
    /// and pins it there until the returned guard drops. A fill that finds
    /// the file system full has the budget (if any) evict and tries again;
    /// failing that, the reader gets EIO (the bytes must be in the file).
    fn fill<'b>(
        &self,
        blob: &'b Blob,
        off: u64,
        count: u64,
    ) -> io::Result<lazypull_engine::Pinned<'b>> {
        let (out, pinned) = blob
            .cache
            .fill_pinned(blob.source.as_ref(), off, count, Priority::Foreground)
            .map_err(|e| {
                if let lazypull_engine::FillError::Write { source, .. } = &e {
                    self.write_trouble
                        .failed(source, "fanotify reads of ranges not cached may get EIO");
                }
                io::Error::other(e)
            })?;
        if out.bytes_written > 0 {
            self.write_trouble.succeeded();
            self.stats
                .filled_bytes
                .fetch_add(out.bytes_written, Ordering::Relaxed);
            debug!(
                blob = blob.cache.name(),
                off,
                count,
                bytes = out.bytes_written,
                "fanotify: filled"
            );
        }
        self.unmark_if_complete(blob);
        Ok(pinned)
    }

    /// A blob whose every byte is in its cache file needs no events any
    /// more: its fill map is persisted (a successor then finds it complete
    /// and does not mark it again), then its mark removed, so reads of it no
    /// longer wait for the daemon. Before the map is durable the mark stays:
    /// a successor must not find an unmarked file it believes has holes.
    fn unmark_if_complete(&self, blob: &Blob) {
        if self.needs_mark(&blob.cache) || blob.unmarked.swap(true, Ordering::AcqRel) {
            return;
        }
        let done = blob
            .cache
            .flush()
            .and_then(|()| self.group.unmark(blob.cache.data_path()));
        match done {
            Ok(()) => {
                self.stats.unmarked_blobs.fetch_add(1, Ordering::Relaxed);
                debug!(blob = blob.cache.name(), "fanotify: complete, mark removed");
            }
            Err(e) => {
                blob.unmarked.store(false, Ordering::Release);
                warn!(
                    blob = blob.cache.name(),
                    "fanotify: a complete blob keeps its mark: {e}"
                );
            }
        }
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.config.cache_dir
    }

    /// Blobs served whose cache file is not complete: mounts reading them
    /// need this group (or a successor holding it) to read right.
    pub fn incomplete_blobs(&self) -> Vec<String> {
        let blobs = self.by_inode.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = blobs
            .values()
            .filter(|b| self.needs_mark(&b.cache))
            .map(|b| b.cache.name().to_owned())
            .collect();
        v.sort();
        v
    }

    /// Persists every blob's fill map.
    pub fn flush(&self) {
        let blobs: Vec<Arc<Blob>> = self
            .by_inode
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for b in blobs {
            match b.cache.flush() {
                // A full disk is one episode, logged once.
                Err(e) if lazypull_engine::is_disk_full(&e) => self
                    .write_trouble
                    .failed(&e, "fanotify reads of ranges not cached may get EIO"),
                Err(e) => warn!(
                    blob = b.cache.name(),
                    "fanotify: persisting a fill map: {e}"
                ),
                Ok(()) => {}
            }
        }
    }
}

impl crate::Prefetch for FanotifyServer {
    fn prefetch(
        &self,
        blob: &str,
        off: u64,
        len: u64,
    ) -> Result<Option<lazypull_engine::FillOutcome>, lazypull_engine::FillError> {
        let Some(b) = self.blob_by_key(blob) else {
            return Ok(None);
        };
        let out = b
            .cache
            .fill(b.source.as_ref(), off, len, Priority::Background)?;
        self.stats
            .prefetched_bytes
            .fetch_add(out.bytes_written, Ordering::Relaxed);
        self.unmark_if_complete(&b);
        self.stats
            .filled_bytes
            .fetch_add(out.bytes_written, Ordering::Relaxed);
        Ok(Some(out))
    }

    fn blobs(&self) -> Vec<crate::BlobCacheInfo> {
        let blobs = self.by_inode.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<crate::BlobCacheInfo> = blobs
            .values()
            .map(|b| crate::BlobCacheInfo {
                blob: b.cache.name().to_owned(),
                size: b.cache.size(),
                cached_bytes: b.cache.cached_bytes(),
                source: b.source.source_stats(),
                local_file: false,
            })
            .collect();
        v.sort_by(|a, b| a.blob.cmp(&b.blob));
        v
    }
}
