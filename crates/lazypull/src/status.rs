//! The daemon's status: one snapshot of its transport, counters, images and
//! blobs. The daemon produces it ([`StatusSource`]); `lazypull status --json`
//! shows it as it serialises, and the metrics page renders the same numbers.
//!
//! Types only: it must not reach into the daemon, so whoever reports on the
//! daemon (metrics) depends on this snapshot and not on the daemon itself.

use lazypull_backend::{BackendHealth, RequestStats};
use lazypull_engine::FetchStatsSnapshot;
use lazypull_transport::BlobCacheInfo;
use serde::Serialize;

use crate::catalog::{ImageInfo, RestoringImage};

/// Whatever can say how the daemon is doing right now. Taking a snapshot may
/// lock the catalog and ask the transport: call it off the async runtime.
pub(crate) trait StatusSource: Send + Sync {
    fn status(&self) -> Status;
}

/// One snapshot (the JSON of `lazypull status --json`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Status {
    pub(crate) pid: u32,
    pub(crate) version: &'static str,
    pub(crate) uptime_secs: u64,
    pub(crate) transport: TransportStatus,
    /// The fetch engine's counters.
    pub(crate) fetch: FetchStatsSnapshot,
    /// Every HTTP request sent to registries and blob servers.
    pub(crate) backend_http: RequestStats,
    /// Each backend host's circuit breaker: closed, open (since when, why)
    /// or half-open (a probe out).
    pub(crate) backends: Vec<BackendHealth>,
    pub(crate) images: Vec<ImageInfo>,
    pub(crate) blobs: Vec<BlobCacheInfo>,
    /// The fsids of the images being prefetched now.
    pub(crate) prefetching: Vec<String>,
    /// Images a previous daemon served that are not back yet (retried).
    pub(crate) restoring: Vec<RestoringImage>,
    /// The daemon's own cache against its `cache_limit` (FUSE, loop,
    /// fanotify); null when unlimited or on cachefiles.
    pub(crate) cache: Option<lazypull_engine::BudgetSnapshot>,
    /// Repositories (`registry/repository`) the daemon holds kubelet's
    /// credentials for (`lazypull cri-proxy`): names only, never a secret.
    pub(crate) kubelet_credentials: Vec<String>,
}

/// The transport serving the kernel, and why it was chosen.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TransportStatus {
    /// `cachefiles` or `fuse`.
    pub(crate) kind: &'static str,
    pub(crate) reason: String,
    /// The transport's own counters (their names differ by transport).
    pub(crate) counters: serde_json::Value,
    /// The counters both transports have, by one name.
    #[serde(skip)]
    pub(crate) kernel: KernelCounters,
}

/// What every transport counts of the kernel's reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KernelCounters {
    /// Reads the kernel asked for.
    pub(crate) reads: u64,
    /// Of those, reads that failed (the reader got EIO).
    pub(crate) read_failures: u64,
    /// Verified bytes written into the cache.
    pub(crate) bytes_written: u64,
    /// Of those bytes, those written ahead of need by prefetch.
    pub(crate) prefetched_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_as_lazypull_status_json() {
        let status = Status {
            pid: 42,
            version: "1.2.3",
            uptime_secs: 9,
            transport: TransportStatus {
                kind: "cachefiles",
                reason: "why".into(),
                counters: serde_json::json!({"reads": 3}),
                kernel: KernelCounters {
                    reads: 3,
                    ..KernelCounters::default()
                },
            },
            fetch: FetchStatsSnapshot::default(),
            backend_http: RequestStats::default(),
            backends: Vec::new(),
            images: Vec::new(),
            blobs: Vec::new(),
            prefetching: Vec::new(),
            restoring: Vec::new(),
            cache: None,
            kubelet_credentials: Vec::new(),
        };
        let v = serde_json::to_value(&status).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "backend_http",
                "backends",
                "blobs",
                "cache",
                "fetch",
                "images",
                "kubelet_credentials",
                "pid",
                "prefetching",
                "restoring",
                "transport",
                "uptime_secs",
                "version"
            ]
        );
        assert_eq!(
            v["transport"],
            serde_json::json!({"kind": "cachefiles", "reason": "why", "counters": {"reads": 3}}),
            "the shared kernel counters are for the metrics, not the JSON"
        );
        assert_eq!(
            (v["pid"].as_u64(), v["uptime_secs"].as_u64()),
            (Some(42), Some(9))
        );
        assert_eq!(v["fetch"]["range_requests"], 0);
        assert_eq!(v["backend_http"]["requests"], 0);
    }
}
