//! `lazypull daemon`: the cachefiles transport over the catalog (images
//! mounted by reference, and the local blob dir), plus the control socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lazypull_backend::registry::ClientOptions;
use lazypull_backend::retry::RetryPolicy;
use lazypull_engine::{FetchContext, FetchOptions, FillPolicy};
use lazypull_transport::cachefiles::{Config, OpenObjects, Server, Stats};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::catalog::{Catalog, RemoteSettings};
use crate::config::{DaemonArgs, DaemonConfig};
use crate::control::{self, Reply, Request};

/// What request handlers share.
struct Daemon {
    catalog: Arc<Catalog>,
    objects: OpenObjects,
    stats: Arc<Stats>,
    started: Instant,
}

pub fn run(args: DaemonArgs, started: Instant) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    if let Some(dir) = &cfg.blob_dir {
        if !dir.is_dir() {
            anyhow::bail!("blob directory {} does not exist", dir.display());
        }
    }
    // The work dir is created when an image is first registered: a daemon
    // serving only a local blob dir needs no writable place besides the cache.
    std::fs::create_dir_all(&cfg.cache_dir)
        .with_context(|| format!("creating the cache directory {}", cfg.cache_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.max_in_flight.max(1) + 4)
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
    )
}

async fn serve(cfg: DaemonConfig, started: Instant) -> anyhow::Result<()> {
    let catalog = Arc::new(catalog(&cfg));
    let resolver = {
        let catalog = catalog.clone();
        move |_volume: &[u8], cookie: &[u8]| catalog.resolve(cookie)
    };
    let server = Server::bind(
        Config {
            device: cfg.device.clone(),
            cache_dir: cfg.cache_dir.clone(),
            tag: cfg.tag.clone(),
            max_in_flight: cfg.max_in_flight,
            policy: FillPolicy {
                window: cfg.fill_window,
                io_size: cfg.io_size,
            },
            drain_timeout: Duration::from_secs(10),
        },
        Arc::new(resolver),
    )?;
    let listener = control::bind(&cfg.socket)?;
    let daemon = Arc::new(Daemon {
        catalog,
        objects: server.objects(),
        stats: server.stats(),
        started,
    });
    let control_task = tokio::spawn(accept_loop(listener, daemon.clone()));
    info!(
        blob_dir = ?cfg.blob_dir,
        socket = %cfg.socket.display(),
        pid = std::process::id(),
        startup_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0,
        "lazypull daemon ready"
    );
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    };
    let result = server.serve(shutdown).await;
    control_task.abort();
    let _ = std::fs::remove_file(&cfg.socket);
    let stats = result?;
    let fetch = daemon.catalog.fetch_context().stats.snapshot();
    info!(
        reads = stats.reads,
        bytes_written = stats.bytes_written,
        read_failures = stats.read_failures,
        range_requests = fetch.range_requests,
        verify_failures = fetch.verify_failures,
        "lazypull daemon exiting"
    );
    Ok(())
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

/// Handles one control request (blocking: may do network I/O).
fn handle(daemon: &Daemon, req: Request) -> anyhow::Result<serde_json::Value> {
    match req {
        Request::Register(r) => {
            let registered = daemon.catalog.register(&r).map_err(|e| {
                warn!(reference = %r.reference, "register failed: {e:#}");
                e
            })?;
            Ok(serde_json::to_value(registered)?)
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
            let (config, meta_path) = daemon
                .catalog
                .image(&fsid)
                .context("the image vanished from the catalog")?;
            let meta = std::fs::read(&meta_path)
                .with_context(|| format!("reading {}", meta_path.display()))?;
            let image = lazypull_erofs::Image::from_bytes(meta)?;
            let (spans, warnings) = crate::prefetch::plan(&config, &image, &prefetch);
            for w in &warnings {
                warn!("{w}");
            }
            let objects = daemon.objects.clone();
            let planned: u64 = spans.iter().map(|s| s.len).sum();
            std::thread::Builder::new()
                .name("lazypull-prefetch".into())
                .spawn(move || {
                    if let Err(e) = crate::prefetch::run(&objects, &fsid, &spans) {
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
        Request::Status => Ok(json!({
            "pid": std::process::id(),
            "uptime_secs": daemon.started.elapsed().as_secs(),
            "transport": daemon.stats.snapshot(),
            "fetch": daemon.catalog.fetch_context().stats.snapshot(),
            "images": daemon.catalog.images(),
            "objects": daemon.objects.list(),
        })),
    }
}
