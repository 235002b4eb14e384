//! `lazypull cri-proxy`: runs the CRI image-service proxy
//! (crates/cri-proxy) between kubelet and containerd until SIGTERM /
//! SIGINT, handing each successful pull's credentials to the daemon's
//! control socket ([`crate::control::Request::KubeletCredentials`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::control::{KubeletCredentialsRequest, Request};

/// Default socket kubelet's `--image-service-endpoint` points at.
pub(crate) const DEFAULT_SOCKET: &str = "/run/lazypull/cri.sock";

/// Flags of `lazypull cri-proxy`.
#[derive(Debug, clap::Args)]
pub struct CriProxyArgs {
    /// The socket kubelet connects to (created 0600: calls carry
    /// credentials; a missing parent directory is created 0700; a stale
    /// socket is replaced, a live one refused).
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_SOCKET)]
    pub listen: PathBuf,

    /// The container runtime's CRI socket every call is forwarded to.
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub runtime: PathBuf,

    /// The lazypull daemon's control socket, which is handed the credentials
    /// of each successful pull.
    #[arg(long, value_name = "SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub daemon_socket: PathBuf,
}

/// Serves until SIGTERM or SIGINT.
pub fn cri_proxy(args: CriProxyArgs) -> anyhow::Result<()> {
    super::until_signal::run_until_signal("lazypull-cri-proxy", |stop| async move {
        let daemon = args.daemon_socket.clone();
        let sink: lazypull_cri_proxy::CredentialSink =
            Arc::new(move |c: lazypull_cri_proxy::PullCredentials| {
                let request = Request::KubeletCredentials(KubeletCredentialsRequest {
                    image: c.image,
                    username: c.username,
                    secret: c.secret,
                });
                let reply = crate::control::call(&daemon, &request, Duration::from_secs(10))
                    .map_err(|e| format!("{e:#}"))?;
                Ok(format!(
                    "the daemon keeps them for {}/{}{}",
                    reply["registry"].as_str().unwrap_or("?"),
                    reply["repository"].as_str().unwrap_or("?"),
                    if reply["parked"] == true {
                        " (parked in its fd store for a successor)"
                    } else {
                        " (it has no fd store: a restart of it loses them)"
                    }
                ))
            });
        let listener = lazypull_cri_proxy::bind(&args.listen)
            .with_context(|| format!("cannot listen on {}", args.listen.display()))?;
        tracing::info!(
            listen = %args.listen.display(),
            runtime = %args.runtime.display(),
            daemon = %args.daemon_socket.display(),
            "lazypull cri-proxy ready"
        );
        let proxy = lazypull_cri_proxy::Proxy::new(args.runtime, sink);
        lazypull_cri_proxy::serve(listener, proxy, stop)
            .await
            .context("cri-proxy")?;
        let _ = std::fs::remove_file(&args.listen);
        Ok(())
    })
}
