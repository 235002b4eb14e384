//! `lazypull-testkit`: test helpers for lazypull (not shipped to users).
//!
//! - [`manifest`]: a canonical, line-per-entry description of a directory
//!   tree (types, modes, owners, sizes, mtimes, devices, symlink targets,
//!   xattrs, content hashes, hard-link structure), and the expected result
//!   of stacking layers ([`manifest::merge_layers`]).
//! - [`compare`]: differences between two manifests or two trees.
//! - [`maketree`]: a deterministic tree exercising every feature the EROFS
//!   builder supports.
//! - [`proxy`]: a fault-injecting, logging HTTP/1.1 reverse proxy to put
//!   in front of a registry.
//! - [`registry`]: a real `docker-registry` on 127.0.0.1 (or in a
//!   [`netns`]) for tests (plain, htpasswd, TLS, client certificates,
//!   pull-through cache).
//! - [`tls`]: a test CA and certificates made with `openssl` at test time.
//! - [`netns`]: an emulated network: a network namespace over a veth pair,
//!   shaped with `tbf`, removed when dropped.
//! - [`debian_image`]: realistic images (python + numpy, gcc, postgresql,
//!   a bloated one) built with `mmdebstrap` from Debian's archive, cached
//!   under `/var/cache/lazypull-bench/images`.
//! - [`containerd`]: a real containerd (with runc) whose root, state and
//!   sockets live in a test's directory, optionally with proxy
//!   snapshotters; stopped, its containers killed and mounts undone when
//!   dropped.
//! - [`oci_image`]: ordinary OCI images built from tiny trees (gzip tar
//!   layers, OCI config and manifest), pushed to a registry or written as
//!   an OCI layout; [`oci_image::busybox_image`] is a runnable one.
//! - [`python_image`]: a runnable image around the host's python3.11.
//! - [`cri`]: a small blocking client of Kubernetes' CRI (`runtime.v1`,
//!   our restatement of the part of cri-api's protos it uses) to drive
//!   containerd's CRI plugin as kubelet would: images, host-network pods,
//!   containers, their logs; and a busybox pod sandbox image.
//!
//! A web server holding a blob directory is `lazypull::blob_server` (the
//! demo's, shipped): tests use that one rather than a second copy here.
//!
//! The `lazypull-testkit` binary exposes `manifest`, `compare`,
//! `make-tree` and `proxy` on the command line.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod compare;
pub mod containerd;
pub mod cri;
pub mod debian_image;
pub mod maketree;
pub mod manifest;
pub mod netns;
pub mod oci_image;
pub mod proxy;
pub mod python_image;
pub mod registry;
pub mod tls;

pub use compare::{
    compare_dirs, compare_dirs_with, compare_entries, format_differences, Difference,
};
pub use maketree::{make_tree, TreeOptions, TreeReport};
pub use manifest::{merge_layers, render, scan, scan_with, Entry, Kind, ScanOptions};
pub use proxy::{parse_faults, read_log, Fault, FaultSource, Faults, LogEntry, Proxy};
