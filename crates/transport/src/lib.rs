//! Transports: the kernel-facing side of lazypull.
//!
//! - [`cachefiles`] serves the cachefiles on-demand protocol: it binds the
//!   device, answers OPEN by resolving the cookie to a blob, hands READs to the
//!   engine concurrently (bounded), completes every READ (a failed fill leaves
//!   a hole, so the reader gets EIO instead of hanging) and releases objects on
//!   CLOSE. The kernel keeps the cache.
//! - [`fuse`] serves blobs as files of a private FUSE mount for kernels without
//!   cachefiles on-demand mode; EROFS mounts them file-backed. The daemon keeps
//!   the cache ([`lazypull_engine::CacheFile`]).
//! - [`loopdev`] backs those same blob files with read-only loop devices, for
//!   kernels whose EROFS mounts block devices only (5.16–6.11): the loop
//!   transport is the FUSE server plus loop devices that the mounting side
//!   attaches.
//!
//! Both answer [`Prefetch`]: fill a blob range ahead of need and report what
//! each blob has cached.
//!
//! A transport must not contain fetch logic (that is the engine's) nor decide
//! where blobs live (that is the resolver's, given by the daemon).

pub mod cachefiles;
pub mod cachefiles_cull;
pub mod fanotify;
pub mod fuse;
pub mod fuse_journal;
pub mod loopdev;

use lazypull_engine::{FillError, FillOutcome};
use lazypull_source::SourceStats;

/// Filling ahead of need, and what is cached, whatever the transport.
pub trait Prefetch: Send + Sync {
    /// Fills `[off, off + len)` of `blob` at background priority. `Ok(None)`
    /// when the transport has no place for that blob (not open in the kernel).
    fn prefetch(&self, blob: &str, off: u64, len: u64) -> Result<Option<FillOutcome>, FillError>;

    /// Every blob the transport serves now, with what it has cached.
    fn blobs(&self) -> Vec<BlobCacheInfo>;
}

/// One blob as a transport serves it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobCacheInfo {
    pub blob: String,
    pub size: u64,
    /// Bytes of it in the cache (the kernel's for cachefiles, the daemon's for FUSE).
    pub cached_bytes: u64,
    /// What its source fetched from the backend.
    pub source: SourceStats,
    /// Served straight from a complete local file (no cache needed).
    pub local_file: bool,
}
