//! The fault-injecting proxy against a small in-test upstream server.
//!
//! No test depends on how fast anything runs: logs are read once the proxy
//! is idle ([`Proxy::wait_idle`]) or, for the proxy run as a separate
//! process, once a later request on the same connection has been answered
//! (the proxy logs a request before it reads the next one). The only time
//! limits are hang guards.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lazypull_testkit::proxy::{
    parse_faults, read_log, Fault, FaultSource, Faults, LogEntry, Proxy,
};

const BLOB: &str = "/v2/r/blobs/sha256:x";
const BLOB_LEN: usize = 100_000;

fn blob() -> Vec<u8> {
    (0..BLOB_LEN).map(|i| (i * 31 % 251) as u8).collect()
}

// ---------------------------------------------------------------------------
// Upstream: a tiny HTTP server, one request per connection.

struct Upstream {
    addr: SocketAddr,
    /// Raw heads of the requests received, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let seen = Arc::clone(&seen2);
                thread::spawn(move || {
                    let _ = upstream_serve(conn, &seen);
                });
            }
        });
        Upstream { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn upstream_serve(conn: TcpStream, seen: &Mutex<Vec<String>>) -> io::Result<()> {
    let mut r = BufReader::new(&conn);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    seen.lock().unwrap().push(head.clone());
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap().split(' ');
    let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
    let hdr = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let len: u64 = hdr("content-length").map_or(0, |v| v.parse().unwrap());
    let mut req_body = Vec::new();
    r.take(len).read_to_end(&mut req_body)?;
    let head_only = method == "HEAD";
    let mut w = &conn;
    let send = |mut w: &TcpStream, status: &str, extra: &str, body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(body);
        }
        w.write_all(&out)
    };
    if path.contains("/blobs/") {
        let data = blob();
        match hdr("range") {
            Some(range) => {
                let spec = range.strip_prefix("bytes=").unwrap();
                let (a, b) = spec.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b: usize = if b.is_empty() {
                    BLOB_LEN - 1
                } else {
                    b.parse::<usize>().unwrap().min(BLOB_LEN - 1)
                };
                let extra = format!("Content-Range: bytes {a}-{b}/{BLOB_LEN}\r\n");
                send(w, "206 Partial Content", &extra, &data[a..=b])?;
            }
            None => send(w, "200 OK", "Accept-Ranges: bytes\r\n", &data)?,
        }
    } else if path == "/v2/chunked" {
        w.write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              6\r\nhello \r\n7;ext=1\r\nchunked\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        )?;
    } else if path == "/v2/eof" {
        w.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")?;
    } else if method == "PUT" {
        let body = format!(
            "got {} bytes: {}",
            req_body.len(),
            String::from_utf8_lossy(&req_body)
        );
        send(w, "201 Created", "", body.as_bytes())?;
    } else {
        send(w, "200 OK", "", format!("ok {path}").as_bytes())?;
    }
    w.flush()
}

// ---------------------------------------------------------------------------
// Client: plain HTTP/1.1 over a std TcpStream.

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Whether the whole Content-Length arrived.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Client {
    r: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            r: BufReader::new(s),
        }
    }

    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: registry.test\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.r.get_mut().write_all(req.as_bytes()).unwrap();
    }

    fn send_raw(&mut self, raw: &[u8]) {
        self.r.get_mut().write_all(raw).unwrap();
    }

    /// `Ok(None)` if the connection closed before a status line.
    fn read_response(&mut self, head_only: bool) -> io::Result<Option<Resp>> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            self.r.read_line(&mut l)?;
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            complete: true,
        };
        if !head_only {
            let len: u64 = resp.header("content-length").unwrap().parse().unwrap();
            (&mut self.r).take(len).read_to_end(&mut resp.body)?;
            resp.complete = resp.body.len() as u64 == len;
        }
        Ok(Some(resp))
    }

    fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(method, path, headers);
        self.read_response(method == "HEAD").unwrap().unwrap()
    }

    /// True once the server has closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    Client::connect(addr).request("GET", path, headers)
}

// ---------------------------------------------------------------------------
// Fixture

struct Fx {
    dir: tempfile::TempDir,
    up: Upstream,
    proxy: Proxy,
    log: PathBuf,
}

impl Fx {
    fn new(source: impl FnOnce(&Path) -> FaultSource) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::start();
        let log = dir.path().join("access.log");
        let proxy = Proxy::start(up.addr, log.clone(), source(dir.path())).unwrap();
        Fx {
            dir,
            up,
            proxy,
            log,
        }
    }

    fn fixed(spec: &str) -> Fx {
        Fx::new(|_| FaultSource::Fixed(spec.to_string()))
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr()
    }

    /// The whole log, which must have exactly `n` entries, sorted by `n`.
    fn log(&self, n: usize) -> Vec<LogEntry> {
        idle_log(&self.proxy, &self.log, n)
    }
}

/// Hang guard for [`Proxy::wait_idle`]: nothing here waits on time otherwise.
const HANG: Duration = Duration::from_secs(120);

/// The log of `proxy` once it is idle; it must have exactly `n` entries.
fn idle_log(proxy: &Proxy, path: &Path, n: usize) -> Vec<LogEntry> {
    assert!(
        proxy.wait_idle(HANG),
        "the proxy is still busy after {HANG:?}"
    );
    let mut entries = read_log(path).unwrap();
    entries.sort_by_key(|e| e.n);
    assert_eq!(entries.len(), n, "{entries:?}");
    entries
}

/// Status, fault and body bytes of each log entry.
fn summary(entries: &[LogEntry]) -> Vec<(u16, Fault, u64)> {
    entries
        .iter()
        .map(|e| (e.status, e.fault, e.bytes))
        .collect()
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn passthrough_get_forwards_bytes_and_logs_range_status_bytes() {
    let fx = Fx::fixed("");
    let data = blob();

    let r = get(fx.addr(), BLOB, &[("Range", "bytes=1000-1999")]);
    assert_eq!(r.status, 206);
    assert!(r.complete);
    assert_eq!(r.body, &data[1000..2000]);
    assert_eq!(r.header("content-range"), Some("bytes 1000-1999/100000"));

    let r = get(fx.addr(), BLOB, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));

    let log = fx.log(2);
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].n, 1);
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].path, BLOB);
    assert_eq!(log[0].range.as_deref(), Some("bytes=1000-1999"));
    assert_eq!(log[0].range_bounds(), Some((1000, Some(1999))));
    assert_eq!(
        (log[0].status, log[0].bytes, log[0].fault),
        (206, 1000, Fault::None)
    );
    assert_eq!(log[1].n, 2);
    assert_eq!(log[1].range, None);
    assert_eq!(
        (log[1].status, log[1].bytes, log[1].fault),
        (200, 100_000, Fault::None)
    );

    // The raw log line has the documented shape.
    let text = std::fs::read_to_string(&fx.log).unwrap();
    let line = text.lines().find(|l| l.contains("\"n\":1,")).unwrap();
    assert!(line.starts_with(
        "{\"n\":1,\"method\":\"GET\",\"path\":\"/v2/r/blobs/sha256:x\",\
         \"range\":\"bytes=1000-1999\",\"status\":206,\"bytes\":1000,\"fault\":\"none\",\"ms\":"
    ));

    // Upstream got each request on its own connection, with Connection: close
    // and the client's other headers unchanged.
    let seen = fx.up.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].starts_with(&format!("GET {BLOB} HTTP/1.1\r\n")));
    assert!(seen[0].contains("Host: registry.test\r\n"));
    assert!(seen[0].contains("Range: bytes=1000-1999\r\n"));
    assert!(seen[0].contains("Connection: close\r\n"));
}

#[test]
fn head_chunked_eof_put_and_other_paths_pass_through() {
    let fx = Fx::fixed("");
    let mut c = Client::connect(fx.addr());

    let r = c.request("HEAD", BLOB, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("100000"));
    assert!(r.body.is_empty());

    let r = c.request("GET", "/v2/", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok /v2/"[..]));

    // Chunked upstream body: de-chunked and re-sent with a Content-Length.
    let r = c.request("GET", "/v2/chunked", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello chunked world");
    assert_eq!(r.header("content-length"), Some("19"));
    assert_eq!(r.header("transfer-encoding"), None);

    // EOF-delimited upstream body.
    let r = c.request("GET", "/v2/eof", &[]);
    assert_eq!(r.body, b"until the end");
    assert_eq!(r.header("content-length"), Some("13"));

    // A PUT body is forwarded.
    c.send_raw(b"PUT /v2/r/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde");
    let r = c.read_response(false).unwrap().unwrap();
    assert_eq!(
        (r.status, r.body.as_slice()),
        (201, &b"got 5 bytes: abcde"[..])
    );

    let log = fx.log(5);
    let methods: Vec<&str> = log.iter().map(|e| e.method.as_str()).collect();
    assert_eq!(methods, ["HEAD", "GET", "GET", "GET", "PUT"]);
    assert_eq!(
        summary(&log),
        [
            (200, Fault::None, 0),
            (200, Fault::None, 7),
            (200, Fault::None, 19),
            (200, Fault::None, 13),
            (201, Fault::None, 18),
        ]
    );
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let fx = Fx::fixed("");
    let data = blob();
    let mut c = Client::connect(fx.addr());
    let r1 = c.request("GET", BLOB, &[("Range", "bytes=0-9")]);
    let r2 = c.request("GET", BLOB, &[("Range", "bytes=99990-")]);
    assert_eq!((r1.status, r1.body.as_slice()), (206, &data[..10]));
    assert_eq!((r2.status, r2.body.as_slice()), (206, &data[99_990..]));
    assert_eq!(r1.header("connection"), None);

    // Pipelined: both requests written before reading either response.
    c.send("GET", BLOB, &[("Range", "bytes=5-6")]);
    c.send("GET", "/v2/", &[("Connection", "close")]);
    let r3 = c.read_response(false).unwrap().unwrap();
    let r4 = c.read_response(false).unwrap().unwrap();
    assert_eq!(r3.body, &data[5..7]);
    assert_eq!(r4.body, b"ok /v2/");
    assert_eq!(r4.header("connection"), Some("close"));
    assert!(c.closed(), "Connection: close must end the connection");

    let log = fx.log(4);
    assert_eq!(log.iter().map(|e| e.n).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(log[1].range_bounds(), Some((99_990, None)));
    // One upstream connection per request.
    assert_eq!(fx.up.seen().len(), 4);
}

#[test]
fn fault_5xx_answers_503_without_contacting_upstream() {
    let fx = Fx::fixed("5xx:1");
    let mut c = Client::connect(fx.addr());
    let r503 = c.request("GET", BLOB, &[("Range", "bytes=0-99")]);
    assert_eq!(r503.status, 503);
    assert!(!r503.body.is_empty());
    // The connection stays usable; a non-blob path is not eligible.
    let r = c.request("GET", "/v2/", &[]);
    assert_eq!(r.status, 200);

    let log = fx.log(2);
    assert_eq!(log[0].fault, Fault::ServerError);
    assert_eq!(log[0].status, 503);
    assert_eq!(log[0].bytes, r503.body.len() as u64);
    assert_eq!(log[1].fault, Fault::None);
    let seen = fx.up.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the non-faulted request reaches upstream"
    );
    assert!(seen[0].starts_with("GET /v2/ "));
}

#[test]
fn fault_reset_closes_the_connection_without_a_response() {
    let fx = Fx::fixed("reset:1");
    let mut c = Client::connect(fx.addr());
    c.send("GET", BLOB, &[]);
    let mut buf = Vec::new();
    let got = c.r.read_to_end(&mut buf);
    assert!(buf.is_empty(), "no response bytes expected, got {buf:?}");
    // SO_LINGER 0: an RST, not an orderly FIN.
    assert_eq!(got.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    let log = fx.log(1);
    assert_eq!(summary(&log), [(0, Fault::Reset, 0)]);
    assert!(fx.up.seen().is_empty());
}

#[test]
fn fault_truncate_sends_half_the_body_then_closes() {
    let fx = Fx::fixed("truncate:1");
    let data = blob();
    let mut c = Client::connect(fx.addr());
    let r = c.request("GET", BLOB, &[("Range", "bytes=100-1099")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert!(!r.complete);
    assert_eq!(r.body, &data[100..600]);
    assert!(c.closed());

    let r = get(fx.addr(), BLOB, &[]);
    assert_eq!(r.header("content-length"), Some("100000"));
    assert_eq!(r.body, &data[..50_000]);

    let log = fx.log(2);
    assert_eq!(
        summary(&log),
        [(206, Fault::Truncate, 500), (200, Fault::Truncate, 50_000)]
    );
}

#[test]
fn fault_corrupt_flips_exactly_one_byte() {
    let fx = Fx::fixed("corrupt:1");
    let data = blob();
    for (range, want) in [("bytes=0-999", &data[..1000]), ("bytes=7-7", &data[7..8])] {
        let r = get(fx.addr(), BLOB, &[("Range", range)]);
        assert_eq!(r.status, 206);
        assert!(r.complete);
        assert_eq!(r.body.len(), want.len());
        let diffs: Vec<usize> = (0..want.len()).filter(|&i| r.body[i] != want[i]).collect();
        assert_eq!(diffs, [want.len() / 2]);
        let i = diffs[0];
        assert_eq!(r.body[i], want[i] ^ 0xff);
    }
    let log = fx.log(2);
    assert_eq!(
        summary(&log),
        [(206, Fault::Corrupt, 1000), (206, Fault::Corrupt, 1)]
    );
}

#[test]
fn fault_slow_delays_then_answers_correctly() {
    let fx = Fx::fixed("slow:1,slow_ms:400");
    let data = blob();
    let t = Instant::now();
    let r = get(fx.addr(), BLOB, &[("Range", "bytes=0-4095")]);
    // A lower bound only: the proxy sleeps at least slow_ms.
    let elapsed = t.elapsed();
    assert!(elapsed >= Duration::from_millis(400), "took {elapsed:?}");
    assert_eq!((r.status, r.body.as_slice()), (206, &data[..4096]));

    // Not eligible: not delayed (the log says which requests were).
    assert_eq!(get(fx.addr(), "/v2/", &[]).status, 200);
    let log = fx.log(2);
    assert_eq!(
        summary(&log),
        [(206, Fault::Slow, 4096), (200, Fault::None, 7)]
    );
    assert!(log[0].ms >= 400);
}

#[test]
fn latency_delays_each_connection_and_request_by_the_round_trip() {
    let fx = Fx::fixed("");
    fx.proxy.set_latency(Duration::from_millis(150));
    let data = blob();
    let t = Instant::now();
    let mut c = Client::connect(fx.addr());
    let r1 = c.request("GET", BLOB, &[("Range", "bytes=0-9")]);
    let r2 = c.request("GET", "/v2/", &[]);
    // Lower bounds only: one round trip for the connection, one per request.
    let elapsed = t.elapsed();
    assert!(elapsed >= Duration::from_millis(450), "took {elapsed:?}");
    assert_eq!((r1.status, r1.body.as_slice()), (206, &data[..10]));
    assert_eq!(r2.body, b"ok /v2/");
    let log = fx.log(2);
    assert!(
        log.iter().all(|e| e.ms >= 150 && e.fault == Fault::None),
        "{log:?}"
    );

    // Back to none: the connection still serves.
    fx.proxy.set_latency(Duration::ZERO);
    assert_eq!(c.request("GET", "/v2/", &[]).status, 200);
}

#[test]
fn faults_hit_every_nth_eligible_request_first_kind_wins() {
    // n=2: 5xx and corrupt match, 5xx wins; n=3: reset; n=4: 5xx;
    // n=6: 5xx, reset and corrupt match, 5xx wins.
    let fx = Fx::fixed("corrupt:2, reset:3, 5xx:2");
    let mut got = Vec::new();
    for _ in 0..7 {
        let mut c = Client::connect(fx.addr());
        c.send("GET", BLOB, &[("Range", "bytes=0-99")]);
        got.push(match c.read_response(false) {
            Ok(Some(r)) => r.status,
            Ok(None) | Err(_) => 0,
        });
        // A non-eligible request in between does not advance the counter.
        assert_eq!(get(fx.addr(), "/v2/", &[]).status, 200);
    }
    assert_eq!(got, [206, 503, 0, 503, 206, 503, 206]);
    let log = fx.log(14);
    let faults: Vec<Fault> = log
        .iter()
        .filter(|e| e.path == BLOB)
        .map(|e| e.fault)
        .collect();
    let (n, e, r) = (Fault::None, Fault::ServerError, Fault::Reset);
    assert_eq!(faults, [n, e, r, e, n, e, n]);
}

#[test]
fn only_restricts_faults_to_matching_get_paths() {
    let fx = Fx::fixed("5xx:1,only:sha256:y");
    assert_eq!(get(fx.addr(), BLOB, &[]).status, 200);
    assert_eq!(get(fx.addr(), "/v2/r/blobs/sha256:y", &[]).status, 503);

    // Default `only:/blobs/`: manifests and HEAD requests are not eligible.
    let fx = Fx::fixed("5xx:1");
    assert_eq!(get(fx.addr(), "/v2/r/manifests/latest", &[]).status, 200);
    assert_eq!(
        Client::connect(fx.addr()).request("HEAD", BLOB, &[]).status,
        200
    );
    assert_eq!(get(fx.addr(), BLOB, &[]).status, 503);
    let log = fx.log(3);
    assert_eq!(
        log.iter().map(|e| e.fault).collect::<Vec<_>>(),
        [Fault::None, Fault::None, Fault::ServerError]
    );
}

/// Status of one GET of `range` of [`BLOB`] on a fresh connection (0 for a
/// reset), and whether the body arrived whole and right.
fn try_range(addr: SocketAddr, first: usize, last: usize) -> (u16, bool) {
    let mut c = Client::connect(addr);
    c.send("GET", BLOB, &[("Range", &format!("bytes={first}-{last}"))]);
    match c.read_response(false) {
        Ok(Some(r)) => (
            r.status,
            r.complete && r.body == blob()[first..=last.min(BLOB_LEN - 1)],
        ),
        Ok(None) | Err(_) => (0, false),
    }
}

#[test]
fn per_range_scripts_depend_on_the_ranges_not_on_the_interleaving() {
    let spec = "first_range:corrupt,ranges:5xx+reset/truncate+none+slow,slow_ms:1";
    let (r1, r2, r3) = ((0, 99), (1000, 1999), (3000, 3999));
    // (range, status, body whole and right) of each try of each range:
    // r1 is the first fresh range, r2 and r3 take the `ranges` scripts in
    // turn; past its script a range is served cleanly.
    let want = [
        (r1, vec![(206, false), (206, true)]),
        (r2, vec![(503, false), (0, false), (206, true)]),
        (
            r3,
            vec![(206, false), (206, true), (206, true), (206, true)],
        ),
    ];
    // The same first appearances, then the remaining tries in two different
    // interleavings: the same faults per range.
    for reverse in [false, true] {
        let fx = Fx::fixed(spec);
        let mut got: Vec<_> = want.iter().map(|(r, _)| (*r, Vec::new())).collect();
        for (k, (r, _)) in want.iter().enumerate() {
            got[k].1.push(try_range(fx.addr(), r.0, r.1));
        }
        let mut rest: Vec<usize> = want
            .iter()
            .enumerate()
            .flat_map(|(k, (_, tries))| std::iter::repeat_n(k, tries.len() - 1))
            .collect();
        if reverse {
            rest.reverse();
        }
        for k in rest {
            let (first, last) = want[k].0;
            got[k].1.push(try_range(fx.addr(), first, last));
        }
        assert_eq!(got, want, "reverse={reverse}");

        // A range overlapping one requested before is a refetch: no faults,
        // also when it is new. The next fresh range takes the first `ranges`
        // script again. A request without Range covers the whole blob: a
        // refetch, and so is everything after it.
        assert_eq!(try_range(fx.addr(), 50, 149), (206, true));
        assert_eq!(try_range(fx.addr(), 3999, 4500), (206, true));
        assert_eq!(try_range(fx.addr(), 5000, 5999), (503, false));
        assert_eq!(get(fx.addr(), BLOB, &[]).status, 200);
        assert_eq!(try_range(fx.addr(), 7000, 7999), (206, true));
        // Not eligible: neither faulted nor grouped.
        assert_eq!(get(fx.addr(), "/v2/", &[]).status, 200);

        let log = fx.log(9 + 6);
        let faults = |first: usize, last: usize| -> Vec<Fault> {
            let range = format!("bytes={first}-{last}");
            log.iter()
                .filter(|e| e.range.as_deref() == Some(range.as_str()))
                .map(|e| e.fault)
                .collect()
        };
        let (n, c, e, r, t, s) = (
            Fault::None,
            Fault::Corrupt,
            Fault::ServerError,
            Fault::Reset,
            Fault::Truncate,
            Fault::Slow,
        );
        assert_eq!(faults(0, 99), [c, n]);
        assert_eq!(faults(1000, 1999), [e, r, n]);
        assert_eq!(faults(3000, 3999), [t, n, s, n]);
        assert_eq!(faults(50, 149), [n]);
        assert_eq!(faults(3999, 4500), [n]);
        assert_eq!(faults(5000, 5999), [e]);
        assert_eq!(faults(7000, 7999), [n]);
        assert_eq!(log.iter().filter(|e| e.fault != n).count(), 6);
    }
}

#[test]
fn faults_file_switches_faults_at_runtime() {
    let fx = Fx::new(|dir| FaultSource::File(dir.join("faults")));
    let file = fx.dir.path().join("faults");
    let status = || get(fx.addr(), BLOB, &[("Range", "bytes=0-0")]).status;

    assert_eq!(status(), 206, "missing file: no faults"); // eligible #1
    std::fs::write(&file, "5xx:1").unwrap();
    assert_eq!(status(), 503); // #2
    std::fs::write(&file, "").unwrap();
    assert_eq!(status(), 206, "empty file: no faults"); // #3
    std::fs::write(&file, "5xx:2\n").unwrap();
    assert_eq!(status(), 503, "the counter kept running: #4 is even"); // #4
    assert_eq!(status(), 206); // #5
    std::fs::write(&file, "not a spec").unwrap();
    assert_eq!(status(), 206, "invalid spec: no faults"); // #6

    // set_faults rewrites the file.
    fx.proxy.set_faults("truncate:1").unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "truncate:1");
    let r = get(fx.addr(), BLOB, &[("Range", "bytes=0-9")]);
    assert_eq!((r.status, r.body.len(), r.complete), (206, 5, false));
    assert!(fx.proxy.set_faults("bogus:1").is_err());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "truncate:1");
    std::fs::remove_file(&file).unwrap();
    assert_eq!(status(), 206);

    let log = fx.log(8);
    assert_eq!(
        log.iter().map(|e| e.fault).collect::<Vec<_>>(),
        [
            Fault::None,
            Fault::ServerError,
            Fault::None,
            Fault::ServerError,
            Fault::None,
            Fault::None,
            Fault::Truncate,
            Fault::None
        ]
    );
}

#[test]
fn set_faults_replaces_a_fixed_spec() {
    let fx = Fx::fixed("");
    assert_eq!(get(fx.addr(), BLOB, &[]).status, 200);
    fx.proxy.set_faults("5xx:1").unwrap();
    assert_eq!(get(fx.addr(), BLOB, &[]).status, 503);
    assert!(fx.proxy.set_faults("5xx:x").is_err());
    assert_eq!(get(fx.addr(), BLOB, &[]).status, 503, "bad spec: unchanged");
    fx.proxy.set_faults("").unwrap();
    assert_eq!(get(fx.addr(), BLOB, &[]).status, 200);
}

#[test]
fn malformed_requests_get_400_and_chunked_requests_501() {
    let fx = Fx::fixed("");
    let mut c = Client::connect(fx.addr());
    c.send_raw(b"NONSENSE\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().unwrap().status, 400);
    assert!(c.closed());

    let mut c = Client::connect(fx.addr());
    c.send_raw(b"GET /v2/ HTTP/1.1\r\nno colon here\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().unwrap().status, 400);

    let mut c = Client::connect(fx.addr());
    c.send_raw(b"GET /v2/ HTTP/1.1\r\nContent-Length: abc\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().unwrap().status, 400);

    let mut c = Client::connect(fx.addr());
    c.send_raw(b"POST /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().unwrap().status, 501);

    let log = fx.log(4);
    let statuses: Vec<u16> = log.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [400, 400, 400, 501]);
    assert!(fx.up.seen().is_empty());
}

#[test]
fn unreachable_upstream_gives_502() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on: bind, note the address, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.path().join("log");
    let proxy = Proxy::start(dead, log.clone(), FaultSource::Fixed(String::new())).unwrap();
    assert_eq!(get(proxy.addr(), BLOB, &[]).status, 502);
    assert_eq!(idle_log(&proxy, &log, 1)[0].status, 502);
}

#[test]
fn start_rejects_a_bad_fixed_spec() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let err = Proxy::start(
        up.addr,
        dir.path().join("log"),
        FaultSource::Fixed("5xx:3,fast:1".into()),
    )
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn parse_faults_accepts_and_rejects_specs() {
    let f =
        parse_faults("5xx:3,reset:5,truncate:7,slow:4,corrupt:6,slow_ms:1500,only:/v2/r/").unwrap();
    assert_eq!(
        f,
        Faults {
            server_error: Some(3),
            reset: Some(5),
            truncate: Some(7),
            slow: Some(4),
            corrupt: Some(6),
            slow_ms: 1500,
            only: "/v2/r/".into(),
            first_range: None,
            ranges: Vec::new(),
        }
    );
    assert_eq!(parse_faults("").unwrap(), Faults::default());
    assert_eq!(parse_faults(" \n ,").unwrap(), Faults::default());
    assert_eq!(Faults::default().slow_ms, 3000);
    assert_eq!(Faults::default().only, "/blobs/");
    assert_eq!(parse_faults("reset:0").unwrap().reset, None);
    assert_eq!(parse_faults("only:a:b").unwrap().only, "a:b");
    for bad in [
        "5xx",
        "5xx:",
        "5xx:-1",
        "boom:1",
        "slow_ms:fast",
        "ranges:5xx+boom",
        "first_range:",
        "ranges:5xx,reset:2",
    ] {
        assert!(parse_faults(bad).is_err(), "{bad:?} accepted");
    }
    let f = parse_faults("slow:2,corrupt:3").unwrap();
    let picks: Vec<Fault> = (1..=6).map(|n| f.pick(n)).collect();
    let (n, s, c) = (Fault::None, Fault::Slow, Fault::Corrupt);
    assert_eq!(picks, [n, s, c, s, n, s]);
    assert!(f.is_eligible("GET", BLOB));
    assert!(!f.is_eligible("HEAD", BLOB));
    assert!(!f.is_eligible("GET", "/v2/r/manifests/x"));
}

#[test]
fn read_log_ignores_an_unterminated_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log");
    assert!(read_log(&p).unwrap().is_empty(), "missing log: no entries");
    std::fs::write(
        &p,
        "{\"n\":1,\"method\":\"GET\",\"path\":\"/b\",\"range\":null,\"status\":200,\
         \"bytes\":3,\"fault\":\"reset\",\"ms\":0}\n{\"n\":2,\"met",
    )
    .unwrap();
    let log = read_log(&p).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].fault, log[0].range_bounds()), (Fault::Reset, None));
    std::fs::write(&p, "garbage\n").unwrap();
    assert_eq!(read_log(&p).unwrap_err().kind(), io::ErrorKind::InvalidData);
}

#[test]
fn cli_proxy_writes_port_file_and_injects_faults() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let port_file = dir.path().join("port");
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lazypull-testkit"))
        .arg("proxy")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--upstream", &up.addr.to_string()])
        .arg("--log")
        .arg(&log)
        .arg("--port-file")
        .arg(&port_file)
        .args(["--faults", "5xx:2"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It announces itself on stderr after writing the port file.
    // (Kept open until the end: the proxy must never write into a closed pipe.)
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut announce = String::new();
    stderr.read_line(&mut announce).unwrap();
    assert!(
        announce.starts_with("lazypull-testkit proxy: listening on 127.0.0.1:"),
        "{announce:?}"
    );
    let port: u16 = std::fs::read_to_string(&port_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(announce.contains(&format!(":{port},")), "{announce:?}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::connect(addr);
    let statuses: Vec<u16> = (0..4)
        .map(|_| c.request("GET", BLOB, &[("Range", "bytes=0-1")]).status)
        .collect();
    // The proxy logs a request before reading the next one on the same
    // connection: once a fifth (not eligible) one is answered, the first
    // four are in the log.
    assert_eq!(c.request("GET", "/v2/", &[]).status, 200);
    let mut entries = read_log(&log).unwrap();
    entries.sort_by_key(|e| e.n);
    entries.retain(|e| e.n <= 4);
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stderr);
    assert_eq!(statuses, [206, 503, 206, 503]);
    assert_eq!(
        summary(&entries),
        [
            (206, Fault::None, 2),
            (503, Fault::ServerError, entries[1].bytes),
            (206, Fault::None, 2),
            (503, Fault::ServerError, entries[3].bytes),
        ]
    );

    // Bad arguments fail with status 2.
    let out = Command::new(env!("CARGO_BIN_EXE_lazypull-testkit"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--upstream"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_lazypull-testkit"))
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
        ])
        .args(["--log", "/dev/null", "--faults", "nope:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
