//! Network backends: where the stored bytes of blobs live when they are not on
//! this node, and how to read them.
//!
//! [`http`] reads a blob at a URL by Range requests; [`registry`] speaks the OCI
//! distribution API (manifests, whole blobs, Range reads, pushes, auth), with
//! [`retry`] for transient failures and a circuit breaker per host
//! ([`breaker`]) for backends that are down. Both implement
//! [`lazypull_source::RangeRead`], the engine's view of a backend. They check the
//! sha256 of whole blobs and manifests they download by digest.
//!
//! It must not decompress, verify chunk contents, cache, or know which
//! transport asked. The seams it implements, and the local-directory backend,
//! live in `lazypull-source`, which has no network dependency.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod http;
pub mod registry;
pub mod retry;
mod transport;

pub use breaker::{BackendDown, BackendHealth, BreakerPolicy};
pub use http::HttpBlob;
pub use registry::{
    docker_config_credentials, docker_config_credentials_with, ClientOptions, CredentialLookup,
    Credentials, Helpers, HostLoad, Hosts, Manifest, Reference, Registry, RegistryError,
    RequestStats,
};
pub use retry::RetryPolicy;
pub use transport::totals as http_totals;
