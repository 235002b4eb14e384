//! `lazypull cri-proxy`: a CRI image-service proxy between kubelet and
//! containerd. Kubelet sends the credentials for an image with its CRI
//! `PullImage`; containerd uses them for the pull and hands them to no
//! snapshotter, so a lazily pulled image would have none when lazypull's
//! daemon later reads its data. Kubelet pointed at this proxy
//! (`--image-service-endpoint`) has every call forwarded to containerd
//! unchanged, and each successful pull's credentials handed to the daemon.
//!
//! It owns the forwarding ([`proxy`]) and the reading of `PullImage`
//! requests ([`pull`]). It must not keep credentials (it holds them only
//! while a pull is answered) nor know where they go: the [`CredentialSink`]
//! given to it does (the `lazypull` binary's, which speaks the daemon's
//! control protocol).
#![forbid(unsafe_code)]

pub mod proxy;
pub mod pull;

pub use proxy::{bind, serve, CredentialSink, Proxy, ProxyStats};
pub use pull::PullCredentials;
