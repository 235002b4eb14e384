//! Plumbing shared by the HTTP and registry backends: request counters, the
//! concurrency limit (one per host, see [`Hosts`](crate::registry::Hosts)), and the checks every response goes through (status
//! mapping, `Content-Range` validation, bodies of exactly the right length,
//! size caps). Nothing here retries or authenticates; the callers do.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use reqwest::blocking::Response;
use reqwest::header::{HeaderName, CONTENT_LENGTH, CONTENT_RANGE};

use crate::registry::{RegistryError, RequestStats};

/// One counter of one client, which also adds to the process-wide total of
/// its kind (see [`totals`]).
#[derive(Debug)]
pub(crate) struct Counter {
    local: AtomicU64,
    total: &'static AtomicU64,
}

impl Counter {
    const fn new(total: &'static AtomicU64) -> Self {
        Counter {
            local: AtomicU64::new(0),
            total,
        }
    }

    /// A counter adding to no total (tests).
    #[cfg(test)]
    pub fn detached() -> Self {
        static NOWHERE: AtomicU64 = AtomicU64::new(0);
        Counter::new(&NOWHERE)
    }

    pub fn add(&self, n: u64) {
        self.local.fetch_add(n, Ordering::Relaxed);
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }
}

static TOTAL_REQUESTS: AtomicU64 = AtomicU64::new(0);
static TOTAL_RANGE_REQUESTS: AtomicU64 = AtomicU64::new(0);
static TOTAL_BYTES: AtomicU64 = AtomicU64::new(0);
static TOTAL_RETRIES: AtomicU64 = AtomicU64::new(0);
static TOTAL_FAILURES: AtomicU64 = AtomicU64::new(0);
static TOTAL_MIRROR_FALLBACKS: AtomicU64 = AtomicU64::new(0);
/// Requests the configured proxy could not take, sent directly instead.
pub(crate) static TOTAL_PROXY_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Every HTTP request this process sent to registries and blob servers, over
/// all clients (the number a server's access log shows).
pub fn totals() -> RequestStats {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    RequestStats {
        requests: g(&TOTAL_REQUESTS),
        range_requests: g(&TOTAL_RANGE_REQUESTS),
        bytes_received: g(&TOTAL_BYTES),
        retries: g(&TOTAL_RETRIES),
        failures: g(&TOTAL_FAILURES),
        mirror_fallbacks: g(&TOTAL_MIRROR_FALLBACKS),
        proxy_fallbacks: g(&TOTAL_PROXY_FALLBACKS),
    }
}

/// Live counters behind [`RequestStats`].
#[derive(Debug)]
pub(crate) struct Stats {
    pub requests: Counter,
    pub range_requests: Counter,
    pub bytes_received: Counter,
    pub retries: Counter,
    pub failures: Counter,
    pub mirror_fallbacks: Counter,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: Counter::new(&TOTAL_REQUESTS),
            range_requests: Counter::new(&TOTAL_RANGE_REQUESTS),
            bytes_received: Counter::new(&TOTAL_BYTES),
            retries: Counter::new(&TOTAL_RETRIES),
            failures: Counter::new(&TOTAL_FAILURES),
            mirror_fallbacks: Counter::new(&TOTAL_MIRROR_FALLBACKS),
        }
    }
}

pub(crate) fn inc(c: &Counter) {
    c.add(1);
}

impl Stats {
    pub fn snapshot(&self) -> RequestStats {
        RequestStats {
            requests: self.requests.get(),
            range_requests: self.range_requests.get(),
            bytes_received: self.bytes_received.get(),
            retries: self.retries.get(),
            failures: self.failures.get(),
            mirror_fallbacks: self.mirror_fallbacks.get(),
            // Counted per process only (a proxy serves every client).
            proxy_fallbacks: 0,
        }
    }

    pub fn received(&self, n: usize) {
        self.bytes_received.add(n as u64);
    }
}

/// A counting semaphore: at most `max` permits out at once.
#[derive(Debug)]
pub(crate) struct Limiter {
    max: usize,
    state: Mutex<LimiterState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct LimiterState {
    in_use: usize,
    waiting: usize,
}

/// One request's right to be in flight; returned on drop.
#[derive(Debug)]
pub(crate) struct Permit(Arc<Limiter>);

impl Limiter {
    pub fn new(max: usize) -> Arc<Limiter> {
        Arc::new(Limiter {
            max: max.max(1),
            state: Mutex::new(LimiterState::default()),
            freed: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimiterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn acquire(self: &Arc<Self>) -> Permit {
        let mut st = self.lock();
        if st.in_use >= self.max {
            st.waiting += 1;
            while st.in_use >= self.max {
                st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.waiting -= 1;
        }
        st.in_use += 1;
        Permit(self.clone())
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Permits out and callers waiting for one, now.
    pub fn load(&self) -> (usize, usize) {
        let st = self.lock();
        (st.in_use, st.waiting)
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.load().0
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.in_use -= 1;
        self.0.freed.notify_one();
    }
}

pub(crate) fn header_str<'a>(resp: &'a Response, name: &HeaderName) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The `Content-Length` header (not reqwest's body size hint, which is 0 for
/// HEAD responses).
pub(crate) fn content_length(resp: &Response) -> Option<u64> {
    header_str(resp, &CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// The first bytes of an error response's body, for messages.
fn body_excerpt(resp: &mut Response) -> String {
    let mut buf = Vec::new();
    let _ = resp.take(512).read_to_end(&mut buf);
    let s = String::from_utf8_lossy(&buf);
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.is_empty() {
        "(empty body)".to_string()
    } else {
        s
    }
}

/// The error for a non-2xx response. 401 is the caller's business before
/// this point (it lands here only where nobody authenticates).
pub(crate) fn status_error(
    mut resp: Response,
    url: &str,
    what: &str,
    registry: &str,
) -> RegistryError {
    let status = resp.status().as_u16();
    match status {
        404 => RegistryError::NotFound {
            what: what.to_string(),
        },
        403 => RegistryError::Denied {
            registry: registry.to_string(),
            what: what.to_string(),
        },
        416 => RegistryError::Protocol {
            url: url.to_string(),
            why: format!(
                "range not satisfiable (HTTP 416, Content-Range {:?}): {what} is shorter than expected",
                header_str(&resp, &CONTENT_RANGE).unwrap_or("")
            ),
        },
        _ => RegistryError::Status {
            url: url.to_string(),
            status,
            body_excerpt: body_excerpt(&mut resp),
        },
    }
}

/// Passes a 2xx response through, maps anything else to its error.
pub(crate) fn check_status(
    resp: Response,
    url: &str,
    what: &str,
    registry: &str,
) -> Result<Response, RegistryError> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(status_error(resp, url, what, registry))
    }
}

/// Parses `bytes FIRST-LAST/TOTAL` (`*` for an unknown total) and
/// `bytes */TOTAL`: the range (None for `*`) and the total.
/// A parsed `Content-Range`: the byte range (None for `*`) and the total.
pub(crate) type ContentRange = (Option<(u64, u64)>, Option<u64>);

pub(crate) fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if b < a {
                return None;
            }
            Some((a, b))
        }
    };
    if range.is_none() && total.is_none() {
        return None;
    }
    Some((range, total))
}

/// Reads exactly `buf.len()` bytes of body; a short body is a (retryable)
/// length error, a failing read a (retryable) body error.
fn read_full(
    resp: &mut Response,
    url: &str,
    buf: &mut [u8],
    stats: &Stats,
) -> Result<(), RegistryError> {
    let mut done = 0;
    while done < buf.len() {
        match resp.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(RegistryError::BodyLength {
                    url: url.to_string(),
                    expected: buf.len() as u64,
                    got: done as u64,
                })
            }
            Ok(n) => {
                done += n;
                stats.received(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(RegistryError::BodyRead {
                    url: url.to_string(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Fills `buf` from a successful response to `Range: bytes=off-(off+len-1)`
/// of a blob of `size` bytes. Requires 206 with exactly that `Content-Range`
/// (and, if given, that total), or 200 only when the range is the whole blob;
/// the body must be exactly `buf.len()` bytes.
pub(crate) fn read_range_body(
    mut resp: Response,
    url: &str,
    buf: &mut [u8],
    off: u64,
    size: u64,
    stats: &Stats,
) -> Result<(), RegistryError> {
    let len = buf.len() as u64;
    let last = off + len - 1;
    let protocol = |why: String| RegistryError::Protocol {
        url: url.to_string(),
        why,
    };
    match resp.status().as_u16() {
        206 => {
            let cr = header_str(&resp, &CONTENT_RANGE)
                .ok_or_else(|| protocol("HTTP 206 without Content-Range".into()))?;
            let (range, total) = parse_content_range(cr)
                .ok_or_else(|| protocol(format!("malformed Content-Range {cr:?}")))?;
            if range != Some((off, last)) {
                return Err(protocol(format!(
                    "asked for bytes {off}-{last}, got Content-Range {cr:?}"
                )));
            }
            if let Some(t) = total {
                if t != size {
                    return Err(protocol(format!(
                        "the blob is {t} bytes now, expected {size}: it changed"
                    )));
                }
            }
        }
        200 if off == 0 && len == size => {}
        200 => {
            return Err(protocol(format!(
                "the server ignored the Range header (HTTP 200 for bytes {off}-{last} of {size}); \
                 it must support Range requests"
            )))
        }
        s => return Err(protocol(format!("unexpected HTTP {s} for a Range request"))),
    }
    if let Some(cl) = content_length(&resp) {
        if cl != len {
            return Err(RegistryError::BodyLength {
                url: url.to_string(),
                expected: len,
                got: cl,
            });
        }
    }
    read_full(&mut resp, url, buf, stats)?;
    // Nothing may follow.
    let mut extra = [0u8; 1];
    loop {
        match resp.read(&mut extra) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(RegistryError::BodyLength {
                    url: url.to_string(),
                    expected: len,
                    got: len + 1,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(RegistryError::BodyRead {
                    url: url.to_string(),
                    source,
                })
            }
        }
    }
}

/// Runs one try of a Range request of `bytes` bytes whose request was sent
/// with `deadline` as its total timeout (reqwest's per-request timeout covers
/// the response body too): a failure once the deadline has passed is the
/// deadline's, and says so.
pub(crate) fn within_deadline<T>(
    url: &str,
    bytes: u64,
    deadline: std::time::Duration,
    op: impl FnOnce() -> Result<T, RegistryError>,
) -> Result<T, RegistryError> {
    let started = std::time::Instant::now();
    op().map_err(|e| {
        if e.is_retryable() && started.elapsed() >= deadline {
            RegistryError::DeadlineExceeded {
                url: url.to_string(),
                bytes,
                deadline,
            }
        } else {
            e
        }
    })
}

/// The whole body, at most `limit` bytes (more is [`RegistryError::TooLarge`]).
pub(crate) fn read_capped(
    mut resp: Response,
    url: &str,
    limit: u64,
    what: &str,
    stats: &Stats,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = || RegistryError::TooLarge {
        what: what.to_string(),
        limit,
    };
    let announced = content_length(&resp);
    if announced.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(announced.unwrap_or(0) as usize);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match resp.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                stats.received(n);
                out.extend_from_slice(&chunk[..n]);
                if out.len() as u64 > limit {
                    return Err(too_large());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(RegistryError::BodyRead {
                    url: url.to_string(),
                    source,
                })
            }
        }
    }
    if let Some(n) = announced {
        if n != out.len() as u64 {
            return Err(RegistryError::BodyLength {
                url: url.to_string(),
                expected: n,
                got: out.len() as u64,
            });
        }
    }
    Ok(out)
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-0/100"),
            Some((Some((0, 0)), Some(100)))
        );
        assert_eq!(
            parse_content_range("bytes 5-9/*"),
            Some((Some((5, 9)), None))
        );
        assert_eq!(parse_content_range("bytes */0"), Some((None, Some(0))));
        for bad in [
            "",
            "bytes",
            "bytes 5-4/10",
            "bytes */*",
            "items 0-1/2",
            "bytes 0-1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn limiter_never_exceeds_its_permits() {
        let lim = Limiter::new(3);
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let lim = lim.clone();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    let _p = lim.acquire();
                    peak.fetch_max(lim.in_use() as u64, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        assert_eq!(lim.in_use(), 0);
    }
}
