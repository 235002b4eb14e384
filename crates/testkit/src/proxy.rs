//! A fault-injecting, logging HTTP/1.1 reverse proxy for tests.
//!
//! The proxy is a test instrument that stands in front of a real OCI
//! registry. Tests point the lazypull daemon at the proxy instead of the
//! registry, and the proxy then serves two purposes:
//!
//! - **Fault injection.** It can answer with `503`, reset the connection,
//!   truncate a body, delay a response or flip one byte of a body, on a
//!   deterministic schedule ([`Faults`]): every N-th request, or a script
//!   per requested byte range that does not depend on the order in which
//!   concurrent requests arrive. A test can then prove that the
//!   daemon never returns wrong data: it must retry, fail cleanly, or
//!   detect the corruption, but never hand corrupted bytes to a reader.
//! - **Latency.** [`Proxy::set_latency`] adds a round-trip time in user
//!   space, for hosts without `netem`: one round trip when a client
//!   connection is accepted (its TCP handshake) and one before each request
//!   is forwarded (the request's way out, the first byte's way back). The
//!   body then streams at whatever rate the path allows (shape that with
//!   `tc ... tbf`); TCP's slow start is not modelled.
//! - **Access logging.** Every request becomes one JSON line ([`LogEntry`])
//!   in a log file, including its `Range` header, status and the number of
//!   body bytes actually sent, so a test can count which byte ranges of
//!   which blobs the daemon fetched (see [`read_log`]).
//!
//! The proxy is deliberately simple: one thread per client connection,
//! keep-alive towards the client, and a fresh upstream connection (with
//! `Connection: close`) for every request. Upstream bodies framed by
//! `Content-Length` are streamed; chunked or EOF-delimited bodies are
//! buffered and re-sent with a `Content-Length`.
//!
//! # Fault specification
//!
//! A spec is a comma (or newline) separated list of `key:value` items, for
//! example `5xx:3,reset:5,truncate:7,slow:4,corrupt:6,slow_ms:3000,only:/blobs/`:
//!
//! - `5xx:N`, `reset:N`, `truncate:N`, `slow:N`, `corrupt:N`: apply that
//!   fault to every N-th *eligible* request (`0` disables it). If several
//!   kinds match, the first in the order 5xx, reset, truncate, slow, corrupt
//!   wins.
//! - `slow_ms:MS`: the delay of the `slow` fault (default 3000).
//! - `only:SUBSTRING`: eligible requests are `GET` requests whose path
//!   contains this substring (default `/blobs/`).
//! - `ranges:SCRIPT/SCRIPT/...` and `first_range:SCRIPT`: per-range
//!   scripts instead of every-N-th faults (the two forms cannot be mixed).
//!   A SCRIPT is a `+` separated list of fault names (`5xx`, `reset`,
//!   `truncate`, `slow`, `corrupt`, `none`). Eligible requests are grouped
//!   by path and `Range` header; the i-th request of a group gets the i-th
//!   fault of the group's script, and requests past its end get none. A
//!   group whose byte range overlaps one of an earlier group of the same
//!   path is a *refetch* and gets no faults at all, so every byte is
//!   faulted in at most one group. Every other (*fresh*) group takes a
//!   script in order of first appearance: the first one `first_range` (if
//!   given), the following ones the `ranges` scripts in turn. A request
//!   without a `Range` header (or with one of another form) covers the
//!   whole path. What each group gets thus depends only on which ranges
//!   are requested and how often, not on how concurrent requests
//!   interleave.
//!
//! Eligible requests are counted by one global counter (starting at 1)
//! that keeps running when the spec changes; a request is counted whenever
//! it is eligible under the spec in force for it, even if that spec
//! injects no faults. The groups of the per-range scripts are remembered
//! across spec changes too. An empty spec injects no faults.
//!
//! Effects:
//!
//! - `5xx`: upstream is not contacted; the answer is `503 Service
//!   Unavailable` with a short body (the connection is kept alive).
//! - `reset`: the request is read, then the client connection is closed
//!   with a TCP RST (`SO_LINGER` 0) without an answer.
//! - `truncate`: the upstream head (with the true `Content-Length`) and the
//!   first half of the body are sent, then the connection is closed.
//! - `slow`: the response is delayed by `slow_ms`, then sent correctly.
//! - `corrupt`: the body keeps its length, but the byte at index
//!   `len / 2` is XORed with `0xff` (nothing changes for an empty body).

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Cursor, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Longest request or response head (request/status line plus headers).
const MAX_HEAD: u64 = 64 * 1024;
/// Timeout for connecting to upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout on upstream connections.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);
/// Body of the injected `503` answer.
const FAULT_503_BODY: &[u8] = b"lazypull-testkit proxy: injected fault 503\n";

/// What the proxy did to one request, as recorded in the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Fault {
    /// Forwarded unchanged.
    #[serde(rename = "none")]
    None,
    /// Answered `503 Service Unavailable` without contacting upstream.
    #[serde(rename = "5xx")]
    ServerError,
    /// Connection reset without an answer.
    #[serde(rename = "reset")]
    Reset,
    /// Only the first half of the body sent, then the connection closed.
    #[serde(rename = "truncate")]
    Truncate,
    /// Response delayed by `slow_ms`.
    #[serde(rename = "slow")]
    Slow,
    /// One byte in the middle of the body flipped.
    #[serde(rename = "corrupt")]
    Corrupt,
}

impl Fault {
    /// The name used in fault specs and in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::ServerError => "5xx",
            Fault::Reset => "reset",
            Fault::Truncate => "truncate",
            Fault::Slow => "slow",
            Fault::Corrupt => "corrupt",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed fault specification (see the [module documentation](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faults {
    /// Answer `503` to every N-th eligible request.
    pub server_error: Option<u64>,
    /// Reset the connection on every N-th eligible request.
    pub reset: Option<u64>,
    /// Truncate the body of every N-th eligible request.
    pub truncate: Option<u64>,
    /// Delay every N-th eligible request by [`slow_ms`](Self::slow_ms).
    pub slow: Option<u64>,
    /// Flip one byte of the body of every N-th eligible request.
    pub corrupt: Option<u64>,
    /// Delay of the `slow` fault in milliseconds.
    pub slow_ms: u64,
    /// Only `GET` requests whose path contains this substring are eligible.
    pub only: String,
    /// The script of the first fresh range (per-range mode).
    pub first_range: Option<Vec<Fault>>,
    /// The scripts the other fresh ranges take in turn (per-range mode).
    pub ranges: Vec<Vec<Fault>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            server_error: None,
            reset: None,
            truncate: None,
            slow: None,
            corrupt: None,
            slow_ms: 3000,
            only: "/blobs/".to_string(),
            first_range: None,
            ranges: Vec::new(),
        }
    }
}

impl Faults {
    /// Whether faults are scripted per byte range (`ranges`, `first_range`)
    /// rather than given to every N-th request.
    pub fn per_range(&self) -> bool {
        self.first_range.is_some() || !self.ranges.is_empty()
    }

    /// Whether a request counts towards (and may receive) faults.
    pub fn is_eligible(&self, method: &str, path: &str) -> bool {
        method == "GET" && path.contains(&self.only)
    }

    /// The fault for the `n`-th eligible request (counting from 1).
    pub fn pick(&self, n: u64) -> Fault {
        let kinds = [
            (self.server_error, Fault::ServerError),
            (self.reset, Fault::Reset),
            (self.truncate, Fault::Truncate),
            (self.slow, Fault::Slow),
            (self.corrupt, Fault::Corrupt),
        ];
        for (every, fault) in kinds {
            if let Some(every) = every {
                if every > 0 && n.is_multiple_of(every) {
                    return fault;
                }
            }
        }
        Fault::None
    }
}

/// Parses a fault specification such as `5xx:3,slow:4,slow_ms:500,only:/blobs/`.
///
/// Items are separated by commas or newlines; surrounding whitespace and
/// empty items are ignored, so an empty spec means "no faults".
pub fn parse_faults(spec: &str) -> Result<Faults, String> {
    let mut faults = Faults::default();
    for item in spec.split([',', '\n']).map(str::trim) {
        if item.is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once(':') else {
            return Err(format!("fault item {item:?} is not KEY:VALUE"));
        };
        let (key, value) = (key.trim(), value.trim());
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("fault item {item:?}: {value:?} is not a number"))
        };
        let every = |n: u64| if n == 0 { None } else { Some(n) };
        match key {
            "5xx" => faults.server_error = every(number()?),
            "reset" => faults.reset = every(number()?),
            "truncate" => faults.truncate = every(number()?),
            "slow" => faults.slow = every(number()?),
            "corrupt" => faults.corrupt = every(number()?),
            "slow_ms" => faults.slow_ms = number()?,
            "only" => faults.only = value.to_string(),
            "first_range" => faults.first_range = Some(parse_script(value, item)?),
            "ranges" => {
                faults.ranges = value
                    .split('/')
                    .map(|script| parse_script(script, item))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown fault kind {key:?} in {item:?}")),
        }
    }
    let every_nth = [
        faults.server_error,
        faults.reset,
        faults.truncate,
        faults.slow,
        faults.corrupt,
    ];
    if faults.per_range() && every_nth.iter().any(Option::is_some) {
        return Err(format!(
            "fault spec {spec:?} mixes per-range scripts (ranges, first_range) with \
             every-N-th faults"
        ));
    }
    Ok(faults)
}

/// Parses a per-range script such as `5xx+reset` (see [`parse_faults`]).
fn parse_script(script: &str, item: &str) -> Result<Vec<Fault>, String> {
    script
        .split('+')
        .map(|name| match name.trim() {
            "none" => Ok(Fault::None),
            "5xx" => Ok(Fault::ServerError),
            "reset" => Ok(Fault::Reset),
            "truncate" => Ok(Fault::Truncate),
            "slow" => Ok(Fault::Slow),
            "corrupt" => Ok(Fault::Corrupt),
            other => Err(format!("fault item {item:?}: unknown fault {other:?}")),
        })
        .collect()
}

/// `(first, last)` of a `Range` header of the form `bytes=F-L` or
/// `(first, None)` for `bytes=F-`; `None` for anything else.
fn parse_range(range: &str) -> Option<(u64, Option<u64>)> {
    let spec = range.trim().strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let first = first.trim().parse().ok()?;
    let last = last.trim();
    if last.is_empty() {
        Some((first, None))
    } else {
        Some((first, Some(last.parse().ok()?)))
    }
}

/// Where the proxy takes its fault specification from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultSource {
    /// A fixed spec (which [`Proxy::set_faults`] can replace).
    Fixed(String),
    /// A file re-read before every request; a missing or empty file means
    /// no faults. Write it atomically (write + rename) to switch faults at
    /// runtime, as [`Proxy::set_faults`] does.
    File(PathBuf),
}

/// One line of the access log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Sequence number of the request (from 1, over all requests).
    pub n: u64,
    /// Request method (empty if the request line was unparsable).
    pub method: String,
    /// Request target as sent by the client (empty if unparsable).
    pub path: String,
    /// The request's `Range` header, if any.
    pub range: Option<String>,
    /// Status sent to the client; 0 if no response was sent (`reset`).
    pub status: u16,
    /// Body bytes actually sent to the client.
    pub bytes: u64,
    /// The fault applied.
    pub fault: Fault,
    /// Milliseconds from having read the request to having answered it.
    pub ms: u64,
}

impl LogEntry {
    /// The `Range` header as `(first, last)` for the form `bytes=F-L` and
    /// `(first, None)` for `bytes=F-`; `None` without a Range header or for
    /// other forms (suffix ranges, several ranges).
    pub fn range_bounds(&self) -> Option<(u64, Option<u64>)> {
        parse_range(self.range.as_deref()?)
    }
}

/// Reads an access log written by the proxy.
///
/// A last line without a terminating newline (being written) is ignored.
pub fn read_log(path: impl AsRef<Path>) -> io::Result<Vec<LogEntry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("log line {l:?}: {e}"))
            })
        })
        .collect()
}

/// A running proxy. Dropping it stops accepting connections and shuts
/// down the open client connections.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

impl Proxy {
    /// Starts a proxy on an ephemeral port of 127.0.0.1 forwarding to
    /// `upstream`, appending its access log to `log`.
    pub fn start(upstream: SocketAddr, log: PathBuf, faults: FaultSource) -> io::Result<Proxy> {
        Proxy::start_on(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            upstream,
            log,
            faults,
        )
    }

    /// Like [`start`](Self::start), listening on `listen` (port 0 picks an
    /// ephemeral port; see [`addr`](Self::addr)).
    pub fn start_on(
        listen: SocketAddr,
        upstream: SocketAddr,
        log: PathBuf,
        faults: FaultSource,
    ) -> io::Result<Proxy> {
        let current = match faults {
            FaultSource::Fixed(spec) => CurrentFaults::Fixed(
                parse_faults(&spec).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            FaultSource::File(path) => CurrentFaults::File(path),
        };
        let log_file = OpenOptions::new().create(true).append(true).open(&log)?;
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            log: Mutex::new(log_file),
            seq: AtomicU64::new(0),
            faults: Mutex::new(FaultState {
                current,
                eligible: 0,
                groups: RangeGroups::default(),
            }),
            active: Mutex::new(0),
            idle: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(Proxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until no request is being handled (every request read so far
    /// has been answered and logged), at most `timeout`; returns whether it
    /// got there. A client that has had every answer it waits for can call
    /// this and then read a complete log.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let active = lock(&self.shared.active);
        let (_active, waited) = self
            .shared
            .idle
            .wait_timeout_while(active, timeout, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        !waited.timed_out()
    }

    /// Sets the emulated round-trip time (see the [module
    /// documentation](self)) for connections and requests from now on;
    /// zero (the default) adds none.
    pub fn set_latency(&self, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::Relaxed);
    }

    /// Replaces the fault spec for subsequent requests (the counter of
    /// eligible requests keeps running). With [`FaultSource::File`] the
    /// file is rewritten atomically.
    pub fn set_faults(&self, spec: &str) -> Result<(), String> {
        let faults = parse_faults(spec)?;
        let mut state = lock(&self.shared.faults);
        match &mut state.current {
            CurrentFaults::Fixed(f) => *f = faults,
            CurrentFaults::File(path) => write_atomically(path, spec.as_bytes())
                .map_err(|e| format!("writing {}: {e}", path.display()))?,
        }
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let woke = TcpStream::connect_timeout(&wake, Duration::from_secs(2)).is_ok();
        if let Some(accept) = self.accept.take() {
            if woke {
                let _ = accept.join();
            }
        }
        for (_, conn) in lock(&self.shared.conns).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// Writes `data` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// ---------------------------------------------------------------------------
// Shared state

enum CurrentFaults {
    Fixed(Faults),
    File(PathBuf),
}

struct FaultState {
    current: CurrentFaults,
    /// Number of eligible requests seen so far.
    eligible: u64,
    /// The groups of per-range scripts.
    groups: RangeGroups,
}

/// The requests seen so far by path and `Range` header (per-range mode).
#[derive(Default)]
struct RangeGroups {
    /// Script and number of requests of each group.
    groups: HashMap<(String, Option<String>), (Vec<Fault>, usize)>,
    /// Byte spans `[start, end)` of the groups, by path.
    spans: HashMap<String, Vec<(u64, u64)>>,
    /// Fresh groups so far.
    fresh: usize,
}

impl RangeGroups {
    /// The fault for the next request of `path` with `range`.
    fn next(&mut self, faults: &Faults, path: &str, range: Option<&str>) -> Fault {
        let key = (path.to_string(), range.map(str::to_string));
        if let Some((script, seen)) = self.groups.get_mut(&key) {
            *seen += 1;
            return script.get(*seen - 1).copied().unwrap_or(Fault::None);
        }
        let (start, end) = match range.and_then(parse_range) {
            Some((first, Some(last))) => (first, last.saturating_add(1)),
            Some((first, None)) => (first, u64::MAX),
            None => (0, u64::MAX),
        };
        let spans = self.spans.entry(path.to_string()).or_default();
        let refetch = spans.iter().any(|&(s, e)| s < end && start < e);
        spans.push((start, end));
        let script = if refetch {
            Vec::new()
        } else {
            let k = self.fresh;
            self.fresh += 1;
            match (&faults.first_range, k) {
                (Some(first), 0) => first.clone(),
                _ if faults.ranges.is_empty() => Vec::new(),
                (first, k) => {
                    let k = if first.is_some() { k - 1 } else { k };
                    faults.ranges[k % faults.ranges.len()].clone()
                }
            }
        };
        let fault = script.first().copied().unwrap_or(Fault::None);
        self.groups.insert(key, (script, 1));
        fault
    }
}

struct Shared {
    upstream: SocketAddr,
    log: Mutex<File>,
    seq: AtomicU64,
    faults: Mutex<FaultState>,
    stop: AtomicBool,
    /// Clones of the open client connections, to shut them down on drop.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Requests read but not yet answered and logged.
    active: Mutex<u64>,
    /// Notified when `active` drops to 0.
    idle: Condvar,
    /// The emulated round-trip time in microseconds ([`Proxy::set_latency`]).
    latency_us: AtomicU64,
}

/// Counts one request as being handled while it lives.
struct Active<'a>(&'a Shared);

impl<'a> Active<'a> {
    fn new(shared: &'a Shared) -> Self {
        *lock(&shared.active) += 1;
        Active(shared)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let mut n = lock(&self.0.active);
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Sleeps one emulated round trip (on the connection's own thread:
    /// other connections are not held up).
    fn round_trip(&self) {
        let us = self.latency_us.load(Ordering::Relaxed);
        if us > 0 {
            thread::sleep(Duration::from_micros(us));
        }
    }

    /// Decides the fault for a request and returns it with `slow_ms`.
    fn decide(&self, method: &str, path: &str, range: Option<&str>) -> (Fault, u64) {
        let mut state = lock(&self.faults);
        let faults = match &state.current {
            CurrentFaults::Fixed(f) => f.clone(),
            CurrentFaults::File(p) => load_faults_file(p),
        };
        if !faults.is_eligible(method, path) {
            return (Fault::None, faults.slow_ms);
        }
        state.eligible += 1;
        let fault = if faults.per_range() {
            state.groups.next(&faults, path, range)
        } else {
            faults.pick(state.eligible)
        };
        (fault, faults.slow_ms)
    }

    fn write_log(&self, entry: &LogEntry) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        let mut log = lock(&self.log);
        if let Err(e) = log.write_all(&line).and_then(|()| log.flush()) {
            eprintln!("lazypull-testkit proxy: writing log: {e}");
        }
    }
}

fn load_faults_file(path: &Path) -> Faults {
    match std::fs::read_to_string(path) {
        Ok(spec) => parse_faults(&spec).unwrap_or_else(|e| {
            eprintln!(
                "lazypull-testkit proxy: {}: {e}; injecting no faults",
                path.display()
            );
            Faults::default()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Faults::default(),
        Err(e) => {
            eprintln!(
                "lazypull-testkit proxy: reading {}: {e}; injecting no faults",
                path.display()
            );
            Faults::default()
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("lazypull-testkit proxy: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.conns).insert(id, clone);
        }
        let conn_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || {
                serve_connection(&stream, id, &conn_shared);
            });
        if let Err(e) = spawned {
            eprintln!("lazypull-testkit proxy: spawning a thread: {e}");
            lock(&shared.conns).remove(&id);
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP plumbing

type Headers = Vec<(String, String)>;

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn has_token(headers: &Headers, name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Reads head lines up to the blank line. `Ok(None)` on EOF before any
/// byte; blank lines before the first line are skipped.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    let mut budget = MAX_HEAD;
    let mut started = false;
    loop {
        let mut buf = Vec::new();
        let n = r.by_ref().take(budget).read_until(b'\n', &mut buf)?;
        if n == 0 {
            if !started {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the head",
            ));
        }
        started = true;
        budget -= n as u64;
        if buf.last() != Some(&b'\n') {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        if buf.is_empty() {
            if lines.is_empty() {
                continue;
            }
            return Ok(Some(lines));
        }
        lines.push(String::from_utf8_lossy(&buf).into_owned());
    }
}

fn parse_header_lines(lines: &[String]) -> Result<Headers, String> {
    lines
        .iter()
        .map(|l| {
            let (name, value) = l
                .split_once(':')
                .ok_or_else(|| format!("header line {l:?} has no colon"))?;
            if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b < 0x21) {
                return Err(format!("bad header name in {l:?}"));
            }
            Ok((name.to_string(), value.trim().to_string()))
        })
        .collect()
}

fn content_length(headers: &Headers) -> Result<Option<u64>, String> {
    let mut found: Option<u64> = None;
    for (n, v) in headers {
        if n.eq_ignore_ascii_case("content-length") {
            let len = v
                .parse::<u64>()
                .map_err(|_| format!("bad Content-Length {v:?}"))?;
            if found.is_some_and(|f| f != len) {
                return Err("conflicting Content-Length headers".into());
            }
            found = Some(len);
        }
    }
    Ok(found)
}

struct Request {
    method: String,
    target: String,
    version: String,
    headers: Headers,
    body: Vec<u8>,
}

/// Outcome of reading a request.
enum ReadRequest {
    Eof,
    Ok(Request),
    /// Answer with this status and close; method and target if known.
    Reject(u16, &'static str, String, String, String),
}

fn read_request(r: &mut impl BufRead, w: &TcpStream) -> io::Result<ReadRequest> {
    let Some(lines) = (match read_head(r) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Ok(ReadRequest::Reject(
                400,
                "Bad Request",
                String::new(),
                String::new(),
                e.to_string(),
            ))
        }
        Err(e) => return Err(e),
    }) else {
        return Ok(ReadRequest::Eof);
    };
    let parts: Vec<&str> = lines[0].split(' ').collect();
    let bad = |m: &str, t: &str, why: String| {
        Ok(ReadRequest::Reject(
            400,
            "Bad Request",
            m.to_string(),
            t.to_string(),
            why,
        ))
    };
    let [method, target, version] = parts[..] else {
        return bad("", "", format!("bad request line {:?}", lines[0]));
    };
    if method.is_empty()
        || !method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
        || target.is_empty()
        || !version.starts_with("HTTP/1.")
    {
        return bad("", "", format!("bad request line {:?}", lines[0]));
    }
    let headers = match parse_header_lines(&lines[1..]) {
        Ok(h) => h,
        Err(why) => return bad(method, target, why),
    };
    if header(&headers, "transfer-encoding").is_some() {
        return Ok(ReadRequest::Reject(
            501,
            "Not Implemented",
            method.to_string(),
            target.to_string(),
            "request bodies with Transfer-Encoding are not supported".into(),
        ));
    }
    let len = match content_length(&headers) {
        Ok(l) => l.unwrap_or(0),
        Err(why) => return bad(method, target, why),
    };
    if len > 0 && has_token(&headers, "expect", "100-continue") {
        let mut w = w;
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut body = Vec::new();
    r.take(len).read_to_end(&mut body)?;
    if (body.len() as u64) < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside the request body",
        ));
    }
    Ok(ReadRequest::Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        body,
    }))
}

fn wants_keep_alive(req: &Request) -> bool {
    if req.version == "HTTP/1.0" {
        has_token(&req.headers, "connection", "keep-alive")
    } else {
        !has_token(&req.headers, "connection", "close")
    }
}

/// Sends a small complete response; returns the body bytes sent.
fn send_simple(
    w: &TcpStream,
    status: u16,
    reason: &str,
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) -> io::Result<u64> {
    let mut msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    if !keep_alive {
        msg.extend_from_slice(b"Connection: close\r\n");
    }
    msg.extend_from_slice(b"\r\n");
    if !head_only {
        msg.extend_from_slice(body);
    }
    let mut w = w;
    w.write_all(&msg)?;
    w.flush()?;
    Ok(if head_only { 0 } else { body.len() as u64 })
}

/// How an upstream response body is framed.
enum UpstreamBody {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length` bytes still to be read from the upstream reader.
    Stream(u64),
    /// Chunked or EOF-delimited, already read.
    Buffered(Vec<u8>),
}

struct UpstreamResponse {
    status: u16,
    reason: String,
    headers: Headers,
    body: UpstreamBody,
    reader: BufReader<TcpStream>,
}

fn bad_upstream(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn forward(upstream: SocketAddr, req: &Request) -> io::Result<UpstreamResponse> {
    let stream = TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    stream.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut head = format!("{} {} {}\r\n", req.method, req.target, req.version);
    for (n, v) in &req.headers {
        if n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&req.body);
    (&stream).write_all(&out)?;

    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let lines = read_head(&mut reader)?
            .ok_or_else(|| bad_upstream("upstream closed without a response"))?;
        let mut status_parts = lines[0].splitn(3, ' ');
        let version = status_parts.next().unwrap_or("");
        let status = status_parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..1000).contains(s));
        let (true, Some(status)) = (version.starts_with("HTTP/"), status) else {
            return Err(bad_upstream(format!("bad status line {:?}", lines[0])));
        };
        let reason = status_parts.next().unwrap_or("").to_string();
        let headers = parse_header_lines(&lines[1..]).map_err(bad_upstream)?;
        if (100..200).contains(&status) && status != 101 {
            continue; // interim response, e.g. 100 Continue
        }
        let no_body =
            req.method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
        let body = if no_body {
            UpstreamBody::None
        } else if has_token(&headers, "transfer-encoding", "chunked") {
            UpstreamBody::Buffered(read_chunked(&mut reader)?)
        } else if let Some(len) = content_length(&headers).map_err(bad_upstream)? {
            UpstreamBody::Stream(len)
        } else {
            let mut body = Vec::new();
            reader.read_to_end(&mut body)?;
            UpstreamBody::Buffered(body)
        };
        return Ok(UpstreamResponse {
            status,
            reason,
            headers,
            body,
            reader,
        });
    }
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.by_ref().take(4096).read_line(&mut line)?;
        if !line.ends_with('\n') {
            return Err(bad_upstream("bad chunk size line"));
        }
        let size = line.trim().split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| bad_upstream(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            break;
        }
        let before = body.len();
        r.by_ref().take(size).read_to_end(&mut body)?;
        if ((body.len() - before) as u64) < size {
            return Err(bad_upstream("upstream closed inside a chunk"));
        }
        let mut crlf = String::new();
        r.by_ref().take(2).read_line(&mut crlf)?;
        if crlf.is_empty() || !crlf.trim_end_matches(['\r', '\n']).is_empty() {
            return Err(bad_upstream("missing CRLF after a chunk"));
        }
    }
    // Trailers, up to the blank line.
    loop {
        let mut line = String::new();
        if r.by_ref().take(MAX_HEAD).read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    Ok(body)
}

/// Builds the response head sent to the client.
fn client_head(resp: &UpstreamResponse, body_len: Option<u64>, keep_alive: bool) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, resp.reason);
    for (n, v) in &resp.headers {
        let hop = ["connection", "keep-alive", "proxy-connection"];
        let framing = ["content-length", "transfer-encoding"];
        if hop.iter().any(|h| n.eq_ignore_ascii_case(h))
            || (body_len.is_some() && framing.iter().any(|h| n.eq_ignore_ascii_case(h)))
        {
            continue;
        }
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(len) = body_len {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Sends head and the (possibly faulted) body. Adds the body bytes sent
/// to `sent`.
fn send_body(
    w: &TcpStream,
    head: &[u8],
    body: &mut dyn Read,
    len: u64,
    fault: Fault,
    sent: &mut u64,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, w);
    out.write_all(head)?;
    let limit = if fault == Fault::Truncate {
        len / 2
    } else {
        len
    };
    let flip = (fault == Fault::Corrupt && len > 0).then_some(len / 2);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    while pos < limit {
        let want = (limit - pos).min(buf.len() as u64) as usize;
        let n = body.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream body ended early",
            ));
        }
        if let Some(i) = flip {
            if (pos..pos + n as u64).contains(&i) {
                buf[(i - pos) as usize] ^= 0xff;
            }
        }
        out.write_all(&buf[..n])?;
        pos += n as u64;
        *sent = pos;
    }
    out.flush()
}

/// What to do with the client connection after a request.
enum Next {
    KeepAlive,
    Close,
    Reset,
}

fn serve_connection(stream: &TcpStream, id: u64, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    // The TCP handshake's round trip.
    shared.round_trip();
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let next = loop {
        if shared.stop.load(Ordering::SeqCst) {
            break Next::Close;
        }
        match handle_one(&mut reader, stream, shared) {
            Next::KeepAlive => continue,
            other => break other,
        }
    };
    // Drop our clone first: the socket is only closed (and an RST only
    // sent) when its last descriptor goes away.
    lock(&shared.conns).remove(&id);
    match next {
        Next::Reset => {
            if let Err(e) = rustix::net::sockopt::set_socket_linger(stream, Some(Duration::ZERO)) {
                eprintln!("lazypull-testkit proxy: SO_LINGER: {e}");
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        Next::Close | Next::KeepAlive => {
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
}

fn handle_one(reader: &mut impl BufRead, stream: &TcpStream, shared: &Shared) -> Next {
    let req = read_request(reader, stream);
    let _active = Active::new(shared);
    let req = match req {
        Ok(ReadRequest::Ok(req)) => req,
        Ok(ReadRequest::Eof) | Err(_) => return Next::Close,
        Ok(ReadRequest::Reject(status, reason, method, path, why)) => {
            let start = Instant::now();
            let body = format!("{why}\n");
            let bytes = send_simple(stream, status, reason, body.as_bytes(), false, false)
                .unwrap_or_default();
            shared.write_log(&LogEntry {
                n: shared.seq.fetch_add(1, Ordering::SeqCst) + 1,
                method,
                path,
                range: None,
                status,
                bytes,
                fault: Fault::None,
                ms: start.elapsed().as_millis() as u64,
            });
            return Next::Close;
        }
    };
    let start = Instant::now();
    let n = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let keep_alive = wants_keep_alive(&req);
    let range = header(&req.headers, "range").map(str::to_string);
    let (fault, slow_ms) = shared.decide(&req.method, &req.target, range.as_deref());
    let mut entry = LogEntry {
        n,
        method: req.method.clone(),
        path: req.target.clone(),
        range,
        status: 0,
        bytes: 0,
        fault,
        ms: 0,
    };
    let next = respond(stream, shared, &req, fault, slow_ms, keep_alive, &mut entry);
    entry.ms = start.elapsed().as_millis() as u64;
    shared.write_log(&entry);
    next
}

fn respond(
    stream: &TcpStream,
    shared: &Shared,
    req: &Request,
    fault: Fault,
    slow_ms: u64,
    keep_alive: bool,
    entry: &mut LogEntry,
) -> Next {
    let head_only = req.method == "HEAD";
    let next = |ok: bool, keep_alive: bool| {
        if ok && keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    };
    match fault {
        Fault::Reset => return Next::Reset,
        Fault::ServerError => {
            entry.status = 503;
            let r = send_simple(
                stream,
                503,
                "Service Unavailable",
                FAULT_503_BODY,
                keep_alive,
                head_only,
            );
            entry.bytes = *r.as_ref().unwrap_or(&0);
            return next(r.is_ok(), keep_alive);
        }
        Fault::Slow => thread::sleep(Duration::from_millis(slow_ms)),
        Fault::None | Fault::Truncate | Fault::Corrupt => {}
    }
    shared.round_trip();
    let mut resp = match forward(shared.upstream, req) {
        Ok(r) => r,
        Err(e) => {
            let body = format!(
                "lazypull-testkit proxy: upstream {}: {e}\n",
                shared.upstream
            );
            entry.status = 502;
            let r = send_simple(
                stream,
                502,
                "Bad Gateway",
                body.as_bytes(),
                keep_alive,
                head_only,
            );
            entry.bytes = *r.as_ref().unwrap_or(&0);
            return next(r.is_ok(), keep_alive);
        }
    };
    entry.status = resp.status;
    let keep_alive = keep_alive && fault != Fault::Truncate && resp.status != 101;
    let body = std::mem::replace(&mut resp.body, UpstreamBody::None);
    let result = match body {
        UpstreamBody::None => {
            let head = client_head(&resp, None, keep_alive);
            let mut w = stream;
            w.write_all(&head).and_then(|()| w.flush())
        }
        UpstreamBody::Stream(len) => {
            let head = client_head(&resp, Some(len), keep_alive);
            let mut body = (&mut resp.reader).take(len);
            send_body(stream, &head, &mut body, len, fault, &mut entry.bytes)
        }
        UpstreamBody::Buffered(data) => {
            let len = data.len() as u64;
            let head = client_head(&resp, Some(len), keep_alive);
            send_body(
                stream,
                &head,
                &mut Cursor::new(data),
                len,
                fault,
                &mut entry.bytes,
            )
        }
    };
    next(result.is_ok(), keep_alive)
}
