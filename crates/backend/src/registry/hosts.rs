//! One HTTP client and one connection limit per host, shared by every
//! [`Registry`](super::Registry) and [`HttpBlob`](crate::http::HttpBlob) that
//! reaches that host through the same [`Hosts`].
//!
//! A host is an origin (`scheme://host:port`, the port made explicit) plus the
//! settings that shape its client: CA files, timeouts, user agent and
//! [`ClientOptions::max_connections`]. Two callers that reach the same origin
//! with different settings get different clients and limits; the daemon builds
//! one [`ClientOptions`] and clones it, so all of its registries and blob URLs
//! on one host share one client and one limit.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::Url;

use super::hosts_toml::HostTls;
use super::options::ProxyRoute;
use super::{ClientOptions, RegistryError};
use crate::breaker::{BackendHealth, Breaker};
use crate::transport::Limiter;

/// The HTTP clients of one owner (a daemon, one command), one per host.
///
/// Cheap to clone: clones share the clients. [`ClientOptions`] carries one
/// (its `hosts` field); [`ClientOptions::default`] starts a new, empty one, so
/// options built once and cloned share their clients, while options built
/// afresh for every call (as before) get a client per call.
///
/// Each client is `reqwest`'s blocking client, which runs one small runtime
/// on a thread of its own: a `Hosts` holds one such thread, plus up to
/// `max_connections` idle connections (closed after 90 s unused), per host it
/// ever reached, until the last clone of it and of every `Registry` and
/// `HttpBlob` using it is dropped.
#[derive(Clone, Default)]
pub struct Hosts {
    inner: Arc<Pool>,
}

#[derive(Default)]
struct Pool {
    hosts: Mutex<HashMap<HostKey, Arc<Host>>>,
    /// One breaker per origin, whatever the settings of its clients: a host
    /// that is down is down for all of them.
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    created: AtomicU64,
}

/// What tells two hosts apart: the origin and every setting that changes the
/// client or the limit. (Not `insecure_hosts`: it decides the scheme, which
/// is part of the origin. Not the retry policy: it belongs to the caller.)
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HostKey {
    scheme: String,
    host: String,
    port: u16,
    ca_files: Vec<PathBuf>,
    /// The host's own TLS settings (from its `hosts.toml`).
    tls: HostTls,
    connect_timeout: Duration,
    request_timeout: Duration,
    user_agent: String,
    max_connections: usize,
    proxy: ProxyRoute,
}

/// One host's client and connection limit.
pub(crate) struct Host {
    /// `scheme://host:port`.
    origin: String,
    client: Client,
    /// When requests to this origin go through a proxy: the same client
    /// without it, for requests the proxy cannot take.
    direct: Option<Client>,
    /// That proxy (for the log).
    proxy: Option<String>,
    /// When the last fallback was logged.
    proxy_warned: Mutex<Option<std::time::Instant>>,
    /// At most `max_connections` requests to this host in flight, over every
    /// user of this `Host`. A request holds its permit until its body is read.
    pub(crate) limiter: Arc<Limiter>,
    /// The origin's circuit breaker, shared by every client of it.
    pub(crate) breaker: Arc<Breaker>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("origin", &self.origin)
            .finish()
    }
}

/// How busy one host of a [`Hosts`] is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostLoad {
    /// `scheme://host:port`.
    pub origin: String,
    /// Its limit of requests in flight ([`ClientOptions::max_connections`]).
    pub max_connections: usize,
    /// Requests in flight now (sent, body not yet read).
    pub in_flight: usize,
    /// Requests waiting for one of those to finish.
    pub waiting: usize,
}

impl Hosts {
    /// A new pool with no clients yet.
    pub fn new() -> Hosts {
        Hosts::default()
    }

    /// The host `url` (an `http` or `https` URL) is on, its client built
    /// now if this pool has none for it with these settings yet.
    pub(crate) fn host(&self, url: &Url, opts: &ClientOptions) -> Result<Arc<Host>, RegistryError> {
        self.host_with(url, opts, &HostTls::default())
    }

    /// [`host`](Self::host) with the host's own TLS settings on top of the
    /// options' (its `hosts.toml` `ca`, `client`, `skip_verify`).
    pub(crate) fn host_with(
        &self,
        url: &Url,
        opts: &ClientOptions,
        tls: &HostTls,
    ) -> Result<Arc<Host>, RegistryError> {
        let key = HostKey {
            scheme: url.scheme().to_ascii_lowercase(),
            host: url.host_str().unwrap_or("").to_ascii_lowercase(),
            port: url.port_or_known_default().unwrap_or(0),
            ca_files: opts.ca_files.clone(),
            tls: tls.clone(),
            connect_timeout: opts.connect_timeout,
            request_timeout: opts.request_timeout,
            user_agent: opts.user_agent.clone(),
            max_connections: opts.max_connections.max(1),
            // The configured proxy, else the environment's by scheme:
            // either way with the direct fallback below.
            proxy: ProxyRoute::of(opts),
        };
        // Held while a client is built (milliseconds, once per host): two
        // first users of a host must not build two clients.
        let mut hosts = self.inner.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hosts.get(&key) {
            return Ok(h.clone());
        }
        // Through the proxy, and when this origin's own requests take one,
        // a client without it for the requests the proxy takes no
        // connection for.
        let client = opts.build_client(tls, &key.proxy)?;
        let proxy = key.proxy.for_scheme(&key.scheme).map(str::to_owned);
        let direct = match &proxy {
            Some(_) => Some(opts.build_client(tls, &ProxyRoute::Direct)?),
            None => None,
        };
        // `host_str` keeps an IPv6 address in brackets.
        let origin = format!("{}://{}:{}", key.scheme, key.host, key.port);
        tracing::debug!(%origin, "new HTTP client");
        let breaker = self
            .inner
            .breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(origin.clone())
            .or_insert_with(|| Arc::new(Breaker::new(&origin, opts.breaker)))
            .clone();
        let host = Arc::new(Host {
            origin,
            client,
            direct,
            proxy,
            proxy_warned: Mutex::new(None),
            limiter: Limiter::new(key.max_connections),
            breaker,
        });
        self.inner.created.fetch_add(1, Ordering::Relaxed);
        hosts.insert(key, host.clone());
        Ok(host)
    }

    /// The circuit breaker of every origin this pool reached, sorted by
    /// origin.
    pub fn health(&self) -> Vec<BackendHealth> {
        let breakers = self
            .inner
            .breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<BackendHealth> = breakers.values().map(|b| b.health()).collect();
        out.sort_by(|a, b| a.backend.cmp(&b.backend));
        out
    }

    /// How many clients this pool has built: one per host (and settings)
    /// reached, however many `Registry`s and `HttpBlob`s use them.
    pub fn clients_created(&self) -> u64 {
        self.inner.created.load(Ordering::Relaxed)
    }

    /// Each host's load now, sorted by origin.
    pub fn load(&self) -> Vec<HostLoad> {
        let hosts = self.inner.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<HostLoad> = hosts
            .values()
            .map(|h| {
                let (in_flight, waiting) = h.limiter.load();
                HostLoad {
                    origin: h.origin.clone(),
                    max_connections: h.limiter.max(),
                    in_flight,
                    waiting,
                }
            })
            .collect();
        out.sort_by(|a, b| a.origin.cmp(&b.origin));
        out
    }
}

impl fmt::Debug for Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.inner.hosts.lock().map(|h| h.len()).unwrap_or_default();
        f.debug_struct("Hosts").field("clients", &n).finish()
    }
}

impl Host {
    /// Sends the request `build` makes on this host's client. Through a
    /// configured proxy to which no connection can be made (refused,
    /// unreachable, timed out connecting), it is built again and sent
    /// directly: a proxy in front (Dragonfly's daemon, say) that is down
    /// must not take the node's images with it.
    pub(crate) fn send<E>(
        &self,
        build: impl Fn(&Client) -> Result<reqwest::blocking::RequestBuilder, E>,
        send_error: impl Fn(reqwest::Error) -> E,
    ) -> Result<reqwest::blocking::Response, E> {
        let via_proxy = build(&self.client)?.send();
        match (via_proxy, &self.direct) {
            (Err(e), Some(direct)) if e.is_connect() => {
                crate::transport::TOTAL_PROXY_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                // Once per 10 s of a proxy that stays down, not per request.
                let mut last = self.proxy_warned.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    *last = Some(std::time::Instant::now());
                    tracing::warn!(
                        target: "lazypull::backend",
                        origin = %self.origin,
                        proxy = self.proxy.as_deref().unwrap_or(""),
                        "the proxy took no connection ({e}): requests go directly while it does not"
                    );
                }
                drop(last);
                build(direct)?.send().map_err(send_error)
            }
            (r, _) => r.map_err(send_error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn one_client_per_origin_with_the_port_made_explicit() {
        let opts = ClientOptions::default();
        let hosts = &opts.hosts;
        let a = hosts.host(&url("https://Reg.Example/v2/"), &opts).unwrap();
        let b = hosts
            .host(&url("https://reg.example:443/x"), &opts)
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.origin, "https://reg.example:443");
        let plain = hosts.host(&url("http://reg.example/"), &opts).unwrap();
        assert_eq!(plain.origin, "http://reg.example:80");
        let v6 = hosts.host(&url("http://[::1]:5000/"), &opts).unwrap();
        assert_eq!(v6.origin, "http://[::1]:5000");
        assert_eq!(hosts.clients_created(), 3);
        let origins: Vec<_> = hosts.load().into_iter().map(|l| l.origin).collect();
        assert_eq!(
            origins,
            [
                "http://[::1]:5000",
                "http://reg.example:80",
                "https://reg.example:443"
            ]
        );
        assert_eq!(format!("{hosts:?}"), "Hosts { clients: 3 }");
    }

    #[test]
    fn a_client_that_cannot_be_built_is_an_error_every_time_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ClientOptions {
            ca_files: vec![dir.path().join("missing.pem")],
            ..ClientOptions::default()
        };
        for _ in 0..2 {
            let err = opts
                .hosts
                .host(&url("https://h.example/"), &opts)
                .unwrap_err();
            assert!(matches!(err, RegistryError::Setup { .. }), "{err}");
        }
        assert_eq!(opts.hosts.clients_created(), 0);
        assert!(opts.hosts.load().is_empty());
    }
}
