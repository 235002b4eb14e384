//! `lazypull daemon`: picks a transport (cachefiles on-demand, or FUSE blob
//! files), serves the catalog's blobs through it, answers the control socket,
//! exports metrics, and keeps its kernel connections in the fd store so that a
//! successor — after a crash, or an upgrade via the control API — takes the
//! mounts over instead of breaking them.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lazypull_backend::registry::ClientOptions;
use lazypull_backend::retry::RetryPolicy;
use lazypull_backend::{BlobSource, OpenError};
use lazypull_cachefiles::CacheDevice;
use lazypull_engine::{FetchContext, FetchOptions, FillPolicy};
use lazypull_transport::cachefiles::{self, BlobResolver, HandedObject, OpenObjects, Server};
use lazypull_transport::fuse::{self, FuseBlobs, FuseServer};
use lazypull_transport::{BlobCacheInfo, Prefetch};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::catalog::{Catalog, ImageBlob, RemoteSettings};
use crate::config::{DaemonArgs, DaemonConfig, TransportKind};
use crate::control::{self, MountPlan, Reply, Request};
use crate::fdstore;

/// Fd store entry of the cachefiles device.
const DEVICE_ENTRY: &str = "cachefiles-device";
/// Fd store entry of the FUSE connection.
const FUSE_ENTRY: &str = "fuse-connection";
/// Fd store entries of handed-over cachefiles objects: `obj:<object id>`.
const OBJECT_PREFIX: &str = "obj:";

/// What the transport of a running daemon offers to request handlers.
#[derive(Clone)]
pub enum View {
    Cachefiles {
        objects: OpenObjects,
        stats: Arc<cachefiles::Stats>,
    },
    Fuse {
        blobs: FuseBlobs,
        stats: Arc<fuse::Stats>,
        dir: PathBuf,
    },
}

impl View {
    pub fn name(&self) -> &'static str {
        match self {
            View::Cachefiles { .. } => "cachefiles",
            View::Fuse { .. } => "fuse",
        }
    }

    fn prefetcher(&self) -> Arc<dyn Prefetch> {
        match self {
            View::Cachefiles { objects, .. } => Arc::new(objects.clone()),
            View::Fuse { blobs, .. } => Arc::new(blobs.clone()),
        }
    }

    pub fn blobs(&self) -> Vec<BlobCacheInfo> {
        self.prefetcher().blobs()
    }

    /// The transport's counters, as JSON (their names differ by transport).
    pub fn stats_json(&self) -> serde_json::Value {
        match self {
            View::Cachefiles { stats, .. } => json!(stats.snapshot()),
            View::Fuse { stats, .. } => json!(stats.snapshot()),
        }
    }

    /// `(reads asked for, reads failed, bytes written into the cache, of
    /// those bytes written ahead of need by prefetch)`.
    pub fn kernel_counters(&self) -> (u64, u64, u64, u64) {
        match self {
            View::Cachefiles { stats, .. } => {
                let s = stats.snapshot();
                (
                    s.reads,
                    s.read_failures,
                    s.bytes_written,
                    s.prefetched_bytes,
                )
            }
            View::Fuse { stats, .. } => {
                let s = stats.snapshot();
                (
                    s.reads,
                    s.read_failures,
                    s.bytes_written,
                    s.prefetched_bytes,
                )
            }
        }
    }

    /// How to mount image `fsid` with data blobs `blobs` through this transport.
    fn mount_plan(&self, fsid: &str, blobs: &[ImageBlob]) -> MountPlan {
        match self {
            View::Cachefiles { .. } => MountPlan {
                source: "lazypull".into(),
                fstype: "erofs".into(),
                options: format!("fsid={fsid}"),
                domain: true,
            },
            View::Fuse {
                blobs: files, dir, ..
            } => {
                // A blob complete on local disk is read by the kernel directly;
                // the others through the daemon's FUSE files.
                let path = |name: &str| {
                    files
                        .complete_file(name)
                        .unwrap_or_else(|| dir.join(name))
                        .display()
                        .to_string()
                };
                let devices: Vec<String> = blobs
                    .iter()
                    .map(|b| format!("device={}", path(&b.digest)))
                    .collect();
                MountPlan {
                    source: path(fsid),
                    fstype: "erofs".into(),
                    options: devices.join(","),
                    domain: false,
                }
            }
        }
    }
}

/// How the daemon ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitMode {
    /// Stop for good: unbind the cache / unmount the blob files, release the fd store.
    Shutdown,
    /// Leave everything to a successor (upgrade): park fds, save state, exit.
    Handover,
}

type ExitRequest = (
    ExitMode,
    Option<std::sync::mpsc::Sender<anyhow::Result<()>>>,
);

/// What request handlers share.
pub struct Daemon {
    pub catalog: Arc<Catalog>,
    pub view: View,
    pub started: Instant,
    /// Why this transport was chosen.
    pub reason: String,
    exit: Mutex<Option<tokio::sync::oneshot::Sender<ExitRequest>>>,
}

/// What a successor needs besides the fds: written to `<run_dir>/transport.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TransportState {
    #[serde(default)]
    fuse: Option<fuse::Session>,
    /// Objects parked in the fd store as `obj:<id>` at the last handover.
    #[serde(default)]
    objects: Vec<ParkedObject>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ParkedObject {
    object_id: u32,
    volume: Vec<u8>,
    cookie: Vec<u8>,
    size: u64,
}

impl TransportState {
    fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("transport.json")
    }

    fn load(run_dir: &Path) -> TransportState {
        match std::fs::read(Self::path(run_dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!("ignoring an unreadable transport state: {e}");
                TransportState::default()
            }),
            Err(_) => TransportState::default(),
        }
    }

    fn save(&self, run_dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(run_dir);
        crate::files::write_atomically(&path, &serde_json::to_vec_pretty(self)?, 0o600)
            .with_context(|| format!("saving {}", path.display()))
    }
}

pub fn run(args: DaemonArgs, started: Instant) -> anyhow::Result<()> {
    let takeover = args.takeover;
    let cfg = args.resolve()?;
    if let Some(dir) = &cfg.blob_dir {
        if !dir.is_dir() {
            bail!("blob directory {} does not exist", dir.display());
        }
    }
    std::fs::create_dir_all(&cfg.cache_dir)
        .with_context(|| format!("creating the cache directory {}", cfg.cache_dir.display()))?;
    if takeover {
        request_handover(&cfg)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.max_in_flight.max(1) + 8)
        .thread_name("lazypull")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(cfg, started))
}

/// Asks the daemon on the control socket to hand over, and waits until it is gone.
fn request_handover(cfg: &DaemonConfig) -> anyhow::Result<()> {
    if cfg.fd_store.is_none() {
        bail!("--takeover needs the fd store: it carries the kernel connections from the old daemon to the new one");
    }
    let status = control::call(&cfg.socket, &Request::Status, Duration::from_secs(10))
        .context("--takeover: no daemon to take over from")?;
    let pid = status["pid"]
        .as_u64()
        .context("the old daemon did not say its pid")?;
    info!(pid, "asking the running daemon to hand over");
    match control::call(&cfg.socket, &Request::Handover, Duration::from_secs(120)) {
        Ok(_) => {}
        Err(e) => {
            warn!("the old daemon's handover reply: {e:#} (checking whether it exited anyway)")
        }
    }
    control::wait_for_exit(pid, Duration::from_secs(60))?;
    Ok(())
}

fn catalog(cfg: &DaemonConfig) -> Catalog {
    let fetch = FetchContext::new(FetchOptions {
        max_merge: cfg.max_merge,
        cache_bytes: cfg.unit_cache,
        readahead: cfg.readahead,
    });
    let client = ClientOptions {
        insecure_hosts: cfg.insecure_registries.clone(),
        ca_files: cfg.ca_files.clone(),
        request_timeout: Duration::from_secs(cfg.request_timeout_secs),
        retry: RetryPolicy {
            attempts: cfg.retries,
            ..RetryPolicy::default()
        },
        max_connections: cfg.max_connections,
        ..ClientOptions::default()
    };
    Catalog::new(
        cfg.work_dir.clone(),
        cfg.blob_dir.clone(),
        cfg.blob_url.clone(),
        fetch,
        RemoteSettings {
            client,
            docker_config: cfg.docker_config.clone(),
        },
        Some(cfg.run_dir.join("images.json")),
    )
}

fn policy(cfg: &DaemonConfig) -> FillPolicy {
    FillPolicy {
        window: cfg.fill_window,
        io_size: cfg.io_size,
    }
}

fn cachefiles_config(cfg: &DaemonConfig) -> cachefiles::Config {
    cachefiles::Config {
        device: cfg.device.clone(),
        cache_dir: cfg.cache_dir.clone(),
        tag: cfg.tag.clone(),
        max_in_flight: cfg.max_in_flight,
        policy: policy(cfg),
        drain_timeout: Duration::from_secs(10),
    }
}

fn fuse_config(cfg: &DaemonConfig) -> fuse::Config {
    fuse::Config {
        mountpoint: cfg.fuse_dir.clone(),
        device: lazypull_fuse::device::DEFAULT_PATH.into(),
        cache_dir: cfg.cache_dir.join("blobs"),
        threads: cfg.fuse_threads,
        policy: policy(cfg),
        flush_interval: Duration::from_secs(1),
    }
}

enum Running {
    Cachefiles(Server),
    Fuse(Arc<FuseServer>),
}

/// Takes an entry out of what the fd store gave back.
fn take(held: &mut Vec<fdstore::Entry>, name: &str) -> Option<std::os::fd::OwnedFd> {
    let pos = held.iter().position(|e| e.name == name)?;
    Some(held.remove(pos).fd)
}

/// What the FUSE transport needs of the kernel besides /dev/fuse: EROFS
/// able to mount a regular file (file-backed, Linux 6.12+).
fn fuse_unusable() -> Option<String> {
    if !Path::new(lazypull_fuse::device::DEFAULT_PATH).exists() {
        return Some("no /dev/fuse (CONFIG_FUSE_FS, or `modprobe fuse`)".into());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("erofs"))
    {
        return Some("this kernel has no EROFS (CONFIG_EROFS_FS, or `modprobe erofs`)".into());
    }
    None
}

/// Starts (or takes over) the transport. Returns it with why it was chosen.
fn start_transport(
    cfg: &DaemonConfig,
    resolver: Arc<dyn BlobResolver>,
    held: &mut Vec<fdstore::Entry>,
    saved: TransportState,
) -> anyhow::Result<(Running, String)> {
    if let Some(fd) = take(held, DEVICE_ENTRY) {
        let mut handed = Vec::new();
        for parked in saved.objects {
            if let Some(fd) = take(held, &format!("{OBJECT_PREFIX}{}", parked.object_id)) {
                handed.push(HandedObject {
                    object_id: parked.object_id,
                    fd,
                    volume: parked.volume,
                    cookie: parked.cookie,
                    size: parked.size,
                });
            }
        }
        let n = handed.len();
        let server = Server::adopt(
            cachefiles_config(cfg),
            resolver,
            CacheDevice::from_fd(fd),
            handed,
        )?;
        return Ok((
            Running::Cachefiles(server),
            format!("took over the bound cachefiles cache from the previous daemon ({n} open objects handed over)"),
        ));
    }
    if let Some(fd) = take(held, FUSE_ENTRY) {
        let session = saved.fuse.unwrap_or_else(|| {
            warn!("no saved FUSE session: assuming protocol 7.40 with resend; nodes the old daemon named are unknown");
            fuse::Session {
                minor: 40,
                kernel_flags: lazypull_fuse::abi::init_flags::HAS_RESEND,
                max_read: 1 << 20,
                nodes: Vec::new(),
            }
        });
        let server = FuseServer::adopt(fuse_config(cfg), resolver, fd, session)?;
        return Ok((
            Running::Fuse(Arc::new(server)),
            "took over the FUSE connection from the previous daemon".into(),
        ));
    }
    let fuse = |why: String| -> anyhow::Result<(Running, String)> {
        if let Some(missing) = fuse_unusable() {
            bail!("no transport can serve images on this kernel: {why}; FUSE: {missing}");
        }
        let server = FuseServer::mount(fuse_config(cfg), resolver.clone())
            .with_context(|| format!("starting the FUSE transport ({why})"))?;
        Ok((Running::Fuse(Arc::new(server)), why))
    };
    match cfg.transport {
        TransportKind::Cachefiles => {
            let server = Server::bind(cachefiles_config(cfg), resolver.clone())?;
            Ok((Running::Cachefiles(server), "--transport cachefiles".into()))
        }
        TransportKind::Fuse => fuse("--transport fuse".into()),
        TransportKind::Auto => {
            if !cfg.device.exists() {
                return fuse(format!(
                    "{} does not exist (this kernel has no cachefiles): using FUSE",
                    cfg.device.display()
                ));
            }
            match Server::bind(cachefiles_config(cfg), resolver.clone()) {
                Ok(server) => Ok((
                    Running::Cachefiles(server),
                    "the kernel has cachefiles on-demand mode".into(),
                )),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(e.into()),
                Err(e) => fuse(format!(
                    "cachefiles on-demand mode is unusable ({e}): using FUSE"
                )),
            }
        }
    }
}

async fn serve(cfg: DaemonConfig, started: Instant) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    let store = match &cfg.fd_store {
        Some(path) => Some(fdstore::Client::connect_or_spawn(path)?),
        None => None,
    };
    let mut held = match &store {
        Some(s) => s.get().context("reading the fd store")?,
        None => Vec::new(),
    };
    let catalog = Arc::new(catalog(&cfg));
    let adopting = held
        .iter()
        .any(|e| e.name == DEVICE_ENTRY || e.name == FUSE_ENTRY);
    let saved = if adopting {
        // The kernel asks for these images' blobs as soon as the transport
        // serves again: know them first.
        let c = catalog.clone();
        let n = tokio::task::spawn_blocking(move || c.restore()).await?;
        info!(
            images = n,
            "re-registered the images the previous daemon served"
        );
        TransportState::load(&cfg.run_dir)
    } else {
        // Whatever a previous daemon recorded describes mounts that are gone.
        let _ = std::fs::remove_file(TransportState::path(&cfg.run_dir));
        let _ = std::fs::remove_file(cfg.run_dir.join("images.json"));
        TransportState::default()
    };
    let resolver: Arc<dyn BlobResolver> = {
        let catalog = catalog.clone();
        Arc::new(
            move |_volume: &[u8], cookie: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                catalog.resolve(cookie)
            },
        )
    };
    let (running, reason) = start_transport(&cfg, resolver, &mut held, saved)?;
    for stale in &held {
        warn!(entry = %stale.name, "the fd store held an fd nothing claims; dropped");
    }
    if let Some(s) = &store {
        let names: Vec<String> = held.iter().map(|e| e.name.clone()).collect();
        if !names.is_empty() {
            s.remove(&names)?;
        }
    }
    drop(held);
    let view = match &running {
        Running::Cachefiles(server) => View::Cachefiles {
            objects: server.objects(),
            stats: server.stats(),
        },
        Running::Fuse(server) => View::Fuse {
            blobs: server.blobs(),
            stats: server.stats(),
            dir: cfg.fuse_dir.clone(),
        },
    };
    if let Some(s) = &store {
        let (name, fd) = match &running {
            Running::Cachefiles(server) => (DEVICE_ENTRY, server.device_fd()?),
            Running::Fuse(server) => (FUSE_ENTRY, server.connection_fd()?),
        };
        s.put(name, fd.as_fd(), true)
            .context("parking the kernel connection in the fd store")?;
    }
    info!(transport = view.name(), reason = %reason, "transport chosen");

    let listener = control::bind(&cfg.socket)?;
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<ExitRequest>();
    let daemon = Arc::new(Daemon {
        catalog,
        view,
        started,
        reason,
        exit: Mutex::new(Some(exit_tx)),
    });
    let control_task = tokio::spawn(accept_loop(listener, daemon.clone()));
    let metrics_task = match cfg.metrics_addr {
        Some(addr) => Some(tokio::spawn(crate::metrics::serve(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?,
            daemon.clone(),
        ))),
        None => None,
    };
    let session_task = match &running {
        Running::Fuse(server) => Some(tokio::spawn(save_fuse_sessions(
            server.clone(),
            cfg.run_dir.clone(),
        ))),
        Running::Cachefiles(_) => None,
    };
    info!(
        transport = daemon.view.name(),
        blob_dir = ?cfg.blob_dir,
        blob_url = ?cfg.blob_url,
        socket = %cfg.socket.display(),
        pid = std::process::id(),
        startup_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0,
        "lazypull daemon ready"
    );

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mode: Arc<Mutex<ExitRequest>> = Arc::new(Mutex::new((ExitMode::Shutdown, None)));
    let shutdown = {
        let mode = mode.clone();
        async move {
            let request = tokio::select! {
                _ = term.recv() => { info!("SIGTERM received: shutting down"); (ExitMode::Shutdown, None) }
                _ = int.recv() => { info!("SIGINT received: shutting down"); (ExitMode::Shutdown, None) }
                r = exit_rx => r.unwrap_or((ExitMode::Shutdown, None)),
            };
            *mode.lock().unwrap_or_else(|p| p.into_inner()) = request;
        }
    };
    let (running, served) = match running {
        Running::Cachefiles(server) => {
            let objects = server.objects();
            let r = server.serve(shutdown).await.map(|s| json!(s));
            (Finished::Cachefiles(objects), r)
        }
        Running::Fuse(server) => {
            let r = server.serve(shutdown).await.map(|s| json!(s));
            (Finished::Fuse(server), r)
        }
    };
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(t) = session_task {
        t.abort();
    }
    let (mode, done) = std::mem::replace(
        &mut *mode.lock().unwrap_or_else(|p| p.into_inner()),
        (ExitMode::Shutdown, None),
    );
    let outcome = match mode {
        ExitMode::Handover => hand_over(&running, store.as_ref(), &cfg.run_dir),
        ExitMode::Shutdown => {
            shut_down(&running, store.as_ref(), &cfg.run_dir);
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(done) = done {
        let failed = outcome.as_ref().err().map(|e| format!("{e:#}"));
        let _ = done.send(match failed {
            None => Ok(()),
            Some(e) => Err(anyhow::anyhow!(e)),
        });
        // Let the control connection deliver the reply before the process ends.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    outcome?;
    let stats = served?;
    let fetch = daemon.catalog.fetch_context().stats.snapshot();
    info!(
        mode = ?mode,
        transport = %stats,
        range_requests = fetch.range_requests,
        verify_failures = fetch.verify_failures,
        "lazypull daemon exiting"
    );
    Ok(())
}

enum Finished {
    Cachefiles(OpenObjects),
    Fuse(Arc<FuseServer>),
}

/// Parks what a successor needs: the cachefiles objects' fds in the fd store,
/// their keys (or the FUSE session) in the run dir. The kernel connection
/// itself is already in the store.
fn hand_over(
    finished: &Finished,
    store: Option<&fdstore::Client>,
    run_dir: &Path,
) -> anyhow::Result<()> {
    let store = store.context("no fd store: nothing can carry the mounts to a successor")?;
    let mut state = TransportState::default();
    match finished {
        Finished::Cachefiles(objects) => {
            for o in objects.for_handover()? {
                store.put(
                    &format!("{OBJECT_PREFIX}{}", o.object_id),
                    o.fd.as_fd(),
                    false,
                )?;
                state.objects.push(ParkedObject {
                    object_id: o.object_id,
                    volume: o.volume,
                    cookie: o.cookie,
                    size: o.size,
                });
            }
        }
        Finished::Fuse(server) => state.fuse = server.session(),
    }
    state.save(run_dir)?;
    info!(
        objects = state.objects.len(),
        "handed over: the fd store keeps the kernel connection for the next daemon"
    );
    Ok(())
}

/// Ends serving for good: the cache is unbound (cachefiles) or the blob mount
/// detached (FUSE) once the fd store lets go of its fds.
fn shut_down(finished: &Finished, store: Option<&fdstore::Client>, run_dir: &Path) {
    if let Finished::Fuse(server) = finished {
        if let Err(e) = server.unmount() {
            warn!("{e}");
        }
    }
    if let Some(s) = store {
        if let Err(e) = s.exit() {
            warn!("releasing the fd store: {e:#}");
        }
    }
    let _ = std::fs::remove_file(TransportState::path(run_dir));
    let _ = std::fs::remove_file(run_dir.join("images.json"));
}

/// Keeps `<run_dir>/transport.json` current with the FUSE session (node ids
/// change on lookups), so a successor after a crash knows them.
async fn save_fuse_sessions(server: Arc<FuseServer>, run_dir: PathBuf) {
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

async fn accept_loop(listener: tokio::net::UnixListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, daemon.clone()));
            }
            Err(e) => {
                error!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, daemon: Arc<Daemon>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "reading a control request failed");
                return;
            }
        };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let daemon = daemon.clone();
                match tokio::task::spawn_blocking(move || handle(&daemon, req)).await {
                    Ok(r) => Reply::from_result(r),
                    Err(e) => Reply::from_result(Err(anyhow::anyhow!(
                        "the request handler failed (a bug): {e}"
                    ))),
                }
            }
            Err(e) => Reply::from_result(Err(anyhow::anyhow!("malformed request: {e}"))),
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The daemon's status, as `lazypull status --json` and the metrics see it.
pub fn status(daemon: &Daemon) -> serde_json::Value {
    json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": daemon.started.elapsed().as_secs(),
        "transport": {
            "kind": daemon.view.name(),
            "reason": daemon.reason,
            "counters": daemon.view.stats_json(),
        },
        "fetch": daemon.catalog.fetch_context().stats.snapshot(),
        "backend_http": lazypull_backend::http_totals(),
        "images": daemon.catalog.images(),
        "blobs": daemon.view.blobs(),
    })
}

/// Handles one control request (blocking: may do network I/O).
fn handle(daemon: &Daemon, req: Request) -> anyhow::Result<serde_json::Value> {
    match req {
        Request::Register(r) => {
            let registered = daemon.catalog.register(&r).map_err(|e| {
                warn!(reference = %r.reference, fsid = ?r.fsid, "register failed: {e:#}");
                e
            })?;
            let (blobs, _) = daemon
                .catalog
                .image(&registered.fsid)
                .context("the image vanished from the catalog")?;
            let plan = daemon.view.mount_plan(&registered.fsid, &blobs);
            let mut v = serde_json::to_value(registered)?;
            v["mount"] = serde_json::to_value(plan)?;
            Ok(v)
        }
        Request::Mounted {
            fsid,
            mountpoint,
            prefetch,
        } => {
            daemon.catalog.mounted(&fsid, &mountpoint)?;
            info!(%fsid, mountpoint = %mountpoint.display(), "image mounted");
            if prefetch.is_empty() {
                return Ok(json!({"prefetch": false}));
            }
            let (blobs, meta_path) = daemon
                .catalog
                .image(&fsid)
                .context("the image vanished from the catalog")?;
            let meta = std::fs::read(&meta_path)
                .with_context(|| format!("reading {}", meta_path.display()))?;
            let image = lazypull_erofs::Image::from_bytes(meta)?;
            let (spans, warnings) = crate::prefetch::plan(&blobs, &image, &prefetch);
            for w in &warnings {
                warn!("{w}");
            }
            let prefetcher = daemon.view.prefetcher();
            let planned: u64 = spans.iter().map(|s| s.len).sum();
            std::thread::Builder::new()
                .name("lazypull-prefetch".into())
                .spawn(move || {
                    if let Err(e) = crate::prefetch::run(prefetcher.as_ref(), &fsid, &spans) {
                        warn!("{e:#}");
                    }
                })
                .context("starting the prefetch thread")?;
            Ok(json!({"prefetch": true, "planned_bytes": planned, "warnings": warnings}))
        }
        Request::Unmounted { mountpoint } => {
            let fsid = daemon.catalog.unmounted(&mountpoint);
            info!(mountpoint = %mountpoint.display(), ?fsid, "image unmounted");
            Ok(json!({ "fsid": fsid }))
        }
        Request::Status => Ok(status(daemon)),
        Request::Handover => {
            let (tx, rx) = std::sync::mpsc::channel();
            request_exit(daemon, ExitMode::Handover, Some(tx))?;
            rx.recv_timeout(Duration::from_secs(60))
                .context("the daemon did not finish handing over within 60 s")??;
            Ok(json!({"handed_over": true, "pid": std::process::id()}))
        }
        Request::Shutdown => {
            request_exit(daemon, ExitMode::Shutdown, None)?;
            Ok(json!({"shutting_down": true, "pid": std::process::id()}))
        }
    }
}

fn request_exit(
    daemon: &Daemon,
    mode: ExitMode,
    done: Option<std::sync::mpsc::Sender<anyhow::Result<()>>>,
) -> anyhow::Result<()> {
    let tx = daemon
        .exit
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .context("the daemon is already exiting")?;
    info!(?mode, "exit requested over the control socket");
    tx.send((mode, done))
        .map_err(|_| anyhow::anyhow!("the daemon is already exiting"))
}
