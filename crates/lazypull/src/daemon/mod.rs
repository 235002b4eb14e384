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
mod persist;
mod prefetch;
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
use lazypull_source::{BlobResolver, BlobSource, OpenError};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::catalog::{Catalog, RemoteSettings};
use crate::config::{DaemonArgs, DaemonConfig};
use crate::fdstore;
use crate::status::StatusSource;
use handover::{Finished, Parked};
use persist::TransportState;
use shared::{Daemon, ExitMode, ExitRequest};
use transport::Running;

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
        handover::request_handover(&cfg)?;
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
        Some(persist::images_file(&cfg.run_dir)),
    )
}

async fn serve(cfg: DaemonConfig, started: Instant) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    let store = match &cfg.fd_store {
        Some(path) => Some(fdstore::Client::connect_or_spawn(path)?),
        None => None,
    };
    let mut parked = Parked::from_store(store.as_ref())?;
    let catalog = Arc::new(catalog(&cfg));
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
    let resolver: Arc<dyn BlobResolver> = {
        let catalog = catalog.clone();
        Arc::new(
            move |_volume: &[u8], cookie: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
                catalog.resolve(cookie)
            },
        )
    };
    let (running, reason) = transport::start(&cfg, resolver, &mut parked, saved)?;
    parked.drop_unclaimed(store.as_ref())?;
    let view = running.view(&cfg.fuse_dir);
    if let Some(s) = &store {
        match &running {
            Running::Cachefiles(server) => {
                handover::park_cachefiles_device(s, server.device_fd()?.as_fd())?
            }
            Running::Fuse(server) => {
                handover::park_fuse_connection(s, server.connection_fd()?.as_fd())?
            }
        }
    }
    info!(transport = view.name(), reason = %reason, "transport chosen");

    let listener = control_server::bind(&cfg.socket)?;
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<ExitRequest>();
    let daemon = Arc::new(Daemon::new(catalog, view, started, reason, exit_tx));
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
    let session_task = match &running {
        Running::Fuse(server) => Some(tokio::spawn(persist::save_fuse_sessions(
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
    let (finished, served) = match running {
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
