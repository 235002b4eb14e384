//! `lazypull`, the program: the commands ([`cli`]), the daemon that serves
//! lazy images to the kernel ([`daemon`]), its configuration ([`config`]),
//! the fd store that keeps the kernel connections across daemons
//! ([`fdstore`]), and logging ([`logging`]). The binary (`src/main.rs`) only
//! parses the command line and calls these.
//!
//! Inside, imports go one way: `cli` → (over the control socket) the daemon;
//! `daemon` → `catalog` (which images are registered, and which blob names
//! the kernel may open) → the catalog's blob opening (blob store, registry);
//! `metrics` → `status` (a snapshot the daemon produces, not the daemon);
//! `control` (the control socket's protocol and client), `files` and
//! `status` are leaves that several layers share. `lazypull pull`: `cli` →
//! [`pull`] (what a lazy pull writes to containerd, in which order) →
//! [`containerd_client`] (the calls on containerd's socket; their wire
//! contract is `lazypull-containerd-api`'s).
//!
//! It owns wiring: which library does what, when, with which settings. It
//! must not hold format logic (EROFS: `lazypull-erofs`; chunk tables and the
//! stored form: `lazypull-blob`; OCI: `lazypull-oci`), reading image sources
//! (`lazypull-ingest`), fetching, verifying or caching blob bytes
//! (`lazypull-engine`), network clients (`lazypull-backend`), the blob source
//! seams (`lazypull-source`), or the kernel protocols (`lazypull-cachefiles`,
//! `lazypull-fuse`, `lazypull-transport`).
#![forbid(unsafe_code)]

pub mod blob_server;
pub mod cli;
pub mod config;
pub mod containerd_client;
pub mod daemon;
pub mod fdstore;
pub mod logging;
pub mod pull;

mod catalog;
mod control;
mod files;
mod metrics;
mod status;
