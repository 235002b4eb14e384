//! `lazypull daemon`: picks a transport (cachefiles on-demand, or FUSE blob
//! files), serves the catalog's blobs through it, answers the control socket,
//! exports metrics, and keeps its kernel connections in the fd store so that a
//! successor — after a crash, or an upgrade via the control API — takes the
//! mounts over instead of breaking them.
//!
//! This module is the daemon's lifecycle (start, serve, exit) and wires its
//! parts: the transport choice (`transport`) and what it offers
//! (`view`), handing mounts between daemons (`handover`), what a
//! successor reads in the run dir (`persist`), the control socket
//! (`control_server`) over what the handlers share (`shared`), and
//! prefetch threads (`prefetch`). It must not hold the logic of any of
//! them, nor the catalog's.

mod control_server;
mod handover;
mod instance;
mod persist;
mod prefetch;
mod restoring;
mod shared;
mod transport;
mod view;

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lazypull_backend::registry::ClientOptions;
use lazypull_backend::retry::RetryPolicy;
use lazypull_engine::{FetchContext, FetchOptions};
use lazypull_source::{BlobSource, OpenError};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::catalog::{Catalog, RemoteSettings};
use crate::config::{DaemonArgs, DaemonConfig};
use crate::fdstore;
use crate::status::StatusSource;
use handover::{Finished, Parked};
use persist::TransportState;
use shared::{Daemon, ExitMode, ExitRequest};
use transport::Running;
use view::TransportView;

pub fn run(args: DaemonArgs, started: Instant) -> anyhow::Result<()> {
    let mut steps = Steps::new(started);
    steps.mark("main");
    let takeover = args.takeover;
    let cfg = args.resolve()?;
    steps.mark("config");
    if let Some(dir) = &cfg.blob_dir {
        if !dir.is_dir() {
            bail!("blob directory {} does not exist", dir.display());
        }
    }
    // The cache, the run dir and the work dir hold image bytes, state and
    // credentials: root's only (0700, tightened if found looser).
    lazypull_engine::private_dir(&cfg.cache_dir).context("the cache directory")?;
    if takeover {
        handover::request_handover(&cfg)?;
    }
    // Before anything a running daemon owns is touched (fd store, kernel
    // connection, state files); held until this process ends.
    let _instance = instance::acquire(&cfg.run_dir, &cfg.socket)?;
    steps.mark("instance");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.max_in_flight.max(1) + 8)
        .thread_name("lazypull")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    steps.mark("runtime");
    runtime.block_on(serve(cfg, started, steps))
}

/// Where start-up's time goes: each step's share of the time from `main` to
/// "lazypull daemon ready", logged with it (`steps_ms`), so a slow start
/// names its step.
struct Steps {
    started: Instant,
    last: Duration,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new(started: Instant) -> Self {
        Steps {
            started,
            last: Duration::ZERO,
            done: Vec::new(),
        }
    }

    /// Step `name` ended now.
    fn mark(&mut self, name: &'static str) {
        let now = self.started.elapsed();
        self.done.push((name, now.saturating_sub(self.last)));
        self.last = now;
    }

    /// `name=ms ...`, in order, in tenths of a millisecond.
    fn render(&self) -> String {
        self.done
            .iter()
            .map(|(name, d)| format!("{name}={:.1}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn catalog(cfg: &DaemonConfig) -> Catalog {
    let fetch = FetchContext::new(FetchOptions {
        max_merge: cfg.max_merge,
        cache_bytes: cfg.unit_cache,
        ..FetchOptions::default()
    });
    let client = ClientOptions {
        insecure_hosts: cfg.insecure_registries.clone(),
        ca_files: cfg.ca_files.clone(),
        hosts_dir: cfg.hosts_dir.clone(),
        // A mirror gets its own credentials (by its host name), never the
        // registry's.
        mirror_credentials: Some(lazypull_backend::CredentialLookup(std::sync::Arc::new({
            let docker_config = cfg.docker_config.clone();
            move |host: &str| {
                lazypull_backend::docker_config_credentials(docker_config.as_deref(), host)
            }
        }))),
        request_timeout: Duration::from_secs(cfg.request_timeout_secs),
        range_deadline: Duration::from_secs(cfg.range_deadline_secs),
        min_throughput: cfg.min_throughput,
        retry: RetryPolicy {
            attempts: cfg.retries,
            ..RetryPolicy::default()
        },
        max_connections: cfg.max_connections,
        breaker: lazypull_backend::BreakerPolicy {
            enabled: cfg.circuit_breaker,
            ..lazypull_backend::BreakerPolicy::default()
        },
        outage_timeout: cfg.outage.timeout(),
        proxy: cfg.proxy.clone(),
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
            max_meta_size: cfg.max_meta_size,
            kubelet: Default::default(),
        },
        Some(persist::images_file(&cfg.run_dir)),
    )
}

/// Until the daemon is ready: if it fails to start, the fd store it started
/// itself is ended. Nothing of a previous daemon is in such a store (there was
/// none), and left running it would hold its socket, and this daemon's fresh
/// kernel connection, with nobody to serve them.
struct StartGuard<'a> {
    store: Option<&'a fdstore::Client>,
    spawned: Option<fdstore::Spawned>,
}

impl StartGuard<'_> {
    /// The daemon serves: the store lives on, for its successor.
    fn started(mut self) {
        if let Some(spawned) = self.spawned.take() {
            spawned.keep_running();
        }
    }
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if let (Some(store), Some(spawned)) = (self.store, self.spawned.take()) {
            if let Err(e) = store.end_spawned(spawned) {
                warn!("ending the fd store this daemon started: {e:#}");
            }
        }
    }
}

/// How the daemon leaves: as asked, except that a cachefiles server that
/// stopped on an error (its device lost) hands over rather than shuts down.
/// Shutting down has the fd store let go of the device, which unbinds the
/// cache and fails every mount with EIO; parked, the connection waits for a
/// successor (a restart takes it over, and `restore` re-queues what was in
/// flight).
fn exit_mode(asked: ExitMode, finished: &Finished, served_ok: bool) -> ExitMode {
    match (asked, finished, served_ok) {
        (ExitMode::Shutdown, Finished::Cachefiles(_), false) => {
            warn!("serving ended on an error: the cachefiles connection stays in the fd store for a successor");
            ExitMode::Handover
        }
        _ => asked,
    }
}

/// A fanotify daemon shutting down while images are mounted from blobs not
/// complete yet hands over instead: releasing the group would have the
/// kernel allow every read of those files, and readers read a hole's zeros.
/// Parked, the group keeps their reads waiting for a successor.
fn fanotify_fail_closed(asked: ExitMode, finished: &Finished, catalog: &Catalog) -> ExitMode {
    let Finished::Fanotify(server) = finished else {
        return asked;
    };
    if asked != ExitMode::Shutdown {
        return asked;
    }
    let incomplete = server.incomplete_blobs();
    let mounted = catalog.images().iter().any(|i| !i.mountpoints.is_empty());
    if mounted && !incomplete.is_empty() {
        warn!(
            blobs = ?incomplete,
            "images are mounted from blobs not complete yet: the fanotify group stays in the fd store for a successor (unmount them first to shut down for good)"
        );
        return ExitMode::Handover;
    }
    asked
}

/// The fanotify transport before it serves: what a successor needs after a
/// crash is written down (the fd limit under which this group's event fds
/// lie); a group taken over gets every registered image's blobs back, then
/// its predecessor's pending events answered (`FanotifyServer::recover`)
/// before anything new is read.
async fn fanotify_start(
    cfg: &DaemonConfig,
    catalog: &Arc<Catalog>,
    view: &TransportView,
    server: &Arc<lazypull_transport::fanotify::FanotifyServer>,
    adopted: bool,
    predecessor_fd_limit: Option<i32>,
) -> anyhow::Result<()> {
    TransportState {
        fanotify_fd_limit: Some(transport::fd_limit()),
        ..TransportState::default()
    }
    .save(&cfg.run_dir)?;
    if !adopted {
        return Ok(());
    }
    let (catalog, view, server) = (catalog.clone(), view.clone(), server.clone());
    let limit = predecessor_fd_limit.unwrap_or_else(transport::fd_limit);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for image in catalog.images() {
            if let Some((blobs, _)) = catalog.image(&image.fsid) {
                view.mount_plan(&image.fsid, &blobs)
                    .with_context(|| format!("serving again the blobs of image {}", image.fsid))?;
            }
        }
        let done = server
            .recover(limit)
            .context("answering the previous daemon's fanotify events")?;
        info!(
            ?done,
            fd_limit = limit,
            "answered what the previous daemon left pending"
        );
        Ok(())
    })
    .await?
}

async fn serve(cfg: DaemonConfig, started: Instant, mut steps: Steps) -> anyhow::Result<()> {
    lazypull_engine::private_dir(&cfg.run_dir).context("the run directory")?;
    let (store, spawned) = match &cfg.fd_store {
        Some(path) => {
            let (client, spawned) = fdstore::Client::connect_or_spawn(path)?;
            (Some(client), spawned)
        }
        None => (None, None),
    };
    steps.mark(if spawned.is_some() {
        "fd_store_spawn"
    } else {
        "fd_store"
    });
    let start = StartGuard {
        store: store.as_ref(),
        spawned,
    };
    // A store started just now holds nothing: no need to ask it (and to wait
    // for its process to come up) before the transport starts.
    let mut parked = match start.spawned {
        Some(_) => Parked::default(),
        None => Parked::from_store(store.as_ref())?,
    };
    let catalog = Arc::new(catalog(&cfg));
    // Before the images are registered again: theirs may be among them.
    if let Some(fd) = parked.take_kubelet_credentials() {
        match handover::read_kubelet_credentials(fd)
            .and_then(|b| catalog.kubelet_credentials().load(&b))
        {
            Ok(n) => info!(
                repositories = n,
                "took back the credentials kubelet sent (held in memory, parked in the fd store)"
            ),
            Err(e) => warn!("{e:#}: images that need them will fail to read until pulled again"),
        }
    }
    steps.mark("catalog");
    if parked.has_cachefiles() {
        // The images restored next serve a kernel cache that outlived the
        // previous daemon: check them against the bindings it holds.
        catalog.keep_kernel_bindings()?;
    }
    let saved = if parked.has_connection() {
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
        persist::forget(&cfg.run_dir);
        TransportState::default()
    };
    let resolvers = {
        let (c, f, r) = (catalog.clone(), catalog.clone(), catalog.clone());
        transport::Resolvers {
            registered: Arc::new(move |cookie: &[u8]| r.is_registered(cookie)),
            cachefiles: Arc::new(
                move |_volume: &[u8], cookie: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                    c.resolve(cookie)
                },
            ),
            fuse: Arc::new(
                move |_volume: &[u8], cookie: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                    f.resolve_registered(cookie)
                },
            ),
        }
    };
    steps.mark("restore");
    let registered_resolver = resolvers.fuse.clone();
    let predecessor_fd_limit = saved.fanotify_fd_limit;
    let (running, reason) = transport::start(&cfg, resolvers, &mut parked, saved)?;
    steps.mark("transport");
    if matches!(running, Running::Cachefiles(_)) {
        catalog.keep_kernel_bindings()?;
    }
    parked.drop_unclaimed(store.as_ref())?;
    let view = running.view(&cfg.fuse_dir, cfg.loop_direct_io, registered_resolver);
    if let Running::Fanotify { server, adopted } = &running {
        if let Some(s) = &store {
            let s = s.clone();
            server.set_park_hook(Box::new(move |blob, fd| {
                handover::park_fanotify_file(&s, blob, fd).map_err(std::io::Error::other)
            }));
        }
        fanotify_start(
            &cfg,
            &catalog,
            &view,
            server,
            *adopted,
            predecessor_fd_limit,
        )
        .await?;
    }
    if let Some(s) = &store {
        match &running {
            Running::Fanotify { server, .. } => {
                handover::park_fanotify_group(s, server.group_fd()?.as_fd())?
            }
            Running::Cachefiles(server) => {
                handover::park_cachefiles_device(s, server.device_fd()?.as_fd())?
            }
            Running::Fuse(server) | Running::Loop(server) => {
                handover::park_fuse_connection(s, server.connection_fd()?.as_fd())?
            }
        }
    }
    steps.mark("park");
    info!(transport = view.name(), reason = %reason, "transport chosen");

    let listener = control_server::bind(&cfg.socket)?;
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<ExitRequest>();
    let daemon = Arc::new(Daemon::new(
        catalog,
        view,
        started,
        reason,
        exit_tx,
        store.clone(),
    ));
    let control_task = tokio::spawn(control_server::accept_loop(listener, daemon.clone()));
    let metrics_task = match cfg.metrics_addr {
        Some(addr) => Some(tokio::spawn(crate::metrics::serve(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?,
            daemon.clone() as Arc<dyn StatusSource>,
        ))),
        None => None,
    };
    steps.mark("control");
    let session_task = match &running {
        Running::Fuse(server) | Running::Loop(server) => Some(tokio::spawn(
            persist::save_fuse_sessions(server.clone(), cfg.run_dir.clone()),
        )),
        // Fill maps persisted every second, as the FUSE server does.
        Running::Fanotify { server, .. } => {
            let server = server.clone();
            Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let s = server.clone();
                    let _ = tokio::task::spawn_blocking(move || s.flush()).await;
                }
            }))
        }
        Running::Cachefiles(_) => None,
    };
    info!(
        transport = daemon.view.name(),
        blob_dir = ?cfg.blob_dir,
        blob_url = ?cfg.blob_url,
        socket = %cfg.socket.display(),
        pid = std::process::id(),
        startup_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0,
        steps_ms = %steps.render(),
        "lazypull daemon ready"
    );
    start.started();
    // Images the previous daemon served that are not back yet: retried
    // until they are, stopped (joined) before this daemon hands over or ends.
    let retrier = restoring::Retrier::start(daemon.catalog.clone())
        .context("starting the thread that restores images")?;

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
    let (finished, served) = match running {
        Running::Cachefiles(server) => {
            let objects = server.objects();
            let r = (*server).serve(shutdown).await.map(|s| json!(s));
            (Finished::Cachefiles(objects), r)
        }
        Running::Fuse(server) | Running::Loop(server) => {
            let r = server.serve(shutdown).await.map(|s| json!(s));
            (Finished::Fuse(server), r)
        }
        Running::Fanotify { server, .. } => {
            let r = server.serve();
            if r.is_ok() {
                shutdown.await;
            }
            let s = server.clone();
            // Joins the event threads (pending events stay pending: the
            // group lives on in the fd store) and persists the fill maps.
            let _ = tokio::task::spawn_blocking(move || {
                s.stop();
                s.flush();
            })
            .await;
            let stats = json!(server.stats.snapshot());
            (Finished::Fanotify(server), r.map(|()| stats))
        }
    };
    // No prefetch may write into the cache past this point: the successor
    // (handover) or nobody (shutdown) owns it next.
    {
        let d = daemon.clone();
        let why = match mode.lock().unwrap_or_else(|p| p.into_inner()).0 {
            ExitMode::Handover => "the daemon hands over",
            ExitMode::Shutdown => "the daemon shuts down",
        };
        if let Err(e) = tokio::task::spawn_blocking(move || d.prefetches.stop_all(why)).await {
            tracing::error!("stopping the prefetch threads failed (a bug): {e}");
        }
    }
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(t) = session_task {
        t.abort();
    }
    if let Some(r) = retrier {
        // Stops and joins the thread (a round under way finishes first), so
        // nothing rewrites images.json while a successor reads it.
        let _ = tokio::task::spawn_blocking(move || drop(r)).await;
    }
    let (mode, done) = std::mem::replace(
        &mut *mode.lock().unwrap_or_else(|p| p.into_inner()),
        (ExitMode::Shutdown, None),
    );
    let mode = exit_mode(mode, &finished, served.is_ok());
    let mode = fanotify_fail_closed(mode, &finished, &daemon.catalog);
    let outcome = match mode {
        ExitMode::Handover => handover::hand_over(&finished, store.as_ref(), &cfg.run_dir),
        ExitMode::Shutdown => {
            handover::shut_down(&finished, store.as_ref(), &cfg.run_dir);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cachefiles_server_that_failed_leaves_its_connection_parked() {
        let cachefiles = Finished::Cachefiles(Default::default());
        assert_eq!(
            exit_mode(ExitMode::Shutdown, &cachefiles, false),
            ExitMode::Handover,
            "a lost device must not unbind the cache"
        );
        assert_eq!(
            exit_mode(ExitMode::Shutdown, &cachefiles, true),
            ExitMode::Shutdown
        );
        assert_eq!(
            exit_mode(ExitMode::Handover, &cachefiles, false),
            ExitMode::Handover
        );
    }
}
