//! The async runtime and the SIGTERM / SIGINT handling of the commands that
//! run a server until stopped (`snapshotter`, `cri-proxy`).

use std::future::Future;
use std::pin::Pin;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

/// What completes on SIGTERM or SIGINT (logged).
pub(super) type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `serve(stop)` on a runtime of two workers named `thread_name`;
/// `stop` completes on SIGTERM or SIGINT.
pub(super) fn run_until_signal<Fut>(
    thread_name: &str,
    serve: impl FnOnce(Stop) -> Fut,
) -> anyhow::Result<()>
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(thread_name)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let stop: Stop = Box::pin(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
        });
        serve(stop).await
    })
}
