//! The commands a user runs, other than the daemon and the fd store: one
//! function per subcommand, each taking its clap arguments, doing the work
//! through the library crates (or through the running daemon, over its
//! control socket) and printing the result. Blocking, on the calling thread.
//!
//! It owns what the user sees: flags, output, progress. It must not hold
//! format, fetch or protocol logic (the library crates'), nor any of the
//! daemon's.

mod build;
mod convert;
mod cri_proxy;
mod daemon_client;
mod daemon_mounts;
mod demo;
mod image_dir;
mod inspect;
mod lazy_status;
mod mount;
mod optimize;
mod output;
mod pull;
mod push;
mod registry_args;
mod snapshotter;
mod until_signal;
mod verify;

pub use build::{build, BuildArgs};
pub use convert::{convert, ConvertArgs};
pub use cri_proxy::{cri_proxy, CriProxyArgs};
pub use daemon_client::{handover, shutdown, status, HandoverArgs, ShutdownArgs, StatusArgs};
pub use demo::{run as demo, DemoArgs};
pub use image_dir::ImageArgs;
pub use inspect::{inspect, InspectArgs};
pub use mount::{mount, umount, MountArgs, UmountArgs};
pub use optimize::{optimize, OptimizeArgs};
pub use output::error_text;
pub use pull::{pull, PullArgs};
pub use push::{push, PushArgs};
pub use snapshotter::{snapshotter, SnapshotterArgs};
pub use verify::verify;
