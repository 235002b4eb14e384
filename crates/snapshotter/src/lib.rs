//! lazypull's containerd snapshotter: containerd's snapshots gRPC API
//! (`containerd.services.snapshots.v1.Snapshots`, spoken to a
//! `[proxy_plugins]` snapshotter over a unix socket) served by an overlayfs
//! snapshotter modelled on containerd 1.6's own.
//!
//! It owns:
//! * the service answering the API ([`service`]; the wire contract and the
//!   generated code are `lazypull-containerd-api`'s, re-exported as [`proto`]);
//! * the snapshot store: kinds, parent chains, labels, times, usage, ids and
//!   the on-disk layout under `--root`, crash-safe ([`store`]);
//! * containerd's filter expressions for `List` ([`filter`]);
//! * the overlay / bind mount specs handed to containerd ([`mounts`]);
//! * the socket it listens on ([`serve`]).
//!
//! It must not touch fetching, EROFS, the kernel's cachefiles/FUSE or the
//! daemon: it runs in its own process so that it outlives daemon restarts
//! (and vice versa). Lazily pulled layers ("remote snapshots") and the
//! container snapshots on them are [`lazy`]'s; the daemon that mounts lazy
//! images is reached through the [`lazy::LazyMounts`] trait, which the
//! `lazypull` binary implements.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod du;
pub mod error;
pub mod filter;
pub mod lazy;
pub mod mounts;
pub mod proto;
pub mod service;
pub mod store;

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::Error;
pub use lazy::{LazyMounts, NoDaemon};
pub use service::Service;
pub use store::Store;

/// Default `--root`.
pub const DEFAULT_ROOT: &str = "/var/lib/lazypull/snapshotter";
/// Default `--address`.
pub const DEFAULT_ADDRESS: &str = "/run/lazypull/snapshotter.sock";

/// Why the snapshotter could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] Error),
    /// The socket could not be set up.
    #[error("socket {}: {msg}", path.display())]
    Socket {
        /// The --address.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A blocking start-up task failed.
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn socket_err(path: &Path, msg: impl Into<String>) -> ServeError {
    ServeError::Socket {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Binds `path` as a 0600 unix socket. Creates a missing parent directory
/// 0700. A socket file already there is removed only if nothing accepts on
/// it; a live one (another snapshotter) is refused. Blocking.
pub fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| {
                socket_err(
                    path,
                    format!("cannot create directory {}: {e}", parent.display()),
                )
            })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path)
        {
            Ok(_) => return Err(socket_err(
                path,
                "another snapshotter is listening on it; stop it first or pick another --address",
            )),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                std::fs::remove_file(path)
                    .map_err(|e| socket_err(path, format!("cannot remove stale socket: {e}")))?;
            }
            Err(e) => {
                return Err(socket_err(
                    path,
                    format!("exists and cannot be probed: {e}"),
                ))
            }
        },
        Ok(_) => {
            return Err(socket_err(
                path,
                "exists and is not a socket; refusing to replace it",
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(path, format!("cannot stat: {e}"))),
    }
    // Bind under a temporary name, restrict it, then move it into place: no
    // client ever sees the socket with wider permissions.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = parent.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| socket_err(path, format!("cannot bind {}: {e}", tmp.display())))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(socket_err(path, format!("cannot set up: {e}")));
    }
    Ok(listener)
}

/// Where to keep state and where to listen.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store's root directory.
    pub root: PathBuf,
    /// The unix socket containerd connects to.
    pub address: PathBuf,
}

/// Opens the store, binds the socket and serves until `shutdown` resolves;
/// then finishes the calls in flight and removes the socket. Lazy images'
/// containers are refused ([`NoDaemon`]); see [`serve_with`].
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(config, Arc::new(NoDaemon), shutdown).await
}

/// [`serve`] with lazy images mounted through `provider`. At start-up,
/// mounts of lazy images under `<root>/lazy` that no snapshot uses (a crash
/// left them) are unmounted; those in use are kept.
pub async fn serve_with(
    config: Config,
    provider: Arc<dyn LazyMounts>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let root = config.root.clone();
    let (store, opts, lazy) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let store = Store::open(&root)?;
        let opts = mounts::OverlayOptions::detect(&root);
        let lazy = lazy::Lazy::open(&root, provider)?;
        match lazy.reconcile(&store) {
            Ok(0) => {}
            Ok(n) => tracing::info!(unmounted = n, "unmounted lazy images no snapshot uses"),
            Err(e) => tracing::warn!(error = %e, "cannot unmount every unused lazy image"),
        }
        Ok((store, opts, lazy))
    })
    .await??;
    tracing::info!(root = %config.root.display(), index_off = opts.index_off, userxattr = opts.userxattr, "snapshot store open");
    let address = config.address.clone();
    let std_listener = tokio::task::spawn_blocking(move || bind_socket(&address)).await??;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| socket_err(&config.address, format!("cannot set non-blocking: {e}")))?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(|e| {
        socket_err(
            &config.address,
            format!("cannot register with the runtime: {e}"),
        )
    })?;
    tracing::info!(socket = %config.address.display(), "snapshotter listening");
    let service = Service::new(Arc::new(store), opts, Arc::new(lazy));
    let result = tonic::transport::Server::builder()
        .add_service(
            proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer::new(
                service,
            ),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let address = config.address.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(&address)).await;
    tracing::info!("snapshotter stopped");
    result.map_err(ServeError::from)
}
