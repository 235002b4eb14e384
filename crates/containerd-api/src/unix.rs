//! The one transport helper this crate holds: a tonic connector that dials a
//! unix socket, which is how both containerd and a proxy snapshotter are
//! reached. It only opens the stream (a failure names the socket); timeouts,
//! retries and the rest of the error wording stay with the callers (containerd's client lives in crates/lazypull).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Dials the unix socket at its path for every connection tonic opens.
///
/// Use it with `Endpoint::connect_with_connector`; the endpoint's URI only
/// sets the `:authority` (e.g. `http://localhost`, as containerd sends).
#[derive(Clone, Debug)]
pub struct UnixConnector(PathBuf);

impl UnixConnector {
    /// A connector for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }
}

impl tonic::codegen::Service<tonic::codegen::http::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot connect to {}: {e}", path.display()),
                )
            })?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
