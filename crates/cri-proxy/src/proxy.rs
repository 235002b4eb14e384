//! The proxy: gRPC over HTTP/2 on a unix socket, every call forwarded to the
//! runtime's socket as it came (headers, body, trailers, streaming), with
//! one exception: a `PullImage` is read whole first, and when the runtime
//! answers it with success, the credentials kubelet sent with it are handed
//! to the [`CredentialSink`] before kubelet sees the answer. So by the time
//! kubelet creates a container of the image (and lazypull's snapshotter asks
//! the daemon to mount it), the daemon holds the credentials; and it only
//! ever holds credentials the registry has just accepted.
//!
//! A sink that fails or hangs never fails the pull: the failure is logged
//! and counted, and the pull's answer goes back unchanged (an ordinary image
//! needs no daemon; a lazy one then fails at mount with the daemon's own
//! error).

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::pull::{pull_credentials, PullCredentials, PULL_IMAGE_PATHS};

/// Where a successful pull's credentials go (lazypull's daemon, through its
/// control socket). Called on the blocking pool; `Ok` carries a line for the
/// log, `Err` the reason it failed.
pub type CredentialSink = Arc<dyn Fn(PullCredentials) -> Result<String, String> + Send + Sync>;

/// Largest `PullImage` request or answer read whole (they are some hundred
/// bytes: an image name, credentials, a pod's config).
const MAX_PULL_MESSAGE: usize = 1 << 20;

/// How long a pull's answer waits for the sink.
const SINK_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, hyper::Error>;

/// What the proxy has done, for status lines and tests.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Calls forwarded to the runtime (every method).
    pub calls: AtomicU64,
    /// Calls answered UNAVAILABLE because the runtime could not be reached.
    pub runtime_unavailable: AtomicU64,
    /// PullImage calls seen.
    pub pulls: AtomicU64,
    /// Successful pulls whose credentials the sink took.
    pub credentials_handed: AtomicU64,
    /// Successful pulls with credentials the sink failed to take (or that
    /// could not be read from the request).
    pub credentials_failed: AtomicU64,
}

/// The proxy's state: where the runtime is, the one HTTP/2 connection to it
/// (shared by every kubelet connection; made again when it breaks), the
/// sink.
pub struct Proxy {
    runtime: PathBuf,
    sink: CredentialSink,
    upstream: tokio::sync::Mutex<Option<SendRequest<Body>>>,
    /// The task driving the upstream connection (aborted with a new one and
    /// when the proxy stops).
    upstream_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stats: ProxyStats,
}

impl Proxy {
    /// A proxy to the runtime listening at `runtime` (containerd's socket).
    pub fn new(runtime: impl Into<PathBuf>, sink: CredentialSink) -> Arc<Proxy> {
        Arc::new(Proxy {
            runtime: runtime.into(),
            sink,
            upstream: tokio::sync::Mutex::new(None),
            upstream_task: Mutex::new(None),
            stats: ProxyStats::default(),
        })
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// A ready sender on the upstream connection, connecting if there is none.
    async fn sender(&self) -> Result<SendRequest<Body>, String> {
        let mut slot = self.upstream.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        *slot = None;
        let stream = UnixStream::connect(&self.runtime).await.map_err(|e| {
            format!(
                "cannot connect to the runtime at {}: {e}",
                self.runtime.display()
            )
        })?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| {
                    format!(
                        "HTTP/2 handshake with the runtime at {}: {e}",
                        self.runtime.display()
                    )
                })?;
        let runtime = self.runtime.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                warn!(runtime = %runtime.display(), "the connection to the runtime ended: {e}");
            }
        });
        if let Some(old) = self
            .upstream_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
        info!(runtime = %self.runtime.display(), "connected to the runtime");
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Sends `req` to the runtime.
    async fn forward(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        let mut sender = self.sender().await?;
        sender
            .ready()
            .await
            .map_err(|e| format!("the runtime at {}: {e}", self.runtime.display()))?;
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("the runtime at {}: {e}", self.runtime.display()))
    }

    /// Answers one call from kubelet.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path().to_owned();
        let (mut parts, body) = req.into_parts();
        // The runtime sees the call as coming to it; hyper's client wants an
        // absolute URI.
        parts.uri = match format!(
            "http://localhost{}",
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        )
        .parse()
        {
            Ok(u) => u,
            Err(e) => return Ok(grpc_error(13, &format!("cannot forward {path}: {e}"))),
        };
        if !PULL_IMAGE_PATHS.contains(&path.as_str()) {
            debug!(%path, "forwarding");
            let req = Request::from_parts(parts, body.boxed());
            return Ok(match self.forward(req).await {
                Ok(resp) => resp.map(BodyExt::boxed),
                Err(e) => self.unavailable(&path, &e),
            });
        }
        self.stats.pulls.fetch_add(1, Ordering::Relaxed);
        let body = match Limited::new(body, MAX_PULL_MESSAGE).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Ok(grpc_error(
                    8,
                    &format!("reading the PullImage request: {e}"),
                ))
            }
        };
        let credentials = pull_credentials(&body);
        let req = Request::from_parts(parts, Full::new(body).map_err(|n| match n {}).boxed());
        let resp = match self.forward(req).await {
            Ok(r) => r,
            Err(e) => return Ok(self.unavailable(&path, &e)),
        };
        let (parts, body) = resp.into_parts();
        let collected = match Limited::new(body, MAX_PULL_MESSAGE).collect().await {
            Ok(c) => c,
            Err(e) => {
                return Ok(grpc_error(
                    14,
                    &format!("reading the runtime's PullImage answer: {e}"),
                ))
            }
        };
        let trailers = collected.trailers().cloned();
        let ok = grpc_ok(&parts.headers, trailers.as_ref());
        match (ok, credentials) {
            (true, Ok(Some(c))) => self.hand(c).await,
            (true, Err(e)) => {
                self.stats
                    .credentials_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!("a PullImage succeeded but its credentials cannot be read, so lazypull's daemon does not get them: {e}");
            }
            (true, Ok(None)) => debug!("an anonymous PullImage succeeded"),
            (false, _) => debug!("a PullImage failed: its credentials are not handed on"),
        }
        let data = Full::new(collected.to_bytes()).map_err(|n: Infallible| match n {});
        let body = match trailers {
            Some(t) => data.with_trailers(async move { Some(Ok(t)) }).boxed(),
            None => data.boxed(),
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Hands `c` to the sink, waiting at most [`SINK_TIMEOUT`].
    async fn hand(&self, c: PullCredentials) {
        let image = c.image.clone();
        let sink = self.sink.clone();
        let call = tokio::task::spawn_blocking(move || sink(c));
        let handed = match tokio::time::timeout(SINK_TIMEOUT, call).await {
            Ok(Ok(r)) => r.map_err(|e| {
                format!("lazypull's daemon did not take them (a lazy image of it will fail to mount): {e}")
            }),
            Ok(Err(e)) => Err(format!("handing them on failed (a bug): {e}")),
            Err(_) => Err(format!(
                "lazypull's daemon did not take them within {SINK_TIMEOUT:?}: answering the pull without waiting longer"
            )),
        };
        match handed {
            Ok(line) => {
                self.stats
                    .credentials_handed
                    .fetch_add(1, Ordering::Relaxed);
                info!(%image, "handed the pull's credentials on: {line}");
            }
            Err(why) => {
                self.stats
                    .credentials_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%image, "a pull succeeded but its credentials were not handed on: {why}");
            }
        }
    }

    fn unavailable(&self, path: &str, why: &str) -> Response<Body> {
        self.stats
            .runtime_unavailable
            .fetch_add(1, Ordering::Relaxed);
        warn!(%path, "cannot forward the call: {why}");
        grpc_error(14, why)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self
            .upstream_task
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

/// Whether a gRPC answer says OK: `grpc-status` 0 in its trailers, or in
/// its headers for a trailers-only answer.
fn grpc_ok(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    let status = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"));
    status.is_some_and(|s| s.as_bytes() == b"0")
}

/// A trailers-only gRPC answer with status `code` and message `message`
/// (percent-encoded, as gRPC's `grpc-message` is).
fn grpc_error(code: u8, message: &str) -> Response<Body> {
    let mut encoded = String::new();
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let mut resp = Response::new(Empty::new().map_err(|n| match n {}).boxed());
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", u16::from(code).into());
    if let Ok(v) = hyper::header::HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    resp
}

/// Binds the proxy's socket at `path`, mode 0600 (it carries credentials),
/// creating its directory root's only; a stale socket file is replaced, one
/// a live proxy answers on is refused.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another process listens on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves kubelet's connections on `listener` until `shutdown` completes;
/// then stops accepting and ends every connection (kubelet reconnects to the
/// next proxy). Connection tasks are owned here and joined before it
/// returns.
pub async fn serve(
    listener: UnixListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let proxy = proxy.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| proxy.clone().handle(req));
                    if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        debug!("a kubelet connection ended: {e}");
                    }
                });
            }
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
    Ok(())
}
