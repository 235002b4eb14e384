//! `lazypull snapshotter`: runs containerd's proxy snapshotter
//! (crates/snapshotter) on a unix socket until SIGTERM / SIGINT. Its own
//! process, apart from the daemon, so either can restart without the other.
//! Lazy images' containers are mounted through the daemon at
//! `--daemon-socket` ([`super::daemon_mounts`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

/// Flags of `lazypull snapshotter`.
#[derive(Debug, clap::Args)]
pub struct SnapshotterArgs {
    /// Where snapshots live: the store (metadata.json) and
    /// snapshots/<id>/{fs,work}. Created 0700.
    #[arg(long, value_name = "DIR", default_value = lazypull_snapshotter::DEFAULT_ROOT)]
    pub root: PathBuf,

    /// The unix socket containerd connects to (created 0600; a missing parent
    /// directory is created 0700).
    #[arg(long, value_name = "SOCKET", default_value = lazypull_snapshotter::DEFAULT_ADDRESS)]
    pub address: PathBuf,

    /// The lazypull daemon's control socket: containers on lazy images get
    /// their image mounted through it (once per image, under
    /// <root>/lazy/<meta digest>). Needed only when such a container starts.
    #[arg(long, value_name = "SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub daemon_socket: PathBuf,
}

/// Serves until SIGTERM or SIGINT, then stops gracefully.
pub fn snapshotter(args: SnapshotterArgs) -> anyhow::Result<()> {
    super::until_signal::run_until_signal("lazypull-snapshotter", |stop| async move {
        let config = lazypull_snapshotter::Config {
            root: args.root,
            address: args.address,
        };
        let daemon = Arc::new(super::daemon_mounts::DaemonMounts::new(args.daemon_socket));
        lazypull_snapshotter::serve_with(config, daemon, stop)
            .await
            .context("snapshotter")
    })
}
