//! How the network backends connect: TLS roots, timeouts, plain-HTTP hosts.

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use super::hosts_toml::HostTls;
use super::{Credentials, Hosts, RegistryError};
use crate::breaker::BreakerPolicy;
use crate::retry::RetryPolicy;

/// Connection settings shared by [`Registry`](super::Registry) and
/// [`HttpBlob`](crate::http::HttpBlob), and the clients they connect with
/// ([`hosts`](Self::hosts)): build one `ClientOptions` per owner (the daemon,
/// a command) and clone it, so every client of one host is one client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Registries (`host` or `host:port`) spoken to over plain HTTP. An entry
    /// without a port matches the host on any port. Loopback hosts
    /// (`localhost`, `127.0.0.0/8`, `[::1]`) always use plain HTTP, as docker
    /// does.
    pub insecure_hosts: Vec<String>,
    /// Extra PEM files of trusted root certificates (besides the built-in
    /// web PKI roots).
    pub ca_files: Vec<PathBuf>,
    /// Limit for establishing a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Limit for sending a request and for each read of a response body.
    /// Default 30 s. Uploads get extra time in proportion to their size;
    /// Range requests have their whole deadline instead
    /// ([`deadline_for`](Self::deadline_for): reqwest's blocking client has
    /// one timeout per request, which bounds the whole exchange).
    pub request_timeout: Duration,
    /// A Range request must be answered completely within this fixed
    /// minimum plus its bytes at [`min_throughput`](Self::min_throughput)
    /// ([`range_deadline`](Self::range_deadline)): a server that drips its
    /// answer (a byte now and then, each within `request_timeout`) is cut off
    /// and the read retried like any other transient failure. Default 30 s.
    pub range_deadline: Duration,
    /// The slowest transfer, in bytes per second, that a Range request may
    /// take beyond [`range_deadline`](Self::range_deadline). Default 64 KiB/s.
    pub min_throughput: u64,
    pub retry: RetryPolicy,
    /// When a host counts as down and how often it is probed then (one
    /// breaker per origin in [`hosts`](Self::hosts), built with the options
    /// of its first user).
    pub breaker: BreakerPolicy,
    /// How long a request waits for a host that is down (its breaker open)
    /// to come back before it fails with [`RegistryError::BackendDown`],
    /// counted from the moment the request began or the host went down,
    /// whichever was first (so once an outage is that old, requests fail at
    /// once, but for the probe); None: until it is back. Default 30 s.
    pub outage_timeout: Option<Duration>,
    /// An HTTP proxy every request goes through (`http://host:port`;
    /// Dragonfly's daemon is used this way), but for hosts `NO_PROXY` names.
    /// When no connection to it can be made, the request is sent directly
    /// (logged, counted in [`RequestStats::proxy_fallbacks`](super::RequestStats)).
    /// None: the environment's, for each request by the scheme of its URL
    /// (redirects included; [`proxy_from_env`]: `https_proxy`/`HTTPS_PROXY` for https,
    /// `http_proxy`/`HTTP_PROXY` for http, else `all_proxy`/`ALL_PROXY`),
    /// with the same fallback; `NO_PROXY` is honoured either way.
    pub proxy: Option<String>,
    /// Most requests in flight at once to one host, over every
    /// [`Registry`](super::Registry) and [`HttpBlob`](crate::http::HttpBlob)
    /// of that host sharing [`hosts`](Self::hosts) (token requests and
    /// redirects count against the host that sent them). Default 8.
    pub max_connections: usize,
    pub user_agent: String,
    /// Where the HTTP clients live: one per host, built on first use. Clones
    /// of these options share it; [`Default`] starts an empty one.
    pub hosts: Hosts,
    /// containerd's registry host directory (`certs.d`, whose
    /// `<host>/hosts.toml` files declare mirrors, TLS and headers per
    /// registry; see [`hosts_toml`](super::hosts_toml)). None: not read.
    pub hosts_dir: Option<PathBuf>,
    /// Credentials for the mirrors a `hosts.toml` declares, by mirror host
    /// (`host[:port]`): a registry's own credentials never go to its
    /// mirrors. None: mirrors are asked anonymously.
    pub mirror_credentials: Option<CredentialLookup>,
}

/// Credentials of a host (`host[:port]`), looked up when needed.
#[derive(Clone)]
pub struct CredentialLookup(
    #[allow(clippy::type_complexity)]
    pub  std::sync::Arc<dyn Fn(&str) -> Result<Option<Credentials>, RegistryError> + Send + Sync>,
);

impl std::fmt::Debug for CredentialLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialLookup")
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_hosts: Vec::new(),
            ca_files: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            range_deadline: Duration::from_secs(30),
            min_throughput: 64 << 10,
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            outage_timeout: Some(Duration::from_secs(30)),
            proxy: None,
            max_connections: 8,
            user_agent: concat!("lazypull/", env!("CARGO_PKG_VERSION")).to_string(),
            hosts: Hosts::new(),
            hosts_dir: None,
            mirror_credentials: None,
        }
    }
}

/// The proxy the environment names for URLs of `scheme` (`http` or
/// `https`), as curl and reqwest read it: the lower-case variable first,
/// empty ones ignored, `http://` assumed when a value has no scheme.
pub fn proxy_from_env(scheme: &str) -> Option<String> {
    proxy_from(scheme, |name| std::env::var(name).ok())
}

/// Which proxy a client sends each request through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) enum ProxyRoute {
    /// None: every request goes directly.
    #[default]
    Direct,
    /// Every request, whatever its scheme, through this proxy
    /// ([`ClientOptions::proxy`]).
    All(String),
    /// The environment's: each request by the scheme of its own URL, so a
    /// redirect to the other scheme (an `https` registry sending a blob to
    /// `http` storage, say) takes that scheme's proxy, or none, as curl
    /// does.
    ByScheme {
        http: Option<String>,
        https: Option<String>,
    },
}

impl ProxyRoute {
    /// The route of clients built with `opts`: its `proxy`, else the
    /// environment's ([`proxy_from_env`]).
    pub(crate) fn of(opts: &ClientOptions) -> ProxyRoute {
        ProxyRoute::new(
            opts.proxy.as_deref(),
            proxy_from_env("http"),
            proxy_from_env("https"),
        )
    }

    fn new(configured: Option<&str>, http: Option<String>, https: Option<String>) -> ProxyRoute {
        match (configured, http, https) {
            (Some(p), _, _) => ProxyRoute::All(p.to_owned()),
            (None, None, None) => ProxyRoute::Direct,
            (None, http, https) => ProxyRoute::ByScheme { http, https },
        }
    }

    /// The proxy a request to a URL of `scheme` goes through, if any.
    pub(crate) fn for_scheme(&self, scheme: &str) -> Option<&str> {
        match self {
            ProxyRoute::Direct => None,
            ProxyRoute::All(p) => Some(p),
            ProxyRoute::ByScheme { http, https } => match scheme {
                "https" => https.as_deref(),
                _ => http.as_deref(),
            },
        }
    }
}

fn proxy_from(scheme: &str, var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let own = match scheme {
        "https" => ["https_proxy", "HTTPS_PROXY"],
        _ => ["http_proxy", "HTTP_PROXY"],
    };
    own.iter()
        .chain(["all_proxy", "ALL_PROXY"].iter())
        .find_map(|name| var(name).filter(|v| !v.trim().is_empty()))
        .map(|v| {
            let v = v.trim().to_owned();
            if v.contains("://") {
                v
            } else {
                format!("http://{v}")
            }
        })
}

impl ClientOptions {
    /// The whole time a Range request of `bytes` may take, from sending it to
    /// the end of its body: [`range_deadline`](Self::range_deadline) plus
    /// `bytes` at [`min_throughput`](Self::min_throughput) (0 counts as 1).
    pub fn deadline_for(&self, bytes: u64) -> Duration {
        let per_byte = 1.0 / self.min_throughput.max(1) as f64;
        self.range_deadline
            .saturating_add(Duration::from_secs_f64((bytes as f64 * per_byte).min(1e12)))
    }

    /// `"http"` for loopback and insecure hosts, `"https"` for all others.
    /// `host` is `host[:port]`, an IPv6 address in brackets.
    pub fn scheme_for(&self, host: &str) -> &'static str {
        let (name, _) = split_host_port(host);
        let insecure = self.insecure_hosts.iter().any(|h| {
            h.eq_ignore_ascii_case(host)
                || (split_host_port(h).1.is_none() && h.eq_ignore_ascii_case(name))
        });
        if insecure || is_loopback(name) {
            "http"
        } else {
            "https"
        }
    }

    /// A new client with these settings for a host with `tls`, sending its
    /// requests by `route` (but for the hosts `NO_PROXY` names). Only
    /// [`Hosts`] calls it: everyone else gets the host's shared client from
    /// there.
    pub(crate) fn build_client(
        &self,
        tls: &HostTls,
        route: &ProxyRoute,
    ) -> Result<reqwest::blocking::Client, RegistryError> {
        let checked = |made: reqwest::Result<reqwest::Proxy>, url: &str| {
            made.map(|p| p.no_proxy(reqwest::NoProxy::from_env()))
                .map_err(|e| RegistryError::Setup {
                    why: format!("invalid proxy {url:?}: {e}"),
                })
        };
        // `no_proxy` first: no proxy reqwest would find on its own, only
        // those added here.
        let mut b = reqwest::blocking::Client::builder().no_proxy();
        match route {
            ProxyRoute::Direct => {}
            ProxyRoute::All(url) => b = b.proxy(checked(reqwest::Proxy::all(url), url)?),
            ProxyRoute::ByScheme { http, https } => {
                if let Some(url) = http {
                    b = b.proxy(checked(reqwest::Proxy::http(url), url)?);
                }
                if let Some(url) = https {
                    b = b.proxy(checked(reqwest::Proxy::https(url), url)?);
                }
            }
        }
        let mut b = b
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .user_agent(self.user_agent.clone())
            .redirect(reqwest::redirect::Policy::limited(5))
            .pool_max_idle_per_host(self.max_connections.max(1));
        for path in self.ca_files.iter().chain(&tls.ca_files) {
            let pem = std::fs::read(path).map_err(|e| RegistryError::Setup {
                why: format!("cannot read CA file {}: {e}", path.display()),
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::Setup {
                    why: format!("CA file {} is not valid PEM: {e}", path.display()),
                })?;
            if certs.is_empty() {
                return Err(RegistryError::Setup {
                    why: format!("CA file {} holds no certificate", path.display()),
                });
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if tls.client_pairs.len() > 1 {
            tracing::warn!(
                target: "lazypull::backend",
                "{} client certificates are configured for one host; lazypull presents the \
                 first, {}",
                tls.client_pairs.len(),
                tls.client_pairs[0].0.display()
            );
        }
        if let Some((cert, key)) = tls.client_pairs.first() {
            let mut pem = std::fs::read(cert).map_err(|e| RegistryError::Setup {
                why: format!("cannot read client certificate {}: {e}", cert.display()),
            })?;
            if let Some(key) = key {
                let k = std::fs::read(key).map_err(|e| RegistryError::Setup {
                    why: format!("cannot read client key {}: {e}", key.display()),
                })?;
                pem.push(b'\n');
                pem.extend_from_slice(&k);
            }
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| RegistryError::Setup {
                why: format!(
                    "client certificate {}{} is not a PEM certificate and private key: {e}",
                    cert.display(),
                    key.as_ref()
                        .map(|k| format!(" with key {}", k.display()))
                        .unwrap_or_default()
                ),
            })?;
            // reqwest's rustls client holds one identity.
            b = b.identity(id);
        }
        if tls.skip_verify {
            b = b.danger_accept_invalid_certs(true);
        }
        b.build()
            .map_err(|e| RegistryError::Setup { why: e.to_string() })
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into host (brackets removed) and port.
pub(crate) fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let port = rest[end + 1..].strip_prefix(':');
            return (&rest[..end], port);
        }
        return (s, None);
    }
    match s.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((h, _)) if h.contains(':') => (s, None),
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    }
}

fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => a.is_loopback(),
        Ok(IpAddr::V6(a)) => a == Ipv6Addr::LOCALHOST,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environments_proxy_is_read_by_scheme_as_curl_reads_it() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let vars = env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "lower:2"),
            ("HTTP_PROXY", " "),
            ("ALL_PROXY", "http://all:3"),
        ]);
        assert_eq!(proxy_from("https", vars).as_deref(), Some("http://lower:2"));
        assert_eq!(
            proxy_from("http", vars).as_deref(),
            Some("http://all:3"),
            "an empty HTTP_PROXY is none: ALL_PROXY then"
        );
        assert_eq!(proxy_from("http", env(&[])), None);
    }

    #[test]
    fn a_configured_proxy_takes_every_scheme_the_environments_each_its_own() {
        let some = |s: &str| Some(s.to_owned());
        let all = ProxyRoute::new(Some("http://p:1"), some("http://e:2"), None);
        assert_eq!(all, ProxyRoute::All("http://p:1".into()));
        assert_eq!(all.for_scheme("http"), Some("http://p:1"));
        assert_eq!(all.for_scheme("https"), Some("http://p:1"));
        let env = ProxyRoute::new(None, None, some("http://s:3"));
        assert_eq!(env.for_scheme("http"), None);
        assert_eq!(env.for_scheme("https"), Some("http://s:3"));
        assert_eq!(ProxyRoute::new(None, None, None), ProxyRoute::Direct);
        assert_eq!(ProxyRoute::Direct.for_scheme("https"), None);
    }

    /// One request line (or CONNECT line) a listener received, or None when
    /// nothing connected within the wait.
    fn first_line_received(listener: std::net::TcpListener, answer: String) -> Option<String> {
        use std::io::{BufRead, BufReader, Write};
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (stream, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => return None,
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
        }
        (&stream).write_all(answer.as_bytes()).unwrap();
        Some(first.trim_end().to_owned())
    }

    #[test]
    fn a_redirect_to_the_other_scheme_takes_that_schemes_environment_proxy() {
        // An http origin with no proxy of its own redirects to https; the
        // environment names a proxy for https only. Choosing one proxy by
        // the origin's scheme (as before) sent the redirected request
        // directly, past the https proxy.
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (origin, https_target, https_proxy) = (bind(), bind(), bind());
        let target_addr = https_target.local_addr().unwrap();
        let origin_url = format!("http://{}/blob", origin.local_addr().unwrap());
        let route = ProxyRoute::new(
            None,
            None,
            Some(format!("http://{}", https_proxy.local_addr().unwrap())),
        );
        let client = ClientOptions::default()
            .build_client(&HostTls::default(), &route)
            .unwrap();
        let redirect = format!(
            "HTTP/1.1 302 Found\r\nLocation: https://{target_addr}/blob\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        std::thread::scope(|s| {
            let origin = s.spawn(move || first_line_received(origin, redirect));
            let proxy = s.spawn(move || {
                first_line_received(https_proxy, "HTTP/1.1 502 Bad Gateway\r\n\r\n".into())
            });
            // The proxy refuses the tunnel: the request fails, which is not
            // what this test is about.
            let _ = client.get(&origin_url).send();
            assert_eq!(
                origin.join().unwrap().as_deref(),
                Some("GET /blob HTTP/1.1")
            );
            assert_eq!(
                proxy.join().unwrap(),
                Some(format!("CONNECT {target_addr} HTTP/1.1")),
                "the redirected https request did not go through the https proxy"
            );
            // A direct connection, had one been made, waits in the accept
            // queue.
            https_target.set_nonblocking(true).unwrap();
            assert!(
                https_target.accept().is_err(),
                "the redirected https request went directly"
            );
        });
    }

    #[test]
    fn loopback_and_insecure_hosts_use_plain_http() {
        let opts = ClientOptions {
            insecure_hosts: vec!["reg.lan:5000".into(), "other.lan".into()],
            ..ClientOptions::default()
        };
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
            "[::1]",
            "reg.lan:5000",
            "other.lan",
            "other.lan:1234",
        ] {
            assert_eq!(opts.scheme_for(h), "http", "{h}");
        }
        for h in [
            "reg.lan",
            "reg.lan:5001",
            "ghcr.io",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example.com",
        ] {
            assert_eq!(opts.scheme_for(h), "https", "{h}");
        }
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("a.b:5000"), ("a.b", Some("5000")));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:5000"), ("::1", Some("5000")));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
    }

    #[test]
    fn unreadable_or_empty_ca_files_are_setup_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        for path in [dir.path().join("missing.pem"), empty] {
            let opts = ClientOptions {
                ca_files: vec![path.clone()],
                ..ClientOptions::default()
            };
            let err = opts
                .build_client(&HostTls::default(), &ProxyRoute::Direct)
                .unwrap_err();
            assert!(matches!(err, RegistryError::Setup { .. }), "{err}");
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        }
    }
}
