//! `lazypull daemon`: the cachefiles transport over a local blob directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lazypull_backend::{BlobSource, LocalDir, OpenError};
use lazypull_engine::FillPolicy;
use lazypull_transport::cachefiles::{Config, Server};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::config::DaemonArgs;

/// A blob in the blob dir: its stored form (`<name>.table` + `<name>.zst`,
/// decompressed and verified unit by unit) when present, else the plain file.
fn resolve(store: &LocalDir, cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> {
    let name = lazypull_backend::validate_name(cookie)?;
    match lazypull_blob::open_local(store.root(), name) {
        Ok(Some(stored)) => Ok(Arc::new(stored)),
        Ok(None) => Ok(store.open(cookie)?),
        Err(e) => Err(OpenError::Io {
            name: name.to_owned(),
            path: store.root().join(format!("{name}.table")),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }),
    }
}

pub fn run(args: DaemonArgs, started: Instant) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    if !cfg.blob_dir.is_dir() {
        anyhow::bail!("blob directory {} does not exist", cfg.blob_dir.display());
    }
    if !cfg.cache_dir.is_dir() {
        std::fs::create_dir_all(&cfg.cache_dir)
            .with_context(|| format!("creating cache directory {}", cfg.cache_dir.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.max_in_flight.max(1))
        .thread_name("lazypull")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let store = LocalDir::new(cfg.blob_dir.clone());
        let resolver = move |_volume: &[u8], cookie: &[u8]| resolve(&store, cookie);
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
        info!(
            blob_dir = %cfg.blob_dir.display(),
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
        let stats = server.serve(shutdown).await?;
        info!(
            reads = stats.reads,
            bytes_written = stats.bytes_written,
            read_failures = stats.read_failures,
            "lazypull daemon exiting"
        );
        Ok(())
    })
}
