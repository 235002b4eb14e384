//! The FUSE blob transport, for kernels without cachefiles on-demand mode.
//!
//! Every blob the daemon serves appears as a read-only file
//! `<mountpoint>/<name>` of a private FUSE mount (looked up by name through a
//! [`BlobResolver`]; the daemon's resolves only names it registered). The
//! mount and its files are root's only (no `allow_other`, files 0400): they
//! hold an image's raw bytes, also of files the image keeps from other users.
//! The kernel's EROFS then mounts an image *file-backed*: the meta blob's file
//! as the source, each data blob's file as a `device=` (Linux 6.12+,
//! `EROFS_FS_BACKED_BY_FILE`).
//!
//! A FUSE READ goes through the same engine as a cachefiles READ, into the
//! daemon's own [`CacheFile`] per blob (the kernel keeps no cache of its own
//! here beyond its page cache), and is answered from that file. Blobs that are
//! already complete local files (a meta blob fetched at mount, a plain blob in
//! a local blob dir) are read directly. Every READ is answered with exactly the
//! bytes asked for or an error: EROFS zero-fills short reads of its backing
//! file, so a short reply would hand the reader zeros.
//!
//! The connection can be handed over: [`FuseServer::session`] describes it
//! (negotiated protocol, node ids), and [`FuseServer::adopt`] serves an fd a
//! previous daemon set up, answering the requests it left unanswered: the
//! kernel re-queues them on `FUSE_NOTIFY_RESEND` (Linux 6.9+); before that,
//! the successor answers each from the previous daemon's request journal
//! ([`crate::fuse_journal`]), before it reads anything new.
//!
//! Like the cachefiles transport it contains no fetch logic and does not decide
//! where blobs live.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lazypull_engine::{CacheFile, FillError, FillOutcome, FillPolicy, ReadAheadPool, Stream};
use lazypull_fuse::abi::{self, init_flags, open_flags, FileAttr, InitOut, Operation};
use lazypull_fuse::device::Readiness;
use lazypull_fuse::{FuseDevice, ReplyPipe};
use lazypull_source::{BlobResolver, BlobSource, Priority};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::{fuse_journal, BlobCacheInfo, Prefetch};

/// How long the kernel may cache names and attributes: blobs are immutable
/// (named by digest), so long.
const TTL: Duration = Duration::from_secs(3600);

/// Settings of the FUSE transport.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the blob files appear (a private directory, e.g. /run/lazypull/blobs).
    pub mountpoint: PathBuf,
    /// `/dev/fuse`.
    pub device: PathBuf,
    /// The daemon's own cache: `<name>.data` + `<name>.map` per blob.
    pub cache_dir: PathBuf,
    /// Requests served at once (each a thread; see [`default_threads`]).
    pub threads: usize,
    /// How misses are widened (fill windows) and split.
    pub policy: FillPolicy,
    /// How often fill maps are persisted.
    pub flush_interval: Duration,
    /// How far ahead of a sequential reader of a blob file its cache file is
    /// filled, in bytes (0: no read-ahead; the daemon's default is
    /// [`lazypull_engine::DEFAULT_READAHEAD`], 8 MiB).
    pub readahead: u64,
    /// How a successor answers the requests a killed predecessor had read.
    pub recovery: Recovery,
    /// The byte budget of the cache (`cache_limit`), if any. Under one,
    /// complete cache files are never handed out to be read directly (see
    /// [`FuseBlobs::complete_file`]): every read passes through this server,
    /// which pins what it reads, so any window can be evicted safely.
    pub budget: Option<Arc<lazypull_engine::CacheBudget>>,
}

/// How a successor answers what its predecessor read and did not answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recovery {
    /// `FUSE_NOTIFY_RESEND` where the kernel has it (6.9+), else the journal.
    #[default]
    Auto,
    /// Always from the journal (what kernels before 6.9 get; to test that
    /// path on a newer kernel).
    Journal,
}

/// The request journal of a server with this cache dir.
pub fn journal_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("requests.journal")
}

/// Uniques either side of a journal's high-water mark that a successor
/// probes for requests read but never journalled (the daemon was killed
/// between its `read` and its journal write). The kernel hands out uniques
/// in steps of 2 (`FUSE_REQ_ID_STEP`) at queue time, and a killed daemon's
/// unjournalled reads are its last ones, each thread's at most one: they
/// lie within a few hundred of the mark; this is generous.
const PROBE_SPAN: u64 = 4096;

/// Serving threads for this machine: two per core (a READ's thread mostly
/// waits, on a fetch or the disk, while others decode), at least 4 and at
/// most 16. Each idle thread costs its stack and a request buffer, never a
/// reply buffer (see [`BufPool`]).
pub fn default_threads() -> usize {
    (lazypull_engine::readahead::default_threads() * 2).clamp(4, 16)
}

/// Reply buffers kept for reuse when no serving thread needs one: READs that
/// are not spliced (see `BlobFs::answer_read`) take a buffer from the pool
/// and give it back, so idle threads hold none.
const IDLE_REPLY_BUFFERS: usize = 2;

/// A bounded pool of reply buffers. A buffer taken when none is idle is
/// allocated; one given back when `max_idle` are idle is freed. So at most
/// `max_idle` buffers outlive the READs that used them.
#[derive(Debug)]
struct BufPool {
    idle: Mutex<Vec<Vec<u8>>>,
    max_idle: usize,
}

impl BufPool {
    fn new(max_idle: usize) -> Self {
        BufPool {
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// A buffer of `len` bytes (contents unspecified).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(buf);
        }
    }

    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.iter().map(Vec::capacity).sum()
    }
}

/// Counters of the FUSE transport.
#[derive(Debug, Default)]
pub struct Stats {
    pub lookups: AtomicU64,
    pub lookup_failures: AtomicU64,
    pub opens: AtomicU64,
    pub reads: AtomicU64,
    pub read_failures: AtomicU64,
    /// Bytes answered to READs.
    pub bytes_read: AtomicU64,
    /// Bytes written into cache files (fetched, verified).
    pub bytes_written: AtomicU64,
    pub windows_written: AtomicU64,
    pub prefetched_bytes: AtomicU64,
    pub malformed: AtomicU64,
    pub unknown_nodes: AtomicU64,
    /// Bytes written into cache files by read-ahead (also in `bytes_written`).
    pub readahead_bytes: AtomicU64,
    /// Of those, bytes of windows no READ has touched (yet): a window read
    /// ahead counts here until the first READ of any byte of it. Signed: a
    /// READ can touch a window before its read-ahead job has counted it.
    pub readahead_unused: AtomicI64,
    /// Read-ahead jobs that failed (the windows stay unfilled; a READ of
    /// them fetches them itself) or were dropped (queue full).
    pub readahead_failures: AtomicU64,
    pub readahead_dropped: AtomicU64,
    /// READs answered by splicing the bytes from a file (the cache file or a
    /// complete local blob) to the kernel: no copy through the daemon.
    pub spliced_reads: AtomicU64,
    /// READs that could not be spliced (no pipe, a splice error) and were
    /// answered from a buffer instead.
    pub splice_fallbacks: AtomicU64,
    /// Requests a previous daemon had read and not answered, answered by
    /// this one from its journal.
    pub recovered_requests: AtomicU64,
    /// Of those, and of requests it had not even journalled, the ones
    /// answered EIO because what they asked was not recorded.
    pub recovered_unknown: AtomicU64,
    /// READs answered straight from the source, not cached: the cache had
    /// no room (its budget all in use) or its file system refused the write.
    pub uncached_reads: AtomicU64,
    /// Whether the cache refuses writes now (logged once per episode).
    pub write_trouble: lazypull_engine::WriteTrouble,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub lookups: u64,
    pub lookup_failures: u64,
    pub opens: u64,
    pub reads: u64,
    pub read_failures: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub windows_written: u64,
    pub prefetched_bytes: u64,
    pub malformed: u64,
    pub unknown_nodes: u64,
    pub readahead_bytes: u64,
    pub readahead_unused_bytes: u64,
    pub readahead_failures: u64,
    pub readahead_dropped: u64,
    pub spliced_reads: u64,
    pub splice_fallbacks: u64,
    pub recovered_requests: u64,
    pub recovered_unknown: u64,
    pub uncached_reads: u64,
    /// Runs of refused cache writes (a full disk) so far, and whether one is on.
    pub cache_full_episodes: u64,
    pub cache_full_now: bool,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            lookups: g(&self.lookups),
            lookup_failures: g(&self.lookup_failures),
            opens: g(&self.opens),
            reads: g(&self.reads),
            read_failures: g(&self.read_failures),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            windows_written: g(&self.windows_written),
            prefetched_bytes: g(&self.prefetched_bytes),
            malformed: g(&self.malformed),
            unknown_nodes: g(&self.unknown_nodes),
            readahead_bytes: g(&self.readahead_bytes),
            readahead_unused_bytes: self.readahead_unused.load(Ordering::Relaxed).max(0) as u64,
            readahead_failures: g(&self.readahead_failures),
            readahead_dropped: g(&self.readahead_dropped),
            spliced_reads: g(&self.spliced_reads),
            splice_fallbacks: g(&self.splice_fallbacks),
            recovered_requests: g(&self.recovered_requests),
            recovered_unknown: g(&self.recovered_unknown),
            uncached_reads: g(&self.uncached_reads),
            cache_full_episodes: self.write_trouble.episodes(),
            cache_full_now: self.write_trouble.is_failing(),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// What a successor needs to serve this connection without a new `FUSE_INIT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Negotiated protocol minor version.
    pub minor: u32,
    /// Flags the kernel offered at INIT.
    pub kernel_flags: u64,
    /// Largest READ the kernel will send (max_pages × page size).
    pub max_read: u32,
    /// Node ids the kernel knows, with their blob names and lookup counts.
    pub nodes: Vec<SessionNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionNode {
    pub id: u64,
    pub name: String,
    pub lookups: u64,
}

/// How a blob's bytes are read.
enum Store {
    /// A complete local file of the blob: read directly.
    Direct(File),
    /// Filled on demand into the daemon's cache.
    Cached(Arc<CacheFile>),
}

struct Node {
    id: u64,
    name: String,
    source: Arc<dyn BlobSource>,
    store: Store,
    lookups: AtomicU64,
    /// The reader's pattern, for read-ahead.
    stream: Stream,
}

impl Node {
    fn attr(&self) -> FileAttr {
        let size = self.source.size();
        FileAttr {
            ino: self.id,
            size,
            blocks: size.div_ceil(512),
            // Raw image bytes, also of files the image keeps from other
            // users: root's only (the mount has no `allow_other` either).
            mode: libc::S_IFREG | 0o400,
            nlink: 1,
            blksize: 4096,
            ..FileAttr::default()
        }
    }

    /// The kernel got one more reference to this node (a LOOKUP answered).
    /// Done outside the nodes lock: it races with [`BlobFs::forget`].
    fn referenced(&self) {
        self.lookups.fetch_add(1, Ordering::AcqRel);
    }

    fn cached_bytes(&self) -> u64 {
        match &self.store {
            Store::Direct(_) => self.source.size(),
            Store::Cached(c) => c.cached_bytes(),
        }
    }
}

#[derive(Default)]
struct Nodes {
    by_id: HashMap<u64, Arc<Node>>,
    by_name: HashMap<String, u64>,
    /// Ids a previous daemon handed out, resolved on first use.
    adopted: HashMap<u64, SessionNode>,
    next_id: u64,
}

/// The file system: shared by the serving threads and by prefetch/status.
struct BlobFs {
    resolver: Arc<dyn BlobResolver>,
    config: Config,
    nodes: RwLock<Nodes>,
    session: Mutex<Option<Session>>,
    stats: Arc<Stats>,
    /// Runs read-ahead while serving (set by [`FuseServer::serve`], which
    /// stops and joins it).
    readahead: RwLock<Option<Arc<ReadAheadPool>>>,
    /// Reply buffers of READs that are not spliced.
    buffers: BufPool,
    /// Called when a new node id is handed out, before the kernel hears it
    /// (see [`FuseServer::on_new_node`]).
    on_new_node: RwLock<Option<NodeHook>>,
}

/// Persists the session when a LOOKUP creates a node (see
/// [`FuseServer::on_new_node`]).
pub type NodeHook = Arc<dyn Fn() + Send + Sync>;

/// What one serving thread keeps between requests.
struct WorkerState {
    /// The pipe this thread splices READ replies through; None until the
    /// first READ, and again after an error (the next READ makes a new one).
    pipe: Option<ReplyPipe>,
    /// Set when no pipe could be made: this thread answers from buffers.
    no_splice: bool,
}

impl WorkerState {
    fn new() -> Self {
        WorkerState {
            pipe: None,
            no_splice: false,
        }
    }
}

fn root_attr() -> FileAttr {
    FileAttr {
        ino: abi::ROOT_ID,
        mode: libc::S_IFDIR | 0o500,
        nlink: 2,
        blksize: 4096,
        ..FileAttr::default()
    }
}

impl BlobFs {
    fn new(resolver: Arc<dyn BlobResolver>, config: Config, session: Option<Session>) -> Self {
        let mut nodes = Nodes {
            next_id: abi::ROOT_ID + 1,
            ..Nodes::default()
        };
        if let Some(s) = &session {
            for n in &s.nodes {
                nodes.next_id = nodes.next_id.max(n.id + 1);
                nodes.adopted.insert(n.id, n.clone());
            }
        }
        BlobFs {
            resolver,
            config,
            nodes: RwLock::new(nodes),
            session: Mutex::new(session),
            stats: Arc::default(),
            readahead: RwLock::new(None),
            buffers: BufPool::new(IDLE_REPLY_BUFFERS),
            on_new_node: RwLock::new(None),
        }
    }

    fn read_nodes(&self) -> std::sync::RwLockReadGuard<'_, Nodes> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_nodes(&self) -> std::sync::RwLockWriteGuard<'_, Nodes> {
        self.nodes.write().unwrap_or_else(|p| p.into_inner())
    }

    fn open_store(&self, name: &str, source: &Arc<dyn BlobSource>) -> io::Result<Store> {
        if let Some(path) = source.local_path() {
            let file = File::open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
            })?;
            if file.metadata()?.len() == source.size() {
                return Ok(Store::Direct(file));
            }
        }
        // The cache is named by the blob, but reused only under the same
        // chunk table: another image may declare the name with another table.
        let binding = source
            .content_binding()
            .unwrap_or(lazypull_engine::NO_BINDING);
        Ok(Store::Cached(CacheFile::open_under(
            self.config.budget.as_ref(),
            &self.config.cache_dir,
            name,
            source.size(),
            self.config.policy,
            binding,
        )?))
    }

    /// The node serving `name`, resolving the blob if it has none yet.
    fn node_by_name(&self, name: &[u8]) -> Result<Arc<Node>, i32> {
        if let Ok(s) = std::str::from_utf8(name) {
            let nodes = self.read_nodes();
            if let Some(node) = nodes.by_name.get(s).and_then(|id| nodes.by_id.get(id)) {
                return Ok(node.clone());
            }
        }
        let source = self.resolver.resolve(b"fuse", name).map_err(|e| {
            if e.errno() == libc::ENOENT {
                debug!("LOOKUP: {e}");
            } else {
                warn!("LOOKUP refused: {e}");
            }
            e.errno()
        })?;
        let name = source.name().to_owned();
        let store = self.open_store(&name, &source).map_err(|e| {
            error!(blob = %name, "cannot set up the cache of a blob: {e}");
            e.raw_os_error().unwrap_or(libc::EIO)
        })?;
        let mut nodes = self.write_nodes();
        if let Some(node) = nodes.by_name.get(&name).and_then(|id| nodes.by_id.get(id)) {
            return Ok(node.clone()); // another thread won the race
        }
        let adopted = nodes
            .adopted
            .iter()
            .find(|(_, n)| n.name == name)
            .map(|(&id, n)| (id, n.lookups));
        let (id, lookups) = match adopted {
            Some((id, lookups)) => {
                nodes.adopted.remove(&id);
                (id, lookups)
            }
            None => {
                let id = nodes.next_id;
                nodes.next_id += 1;
                (id, 0)
            }
        };
        let node = Arc::new(Node {
            id,
            name: name.clone(),
            source,
            store,
            lookups: AtomicU64::new(lookups),
            stream: Stream::default(),
        });
        nodes.by_id.insert(id, node.clone());
        nodes.by_name.insert(name, id);
        drop(nodes);
        if lookups == 0 {
            // A new id: saved before the LOOKUP's answer tells the kernel,
            // so a successor after a kill knows every id the kernel holds
            // (else its reads of this blob get EIO until it is remounted).
            let hook = self
                .on_new_node
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        Ok(node)
    }

    /// A LOOKUP of `name`: its node, which the kernel now references once more.
    fn lookup(&self, name: &[u8]) -> Result<Arc<Node>, i32> {
        let node = self.node_by_name(name)?;
        node.referenced();
        Ok(node)
    }

    fn node(&self, id: u64) -> Option<Arc<Node>> {
        let adopted_name = {
            let nodes = self.read_nodes();
            if let Some(n) = nodes.by_id.get(&id) {
                return Some(n.clone());
            }
            nodes.adopted.get(&id)?.name.clone()
        };
        self.node_by_name(adopted_name.as_bytes()).ok()
    }

    /// The kernel dropped `n` references to node `id`. The node itself is kept
    /// (one per blob ever looked up): a lookup racing with the forget may hand
    /// the kernel the same id again.
    fn forget(&self, id: u64, n: u64) {
        let mut nodes = self.write_nodes();
        if let Some(node) = nodes.by_id.get(&id) {
            // One atomic read-modify-write: a LOOKUP takes its reference
            // without the nodes lock (`Node::referenced`), so a load and a
            // store here would lose the references taken in between.
            let _ = node
                .lookups
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    Some(l.saturating_sub(n))
                });
        } else if let Some(adopted) = nodes.adopted.get_mut(&id) {
            adopted.lookups = adopted.lookups.saturating_sub(n);
        }
    }

    fn flush_all(&self) {
        let nodes: Vec<_> = self.read_nodes().by_id.values().cloned().collect();
        for node in nodes {
            if let Store::Cached(c) = &node.store {
                match c.flush() {
                    // A full disk is one episode, logged once (and counted).
                    Err(e) if lazypull_engine::is_disk_full(&e) => self
                        .stats
                        .write_trouble
                        .failed(&e, "FUSE reads are served from the source without caching"),
                    Err(e) => warn!(blob = %node.name, "{e}"),
                    Ok(()) => {}
                }
            }
        }
    }

    /// A READ of `[off, off + len)` of a cached node: if its reader moves
    /// sequentially, queue the next windows to be filled into the cache file
    /// ahead of it (see `lazypull_engine::readahead`).
    ///
    /// Like the kernel's own readahead (its `PG_readahead` mark), a READ
    /// starts read-ahead only when it misses the cache or is the first read
    /// of a window read-ahead filled: a reader re-reading what it read
    /// before (a warm read) is served from the cache and fetches nothing,
    /// while one consuming read-ahead keeps it going.
    fn read_ahead(&self, node: &Arc<Node>, off: u64, len: u64) {
        let Store::Cached(cache) = &node.store else {
            return;
        };
        let (ahead, used) = cache.read_ahead_for(&node.stream, off, len, self.config.readahead);
        if used > 0 {
            self.stats
                .readahead_unused
                .fetch_sub(used as i64, Ordering::Relaxed);
        }
        let Some(ahead) = ahead else {
            return;
        };
        let Some(pool) = self
            .readahead
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let window = cache.policy().window;
        for ahead in ahead.split(lazypull_engine::readahead::JOB_WINDOWS * window) {
            self.queue_read_ahead(&pool, node, ahead);
        }
    }

    fn queue_read_ahead(
        &self,
        pool: &ReadAheadPool,
        node: &Arc<Node>,
        ahead: lazypull_engine::Ahead,
    ) {
        let job_node = node.clone();
        let stats = self.stats.clone();
        let queued = pool.submit(move |stopping| {
            let node = job_node;
            let Store::Cached(cache) = &node.store else {
                return;
            };
            let cancelled =
                || stopping.load(Ordering::Acquire) || node.stream.is_stale(ahead.generation);
            match cache.fill_ahead(node.source.as_ref(), ahead.off, ahead.len, &cancelled) {
                Ok(out) => {
                    bump(&stats.bytes_written, out.bytes_written);
                    bump(&stats.windows_written, out.windows_written);
                    bump(&stats.readahead_bytes, out.bytes_written);
                    stats
                        .readahead_unused
                        .fetch_add(out.bytes_written as i64, Ordering::Relaxed);
                }
                Err(e) => {
                    bump(&stats.readahead_failures, 1);
                    debug!(blob = %node.name, off = ahead.off, len = ahead.len, "read-ahead failed (a READ of it fetches it again): {e}");
                }
            }
        });
        if !queued {
            bump(&self.stats.readahead_dropped, 1);
        }
    }

    /// The file holding bytes `[off, off + len)` of the node's blob: the
    /// local blob itself, or its cache file once those windows are filled
    /// (fetched and verified first if they are not), pinned there until the
    /// returned guard drops.
    fn file_with<'n>(
        &self,
        node: &'n Node,
        off: u64,
        len: u64,
    ) -> Result<(&'n File, Option<lazypull_engine::Pinned<'n>>), FillError> {
        match &node.store {
            Store::Direct(file) => Ok((file, None)),
            Store::Cached(cache) => {
                let (outcome, pinned) =
                    cache.fill_pinned(node.source.as_ref(), off, len, Priority::Foreground)?;
                bump(&self.stats.bytes_written, outcome.bytes_written);
                bump(&self.stats.windows_written, outcome.windows_written);
                if outcome.bytes_written > 0 {
                    self.stats.write_trouble.succeeded();
                }
                Ok((cache.data_file(), Some(pinned)))
            }
        }
    }

    /// Answers READ `unique` with `len` bytes at `off` read straight from
    /// the node's source (verified by it as any fill is), not cached: what
    /// a READ gets when the cache cannot take its windows (no room in the
    /// budget, a full file system).
    fn answer_uncached(
        &self,
        dev: &FuseDevice,
        node: &Node,
        unique: u64,
        off: u64,
        len: usize,
    ) -> io::Result<()> {
        self.answer_buffered(dev, unique, len, |buf| {
            let mut got = 0;
            while got < len {
                match node.source.read_at_priority(
                    &mut buf[got..],
                    off + got as u64,
                    Priority::Foreground,
                ) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("blob {} ends before {} (+{len})", node.name, off),
                        ))
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
        bump(&self.stats.uncached_reads, 1);
        Ok(())
    }

    /// Answers READ `unique` with exactly `len` bytes at `off` of the node's
    /// blob (an error is returned before anything is sent, for the caller
    /// to answer EIO).
    ///
    /// The bytes are in a file by now (`file_with`): the cache file's fill
    /// just wrote them into its page cache, or they were there already.
    /// They are spliced from that file to the kernel (one copy, from the
    /// file's pages into the request's, and no reply buffer); a READ that
    /// cannot be spliced is answered from a pooled buffer. A reply is sent
    /// at most once: a splice that failed part-way never reached the
    /// kernel (the pipe is dropped), so the buffered answer is the only one.
    fn answer_read(
        &self,
        dev: &FuseDevice,
        state: &mut WorkerState,
        node: &Node,
        unique: u64,
        off: u64,
        len: usize,
    ) -> io::Result<()> {
        let (file, _pinned) = match self.file_with(node, off, len as u64) {
            Ok(held) => held,
            Err(e @ (FillError::NoRoom { .. } | FillError::Write { .. })) => {
                if let FillError::Write { source, .. } = &e {
                    self.stats.write_trouble.failed(
                        source,
                        "FUSE reads are served from the source without caching",
                    );
                }
                debug!(blob = %node.name, off, len, "served uncached: {e}");
                return self.answer_uncached(dev, node, unique, off, len);
            }
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        if state.pipe.is_none() && !state.no_splice {
            match ReplyPipe::new(self.max_read()) {
                Ok(p) => state.pipe = Some(p),
                Err(e) => {
                    warn!("no pipe to splice FUSE replies through; this thread copies them: {e}");
                    state.no_splice = true;
                }
            }
        }
        if let Some(pipe) = state.pipe.as_ref().filter(|p| len <= p.max_body()) {
            match dev.splice_reply(pipe, unique, file.as_fd(), off, len) {
                Ok(()) => {
                    bump(&self.stats.spliced_reads, 1);
                    return Ok(());
                }
                Err(e) => {
                    // Whatever it holds is never sent: a new pipe next time.
                    state.pipe = None;
                    debug!(blob = %node.name, off, len, "splicing a READ failed, answered from a buffer: {e}");
                }
            }
        }
        bump(&self.stats.splice_fallbacks, 1);
        self.answer_buffered(dev, unique, len, |buf| {
            file.read_exact_at(buf, off).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("reading blob {} at {off} (+{len}): {e}", node.name),
                )
            })
        })
    }

    /// Answers READ `unique` with the `len` bytes `read` puts into a pooled
    /// buffer. A failed `read` is returned before anything is sent (for the
    /// caller to answer EIO); a failed send is only logged: no second
    /// answer fixes it.
    fn answer_buffered(
        &self,
        dev: &FuseDevice,
        unique: u64,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buf = self.buffers.take(len);
        let sent = read(&mut buf).map(|()| dev.send(&[&abi::out_header(unique, 0, len), &buf]));
        self.buffers.give(buf);
        if let Err(e) = sent? {
            warn!("answering a FUSE READ failed: {e}");
        }
        Ok(())
    }

    fn init(&self, unique: u64, init: abi::InitIn, dev: &FuseDevice) -> io::Result<()> {
        if init.major != abi::KERNEL_VERSION || init.minor < abi::MIN_MINOR_VERSION {
            error!(
                major = init.major,
                minor = init.minor,
                "FUSE_INIT: the kernel speaks protocol {}.{}; lazypull needs 7.{}+",
                init.major,
                init.minor,
                abi::MIN_MINOR_VERSION
            );
            return dev.send(&[&abi::error_reply(unique, libc::EPROTO)]);
        }
        let minor = init.minor.min(abi::KERNEL_MINOR_VERSION);
        // READs as large as this kernel allows (1 MiB on most).
        let max_pages = lazypull_fuse::device::max_pages_limit();
        let wanted = init_flags::ASYNC_READ
            | init_flags::PARALLEL_DIROPS
            | init_flags::MAX_PAGES
            | init_flags::INIT_EXT;
        let max_read = if init.flags & init_flags::MAX_PAGES != 0 {
            u32::from(max_pages) * 4096
        } else {
            32 * 4096
        };
        let reply = InitOut {
            minor,
            // The kernel keeps the smaller of this and its mount's read-ahead
            // (which `FuseServer::serve` raises to a READ's size; it offers
            // its default, 128 KiB, here): answering what it offered would
            // cap read-ahead READs at that.
            max_readahead: init.max_readahead.max(max_read),
            flags: init.flags & wanted,
            max_background: 64,
            congestion_threshold: 48,
            max_write: 4096,
            max_pages,
            max_stack_depth: 0,
        };
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(Session {
            minor,
            kernel_flags: init.flags,
            max_read,
            nodes: Vec::new(),
        });
        info!(
            protocol = format!("7.{minor}"),
            resend = init.flags & init_flags::HAS_RESEND != 0,
            max_read,
            "FUSE connection initialised"
        );
        let body = reply.encode();
        dev.send(&[&abi::out_header(unique, 0, body.len()), &body])
    }

    fn max_read(&self) -> usize {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(128 << 10, |s| s.max_read as usize)
    }

    /// Answers the request `raw`.
    fn handle(&self, dev: &FuseDevice, raw: &[u8], state: &mut WorkerState) -> io::Result<()> {
        let request = match abi::parse(raw) {
            Ok(r) => r,
            Err(e) => {
                bump(&self.stats.malformed, 1);
                error!(error = %e, "malformed FUSE request; answered EIO");
                return match e.unique() {
                    Some(u) => dev.send(&[&abi::error_reply(u, libc::EIO)]),
                    None => Ok(()),
                };
            }
        };
        let h = request.header;
        let reply = |body: &[u8]| dev.send(&[&abi::out_header(h.unique, 0, body.len()), body]);
        let fail = |errno: i32| dev.send(&[&abi::error_reply(h.unique, errno)]);
        let file_node = |id: u64| -> Result<Arc<Node>, i32> {
            self.node(id).ok_or_else(|| {
                bump(&self.stats.unknown_nodes, 1);
                warn!(node = id, "request for a node this daemon does not know");
                libc::ENOENT
            })
        };
        match request.op {
            Operation::Init(init) => self.init(h.unique, init, dev),
            Operation::Destroy
            | Operation::Flush
            | Operation::Release { .. }
            | Operation::ReleaseDir => reply(&[]),
            Operation::Forget { nlookup } => {
                self.forget(h.nodeid, nlookup);
                Ok(())
            }
            Operation::BatchForget { forgets } => {
                for (id, n) in forgets {
                    self.forget(id, n);
                }
                Ok(())
            }
            Operation::Interrupt { .. } => Ok(()),
            Operation::Lookup { name } => {
                bump(&self.stats.lookups, 1);
                if h.nodeid != abi::ROOT_ID {
                    return fail(libc::ENOTDIR);
                }
                match self.lookup(name) {
                    Ok(node) => reply(&abi::entry_out(node.id, 0, TTL, &node.attr())),
                    Err(errno) => {
                        bump(&self.stats.lookup_failures, 1);
                        fail(errno)
                    }
                }
            }
            Operation::GetAttr => {
                if h.nodeid == abi::ROOT_ID {
                    return reply(&abi::attr_out(TTL, &root_attr()));
                }
                match file_node(h.nodeid) {
                    Ok(node) => reply(&abi::attr_out(TTL, &node.attr())),
                    Err(errno) => fail(errno),
                }
            }
            Operation::Open { flags } => {
                if flags & (libc::O_WRONLY | libc::O_RDWR) as u32 != 0 {
                    return fail(libc::EROFS);
                }
                match file_node(h.nodeid) {
                    Ok(_) => {
                        bump(&self.stats.opens, 1);
                        // Blobs never change: keep the page cache across opens.
                        reply(&abi::open_out(0, open_flags::KEEP_CACHE, 0))
                    }
                    Err(errno) => fail(errno),
                }
            }
            Operation::Read(r) => {
                bump(&self.stats.reads, 1);
                let node = match file_node(h.nodeid) {
                    Ok(n) => n,
                    Err(errno) => return fail(errno),
                };
                let size = node.source.size();
                let end = r.offset.saturating_add(u64::from(r.size)).min(size);
                if r.offset >= end {
                    return reply(&[]);
                }
                let len = ((end - r.offset) as usize).min(self.max_read().max(4096));
                // Queued before this READ's own fill: the windows after it
                // are fetched while this one is.
                self.read_ahead(&node, r.offset, len as u64);
                match self.answer_read(dev, state, &node, h.unique, r.offset, len) {
                    Ok(()) => {
                        bump(&self.stats.bytes_read, len as u64);
                        Ok(())
                    }
                    Err(e) => {
                        bump(&self.stats.read_failures, 1);
                        error!(blob = %node.name, off = r.offset, len, "READ failed, the reader gets EIO: {e}");
                        fail(libc::EIO)
                    }
                }
            }
            Operation::OpenDir => {
                if h.nodeid != abi::ROOT_ID {
                    return fail(libc::ENOTDIR);
                }
                reply(&abi::open_out(0, 0, 0))
            }
            Operation::ReadDir(r) => {
                if h.nodeid != abi::ROOT_ID {
                    return fail(libc::ENOTDIR);
                }
                let mut entries: Vec<(u64, String)> = {
                    let nodes = self.read_nodes();
                    nodes
                        .by_id
                        .values()
                        .map(|n| (n.id, n.name.clone()))
                        .collect()
                };
                entries.sort();
                let mut buf = abi::DirentBuf::new(r.size as usize);
                let all = [
                    (abi::ROOT_ID, ".".to_owned(), abi::DT_DIR),
                    (abi::ROOT_ID, "..".to_owned(), abi::DT_DIR),
                ]
                .into_iter()
                .chain(
                    entries
                        .into_iter()
                        .map(|(id, name)| (id, name, abi::DT_REG)),
                );
                for (i, (ino, name, kind)) in all.enumerate().skip(r.offset as usize) {
                    if !buf.push(ino, i as u64 + 1, kind, name.as_bytes()) {
                        break;
                    }
                }
                reply(&buf.into_bytes())
            }
            Operation::StatFs => {
                let nodes = self.read_nodes();
                let bytes = nodes.by_id.values().map(|n| n.source.size()).sum();
                reply(&abi::statfs_out(bytes, nodes.by_id.len() as u64))
            }
            Operation::Access { .. } => reply(&[]),
            Operation::Other { opcode } => {
                debug!(opcode, "unsupported FUSE request: ENOSYS");
                fail(libc::ENOSYS)
            }
        }
    }

    fn session(&self) -> Option<Session> {
        let mut s = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let nodes = self.read_nodes();
        s.nodes = nodes
            .by_id
            .values()
            .map(|n| SessionNode {
                id: n.id,
                name: n.name.clone(),
                lookups: n.lookups.load(Ordering::Acquire),
            })
            .chain(nodes.adopted.values().cloned())
            .collect();
        s.nodes.sort_by_key(|n| n.id);
        Some(s)
    }
}

/// Fills blobs ahead of need and reports what is cached: a handle on the
/// transport for prefetch and status.
#[derive(Clone)]
pub struct FuseBlobs {
    fs: Arc<BlobFs>,
}

impl Prefetch for FuseBlobs {
    fn prefetch(&self, blob: &str, off: u64, len: u64) -> Result<Option<FillOutcome>, FillError> {
        let Ok(node) = self.fs.node_by_name(blob.as_bytes()) else {
            return Ok(None);
        };
        let Store::Cached(cache) = &node.store else {
            return Ok(Some(FillOutcome::default())); // a complete local file
        };
        let out = cache.fill(node.source.as_ref(), off, len, Priority::Background)?;
        bump(&self.fs.stats.prefetched_bytes, out.bytes_written);
        bump(&self.fs.stats.bytes_written, out.bytes_written);
        Ok(Some(out))
    }

    fn blobs(&self) -> Vec<BlobCacheInfo> {
        let mut v: Vec<_> = self
            .fs
            .read_nodes()
            .by_id
            .values()
            .map(|n| BlobCacheInfo {
                blob: n.name.clone(),
                size: n.source.size(),
                cached_bytes: n.cached_bytes(),
                source: n.source.source_stats(),
                local_file: matches!(n.store, Store::Direct(_)),
            })
            .collect();
        v.sort_by(|a, b| a.blob.cmp(&b.blob));
        v
    }
}

impl FuseBlobs {
    /// The cache's byte budget, if it has one.
    pub fn budget(&self) -> Option<&Arc<lazypull_engine::CacheBudget>> {
        self.fs.config.budget.as_ref()
    }

    /// Where the blob `name` is complete on local disk, if it is: a file the
    /// kernel can read directly, with no daemon in the way.
    pub fn complete_file(&self, name: &str) -> Option<PathBuf> {
        let node = self.fs.node_by_name(name.as_bytes()).ok()?;
        match &node.store {
            Store::Direct(_) => node.source.local_path().map(Path::to_path_buf),
            // Under a budget, windows of any cache file may be evicted: no
            // mount may read one without this server in between.
            Store::Cached(_) if self.fs.config.budget.is_some() => None,
            Store::Cached(c) => c.is_complete().then(|| c.data_path().to_path_buf()),
        }
    }
}

/// A mounted (or adopted) FUSE connection serving blob files.
pub struct FuseServer {
    dev: Arc<FuseDevice>,
    fs: Arc<BlobFs>,
    stop: OwnedFd,
    /// What an adopted connection's predecessor left, answered by `serve`.
    pending: Mutex<Option<fuse_journal::Pending>>,
}

impl FuseServer {
    /// Opens `/dev/fuse` and mounts a new connection at the configured mountpoint.
    pub fn mount(config: Config, resolver: Arc<dyn BlobResolver>) -> io::Result<Self> {
        config
            .policy
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        lazypull_engine::private_dir(&config.mountpoint)?;
        lazypull_engine::private_dir(&config.cache_dir)?;
        let dev = FuseDevice::open(&config.device)?;
        dev.mount(&config.mountpoint, "lazypull", "lazypull")?;
        info!(mountpoint = %config.mountpoint.display(), cache_dir = %config.cache_dir.display(), "FUSE blob mount ready");
        Self::with(dev, config, resolver, None)
    }

    /// Serves a connection a previous daemon mounted and initialised (fd from
    /// an fd store or a handover). What that daemon read and left unanswered
    /// is answered first: the kernel resends it (6.9+, [`Recovery::Auto`]),
    /// or [`serve`](Self::serve) answers it from the predecessor's journal
    /// before reading anything new.
    pub fn adopt(
        config: Config,
        resolver: Arc<dyn BlobResolver>,
        fd: OwnedFd,
        session: Session,
    ) -> io::Result<Self> {
        let dev = FuseDevice::from_fd(fd)?;
        let nodes = session.nodes.len();
        let resend =
            session.kernel_flags & init_flags::HAS_RESEND != 0 && config.recovery == Recovery::Auto;
        let journal = journal_path(&config.cache_dir);
        let pending = if resend {
            None
        } else {
            fuse_journal::read_pending(&journal)?
        };
        let server = Self::with(dev, config, resolver, Some(session))?;
        if resend {
            server.dev.notify_resend()?;
        } else if let Some(p) = &pending {
            info!(
                unanswered = p.unanswered.len(),
                high_water = p.high_water,
                damaged_slots = p.damaged,
                "the kernel cannot resend FUSE requests (before 6.9) or --fuse-recovery journal: answering what the previous daemon left from its journal"
            );
        } else {
            warn!(journal = %journal.display(), "the kernel cannot resend FUSE requests (before 6.9) and the previous daemon left no request journal: reads it had taken may hang");
        }
        *server.pending.lock().unwrap_or_else(|p| p.into_inner()) = pending;
        info!(nodes, resend, "FUSE connection adopted");
        Ok(server)
    }

    fn with(
        dev: FuseDevice,
        config: Config,
        resolver: Arc<dyn BlobResolver>,
        session: Option<Session>,
    ) -> io::Result<Self> {
        let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        Ok(FuseServer {
            dev: Arc::new(dev),
            fs: Arc::new(BlobFs::new(resolver, config, session)),
            stop,
            pending: Mutex::new(None),
        })
    }

    /// Answers what a predecessor left unanswered (see [`adopt`](Self::adopt)),
    /// before any worker reads: each recorded request is handled again under
    /// its own unique (concurrently: they may wait on fetches), then uniques
    /// near the journal's high-water mark are probed for requests it read
    /// and never recorded, which get EIO (better than a reader hung for
    /// ever). The predecessor's journal is replaced only afterwards, so a
    /// successor killed meanwhile leaves it to the next one.
    fn recover(dev: &FuseDevice, fs: &BlobFs, pending: fuse_journal::Pending) {
        let answered: std::collections::HashSet<u64> =
            pending.unanswered.iter().map(|u| u.unique).collect();
        std::thread::scope(|scope| {
            for u in &pending.unanswered {
                scope.spawn(move || {
                    bump(&fs.stats.recovered_requests, 1);
                    // Recorded whole (it fitted its slot) and parsing as the
                    // request of this unique: handled again; else EIO.
                    let Some(raw) = u.raw.as_ref().filter(|raw| {
                        abi::parse(raw).is_ok_and(|r| r.header.unique == u.unique)
                    }) else {
                        bump(&fs.stats.recovered_unknown, 1);
                        error!(unique = u.unique, recorded = u.raw.is_some(), "a request the previous daemon took is not in its journal whole (too large for its slot, or damaged): answered EIO");
                        let _ = dev.send(&[&abi::error_reply(u.unique, libc::EIO)]);
                        return;
                    };
                    let mut state = WorkerState::new();
                    match fs.handle(dev, raw, &mut state) {
                        Ok(()) => debug!(unique = u.unique, "answered a request the previous daemon took"),
                        Err(e) => warn!(unique = u.unique, "answering a request the previous daemon took: {e}"),
                    }
                });
            }
        });
        let from = pending.high_water.saturating_sub(PROBE_SPAN).max(2) & !1;
        let mut orphans = 0u64;
        for unique in (from..=pending.high_water + PROBE_SPAN).step_by(2) {
            if answered.contains(&unique) {
                continue;
            }
            match dev.answer_if_waiting(&abi::error_reply(unique, libc::EIO)) {
                Ok(true) => orphans += 1,
                Ok(false) => {}
                Err(e) => {
                    warn!("probing for requests the previous daemon took unrecorded: {e}");
                    break;
                }
            }
        }
        if orphans > 0 {
            bump(&fs.stats.recovered_unknown, orphans);
            bump(&fs.stats.recovered_requests, orphans);
            error!(orphans, "requests the previous daemon read and was killed before recording were answered EIO");
        }
        info!(
            answered = pending.unanswered.len(),
            orphans, "answered what the previous daemon left"
        );
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.fs.stats.clone()
    }

    pub fn blobs(&self) -> FuseBlobs {
        FuseBlobs {
            fs: self.fs.clone(),
        }
    }

    /// The connection's state for a successor (None before `FUSE_INIT`).
    pub fn session(&self) -> Option<Session> {
        self.fs.session()
    }

    /// Has `hook` run whenever a LOOKUP hands out a new node id, before the
    /// kernel is answered: the daemon persists the session there.
    pub fn on_new_node(&self, hook: NodeHook) {
        *self
            .fs
            .on_new_node
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// A duplicate of the connection fd, to keep it alive elsewhere.
    pub fn connection_fd(&self) -> io::Result<OwnedFd> {
        self.dev.try_clone_fd()
    }

    /// Serves until `shutdown` resolves (or the connection goes away), then
    /// stops the workers and persists every fill map. The mount stays: call
    /// [`unmount`](Self::unmount) to end it, or leave it for a successor.
    pub async fn serve(&self, shutdown: impl Future<Output = ()>) -> io::Result<StatsSnapshot> {
        let threads = self.fs.config.threads.max(1);
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(pending) = pending {
            let (dev, fs) = (self.dev.clone(), self.fs.clone());
            tokio::task::spawn_blocking(move || Self::recover(&dev, &fs, pending))
                .await
                .map_err(io::Error::other)?;
        }
        let journal = Arc::new(fuse_journal::RequestJournal::create(
            &journal_path(&self.fs.config.cache_dir),
            threads,
        )?);
        let pool = if self.fs.config.readahead > 0 {
            Some(ReadAheadPool::start(
                lazypull_engine::readahead::default_threads(),
            )?)
        } else {
            None
        };
        *self.fs.readahead.write().unwrap_or_else(|p| p.into_inner()) = pool.clone();
        let (gone_tx, mut gone_rx) = tokio::sync::mpsc::channel::<io::Error>(threads);
        let mut workers = Vec::new();
        for i in 0..threads {
            let dev = self.dev.clone();
            let fs = self.fs.clone();
            let stop = self.stop.try_clone()?;
            let gone = gone_tx.clone();
            let journal = JournalSlot {
                journal: journal.clone(),
                slot: i,
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("lazypull-fuse-{i}"))
                    .spawn(move || {
                        if let Err(e) = worker(&dev, &fs, &stop, &journal) {
                            let _ = gone.blocking_send(e);
                        }
                    })?,
            );
        }
        let flusher = {
            let fs = self.fs.clone();
            let interval = self.fs.config.flush_interval;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let fs = fs.clone();
                    let _ = tokio::task::spawn_blocking(move || fs.flush_all()).await;
                }
            })
        };
        drop(gone_tx);
        {
            // Once per mount (the setting is the kernel's: a successor
            // serving an adopted connection finds it made). It asks the
            // kernel's attributes only (no FUSE request); should a kernel
            // ask the daemon, the workers are serving by now.
            let mountpoint = self.fs.config.mountpoint.clone();
            let bytes = u64::from(lazypull_fuse::device::max_pages_limit()) * 4096;
            match tokio::task::spawn_blocking(move || {
                lazypull_fuse::device::set_readahead(&mountpoint, bytes)
            })
            .await
            {
                Ok(Ok(())) => debug!(bytes, "FUSE read-ahead raised to a READ's size"),
                Ok(Err(e)) => warn!("FUSE read-ahead stays at the kernel's default: {e}"),
                Err(e) => warn!("FUSE read-ahead: {e}"),
            }
        }
        let result = tokio::select! {
            _ = shutdown => Ok(()),
            Some(e) = gone_rx.recv() => {
                error!("FUSE connection lost: {e}");
                Err(e)
            }
        };
        flusher.abort();
        rustix::io::write(&self.stop, &1u64.to_ne_bytes())?;
        let fs = self.fs.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
            // No worker queues read-ahead any more: stop and join its threads.
            fs.readahead
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(pool) = pool {
                pool.stop();
            }
        })
        .await;
        self.fs.flush_all();
        let snapshot = self.fs.stats.snapshot();
        info!(?snapshot, "FUSE server stopped");
        result.map(|()| snapshot)
    }

    /// Detaches the blob mount (lazily: images still mounted from it keep
    /// their files until they are unmounted, and fail once the connection closes).
    pub fn unmount(&self) -> io::Result<()> {
        rustix::mount::unmount(
            &self.fs.config.mountpoint,
            rustix::mount::UnmountFlags::DETACH,
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("unmounting {}: {e}", self.fs.config.mountpoint.display()),
            )
        })
    }
}

/// A serving thread's slot of the request journal.
struct JournalSlot {
    journal: Arc<fuse_journal::RequestJournal>,
    slot: usize,
}

impl JournalSlot {
    /// Records a request about to be answered; returns its unique when
    /// recorded (requests with no reply, and INIT, are not).
    fn begin(&self, raw: &[u8]) -> Option<u64> {
        let abi::InHeader { opcode, unique, .. } = abi::header(raw)?;
        if !abi::wants_reply(opcode) || opcode == abi::opcode::INIT || unique == 0 {
            return None;
        }
        match self.journal.begin(self.slot, unique, raw) {
            Ok(()) => Some(unique),
            Err(e) => {
                warn!(journal = %self.journal.path().display(), "recording a FUSE request: {e}; a successor on a kernel before 6.9 will answer it EIO");
                None
            }
        }
    }

    fn end(&self, unique: Option<u64>) {
        if let Some(unique) = unique {
            if let Err(e) = self.journal.end(self.slot, unique) {
                warn!(journal = %self.journal.path().display(), "recording a FUSE reply: {e}");
            }
        }
    }
}

/// One serving thread: waits for requests and answers them until stopped.
fn worker(dev: &FuseDevice, fs: &BlobFs, stop: &OwnedFd, journal: &JournalSlot) -> io::Result<()> {
    let mut request = vec![0u8; 64 << 10];
    let mut state = WorkerState::new();
    loop {
        match dev.wait(stop.as_fd(), Duration::from_secs(5))? {
            Readiness::Stop => return Ok(()),
            Readiness::Idle => continue,
            Readiness::Request => {}
        }
        let Some(n) = dev.recv(&mut request)? else {
            continue;
        };
        // First, before anything can fail or wait: a successor finds what
        // this thread was answering when it was killed.
        let recorded = journal.begin(&request[..n]);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fs.handle(dev, &request[..n], &mut state)
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("answering a FUSE request failed: {e}"),
            Err(_) => {
                // The request is answered with EIO so its caller does not
                // hang, and the pipe (which may hold part of a reply) goes.
                state.pipe = None;
                bump(&fs.stats.read_failures, 1);
                error!("a FUSE request handler panicked (a bug); answered EIO");
                if let Ok(r) = abi::parse(&request[..n]) {
                    if r.wants_reply() {
                        let _ = dev.send(&[&abi::error_reply(r.header.unique, libc::EIO)]);
                    }
                }
            }
        }
        journal.end(recorded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazypull_source::{LocalDir, OpenError};

    /// A file system whose resolver serves the files of `dir`.
    fn blob_fs(dir: &Path) -> BlobFs {
        let local = LocalDir::new(dir);
        let resolver = move |_: &[u8], cookie: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
            Ok(local.open(cookie)?)
        };
        let config = Config {
            mountpoint: dir.join("mnt"),
            device: PathBuf::from("/dev/null"),
            cache_dir: dir.join("cache"),
            threads: 1,
            policy: FillPolicy {
                window: 65536,
                io_size: 65536,
            },
            flush_interval: Duration::from_secs(1),
            recovery: Recovery::Auto,
            budget: None,
            readahead: lazypull_engine::DEFAULT_READAHEAD,
        };
        BlobFs::new(Arc::new(resolver), config, None)
    }

    /// A blob in memory (no local file: served through the cache file).
    #[derive(Debug)]
    struct MemBlob(Vec<u8>);

    impl BlobSource for MemBlob {
        fn name(&self) -> &str {
            "mem"
        }
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let off = (off as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - off);
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            Ok(n)
        }
    }

    fn patterned(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// `blob_fs` serving also "mem" from memory, after an INIT that allowed
    /// 1 MiB READs.
    fn mem_fs(dir: &Path, mem: Arc<MemBlob>) -> BlobFs {
        let local = LocalDir::new(dir);
        let resolver = move |_: &[u8], cookie: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
            if cookie == b"mem" {
                return Ok(mem.clone());
            }
            Ok(local.open(cookie)?)
        };
        let fs = blob_fs(dir);
        let fs = BlobFs::new(Arc::new(resolver), fs.config.clone(), None);
        *fs.session.lock().unwrap() = Some(Session {
            minor: abi::KERNEL_MINOR_VERSION,
            kernel_flags: init_flags::MAX_PAGES,
            max_read: 1 << 20,
            nodes: Vec::new(),
        });
        fs
    }

    /// A "device" whose replies land in a file, and that file.
    fn recording_device(dir: &Path) -> (FuseDevice, PathBuf) {
        let path = dir.join("replies");
        let f = File::create(&path).unwrap();
        (FuseDevice::from_fd(f.into()).unwrap(), path)
    }

    /// The replies written to a recording device: (unique, body).
    fn replies(path: &Path) -> Vec<(u64, Vec<u8>)> {
        let bytes = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let error = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
            assert_eq!(error, 0, "an error reply");
            let unique = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
            out.push((unique, bytes[at + 16..at + len].to_vec()));
            at += len;
        }
        out
    }

    #[test]
    fn spliced_and_buffered_reads_answer_the_same_bytes_cold_warm_and_direct() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = patterned(3 << 20);
        std::fs::write(dir.path().join("local"), &bytes).unwrap();
        let fs = mem_fs(dir.path(), Arc::new(MemBlob(bytes.clone())));
        let (dev, replies_at) = recording_device(dir.path());
        let mem = fs.lookup(b"mem").unwrap();
        let local = fs.lookup(b"local").unwrap();
        assert!(matches!(mem.store, Store::Cached(_)) && matches!(local.store, Store::Direct(_)));
        let mut spliced = WorkerState::new();
        let mut copied = WorkerState::new();
        copied.no_splice = true;
        // (node, off, len, thread): a cold READ across windows, answered by
        // splice from what its fill just wrote; the same bytes warm, by
        // splice and from a buffer; a full 1 MiB READ; a complete local blob.
        let reads: [(&Arc<Node>, u64, usize, bool); 6] = [
            (&mem, 100_003, 200_001, true),
            (&mem, 100_003, 200_001, true),
            (&mem, 100_003, 200_001, false),
            (&mem, 1 << 20, 1 << 20, true),
            (&local, 5, 777_777, true),
            (&local, 5, 777_777, false),
        ];
        for (k, &(node, off, len, splice)) in reads.iter().enumerate() {
            let state = if splice { &mut spliced } else { &mut copied };
            fs.answer_read(&dev, state, node, k as u64, off, len)
                .unwrap();
        }
        let got = replies(&replies_at);
        assert_eq!(got.len(), reads.len());
        for ((unique, body), &(_, off, len, _)) in got.iter().zip(&reads) {
            assert!(
                body[..] == bytes[off as usize..off as usize + len],
                "reply {unique}: wrong bytes"
            );
        }
        let stats = fs.stats.snapshot();
        // The 1 MiB READ is spliced only where the pipe could grow past
        // pipe-max-size (1 MiB, one message needs up to two pages more).
        let full = spliced.pipe.as_ref().unwrap().max_body() >= 1 << 20;
        let expected = if full { (4, 2) } else { (3, 3) };
        assert_eq!((stats.spliced_reads, stats.splice_fallbacks), expected);
        // Only what the READs covered was fetched: whole 64 KiB windows.
        let Store::Cached(cache) = &mem.store else {
            unreachable!()
        };
        assert_eq!(
            cache.cached_bytes(),
            (4 + 16) * 65536,
            "windows 1-4 and 16-31"
        );
    }

    #[test]
    fn a_read_too_large_for_the_pipe_or_failing_to_splice_gets_one_answer_or_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = patterned(2 << 20);
        std::fs::write(dir.path().join("local"), &bytes).unwrap();
        let fs = mem_fs(dir.path(), Arc::new(MemBlob(bytes.clone())));
        let (dev, replies_at) = recording_device(dir.path());
        let mem = fs.lookup(b"mem").unwrap();
        let mut state = WorkerState::new();
        state.pipe = Some(ReplyPipe::new(64 << 10).unwrap());
        fs.answer_read(&dev, &mut state, &mem, 1, 0, 300_000)
            .unwrap();
        // The local blob loses its tail after it was opened: the splice
        // stops short (a partial message in the pipe), the buffered read
        // fails too, and the caller is left to answer EIO. Nothing of the
        // partial message is ever sent: the pipe is dropped.
        let local = fs.lookup(b"local").unwrap();
        let state = &mut WorkerState::new();
        File::options()
            .write(true)
            .open(dir.path().join("local"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        assert!(fs
            .answer_read(&dev, state, &local, 2, (1 << 20) - 4096, 8192)
            .is_err());
        assert!(state.pipe.is_none(), "a failed pipe is never reused");
        fs.answer_read(&dev, state, &local, 3, 4096, 100_000)
            .unwrap();
        assert!(state.pipe.is_some(), "the next READ makes a new pipe");
        let got = replies(&replies_at);
        assert_eq!(
            got.len(),
            2,
            "one reply per answered READ, none for the failed one"
        );
        assert_eq!((got[0].0, got[1].0), (1, 3));
        assert!(got[0].1 == bytes[..300_000]);
        assert!(got[1].1 == bytes[4096..104_096]);
        let stats = fs.stats.snapshot();
        assert_eq!((stats.spliced_reads, stats.splice_fallbacks), (1, 2));
    }

    #[test]
    fn the_reply_buffer_pool_keeps_at_most_its_bound_idle() {
        let pool = BufPool::new(2);
        let taken: Vec<_> = (0..5).map(|_| pool.take(1 << 20)).collect();
        assert!(taken.iter().all(|b| b.len() == 1 << 20));
        assert_eq!(pool.idle_bytes(), 0, "taken buffers are not idle");
        for b in taken {
            pool.give(b);
        }
        assert_eq!(pool.idle_bytes(), 2 << 20, "three of five were freed");
        let again = pool.take(4096);
        assert_eq!(again.len(), 4096);
        assert!(again.capacity() >= 1 << 20, "an idle buffer is reused");
        assert_eq!(pool.idle_bytes(), 1 << 20);
    }

    #[test]
    fn forgets_racing_with_lookups_lose_no_reference() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), b"bytes").unwrap();
        let fs = blob_fs(dir.path());
        const N: u64 = 100_000;
        let node = fs.lookup(b"b").unwrap();
        for _ in 0..N {
            fs.lookup(b"b").unwrap();
        }
        // The kernel forgets N references while LOOKUPs answered meanwhile
        // add more: every one of them must be counted, whatever the
        // interleaving. (A LOOKUP takes its reference after the nodes lock is
        // released; the third thread does only that part, for as long as the
        // forgets go on, which makes the two race often.)
        let forgetting = std::sync::atomic::AtomicBool::new(true);
        let extra = std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..N {
                    fs.forget(node.id, 1);
                }
                forgetting.store(false, Ordering::Release);
            });
            s.spawn(|| {
                for _ in 0..N {
                    fs.lookup(b"b").unwrap();
                }
            });
            let racer = s.spawn(|| {
                let mut n = 0u64;
                while forgetting.load(Ordering::Acquire) {
                    node.referenced();
                    n += 1;
                }
                n
            });
            racer.join().unwrap()
        });
        let want = (N + 1) + N + extra - N;
        let left = node.lookups.load(Ordering::Acquire);
        assert_eq!(left, want, "{} references lost", want - left);
    }
}
