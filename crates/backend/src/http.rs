//! A blob at a plain HTTP(S) URL, served by any web server that honours
//! `Range` requests.
//!
//! It owns the Range protocol for such a URL: learning the size, asking for
//! exactly the bytes wanted, refusing any answer that is not exactly those
//! bytes, retrying transient failures, waiting for (and then failing fast
//! on) a host whose circuit breaker is open. It sends no credentials and must not
//! decompress or verify the contents; that is the engine's job.

use std::fmt;
use std::io;
use std::io::Read;
use std::sync::Arc;

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::Url;

use crate::registry::hosts::Host;
use crate::registry::{ClientOptions, RegistryError, RequestStats};
use crate::retry::{self, RetryPolicy};
use crate::transport::{self, inc, Stats};
use lazypull_source::RangeRead;

/// One blob at an `http://` or `https://` URL.
///
/// Uses its host's `reqwest` blocking client from [`ClientOptions::hosts`],
/// shared with every other `HttpBlob` and `Registry` of that host there, and
/// that host's limit of [`ClientOptions::max_connections`] requests in
/// flight: create, use and drop it on plain threads (or in `spawn_blocking`),
/// never directly in async code.
pub struct HttpBlob {
    url: String,
    size: u64,
    host: Arc<Host>,
    retry: RetryPolicy,
    /// The options, for the deadline of each Range request.
    opts: ClientOptions,
    stats: Stats,
}

impl fmt::Debug for HttpBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBlob")
            .field("url", &self.url)
            .field("size", &self.size)
            .finish()
    }
}

impl HttpBlob {
    /// Learns the blob's size with a `Range: bytes=0-0` request, which also
    /// proves the server honours ranges (one that answers 200 with the whole
    /// body is refused, unless the blob is empty).
    pub fn open(url: &str, opts: &ClientOptions) -> Result<HttpBlob, RegistryError> {
        let parsed = Url::parse(url).map_err(|e| RegistryError::InvalidUrl {
            url: url.to_string(),
            why: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(RegistryError::InvalidUrl {
                url: url.to_string(),
                why: "only http:// and https:// are supported".into(),
            });
        }
        let mut blob = HttpBlob {
            url: url.to_string(),
            size: 0,
            host: opts.hosts.host(&parsed, opts)?,
            retry: opts.retry,
            opts: opts.clone(),
            stats: Stats::default(),
        };
        blob.size = blob.retrying(&format_args!("GET {url} (size probe)"), |_| blob.probe())?;
        Ok(blob)
    }

    fn host(&self) -> String {
        Url::parse(&self.url)
            .ok()
            .and_then(|u| {
                let h = u.host_str()?.to_string();
                Some(match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h,
                })
            })
            .unwrap_or_default()
    }

    fn probe(&self) -> Result<u64, RegistryError> {
        let url = &self.url;
        let protocol = |why: String| RegistryError::Protocol {
            url: url.clone(),
            why,
        };
        let _permit = self.host.limiter.acquire();
        inc(&self.stats.requests);
        inc(&self.stats.range_requests);
        let mut resp = self.host.send(
            |c| Ok(c.get(url).header(RANGE, "bytes=0-0")),
            |source| RegistryError::Transport {
                url: url.clone(),
                source,
            },
        )?;
        let cr = transport::header_str(&resp, &CONTENT_RANGE).map(str::to_string);
        let parsed = cr.as_deref().and_then(transport::parse_content_range);
        match resp.status().as_u16() {
            206 => {
                let total = match parsed {
                    Some((Some((0, 0)), Some(total))) => total,
                    _ => {
                        return Err(protocol(format!(
                            "asked for bytes 0-0, got Content-Range {cr:?} (the size must be given)"
                        )))
                    }
                };
                let mut one = [0u8; 1];
                transport::read_range_body(resp, url, &mut one, 0, total, &self.stats)?;
                Ok(total)
            }
            // Nothing to read: an empty blob.
            416 => match parsed {
                Some((None, Some(0))) => Ok(0),
                _ => Err(protocol(format!(
                    "HTTP 416 for bytes 0-0 with Content-Range {cr:?}"
                ))),
            },
            200 if transport::content_length(&resp) == Some(0) => {
                let mut rest = Vec::new();
                let _ = resp.read_to_end(&mut rest);
                Ok(0)
            }
            200 => Err(protocol(
                "the server ignored the Range header (HTTP 200); it must support Range requests"
                    .into(),
            )),
            _ => Err(transport::check_status(resp, url, url, &self.host())
                .err()
                .unwrap_or_else(|| protocol("unexpected status for a Range request".into()))),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The size learned by [`open`](Self::open).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn stats(&self) -> RequestStats {
        self.stats.snapshot()
    }

    fn retrying<T>(
        &self,
        what: &dyn fmt::Display,
        op: impl FnMut(u32) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let guard = retry::Guard {
            breaker: &self.host.breaker,
            outage_timeout: self.opts.outage_timeout,
        };
        let r = retry::run(
            &self.retry,
            what,
            &self.stats.retries,
            Some(&guard),
            RegistryError::is_retryable,
            RegistryError::BackendDown,
            op,
        );
        if r.is_err() {
            inc(&self.stats.failures);
        }
        r
    }

    fn read_range(&self, buf: &mut [u8], off: u64) -> Result<(), RegistryError> {
        let url = &self.url;
        let last = off + buf.len() as u64 - 1;
        let deadline = self.opts.deadline_for(buf.len() as u64);
        self.retrying(&format_args!("GET {url} bytes {off}-{last}"), |_| {
            let _permit = self.host.limiter.acquire();
            inc(&self.stats.requests);
            inc(&self.stats.range_requests);
            transport::within_deadline(url, buf.len() as u64, deadline, || {
                let resp = self.host.send(
                    |c| {
                        Ok(c.get(url)
                            .header(RANGE, format!("bytes={off}-{last}"))
                            .timeout(deadline))
                    },
                    |source| RegistryError::Transport {
                        url: url.clone(),
                        source,
                    },
                )?;
                let resp = transport::check_status(resp, url, url, &self.host())?;
                transport::read_range_body(resp, url, &mut *buf, off, self.size, &self.stats)
            })
        })
    }
}

impl RangeRead for HttpBlob {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let context = || format!("blob at {}", self.url);
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(RegistryError::OutOfRange {
                what: "read".into(),
                off,
                len,
                size: self.size,
            }
            .into_io(&context()));
        }
        self.read_range(buf, off).map_err(|e| e.into_io(&context()))
    }
}
