//! The cachefiles on-demand server.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lazypull_backend::{BlobSource, OpenError};
use lazypull_cachefiles::device::Received;
use lazypull_cachefiles::{AnonFd, CacheDevice, Command, OpenRequest, ReadRequest, Request};
use lazypull_engine::{fill, AlignedBuf, CacheSink, FillMap, FillPolicy, Target};
use tokio::io::unix::AsyncFd;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

/// Turns the keys of an OPEN into a blob.
pub trait BlobResolver: Send + Sync + 'static {
    /// `volume` is the volume key without its NUL (`erofs,<domain_id|fsid>`),
    /// `cookie` the cookie key up to its first NUL (fsid or device tag).
    fn resolve(&self, volume: &[u8], cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError>;
}

impl<F> BlobResolver for F
where
    F: Fn(&[u8], &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> + Send + Sync + 'static,
{
    fn resolve(&self, volume: &[u8], cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> {
        self(volume, cookie)
    }
}

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
    /// READs that asked for windows this daemon had already written.
    pub windows_refilled: AtomicU64,
    pub malformed: AtomicU64,
    pub unknown_objects: AtomicU64,
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
    pub windows_refilled: u64,
    pub malformed: u64,
    pub unknown_objects: u64,
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
            windows_refilled: g(&self.windows_refilled),
            malformed: g(&self.malformed),
            unknown_objects: g(&self.unknown_objects),
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
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// A bound cachefiles cache, ready to serve.
pub struct Server {
    device: CacheDevice,
    config: Config,
    resolver: Arc<dyn BlobResolver>,
    stats: Arc<Stats>,
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
        Ok(Server {
            device,
            config,
            resolver,
            stats: Arc::new(Stats::default()),
        })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serves requests until `shutdown` resolves, then waits (bounded) for READs
    /// in flight and returns. Dropping the device afterwards unbinds the cache.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> io::Result<StatsSnapshot> {
        let Server {
            device,
            config,
            resolver,
            stats,
        } = self;
        // SAFETY: `DeviceFd` owns the device's OwnedFd and never replaces it, so the
        // registered fd stays open and the same for the whole life of the AsyncFd.
        let device = unsafe {
            AsyncFd::register_with_interest(DeviceFd(device), tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        let slots = Arc::new(Semaphore::new(config.max_in_flight));
        let mut objects: HashMap<u32, Arc<Object>> = HashMap::new();
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
                match dispatch(dev, received, &mut objects, &resolver, &config, &stats) {
                    Some((object, read)) => {
                        let permit = slots.clone().acquire_owned().await.expect("never closed");
                        let stats = stats.clone();
                        let policy = config.policy;
                        tokio::task::spawn_blocking(move || {
                            serve_read(&object, read, &policy, &stats);
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
            open_objects = objects.len(),
            "cachefiles server stopped"
        );
        Ok(snapshot)
    }
}

/// Handles one request on the serving task. OPEN and CLOSE are answered here (they
/// are cheap and their order matters); a READ is returned for a worker to fill.
fn dispatch(
    dev: &CacheDevice,
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
    dev: &CacheDevice,
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
    let mut buf = AlignedBuf::new(policy.buffer_size());
    let target = Target {
        source: object.blob.as_ref(),
        object_size: object.size,
        map: &object.filled,
        sink: &AnonSink(&object.fd),
    };
    let result = fill(&target, read.off, read.len, policy, &mut buf);
    match result {
        Ok(out) => {
            bump(&stats.bytes_written, out.bytes_written);
            bump(&stats.windows_written, out.windows_written);
            if out.windows_refilled > 0 {
                bump(&stats.windows_refilled, out.windows_refilled);
                warn!(
                    object = object.id,
                    off = read.off,
                    len = read.len,
                    "READ for data already written to the cache"
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
    if let Err(e) = object.fd.complete_read(read.msg_id) {
        error!(object = object.id, msg_id = read.msg_id, error = %e, "completing READ failed");
    }
}
