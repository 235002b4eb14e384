//! The daemon's side of the control socket: binding it, accepting
//! connections, reading their requests and dispatching each to the catalog,
//! the transport view, prefetch or the exit channel. Handlers run on the
//! blocking pool: registering an image does network I/O.
//!
//! It owns no state of its own and must not do a handler's work on an async
//! task. The wire form is `control::protocol`.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{error, info, warn};

use super::prefetch;
use super::shared::{Daemon, ExitMode};
use crate::control::{Reply, Request};
use crate::status::StatusSource;

/// Binds the control socket at `path` (mode 0600), replacing a stale socket
/// file but refusing to steal one a live daemon answers on.
pub(crate) fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        // Created root's only; one that exists (maybe shared, like /run) is
        // left as it is: the socket itself is 0600.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another lazypull daemon is listening on {}; stop it or pass --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(listener)
}

pub(crate) async fn accept_loop(listener: tokio::net::UnixListener, daemon: Arc<Daemon>) {
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
                warn!(reference = %r.reference, fsid = ?r.fsid, "register failed: {e:#}");
                e
            })?;
            if daemon.catalog.prune_kubelet_credentials() {
                daemon.park_kubelet_credentials();
            }
            let (blobs, _) = daemon
                .catalog
                .image(&registered.fsid)
                .context("the image vanished from the catalog")?;
            let plan = daemon.view.mount_plan(&registered.fsid, &blobs)?;
            let mut v = serde_json::to_value(registered)?;
            v["mount"] = serde_json::to_value(plan)?;
            Ok(v)
        }
        Request::Mounted {
            fsid,
            mountpoint,
            prefetch: spec,
        } => {
            daemon.catalog.mounted(&fsid, &mountpoint)?;
            info!(%fsid, mountpoint = %mountpoint.display(), "image mounted");
            // The recorded order first (it is what the workload reads first),
            // then what the mount asked for.
            let mut spans = if spec.skip_record {
                Vec::new()
            } else {
                daemon.catalog.recorded(&fsid)
            };
            let recorded_bytes: u64 = spans.iter().map(|s| s.len).sum();
            let mut warnings = Vec::new();
            if !spec.is_empty() {
                let (blobs, meta_path) = daemon
                    .catalog
                    .image(&fsid)
                    .context("the image vanished from the catalog")?;
                let (asked, w) = prefetch::plan(&blobs, &meta_path, &spec)?;
                spans.extend(asked);
                warnings = w;
            }
            for w in &warnings {
                warn!("{w}");
            }
            if spans.is_empty() {
                return Ok(json!({"prefetch": false}));
            }
            let prefetcher = daemon.view.prefetcher();
            let planned: u64 = spans.iter().map(|s| s.len).sum();
            daemon.prefetches.start(prefetcher, fsid, spans)?;
            Ok(json!({
                "prefetch": true,
                "planned_bytes": planned,
                "recorded_bytes": recorded_bytes,
                "warnings": warnings,
            }))
        }
        Request::RecordStart { fsid } => {
            let blobs = daemon.catalog.record_start(&fsid)?;
            // Only missing windows reach the trace: a warm cache would hide
            // the reads it holds.
            let names: std::collections::HashSet<&str> =
                blobs.iter().map(|b| b.digest.as_str()).collect();
            let cached: u64 = daemon
                .view
                .blobs()
                .iter()
                .filter(|b| names.contains(b.blob.as_str()))
                .map(|b| b.cached_bytes)
                .sum();
            if cached > 0 {
                daemon.catalog.record_cancel(&fsid);
                anyhow::bail!(
                    "image {fsid} has {cached} bytes of its data cached in this daemon already: \
                     reads of them would not show in the record; record with a daemon whose cache is empty"
                );
            }
            info!(%fsid, "recording reads");
            Ok(json!({"recording": true, "blobs": blobs.len()}))
        }
        Request::RecordStop { fsid } => {
            let (record, truncated, traced) = daemon.catalog.record_stop(&fsid)?;
            info!(%fsid, entries = record.entries.len(), bytes = record.bytes(), traced, truncated, "recording stopped");
            Ok(json!({
                "record": record,
                "traced_ranges": traced,
                "truncated": truncated,
            }))
        }
        Request::Unmounted { mountpoint } => {
            let fsid = daemon.catalog.unmounted(&mountpoint);
            info!(mountpoint = %mountpoint.display(), ?fsid, "image unmounted");
            if let Some(fsid) = &fsid {
                let still_mounted = daemon
                    .catalog
                    .images()
                    .iter()
                    .any(|i| &i.fsid == fsid && !i.mountpoints.is_empty());
                if !still_mounted {
                    daemon
                        .prefetches
                        .stop_image(fsid, "its image was unmounted");
                    daemon.catalog.record_cancel(fsid);
                }
            }
            Ok(json!({ "fsid": fsid }))
        }
        Request::KubeletCredentials(c) => {
            let (registry, repository) =
                daemon
                    .catalog
                    .put_kubelet_credentials(&c.image, &c.username, &c.secret)?;
            let parked = daemon.park_kubelet_credentials();
            info!(image = %c.image, %registry, %repository, parked, "keeping the credentials kubelet sent with its pull (in memory)");
            Ok(json!({
                "registry": registry,
                "repository": repository,
                "parked": parked,
            }))
        }
        Request::Status => Ok(serde_json::to_value(daemon.status())?),
        Request::Handover => {
            let (tx, rx) = std::sync::mpsc::channel();
            daemon.request_exit(ExitMode::Handover, Some(tx))?;
            rx.recv_timeout(Duration::from_secs(60))
                .context("the daemon did not finish handing over within 60 s")??;
            Ok(json!({"handed_over": true, "pid": std::process::id()}))
        }
        Request::Shutdown => {
            daemon.request_exit(ExitMode::Shutdown, None)?;
            Ok(json!({"shutting_down": true, "pid": std::process::id()}))
        }
    }
}
