//! A plain web server for blob directories: serves the files under one
//! directory on 127.0.0.1 with `GET`/`HEAD` and single `Range: bytes=` requests
//! (206 / 416), what `--blob-url` needs of any web server, and counts what it
//! served so a caller can say what crossed the network.
//!
//! `lazypull demo` serves its image with it, and the tests use the same server
//! for every "blob directory on a web server" case, so there is one such server
//! in the project. It must not know images or blobs: it serves files.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// A running server; stops when dropped.
pub struct BlobServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlobServer {
    pub fn start(root: &Path) -> std::io::Result<BlobServer> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (root, c) = (root.to_path_buf(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("lazypull-demo-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener)
                        .expect("registering the listener");
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept(listener, root, c) => {}
                    }
                });
            })?;
        Ok(BlobServer {
            addr,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    /// Body bytes sent so far.
    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, root: PathBuf, counters: Arc<Counters>) {
    let root = Arc::new(root);
    while let Ok((stream, _)) = listener.accept().await {
        let (root, counters) = (root.clone(), counters.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (root, counters) = (root.clone(), counters.clone());
                async move {
                    let r = tokio::task::spawn_blocking(move || respond(&root, &req, &counters))
                        .await
                        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR));
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

/// `bytes=A-B` or `bytes=A-` against a file of `size` bytes: the inclusive
/// range to send, or None when it cannot be satisfied.
fn parse_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => size.checked_sub(1)?,
        b => b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
    };
    (start <= end).then_some((start, end))
}

/// The file a request path names under `root`: every component a plain file
/// name (no `.`, `..`, empty components or control bytes), so nothing can
/// escape the directory.
fn file_for(root: &Path, path: &str) -> Option<PathBuf> {
    let path = path.strip_prefix('/')?;
    let mut file = root.to_path_buf();
    for component in path.split('/') {
        lazypull_source::validate_name(component.as_bytes()).ok()?;
        file.push(component);
    }
    Some(file)
}

fn respond(
    root: &Path,
    req: &Request<hyper::body::Incoming>,
    counters: &Counters,
) -> Response<Full<Bytes>> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(path) = file_for(root, req.uri().path()) else {
        return status(StatusCode::NOT_FOUND);
    };
    let Ok(file) = std::fs::File::open(path) else {
        return status(StatusCode::NOT_FOUND);
    };
    let size = match file.metadata() {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return status(StatusCode::NOT_FOUND),
        Err(_) => return status(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (code, start, end) = match range {
        Some(h) => match parse_range(h, size) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
            None => {
                let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE);
                r.headers_mut().insert(
                    hyper::header::CONTENT_RANGE,
                    format!("bytes */{size}").parse().expect("ascii"),
                );
                return r;
            }
        },
        None => (StatusCode::OK, 0, size),
    };
    let mut body = Vec::new();
    if req.method() == Method::GET {
        body = vec![0u8; (end - start) as usize];
        if file.read_exact_at(&mut body, start).is_err() {
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        }
        counters
            .bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        hyper::header::ACCEPT_RANGES,
        "bytes".parse().expect("ascii"),
    );
    h.insert(
        hyper::header::CONTENT_LENGTH,
        (end - start).to_string().parse().expect("ascii"),
    );
    if code == StatusCode::PARTIAL_CONTENT {
        h.insert(
            hyper::header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1)
                .parse()
                .expect("ascii"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_http_says() {
        assert_eq!(parse_range("bytes=0-0", 10), Some((0, 0)));
        assert_eq!(parse_range("bytes=3-", 10), Some((3, 9)));
        assert_eq!(parse_range("bytes=5-100", 10), Some((5, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
        assert_eq!(parse_range("items=0-1", 10), None);
        assert_eq!(parse_range("bytes=4-2", 10), None);
    }

    #[test]
    fn paths_stay_under_the_root() {
        let root = Path::new("/srv");
        assert_eq!(file_for(root, "/a/b"), Some(PathBuf::from("/srv/a/b")));
        for bad in ["/", "/a/../b", "/..", "/a//b", "/a/", "/./a", "a", "/a\x01"] {
            assert_eq!(file_for(root, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn serves_ranges_that_the_http_backend_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("blob"), &data).unwrap();
        let server = BlobServer::start(dir.path()).unwrap();
        let opts = lazypull_backend::ClientOptions::default();
        let blob =
            lazypull_backend::HttpBlob::open(&format!("{}blob", server.url()), &opts).unwrap();
        assert_eq!(blob.size(), 100_000);
        let mut buf = vec![0u8; 1000];
        lazypull_source::RangeRead::read_exact_at(&blob, &mut buf, 50_000).unwrap();
        assert_eq!(buf, data[50_000..51_000]);
        assert!(lazypull_backend::HttpBlob::open(&format!("{}nope", server.url()), &opts).is_err());
        assert!(server.requests() >= 3);
        assert_eq!(server.bytes(), 1001);
        // Nested files are served; directories and escapes are not.
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), b"nested").unwrap();
        let nested = lazypull_backend::HttpBlob::open(&format!("{}sub/f", server.url()), &opts);
        assert_eq!(nested.unwrap().size(), 6);
        assert!(lazypull_backend::HttpBlob::open(&format!("{}sub", server.url()), &opts).is_err());
    }
}
