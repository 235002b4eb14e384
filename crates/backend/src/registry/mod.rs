//! A client for OCI distribution registries (`/v2/` API): manifests and blobs
//! by digest, Range reads of blobs, pushes, and the registry's authentication
//! dance (Basic, or Bearer tokens from the realm a `401` names).
//!
//! It owns transport correctness: authentication, redirects, retries, the
//! connection limit, exact-length Range bodies, and the sha256 of every
//! whole blob or manifest it downloads or pushes by digest. It must not
//! decompress or verify the *chunks* of a blob read by range; that is the
//! engine's job.
//!
//! # Connections: one blocking client per host
//!
//! Every `Registry` and [`HttpBlob`](crate::http::HttpBlob) takes its host's
//! client from a [`Hosts`] pool, which [`ClientOptions::hosts`] carries (the
//! daemon builds one `ClientOptions` and clones it; a command builds one per
//! run): one `reqwest::blocking::Client` and one limit of
//! [`ClientOptions::max_connections`] requests in flight per origin (scheme,
//! host, port) and client settings (CA files, timeouts, user agent, the
//! limit). A request holds its slot from sending until its body is read;
//! token requests, redirected requests and upload `PUT`s count against the
//! host whose client sent them. (Before, every `Registry` — one per image in
//! the daemon — and every `HttpBlob` had a client of its own: a runtime
//! thread, a connection pool and a limit each, so the limit was per image or
//! per blob, and ten of them on one host could have ten times as many
//! requests in flight.)
//!
//! The engine stays blocking, over `reqwest`'s blocking client. Fills run on
//! blocking worker threads and the kernel waits for each READ anyway, so
//! going async would buy nothing per request, yet it would mean rewriting
//! [`RangeRead`], the engine's fetch path and every caller. `ureq` would
//! save the runtime thread, but it would change the TLS setup, the redirect
//! and timeout behaviour, the streamed upload body and the error type that
//! [`RegistryError::is_retryable`] classifies — every protocol path, to save
//! one thread per host. Sharing one blocking client per host is the smallest
//! change that makes the limit real: the protocol code is untouched, and the
//! runtime threads go from one per blob to one per host. What it costs: all
//! I/O to one host (TLS included) runs on that host's one runtime thread, as
//! all I/O to one blob already did.
//!
//! # Hosts: mirrors, then the upstream
//!
//! A `Registry` holds one endpoint per host its requests may go to: the
//! mirrors of the registry's containerd `hosts.toml` ([`hosts_toml`], read
//! from [`ClientOptions::hosts_dir`]), in file order, then the upstream.
//! Each endpoint has its own client (its TLS settings are part of the
//! [`Hosts`] key), auth state and credentials. Every operation that reads
//! ([`Registry::get_manifest`], blob downloads, Range reads) walks them per
//! request (`over_hosts`): a mirror once, without retries; its failure is
//! logged, counted and handed on; the upstream last, with retries. Nothing
//! is remembered between requests except that a mirror refusing
//! connections is skipped for a few seconds, and that an upstream that is
//! down (its circuit breaker open, see [`crate::breaker`]) is not asked
//! again until its breaker lets a probe through: requests wait for it, at
//! most [`ClientOptions::outage_timeout`].

mod auth;
mod error;
pub(crate) mod hosts;
pub mod hosts_toml;
mod options;
mod reference;

pub use auth::{docker_config_credentials, docker_config_credentials_with, Credentials, Helpers};
pub use error::RegistryError;
pub use hosts::{HostLoad, Hosts};
pub use hosts_toml::{Capabilities, HostTls};
pub use options::{proxy_from_env, ClientOptions, CredentialLookup};
pub use reference::{validate_digest, Reference};

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::Url;
use sha2::Digest as _;

use crate::retry;
use crate::transport::{self, inc, Permit, Stats};
use auth::{parse_www_authenticate, Challenge};
use hosts::Host;
use lazypull_source::RangeRead;
use reference::{validate_manifest_reference, validate_registry, validate_repository};

/// Media types, from their one owner.
pub use lazypull_oci::media_type;

/// Largest manifest fetched or pushed.
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// Longest token lifetime believed (one day): longer ones are renewed daily,
/// which costs one token request, and keeps `now + lifetime` representable.
const MAX_TOKEN_LIFE_SECS: u64 = 24 * 60 * 60;

/// May a token be asked for at `realm` by a client of the registry at `base`,
/// and with credentials (`with_credentials`)? The rule (the registry's
/// plain-HTTP rule carried over to its token server):
///
/// * an HTTPS realm, on any host: yes, as the distribution spec intends
///   (token servers often live on another host, like `auth.docker.io`);
/// * a plain-HTTP realm only for a registry itself spoken to over plain HTTP
///   (loopback, or declared insecure): an HTTPS registry naming an HTTP realm
///   would downgrade the login, so it is refused;
/// * and then credentials go over plain HTTP only to the registry's own host
///   (any port: a token server beside the registry); to another host, a
///   client with credentials refuses (anonymous clients may ask, having
///   nothing to leak).
pub(crate) fn realm_credentials(
    base: &Url,
    realm: &Url,
    with_credentials: bool,
) -> Result<(), String> {
    if realm.scheme() == "https" {
        return Ok(());
    }
    if base.scheme() != "http" {
        return Err(format!(
            "the registry names token realm {realm}, which is plain HTTP; token realms must be \
             HTTPS unless the registry is loopback or declared insecure"
        ));
    }
    let same_host = match (realm.host_str(), base.host_str()) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    };
    if with_credentials && !same_host {
        return Err(format!(
            "the registry names token realm {realm}, plain HTTP on another host than the \
             registry's: lazypull sends credentials over plain HTTP only to the registry's own \
             host (use an HTTPS realm)"
        ));
    }
    Ok(())
}

/// A manifest as the registry stored it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The exact bytes (their sha256 is `digest`).
    pub bytes: Vec<u8>,
    /// From `Content-Type`, else the manifest's own `mediaType` field, else "".
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
}

/// Counters of one [`Registry`] (or [`HttpBlob`](crate::http::HttpBlob)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestStats {
    /// HTTP requests sent, token requests and retries included.
    pub requests: u64,
    /// Of those, requests with a `Range` header.
    pub range_requests: u64,
    /// Response body bytes received (blobs, manifests, tokens).
    pub bytes_received: u64,
    /// Tries repeated after a retryable failure.
    pub retries: u64,
    /// Operations that returned an error, after any retries.
    pub failures: u64,
    /// Requests a mirror (a `hosts.toml` `[host]`) did not answer, for
    /// which the next host, finally the upstream, was asked instead.
    pub mirror_fallbacks: u64,
    /// Requests the configured proxy ([`ClientOptions::proxy`]) could not
    /// take (no connection to it), sent directly instead (process totals).
    pub proxy_fallbacks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Pull,
    Push,
}

#[derive(Debug)]
enum Scheme {
    /// Nothing learned yet: requests go out without credentials.
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

struct AuthState {
    scheme: Scheme,
    /// Bearer tokens by scope, with the instant they should be renewed.
    tokens: HashMap<String, (String, Instant)>,
}

/// A client for one repository of one registry. Cheap to clone (shared
/// state); `Send + Sync`.
///
/// It uses its host's `reqwest` blocking client from [`ClientOptions::hosts`],
/// which runs its own small runtime: create, use and drop a `Registry` on
/// plain threads (or inside `tokio::task::spawn_blocking` / `block_in_place`),
/// never directly in async code, where building a client or sending panics
/// (debug builds) and the last drop of a host's client blocks while its
/// runtime thread ends.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    /// As given (`host[:port]`), for messages.
    registry: String,
    repository: String,
    /// Where requests go: the mirrors of the registry's `hosts.toml` in
    /// its order, then the upstream (always there, always last).
    endpoints: Vec<Endpoint>,
    /// The `hosts.toml` (or certs directory) they came from, if any.
    hosts_file: Option<PathBuf>,
    opts: ClientOptions,
    stats: Stats,
    /// Asked again for the registry's credentials when they were refused.
    source: std::sync::OnceLock<CredentialSource>,
}

/// Where a registry's credentials come from, asked again when the registry
/// refuses the ones in use (kubelet's newest for the repository, a
/// credential helper's): a long-lived mount outlives credentials that
/// rotate.
pub type CredentialSource = Arc<dyn Fn() -> Option<Credentials> + Send + Sync>;

/// How long a mirror that refused or timed out a connection is skipped
/// before it is tried again.
const MIRROR_DOWN_FOR: Duration = Duration::from_secs(10);

/// One host a registry's requests go to.
struct Endpoint {
    /// The host's client and connection limit, shared with every other
    /// `Registry` and `HttpBlob` of this host in the same [`Hosts`].
    host: Arc<Host>,
    /// `host[:port]`, for messages.
    name: String,
    /// `scheme://host[:port]` the API is spoken to.
    base: String,
    /// The same, parsed: credentials go only to this origin.
    base_url: Url,
    /// The API's path there: `/v2`, or a mirror's own.
    prefix: String,
    caps: Capabilities,
    /// Extra headers (`hosts.toml` `header`).
    headers: Vec<(String, String)>,
    /// `?ns=<registry>` on requests to a host that is not the registry
    /// itself, as containerd sends it (a pull-through cache of several
    /// registries tells them apart by it).
    ns: Option<String>,
    /// This host's own credentials: the registry's for the upstream, the
    /// mirror's own (by its host name) for a mirror. Replaced when the
    /// registry's [credential source](Registry::set_credential_source)
    /// has newer ones.
    creds: Mutex<Option<Credentials>>,
    /// Whether `creds` are the registry's (the upstream, or a mirror that is
    /// the registry's own host): the ones the credential source renews.
    registry_creds: bool,
    auth: Mutex<AuthState>,
    /// A mirror, not the upstream.
    mirror: bool,
    tls: HostTls,
    /// A mirror that could not be connected to is skipped until then.
    down_until: Mutex<Option<Instant>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let up = self.upstream();
        f.debug_struct("Registry")
            .field("base", &up.base)
            .field("repository", &self.inner.repository)
            .field("username", &Self::creds_of(up).map(|c| c.username))
            .field(
                "mirrors",
                &self
                    .inner
                    .endpoints
                    .iter()
                    .filter(|e| e.mirror)
                    .map(|e| e.base.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

type BuildRequest<'a> = &'a dyn Fn(&Client) -> Result<RequestBuilder, RegistryError>;

impl Registry {
    /// A client for `repository` on `registry` (`host[:port]`; `docker.io`
    /// means Docker Hub's API host). Plain HTTP for loopback and
    /// [`ClientOptions::insecure_hosts`], HTTPS otherwise. With
    /// [`ClientOptions::hosts_dir`], the registry's `hosts.toml` there
    /// decides instead (mirrors, `server`, TLS, headers: see
    /// [`hosts_toml`]), read now. Sends no request; each host's client
    /// comes from [`ClientOptions::hosts`] (built there on first use).
    ///
    /// Manifests by tag go to the hosts that may `resolve`, blobs and
    /// manifests by digest to those that may `pull`, in order: a mirror
    /// that fails (any error: unreachable, 5xx, 404, a wrong answer) is
    /// tried once, the reason logged and counted
    /// ([`RequestStats::mirror_fallbacks`]), and the next host asked, the
    /// upstream last (with retries). Pushes go to the upstream only.
    pub fn new(
        registry: &str,
        repository: &str,
        creds: Option<Credentials>,
        opts: &ClientOptions,
    ) -> Result<Registry, RegistryError> {
        let bad = |why: &str| RegistryError::InvalidReference {
            input: format!("{registry}/{repository}"),
            why: why.to_string(),
        };
        validate_registry(registry).map_err(bad)?;
        validate_repository(repository).map_err(bad)?;
        let is_hub = matches!(
            registry.to_ascii_lowercase().as_str(),
            "docker.io" | "index.docker.io"
        );
        let default_host = if is_hub {
            "registry-1.docker.io".to_string()
        } else {
            registry.to_string()
        };
        let config = match &opts.hosts_dir {
            Some(dir) => hosts_toml::load(dir, registry)?,
            None => None,
        };
        let hosts_file = config.as_ref().map(|c| {
            let f = c.dir.join("hosts.toml");
            if f.exists() {
                f
            } else {
                c.dir.clone()
            }
        });
        let entries = match config {
            Some(c) => c.hosts,
            None => vec![hosts_toml::HostEntry {
                scheme: String::new(),
                host: String::new(),
                path: "/v2".into(),
                capabilities: Capabilities::ALL,
                tls: HostTls::default(),
                header: Vec::new(),
                dial_timeout: None,
            }],
        };
        let last = entries.len() - 1;
        let mut endpoints = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let mirror = i != last;
            let (scheme, name) = if e.host.is_empty() {
                (
                    opts.scheme_for(&default_host).to_string(),
                    default_host.clone(),
                )
            } else {
                (e.scheme.clone(), e.host.clone())
            };
            let base = format!("{scheme}://{name}");
            let base_url = Url::parse(&base).map_err(|e| bad(&e.to_string()))?;
            let mut host_opts = opts.clone();
            if let Some(t) = e.dial_timeout {
                host_opts.connect_timeout = t;
            }
            let host = opts.hosts.host_with(&base_url, &host_opts, &e.tls)?;
            let same_as_registry = name.eq_ignore_ascii_case(registry)
                || (is_hub && name.eq_ignore_ascii_case("registry-1.docker.io"));
            let ep_creds = if !mirror || same_as_registry {
                creds.clone()
            } else {
                match &opts.mirror_credentials {
                    None => None,
                    Some(lookup) => (lookup.0)(&name).unwrap_or_else(|err| {
                        tracing::warn!(
                            target: "lazypull::backend",
                            %registry, mirror = %name,
                            "no credentials for mirror {name} ({err}): asking it anonymously"
                        );
                        None
                    }),
                }
            };
            endpoints.push(Endpoint {
                host,
                name,
                base,
                base_url,
                prefix: e.path,
                caps: e.capabilities,
                headers: e.header,
                ns: (!same_as_registry).then(|| registry.to_string()),
                creds: Mutex::new(ep_creds),
                registry_creds: !mirror || same_as_registry,
                auth: Mutex::new(AuthState {
                    scheme: Scheme::Unknown,
                    tokens: HashMap::new(),
                }),
                mirror,
                tls: e.tls,
                down_until: Mutex::new(None),
            });
        }
        Ok(Registry {
            inner: Arc::new(Inner {
                registry: registry.to_string(),
                repository: repository.to_string(),
                endpoints,
                hosts_file,
                opts: opts.clone(),
                stats: Stats::default(),
                source: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Sets where the registry's credentials come from when the ones in
    /// use are refused (a 401 for a request that carried them, or a token
    /// server refusing them): asked then, and if it has different ones, they
    /// replace them and the request authenticates once more with them. Once
    /// per client (later calls are ignored).
    pub fn set_credential_source(&self, source: CredentialSource) {
        let _ = self.inner.source.set(source);
    }

    /// The credentials of `ep` now.
    fn creds_of(ep: &Endpoint) -> Option<Credentials> {
        ep.creds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the credential source again for `ep`'s credentials (the
    /// registry's only); whether they changed.
    fn renew_credentials(&self, ep: &Endpoint) -> bool {
        if !ep.registry_creds {
            return false;
        }
        let Some(source) = self.inner.source.get() else {
            return false;
        };
        let Some(newer) = source() else {
            return false;
        };
        let mut creds = ep.creds.lock().unwrap_or_else(|p| p.into_inner());
        if creds.as_ref() == Some(&newer) {
            return false;
        }
        tracing::info!(
            target: "lazypull::backend",
            registry = %self.inner.registry,
            repository = %self.inner.repository,
            username = %newer.username,
            "the registry refused the credentials in use: authenticating with newer ones"
        );
        *creds = Some(newer);
        drop(creds);
        // Tokens got with the old credentials go with them.
        self.auth_state(ep).tokens.clear();
        true
    }

    /// The upstream: the last host.
    fn upstream(&self) -> &Endpoint {
        self.inner
            .endpoints
            .last()
            .expect("a registry has at least its upstream")
    }

    /// The mirrors (from `hosts.toml`) before the upstream, as
    /// `scheme://host[:port]`, in the order they are tried.
    pub fn mirrors(&self) -> Vec<String> {
        self.inner
            .endpoints
            .iter()
            .filter(|e| e.mirror)
            .map(|e| e.base.clone())
            .collect()
    }

    /// `host[:port]` as given to [`new`](Self::new).
    pub fn registry(&self) -> &str {
        &self.inner.registry
    }

    pub fn repository(&self) -> &str {
        &self.inner.repository
    }

    /// `scheme://host[:port]` of the upstream, where the API is spoken to
    /// when no mirror answers (and for pushes).
    pub fn base_url(&self) -> &str {
        &self.upstream().base
    }

    pub fn stats(&self) -> RequestStats {
        self.inner.stats.snapshot()
    }

    fn url(&self, ep: &Endpoint, tail: &str) -> String {
        let mut u = format!("{}{}/{}/{tail}", ep.base, ep.prefix, self.inner.repository);
        if let Some(ns) = &ep.ns {
            // A validated registry name (`host[:port]`) needs no escaping.
            u.push_str(if tail.contains('?') { "&ns=" } else { "?ns=" });
            u.push_str(ns);
        }
        u
    }

    fn scope(&self, access: Access) -> String {
        let actions = match access {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        };
        format!("repository:{}:{actions}", self.inner.repository)
    }

    fn rejected(&self, ep: &Endpoint) -> RegistryError {
        match &Self::creds_of(ep) {
            None => RegistryError::AuthRequired {
                registry: ep.name.clone(),
            },
            Some(c) => RegistryError::AuthFailed {
                registry: ep.name.clone(),
                username: c.username.clone(),
            },
        }
    }

    fn protocol(&self, ep: &Endpoint, why: String) -> RegistryError {
        RegistryError::Protocol {
            url: ep.base.clone(),
            why,
        }
    }

    fn auth_state<'a>(&self, ep: &'a Endpoint) -> std::sync::MutexGuard<'a, AuthState> {
        ep.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ep` is answered with Basic credentials (a 401 then refuses
    /// the credentials themselves, where under Bearer it is most often a
    /// token that expired).
    fn auth_is_basic(&self, ep: &Endpoint) -> bool {
        matches!(self.auth_state(ep).scheme, Scheme::Basic)
    }

    /// Where a missing piece of `ep`'s TLS configuration goes, for messages.
    fn tls_hint_place(&self, ep: &Endpoint) -> String {
        let file = match &self.inner.hosts_file {
            Some(f) if f.ends_with("hosts.toml") => f.display().to_string(),
            _ => {
                let dir = self
                    .inner
                    .opts
                    .hosts_dir
                    .clone()
                    .unwrap_or_else(|| "/etc/containerd/certs.d".into());
                dir.join(&self.inner.registry)
                    .join("hosts.toml")
                    .display()
                    .to_string()
            }
        };
        if ep.mirror {
            format!("the [host.\"{}\"] table of {file}", ep.base)
        } else {
            file
        }
    }

    /// A failed send, told apart: TLS failures that configuration fixes
    /// get an error naming the host and the missing piece.
    fn send_error(&self, ep: &Endpoint, url: &str, source: reqwest::Error) -> RegistryError {
        let chain = error::error_chain(&source);
        let tls = |why: String, hint: String| RegistryError::Tls {
            host: ep.name.clone(),
            why,
            hint,
        };
        let place = self.tls_hint_place(ep);
        if chain.contains("UnknownIssuer") {
            return tls(
                format!(
                    "its certificate is not signed by a CA lazypull trusts ({})",
                    chain.trim()
                ),
                format!(
                    "configure the registry's CA for it: ca = \"/path/to/ca.pem\" in {place} \
                     (or --ca-file)"
                ),
            );
        }
        if chain.contains("NotValidForName") {
            return tls(
                format!(
                    "its certificate is not valid for the name {} ({chain})",
                    ep.name
                ),
                "use the name the certificate is issued for, or fix the certificate".into(),
            );
        }
        let alert = [
            "CertificateRequired",
            "BadCertificate",
            "HandshakeFailure",
            "UnknownCA",
        ]
        .iter()
        .any(|a| chain.contains(&format!("alert: {a}")) || chain.contains(a));
        if alert && chain.contains("alert") {
            return if ep.tls.client_pairs.is_empty() {
                tls(
                    format!(
                        "the registry requires a client certificate, and none is configured \
                         for it ({chain})"
                    ),
                    format!(
                        "give one: client = [[\"/path/to/cert.pem\", \"/path/to/key.pem\"]] \
                         in {place}"
                    ),
                )
            } else {
                tls(
                    format!(
                        "the registry refused the client certificate {} ({chain})",
                        ep.tls.client_pairs[0].0.display()
                    ),
                    "use a certificate the registry's client CA has signed".into(),
                )
            };
        }
        RegistryError::Transport {
            url: url.to_string(),
            source,
        }
    }

    /// The `Authorization` value for a request needing `access`, fetching a
    /// token if the registry is known to want one.
    fn auth_header(&self, ep: &Endpoint, access: Access) -> Result<Option<String>, RegistryError> {
        let scope = self.scope(access);
        let (realm, service) = {
            let st = self.auth_state(ep);
            match &st.scheme {
                Scheme::Unknown => return Ok(None),
                Scheme::Basic => return Ok(Self::creds_of(ep).map(|c| c.basic_header())),
                Scheme::Bearer { realm, service } => {
                    if let Some((tok, renew)) = st.tokens.get(&scope) {
                        if Instant::now() < *renew {
                            return Ok(Some(format!("Bearer {tok}")));
                        }
                    }
                    (realm.clone(), service.clone())
                }
            }
        };
        let (tok, renew) =
            self.fetch_token(ep, &realm, service.as_deref(), std::slice::from_ref(&scope))?;
        let header = format!("Bearer {tok}");
        self.auth_state(ep).tokens.insert(scope, (tok, renew));
        Ok(Some(header))
    }

    /// Learns from a 401's challenges how to authenticate, and gets a token
    /// if that is the way.
    fn answer_challenge(
        &self,
        ep: &Endpoint,
        challenges: &[Challenge],
        access: Access,
    ) -> Result<(), RegistryError> {
        if let Some(b) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = b
                .param("realm")
                .ok_or_else(|| self.protocol(ep, "Bearer challenge without a realm".into()))?
                .to_string();
            let service = b.param("service").map(str::to_string);
            let scope = self.scope(access);
            let mut scopes = vec![scope.clone()];
            if let Some(s) = b.param("scope") {
                if s != scope {
                    scopes.push(s.to_string());
                }
            }
            let (tok, renew) = self.fetch_token(ep, &realm, service.as_deref(), &scopes)?;
            let mut st = self.auth_state(ep);
            st.scheme = Scheme::Bearer { realm, service };
            st.tokens.insert(scope, (tok, renew));
            Ok(())
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            match &Self::creds_of(ep) {
                None => return Err(self.rejected(ep)),
                Some(c) if c.is_identity_token() => {
                    return Err(RegistryError::IdentityTokenNeedsBearer {
                        registry: ep.name.clone(),
                    })
                }
                Some(_) => {}
            }
            self.auth_state(ep).scheme = Scheme::Basic;
            Ok(())
        } else if Self::creds_of(ep).is_none() {
            Err(self.rejected(ep))
        } else {
            Err(self.protocol(
                ep,
                format!(
                    "HTTP 401 without a Basic or Bearer challenge ({} offered)",
                    challenges
                        .iter()
                        .map(|c| c.scheme.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    }

    /// GET `realm?service=…&scope=…`, with Basic credentials if we have any.
    fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Instant), RegistryError> {
        let mut url = Url::parse(realm)
            .map_err(|e| self.protocol(ep, format!("Bearer realm {realm:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.protocol(ep, format!("Bearer realm {realm:?} is not http(s)")));
        }
        let creds = Self::creds_of(ep);
        realm_credentials(&ep.base_url, &url, creds.is_some())
            .map_err(|why| self.protocol(ep, why))?;
        let identity = creds.as_ref().filter(|c| c.is_identity_token());
        let joined = scopes.join(" ");
        let mut form: Vec<(&str, &str)> = Vec::new();
        if let Some(c) = identity {
            // Docker's identity token is an OAuth2 refresh token: it is
            // exchanged at the realm for an access token by a POST, as the
            // distribution token spec's OAuth2 flow describes.
            form = vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", &c.password),
                ("client_id", "lazypull"),
            ];
            if let Some(s) = service {
                form.push(("service", s));
            }
            form.push(("scope", &joined));
        } else {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
        }
        let build = |client: &reqwest::blocking::Client| {
            Ok::<_, RegistryError>(if identity.is_some() {
                client.post(url.clone()).form(&form)
            } else {
                let mut rb = client.get(url.clone());
                if let Some(c) = &creds {
                    rb = rb.basic_auth(&c.username, Some(&c.password));
                }
                rb
            })
        };
        let url_s = url.to_string();
        let _permit = ep.host.limiter.acquire();
        inc(&self.inner.stats.requests);
        let resp = ep
            .host
            .send(build, |source| self.send_error(ep, &url_s, source))?;
        match resp.status().as_u16() {
            401 => return Err(self.rejected(ep)),
            // An OAuth2 token endpoint refusing a refresh token says 400
            // (invalid_grant).
            400 if identity.is_some() => return Err(self.rejected(ep)),
            403 => {
                return Err(RegistryError::Denied {
                    registry: ep.name.clone(),
                    what: format!("repository {} ({})", self.inner.repository, scopes[0]),
                })
            }
            _ => {}
        }
        let resp = transport::check_status(resp, &url_s, "token", &ep.name)?;
        let body = transport::read_capped(
            resp,
            &url_s,
            MAX_TOKEN_RESPONSE,
            "token response",
            &self.inner.stats,
        )?;
        let (tok, life) = parse_token_response(&body).map_err(|why| RegistryError::Protocol {
            url: url_s.clone(),
            why,
        })?;
        let renew = Instant::now() + life.saturating_sub(Duration::from_secs(10)).max(life / 2);
        Ok((tok, renew))
    }

    /// Sends a request built by `build` (called again for every send, so a
    /// streamed body can be reopened), authenticating as the registry asks.
    /// The permit returned holds a slot of the connection limit while the
    /// body is read. Credentials go only to the registry's own origin.
    fn send(
        &self,
        ep: &Endpoint,
        access: Access,
        url: &str,
        build: BuildRequest<'_>,
    ) -> Result<(Response, Permit), RegistryError> {
        let same_origin = Url::parse(url).is_ok_and(|u| {
            let b = &ep.base_url;
            u.scheme() == b.scheme()
                && u.host_str() == b.host_str()
                && u.port_or_known_default() == b.port_or_known_default()
        });
        let mut challenged = false;
        loop {
            let auth = if same_origin {
                self.auth_header(ep, access)?
            } else {
                None
            };
            let request = |client: &reqwest::blocking::Client| {
                let mut rb = build(client)?;
                if same_origin {
                    for (k, v) in &ep.headers {
                        rb = rb.header(k.as_str(), v.as_str());
                    }
                }
                if let Some(a) = &auth {
                    rb = rb.header(AUTHORIZATION, a);
                }
                Ok(rb)
            };
            let permit = ep.host.limiter.acquire();
            inc(&self.inner.stats.requests);
            let resp = ep
                .host
                .send(request, |source| self.send_error(ep, url, source))?;
            if resp.status().as_u16() != 401 || !same_origin {
                return Ok((resp, permit));
            }
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_www_authenticate)
                .collect();
            drop(resp);
            drop(permit);
            if challenged {
                // Authenticated afresh just now, and refused again.
                return Err(self.rejected(ep));
            }
            challenged = true;
            // A 401 for a request that carried a token (expired or revoked
            // early) or none yet: authenticate again, once. With
            // credentials refused, newer ones from the source (if any) first.
            if auth.is_some() {
                tracing::debug!(
                    target: "lazypull::backend",
                    host = %ep.name, "{url}: HTTP 401 with credentials: authenticating again"
                );
                if self.auth_is_basic(ep) {
                    self.renew_credentials(ep);
                }
            }
            match self.answer_challenge(ep, &challenges, access) {
                // The token server refused the credentials: newer ones?
                Err(RegistryError::AuthFailed { .. }) if self.renew_credentials(ep) => {
                    self.answer_challenge(ep, &challenges, access)?
                }
                r => r?,
            }
        }
    }

    fn retrying<T>(
        &self,
        what: &dyn fmt::Display,
        op: impl FnMut(u32) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let guard = retry::Guard {
            breaker: &self.upstream().host.breaker,
            outage_timeout: self.inner.opts.outage_timeout,
        };
        let r = retry::run(
            &self.inner.opts.retry,
            what,
            &self.inner.stats.retries,
            Some(&guard),
            RegistryError::is_retryable,
            RegistryError::BackendDown,
            op,
        );
        if r.is_err() {
            inc(&self.inner.stats.failures);
        }
        r
    }

    /// Runs `op` against the hosts that `may` allows, in order: a mirror
    /// once, the upstream (last) with retries. A mirror's failure is
    /// logged, counted, and the next host asked; a mirror that could not
    /// be connected to is skipped for [`MIRROR_DOWN_FOR`].
    fn over_hosts<T>(
        &self,
        may: fn(&Capabilities) -> bool,
        what: &dyn fmt::Display,
        mut op: impl FnMut(&Endpoint) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let hosts: Vec<&Endpoint> = self
            .inner
            .endpoints
            .iter()
            .filter(|e| !e.mirror || may(&e.caps))
            .collect();
        let (upstream, mirrors) = hosts.split_last().expect("the upstream is always there");
        for (i, ep) in mirrors.iter().enumerate() {
            let next = mirrors.get(i + 1).unwrap_or(upstream);
            let down = ep
                .down_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| Instant::now() < t);
            if down {
                inc(&self.inner.stats.mirror_fallbacks);
                tracing::debug!(
                    target: "lazypull::backend",
                    registry = %self.inner.registry, mirror = %ep.name,
                    "{what}: mirror {} was unreachable moments ago; asking {}", ep.base, next.base
                );
                continue;
            }
            match op(ep) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let unreachable = matches!(&e, RegistryError::Transport { source, .. }
                        if source.is_connect() || source.is_timeout());
                    if unreachable {
                        *ep.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Instant::now() + MIRROR_DOWN_FOR);
                    }
                    inc(&self.inner.stats.mirror_fallbacks);
                    tracing::warn!(
                        target: "lazypull::backend",
                        registry = %self.inner.registry, mirror = %ep.name,
                        "{what}: mirror {} failed ({e}); asking {}", ep.base, next.base
                    );
                }
            }
        }
        self.retrying(what, |_| op(upstream))
    }

    fn check(
        &self,
        ep: &Endpoint,
        resp: Response,
        url: &str,
        what: &str,
    ) -> Result<Response, RegistryError> {
        transport::check_status(resp, url, what, &ep.name)
    }

    fn describe(&self, kind: &str, reference: &str) -> String {
        format!(
            "{kind} {}/{}{}{reference}",
            self.inner.registry,
            self.inner.repository,
            if reference.contains(':') { "@" } else { ":" }
        )
    }

    /// The manifest (or index) named by a tag or digest. By digest, its
    /// sha256 is checked; by tag, it is checked against the registry's
    /// `Docker-Content-Digest` header when there is one.
    pub fn get_manifest(&self, reference: &str) -> Result<Manifest, RegistryError> {
        validate_manifest_reference(reference)?;
        let what = self.describe("manifest", reference);
        let accept = media_type::MANIFEST_ACCEPT.join(", ");
        let by_digest = reference.contains(':');
        let may: fn(&Capabilities) -> bool = if by_digest { |c| c.pull } else { |c| c.resolve };
        let tail = format!("manifests/{reference}");
        let (bytes, content_type, digest) = self.over_hosts(
            may,
            &format_args!("GET {}", self.url(self.upstream(), &tail)),
            |ep| {
                let url = self.url(ep, &tail);
                let (resp, _permit) = self.send(ep, Access::Pull, &url, &|c| {
                    Ok(c.get(&url).header(ACCEPT, &accept))
                })?;
                let resp = self.check(ep, resp, &url, &what)?;
                let ct = transport::header_str(&resp, &CONTENT_TYPE).map(str::to_string);
                let hd = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let bytes = transport::read_capped(
                    resp,
                    &url,
                    MAX_MANIFEST_SIZE,
                    &what,
                    &self.inner.stats,
                )?;
                // Checked per host: a mirror answering a wrong manifest is
                // a mirror failure like any other.
                let digest = transport::sha256_digest(&bytes);
                let expected = if by_digest {
                    Some(reference.to_string())
                } else {
                    hd.filter(|d| d.starts_with("sha256:"))
                };
                if let Some(expected) = expected {
                    if expected != digest {
                        return Err(RegistryError::DigestMismatch {
                            what: format!("{what} from {}", ep.name),
                            expected,
                            actual: digest,
                        });
                    }
                }
                Ok((bytes, ct, digest))
            },
        )?;
        let media_type = manifest_media_type(content_type.as_deref(), &bytes);
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// The whole blob, its sha256 checked. `progress` gets the number of
    /// bytes received so far. Its size is the server's word, unbounded: where
    /// a descriptor declares the size (anything the daemon fetches), use
    /// [`get_blob_sized`](Self::get_blob_sized).
    pub fn get_blob(&self, digest: &str, progress: &dyn Fn(u64)) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        self.get_blob_to(digest, &mut out, progress)?;
        Ok(out)
    }

    /// The whole blob that a descriptor (whose own digest was checked)
    /// declares to be `size` bytes, its sha256 checked. Nothing past `size`
    /// is read or kept: a `Content-Length` that disagrees, or a body that
    /// runs on, is [`RegistryError::WrongSize`] at once. The caller bounds
    /// `size` (by what it can hold) before calling.
    pub fn get_blob_sized(
        &self,
        digest: &str,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<Vec<u8>, RegistryError> {
        // Grown as bytes arrive (up to `size`), not reserved whole up front.
        let mut out = Vec::with_capacity(size.min(1 << 20) as usize);
        match self.fetch_blob_to(digest, Some(size), &mut out, progress) {
            // Bytes damaged on the way (a proxy, a flaky link) are fetched
            // once more; a registry that keeps sending them fails clearly.
            Err(e @ RegistryError::DigestMismatch { .. }) => {
                tracing::warn!("{e}; fetching it once more");
                out.clear();
                self.fetch_blob_to(digest, Some(size), &mut out, progress)?;
            }
            other => {
                other?;
            }
        }
        Ok(out)
    }

    /// [`get_blob_to`](Self::get_blob_to) for a blob a descriptor declares to
    /// be `size` bytes: as [`get_blob_sized`](Self::get_blob_sized), nothing
    /// past `size` is read.
    pub fn get_blob_to_sized(
        &self,
        digest: &str,
        size: u64,
        w: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<u64, RegistryError> {
        self.fetch_blob_to(digest, Some(size), w, progress)
    }

    /// Streams the whole blob into `w` and returns its size. The sha256 is
    /// checked at the end: on an error `w` may hold part (or, on a mismatch,
    /// all) of the bad data, and the caller must discard it. A transfer that
    /// breaks off is resumed with a Range request where it stopped. `progress`
    /// gets the number of bytes written so far. No size is known, so none is
    /// enforced: where a descriptor declares one, use
    /// [`get_blob_to_sized`](Self::get_blob_to_sized).
    pub fn get_blob_to(
        &self,
        digest: &str,
        w: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<u64, RegistryError> {
        self.fetch_blob_to(digest, None, w, progress)
    }

    fn fetch_blob_to(
        &self,
        digest: &str,
        declared: Option<u64>,
        w: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<u64, RegistryError> {
        validate_digest(digest)?;
        let tail = format!("blobs/{digest}");
        let what = self.describe("blob", digest);
        let mut hasher = sha2::Sha256::new();
        let mut written = 0u64;
        let mut chunk = vec![0u8; 64 * 1024];
        // A transfer that breaks off on one host goes on where it stopped
        // on the next: the bytes of a digest are the same everywhere.
        let upstream_url = self.url(self.upstream(), &tail);
        self.over_hosts(
            |c| c.pull,
            &format_args!("GET {upstream_url}"),
            |ep| {
                let url = self.url(ep, &tail);
                let start = written;
                let (resp, _permit) = self.send(ep, Access::Pull, &url, &|c| {
                    let rb = c.get(&url);
                    Ok(if start > 0 {
                        inc(&self.inner.stats.range_requests);
                        rb.header(RANGE, format!("bytes={start}-"))
                    } else {
                        rb
                    })
                })?;
                let mut resp = self.check(ep, resp, &url, &what)?;
                // Bytes of this response to skip: a server that answers a resume
                // with the whole blob (200) repeats what we already have.
                let mut skip = 0u64;
                match resp.status().as_u16() {
                    200 => skip = start,
                    206 => {
                        let cr = transport::header_str(&resp, &CONTENT_RANGE).unwrap_or("");
                        let first = transport::parse_content_range(cr).and_then(|(r, _)| r);
                        if first.map(|(a, _)| a) != Some(start) {
                            return Err(RegistryError::Protocol {
                                url: url.clone(),
                                why: format!("resuming at byte {start}, got Content-Range {cr:?}"),
                            });
                        }
                    }
                    s => {
                        return Err(RegistryError::Protocol {
                            url: url.clone(),
                            why: format!("unexpected HTTP {s} for a blob"),
                        })
                    }
                }
                let announced = transport::content_length(&resp);
                if let (Some(size), Some(n)) = (declared, announced) {
                    // What this answer should carry: all of it (200, of which
                    // `skip` bytes are had already) or the rest from `start`.
                    let rest = size.saturating_sub(start - skip);
                    if n != rest {
                        return Err(RegistryError::WrongSize {
                            what: what.clone(),
                            declared: size,
                            why: format!(
                                "the server announces a body of {n} bytes (from byte {})",
                                start - skip
                            ),
                        });
                    }
                }
                let mut got = 0u64;
                loop {
                    let n = match resp.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(source) => {
                            return Err(RegistryError::BodyRead {
                                url: url.clone(),
                                source,
                            })
                        }
                    };
                    self.inner.stats.received(n);
                    got += n as u64;
                    let mut data = &chunk[..n];
                    let drop_n = skip.min(n as u64) as usize;
                    skip -= drop_n as u64;
                    data = &data[drop_n..];
                    if data.is_empty() {
                        continue;
                    }
                    if declared.is_some_and(|size| written + data.len() as u64 > size) {
                        return Err(RegistryError::WrongSize {
                            what: what.clone(),
                            declared: declared.unwrap_or_default(),
                            why: "the server sends more bytes".into(),
                        });
                    }
                    hasher.update(data);
                    w.write_all(data).map_err(|source| RegistryError::Io {
                        what: format!("writing {what}"),
                        source,
                    })?;
                    written += data.len() as u64;
                    progress(written);
                }
                if let Some(n) = announced {
                    if got != n {
                        return Err(RegistryError::BodyLength {
                            url: url.clone(),
                            expected: n,
                            got,
                        });
                    }
                }
                if skip > 0 {
                    return Err(RegistryError::Protocol {
                        url: url.clone(),
                        why: format!("the blob got shorter than the {start} bytes already read"),
                    });
                }
                Ok(())
            },
        )?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            inc(&self.inner.stats.failures);
            return Err(RegistryError::DigestMismatch {
                what,
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(written)
    }

    /// The blob's size from a HEAD request, or None if the registry does not
    /// have it.
    pub fn blob_size(&self, digest: &str) -> Result<Option<u64>, RegistryError> {
        self.blob_size_as(digest, Access::Pull)
    }

    fn blob_size_as(&self, digest: &str, access: Access) -> Result<Option<u64>, RegistryError> {
        validate_digest(digest)?;
        let up = self.upstream();
        let url = self.url(up, &format!("blobs/{digest}"));
        let what = self.describe("blob", digest);
        self.retrying(&format_args!("HEAD {url}"), |_| {
            let (resp, _permit) = self.send(up, access, &url, &|c| Ok(c.head(&url)))?;
            if resp.status().as_u16() == 404 {
                return Ok(None);
            }
            let resp = self.check(up, resp, &url, &what)?;
            match transport::content_length(&resp) {
                Some(n) => Ok(Some(n)),
                None => Err(RegistryError::Protocol {
                    url: url.clone(),
                    why: "HEAD of a blob without Content-Length".into(),
                }),
            }
        })
    }

    /// Random access to the blob by Range requests, with retries and at most
    /// [`ClientOptions::max_connections`] requests to this registry's host in
    /// flight (over every user of its [`Hosts`]). `size` is the blob's size (from the manifest); reads past it
    /// fail with `UnexpectedEof` without a request. The contents are not
    /// verified.
    pub fn blob_reader(&self, digest: &str, size: u64) -> Arc<dyn RangeRead> {
        Arc::new(RegistryBlob {
            registry: self.clone(),
            url: self.url(self.upstream(), &format!("blobs/{digest}")),
            digest: digest.to_string(),
            size,
        })
    }

    fn read_range(
        &self,
        upstream_url: &str,
        digest: &str,
        buf: &mut [u8],
        off: u64,
        size: u64,
    ) -> Result<(), RegistryError> {
        validate_digest(digest)?;
        let last = off + buf.len() as u64 - 1;
        let what = self.describe("blob", digest);
        let bytes = buf.len() as u64;
        let deadline = self.inner.opts.deadline_for(bytes);
        let tail = format!("blobs/{digest}");
        self.over_hosts(
            |c| c.pull,
            &format_args!("GET {upstream_url} bytes {off}-{last}"),
            |ep| {
                let url = &self.url(ep, &tail);
                transport::within_deadline(url, bytes, deadline, || {
                    let (resp, _permit) = self.send(ep, Access::Pull, url, &|c| {
                        inc(&self.inner.stats.range_requests);
                        Ok(c.get(url)
                            .header(RANGE, format!("bytes={off}-{last}"))
                            .timeout(deadline))
                    })?;
                    let resp = self.check(ep, resp, url, &what)?;
                    transport::read_range_body(resp, url, &mut *buf, off, size, &self.inner.stats)
                })
            },
        )
    }

    /// Uploads a blob unless the registry has it already (then `Ok(false)`).
    /// `open` gives the `size` bytes whose sha256 is `digest`; it is called
    /// again for every try. `progress` gets the number of bytes sent so far
    /// in the current try (called from a helper thread).
    pub fn push_blob(
        &self,
        digest: &str,
        size: u64,
        open: &dyn Fn() -> io::Result<Box<dyn Read + Send>>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<bool, RegistryError> {
        validate_digest(digest)?;
        if self.blob_size_as(digest, Access::Push)?.is_some() {
            return Ok(false);
        }
        let what = self.describe("blob", digest);
        let up = self.upstream();
        let start_url = self.url(up, "blobs/uploads/");
        // Uploads may take longer than one request timeout: allow for
        // 256 KiB/s on top of it.
        let timeout = self.inner.opts.request_timeout + Duration::from_secs(size / (256 << 10));
        let (tx, rx) = mpsc::channel::<u64>();
        let finished = AtomicBool::new(false);
        std::thread::scope(|s| {
            let finished = &finished;
            s.spawn(move || loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(n) => progress(n),
                    Err(mpsc::RecvTimeoutError::Timeout) if !finished.load(Ordering::Acquire) => {}
                    Err(_) => break,
                }
            });
            let r = self.retrying(&format_args!("upload of {what}"), |_| {
                let (resp, permit) = self.send(up, Access::Push, &start_url, &|c| {
                    Ok(c.post(&start_url).header(CONTENT_LENGTH, "0"))
                })?;
                let resp = self.check(up, resp, &start_url, &format!("upload of {what}"))?;
                if resp.status().as_u16() != 202 {
                    return Err(RegistryError::Protocol {
                        url: start_url.clone(),
                        why: format!(
                            "starting an upload answered HTTP {}, not 202",
                            resp.status()
                        ),
                    });
                }
                let loc = transport::header_str(&resp, &LOCATION).ok_or_else(|| {
                    RegistryError::Protocol {
                        url: start_url.clone(),
                        why: "upload started without a Location".into(),
                    }
                })?;
                let mut put = resp.url().join(loc).map_err(|e| RegistryError::Protocol {
                    url: start_url.clone(),
                    why: format!("bad upload Location {loc:?}: {e}"),
                })?;
                drop(resp);
                drop(permit);
                put.query_pairs_mut().append_pair("digest", digest);
                let put_url = put.to_string();
                let (resp, _permit) = self.send(up, Access::Push, &put_url, &|c| {
                    let reader = open().map_err(|source| RegistryError::Io {
                        what: format!("opening {what} for upload"),
                        source,
                    })?;
                    let body = Body::sized(
                        CountingReader {
                            inner: reader,
                            sent: 0,
                            progress: tx.clone(),
                        },
                        size,
                    );
                    Ok(c.put(put.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .timeout(timeout)
                        .body(body))
                })?;
                let resp = self.check(up, resp, &put_url, &format!("upload of {what}"))?;
                if let Some(d) = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                {
                    if d != digest {
                        return Err(RegistryError::DigestMismatch {
                            what: format!("upload of {what}"),
                            expected: digest.to_string(),
                            actual: d.to_string(),
                        });
                    }
                }
                Ok(true)
            });
            drop(tx);
            finished.store(true, Ordering::Release);
            r
        })
    }

    /// Stores a manifest under `tag` (or a digest) and returns its digest.
    pub fn put_manifest(
        &self,
        tag: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String, RegistryError> {
        validate_manifest_reference(tag)?;
        let what = self.describe("manifest", tag);
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(RegistryError::TooLarge {
                what,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let digest = transport::sha256_digest(bytes);
        if tag.contains(':') && tag != digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: tag.to_string(),
                actual: digest,
            });
        }
        let up = self.upstream();
        let url = self.url(up, &format!("manifests/{tag}"));
        self.retrying(&format_args!("PUT {url}"), |_| {
            let (resp, _permit) = self.send(up, Access::Push, &url, &|c| {
                Ok(c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(bytes.to_vec()))
            })?;
            let resp = self.check(up, resp, &url, &what)?;
            if let Some(d) = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
            {
                if d.starts_with("sha256:") && d != digest {
                    return Err(RegistryError::DigestMismatch {
                        what: what.clone(),
                        expected: digest.clone(),
                        actual: d.to_string(),
                    });
                }
            }
            Ok(())
        })?;
        Ok(digest)
    }
}

/// The body of an upload: counts what is sent, for progress.
struct CountingReader {
    inner: Box<dyn Read + Send>,
    sent: u64,
    progress: mpsc::Sender<u64>,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.sent += n as u64;
            let _ = self.progress.send(self.sent);
        }
        Ok(n)
    }
}

/// A registry blob read by Range requests.
struct RegistryBlob {
    registry: Registry,
    url: String,
    digest: String,
    size: u64,
}

impl fmt::Debug for RegistryBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryBlob")
            .field("url", &self.url)
            .field("size", &self.size)
            .finish()
    }
}

impl RangeRead for RegistryBlob {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let context = || {
            format!(
                "blob {} in {}/{}",
                self.digest, self.registry.inner.registry, self.registry.inner.repository
            )
        };
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(RegistryError::OutOfRange {
                what: "read".into(),
                off,
                len,
                size: self.size,
            }
            .into_io(&context()));
        }
        self.registry
            .read_range(&self.url, &self.digest, buf, off, self.size)
            .map_err(|e| e.into_io(&context()))
    }
}

/// A token endpoint's answer (distribution's token spec: `token` or OAuth2's
/// `access_token`, and `expires_in`): the token and how long it lives (60 s
/// when unsaid; at least 1 s, at most [`MAX_TOKEN_LIFE_SECS`]), or why the
/// answer is unusable.
fn parse_token_response(body: &[u8]) -> Result<(String, Duration), String> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    let t: TokenResponse = serde_json::from_slice(body)
        .map_err(|e| format!("token response is not valid JSON: {e}"))?;
    let tok = t
        .token
        .filter(|t| !t.is_empty())
        .or(t.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| "token response holds neither token nor access_token".to_string())?;
    // The spec's default lifetime is 60 s. A lifetime past MAX_TOKEN_LIFE
    // counts as that much: an `Instant` cannot hold 2^63 s from now (adding
    // it panics).
    let life = Duration::from_secs(t.expires_in.unwrap_or(60).clamp(1, MAX_TOKEN_LIFE_SECS));
    Ok((tok, life))
}

/// A manifest's media type: its `Content-Type` (parameters dropped), or,
/// when that is missing or generic JSON / text, the document's own
/// `mediaType`; empty if neither says.
fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
    let media_type = content_type
        .map(|ct| ct.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    if media_type.is_empty() || media_type == "application/json" || media_type == "text/plain" {
        return serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
            .unwrap_or_default();
    }
    media_type
}

/// The parsers behind the registry client, for the fuzz targets in `fuzz/`
/// (not an API: they take what a registry, a `WWW-Authenticate` header or a
/// docker config file holds, and return plain values).
#[doc(hidden)]
pub mod fuzzing {
    use std::time::Duration;

    pub use super::auth::ConfigAnswer;

    /// A token endpoint's answer: the token and its lifetime.
    pub fn token_response(body: &[u8]) -> Result<(String, Duration), String> {
        super::parse_token_response(body)
    }

    /// A manifest's media type from its `Content-Type` and bytes.
    pub fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
        super::manifest_media_type(content_type, bytes)
    }

    /// `WWW-Authenticate` challenges: `(scheme, [(name, value)])`.
    pub fn www_authenticate(value: &str) -> Vec<(String, Vec<(String, String)>)> {
        super::parse_www_authenticate(value)
            .into_iter()
            .map(|c| (c.scheme, c.params))
            .collect()
    }

    /// What a docker config file (`~/.docker/config.json`) says for
    /// `registry`: its `auths` entry's `(username, password)`, and the
    /// credential helper to ask.
    pub fn docker_config(text: &[u8], registry: &str) -> Result<ConfigAnswer, String> {
        super::auth::fuzz_credentials_from_config(text, registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers_and_their_lifetimes() {
        let life =
            |body: &str| parse_token_response(body.as_bytes()).map(|(t, l)| (t, l.as_secs()));
        assert_eq!(life(r#"{"token":"t"}"#), Ok(("t".into(), 60)));
        assert_eq!(
            life(r#"{"token":"","access_token":"a","expires_in":0}"#),
            Ok(("a".into(), 1))
        );
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":18446744073709551615}"#),
            Ok(("a".into(), MAX_TOKEN_LIFE_SECS))
        );
        assert!(life(r#"{"token":""}"#).unwrap_err().contains("neither"));
        assert!(life("[").unwrap_err().contains("not valid JSON"));
        assert!(life(r#"{"expires_in":-1,"token":"t"}"#).is_err());
    }

    #[test]
    fn manifest_media_types() {
        let doc = br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#;
        assert_eq!(
            manifest_media_type(Some("application/vnd.oci.image.manifest.v1+json; x=y"), doc),
            "application/vnd.oci.image.manifest.v1+json"
        );
        for ct in [
            None,
            Some("application/json; charset=utf-8"),
            Some("text/plain"),
            Some(" "),
        ] {
            assert_eq!(
                manifest_media_type(ct, doc),
                "application/vnd.oci.image.index.v1+json"
            );
        }
        assert_eq!(manifest_media_type(None, b"not json"), "");
    }

    #[test]
    fn token_realms_follow_the_plain_http_rule() {
        let u = |s: &str| Url::parse(s).unwrap();
        let https_reg = u("https://reg.example.com");
        let http_reg = u("http://127.0.0.1:5000");
        // HTTPS realms: anywhere, with credentials.
        for base in [&https_reg, &http_reg] {
            assert_eq!(
                realm_credentials(base, &u("https://auth.example.org/t"), true),
                Ok(())
            );
        }
        // An HTTPS registry never names a plain-HTTP realm, not even its own host.
        for creds in [true, false] {
            let err = realm_credentials(&https_reg, &u("http://reg.example.com/t"), creds);
            assert!(err.unwrap_err().contains("must be HTTPS"));
        }
        // A plain-HTTP registry: its own host (any port) gets credentials,
        // another host only anonymous token requests.
        assert_eq!(
            realm_credentials(&http_reg, &u("http://127.0.0.1:5001/t"), true),
            Ok(())
        );
        assert_eq!(
            realm_credentials(&http_reg, &u("http://other.lan/t"), false),
            Ok(())
        );
        let err = realm_credentials(&http_reg, &u("http://other.lan/t"), true).unwrap_err();
        assert!(
            err.contains("http://other.lan/t") && err.contains("own host"),
            "{err}"
        );
    }

    #[test]
    fn clients_are_send_and_sync_and_debug_hides_secrets() {
        fn send_sync<T: Send + Sync + fmt::Debug>() {}
        send_sync::<Registry>();
        send_sync::<crate::http::HttpBlob>();
        let reg = Registry::new(
            "127.0.0.1:5000",
            "a/b",
            Some(Credentials {
                username: "u".into(),
                password: "hunter2".into(),
            }),
            &ClientOptions::default(),
        )
        .unwrap();
        let dbg = format!("{reg:?}");
        assert!(
            dbg.contains("http://127.0.0.1:5000") && !dbg.contains("hunter2"),
            "{dbg}"
        );
        let hub = Registry::new(
            "docker.io",
            "library/alpine",
            None,
            &ClientOptions::default(),
        )
        .unwrap();
        assert_eq!(hub.base_url(), "https://registry-1.docker.io");
        assert!(Registry::new("h.io", "Bad", None, &ClientOptions::default()).is_err());
    }
}
