//! What the running transport offers the rest of the daemon: its name, its
//! counters, the cache state of its blobs, prefetching, and how an image
//! mounts through it.
//!
//! A view only: it must not start, stop or hand over the transport.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use lazypull_source::BlobResolver;
use lazypull_transport::cachefiles::{self, OpenObjects};
use lazypull_transport::fanotify::FanotifyServer;
use lazypull_transport::fuse::{self, FuseBlobs};
use lazypull_transport::{BlobCacheInfo, Prefetch};
use serde_json::json;

use crate::catalog::ImageBlob;
use crate::control::MountPlan;
use crate::status::KernelCounters;

/// What the transport of a running daemon offers to request handlers.
#[derive(Clone)]
pub(crate) enum TransportView {
    Cachefiles {
        objects: OpenObjects,
        stats: Arc<cachefiles::Stats>,
    },
    /// FUSE blob files; with `loop_devices` (the loop transport) each
    /// mounted through a read-only loop device over it.
    Fuse {
        blobs: FuseBlobs,
        stats: Arc<fuse::Stats>,
        dir: PathBuf,
        loop_devices: bool,
        /// Direct I/O on those loop devices (the `loop_direct_io` key).
        loop_direct_io: bool,
    },
    /// Sparse cache files filled on fanotify pre-content events; blobs are
    /// set up (cache file opened, then marked) when an image is mounted,
    /// resolved through `resolver` (registered images only).
    Fanotify {
        server: Arc<FanotifyServer>,
        resolver: Arc<dyn BlobResolver>,
    },
}

impl TransportView {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            TransportView::Cachefiles { .. } => "cachefiles",
            TransportView::Fuse {
                loop_devices: true, ..
            } => "loop",
            TransportView::Fuse { .. } => "fuse",
            TransportView::Fanotify { .. } => "fanotify",
        }
    }

    pub(crate) fn prefetcher(&self) -> Arc<dyn Prefetch> {
        match self {
            TransportView::Cachefiles { objects, .. } => Arc::new(objects.clone()),
            TransportView::Fuse { blobs, .. } => Arc::new(blobs.clone()),
            TransportView::Fanotify { server, .. } => server.clone(),
        }
    }

    pub(crate) fn blobs(&self) -> Vec<BlobCacheInfo> {
        self.prefetcher().blobs()
    }

    /// The transport's counters, as JSON (their names differ by transport).
    pub(crate) fn stats_json(&self) -> serde_json::Value {
        match self {
            TransportView::Cachefiles { stats, .. } => json!(stats.snapshot()),
            TransportView::Fuse { stats, .. } => json!(stats.snapshot()),
            TransportView::Fanotify { server, .. } => json!(server.stats.snapshot()),
        }
    }

    /// The daemon's own cache against its budget, if it has one.
    pub(crate) fn cache_budget(&self) -> Option<lazypull_engine::BudgetSnapshot> {
        match self {
            TransportView::Cachefiles { objects, .. } => objects.budget().map(|b| b.snapshot()),
            TransportView::Fuse { blobs, .. } => blobs.budget().map(|b| b.snapshot()),
            TransportView::Fanotify { server, .. } => server.budget().map(|b| b.snapshot()),
        }
    }

    /// The counters every transport has.
    pub(crate) fn kernel_counters(&self) -> KernelCounters {
        match self {
            TransportView::Cachefiles { stats, .. } => {
                let s = stats.snapshot();
                KernelCounters {
                    reads: s.reads,
                    read_failures: s.read_failures,
                    bytes_written: s.bytes_written,
                    prefetched_bytes: s.prefetched_bytes,
                }
            }
            TransportView::Fuse { stats, .. } => {
                let s = stats.snapshot();
                KernelCounters {
                    reads: s.reads,
                    read_failures: s.read_failures,
                    bytes_written: s.bytes_written,
                    prefetched_bytes: s.prefetched_bytes,
                }
            }
            // A "read" here is a pre-content event: a read of a range not
            // filled yet (warm reads never reach the daemon).
            TransportView::Fanotify { server, .. } => {
                let s = server.stats.snapshot();
                KernelCounters {
                    reads: s.events,
                    read_failures: s.denied,
                    bytes_written: s.filled_bytes,
                    prefetched_bytes: s.prefetched_bytes,
                }
            }
        }
    }

    /// How to mount image `fsid` with data blobs `blobs` through this transport.
    pub(crate) fn mount_plan(&self, fsid: &str, blobs: &[ImageBlob]) -> anyhow::Result<MountPlan> {
        Ok(match self {
            TransportView::Fanotify { server, resolver } => {
                // The kernel raises no pre-content events for the primary
                // image file (measured on 6.18): the meta blob must be
                // complete on local disk, and it is (fetched at register).
                // Where a blob is complete on local disk, if it is.
                let complete = |src: &dyn lazypull_source::BlobSource| {
                    src.local_path()
                        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == src.size()))
                        .map(std::path::Path::to_path_buf)
                };
                let meta = resolver
                    .resolve(b"fuse", fsid.as_bytes())
                    .map_err(|e| anyhow::anyhow!("the meta blob {fsid}: {e}"))?;
                let source = complete(meta.as_ref())
                    .with_context(|| {
                        format!("the meta blob {fsid} is not complete on local disk, as a fanotify mount needs")
                    })?
                    .display()
                    .to_string();
                let mut devices = Vec::new();
                for b in blobs {
                    let src = resolver
                        .resolve(b"fuse", b.digest.as_bytes())
                        .map_err(|e| anyhow::anyhow!("data blob {}: {e}", b.digest))?;
                    let path = match complete(src.as_ref()) {
                        Some(p) => p,
                        None => {
                            let binding =
                                src.content_binding().unwrap_or(lazypull_engine::NO_BINDING);
                            server.add_blob(src, binding).with_context(|| {
                                format!("setting up the sparse cache file of blob {}", b.digest)
                            })?
                        }
                    };
                    devices.push(format!("device={}", path.display()));
                }
                MountPlan {
                    source,
                    fstype: "erofs".into(),
                    options: devices.join(","),
                    domain: false,
                    loop_devices: false,
                    loop_direct_io: false,
                }
            }
            TransportView::Cachefiles { .. } => MountPlan {
                source: "lazypull".into(),
                fstype: "erofs".into(),
                options: format!("fsid={fsid}"),
                domain: true,
                loop_devices: false,
                loop_direct_io: false,
            },
            TransportView::Fuse {
                blobs: files,
                dir,
                loop_devices,
                loop_direct_io,
                ..
            } => {
                // A blob complete on local disk is read by the kernel directly;
                // the others through the daemon's FUSE files.
                let path = |name: &str| {
                    files
                        .complete_file(name)
                        .unwrap_or_else(|| dir.join(name))
                        .display()
                        .to_string()
                };
                let devices: Vec<String> = blobs
                    .iter()
                    .map(|b| format!("device={}", path(&b.digest)))
                    .collect();
                MountPlan {
                    source: path(fsid),
                    fstype: "erofs".into(),
                    options: devices.join(","),
                    domain: false,
                    loop_devices: *loop_devices,
                    loop_direct_io: *loop_devices && *loop_direct_io,
                }
            }
        })
    }
}
