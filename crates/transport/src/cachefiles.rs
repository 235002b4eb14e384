//! The cachefiles on-demand server.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazypull_cachefiles::device::Received;
use lazypull_cachefiles::{AnonFd, CacheDevice, Command, OpenRequest, ReadRequest, Request};
use lazypull_engine::{
    fill, fill_ahead, AlignedBuf, CacheSink, FillError, FillMap, FillOutcome, FillPolicy, Priority,
    ReadAheadPool, Stream, Target,
};
use lazypull_source::{BlobResolver, BlobSource, OpenError};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

pub use crate::cachefiles_cull::CullConfig;
use crate::cachefiles_cull::{self, CullBudget, Culler};

/// Settings of the cachefiles transport.
#[derive(Debug, Clone)]
pub struct Config {
    /// The device node, normally `/dev/cachefiles`.
    pub device: PathBuf,
    /// The cache directory (must be on a file system like ext4; tmpfs is refused).
    pub cache_dir: PathBuf,
    /// The cache tag.
    pub tag: String,
    /// Most READs being filled at once (one object at most one less, so that
    /// READs stuck on one blob leave a slot for the others); further READs
    /// wait in the daemon, while it goes on reading the device.
    pub max_in_flight: usize,
    /// How READs are widened and split.
    pub policy: FillPolicy,
    /// How long shutdown waits for READs in flight.
    pub drain_timeout: Duration,
    /// How far ahead of a sequential reader of an object its cache file is
    /// filled, in bytes (0: no read-ahead; the daemon's default is
    /// [`lazypull_engine::DEFAULT_READAHEAD`], 8 MiB).
    pub readahead: u64,
    /// Meta blobs up to this size are filled whole into their cache object
    /// right after their `copen` ([`fill_up_front`]; 0: never). The daemon's
    /// default is [`DEFAULT_META_UP_FRONT_MAX`].
    pub meta_up_front_max: u64,
    /// Bounds the cache's bytes (`cache_limit`): idle objects are culled
    /// ([`crate::cachefiles_cull`]). None: only the kernel's free-space
    /// limits apply.
    pub cull: Option<CullConfig>,
}

/// The daemon's default [`Config::meta_up_front_max`]: meta blobs are small
/// (a few MB for thousands of files) and the mount reads most of them; a
/// larger one is filled on READs as any other blob.
pub const DEFAULT_META_UP_FRONT_MAX: u64 = 64 << 20;

/// Counters of everything the server did; shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Stats {
    pub opens: AtomicU64,
    pub open_failures: AtomicU64,
    pub closes: AtomicU64,
    pub reads: AtomicU64,
    pub read_failures: AtomicU64,
    pub bytes_written: AtomicU64,
    pub windows_written: AtomicU64,
    /// Windows a READ covered that were already filled (by a concurrent READ for
    /// the same window, or by prefetch): skipped, neither fetched nor written again.
    pub windows_overlapped: AtomicU64,
    pub malformed: AtomicU64,
    pub unknown_objects: AtomicU64,
    /// Bytes written ahead of need by prefetch.
    pub prefetched_bytes: AtomicU64,
    /// Reads of the device that failed with a transient error (EMFILE when the
    /// kernel could not install an OPEN's fd, ENOMEM...) and were retried.
    pub device_read_errors: AtomicU64,
    /// Bytes written into cache files by read-ahead (also in
    /// `bytes_written`). How much of it was never read cannot be known here:
    /// the kernel serves filled ranges itself and never tells the daemon.
    pub readahead_bytes: AtomicU64,
    /// Read-ahead jobs that failed (their windows stay holes: a READ of them
    /// fetches them itself) or were dropped (queue full).
    pub readahead_failures: AtomicU64,
    pub readahead_dropped: AtomicU64,
    /// Meta blobs filled whole right after their OPEN ([`fill_up_front`]),
    /// the bytes written so (also in `bytes_written`), and fills of them that
    /// failed or stopped short (READs then fill the rest, as for any blob).
    pub meta_up_front_objects: AtomicU64,
    pub meta_up_front_bytes: AtomicU64,
    pub meta_up_front_failures: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub opens: u64,
    pub open_failures: u64,
    pub closes: u64,
    pub reads: u64,
    pub read_failures: u64,
    pub bytes_written: u64,
    pub windows_written: u64,
    pub windows_overlapped: u64,
    pub malformed: u64,
    pub unknown_objects: u64,
    pub prefetched_bytes: u64,
    pub device_read_errors: u64,
    pub readahead_bytes: u64,
    pub readahead_failures: u64,
    pub readahead_dropped: u64,
    pub meta_up_front_objects: u64,
    pub meta_up_front_bytes: u64,
    pub meta_up_front_failures: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            opens: g(&self.opens),
            open_failures: g(&self.open_failures),
            closes: g(&self.closes),
            reads: g(&self.reads),
            read_failures: g(&self.read_failures),
            bytes_written: g(&self.bytes_written),
            windows_written: g(&self.windows_written),
            windows_overlapped: g(&self.windows_overlapped),
            malformed: g(&self.malformed),
            unknown_objects: g(&self.unknown_objects),
            prefetched_bytes: g(&self.prefetched_bytes),
            device_read_errors: g(&self.device_read_errors),
            readahead_bytes: g(&self.readahead_bytes),
            readahead_failures: g(&self.readahead_failures),
            readahead_dropped: g(&self.readahead_dropped),
            meta_up_front_objects: g(&self.meta_up_front_objects),
            meta_up_front_bytes: g(&self.meta_up_front_bytes),
            meta_up_front_failures: g(&self.meta_up_front_failures),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// One open cache object: the kernel's anonymous fd and the blob behind it.
#[derive(Debug)]
struct Object {
    id: u32,
    fd: AnonFd,
    blob: Arc<dyn BlobSource>,
    size: u64,
    filled: FillMap,
    /// The OPEN's keys, for a successor that adopts this object.
    volume: Vec<u8>,
    cookie: Vec<u8>,
    /// The reader's pattern, for read-ahead.
    stream: Stream,
    /// Whether `filled` has learnt what the kernel's cache file held when
    /// the object was opened ([`Object::learn_cache_file`]).
    learnt: AtomicBool,
    /// The cache's byte budget (`cache_limit`), which admits every write.
    budget: Option<Arc<CullBudget>>,
}

impl Object {
    /// Adds to the fill map, once, what the kernel's cache file already
    /// holds. The cache file outlives mounts and daemons: an object opened
    /// again (a remount, another image sharing the blob's domain) then counts
    /// it in status and does not read it ahead again. Not at OPEN: the
    /// anonymous fd's lseek acts on the backing file (`object->file`), which
    /// cachefiles opens only after the daemon's `copen` (the OPEN is sent from
    /// `cachefiles_ondemand_init_object`, before `cachefiles_open_file`), so
    /// the first READ, prefetch or status after the copen does it, on a
    /// blocking thread.
    fn learn_cache_file(&self, window: u64) {
        if self.learnt.swap(true, Ordering::AcqRel) {
            return;
        }
        let found = fill_map_from_extents(self.fd.as_fd(), self.size, window);
        self.filled.add_filled_words(&found.words());
    }
}

/// An open cache object passed from one daemon to the next: its anonymous
/// fd and what its OPEN said.
#[derive(Debug)]
pub struct HandedObject {
    pub object_id: u32,
    pub fd: OwnedFd,
    pub volume: Vec<u8>,
    pub cookie: Vec<u8>,
    pub size: u64,
}

/// The fill map of an object a previous daemon filled, from what its cache
/// file holds: a window counts as filled when all of it is data. `lseek` on
/// an anonymous fd acts on the backing cache file (the kernel's
/// `cachefiles_ondemand_fd_llseek` passes it to the backing file's
/// `vfs_llseek`), so SEEK_DATA / SEEK_HOLE find the extents written into it;
/// lazypull writes there only verified bytes, whole windows at a time (a
/// failed fill can leave part of a window, which does not count). Errors
/// (a file system without SEEK_DATA) leave the rest unfilled: the map only
/// saves fetches and feeds status, the kernel serves what it has itself.
fn fill_map_from_extents(fd: BorrowedFd<'_>, size: u64, window: u64) -> FillMap {
    use rustix::fs::{seek, SeekFrom};
    let windows = size.div_ceil(window);
    let mut words = vec![0u64; windows.div_ceil(64) as usize];
    let mut pos = 0u64;
    while pos < size {
        let Ok(data) = seek(fd, SeekFrom::Data(pos)) else {
            // ENXIO: no data at or after `pos`.
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(fd, SeekFrom::Hole(data)).unwrap_or(size).min(size);
        // Windows entirely inside [data, hole); the short last window of the
        // object counts when the data reaches the object's end.
        let first = data.div_ceil(window);
        let end = if hole >= size { windows } else { hole / window };
        for i in first..end {
            words[(i / 64) as usize] |= 1 << (i % 64);
        }
        if hole <= data {
            break;
        }
        pos = hole;
    }
    FillMap::from_words(size, window, words)
}

#[cfg(test)]
mod adopted_fill_map_tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A sparse file stands in for an adopted object's anonymous fd (whose
    /// `lseek` the kernel passes to its backing cache file).
    #[test]
    fn an_adopted_objects_fill_map_is_what_its_cache_file_holds() {
        let window = 64u64 << 10;
        let size = 5 * window + 1000;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = std::fs::File::create_new(dir.path().join("object")).unwrap();
        f.set_len(size).unwrap();
        let bytes = vec![7u8; window as usize];
        // Windows 1 and 2 whole, window 3 half (a failed fill), the short
        // last window whole; 0 and 4 never written.
        f.write_all_at(&bytes, window).unwrap();
        f.write_all_at(&bytes, 2 * window).unwrap();
        f.write_all_at(&bytes[..window as usize / 2], 3 * window)
            .unwrap();
        f.write_all_at(&bytes[..1000], 5 * window).unwrap();
        f.sync_all().unwrap();
        let map = fill_map_from_extents(f.as_fd(), size, window);
        let filled: Vec<u64> = (0..6).filter(|&i| map.is_filled(i)).collect();
        assert_eq!(filled, [1, 2, 5]);
        assert_eq!(map.filled_bytes(size), 2 * window + 1000);

        // Nothing written: nothing filled; everything written: all filled.
        let empty = std::fs::File::create_new(dir.path().join("empty")).unwrap();
        empty.set_len(size).unwrap();
        let map = fill_map_from_extents(empty.as_fd(), size, window);
        assert_eq!(map.filled_windows(), 0);
        f.write_all_at(&bytes, 0).unwrap();
        f.write_all_at(&bytes, 3 * window).unwrap();
        f.write_all_at(&bytes, 4 * window).unwrap();
        f.sync_all().unwrap();
        let map = fill_map_from_extents(f.as_fd(), size, window);
        assert_eq!(map.filled_bytes(size), size);
    }
}

/// Writes into an object's cache file, through its anonymous fd, each write
/// admitted by the cache's budget first (when it has one).
struct AnonSink<'a>(&'a Object);

impl CacheSink for AnonSink<'_> {
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let Some(budget) = &self.0.budget else {
            return self.0.fd.write_all_at(buf, off);
        };
        let len = buf.len() as u64;
        budget.admit(len);
        let r = self.0.fd.write_all_at(buf, off);
        budget.written(len, if r.is_ok() { len } else { 0 });
        r
    }
}

struct DeviceFd(CacheDevice);

/// The objects the kernel has open, shared between the serving loop and
/// whoever fills them ahead of need (prefetch).
#[derive(Debug, Clone, Default)]
pub struct OpenObjects {
    map: Arc<Mutex<HashMap<u32, Arc<Object>>>>,
    policy: FillPolicy,
    stats: Arc<Stats>,
    /// The cache's byte budget, when `cache_limit` bounds it.
    budget: Option<Arc<CullBudget>>,
}

/// One open object, as [`OpenObjects::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectInfo {
    pub object_id: u32,
    pub blob: String,
    pub size: u64,
    pub windows_filled: u64,
}

impl OpenObjects {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Object>>> {
        // Inserts and removes are single calls: a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, blob: &str) -> Option<Arc<Object>> {
        self.lock()
            .values()
            .find(|o| o.blob.name() == blob)
            .cloned()
    }

    /// Every open object.
    pub fn list(&self) -> Vec<ObjectInfo> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .map(|o| ObjectInfo {
                object_id: o.id,
                blob: o.blob.name().to_owned(),
                size: o.size,
                windows_filled: o.filled.filled_windows(),
            })
            .collect();
        v.sort_by_key(|o| o.object_id);
        v
    }

    /// The cache's use against its limit, when it has one.
    pub fn budget(&self) -> Option<&Arc<CullBudget>> {
        self.budget.as_ref()
    }

    /// Size of the open object serving `blob`, if the kernel has one open.
    pub fn size_of(&self, blob: &str) -> Option<u64> {
        self.find(blob).map(|o| o.size)
    }

    /// Every open object with a duplicate of its anonymous fd, for a successor
    /// daemon (call after [`Server::serve`] returned: nothing is filling).
    pub fn for_handover(&self) -> io::Result<Vec<HandedObject>> {
        self.lock()
            .values()
            .map(|o| {
                Ok(HandedObject {
                    object_id: o.id,
                    fd: o.fd.as_fd().try_clone_to_owned()?,
                    volume: o.volume.clone(),
                    cookie: o.cookie.clone(),
                    size: o.size,
                })
            })
            .collect()
    }
}

impl crate::Prefetch for OpenObjects {
    /// Fills `[off, off + len)` of the object serving `blob` ahead of need, at
    /// background priority: the kernel then finds the data in its cache and
    /// never asks. `Ok(None)` when no object for `blob` is open.
    fn prefetch(&self, blob: &str, off: u64, len: u64) -> Result<Option<FillOutcome>, FillError> {
        let Some(object) = self.find(blob) else {
            return Ok(None);
        };
        object.learn_cache_file(self.policy.window);
        let mut buf = AlignedBuf::new(self.policy.buffer_size_for(object.blob.as_ref()));
        let target = Target {
            source: object.blob.as_ref(),
            object_size: object.size,
            map: &object.filled,
            sink: &AnonSink(&object),
            priority: Priority::Background,
        };
        let out = fill(&target, off, len, &self.policy, &mut buf)?;
        bump(&self.stats.prefetched_bytes, out.bytes_written);
        Ok(Some(out))
    }

    fn blobs(&self) -> Vec<crate::BlobCacheInfo> {
        // Learning a cache file walks its extents: not under the map's lock.
        let objects: Vec<Arc<Object>> = self.lock().values().cloned().collect();
        let mut v: Vec<_> = objects
            .iter()
            .map(|o| crate::BlobCacheInfo {
                blob: o.blob.name().to_owned(),
                size: o.size,
                cached_bytes: {
                    o.learn_cache_file(self.policy.window);
                    o.filled.filled_bytes(o.size)
                },
                source: o.blob.source_stats(),
                local_file: o.blob.local_path().is_some(),
            })
            .collect();
        v.sort_by(|a, b| a.blob.cmp(&b.blob));
        v.dedup_by(|a, b| a.blob == b.blob);
        v
    }
}

/// Why [`Server::bind`] failed: the step, the error and its errno, which the
/// daemon decides on (EBUSY opening the device: another daemon holds it), so
/// the message is added beside the errno and never replaces it.
#[derive(Debug)]
pub struct BindError {
    step: BindStep,
    context: String,
    errno: Option<i32>,
    error: io::Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindStep {
    Settings,
    Open,
    /// `dir`, `tag`.
    Command,
    /// `bind ondemand`.
    Bind,
}

impl BindError {
    fn new(step: BindStep, context: String, error: io::Error) -> Self {
        BindError {
            step,
            context,
            errno: lazypull_cachefiles::device::os_error(&error),
            error,
        }
    }

    /// Opening the device at `path` failed with `error`.
    pub fn open(path: &std::path::Path, error: io::Error) -> Self {
        Self::new(
            BindStep::Open,
            format!("cannot open {}", path.display()),
            error,
        )
    }

    /// The errno of the failure, when the kernel answered with one.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.errno
    }

    /// Whether another process holds the device (only one may open it; the
    /// kernel answers EBUSY: fs/cachefiles/daemon.c, cachefiles_daemon_open).
    pub fn device_busy(&self) -> bool {
        self.step == BindStep::Open && self.errno == Some(libc::EBUSY)
    }

    fn hint(&self) -> &'static str {
        match (self.step, self.errno) {
            (BindStep::Open, Some(libc::ENOENT)) => " (this kernel has no cachefiles: CONFIG_CACHEFILES is not set or the module is not loaded)",
            (BindStep::Open, Some(libc::EBUSY)) => " (another daemon holds the device: only one process may open it)",
            (BindStep::Open, Some(libc::EPERM | libc::EACCES)) => " (needs root / CAP_SYS_ADMIN)",
            (BindStep::Bind, Some(libc::EOPNOTSUPP)) => " (the cache dir's file system lacks what cachefiles needs, e.g. tmpfs; use ext4/xfs; or this kernel lacks CONFIG_CACHEFILES_ONDEMAND)",
            (BindStep::Bind, Some(libc::EINVAL)) => " (kernel without CONFIG_CACHEFILES_ONDEMAND?)",
            _ => "",
        }
    }
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.context.is_empty() {
            write!(f, "{}: ", self.context)?;
        }
        // The error is part of this message (not a `source`), so that chains
        // printed with `{:#}` name it once.
        write!(f, "{}{}", self.error, self.hint())
    }
}

impl std::error::Error for BindError {}

/// A bound cachefiles cache, ready to serve.
pub struct Server {
    device: CacheDevice,
    config: Config,
    resolver: Arc<dyn BlobResolver>,
    stats: Arc<Stats>,
    objects: OpenObjects,
    /// Keeps the cache within `cache_limit`; stopped when serving ends.
    culler: Option<Culler>,
}

impl Server {
    /// Opens the device and binds the cache in on-demand mode.
    pub fn bind(config: Config, resolver: Arc<dyn BlobResolver>) -> Result<Self, BindError> {
        let settings = |e: io::Error| BindError::new(BindStep::Settings, String::new(), e);
        config
            .policy
            .validate()
            .map_err(|e| settings(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        if config.max_in_flight == 0 {
            return Err(settings(io::Error::new(
                io::ErrorKind::InvalidInput,
                "max_in_flight must be at least 1",
            )));
        }
        let device =
            CacheDevice::open(&config.device).map_err(|e| BindError::open(&config.device, e))?;
        let command = |e| BindError::new(BindStep::Command, String::new(), e);
        device
            .send(&Command::Dir(config.cache_dir.clone()))
            .map_err(command)?;
        device
            .send(&Command::Tag(config.tag.clone()))
            .map_err(command)?;
        device
            .send(&Command::BindOndemand)
            .map_err(|e| BindError::new(BindStep::Bind, String::new(), e))?;
        info!(
            cache_dir = %config.cache_dir.display(),
            tag = %config.tag,
            max_in_flight = config.max_in_flight,
            fill_window = config.policy.window,
            "cachefiles cache bound in on-demand mode"
        );
        Self::with(device, config, resolver)
            .map_err(|e| BindError::new(BindStep::Settings, "starting the culler".into(), e))
    }

    fn with(
        device: CacheDevice,
        config: Config,
        resolver: Arc<dyn BlobResolver>,
    ) -> io::Result<Self> {
        let stats = Arc::new(Stats::default());
        let map: Arc<Mutex<HashMap<u32, Arc<Object>>>> = Arc::default();
        let culler = match &config.cull {
            Some(cull) => {
                let open = map.clone();
                let open_keys = move || -> Vec<String> {
                    open.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .values()
                        .map(|o| cachefiles_cull::object_key(&o.volume, &o.cookie))
                        .collect()
                };
                Some(Culler::start(
                    device.as_fd().try_clone_to_owned()?,
                    config.cache_dir.clone(),
                    cull.clone(),
                    Arc::new(open_keys),
                )?)
            }
            None => None,
        };
        Ok(Server {
            device,
            objects: OpenObjects {
                map,
                policy: config.policy,
                stats: stats.clone(),
                budget: culler.as_ref().map(|c| c.budget().clone()),
            },
            culler,
            config,
            resolver,
            stats,
        })
    }

    /// Serves a cache a previous daemon bound (its device fd kept by an fd
    /// store or passed over), with the objects it handed over, and writes
    /// `restore`: the kernel hands out again every request that daemon had
    /// read and not answered (Linux 6.8+). Objects whose blob no longer
    /// resolves are dropped (closing their fd closes the object; the kernel
    /// reopens it on the next read).
    pub fn adopt(
        config: Config,
        resolver: Arc<dyn BlobResolver>,
        device: CacheDevice,
        handed: Vec<HandedObject>,
    ) -> io::Result<Self> {
        let server = Self::with(device, config, resolver)?;
        {
            let mut map = server.objects.lock();
            for h in handed {
                match server.resolver.resolve(&h.volume, &h.cookie) {
                    Ok(blob) if blob.size() == h.size => {
                        // What the previous daemon wrote is in the cache
                        // file: status and fills know it.
                        let filled = fill_map_from_extents(
                            h.fd.as_fd(),
                            h.size,
                            server.config.policy.window,
                        );
                        map.insert(
                            h.object_id,
                            Arc::new(Object {
                                id: h.object_id,
                                fd: AnonFd::from_owned(h.fd),
                                blob,
                                size: h.size,
                                filled,
                                volume: h.volume,
                                cookie: h.cookie,
                                stream: Stream::default(),
                                // Its map is the cache file's already.
                                learnt: AtomicBool::new(true),
                                budget: server.objects.budget.clone(),
                            }),
                        );
                    }
                    Ok(blob) => warn!(
                        object = h.object_id,
                        blob = blob.name(),
                        "handed-over object has size {} but its blob now has {}; closed",
                        h.size,
                        blob.size()
                    ),
                    Err(e) => warn!(object = h.object_id, "handed-over object closed: {e}"),
                }
            }
        }
        let objects = server.objects.lock().len();
        server.device.send(&Command::Restore).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{e} (`restore` needs Linux 6.8+; requests the previous daemon had taken stay lost)"),
            )
        })?;
        info!(
            objects,
            "took over the cachefiles cache; `restore` re-queued requests in flight"
        );
        Ok(server)
    }

    /// A duplicate of the device fd, to keep the cache bound elsewhere.
    pub fn device_fd(&self) -> io::Result<OwnedFd> {
        self.device.as_fd().try_clone_to_owned()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The objects the kernel has open (for prefetch and status).
    pub fn objects(&self) -> OpenObjects {
        self.objects.clone()
    }

    /// Serves requests until `shutdown` resolves, then waits (bounded) for READs
    /// and OPENs in flight and returns. Dropping the device afterwards unbinds
    /// the cache. A failed read of the device ends serving (with that error)
    /// only when the device is lost (EBADF, ENODEV, ENXIO); any other is counted
    /// (`device_read_errors`), logged and retried after a short backoff.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> io::Result<StatsSnapshot> {
        let Server {
            device,
            config,
            resolver,
            stats,
            objects,
            culler,
        } = self;
        let served =
            serve_device(DeviceFd(device), config, resolver, stats, objects, shutdown).await;
        if let Some(culler) = culler {
            let _ = tokio::task::spawn_blocking(move || culler.stop()).await;
        }
        served
    }
}

/// The kernel's side of the connection as the serving loop sees it: requests
/// in, replies out, readable when a request is pending. The device, or a model
/// of it in tests.
trait Device: Reply + AsFd + Send + Sync + 'static {
    /// Takes the next pending request off the device; `Ok(None)` when none is pending.
    fn recv(&self) -> io::Result<Option<Received>>;
}

impl Reply for DeviceFd {
    fn send(&self, cmd: &Command) -> io::Result<()> {
        self.0.send(cmd)
    }
}

impl AsFd for DeviceFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Device for DeviceFd {
    fn recv(&self) -> io::Result<Option<Received>> {
        self.0.recv()
    }
}

/// A duplicate of the device's fd, registered with the reactor for readiness
/// (epoll reports the open file description's readiness, whichever of its fds
/// was registered).
struct Readiness(OwnedFd);

impl AsRawFd for Readiness {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// After a transient error reading the device the loop reads it again after
/// this pause, doubled while the errors go on, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Transient device errors are logged at most once per this interval (saying
/// how many were not); the `device_read_errors` counter counts every one.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Most OPENs resolved at once. Resolving may wait on the network (a
/// `--blob-url` blob's size), so further OPENs wait their turn here rather
/// than take every thread of the blocking pool.
const MAX_RESOLVING: usize = 4;
/// Most requests taken off the device in one go before the loop turns to its
/// other work (finished fills and resolved OPENs).
const RECV_BATCH: usize = 64;

/// Whether an error reading the device means it is gone, so that nothing will
/// ever be read from it again and serving must end. Kernel behaviour relied on
/// (fs/cachefiles/ondemand.c, `cachefiles_ondemand_daemon_read`, 6.12): a
/// request whose anonymous fd cannot be installed (EMFILE / ENFILE at the fd
/// limit, ENOMEM, EBUSY from the object id allocator) or copied out (EFAULT) is
/// failed towards its reader and removed, and the read returns that error; the
/// next read returns the next request. A cache that is not bound reads as 0,
/// not as an error. So only our fd going bad (EBADF) or a node that is no
/// longer the device (ENODEV, ENXIO) means the device is lost; everything else
/// is transient and retried.
fn device_lost(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENODEV | libc::ENXIO)
    )
}

/// Transient read errors of the device: the backoff before the next read, and
/// rate-limited logging.
#[derive(Debug, Default)]
struct ReadErrors {
    backoff: Option<Duration>,
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl ReadErrors {
    /// Notes a transient error and returns how long to wait before reading again.
    fn failed(&mut self, e: &io::Error) -> Duration {
        let pause = self.backoff.map_or(RETRY_FIRST, |b| (b * 2).min(RETRY_MAX));
        self.backoff = Some(pause);
        let now = std::time::Instant::now();
        if self
            .logged
            .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_INTERVAL)
        {
            let hint = match e.raw_os_error() {
                Some(libc::EMFILE | libc::ENFILE) => " (the kernel could not give an OPEN its fd: this process is at its open-file limit; that OPEN failed, the rest are served)",
                Some(libc::ENOMEM) => " (the kernel could not allocate for a request; it failed that request)",
                _ => "",
            };
            warn!(
                error = %e,
                retry_in = ?pause,
                not_logged_since_last = self.unlogged,
                "reading the cachefiles device failed; the device is still ours, retrying{hint}"
            );
            self.logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        pause
    }

    /// A read succeeded: the next error starts the backoff afresh.
    fn recovered(&mut self) {
        self.backoff = None;
    }
}

/// The READs taken off the device and not yet finished, by object. At most
/// `total` are filled at once, and one object at most `per_object` of them
/// (one less than `total` when it is above 1): READs stuck on one blob (its
/// server hangs) always leave a fill slot for every other object. The others
/// wait here, in order, never in the serving loop, which keeps reading the
/// device (OPEN, CLOSE, READs of other objects).
#[derive(Debug)]
struct ReadQueue {
    total: usize,
    per_object: usize,
    in_flight: usize,
    objects: HashMap<u32, ObjectReads>,
    /// Objects with READs waiting, in the order they take turns.
    turns: VecDeque<u32>,
}

#[derive(Debug, Default)]
struct ObjectReads {
    waiting: VecDeque<(Arc<Object>, ReadRequest)>,
    in_flight: usize,
}

impl ReadQueue {
    fn new(total: usize) -> Self {
        ReadQueue {
            total,
            per_object: total.saturating_sub(1).max(1),
            in_flight: 0,
            objects: HashMap::new(),
            turns: VecDeque::new(),
        }
    }

    fn push(&mut self, object: Arc<Object>, read: ReadRequest) {
        let reads = self.objects.entry(object.id).or_default();
        if reads.waiting.is_empty() {
            self.turns.push_back(object.id);
        }
        reads.waiting.push_back((object, read));
    }

    /// The next READ to fill, if a slot is free for it.
    fn next(&mut self) -> Option<(Arc<Object>, ReadRequest)> {
        if self.in_flight >= self.total {
            return None;
        }
        for _ in 0..self.turns.len() {
            let id = self.turns.pop_front()?;
            let reads = self
                .objects
                .get_mut(&id)
                .expect("an object in turn has READs");
            if reads.in_flight >= self.per_object {
                self.turns.push_back(id);
                continue;
            }
            let next = reads
                .waiting
                .pop_front()
                .expect("an object in turn has READs waiting");
            reads.in_flight += 1;
            self.in_flight += 1;
            if !reads.waiting.is_empty() {
                self.turns.push_back(id);
            }
            return Some(next);
        }
        None
    }

    /// A READ of object `id` finished.
    fn finished(&mut self, id: u32) {
        self.in_flight -= 1;
        if let Some(reads) = self.objects.get_mut(&id) {
            reads.in_flight -= 1;
            if reads.in_flight == 0 && reads.waiting.is_empty() {
                self.objects.remove(&id);
            }
        }
    }

    fn waiting(&self) -> usize {
        self.objects.values().map(|r| r.waiting.len()).sum()
    }

    fn is_idle(&self) -> bool {
        self.objects.is_empty()
    }
}

/// What the serving loop has in hand besides the device: READs being filled
/// or waiting for a slot, OPENs being resolved or waiting their turn.
struct Work<'a> {
    config: &'a Config,
    resolver: &'a Arc<dyn BlobResolver>,
    stats: &'a Arc<Stats>,
    objects: &'a OpenObjects,
    reads: ReadQueue,
    fills: JoinSet<u32>,
    opens: VecDeque<PendingOpen>,
    resolving: JoinSet<Resolved>,
    readahead: Option<Arc<ReadAheadPool>>,
    /// Meta blobs being filled whole after their copen ([`fill_up_front`]).
    up_front: JoinSet<()>,
    /// Set when serving ends: up-front fills stop between pieces.
    stopping: Arc<AtomicBool>,
}

impl Work<'_> {
    fn take(&mut self, dev: &dyn Reply, received: Received) {
        match dispatch(dev, received, self.objects, self.stats) {
            Dispatched::Done => {}
            Dispatched::Read(object, read) => self.reads.push(object, read),
            Dispatched::Open(open) => self.opens.push_back(open),
        }
    }

    /// Starts whatever READs and OPENs have a slot.
    fn start(&mut self) {
        while let Some((object, read)) = self.reads.next() {
            let stats = self.stats.clone();
            let policy = self.config.policy;
            let ahead = self.readahead.clone().map(|pool| ReadAhead {
                pool,
                distance: self.config.readahead,
                stats: stats.clone(),
            });
            self.fills.spawn_blocking(move || {
                let filled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    serve_read(&object, read, &policy, &stats, ahead.as_ref())
                }));
                if filled.is_err() {
                    bump(&stats.read_failures, 1);
                    error!(
                        object = object.id,
                        msg_id = read.msg_id,
                        "READ fill panicked (a bug); completed so the reader gets EIO"
                    );
                }
                object.id
            });
        }
        while self.resolving.len() < MAX_RESOLVING {
            let Some(open) = self.opens.pop_front() else {
                break;
            };
            let resolver = self.resolver.clone();
            self.resolving
                .spawn_blocking(move || resolve_open(open, resolver.as_ref()));
        }
    }

    fn fill_done(&mut self, done: Result<u32, tokio::task::JoinError>) {
        match done {
            Ok(object_id) => self.reads.finished(object_id),
            // Fills catch their panics and are never aborted while serving.
            Err(e) => error!("a READ fill task failed: {e}"),
        }
    }

    fn open_done(&mut self, dev: &dyn Reply, done: Result<Resolved, tokio::task::JoinError>) {
        match done {
            Ok(resolved) => {
                if let Some(object) =
                    finish_open(dev, resolved, self.objects, &self.config.policy, self.stats)
                {
                    self.start_up_front(object);
                }
            }
            // resolve_open catches panics; this task is never aborted while serving.
            Err(e) => error!("an OPEN's resolving task failed: {e}"),
        }
    }

    /// Fills a just-opened meta blob whole, off the serving task (the copen
    /// has been written: the OPEN's answer never waits for it).
    fn start_up_front(&mut self, object: Arc<Object>) {
        if !is_meta_blob(&object.volume, &object.cookie)
            || object.size == 0
            || object.size > self.config.meta_up_front_max
        {
            return;
        }
        let objects = self.objects.clone();
        let policy = self.config.policy;
        let stats = self.stats.clone();
        let stopping = self.stopping.clone();
        self.up_front.spawn_blocking(move || {
            let filled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                fill_up_front(&object, &objects, &policy, &stats, &stopping)
            }));
            if filled.is_err() {
                bump(&stats.meta_up_front_failures, 1);
                error!(
                    object = object.id,
                    "filling the meta blob up front panicked (a bug); READs fill it"
                );
            }
        });
    }

    fn is_idle(&self) -> bool {
        self.reads.is_idle()
            && self.opens.is_empty()
            && self.resolving.is_empty()
            && self.up_front.is_empty()
    }
}

/// Whether an OPEN's keys name an image's meta blob: EROFS names the
/// primary device's cookie by the `fsid` mount option and, without
/// `domain_id`, the volume `erofs,<fsid>` (fs/erofs/fscache.c,
/// `erofs_fscache_register_volume` / `_register_fs`). With a `domain_id`
/// the volume is `erofs,<domain>`: the keys do not tell a meta blob from a
/// data blob there, and it is filled on READs like any blob.
fn is_meta_blob(volume: &[u8], cookie: &[u8]) -> bool {
    volume.strip_prefix(b"erofs,") == Some(cookie) && !cookie.is_empty()
}

/// How much [`fill_up_front`] claims and fills per call of
/// [`lazypull_engine::fill`], in windows: a READ racing with it waits for at
/// most this much of its work (the mount's own READ of the superblock races
/// with the first piece), and a CLOSE or shutdown stops it between pieces.
const UP_FRONT_PIECE_WINDOWS: u64 = 1;

/// How long [`fill_up_front`] waits for the kernel to open the object's cache
/// file after the copen before it leaves the blob to READs.
const UP_FRONT_OPEN_WAIT: Duration = Duration::from_secs(10);

/// Fills a meta blob (small, read through by every walk and lookup) whole
/// into its cache object, so that the mount's walk finds it in the kernel's
/// cache file instead of sending a READ per miss. Runs on the blocking pool
/// right after the copen. Windows go through the object's fill map like a
/// READ's: one claimed by a READ racing with this fill is waited for, never
/// written twice, and a READ of a window claimed here waits for at most one
/// piece. On any failure it stops: what is not filled is filled by READs.
fn fill_up_front(
    object: &Arc<Object>,
    objects: &OpenObjects,
    policy: &FillPolicy,
    stats: &Stats,
    stopping: &AtomicBool,
) {
    let started = std::time::Instant::now();
    let open = || {
        !stopping.load(Ordering::Acquire)
            && objects
                .lock()
                .get(&object.id)
                .is_some_and(|o| Arc::ptr_eq(o, object))
    };
    // Kernel behaviour relied on (fs/cachefiles, 6.12): the OPEN is sent from
    // `cachefiles_ondemand_init_object`, before `cachefiles_look_up_object`
    // opens (or creates) the backing cache file; until then the anonymous
    // fd's write and llseek fail with ENOBUFS (`object->file` is NULL). So
    // wait for an llseek to succeed, in short sleeps (it takes the kernel
    // well under a millisecond natively, a few under TCG).
    let mut pause = Duration::from_micros(100);
    loop {
        if !open() {
            return;
        }
        match rustix::fs::seek(object.fd.as_fd(), rustix::fs::SeekFrom::End(0)) {
            Ok(_) => break,
            Err(rustix::io::Errno::NOBUFS) if started.elapsed() < UP_FRONT_OPEN_WAIT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(e) => {
                bump(&stats.meta_up_front_failures, 1);
                warn!(
                    object = object.id,
                    blob = object.blob.name(),
                    waited = ?started.elapsed(),
                    "the kernel has not opened the meta blob's cache file ({e}); READs fill it"
                );
                return;
            }
        }
    }
    let ready = started.elapsed();
    // What an earlier mount left in the cache file is not filled again.
    object.learn_cache_file(policy.window);
    let mut buf = AlignedBuf::new(policy.buffer_size_for(object.blob.as_ref()));
    let target = Target {
        source: object.blob.as_ref(),
        object_size: object.size,
        map: &object.filled,
        sink: &AnonSink(object),
        priority: Priority::Foreground,
    };
    let piece = UP_FRONT_PIECE_WINDOWS * policy.window;
    let (mut bytes, mut windows, mut overlapped) = (0u64, 0u64, 0u64);
    let mut off = 0u64;
    while off < object.size {
        if !open() {
            debug!(
                object = object.id,
                "meta blob's up-front fill stopped: closed or shutting down"
            );
            return;
        }
        match fill(&target, off, piece, policy, &mut buf) {
            Ok(out) => {
                bytes += out.bytes_written;
                windows += out.windows_written;
                overlapped += out.windows_overlapped;
                bump(&stats.bytes_written, out.bytes_written);
                bump(&stats.windows_written, out.windows_written);
                bump(&stats.meta_up_front_bytes, out.bytes_written);
            }
            Err(e) => {
                bump(&stats.meta_up_front_failures, 1);
                warn!(
                    object = object.id,
                    blob = object.blob.name(),
                    "filling the meta blob up front failed (READs fill the rest): {e}"
                );
                return;
            }
        }
        off += piece;
    }
    bump(&stats.meta_up_front_objects, 1);
    info!(
        object = object.id,
        blob = object.blob.name(),
        bytes,
        windows,
        windows_already_filled = overlapped,
        cache_file_open_us = ready.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "meta blob filled up front"
    );
}

async fn serve_device<D: Device>(
    device: D,
    config: Config,
    resolver: Arc<dyn BlobResolver>,
    stats: Arc<Stats>,
    open_objects: OpenObjects,
    shutdown: impl Future<Output = ()>,
) -> io::Result<StatsSnapshot> {
    // SAFETY: `Readiness` owns its OwnedFd and never replaces it, so the
    // registered fd stays open and the same for the whole life of the AsyncFd.
    let readiness = unsafe {
        AsyncFd::register_with_interest(
            Readiness(device.as_fd().try_clone_to_owned()?),
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| e.into_parts().1)?;
    let readahead = if config.readahead > 0 {
        Some(ReadAheadPool::start(
            lazypull_engine::readahead::default_threads(),
        )?)
    } else {
        None
    };
    let mut work = Work {
        config: &config,
        resolver: &resolver,
        stats: &stats,
        objects: &open_objects,
        reads: ReadQueue::new(config.max_in_flight),
        fills: JoinSet::new(),
        opens: VecDeque::new(),
        resolving: JoinSet::new(),
        readahead: readahead.clone(),
        up_front: JoinSet::new(),
        stopping: Arc::new(AtomicBool::new(false)),
    };
    let mut errors = ReadErrors::default();
    // While set, the device is not read (a pause after a transient error).
    let mut retry_at: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    // Nothing here waits for a fill slot or a resolver: READs and OPENs are
    // queued and run on the blocking pool, and this loop only moves them on.
    let served: io::Result<()> = 'serve: loop {
        tokio::select! {
            _ = &mut shutdown => break 'serve Ok(()),
            Some(done) = work.resolving.join_next(), if !work.resolving.is_empty() => {
                work.open_done(&device, done);
            }
            Some(done) = work.fills.join_next(), if !work.fills.is_empty() => {
                work.fill_done(done);
            }
            // Up-front fills catch their panics and report through stats and logs.
            Some(_) = work.up_front.join_next(), if !work.up_front.is_empty() => {}
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() => {
                retry_at = None;
            }
            ready = readiness.readable(), if retry_at.is_none() => {
                let mut ready = match ready {
                    Ok(r) => r,
                    Err(e) => break 'serve Err(e),
                };
                for _ in 0..RECV_BATCH {
                    match device.recv() {
                        Ok(Some(received)) => {
                            errors.recovered();
                            work.take(&device, received);
                        }
                        Ok(None) => {
                            ready.clear_ready();
                            break;
                        }
                        Err(e) if device_lost(&e) => {
                            error!(error = %e, "the cachefiles device is lost: serving ends");
                            break 'serve Err(e);
                        }
                        Err(e) => {
                            bump(&stats.device_read_errors, 1);
                            // Readiness stays set: the device is read again after the pause.
                            retry_at = Some(tokio::time::Instant::now() + errors.failed(&e));
                            break;
                        }
                    }
                }
            }
        }
        work.start();
    };
    info!(
        in_flight = work.reads.in_flight,
        waiting = work.reads.waiting(),
        opens = work.opens.len() + work.resolving.len(),
        "shutting down: waiting for READs and OPENs in flight"
    );
    // Whatever is still queued or running when the drain times out is left to
    // the kernel: after a handover the successor's `restore` hands it out
    // again; after a shutdown the unbind fails it. Up-front fills stop at
    // their next piece (READs of what they leave are served by the successor).
    work.stopping.store(true, Ordering::Release);
    let drained = tokio::time::timeout(config.drain_timeout, async {
        work.start();
        while !work.is_idle() {
            tokio::select! {
                Some(done) = work.resolving.join_next(), if !work.resolving.is_empty() => {
                    work.open_done(&device, done);
                }
                Some(done) = work.fills.join_next(), if !work.fills.is_empty() => {
                    work.fill_done(done);
                }
                Some(_) = work.up_front.join_next(), if !work.up_front.is_empty() => {}
                else => break,
            }
            work.start();
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            "READs or OPENs still in flight after {:?}; exiting anyway",
            config.drain_timeout
        );
    }
    // Read-ahead: running jobs see the stop flag between windows, queued ones
    // are dropped; the threads are joined off the runtime. Fills that did not
    // drain hold a reference and their own read-ahead finds the pool stopped.
    work.readahead = None;
    if let Some(pool) = readahead {
        let _ = tokio::task::spawn_blocking(move || pool.stop()).await;
    }
    let snapshot = stats.snapshot();
    info!(
        ?snapshot,
        open_objects = open_objects.lock().len(),
        "cachefiles server stopped"
    );
    served.map(|()| snapshot)
}

/// Where `copen` replies go: the device, or a recorder in tests.
trait Reply {
    fn send(&self, cmd: &Command) -> io::Result<()>;
}

impl Reply for CacheDevice {
    fn send(&self, cmd: &Command) -> io::Result<()> {
        CacheDevice::send(self, cmd)
    }
}

/// What became of one request taken off the device.
enum Dispatched {
    /// Answered (or refused) already.
    Done,
    /// A READ, for a worker to fill.
    Read(Arc<Object>, ReadRequest),
    /// An OPEN, to be resolved off the serving task ([`resolve_open`]) and
    /// then answered ([`finish_open`]).
    Open(PendingOpen),
}

/// An OPEN whose blob is still to be resolved.
struct PendingOpen {
    open: OpenRequest,
    fd: AnonFd,
    /// When it was taken off the device (for the OPEN's log line: the
    /// daemon's share of a mount).
    received: std::time::Instant,
}

/// An OPEN with its blob resolved (or the reason it is not).
struct Resolved {
    open: OpenRequest,
    fd: AnonFd,
    blob: Result<Arc<dyn BlobSource>, OpenError>,
    received: std::time::Instant,
    resolve_us: u64,
}

/// Handles one request on the serving task, never blocking: CLOSE and
/// malformed requests are answered here; a READ is returned for a worker to
/// fill, an OPEN to be resolved. The objects lock is held only to look up,
/// insert or remove.
fn dispatch(
    dev: &dyn Reply,
    received: Received,
    objects: &OpenObjects,
    stats: &Stats,
) -> Dispatched {
    let Received { request, anon_fd } = received;
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            bump(&stats.malformed, 1);
            error!(error = %e, "malformed request from the kernel; ignored");
            // A readable msg_id of a malformed OPEN gets refused so the mount fails
            // instead of waiting forever. Its fd (if any) closes as `anon_fd` drops.
            if let (Some(msg_id), Some(_)) = (e.msg_id(), &anon_fd) {
                let _ = dev.send(&Command::CopenError {
                    msg_id,
                    errno: libc::EINVAL,
                });
            }
            return Dispatched::Done;
        }
    };
    match request {
        Request::Open(open) => {
            let Some(fd) = anon_fd else {
                bump(&stats.open_failures, 1);
                error!(
                    msg_id = open.msg_id,
                    fd = open.fd,
                    "OPEN carried an invalid fd; refused"
                );
                let _ = dev.send(&Command::CopenError {
                    msg_id: open.msg_id,
                    errno: libc::EBADF,
                });
                return Dispatched::Done;
            };
            debug!(
                msg_id = open.msg_id,
                object = open.object_id,
                cookie = %String::from_utf8_lossy(open.cookie()),
                "OPEN"
            );
            Dispatched::Open(PendingOpen {
                open,
                fd,
                received: std::time::Instant::now(),
            })
        }
        Request::Close(close) => {
            bump(&stats.closes, 1);
            // Kernel behaviour relied on (fs/cachefiles/ondemand.c, 6.12):
            // cachefiles_ondemand_send_req queues a CLOSE only for an object that
            // is open, and an object becomes open only when our `copen` for it is
            // processed; so a CLOSE never names an object whose OPEN is still
            // being resolved, and removing it here cannot race its insert.
            let removed = objects.lock().remove(&close.object_id);
            match removed {
                // Workers still filling hold their own reference; the fd closes when
                // the last of them finishes.
                Some(obj) => {
                    obj.stream.cancel();
                    if let Some(budget) = &objects.budget {
                        budget.closed(&obj.volume, &obj.cookie);
                    }
                    info!(
                        object = close.object_id,
                        blob = obj.blob.name(),
                        windows_filled = obj.filled.filled_windows(),
                        "CLOSE: object released"
                    )
                }
                None => warn!(object = close.object_id, "CLOSE for an unknown object"),
            }
            Dispatched::Done
        }
        Request::Read(read) => {
            bump(&stats.reads, 1);
            debug!(
                msg_id = read.msg_id,
                object = read.object_id,
                off = read.off,
                len = read.len,
                "READ"
            );
            let object = objects.lock().get(&read.object_id).cloned();
            match object {
                Some(obj) => Dispatched::Read(obj, read),
                None => {
                    bump(&stats.unknown_objects, 1);
                    error!(
                        msg_id = read.msg_id,
                        object = read.object_id,
                        "READ for an object this daemon never opened; cannot complete it"
                    );
                    Dispatched::Done
                }
            }
        }
    }
}

/// Resolves an OPEN's blob: on a blocking worker, as it may wait on the
/// network. A panicking resolver refuses the OPEN (EIO) rather than leave the
/// kernel waiting for an answer.
fn resolve_open(pending: PendingOpen, resolver: &dyn BlobResolver) -> Resolved {
    let PendingOpen { open, fd, received } = pending;
    let started = std::time::Instant::now();
    let blob = std::panic::catch_unwind(AssertUnwindSafe(|| {
        resolver.resolve(open.volume(), open.cookie())
    }))
    .unwrap_or_else(|_| {
        Err(OpenError::Io {
            name: String::from_utf8_lossy(open.cookie()).into_owned(),
            path: PathBuf::new(),
            source: io::Error::other("resolving it panicked (a bug)"),
        })
    });
    Resolved {
        open,
        fd,
        blob,
        received,
        resolve_us: started.elapsed().as_micros() as u64,
    }
}

/// Answers a resolved OPEN: registers the object, then `copen`s it (or refuses
/// it with the resolver's errno). Returns the object when the copen went out.
fn finish_open(
    dev: &dyn Reply,
    resolved: Resolved,
    objects: &OpenObjects,
    policy: &FillPolicy,
    stats: &Stats,
) -> Option<Arc<Object>> {
    let Resolved {
        open,
        fd,
        blob,
        received,
        resolve_us,
    } = resolved;
    let volume = String::from_utf8_lossy(open.volume()).into_owned();
    let cookie = String::from_utf8_lossy(open.cookie()).into_owned();
    match blob {
        Ok(blob) => {
            let size = blob.size();
            let object = Arc::new(Object {
                id: open.object_id,
                fd,
                blob,
                size,
                filled: FillMap::new(size, policy.window),
                volume: open.volume().to_vec(),
                cookie: open.cookie().to_vec(),
                stream: Stream::default(),
                learnt: AtomicBool::new(false),
                budget: objects.budget.clone(),
            });
            // Inserted before the copen: the kernel may queue a READ for the object
            // as soon as it processes the copen (cachefiles_ondemand_copen marks
            // the object open and wakes the device), before our write returns,
            // and the loop must then find the object.
            let old = objects.lock().insert(open.object_id, object.clone());
            if let Some(old) = old {
                warn!(
                    object = old.id,
                    "OPEN reused a live object id; the old fd is released"
                );
            }
            match dev.send(&Command::Copen {
                msg_id: open.msg_id,
                size,
            }) {
                Ok(()) => {
                    bump(&stats.opens, 1);
                    // open_us: from taking the OPEN off the device to the
                    // copen written (queueing, resolving, answering).
                    info!(
                        object = open.object_id,
                        %volume,
                        %cookie,
                        size,
                        resolve_us,
                        open_us = received.elapsed().as_micros() as u64,
                        "OPEN: serving blob"
                    );
                    Some(object)
                }
                Err(e) => {
                    // E.g. the reader that caused the OPEN was killed meanwhile: the
                    // kernel dropped the request and refuses its msg_id.
                    bump(&stats.open_failures, 1);
                    objects.lock().remove(&open.object_id);
                    error!(object = open.object_id, %volume, %cookie, error = %e, "copen failed");
                    None
                }
            }
        }
        Err(e) => {
            bump(&stats.open_failures, 1);
            warn!(
                object = open.object_id,
                %volume,
                %cookie,
                errno = e.errno(),
                "OPEN refused: {e}"
            );
            if let Err(err) = dev.send(&Command::CopenError {
                msg_id: open.msg_id,
                errno: e.errno(),
            }) {
                error!(error = %err, "copen (refusal) failed");
            }
            drop(fd);
            None
        }
    }
}

/// What a READ's fill needs to read ahead.
struct ReadAhead {
    pool: Arc<ReadAheadPool>,
    distance: u64,
    stats: Arc<Stats>,
}

/// A READ of `[off, off + len)` of `object`: if its reader moves
/// sequentially, queue the next windows to be written into the object's cache
/// file ahead of it, through its anonymous fd at their offsets.
///
/// Kernel behaviour relied on (fs/cachefiles/ondemand.c and io.c, 6.12):
/// before it sends a READ, cachefiles looks for data in the cache file
/// (`cachefiles_prepare_read` → `cachefiles_ondemand_read` is called only for
/// a range SEEK_DATA/SEEK_HOLE find to be a hole), so a range filled ahead is
/// read from the cache file and never asked for.
fn read_ahead(object: &Arc<Object>, read: &ReadRequest, policy: &FillPolicy, ra: &ReadAhead) {
    let Some(ahead) =
        object
            .stream
            .observe(read.off, read.len, object.size, policy.window, ra.distance)
    else {
        return;
    };
    for ahead in ahead.split(lazypull_engine::readahead::JOB_WINDOWS * policy.window) {
        queue_read_ahead(object, ahead, policy, ra);
    }
}

fn queue_read_ahead(
    object: &Arc<Object>,
    ahead: lazypull_engine::Ahead,
    policy: &FillPolicy,
    ra: &ReadAhead,
) {
    let job_object = object.clone();
    let stats = ra.stats.clone();
    let policy = *policy;
    let queued = ra.pool.submit(move |stopping| {
        let object = job_object;
        let cancelled =
            || stopping.load(Ordering::Acquire) || object.stream.is_stale(ahead.generation);
        let mut buf = AlignedBuf::new(policy.buffer_size_for(object.blob.as_ref()));
        let target = Target {
            source: object.blob.as_ref(),
            object_size: object.size,
            map: &object.filled,
            sink: &AnonSink(&object),
            priority: Priority::Background,
        };
        match fill_ahead(&target, ahead.off, ahead.len, &policy, &mut buf, &cancelled) {
            Ok(out) => {
                bump(&stats.bytes_written, out.bytes_written);
                bump(&stats.windows_written, out.windows_written);
                bump(&stats.readahead_bytes, out.bytes_written);
            }
            Err(e) => {
                bump(&stats.readahead_failures, 1);
                debug!(
                    object = object.id,
                    off = ahead.off,
                    len = ahead.len,
                    "read-ahead failed (a READ of it fetches it again): {e}"
                );
            }
        }
    });
    if !queued {
        bump(&ra.stats.readahead_dropped, 1);
    }
}

/// Fills one READ and completes it, whatever happens: a failure leaves the range
/// unwritten and the kernel fails the reader with EIO.
fn serve_read(
    object: &Arc<Object>,
    read: ReadRequest,
    policy: &FillPolicy,
    stats: &Stats,
    ahead: Option<&ReadAhead>,
) {
    let _complete = Completion {
        object,
        msg_id: read.msg_id,
        started: std::time::Instant::now(),
    };
    object.learn_cache_file(policy.window);
    // Queued before this READ's own fill: the windows after it are fetched
    // while this one is.
    if let Some(ra) = ahead {
        read_ahead(object, &read, policy, ra);
    }
    let mut buf = AlignedBuf::new(policy.buffer_size_for(object.blob.as_ref()));
    let target = Target {
        source: object.blob.as_ref(),
        object_size: object.size,
        map: &object.filled,
        sink: &AnonSink(object),
        priority: Priority::Foreground,
    };
    let result = fill(&target, read.off, read.len, policy, &mut buf);
    match result {
        Ok(out) => {
            bump(&stats.bytes_written, out.bytes_written);
            bump(&stats.windows_written, out.windows_written);
            if out.windows_overlapped > 0 {
                bump(&stats.windows_overlapped, out.windows_overlapped);
                debug!(
                    object = object.id,
                    off = read.off,
                    len = read.len,
                    windows = out.windows_overlapped,
                    "READ covered windows already filled (by a concurrent READ or prefetch): skipped"
                );
            }
        }
        Err(e) => {
            bump(&stats.read_failures, 1);
            error!(
                object = object.id,
                blob = object.blob.name(),
                off = read.off,
                len = read.len,
                "READ failed, the reader gets EIO: {e}"
            );
        }
    }
}

/// Completes a READ when dropped, so that no way out of a fill (success, error,
/// or a panic unwinding through it) leaves the reader waiting forever. An
/// unfilled range stays a hole and the kernel fails the reader with EIO.
struct Completion<'a> {
    object: &'a Object,
    msg_id: u32,
    started: std::time::Instant,
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        match self.object.fd.complete_read(self.msg_id) {
            Ok(()) => debug!(
                msg_id = self.msg_id,
                object = self.object.id,
                fill_us = self.started.elapsed().as_micros() as u64,
                "READ completed"
            ),
            Err(e) => error!(
                object = self.object.id,
                msg_id = self.msg_id,
                error = %e,
                "completing READ failed"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    //! An in-process model of the kernel side: requests are built as the kernel
    //! would send them, "anonymous fds" are plain files standing in for cache
    //! files, and replies are recorded. (The completion ioctl fails on a plain
    //! file; that path only logs.) The real kernel is exercised by the guest tests.
    use super::*;
    use lazypull_cachefiles::{CloseRequest, ParseError};
    use lazypull_source::{LocalDir, OpenError};
    use std::cell::RefCell;
    use std::os::unix::fs::FileExt;

    /// The file standing in for object `object_id`'s cache file (and its anon
    /// fd) in the models below.
    fn open_cache_file(dir: &std::path::Path, object_id: u32) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(object_id.to_string()))
            .unwrap()
    }

    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);
    impl Reply for Recorder {
        fn send(&self, cmd: &Command) -> io::Result<()> {
            self.0.borrow_mut().push(cmd.to_string());
            Ok(())
        }
    }

    struct Model {
        blobs: tempfile::TempDir,
        cache: tempfile::TempDir,
        objects: OpenObjects,
        resolver: Arc<dyn BlobResolver>,
        config: Config,
        stats: Arc<Stats>,
        replies: Recorder,
    }

    impl Model {
        fn new() -> Self {
            let blobs = tempfile::tempdir().unwrap();
            let store = LocalDir::new(blobs.path());
            let resolver = move |_v: &[u8], c: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                Ok(store.open(c)? as Arc<dyn BlobSource>)
            };
            let stats = Arc::new(Stats::default());
            let policy = FillPolicy {
                window: 16384,
                io_size: 8192,
            };
            Model {
                blobs,
                cache: tempfile::tempdir().unwrap(),
                objects: OpenObjects {
                    map: Arc::default(),
                    policy,
                    stats: stats.clone(),
                    budget: None,
                },
                resolver: Arc::new(resolver),
                config: Config {
                    device: "/nonexistent".into(),
                    cache_dir: "/nonexistent".into(),
                    tag: "t".into(),
                    max_in_flight: 1,
                    policy,
                    drain_timeout: Duration::from_secs(1),
                    readahead: 0,
                    meta_up_front_max: DEFAULT_META_UP_FRONT_MAX,
                    cull: None,
                },
                stats,
                replies: Recorder::default(),
            }
        }

        fn cache_file(&self, object_id: u32) -> std::fs::File {
            open_cache_file(self.cache.path(), object_id)
        }

        fn send(&mut self, request: Result<Request, ParseError>, with_fd: bool) {
            let anon_fd = with_fd.then(|| {
                AnonFd::from_owned(
                    self.cache_file(request.as_ref().map_or(0, |r| r.object_id()))
                        .into(),
                )
            });
            match dispatch(
                &self.replies,
                Received { request, anon_fd },
                &self.objects,
                &self.stats,
            ) {
                Dispatched::Done => {}
                Dispatched::Read(object, read) => {
                    serve_read(&object, read, &self.config.policy, &self.stats, None)
                }
                Dispatched::Open(open) => {
                    // The model fills nothing up front (the serving loop's
                    // part: see the Harness tests).
                    let _ = finish_open(
                        &self.replies,
                        resolve_open(open, self.resolver.as_ref()),
                        &self.objects,
                        &self.config.policy,
                        &self.stats,
                    );
                }
            }
        }

        fn open(&mut self, msg_id: u32, object_id: u32, cookie: &str) {
            let req = Request::Open(OpenRequest {
                msg_id,
                object_id,
                volume_key: b"erofs,img\0".to_vec(),
                cookie_key: cookie.as_bytes().to_vec(),
                fd: 0,
                flags: 0,
            });
            self.send(Ok(req), true);
        }

        fn read(&mut self, msg_id: u32, object_id: u32, off: u64, len: u64) {
            let req = Request::Read(ReadRequest {
                msg_id,
                object_id,
                off,
                len,
            });
            self.send(Ok(req), false);
        }

        fn replies(&self) -> Vec<String> {
            self.replies.0.borrow().clone()
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 253) as u8).collect()
    }

    /// The kernel's cache file outlives the object: after an OPEN of a blob
    /// whose cache file already holds whole windows (a remount), status and
    /// the first READ learn them (`Object::learn_cache_file`), so status shows
    /// them cached and read-ahead and fills do not fetch them again.
    #[test]
    fn a_reopened_object_counts_what_its_cache_file_holds() {
        use crate::Prefetch;
        let mut m = Model::new();
        let data = pattern(40_000);
        std::fs::write(m.blobs.path().join("blob1"), &data).unwrap();
        // What an earlier mount left: the second fill window, verified bytes.
        m.cache_file(5)
            .write_all_at(&data[16384..32768], 16384)
            .unwrap();
        m.open(1, 5, "blob1");
        assert_eq!(m.replies(), ["copen 1,40000"]);
        let blobs = m.objects.blobs();
        assert_eq!(blobs.len(), 1);
        assert_eq!(blobs[0].cached_bytes, 16384, "{blobs:?}");
        // A READ inside it (the kernel would not send one; a model can)
        // fetches nothing: the window is filled.
        m.read(2, 5, 20_000, 100);
        assert_eq!(m.stats.snapshot().bytes_written, 0);
    }

    #[test]
    fn open_read_close_serves_blob_bytes_and_releases_the_object() {
        let mut m = Model::new();
        let data = pattern(40_000);
        std::fs::write(m.blobs.path().join("blob1"), &data).unwrap();
        m.open(1, 5, "blob1");
        assert_eq!(m.replies(), ["copen 1,40000"]);
        m.read(2, 5, 20_000, 100);
        let cache = m.cache_file(5);
        let mut got = vec![0u8; 16384];
        cache.read_exact_at(&mut got, 16384).unwrap();
        assert_eq!(
            got,
            data[16384..32768],
            "the whole fill window holds blob bytes"
        );
        let s = m.stats.snapshot();
        assert_eq!(
            (s.opens, s.reads, s.bytes_written, s.read_failures),
            (1, 1, 16384, 0)
        );
        m.send(
            Ok(Request::Close(CloseRequest {
                msg_id: 3,
                object_id: 5,
            })),
            false,
        );
        assert!(
            m.objects.lock().is_empty(),
            "CLOSE drops the object and its fd"
        );
        assert_eq!(m.stats.snapshot().closes, 1);
    }

    #[test]
    fn missing_and_invalid_blobs_are_refused_with_errno() {
        let mut m = Model::new();
        m.open(1, 1, "absent");
        m.open(2, 2, "../etc/passwd");
        assert_eq!(m.replies(), ["copen 1,-2", "copen 2,-22"]);
        assert!(m.objects.lock().is_empty());
        assert_eq!(m.stats.snapshot().open_failures, 2);
    }

    #[test]
    fn truncated_blob_leaves_a_hole_and_counts_a_failure() {
        let mut m = Model::new();
        let path = m.blobs.path().join("b");
        std::fs::write(&path, pattern(65536)).unwrap();
        m.open(1, 1, "b");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        m.read(2, 1, 32768, 4096);
        assert_eq!(m.stats.snapshot().read_failures, 1);
        let len = m.cache_file(1).metadata().unwrap().len();
        assert!(
            len <= 32768,
            "nothing written at or past the truncation: {len}"
        );
    }

    #[test]
    fn malformed_and_unknown_requests_are_counted_and_survived() {
        let mut m = Model::new();
        m.send(
            Err(ParseError::KeysOverrun {
                msg_id: 9,
                volume: 1000,
                cookie: 0,
                available: 3,
            }),
            true,
        );
        assert_eq!(m.replies(), ["copen 9,-22"], "a malformed OPEN is refused");
        m.send(Err(ParseError::ShortHeader { got: 3 }), false);
        m.read(4, 77, 0, 4096);
        let s = m.stats.snapshot();
        assert_eq!((s.malformed, s.unknown_objects), (2, 1));
        // Still serving.
        std::fs::write(m.blobs.path().join("ok"), pattern(4096)).unwrap();
        m.open(5, 3, "ok");
        assert_eq!(m.replies().last().unwrap(), "copen 5,4096");
    }
    /// The device as the serving loop sees it, scripted by a test: every
    /// queued read result is announced by one byte on a socket pair, so the
    /// fake is readable exactly while results are queued. Replies are recorded.
    struct FakeDevice {
        queue: Mutex<std::collections::VecDeque<io::Result<Received>>>,
        /// The loop's end: readable while results are queued.
        bell: std::os::unix::net::UnixDatagram,
        ring: std::os::unix::net::UnixDatagram,
        replies: Mutex<Vec<String>>,
    }

    impl FakeDevice {
        fn new() -> Self {
            let (bell, ring) = std::os::unix::net::UnixDatagram::pair().unwrap();
            bell.set_nonblocking(true).unwrap();
            FakeDevice {
                queue: Mutex::default(),
                bell,
                ring,
                replies: Mutex::default(),
            }
        }

        fn push(&self, item: io::Result<Received>) {
            let mut queue = self.queue.lock().unwrap();
            queue.push_back(item);
            self.ring.send(&[1]).unwrap();
        }

        fn replies(&self) -> Vec<String> {
            self.replies.lock().unwrap().clone()
        }
    }

    struct SharedFake(Arc<FakeDevice>);

    impl Reply for SharedFake {
        fn send(&self, cmd: &Command) -> io::Result<()> {
            self.0.replies.lock().unwrap().push(cmd.to_string());
            Ok(())
        }
    }

    impl AsFd for SharedFake {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.0.bell.as_fd()
        }
    }

    impl Device for SharedFake {
        fn recv(&self) -> io::Result<Option<Received>> {
            let mut queue = self.0.queue.lock().unwrap();
            match self.0.bell.recv(&mut [0u8; 1]) {
                Ok(_) => queue
                    .pop_front()
                    .expect("one byte per queued result")
                    .map(Some),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => panic!("fake device bell: {e}"),
            }
        }
    }

    /// A serving loop on a [`FakeDevice`].
    struct Harness {
        kernel: Arc<FakeDevice>,
        stats: Arc<Stats>,
        objects: OpenObjects,
        cache: tempfile::TempDir,
        serving: tokio::task::JoinHandle<io::Result<StatsSnapshot>>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    }

    /// How long a waiting test lets the loop take before it calls it
    /// blocked: a deadlock guard only (the serving loop answers in
    /// milliseconds when it works; when it is stuck it never does).
    const DEADLOCK_GUARD: Duration = Duration::from_secs(60);

    impl Harness {
        fn start(resolver: Arc<dyn BlobResolver>, max_in_flight: usize) -> Self {
            Self::start_with(resolver, max_in_flight, 0)
        }

        /// With read-ahead of `readahead` bytes.
        fn start_with(
            resolver: Arc<dyn BlobResolver>,
            max_in_flight: usize,
            readahead: u64,
        ) -> Self {
            let config = Config {
                device: "/nonexistent".into(),
                cache_dir: "/nonexistent".into(),
                tag: "t".into(),
                max_in_flight,
                policy: FillPolicy {
                    window: 16384,
                    io_size: 8192,
                },
                drain_timeout: Duration::from_secs(10),
                readahead,
                meta_up_front_max: DEFAULT_META_UP_FRONT_MAX,
                cull: None,
            };
            let stats = Arc::new(Stats::default());
            let objects = OpenObjects {
                map: Arc::default(),
                policy: config.policy,
                stats: stats.clone(),
                budget: None,
            };
            let kernel = Arc::new(FakeDevice::new());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving = tokio::spawn(serve_device(
                SharedFake(kernel.clone()),
                config,
                resolver,
                stats.clone(),
                objects.clone(),
                async move {
                    let _ = stopped.await;
                },
            ));
            Harness {
                kernel,
                stats,
                objects,
                cache: tempfile::tempdir().unwrap(),
                serving,
                stop: Some(stop),
            }
        }

        fn cache_file(&self, object_id: u32) -> std::fs::File {
            open_cache_file(self.cache.path(), object_id)
        }

        /// An OPEN of a data blob `cookie` of image `img`.
        fn open(&self, msg_id: u32, object_id: u32, cookie: &str) {
            self.open_in(msg_id, object_id, "erofs,img", cookie)
        }

        /// An OPEN of `cookie` in volume `volume` (`erofs,<fsid>`: the
        /// cookie `<fsid>` is that image's meta blob).
        fn open_in(&self, msg_id: u32, object_id: u32, volume: &str, cookie: &str) {
            let mut volume_key = volume.as_bytes().to_vec();
            volume_key.push(0);
            let request = Ok(Request::Open(OpenRequest {
                msg_id,
                object_id,
                volume_key,
                cookie_key: cookie.as_bytes().to_vec(),
                fd: 0,
                flags: 0,
            }));
            let anon_fd = Some(AnonFd::from_owned(self.cache_file(object_id).into()));
            self.kernel.push(Ok(Received { request, anon_fd }));
        }

        fn read(&self, msg_id: u32, object_id: u32, off: u64, len: u64) {
            let request = Ok(Request::Read(ReadRequest {
                msg_id,
                object_id,
                off,
                len,
            }));
            self.kernel.push(Ok(Received {
                request,
                anon_fd: None,
            }));
        }

        fn close(&self, msg_id: u32, object_id: u32) {
            let request = Ok(Request::Close(CloseRequest { msg_id, object_id }));
            self.kernel.push(Ok(Received {
                request,
                anon_fd: None,
            }));
        }

        /// The next read of the device fails with `errno`.
        fn fail_read(&self, errno: i32) {
            self.kernel.push(Err(io::Error::from_raw_os_error(errno)));
        }

        /// Waits until `done` holds; fails when the loop ended meanwhile, or
        /// (deadlock guard) when it does not get there at all.
        async fn until(&self, what: &str, done: impl Fn(&Self) -> bool) {
            let start = std::time::Instant::now();
            while !done(self) {
                assert!(
                    !self.serving.is_finished(),
                    "the serving loop ended while waiting for {what}"
                );
                assert!(
                    start.elapsed() < DEADLOCK_GUARD,
                    "{what}: not after {DEADLOCK_GUARD:?}, the serving loop is blocked"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }

        fn replied(&self, reply: &str) -> bool {
            self.kernel.replies().iter().any(|r| r == reply)
        }

        async fn stop(mut self) -> io::Result<StatsSnapshot> {
            drop(self.stop.take());
            self.serving.await.expect("the serving loop panicked")
        }
    }

    fn local_resolver(dir: &std::path::Path) -> Arc<dyn BlobResolver> {
        let store = LocalDir::new(dir);
        Arc::new(
            move |_v: &[u8], c: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                Ok(store.open(c)? as Arc<dyn BlobSource>)
            },
        )
    }

    #[test]
    fn a_failed_bind_keeps_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            device: dir.path().join("no-cachefiles"),
            cache_dir: dir.path().to_path_buf(),
            tag: "t".into(),
            max_in_flight: 1,
            policy: FillPolicy {
                window: 16384,
                io_size: 8192,
            },
            drain_timeout: Duration::from_secs(1),
            readahead: 0,
            meta_up_front_max: 0,
            cull: None,
        };
        let e = match Server::bind(config, local_resolver(dir.path())) {
            Ok(_) => panic!("bound a device that does not exist"),
            Err(e) => e,
        };
        // The daemon decides on the errno (EBUSY: another daemon holds the
        // device), so the message must not replace it.
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        assert!(
            e.to_string().contains("this kernel has no cachefiles"),
            "{e}"
        );
    }

    #[test]
    fn a_busy_device_is_told_apart_from_a_missing_one() {
        let path = std::path::Path::new("/dev/cachefiles");
        let busy = BindError::open(path, io::Error::from_raw_os_error(libc::EBUSY));
        assert!(busy.device_busy());
        assert_eq!(busy.raw_os_error(), Some(libc::EBUSY));
        assert!(
            busy.to_string()
                .starts_with("cannot open /dev/cachefiles: ")
                && busy.to_string().contains("another daemon holds the device"),
            "{busy}"
        );
        let missing = BindError::open(path, io::Error::from_raw_os_error(libc::ENOENT));
        assert!(!missing.device_busy());
        // A command the kernel refused keeps its errno too.
        let refused = BindError::new(
            BindStep::Bind,
            String::new(),
            io::Error::new(
                io::ErrorKind::Unsupported,
                lazypull_cachefiles::device::Refused {
                    command: "bind ondemand".into(),
                    errno: libc::EOPNOTSUPP,
                },
            ),
        );
        assert_eq!(refused.raw_os_error(), Some(libc::EOPNOTSUPP));
        assert!(!refused.device_busy());
        assert!(refused.to_string().contains("e.g. tmpfs"), "{refused}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_read_failing_with_emfile_keeps_serving() {
        let blobs = tempfile::tempdir().unwrap();
        std::fs::write(blobs.path().join("ok"), pattern(4096)).unwrap();
        let h = Harness::start(local_resolver(blobs.path()), 1);
        // The kernel could not install an OPEN's fd (EMFILE: this process is at
        // its fd limit), could not allocate, or the read was interrupted:
        // the device is still ours and has more to say.
        h.fail_read(libc::EMFILE);
        h.fail_read(libc::ENOMEM);
        h.fail_read(libc::EINTR);
        h.open(1, 1, "ok");
        h.until("the copen of an OPEN after transient read errors", |h| {
            h.replied("copen 1,4096")
        })
        .await;
        assert_eq!(h.stats.snapshot().device_read_errors, 3);
        h.read(2, 1, 0, 4096);
        h.until("the READ after the errors", |h| {
            h.stats.snapshot().bytes_written == 4096
        })
        .await;
        // Losing the device itself ends serving, with that error.
        h.fail_read(libc::EBADF);
        let served = h.serving.await.expect("the serving loop panicked");
        let err = served.expect_err("a lost device ends serving");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_resolving_over_the_network_holds_up_no_other_request() {
        let blobs = tempfile::tempdir().unwrap();
        let data = pattern(40_000);
        std::fs::write(blobs.path().join("fast"), &data).unwrap();
        std::fs::write(blobs.path().join("slow"), pattern(5000)).unwrap();
        let local = local_resolver(blobs.path());
        let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let resolver: Arc<dyn BlobResolver> = {
            let entered = entered.clone();
            Arc::new(
                move |v: &[u8], c: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                    if c == b"slow" {
                        // A --blob-url blob whose server takes its time to answer.
                        entered.store(true, Ordering::SeqCst);
                        // Bounded too, so that a loop blocked in here fails the
                        // test (by the guard in `until`) instead of hanging it.
                        let _ = released.lock().unwrap().recv_timeout(DEADLOCK_GUARD);
                    }
                    local.resolve(v, c)
                },
            )
        };
        let h = Harness::start(resolver, 2);
        h.open(1, 1, "fast");
        h.until("copen of the first object", |h| h.replied("copen 1,40000"))
            .await;
        h.open(2, 2, "slow");
        h.until("the slow OPEN reaching its resolver", |_| {
            entered.load(Ordering::SeqCst)
        })
        .await;
        // While that OPEN resolves: a READ of the first object is served, a
        // CLOSE is handled, and the open objects can be listed.
        h.read(3, 1, 20_000, 100);
        h.until("the READ of another object", |h| {
            h.stats.snapshot().windows_written == 1
        })
        .await;
        let mut got = vec![0u8; 16384];
        h.cache_file(1).read_exact_at(&mut got, 16384).unwrap();
        assert_eq!(got, data[16384..32768]);
        assert_eq!(h.objects.list().len(), 1);
        h.close(4, 1);
        h.until("the CLOSE", |h| h.objects.list().is_empty()).await;
        assert_eq!(h.kernel.replies(), ["copen 1,40000"]);
        release.send(()).unwrap();
        h.until("copen of the slow OPEN", |h| h.replied("copen 2,5000"))
            .await;
        assert_eq!(h.objects.list()[0].object_id, 2);
        let s = h.stop().await.unwrap();
        assert_eq!((s.opens, s.closes, s.reads), (2, 1, 1));
    }

    /// A blob whose reads block until the test opens the gate.
    #[derive(Debug)]
    struct Gated {
        data: Vec<u8>,
        open: Mutex<bool>,
        opened: std::sync::Condvar,
        waiting: std::sync::atomic::AtomicUsize,
    }

    impl Gated {
        fn open_gate(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    /// Opens the gate when dropped: however a test ends, its stuck reads
    /// end too (the runtime joins them).
    struct OpenAtEnd(Arc<Gated>);

    impl Drop for OpenAtEnd {
        fn drop(&mut self) {
            self.0.open_gate();
        }
    }

    /// A closed [`Gated`] blob of `data` served for cookie `cookie`, every
    /// other cookie from directory `dir`; the guard opens the gate.
    fn gated_beside(
        data: Vec<u8>,
        cookie: &'static [u8],
        dir: &std::path::Path,
    ) -> (Arc<Gated>, OpenAtEnd, Arc<dyn BlobResolver>) {
        let gated = Arc::new(Gated {
            data,
            open: Mutex::new(false),
            opened: std::sync::Condvar::new(),
            waiting: Default::default(),
        });
        let local = local_resolver(dir);
        let resolver: Arc<dyn BlobResolver> = {
            let gated = gated.clone();
            Arc::new(
                move |v: &[u8], c: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                    if c == cookie {
                        return Ok(gated.clone() as Arc<dyn BlobSource>);
                    }
                    local.resolve(v, c)
                },
            )
        };
        (gated.clone(), OpenAtEnd(gated), resolver)
    }

    impl BlobSource for Gated {
        fn name(&self) -> &str {
            "stuck"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let mut open = self.open.lock().unwrap();
            if !*open {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                while !*open {
                    open = self.opened.wait(open).unwrap();
                }
            }
            let off = off as usize;
            let n = buf.len().min(self.data.len() - off);
            buf[..n].copy_from_slice(&self.data[off..off + n]);
            Ok(n)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_stuck_on_one_blob_stop_no_open_and_no_other_blob() {
        let blobs = tempfile::tempdir().unwrap();
        std::fs::write(blobs.path().join("fast"), pattern(4096)).unwrap();
        let (gated, _open_at_end, resolver) =
            gated_beside(pattern(16 * 16384), b"stuck", blobs.path());
        let h = Harness::start(resolver, 8);
        h.open(1, 1, "stuck");
        h.until("copen of the stuck blob", |h| h.replied("copen 1,262144"))
            .await;
        // Nine READs of one blob whose server hangs (more than max_in_flight).
        for i in 0..9u32 {
            h.read(10 + i, 1, u64::from(i) * 16384, 100);
        }
        h.until("seven READs stuck in their fill", |_| {
            gated.waiting.load(Ordering::SeqCst) >= 7
        })
        .await;
        // A new mount's OPEN and a READ of another blob are served meanwhile.
        h.open(30, 2, "fast");
        h.until("copen of an OPEN behind the stuck READs", |h| {
            h.replied("copen 30,4096")
        })
        .await;
        h.read(31, 2, 0, 4096);
        h.until("a READ of another blob behind the stuck READs", |h| {
            h.stats.snapshot().windows_written == 1
        })
        .await;
        assert_eq!(
            gated.waiting.load(Ordering::SeqCst),
            7,
            "one blob never takes the last fill slot"
        );
        gated.open_gate();
        h.until("every stuck READ, once the server answers", |h| {
            h.stats.snapshot().windows_written == 10
        })
        .await;
        let s = h.stop().await.unwrap();
        assert_eq!((s.reads, s.read_failures, s.windows_written), (10, 0, 10));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_reads_are_read_ahead_into_the_cache_file_and_random_ones_are_not() {
        let w = 16384u64;
        let blobs = tempfile::tempdir().unwrap();
        let data = pattern(40 * w as usize);
        std::fs::write(blobs.path().join("seq"), &data).unwrap();
        let h = Harness::start_with(local_resolver(blobs.path()), 4, 4 * w);
        h.open(1, 1, "seq");
        h.until("copen", |h| h.replied("copen 1,655360")).await;
        // A lone READ, then one far from it: random, nothing read ahead.
        h.read(2, 1, 20 * w, 100);
        h.until("READ 2", |h| h.stats.snapshot().windows_written == 1)
            .await;
        h.read(3, 1, 0, w);
        h.until("READ 3", |h| h.stats.snapshot().windows_written == 2)
            .await;
        assert_eq!(h.stats.snapshot().readahead_bytes, 0);
        // The next READ follows READ 3: read-ahead starts, one window (2)
        // ahead, written through the object's fd at its offset.
        h.read(4, 1, w, w);
        h.until("read-ahead of 1 window", |h| {
            h.stats.snapshot().readahead_bytes == w
        })
        .await;
        h.until("READ 4", |h| h.stats.snapshot().windows_written == 4)
            .await;
        // The kernel would not ask for window 2 (it is data in its cache
        // file); a READ there anyway is found filled and not fetched, and
        // the sequential stream doubles its read-ahead: windows 3 and 4.
        h.read(5, 1, 2 * w, 100);
        h.until("read-ahead of 2 more windows", |h| {
            h.stats.snapshot().readahead_bytes == 3 * w
        })
        .await;
        h.until("READ 5", |h| h.stats.snapshot().windows_overlapped == 1)
            .await;
        let mut got = vec![0u8; 3 * w as usize];
        h.cache_file(1).read_exact_at(&mut got, 2 * w).unwrap();
        assert_eq!(got, data[2 * w as usize..5 * w as usize]);
        // A CLOSE cancels the object's read-ahead; nothing failed.
        h.close(6, 1);
        h.until("the CLOSE", |h| h.objects.list().is_empty()).await;
        let s = h.stop().await.unwrap();
        assert_eq!((s.read_failures, s.readahead_failures), (0, 0));
        assert_eq!(s.reads, 4);
    }

    #[test]
    fn only_an_images_own_fsid_names_its_meta_blob() {
        assert!(is_meta_blob(b"erofs,sha256abc", b"sha256abc"));
        assert!(
            !is_meta_blob(b"erofs,sha256abc", b"sha256def"),
            "a data blob"
        );
        assert!(
            !is_meta_blob(b"erofs,domain", b"sha256abc"),
            "a domain's volume"
        );
        assert!(!is_meta_blob(b"erofs,", b""));
        assert!(!is_meta_blob(b"other,x", b"x"));
    }

    /// A meta blob is filled whole right after its copen, which does not
    /// wait for it; READs racing with that fill share its windows through
    /// the fill map (each window fetched and written once); a data blob is
    /// filled on READs only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_meta_blob_is_filled_whole_after_its_copen_and_racing_reads_share_its_windows() {
        let w = 16384u64;
        let size = 10 * w + 500;
        let blobs = tempfile::tempdir().unwrap();
        std::fs::write(blobs.path().join("data"), pattern(3 * w as usize)).unwrap();
        let (meta, _open_at_end, resolver) =
            gated_beside(pattern(size as usize), b"img", blobs.path());
        let h = Harness::start(resolver, 4);
        h.open_in(1, 1, "erofs,img", "img");
        // Answered while the blob's reads are all blocked.
        h.until("copen of the meta blob", |h| {
            h.replied(&format!("copen 1,{size}"))
        })
        .await;
        h.until("the up-front fill reading the meta blob", |_| {
            meta.waiting.load(Ordering::SeqCst) >= 1
        })
        .await;
        // A READ far ahead of the fill claims its window first; one of the
        // window the fill holds (the first) waits for it.
        h.read(2, 1, 9 * w, 100);
        h.until("the READ far ahead reading the blob", |_| {
            meta.waiting.load(Ordering::SeqCst) >= 2
        })
        .await;
        h.read(3, 1, 10, 100);
        assert_eq!(h.stats.snapshot().meta_up_front_objects, 0);
        meta.open_gate();
        h.until("the meta blob filled up front", |h| {
            h.stats.snapshot().meta_up_front_objects == 1
        })
        .await;
        h.until("READ 3 done", |h| {
            h.stats.snapshot().windows_overlapped == 1
        })
        .await;
        let mut got = vec![0u8; size as usize];
        h.cache_file(1).read_exact_at(&mut got, 0).unwrap();
        assert!(got == meta.data, "the cache file holds the whole meta blob");
        assert_eq!(h.objects.list()[0].windows_filled, 11);

        // A data blob of the same image: only its READ's window.
        h.open_in(4, 2, "erofs,img", "data");
        h.until("copen of the data blob", |h| {
            h.replied(&format!("copen 4,{}", 3 * w))
        })
        .await;
        h.read(5, 2, 0, 100);
        h.until("READ 5", |h| h.stats.snapshot().windows_written == 12)
            .await;
        let s = h.stop().await.unwrap();
        assert_eq!((s.meta_up_front_objects, s.meta_up_front_failures), (1, 0));
        // Every window written once: the READ's window 9 by the READ, the
        // other ten by the up-front fill, the data blob's one by READ 5.
        assert_eq!(s.meta_up_front_bytes, size - w);
        assert_eq!(s.bytes_written, size + w);
        assert_eq!((s.windows_written, s.windows_overlapped), (12, 1));
        assert_eq!((s.reads, s.read_failures), (3, 0));
    }
}
