//! The error type of the network backends, with its retry and errno judgements.

use std::io;

/// Why a registry or HTTP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {input:?}: {why}")]
    InvalidReference { input: String, why: String },

    #[error("invalid digest {digest:?}: {why}")]
    InvalidDigest { digest: String, why: &'static str },

    #[error("invalid URL {url:?}: {why}")]
    InvalidUrl { url: String, why: String },

    #[error(
        "registry {registry} requires authentication. Give credentials with \
         --username and --password-stdin, with the environment variables \
         LAZYPULL_REGISTRY_USER and LAZYPULL_REGISTRY_PASSWORD, or in a docker \
         config file ($DOCKER_CONFIG/config.json or ~/.docker/config.json, as \
         `docker login {registry}` writes it); under Kubernetes, kubelet's \
         credentials reach the daemon when kubelet pulls through \
         `lazypull cri-proxy` and are held in memory only, so after a node \
         reboot an image already on the node needs kubelet to pull it again \
         (imagePullPolicy: Always, or remove the image)"
    )]
    AuthRequired { registry: String },

    #[error(
        "registry {registry} rejected the credentials of user {username:?}: \
         check the username and password (or token)"
    )]
    AuthFailed { registry: String, username: String },

    #[error(
        "registry {registry} denied access to {what} (HTTP 403): the credentials lack permission"
    )]
    Denied { registry: String, what: String },

    #[error("{what} not found")]
    NotFound { what: String },

    #[error("{url} answered HTTP {status}: {body_excerpt}")]
    Status {
        url: String,
        status: u16,
        body_excerpt: String,
    },

    #[error("{what}: digest mismatch, expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("request to {url} failed: {}", error_chain(.source))]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("reading the response body from {url} failed: {}", error_chain(.source))]
    BodyRead {
        url: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "{url}: the answer to a Range request of {bytes} bytes did not arrive within its \
         deadline of {:.1} s (the fixed minimum plus the bytes at the configured minimum \
         throughput): the server is too slow or stalled", deadline.as_secs_f64()
    )]
    DeadlineExceeded {
        url: String,
        bytes: u64,
        deadline: std::time::Duration,
    },

    #[error("{url}: response body has the wrong length: expected {expected} bytes, got {got}")]
    BodyLength {
        url: String,
        expected: u64,
        /// What arrived; for a body that ran on, the expected size plus one.
        got: u64,
    },

    /// Refused without a request: the backend's circuit breaker is open and
    /// the caller's outage timeout passed (see [`crate::breaker`]).
    #[error("{0}")]
    BackendDown(crate::breaker::BackendDown),

    #[error("{url}: unexpected response: {why}")]
    Protocol { url: String, why: String },

    #[error("{what}: {off}+{len} is past the end (size {size})")]
    OutOfRange {
        what: String,
        off: u64,
        len: u64,
        size: u64,
    },

    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },

    /// A blob whose body is not the size its (digest-checked) descriptor
    /// declares: refused as soon as that shows, before more is read.
    #[error("{what}: {why}, but its descriptor declares {declared} bytes")]
    WrongSize {
        what: String,
        declared: u64,
        why: String,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("docker config {path}: {why}")]
    Config { path: String, why: String },

    #[error("cannot set up the HTTP client: {why}")]
    Setup { why: String },

    #[error("registry host configuration {path}: {why}")]
    HostsConfig { path: String, why: String },

    /// A TLS handshake that failed for a reason configuration fixes: an
    /// unknown CA, a client certificate required or refused.
    #[error("TLS with {host} failed: {why}: {hint}")]
    Tls {
        host: String,
        why: String,
        hint: String,
    },

    #[error(
        "the credentials for {registry} are an identity token (a docker config entry's \
         identitytoken, or a credential helper's Username \"<token>\"), which can only be \
         exchanged for bearer tokens; {registry} asks for Basic authentication: give a \
         username and password for it instead"
    )]
    IdentityTokenNeedsBearer { registry: String },

    #[error("credential helper {helper} for {registry}: {why}")]
    CredentialHelper {
        helper: String,
        registry: String,
        why: String,
    },
}

/// `err: cause: cause…`, since reqwest's own message hides the interesting
/// part (connection refused, timed out) in its source chain.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl RegistryError {
    /// Whether another try may succeed: connection failures, timeouts, broken
    /// or short bodies, HTTP 5xx and 429. Never other 4xx, authentication,
    /// digest or protocol errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Transport { source, .. } => {
                !source.is_builder() && !source.is_redirect()
            }
            RegistryError::BodyRead { .. }
            | RegistryError::BodyLength { .. }
            | RegistryError::DeadlineExceeded { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The errno a transport should hand the kernel for this failure:
    /// `EACCES` for authentication and permission, `ENOENT` for a missing
    /// object, `EINVAL` for a malformed name, `EIO` for everything else.
    pub fn errno(&self) -> i32 {
        match self {
            RegistryError::AuthRequired { .. }
            | RegistryError::AuthFailed { .. }
            | RegistryError::IdentityTokenNeedsBearer { .. }
            | RegistryError::Denied { .. } => libc::EACCES,
            RegistryError::NotFound { .. } => libc::ENOENT,
            RegistryError::InvalidReference { .. }
            | RegistryError::InvalidDigest { .. }
            | RegistryError::InvalidUrl { .. } => libc::EINVAL,
            _ => libc::EIO,
        }
    }

    /// An `io::Error` whose message names `context` (the blob) and this cause.
    pub fn into_io(self, context: &str) -> io::Error {
        let kind = match &self {
            RegistryError::NotFound { .. } => io::ErrorKind::NotFound,
            RegistryError::AuthRequired { .. }
            | RegistryError::AuthFailed { .. }
            | RegistryError::IdentityTokenNeedsBearer { .. }
            | RegistryError::Denied { .. } => io::ErrorKind::PermissionDenied,
            RegistryError::OutOfRange { .. } => io::ErrorKind::UnexpectedEof,
            RegistryError::InvalidReference { .. }
            | RegistryError::InvalidDigest { .. }
            | RegistryError::InvalidUrl { .. } => io::ErrorKind::InvalidInput,
            RegistryError::Transport { source, .. } if source.is_timeout() => {
                io::ErrorKind::TimedOut
            }
            RegistryError::DeadlineExceeded { .. } => io::ErrorKind::TimedOut,
            RegistryError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("{context}: {self}"))
    }
}
