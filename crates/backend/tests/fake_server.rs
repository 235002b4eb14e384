//! Protocol tests against a tiny in-process HTTP server: Bearer tokens,
//! retries of transient failures, no retries of permanent ones, Range
//! validation, redirects and uploads.
//!
//! Why a scripted server of its own, beside the real `docker-registry` (in
//! `tests/registry.rs`) and the test kit's fault proxy: these tests need
//! answers no real registry gives on demand — a token realm on another host, a
//! redirect to storage, a 200 where a 206 was asked for, a wrong
//! `Content-Range`, a body cut at a chosen byte — each scripted per request and
//! asserted against the exact requests the client sent.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazypull_backend::{
    ClientOptions, Credentials, HttpBlob, Registry, RegistryError, RetryPolicy,
};
use lazypull_source::RangeRead;
use sha2::Digest;

#[derive(Clone, Debug)]
struct Req {
    method: String,
    /// Path and query, percent-decoded.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }
    fn query(&self, key: &str) -> Vec<String> {
        let q = self.target.split_once('?').map(|x| x.1).unwrap_or("");
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .collect()
    }
    /// `Range: bytes=a-b` as (a, b).
    fn range(&self) -> Option<(usize, usize)> {
        let r = self.header("range")?.strip_prefix("bytes=")?;
        let (a, b) = r.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

enum Reply {
    /// A complete response (Content-Length added).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Announces `announced` bytes, sends `body`, then closes.
    Truncated {
        status: u16,
        headers: Vec<(String, String)>,
        announced: usize,
        body: Vec<u8>,
    },
    /// No Content-Length: the body runs until the connection closes.
    UntilClose {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A complete response whose body goes out `chunk` bytes at a time with
    /// a pause of `pause` before each (a slow or dripping server).
    Paced {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        chunk: usize,
        pause: Duration,
    },
}

fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Reply {
    Reply::Full {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.into(),
    }
}

/// A 206 for `req`'s range of `data`, or 200 with all of it without a range.
fn serve_range(req: &Req, data: &[u8]) -> Reply {
    match req.range() {
        Some((a, b)) => reply(
            206,
            &[("Content-Range", &format!("bytes {a}-{b}/{}", data.len()))],
            &data[a..=b],
        ),
        None => reply(200, &[], data),
    }
}

type Handler = dyn Fn(&Req, u16) -> Reply + Send + Sync;

struct Server {
    port: u16,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    fn start(handler: impl Fn(&Req, u16) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log2 = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handler = handler.clone();
                let log = log2.clone();
                std::thread::spawn(move || serve_conn(conn, port, &*handler, &log));
            }
        });
        Server { port, log }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, path_prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path().starts_with(path_prefix))
            .count()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// One request per connection; every response closes the connection.
fn serve_conn(conn: TcpStream, port: u16, handler: &Handler, log: &Mutex<Vec<Req>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = percent_decode(parts.next().unwrap_or(""));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut req = Req {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = req
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; n];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        req.body = body;
    }
    log.lock().unwrap().push(req.clone());
    let reply = handler(&req, port);
    let mut w = conn;
    let head = |status: u16, headers: &[(String, String)], len: Option<usize>| {
        let mut s = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
        for (k, v) in headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(n) = len {
            s.push_str(&format!("Content-Length: {n}\r\n"));
        }
        s.push_str("\r\n");
        s
    };
    let is_head = req.method == "HEAD";
    let _ = match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let announced = headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
            let mut out = head(status, &headers, (!announced).then_some(body.len())).into_bytes();
            if !is_head {
                out.extend_from_slice(&body);
            }
            w.write_all(&out)
        }
        Reply::Truncated {
            status,
            headers,
            announced,
            body,
        } => {
            let mut out = head(status, &headers, Some(announced)).into_bytes();
            out.extend_from_slice(&body);
            w.write_all(&out)
        }
        Reply::UntilClose {
            status,
            headers,
            body,
        } => {
            let mut out = head(status, &headers, None).into_bytes();
            out.extend_from_slice(&body);
            w.write_all(&out)
        }
        Reply::Paced {
            status,
            headers,
            body,
            chunk,
            pause,
        } => (|| {
            w.write_all(head(status, &headers, Some(body.len())).as_bytes())?;
            w.flush()?;
            for piece in body.chunks(chunk.max(1)) {
                std::thread::sleep(pause);
                // Fails once the client has given up and closed.
                w.write_all(piece)?;
                w.flush()?;
            }
            Ok(())
        })(),
    };
    let _ = w.flush();
    let _ = w.shutdown(std::net::Shutdown::Both);
}

/// WARN-level log lines of this test binary so far (all tests share one
/// global subscriber; a test picks its own lines by its server's address).
fn warnings() -> String {
    static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static INSTALL: std::sync::Once = std::sync::Once::new();
    struct Sink;
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            LOGS.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| Sink)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn fast_opts(attempts: u32) -> ClientOptions {
    ClientOptions {
        retry: RetryPolicy {
            attempts,
            base_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(10),
        },
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

fn creds(user: &str, pass: &str) -> Option<Credentials> {
    Some(Credentials {
        username: user.into(),
        password: pass.into(),
    })
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[test]
fn bearer_token_flow() {
    let blob = data(10_000);
    let d = digest_of(&blob);
    let blob2 = blob.clone();
    let path = format!("/v2/r/blobs/{d}");
    let srv = Server::start(move |req, port| {
        if req.path() == "/token" {
            let ok_scope =
                req.query("scope") == ["repository:r:pull"] && req.query("service") == ["x"];
            if !ok_scope {
                return reply(400, &[], format!("bad token request {}", req.target));
            }
            return match req.header("authorization") {
                Some(a) if a == basic("alice", "pw") => {
                    reply(200, &[], r#"{"token":"tok-alice","expires_in":300}"#)
                }
                Some(_) => reply(401, &[], "bad credentials"),
                None => reply(200, &[], r#"{"access_token":"tok-anon"}"#),
            };
        }
        if req.path() == path {
            if req.header("authorization") == Some("Bearer tok-alice") {
                return serve_range(req, &blob2);
            }
            let challenge = format!(
                r#"Bearer realm="http://127.0.0.1:{port}/token",service="x",scope="repository:r:pull""#
            );
            return reply(401, &[("WWW-Authenticate", &challenge)], "{}");
        }
        reply(404, &[], "")
    });

    let reg = Registry::new(&srv.host(), "r", creds("alice", "pw"), &fast_opts(3)).unwrap();
    let reader = reg.blob_reader(&d, blob.len() as u64);
    for (off, len) in [(0usize, 100usize), (5000, 4999), (9999, 1)] {
        let mut buf = vec![0u8; len];
        reader.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf[..] == blob[off..off + len]);
    }
    assert!(reg.get_blob(&d, &|_| {}).unwrap() == blob);
    // One challenge, one token, then the cached token for every request.
    let reqs = srv.requests();
    assert_eq!(srv.count("/token"), 1, "{reqs:#?}");
    assert_eq!(reqs[0].header("authorization"), None);
    assert_eq!(reqs[1].path(), "/token");
    assert!(reqs[2..]
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer tok-alice")));
    assert_eq!(reqs.len(), 2 + 4);
    let st = reg.stats();
    assert_eq!((st.requests, st.retries, st.failures), (6, 0, 0));

    // Wrong password: the token server says 401.
    let wrong = Registry::new(&srv.host(), "r", creds("alice", "nope"), &fast_opts(3)).unwrap();
    let err = wrong.get_blob(&d, &|_| {}).unwrap_err();
    assert!(matches!(err, RegistryError::AuthFailed { .. }), "{err}");
    assert_eq!(wrong.stats().retries, 0);

    // Anonymous: a token is issued but not accepted, so credentials are needed.
    let anon = Registry::new(&srv.host(), "r", None, &fast_opts(3)).unwrap();
    let err = anon.get_blob(&d, &|_| {}).unwrap_err();
    assert!(matches!(err, RegistryError::AuthRequired { .. }), "{err}");
    assert!(err.to_string().contains(&srv.host()));
    let anon_token_reqs: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|r| r.path() == "/token" && r.header("authorization").is_none())
        .collect();
    assert_eq!(anon_token_reqs.len(), 1);
}

#[test]
fn transient_failures_are_retried() {
    let blob = data(50_000);
    let d = digest_of(&blob);
    let blob2 = blob.clone();
    let n = AtomicUsize::new(0);
    let srv = Server::start(move |req, _| {
        match n.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => reply(503, &[], "busy"),
            2 => {
                // Announce the whole range, send half of it, hang up.
                let (a, b) = req.range().unwrap();
                Reply::Truncated {
                    status: 206,
                    headers: vec![(
                        "Content-Range".into(),
                        format!("bytes {a}-{b}/{}", blob2.len()),
                    )],
                    announced: b - a + 1,
                    body: blob2[a..a + (b - a + 1) / 3].to_vec(),
                }
            }
            _ => serve_range(req, &blob2),
        }
    });
    let reg = Registry::new(&srv.host(), "r", None, &fast_opts(5)).unwrap();
    let mut buf = vec![0u8; 20_000];
    warnings(); // install the log capture before the first retry
    reg.blob_reader(&d, blob.len() as u64)
        .read_exact_at(&mut buf, 12_345)
        .unwrap();
    // Each retry is logged with the URL (naming the blob), the attempt and the cause.
    let logs = warnings();
    let lines: Vec<_> = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&srv.host()))
        .collect();
    assert_eq!(lines.len(), 3, "{logs}");
    for (i, cause) in ["503", "503", "reading the response body"]
        .iter()
        .enumerate()
    {
        let l = lines[i];
        assert!(l.contains(&format!("/v2/r/blobs/{d}")), "{l}");
        assert!(l.contains(&format!("attempt {} of 5", i + 1)), "{l}");
        assert!(l.contains(cause), "{l}");
    }
    assert!(buf[..] == blob[12_345..32_345]);
    let st = reg.stats();
    assert_eq!(st.retries, 3, "{st:?}");
    assert_eq!(st.range_requests, 4, "{st:?}");
    assert_eq!(st.failures, 0, "{st:?}");
    assert_eq!(srv.requests().len(), 4);
}

#[test]
fn transient_failures_give_up_after_the_last_attempt() {
    let srv = Server::start(|_, _| reply(502, &[], "bad gateway from upstream"));
    let reg = Registry::new(&srv.host(), "r", None, &fast_opts(3)).unwrap();
    let d = digest_of(b"x");
    let err = reg
        .blob_reader(&d, 100)
        .read_exact_at(&mut [0u8; 10], 0)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&d) && msg.contains("502") && msg.contains("bad gateway"),
        "{msg}"
    );
    assert_eq!(srv.requests().len(), 3);
    let st = reg.stats();
    assert_eq!((st.retries, st.failures), (2, 1));
}

#[test]
fn permanent_errors_are_not_retried() {
    let srv = Server::start(|req, _| {
        if req.path().contains("/bad/") {
            reply(400, &[], "nope")
        } else {
            reply(404, &[], r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#)
        }
    });
    let d = digest_of(b"gone");
    let reg = Registry::new(&srv.host(), "r", None, &fast_opts(5)).unwrap();
    let err = reg.get_blob(&d, &|_| {}).unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert_eq!(srv.requests().len(), 1);
    let err = reg
        .blob_reader(&d, 10)
        .read_exact_at(&mut [0u8; 4], 0)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains(&d), "{err}");
    assert_eq!(srv.requests().len(), 2);
    let err = reg.get_manifest("v1").unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    assert_eq!(srv.requests().len(), 3);

    let bad = Registry::new(&srv.host(), "bad", None, &fast_opts(5)).unwrap();
    let err = bad.get_manifest("v1").unwrap_err();
    assert!(
        matches!(err, RegistryError::Status { status: 400, .. }),
        "{err}"
    );
    assert_eq!(srv.requests().len(), 4);
    let st = reg.stats();
    assert_eq!((st.retries, st.failures), (0, 3));
}

#[test]
fn range_answers_are_validated() {
    let blob = data(4096);
    let b = blob.clone();
    let srv = Server::start(move |req, _| match req.path() {
        // Ignores Range entirely.
        "/norange" => reply(200, &[], b.clone()),
        // Answers with the wrong range.
        "/shifted" => match req.range() {
            Some((0, 0)) => serve_range(req, &b),
            Some((x, y)) => reply(
                206,
                &[(
                    "Content-Range",
                    &format!("bytes {}-{}/{}", x + 1, y + 1, b.len()),
                )],
                b[x + 1..=y + 1].to_vec(),
            ),
            None => reply(500, &[], ""),
        },
        // Sends more than was asked for, without Content-Length.
        "/long" => match req.range() {
            Some((0, 0)) => serve_range(req, &b),
            Some((x, y)) => Reply::UntilClose {
                status: 206,
                headers: vec![("Content-Range".into(), format!("bytes {x}-{y}/{}", b.len()))],
                body: b[x..=y + 10].to_vec(),
            },
            None => reply(500, &[], ""),
        },
        "/empty" => reply(416, &[("Content-Range", "bytes */0")], ""),
        "/limited" => {
            static N: AtomicU64 = AtomicU64::new(0);
            if N.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                reply(429, &[("Retry-After", "0")], "slow down")
            } else {
                serve_range(req, &b)
            }
        }
        _ => serve_range(req, &b),
    });
    let url = |p: &str| format!("http://{}{p}", srv.host());

    let err = HttpBlob::open(&url("/norange"), &fast_opts(3)).unwrap_err();
    assert!(
        err.to_string().contains("ignored the Range header"),
        "{err}"
    );

    let shifted = HttpBlob::open(&url("/shifted"), &fast_opts(3)).unwrap();
    assert_eq!(shifted.size(), 4096);
    let err = shifted.read_exact_at(&mut [0u8; 100], 10).unwrap_err();
    assert!(err.to_string().contains("asked for bytes 10-109"), "{err}");
    assert_eq!(shifted.stats().retries, 0);

    let long = HttpBlob::open(&url("/long"), &fast_opts(3)).unwrap();
    let err = long.read_exact_at(&mut [0u8; 100], 10).unwrap_err();
    assert!(err.to_string().contains("wrong length"), "{err}");
    assert_eq!(long.stats().retries, 2, "wrong-length bodies are retried");
    assert_eq!(long.stats().failures, 1);

    let empty = HttpBlob::open(&url("/empty"), &fast_opts(3)).unwrap();
    assert_eq!(empty.size(), 0);
    let err = empty.read_exact_at(&mut [0u8; 1], 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);

    let limited = HttpBlob::open(&url("/limited"), &fast_opts(3)).unwrap();
    for off in [0u64, 1000, 4000] {
        let mut buf = [0u8; 96];
        limited.read_exact_at(&mut buf, off).unwrap();
        assert!(buf[..] == blob[off as usize..off as usize + 96]);
    }
    assert!(limited.stats().retries >= 1, "{:?}", limited.stats());

    let ok = HttpBlob::open(&url("/plain"), &fast_opts(3)).unwrap();
    let mut buf = vec![0u8; 4096];
    ok.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == blob);

    for bad in ["ftp://x/y", "not a url"] {
        let err = HttpBlob::open(bad, &fast_opts(1)).unwrap_err();
        assert!(matches!(err, RegistryError::InvalidUrl { .. }), "{err}");
    }
}

#[test]
fn redirects_do_not_carry_credentials_to_another_host() {
    let blob = data(30_000);
    let d = digest_of(&blob);
    let b = blob.clone();
    let storage = Server::start(move |req, _| serve_range(req, &b));
    let storage_url = format!("http://{}/bucket/blob?sig=abc", storage.host());
    let registry = Server::start(move |req, _| {
        if req.header("authorization") != Some(&basic("bob", "pw")) {
            return reply(401, &[("WWW-Authenticate", r#"Basic realm="r""#)], "");
        }
        reply(307, &[("Location", &storage_url)], "")
    });
    let reg = Registry::new(&registry.host(), "r", creds("bob", "pw"), &fast_opts(3)).unwrap();
    assert!(reg.get_blob(&d, &|_| {}).unwrap() == blob);
    let mut buf = vec![0u8; 1000];
    reg.blob_reader(&d, blob.len() as u64)
        .read_exact_at(&mut buf, 29_000)
        .unwrap();
    assert!(buf[..] == blob[29_000..]);

    let at_storage = storage.requests();
    assert_eq!(at_storage.len(), 2);
    for r in &at_storage {
        assert_eq!(r.header("authorization"), None, "credentials leaked: {r:?}");
    }
    assert_eq!(at_storage[1].header("range"), Some("bytes=29000-29999"));
    let at_registry = registry.requests();
    assert!(at_registry[1..]
        .iter()
        .all(|r| r.header("authorization") == Some(&basic("bob", "pw"))));
}

#[test]
fn uploads_follow_relative_locations_and_reopen_on_retry() {
    let blob = data(200_000);
    let d = digest_of(&blob);
    let puts = AtomicUsize::new(0);
    let d2 = d.clone();
    let srv = Server::start(move |req, _| match (req.method.as_str(), req.path()) {
        ("HEAD", _) => reply(404, &[], ""),
        ("POST", "/v2/team/app/blobs/uploads/") => reply(
            202,
            &[("Location", "/v2/team/app/blobs/uploads/u-1?_state=s%2B1")],
            "",
        ),
        ("PUT", "/v2/team/app/blobs/uploads/u-1") => {
            if req.query("_state") != ["s+1"] || req.query("digest") != [d2.clone()] {
                return reply(400, &[], format!("bad query {}", req.target));
            }
            if puts.fetch_add(1, Ordering::SeqCst) == 0 {
                return reply(500, &[], "storage hiccup");
            }
            if digest_of(&req.body) != d2 {
                return reply(400, &[], "DIGEST_INVALID");
            }
            reply(201, &[("Docker-Content-Digest", &d2)], "")
        }
        _ => reply(404, &[], ""),
    });
    let reg = Registry::new(&srv.host(), "team/app", None, &fast_opts(3)).unwrap();
    let opened = AtomicUsize::new(0);
    let sent = AtomicU64::new(0);
    let b = Arc::new(blob.clone());
    let uploaded = reg
        .push_blob(
            &d,
            blob.len() as u64,
            &|| {
                opened.fetch_add(1, Ordering::SeqCst);
                Ok(Box::new(std::io::Cursor::new(b.as_ref().clone())) as Box<dyn Read + Send>)
            },
            &|n| {
                sent.fetch_max(n, Ordering::SeqCst);
            },
        )
        .unwrap();
    assert!(uploaded);
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "a retry must reopen the blob"
    );
    assert_eq!(sent.load(Ordering::SeqCst), blob.len() as u64);
    assert_eq!(reg.stats().retries, 1);
    let methods: Vec<_> = srv.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["HEAD", "POST", "PUT", "POST", "PUT"]);

    // An open failure is reported as such and not retried.
    let err = reg
        .push_blob(
            &digest_of(b"other"),
            5,
            &|| Err(std::io::Error::new(ErrorKind::NotFound, "no such file")),
            &|_| {},
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::Io { .. }), "{err}");
    assert!(err.to_string().contains("no such file"), "{err}");
}

#[test]
fn uploads_to_another_host_get_no_credentials() {
    let blob = data(5000);
    let d = digest_of(&blob);
    let d2 = d.clone();
    let storage = Server::start(move |req, _| {
        if req.method == "PUT" && req.query("digest") == [d2.clone()] && digest_of(&req.body) == d2
        {
            reply(201, &[], "")
        } else {
            reply(400, &[], "bad upload")
        }
    });
    let upload_url = format!("http://{}/upload/u-9?x=1", storage.host());
    let registry = Server::start(move |req, _| {
        if req.header("authorization") != Some(&basic("bob", "pw")) {
            return reply(401, &[("WWW-Authenticate", r#"Basic realm="r""#)], "");
        }
        match req.method.as_str() {
            "HEAD" => reply(404, &[], ""),
            "POST" => reply(202, &[("Location", &upload_url)], ""),
            _ => reply(405, &[], ""),
        }
    });
    let reg = Registry::new(&registry.host(), "r", creds("bob", "pw"), &fast_opts(1)).unwrap();
    let b = Arc::new(blob.clone());
    assert!(reg
        .push_blob(
            &d,
            blob.len() as u64,
            &|| Ok(Box::new(std::io::Cursor::new(b.as_ref().clone())) as Box<dyn Read + Send>),
            &|_| {},
        )
        .unwrap());
    let at_storage = storage.requests();
    assert_eq!(at_storage.len(), 1);
    assert_eq!(
        at_storage[0].header("authorization"),
        None,
        "credentials leaked"
    );
    assert_eq!(at_storage[0].query("x"), ["1"]);
}

#[test]
fn broken_blob_downloads_resume_where_they_stopped() {
    let blob = data(100_000);
    let d = digest_of(&blob);
    let b = blob.clone();
    let srv = Server::start(move |req, _| {
        if req.header("range").is_none() {
            // The first try: announce everything, send 30 000 bytes, hang up.
            return Reply::Truncated {
                status: 200,
                headers: vec![],
                announced: b.len(),
                body: b[..30_000].to_vec(),
            };
        }
        let start: usize = req
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        if req.path().contains("/whole/") {
            // A server that ignores the resume and sends everything again.
            return reply(200, &[], b.clone());
        }
        reply(
            206,
            &[(
                "Content-Range",
                &format!("bytes {start}-{}/{}", b.len() - 1, b.len()),
            )],
            b[start..].to_vec(),
        )
    });
    for repo in ["ranged", "whole"] {
        let reg = Registry::new(&srv.host(), repo, None, &fast_opts(3)).unwrap();
        let mut out = Vec::new();
        let progress = Mutex::new(Vec::new());
        let n = reg
            .get_blob_to(&d, &mut out, &|n| progress.lock().unwrap().push(n))
            .unwrap();
        assert_eq!(n, blob.len() as u64, "{repo}");
        assert!(out == blob, "{repo}: resumed download differs");
        let p = progress.into_inner().unwrap();
        assert!(
            p.windows(2).all(|w| w[0] < w[1]),
            "{repo}: progress went back"
        );
        assert_eq!(*p.last().unwrap(), blob.len() as u64);
        assert_eq!(reg.stats().retries, 1, "{repo}");
        let reqs = srv.requests();
        let resume = reqs.last().unwrap();
        let range = resume.header("range").expect("resume without Range");
        let start: u64 = range[6..range.len() - 1].parse().unwrap();
        assert!(start > 0 && start <= 30_000, "{repo}: {range}");
        calls_reset(&srv);
    }

    fn calls_reset(srv: &Server) {
        srv.log.lock().unwrap().clear();
    }
}

#[test]
fn manifests_are_checked() {
    let real = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let real_digest = digest_of(real);
    let rd = real_digest.clone();
    let srv = Server::start(move |req, _| {
        let accept = req.header("accept").unwrap_or("");
        if !accept.contains("application/vnd.oci.image.manifest.v1+json")
            || !accept.contains("application/vnd.docker.distribution.manifest.list.v2+json")
        {
            return reply(406, &[], "bad accept");
        }
        match req.path() {
            // Served under a digest it does not have.
            p if p.ends_with(&format!("/manifests/{}", digest_of(b"other"))) => reply(
                200,
                &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                real.to_vec(),
            ),
            "/v2/r/manifests/big" => reply(200, &[], vec![b' '; 5 << 20]),
            "/v2/r/manifests/lying-header" => reply(
                200,
                &[("Docker-Content-Digest", &digest_of(b"other"))],
                real.to_vec(),
            ),
            // No useful Content-Type: the media type comes from the JSON.
            "/v2/r/manifests/v1" => reply(
                200,
                &[
                    ("Content-Type", "application/json"),
                    ("Docker-Content-Digest", &rd),
                ],
                real.to_vec(),
            ),
            _ => reply(404, &[], ""),
        }
    });
    let reg = Registry::new(&srv.host(), "r", None, &fast_opts(2)).unwrap();
    let m = reg.get_manifest("v1").unwrap();
    assert_eq!(m.digest, real_digest);
    assert_eq!(m.media_type, "application/vnd.oci.image.index.v1+json");

    let err = reg.get_manifest(&digest_of(b"other")).unwrap_err();
    match &err {
        RegistryError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &digest_of(b"other"));
            assert_eq!(actual, &real_digest);
        }
        _ => panic!("{err}"),
    }
    let err = reg.get_manifest("lying-header").unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    let err = reg.get_manifest("big").unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
    let err = reg.get_manifest("../../etc").unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    assert_eq!(reg.stats().retries, 0);
}

/// A token `expires_in` far beyond what an `Instant` can hold (2^63 s) is
/// treated as a long lifetime, not a panic.
#[test]
fn huge_token_lifetimes_do_not_panic() {
    let blob = data(1000);
    let d = digest_of(&blob);
    let path = format!("/v2/r/blobs/{d}");
    let b = blob.clone();
    let srv = Server::start(move |req, port| {
        if req.path() == "/token" {
            return reply(
                200,
                &[],
                r#"{"token":"tok","expires_in":9223372036854775808}"#,
            );
        }
        if req.path() == path && req.header("authorization") == Some("Bearer tok") {
            return serve_range(req, &b);
        }
        let challenge = format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="x""#);
        reply(401, &[("WWW-Authenticate", &challenge)], "")
    });
    let reg = Registry::new(&srv.host(), "r", None, &fast_opts(1)).unwrap();
    assert!(reg.get_blob(&d, &|_| {}).unwrap() == blob);
    assert!(reg.get_blob(&d, &|_| {}).unwrap() == blob);
    // The token was kept, not fetched again.
    assert_eq!(srv.count("/token"), 1);
}

/// A plain-HTTP token realm on another host than the registry's gets no
/// credentials: the token request is refused before it is sent, with a
/// message naming the realm. (An HTTPS realm may be anywhere, as the
/// distribution spec intends; an HTTPS registry may not name a plain-HTTP
/// realm at all: see the unit tests of `realm_credentials`.)
#[test]
fn plain_http_token_realms_on_another_host_get_no_credentials() {
    let tokens = Server::start(|_, _| reply(200, &[], r#"{"token":"tok"}"#));
    // "localhost" is another host name than the registry's "127.0.0.1".
    let realm = format!("http://localhost:{}/token", tokens.port);
    let srv = Server::start(move |req, _| {
        if req.header("authorization") == Some("Bearer tok") {
            return reply(404, &[], "");
        }
        let challenge = format!(r#"Bearer realm="{realm}",service="x""#);
        reply(401, &[("WWW-Authenticate", &challenge)], "")
    });
    let d = digest_of(b"x");
    let reg = Registry::new(&srv.host(), "r", creds("alice", "pw"), &fast_opts(1)).unwrap();
    let err = reg.get_blob(&d, &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, RegistryError::Protocol { .. })
            && msg.contains(&format!("localhost:{}", tokens.port))
            && msg.contains("plain HTTP"),
        "{msg}"
    );
    for r in tokens.requests() {
        assert_eq!(r.header("authorization"), None, "credentials leaked: {r:?}");
    }
    assert_eq!(tokens.requests().len(), 0);

    // Anonymous, the same realm may hand out a token: nothing can leak.
    let anon = Registry::new(&srv.host(), "r", None, &fast_opts(1)).unwrap();
    let err = anon.get_blob(&d, &|_| {}).unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert_eq!(tokens.requests().len(), 1);
}

/// `req`'s range of `data` as a 206, sent `chunk` bytes per `pause`.
fn paced_range(req: &Req, data: &[u8], chunk: usize, pause: Duration) -> Reply {
    let (a, b) = req.range().expect("a Range request");
    Reply::Paced {
        status: 206,
        headers: vec![(
            "Content-Range".into(),
            format!("bytes {a}-{b}/{}", data.len()),
        )],
        body: data[a..=b].to_vec(),
        chunk,
        pause,
    }
}

/// Options whose Range deadline is 1 s plus the bytes at 64 KiB/s; each
/// read of a body may take up to 10 s (the per-read timeout alone never
/// fires in these tests).
fn deadline_opts(attempts: u32) -> ClientOptions {
    ClientOptions {
        range_deadline: Duration::from_secs(1),
        min_throughput: 64 << 10,
        ..fast_opts(attempts)
    }
}

/// A server that drips its answer, a byte per 300 ms (every read well within
/// the per-read timeout), is cut off at the request's deadline (1 s + 16 B
/// at 64 KiB/s), retried per the retry policy, then fails with an error that
/// names the deadline. Sent whole, those 16 bytes would take 4.8 s.
#[test]
fn a_dripping_server_is_cut_off_at_the_request_deadline() {
    let blob = data(100);
    let b = blob.clone();
    let srv = Server::start(move |req, _| {
        if req.range() == Some((0, 0)) {
            return serve_range(req, &b);
        }
        paced_range(req, &b, 1, Duration::from_millis(300))
    });
    let url = format!("http://{}/blob", srv.host());
    let h = HttpBlob::open(&url, &deadline_opts(2)).unwrap();
    let mut buf = [0u8; 16];
    let err = h.read_exact_at(&mut buf, 10).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains("deadline"), "{err}");
    // The probe, then two tries of the read.
    assert_eq!(srv.requests().len(), 3);
    assert_eq!(h.stats().retries, 1);

    // The registry's Range reads have the same deadline.
    let d = digest_of(&blob);
    let b = blob.clone();
    let srv = Server::start(move |req, _| paced_range(req, &b, 1, Duration::from_millis(300)));
    let reg = Registry::new(&srv.host(), "r", None, &deadline_opts(1)).unwrap();
    let reader = reg.blob_reader(&d, blob.len() as u64);
    let err = reader.read_exact_at(&mut buf, 10).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains("deadline"), "{err}");
}

/// The deadline grows with what is asked: 256 KiB at 128 KiB/s takes 2 s,
/// within its 1 s + 4 s, though beyond the fixed minimum alone.
#[test]
fn a_slow_but_steady_range_is_within_its_deadline() {
    let blob = data(300 << 10);
    let b = blob.clone();
    let srv = Server::start(move |req, _| {
        if req.range() == Some((0, 0)) {
            return serve_range(req, &b);
        }
        paced_range(req, &b, 16 << 10, Duration::from_millis(125))
    });
    let url = format!("http://{}/blob", srv.host());
    let h = HttpBlob::open(&url, &deadline_opts(1)).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    h.read_exact_at(&mut buf, 1000).unwrap();
    assert!(buf == blob[1000..1000 + (256 << 10)]);
    assert_eq!(srv.requests().len(), 2);
}

/// A blob fetched whole by its declared size: a `Content-Length` that
/// disagrees, or a body that runs on past the size, is refused at once (no
/// retry, nothing read past the size); the honest answer passes.
#[test]
fn sized_blob_downloads_stop_at_the_declared_size() {
    let blob = data(5000);
    let d = digest_of(&blob);
    let b = blob.clone();
    let srv = Server::start(move |req, _| match req.path() {
        p if p.starts_with("/v2/honest/") => serve_range(req, &b),
        p if p.starts_with("/v2/announces/") => reply(200, &[], vec![7u8; 9000]),
        _ => Reply::UntilClose {
            status: 200,
            headers: vec![],
            body: [b.clone(), vec![0u8; 100_000]].concat(),
        },
    });
    let get = |repo: &str| {
        let reg = Registry::new(&srv.host(), repo, None, &fast_opts(3)).unwrap();
        let r = reg.get_blob_sized(&d, blob.len() as u64, &|_| {});
        (r, reg.stats())
    };
    let (ok, _) = get("honest");
    assert!(ok.unwrap() == blob);
    for repo in ["announces", "runs-on"] {
        let (err, stats) = get(repo);
        let err = err.unwrap_err();
        assert!(
            matches!(err, RegistryError::WrongSize { declared: 5000, .. }),
            "{repo}: {err}"
        );
        assert!(err.to_string().contains("5000 bytes"), "{err}");
        assert_eq!(stats.retries, 0, "{repo}");
        assert!(
            stats.bytes_received < 5000 + (64 << 10),
            "{repo}: {stats:?}"
        );
    }
}

/// A token revoked or expired early (the registry says 401 to it in the
/// middle of a long read): the client authenticates again, once, and the
/// read goes on; a registry that refuses the fresh token too is a clear
/// authentication failure, not a loop.
#[test]
fn a_401_in_the_middle_of_range_reads_authenticates_again_once() {
    let blob = data(40_000);
    let d = digest_of(&blob);
    let blob2 = blob.clone();
    let path = format!("/v2/r/blobs/{d}");
    // Tokens are tok-1, tok-2, ...; the registry accepts only the newest,
    // and retires it after every 3 blob requests answered.
    let issued = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let (i2, s2) = (issued.clone(), served.clone());
    let srv = Server::start(move |req, port| {
        if req.path() == "/token" {
            if req.header("authorization") != Some(&basic("alice", "pw")) {
                return reply(401, &[], "bad credentials");
            }
            let n = i2.fetch_add(1, Ordering::SeqCst) + 1;
            return reply(
                200,
                &[],
                format!(r#"{{"token":"tok-{n}","expires_in":300}}"#),
            );
        }
        if req.path() == path {
            let current = format!("Bearer tok-{}", i2.load(Ordering::SeqCst));
            let fresh = req.header("authorization") == Some(&current)
                && s2.load(Ordering::SeqCst) < 3 * i2.load(Ordering::SeqCst);
            if fresh {
                s2.fetch_add(1, Ordering::SeqCst);
                return serve_range(req, &blob2);
            }
            let challenge = format!(
                r#"Bearer realm="http://127.0.0.1:{port}/token",service="x",scope="repository:r:pull""#
            );
            return reply(401, &[("WWW-Authenticate", &challenge)], "{}");
        }
        reply(404, &[], "")
    });
    let reg = Registry::new(&srv.host(), "r", creds("alice", "pw"), &fast_opts(3)).unwrap();
    let reader = reg.blob_reader(&d, blob.len() as u64);
    for i in 0..8usize {
        let off = i * 5000;
        let mut buf = vec![0u8; 5000];
        reader.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf[..] == blob[off..off + 5000], "read {i}");
    }
    // 8 reads at 3 per token: tokens 1, 2, 3 — each renewal after a 401.
    assert_eq!(srv.count("/token"), 3, "{:#?}", srv.requests());
    assert_eq!(reg.stats().failures, 0);

    // A registry that takes no token at all after the first challenge.
    let srv = Server::start(move |req, port| {
        if req.path() == "/token" {
            return reply(200, &[], r#"{"token":"never-good"}"#);
        }
        let challenge = format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="x""#);
        reply(401, &[("WWW-Authenticate", &challenge)], "{}")
    });
    let reg = Registry::new(&srv.host(), "r", creds("alice", "pw"), &fast_opts(3)).unwrap();
    let err = reg
        .blob_reader(&d, blob.len() as u64)
        .read_exact_at(&mut [0u8; 10], 0)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(
        err.to_string().contains("rejected the credentials") && err.to_string().contains("alice"),
        "{err}"
    );
    // One token for the first challenge, one more after the refusal, then
    // the error: no loop, no retries of an authentication failure.
    assert_eq!(srv.count("/token"), 1, "{:#?}", srv.requests());
    assert_eq!(srv.count(&format!("/v2/r/blobs/{d}")), 2);
}

/// Docker's identity token (`Username: "<token>"`) is an OAuth2 refresh
/// token: exchanged at the realm by a POST, never sent as a password; a
/// Basic-only registry refuses it with a message saying why.
#[test]
fn identity_tokens_are_exchanged_for_access_tokens() {
    let blob = data(3000);
    let d = digest_of(&blob);
    let blob2 = blob.clone();
    let path = format!("/v2/r/blobs/{d}");
    let srv = Server::start(move |req, port| {
        if req.path() == "/token" {
            let body = String::from_utf8_lossy(&req.body).to_string();
            let form: Vec<&str> = body.split('&').collect();
            let ok = req.method == "POST"
                && form.contains(&"grant_type=refresh_token")
                && form.contains(&"refresh_token=refresh-me")
                && form.contains(&"service=x")
                && form.contains(&"scope=repository%3Ar%3Apull")
                && req.header("authorization").is_none();
            return if ok {
                reply(200, &[], r#"{"access_token":"acc","expires_in":300}"#)
            } else {
                reply(400, &[], r#"{"error":"invalid_grant"}"#)
            };
        }
        if req.path() == path && req.header("authorization") == Some("Bearer acc") {
            return serve_range(req, &blob2);
        }
        let challenge = format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="x""#);
        reply(401, &[("WWW-Authenticate", &challenge)], "{}")
    });
    let reg = Registry::new(
        &srv.host(),
        "r",
        creds("<token>", "refresh-me"),
        &fast_opts(1),
    )
    .unwrap();
    assert!(reg.get_blob(&d, &|_| {}).unwrap() == blob);
    let wrong = Registry::new(&srv.host(), "r", creds("<token>", "stale"), &fast_opts(1)).unwrap();
    let err = wrong.get_blob(&d, &|_| {}).unwrap_err();
    assert!(matches!(err, RegistryError::AuthFailed { .. }), "{err}");

    let basic_only =
        Server::start(|_, _| reply(401, &[("WWW-Authenticate", r#"Basic realm="r""#)], ""));
    let reg = Registry::new(
        &basic_only.host(),
        "r",
        creds("<token>", "refresh-me"),
        &fast_opts(1),
    )
    .unwrap();
    let err = reg.get_blob(&d, &|_| {}).unwrap_err();
    assert!(
        matches!(err, RegistryError::IdentityTokenNeedsBearer { .. })
            && err.to_string().contains(&basic_only.host()),
        "{err}"
    );
    assert!(basic_only
        .requests()
        .iter()
        .all(|r| r.header("authorization").is_none()));
}

/// Mirrors of a `hosts.toml` fail in every way a mirror can (5xx, 404, a
/// 200 for a Range, a wrong manifest): each request then goes to the next
/// host, the upstream last; mirrors get their headers and `?ns=`, never the
/// upstream's credentials.
#[test]
fn failing_mirrors_hand_each_request_to_the_next_host() {
    warnings(); // installs the log sink before anything logs
    let blob = data(20_000);
    let d = digest_of(&blob);
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let md = digest_of(&manifest);
    let (b2, m2) = (blob.clone(), manifest.clone());
    let upstream = Server::start(move |req, _| {
        if req.header("authorization") != Some(&basic("alice", "pw")) {
            return reply(401, &[("WWW-Authenticate", r#"Basic realm="r""#)], "");
        }
        if req.path().contains("/manifests/") {
            return reply(
                200,
                &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                m2.clone(),
            );
        }
        serve_range(req, &b2)
    });
    let b3 = blob.clone();
    // 500 for manifests, 404 for whole blobs, 200 for ranges, wrong bytes
    // by digest.
    let bad = Server::start(move |req, _| {
        if req.path().contains("/manifests/") {
            if req.path().contains("sha256:") {
                return reply(200, &[], "{}");
            }
            return reply(500, &[], "mirror broken");
        }
        if req.range().is_some() {
            return reply(200, &[], b3.clone());
        }
        reply(404, &[], "")
    });
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().join(upstream.host());
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{up}\"\n\
             [host.\"http://{bad}/base\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
             \x20 header = {{ x-mirror = \"yes\" }}\n",
            up = upstream.host(),
            bad = bad.host()
        ),
    )
    .unwrap();
    let opts = ClientOptions {
        hosts_dir: Some(certs.path().to_path_buf()),
        ..fast_opts(2)
    };
    let reg = Registry::new(&upstream.host(), "r", creds("alice", "pw"), &opts).unwrap();
    assert_eq!(reg.mirrors(), [format!("http://{}", bad.host())]);
    assert_eq!(reg.get_manifest("v1").unwrap().digest, md);
    assert_eq!(reg.get_manifest(&md).unwrap().digest, md);
    assert!(reg.get_blob(&d, &|_| {}).unwrap() == blob);
    let mut buf = vec![0u8; 1000];
    reg.blob_reader(&d, blob.len() as u64)
        .read_exact_at(&mut buf, 7000)
        .unwrap();
    assert!(buf[..] == blob[7000..8000]);
    let st = reg.stats();
    assert_eq!((st.mirror_fallbacks, st.failures), (4, 0), "{st:?}");
    let mirror_reqs = bad.requests();
    assert_eq!(mirror_reqs.len(), 4, "{mirror_reqs:#?}");
    for r in &mirror_reqs {
        assert!(r.path().starts_with("/base/v2/r/"), "{r:?}");
        assert_eq!(r.query("ns"), [upstream.host()], "{r:?}");
        assert_eq!(r.header("x-mirror"), Some("yes"));
        assert_eq!(r.header("authorization"), None, "{r:?}");
    }
    let w = warnings();
    assert!(
        w.contains(&format!("mirror http://{} failed", bad.host()))
            && w.contains("HTTP 500")
            && w.contains("ignored the Range header"),
        "{w}"
    );
    // The upstream has none of the mirror's headers.
    assert!(upstream
        .requests()
        .iter()
        .all(|r| r.header("x-mirror").is_none() && r.query("ns").is_empty()));
}

#[test]
fn a_whole_blob_damaged_once_is_fetched_again_and_one_always_damaged_fails_clearly() {
    let blob = data(30_000);
    let d = digest_of(&blob);
    let (good, bad) = (blob.clone(), {
        let mut b = blob.clone();
        b[15_000] ^= 0xff;
        b
    });
    let n = AtomicUsize::new(0);
    let srv = Server::start(move |req, _| {
        if req.path().contains("/always/") {
            return reply(200, &[], bad.clone());
        }
        // The first answer is damaged on the way, the next one is not.
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            reply(200, &[], bad.clone())
        } else {
            reply(200, &[], good.clone())
        }
    });
    let reg = Registry::new(&srv.host(), "r", None, &fast_opts(1)).unwrap();
    assert_eq!(
        reg.get_blob_sized(&d, blob.len() as u64, &|_| {}).unwrap(),
        blob
    );
    assert_eq!(srv.requests().len(), 2, "fetched once more");
    let always = Registry::new(&srv.host(), "always", None, &fast_opts(1)).unwrap();
    let err = always
        .get_blob_sized(&d, blob.len() as u64, &|_| {})
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert_eq!(srv.requests().len(), 4, "twice, then it fails");
}

/// Credentials that rotate under a long-lived reader (kubelet's newest for
/// the repository, a credential helper's): once the registry refuses the
/// ones in use, the client asks its credential source and goes on with the
/// newer ones. For Basic (the request itself refused) and Bearer (the token
/// server refusing them when the token is renewed); without a source, the
/// read fails as "rejected the credentials".
#[test]
fn rotated_credentials_are_taken_from_the_credential_source() {
    let blob = data(30_000);
    let d = digest_of(&blob);
    let path = format!("/v2/r/blobs/{d}");
    for bearer in [false, true] {
        // The password the registry accepts now.
        let current = Arc::new(Mutex::new("pw-1".to_string()));
        let issued = Arc::new(AtomicUsize::new(0));
        let (cur, iss, blob2, path2) =
            (current.clone(), issued.clone(), blob.clone(), path.clone());
        let srv = Server::start(move |req, port| {
            let ok_basic =
                req.header("authorization") == Some(&basic("alice", &cur.lock().unwrap()));
            if bearer {
                if req.path() == "/token" {
                    if !ok_basic {
                        return reply(401, &[], "bad credentials");
                    }
                    let n = iss.fetch_add(1, Ordering::SeqCst) + 1;
                    return reply(
                        200,
                        &[],
                        format!(r#"{{"token":"tok-{n}-{}"}}"#, cur.lock().unwrap()),
                    );
                }
                if req.path() == path2 {
                    // Only tokens issued for the current password.
                    let good = req
                        .header("authorization")
                        .is_some_and(|a| a.ends_with(&format!("-{}", cur.lock().unwrap())));
                    if good {
                        return serve_range(req, &blob2);
                    }
                    let challenge = format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="x",scope="repository:r:pull""#
                    );
                    return reply(401, &[("WWW-Authenticate", &challenge)], "{}");
                }
            } else if req.path() == path2 {
                if ok_basic {
                    return serve_range(req, &blob2);
                }
                return reply(401, &[("WWW-Authenticate", r#"Basic realm="r""#)], "");
            }
            reply(404, &[], "")
        });
        let read_all = |reg: &Registry| -> std::io::Result<()> {
            let reader = reg.blob_reader(&d, blob.len() as u64);
            for i in 0..3usize {
                let mut buf = vec![0u8; 10_000];
                reader.read_exact_at(&mut buf, (i * 10_000) as u64)?;
                assert!(buf[..] == blob[i * 10_000..(i + 1) * 10_000]);
            }
            Ok(())
        };
        let with_source =
            Registry::new(&srv.host(), "r", creds("alice", "pw-1"), &fast_opts(2)).unwrap();
        let source_pw = Arc::new(Mutex::new("pw-1".to_string()));
        let s = source_pw.clone();
        with_source.set_credential_source(Arc::new(move || creds("alice", &s.lock().unwrap())));
        let without =
            Registry::new(&srv.host(), "r", creds("alice", "pw-1"), &fast_opts(2)).unwrap();
        read_all(&with_source).unwrap();
        read_all(&without).unwrap();

        // The password rotates: the registry and the source have the new one.
        *current.lock().unwrap() = "pw-2".into();
        *source_pw.lock().unwrap() = "pw-2".into();
        read_all(&with_source).unwrap_or_else(|e| panic!("bearer {bearer}: {e}"));
        assert_eq!(with_source.stats().failures, 0);
        let err = read_all(&without).unwrap_err();
        assert!(
            err.to_string().contains("rejected the credentials"),
            "bearer {bearer}: {err}"
        );
    }
}
