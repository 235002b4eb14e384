//! The cachefiles on-demand server.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazypull_source::{BlobResolver, BlobSource};
use lazypull_cachefiles::device::Received;
use lazypull_cachefiles::{AnonFd, CacheDevice, Command, OpenRequest, ReadRequest, Request};
use lazypull_engine::{
    fill, AlignedBuf, CacheSink, FillError, FillMap, FillOutcome, FillPolicy, Priority, Target,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

/// Settings of the cachefiles transport.
#[derive(Debug, Clone)]
pub struct Config {
    /// The device node, normally `/dev/cachefiles`.
    pub device: PathBuf,
    /// The cache directory (must be on a file system like ext4; tmpfs is refused).
    pub cache_dir: PathBuf,
    /// The cache tag.
    pub tag: String,
    /// Most READs being filled at once; further requests wait in the kernel.
    pub max_in_flight: usize,
    /// How READs are widened and split.
    pub policy: FillPolicy,
    /// How long shutdown waits for READs in flight.
    pub drain_timeout: Duration,
}

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

struct AnonSink<'a>(&'a AnonFd);

impl CacheSink for AnonSink<'_> {
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }
}

struct DeviceFd(CacheDevice);

impl AsRawFd for DeviceFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The objects the kernel has open, shared between the serving loop and
/// whoever fills them ahead of need (prefetch).
#[derive(Debug, Clone, Default)]
pub struct OpenObjects {
    map: Arc<Mutex<HashMap<u32, Arc<Object>>>>,
    policy: FillPolicy,
    stats: Arc<Stats>,
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
        let mut buf = AlignedBuf::new(self.policy.buffer_size_for(object.blob.as_ref()));
        let target = Target {
            source: object.blob.as_ref(),
            object_size: object.size,
            map: &object.filled,
            sink: &AnonSink(&object.fd),
            priority: Priority::Background,
        };
        let out = fill(&target, off, len, &self.policy, &mut buf)?;
        bump(&self.stats.prefetched_bytes, out.bytes_written);
        Ok(Some(out))
    }

    fn blobs(&self) -> Vec<crate::BlobCacheInfo> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .map(|o| crate::BlobCacheInfo {
                blob: o.blob.name().to_owned(),
                size: o.size,
                cached_bytes: o.filled.filled_bytes(o.size),
                source: o.blob.source_stats(),
                local_file: o.blob.local_path().is_some(),
            })
            .collect();
        v.sort_by(|a, b| a.blob.cmp(&b.blob));
        v.dedup_by(|a, b| a.blob == b.blob);
        v
    }
}

/// A bound cachefiles cache, ready to serve.
pub struct Server {
    device: CacheDevice,
    config: Config,
    resolver: Arc<dyn BlobResolver>,
    stats: Arc<Stats>,
    objects: OpenObjects,
}

impl Server {
    /// Opens the device and binds the cache in on-demand mode.
    pub fn bind(config: Config, resolver: Arc<dyn BlobResolver>) -> io::Result<Self> {
        config
            .policy
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if config.max_in_flight == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "max_in_flight must be at least 1",
            ));
        }
        let device = CacheDevice::open(&config.device).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) => " (this kernel has no cachefiles: CONFIG_CACHEFILES is not set or the module is not loaded)",
                Some(libc::EBUSY) => " (another daemon holds the device: only one process may open it)",
                Some(libc::EPERM) | Some(libc::EACCES) => " (needs root / CAP_SYS_ADMIN)",
                _ => "",
            };
            io::Error::new(e.kind(), format!("cannot open {}: {e}{hint}", config.device.display()))
        })?;
        device.send(&Command::Dir(config.cache_dir.clone()))?;
        device.send(&Command::Tag(config.tag.clone()))?;
        device.send(&Command::BindOndemand).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => " (the cache dir's file system lacks what cachefiles needs, e.g. tmpfs; use ext4/xfs; or this kernel lacks CONFIG_CACHEFILES_ONDEMAND)",
                Some(libc::EINVAL) => " (kernel without CONFIG_CACHEFILES_ONDEMAND?)",
                _ => "",
            };
            io::Error::new(e.kind(), format!("{e}{hint}"))
        })?;
        info!(
            cache_dir = %config.cache_dir.display(),
            tag = %config.tag,
            max_in_flight = config.max_in_flight,
            fill_window = config.policy.window,
            "cachefiles cache bound in on-demand mode"
        );
        Ok(Self::with(device, config, resolver))
    }

    fn with(device: CacheDevice, config: Config, resolver: Arc<dyn BlobResolver>) -> Self {
        let stats = Arc::new(Stats::default());
        Server {
            device,
            objects: OpenObjects {
                map: Arc::default(),
                policy: config.policy,
                stats: stats.clone(),
            },
            config,
            resolver,
            stats,
        }
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
        let server = Self::with(device, config, resolver);
        {
            let mut map = server.objects.lock();
            for h in handed {
                match server.resolver.resolve(&h.volume, &h.cookie) {
                    Ok(blob) if blob.size() == h.size => {
                        map.insert(
                            h.object_id,
                            Arc::new(Object {
                                id: h.object_id,
                                fd: AnonFd::from_owned(h.fd),
                                blob,
                                size: h.size,
                                filled: FillMap::new(h.size, server.config.policy.window),
                                volume: h.volume,
                                cookie: h.cookie,
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
    /// in flight and returns. Dropping the device afterwards unbinds the cache.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> io::Result<StatsSnapshot> {
        let Server {
            device,
            config,
            resolver,
            stats,
            objects: open_objects,
        } = self;
        // SAFETY: `DeviceFd` owns the device's OwnedFd and never replaces it, so the
        // registered fd stays open and the same for the whole life of the AsyncFd.
        let device = unsafe {
            AsyncFd::register_with_interest(DeviceFd(device), tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        let slots = Arc::new(Semaphore::new(config.max_in_flight));
        tokio::pin!(shutdown);
        'serve: loop {
            let mut ready = tokio::select! {
                _ = &mut shutdown => break 'serve,
                ready = device.readable() => ready?,
            };
            loop {
                let received = match ready.get_inner().0.recv() {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) => {
                        error!(error = %e, "reading the cachefiles device failed");
                        return Err(e);
                    }
                };
                let dev = &ready.get_inner().0;
                let work = {
                    let mut objects = open_objects.lock();
                    dispatch(dev, received, &mut objects, &resolver, &config, &stats)
                };
                match work {
                    Some((object, read)) => {
                        let permit = slots.clone().acquire_owned().await.expect("never closed");
                        let stats = stats.clone();
                        let policy = config.policy;
                        tokio::task::spawn_blocking(move || {
                            let filled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                serve_read(&object, read, &policy, &stats)
                            }));
                            if filled.is_err() {
                                bump(&stats.read_failures, 1);
                                error!(
                                    object = object.id,
                                    msg_id = read.msg_id,
                                    "READ fill panicked (a bug); completed so the reader gets EIO"
                                );
                            }
                            drop(permit);
                        });
                    }
                    None => continue,
                }
            }
        }
        info!(
            in_flight = config.max_in_flight - slots.available_permits(),
            "shutting down: waiting for READs in flight"
        );
        let all = u32::try_from(config.max_in_flight).unwrap_or(u32::MAX);
        if tokio::time::timeout(config.drain_timeout, slots.acquire_many(all))
            .await
            .is_err()
        {
            warn!(
                "READs still in flight after {:?}; exiting anyway",
                config.drain_timeout
            );
        }
        let snapshot = stats.snapshot();
        info!(
            ?snapshot,
            open_objects = open_objects.lock().len(),
            "cachefiles server stopped"
        );
        Ok(snapshot)
    }
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

/// Handles one request on the serving task. OPEN and CLOSE are answered here (they
/// are cheap and their order matters); a READ is returned for a worker to fill.
fn dispatch(
    dev: &dyn Reply,
    received: Received,
    objects: &mut HashMap<u32, Arc<Object>>,
    resolver: &Arc<dyn BlobResolver>,
    config: &Config,
    stats: &Stats,
) -> Option<(Arc<Object>, ReadRequest)> {
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
            return None;
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
                return None;
            };
            handle_open(dev, open, fd, objects, resolver, config, stats);
            None
        }
        Request::Close(close) => {
            bump(&stats.closes, 1);
            match objects.remove(&close.object_id) {
                // Workers still filling hold their own reference; the fd closes when
                // the last of them finishes.
                Some(obj) => info!(
                    object = close.object_id,
                    blob = obj.blob.name(),
                    windows_filled = obj.filled.filled_windows(),
                    "CLOSE: object released"
                ),
                None => warn!(object = close.object_id, "CLOSE for an unknown object"),
            }
            None
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
            match objects.get(&read.object_id) {
                Some(obj) => Some((obj.clone(), read)),
                None => {
                    bump(&stats.unknown_objects, 1);
                    error!(
                        msg_id = read.msg_id,
                        object = read.object_id,
                        "READ for an object this daemon never opened; cannot complete it"
                    );
                    None
                }
            }
        }
    }
}

fn handle_open(
    dev: &dyn Reply,
    open: OpenRequest,
    fd: AnonFd,
    objects: &mut HashMap<u32, Arc<Object>>,
    resolver: &Arc<dyn BlobResolver>,
    config: &Config,
    stats: &Stats,
) {
    let volume = String::from_utf8_lossy(open.volume()).into_owned();
    let cookie = String::from_utf8_lossy(open.cookie()).into_owned();
    match resolver.resolve(open.volume(), open.cookie()) {
        Ok(blob) => {
            let size = blob.size();
            let object = Arc::new(Object {
                id: open.object_id,
                fd,
                blob,
                size,
                filled: FillMap::new(size, config.policy.window),
                volume: open.volume().to_vec(),
                cookie: open.cookie().to_vec(),
            });
            if let Some(old) = objects.insert(open.object_id, object) {
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
                    info!(object = open.object_id, %volume, %cookie, size, "OPEN: serving blob");
                }
                Err(e) => {
                    bump(&stats.open_failures, 1);
                    objects.remove(&open.object_id);
                    error!(object = open.object_id, %volume, %cookie, error = %e, "copen failed");
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
        }
    }
}

/// Fills one READ and completes it, whatever happens: a failure leaves the range
/// unwritten and the kernel fails the reader with EIO.
fn serve_read(object: &Object, read: ReadRequest, policy: &FillPolicy, stats: &Stats) {
    let _complete = Completion {
        object,
        msg_id: read.msg_id,
    };
    let mut buf = AlignedBuf::new(policy.buffer_size_for(object.blob.as_ref()));
    let target = Target {
        source: object.blob.as_ref(),
        object_size: object.size,
        map: &object.filled,
        sink: &AnonSink(&object.fd),
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
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        match self.object.fd.complete_read(self.msg_id) {
            Ok(()) => debug!(
                msg_id = self.msg_id,
                object = self.object.id,
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
    use lazypull_source::{LocalDir, OpenError};
    use lazypull_cachefiles::{CloseRequest, ParseError};
    use std::cell::RefCell;
    use std::os::unix::fs::FileExt;

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
        objects: HashMap<u32, Arc<Object>>,
        resolver: Arc<dyn BlobResolver>,
        config: Config,
        stats: Stats,
        replies: Recorder,
    }

    impl Model {
        fn new() -> Self {
            let blobs = tempfile::tempdir().unwrap();
            let store = LocalDir::new(blobs.path());
            let resolver = move |_v: &[u8], c: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                Ok(store.open(c)? as Arc<dyn BlobSource>)
            };
            Model {
                blobs,
                cache: tempfile::tempdir().unwrap(),
                objects: HashMap::new(),
                resolver: Arc::new(resolver),
                config: Config {
                    device: "/nonexistent".into(),
                    cache_dir: "/nonexistent".into(),
                    tag: "t".into(),
                    max_in_flight: 1,
                    policy: FillPolicy {
                        window: 16384,
                        io_size: 8192,
                    },
                    drain_timeout: Duration::from_secs(1),
                },
                stats: Stats::default(),
                replies: Recorder::default(),
            }
        }

        fn cache_file(&self, object_id: u32) -> std::fs::File {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(self.cache.path().join(object_id.to_string()))
                .unwrap()
        }

        fn send(&mut self, request: Result<Request, ParseError>, with_fd: bool) {
            let anon_fd = with_fd.then(|| {
                AnonFd::from_owned(
                    self.cache_file(request.as_ref().map_or(0, |r| r.object_id()))
                        .into(),
                )
            });
            if let Some((object, read)) = dispatch(
                &self.replies,
                Received { request, anon_fd },
                &mut self.objects,
                &self.resolver,
                &self.config,
                &self.stats,
            ) {
                serve_read(&object, read, &self.config.policy, &self.stats);
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
        assert!(m.objects.is_empty(), "CLOSE drops the object and its fd");
        assert_eq!(m.stats.snapshot().closes, 1);
    }

    #[test]
    fn missing_and_invalid_blobs_are_refused_with_errno() {
        let mut m = Model::new();
        m.open(1, 1, "absent");
        m.open(2, 2, "../etc/passwd");
        assert_eq!(m.replies(), ["copen 1,-2", "copen 2,-22"]);
        assert!(m.objects.is_empty());
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
}
