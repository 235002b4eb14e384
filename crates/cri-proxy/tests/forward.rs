//! The proxy between a client and a fake runtime (hyper's HTTP/2 server on a
//! unix socket, answering like a gRPC server): every call arrives at the
//! runtime as sent and its answer (body and trailers) comes back unchanged;
//! a successful PullImage hands its credentials to the sink before the
//! answer; a failed one does not; a sink that fails does not fail the pull;
//! a runtime that is gone gives UNAVAILABLE, and one that comes back is
//! reached again.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lazypull_cri_proxy::pull::{AuthConfig, ImageSpec, PullImageRequest};
use lazypull_cri_proxy::{Proxy, PullCredentials};
use prost::Message;

/// What the fake runtime saw: (path, body).
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A fake runtime at `socket`: answers every call with the body it got
/// reversed, and `grpc-status` 16 for pulls of images named "denied", else 0,
/// in trailers.
fn fake_runtime(socket: &Path, seen: Seen) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            conns.spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        let denied = String::from_utf8_lossy(&body).contains("denied");
                        seen.lock().unwrap().push((path, body.clone()));
                        let mut answer = body;
                        answer.reverse();
                        let mut trailers = HeaderMap::new();
                        trailers.insert(
                            "grpc-status",
                            if denied { "16" } else { "0" }.parse().unwrap(),
                        );
                        trailers.insert("x-fake", "kept".parse().unwrap());
                        let body = Full::new(Bytes::from(answer))
                            .map_err(|n: Infallible| -> Infallible { match n {} })
                            .with_trailers(async move { Some(Ok(trailers)) });
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn framed(m: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(m);
    out
}

fn pull_body(image: &str, user: &str, password: &str) -> Vec<u8> {
    framed(
        &PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
            }),
            auth: Some(AuthConfig {
                username: user.into(),
                password: password.into(),
                ..AuthConfig::default()
            }),
        }
        .encode_to_vec(),
    )
}

/// One call to the proxy at `socket`: (grpc-status, body, trailers).
async fn call(socket: &Path, path: &str, body: Vec<u8>) -> (String, Vec<u8>, HeaderMap) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .or_else(|| headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    driver.abort();
    (status, collected.to_bytes().to_vec(), trailers)
}

struct Setup {
    _dir: tempfile::TempDir,
    runtime: PathBuf,
    socket: PathBuf,
    seen: Seen,
    handed: Arc<Mutex<Vec<PullCredentials>>>,
    proxy: Arc<Proxy>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

fn setup(sink_fails: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime.sock");
    let socket = dir.path().join("proxy/cri.sock");
    let handed = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let handed = handed.clone();
        Arc::new(move |c: PullCredentials| {
            if sink_fails {
                return Err("the daemon is not running".to_owned());
            }
            handed.lock().unwrap().push(c);
            Ok("stored".to_owned())
        })
    };
    let proxy = Proxy::new(&runtime, sink);
    let listener = lazypull_cri_proxy::bind(&socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(lazypull_cri_proxy::serve(listener, proxy.clone(), async {
        let _ = stopped.await;
    }));
    Setup {
        _dir: dir,
        runtime,
        socket,
        seen: Seen::default(),
        handed,
        proxy,
        serving,
        stop,
    }
}

#[tokio::test]
async fn calls_pass_through_and_successful_pulls_hand_their_credentials_on() {
    let s = setup(false);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket carries credentials: root's only");
    let runtime = fake_runtime(&s.runtime, s.seen.clone());

    // Any other call: the same bytes reach the runtime, its answer and
    // trailers come back.
    let (status, body, trailers) = call(
        &s.socket,
        "/runtime.v1.RuntimeService/Version",
        framed(b"hello"),
    )
    .await;
    assert_eq!(status, "0");
    let mut expected = framed(b"hello");
    expected.reverse();
    assert_eq!(body, expected);
    assert_eq!(trailers.get("x-fake").unwrap(), "kept");
    assert!(s.handed.lock().unwrap().is_empty());

    // A pull with credentials that succeeds: handed on, and forwarded as sent.
    let pull = pull_body("registry.lan/app:v1", "alice", "s3cret");
    let (status, body, trailers) = call(
        &s.socket,
        "/runtime.v1.ImageService/PullImage",
        pull.clone(),
    )
    .await;
    assert_eq!(status, "0");
    let mut expected = pull.clone();
    expected.reverse();
    assert_eq!(body, expected, "the pull's answer is the runtime's");
    assert_eq!(trailers.get("x-fake").unwrap(), "kept");
    let handed = s.handed.lock().unwrap().clone();
    assert_eq!(handed.len(), 1);
    assert_eq!(handed[0].image, "registry.lan/app:v1");
    assert_eq!(
        (handed[0].username.as_str(), handed[0].secret.as_str()),
        ("alice", "s3cret")
    );
    assert_eq!(
        s.seen.lock().unwrap().last().unwrap(),
        &("/runtime.v1.ImageService/PullImage".to_owned(), pull)
    );

    // A pull the runtime refuses: its credentials go nowhere.
    let (status, _, _) = call(
        &s.socket,
        "/runtime.v1.ImageService/PullImage",
        pull_body("registry.lan/denied:v1", "alice", "wrong"),
    )
    .await;
    assert_eq!(status, "16");
    assert_eq!(s.handed.lock().unwrap().len(), 1);

    // The runtime gone: UNAVAILABLE, then reached again once it is back.
    runtime.abort();
    let _ = runtime.await;
    std::fs::remove_file(&s.runtime).unwrap();
    let (status, _, _) = call(
        &s.socket,
        "/runtime.v1.RuntimeService/Version",
        framed(b"x"),
    )
    .await;
    assert_eq!(status, "14", "UNAVAILABLE while the runtime is gone");
    let _runtime = fake_runtime(&s.runtime, s.seen.clone());
    let (status, _, _) = call(
        &s.socket,
        "/runtime.v1.RuntimeService/Version",
        framed(b"x"),
    )
    .await;
    assert_eq!(status, "0", "a runtime that is back is reached again");
    assert!(
        s.proxy
            .stats()
            .runtime_unavailable
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    s.stop.send(()).unwrap();
    s.serving.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_sink_that_fails_does_not_fail_the_pull() {
    let s = setup(true);
    let _runtime = fake_runtime(&s.runtime, s.seen.clone());
    let (status, _, _) = call(
        &s.socket,
        "/runtime.v1.ImageService/PullImage",
        pull_body("registry.lan/app:v1", "alice", "s3cret"),
    )
    .await;
    assert_eq!(status, "0");
    let stats = s.proxy.stats();
    assert_eq!(
        stats
            .credentials_failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats
            .credentials_handed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // A second proxy on the same socket is refused.
    let again = lazypull_cri_proxy::bind(&s.socket);
    assert_eq!(
        again.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::AddrInUse)
    );
    s.stop.send(()).unwrap();
    s.serving.await.unwrap().unwrap();
}
