//! Prometheus metrics at `http://<--metrics-addr>/metrics`: the numbers of
//! `lazypull status --json`, from the same [`Status`] snapshot, in the text
//! exposition format (version 0.0.4).
//!
//! It owns the page and its HTTP server, and sees the daemon only through a
//! [`StatusSource`]: it must not depend on the daemon's internals.

use std::fmt::Write as _;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tracing::{info, warn};

use crate::status::{Status, StatusSource};

struct Exposition(String);

impl Exposition {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(self.0, "{name}{labels} {value}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.metric(name, kind, help, &[(String::new(), value)]);
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics page of one status snapshot.
fn render(status: &Status) -> String {
    let mut e = Exposition(String::new());
    e.metric(
        "lazypull_info",
        "gauge",
        "Build and transport of this daemon.",
        &[(
            format!(
                "{{version=\"{}\",transport=\"{}\"}}",
                status.version, status.transport.kind
            ),
            1,
        )],
    );
    e.one(
        "lazypull_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        status.uptime_secs,
    );
    let k = status.transport.kernel;
    e.one(
        "lazypull_kernel_reads_total",
        "counter",
        "Reads the kernel asked for (cachefiles READ or FUSE READ requests).",
        k.reads,
    );
    e.one(
        "lazypull_kernel_read_failures_total",
        "counter",
        "Kernel reads that failed (the reader got EIO).",
        k.read_failures,
    );
    e.one(
        "lazypull_cache_written_bytes_total",
        "counter",
        "Verified bytes written into the cache.",
        k.bytes_written,
    );
    e.one(
        "lazypull_prefetched_bytes_total",
        "counter",
        "Bytes written into the cache ahead of need.",
        k.prefetched_bytes,
    );
    // The cachefiles transport's own: reads of the device that failed and were
    // retried (serving goes on; only a lost device ends it).
    if let Some(n) = status.transport.counters["device_read_errors"].as_u64() {
        e.one(
            "lazypull_cachefiles_device_read_errors_total",
            "counter",
            "Reads of /dev/cachefiles that failed with a transient error (EMFILE, ENOMEM...) and were retried.",
            n,
        );
    }
    let h = &status.backend_http;
    e.one(
        "lazypull_backend_http_requests_total",
        "counter",
        "HTTP requests sent to registries and blob servers (retries and token requests included).",
        h.requests,
    );
    e.one(
        "lazypull_backend_http_range_requests_total",
        "counter",
        "Of those, requests for a byte range.",
        h.range_requests,
    );
    e.one(
        "lazypull_backend_http_received_bytes_total",
        "counter",
        "Response body bytes received from backends.",
        h.bytes_received,
    );
    e.one(
        "lazypull_backend_http_retries_total",
        "counter",
        "Requests repeated after a retryable failure.",
        h.retries,
    );
    e.one(
        "lazypull_backend_http_failures_total",
        "counter",
        "Backend operations that failed after their retries.",
        h.failures,
    );
    e.one(
        "lazypull_backend_mirror_fallbacks_total",
        "counter",
        "Requests a registry mirror (hosts.toml) did not answer, handed to the next host.",
        h.mirror_fallbacks,
    );
    e.one(
        "lazypull_backend_proxy_fallbacks_total",
        "counter",
        "Requests the configured proxy took no connection for, sent directly instead.",
        h.proxy_fallbacks,
    );
    let per_backend = |f: &dyn Fn(&lazypull_backend::BackendHealth) -> u64| -> Vec<(String, u64)> {
        status
            .backends
            .iter()
            .map(|b| (format!("{{backend=\"{}\"}}", label(&b.backend)), f(b)))
            .collect()
    };
    e.metric(
        "lazypull_backend_up",
        "gauge",
        "1 while the backend host's circuit breaker is closed, 0 while it is open or half-open.",
        &per_backend(&|b| u64::from(b.state == "closed")),
    );
    e.metric(
        "lazypull_backend_breaker_opens_total",
        "counter",
        "Times the backend host's circuit breaker opened (consecutive failures: it is down).",
        &per_backend(&|b| b.opens),
    );
    e.metric(
        "lazypull_backend_fast_failures_total",
        "counter",
        "Requests failed without being sent while the backend was down (after outage_timeout_secs).",
        &per_backend(&|b| b.fast_failures),
    );
    e.metric(
        "lazypull_backend_probes_total",
        "counter",
        "Probe requests sent to the backend while its circuit breaker was open.",
        &per_backend(&|b| b.probes),
    );
    let f = &status.fetch;
    e.one(
        "lazypull_fetch_range_reads_total",
        "counter",
        "Range reads of stored blob bytes issued by the fetch engine.",
        f.range_requests,
    );
    e.one(
        "lazypull_fetch_units_total",
        "counter",
        "Compression units fetched and verified.",
        f.units_fetched,
    );
    e.one(
        "lazypull_fetch_dedup_waits_total",
        "counter",
        "Units a request got from another request's fetch in flight.",
        f.dedup_waits,
    );
    e.one(
        "lazypull_fetch_backend_microseconds_total",
        "counter",
        "Time spent in range reads of backends, summed over reads (parallel reads overlap).",
        f.fetch_micros,
    );
    e.one(
        "lazypull_fetch_decode_microseconds_total",
        "counter",
        "Time spent decompressing and verifying units, summed over the threads doing it.",
        f.decode_micros,
    );
    e.one(
        "lazypull_fetch_verify_failures_total",
        "counter",
        "Units whose bytes failed decompression or their SHA-256 check (never written).",
        f.verify_failures,
    );
    if let Some(c) = &status.cache {
        e.one(
            "lazypull_cache_limit_bytes",
            "gauge",
            "The cache's byte budget (cache_limit).",
            c.limit_bytes,
        );
        e.one(
            "lazypull_cache_used_bytes",
            "gauge",
            "Bytes the cache holds against its budget (filled windows, unused caches, reservations).",
            c.used_bytes,
        );
        e.one(
            "lazypull_cache_evicted_bytes_total",
            "counter",
            "Bytes evicted from the cache to stay within its budget (fetched again when read).",
            c.evicted_bytes,
        );
        e.one(
            "lazypull_cache_evicted_windows_total",
            "counter",
            "Fill windows evicted from the cache.",
            c.evicted_windows,
        );
        e.one(
            "lazypull_cache_removed_blobs_total",
            "counter",
            "Whole cache files removed: blobs no registered image uses.",
            c.removed_blobs,
        );
        e.one(
            "lazypull_cache_no_room_total",
            "counter",
            "Fills refused because everything the cache held was in use (served uncached, or EIO on fanotify).",
            c.no_room,
        );
    }
    let images = &status.images;
    e.one(
        "lazypull_images",
        "gauge",
        "Images registered.",
        images.len() as u64,
    );
    e.one(
        "lazypull_mounts",
        "gauge",
        "Mounts of registered images.",
        images.iter().map(|i| i.mountpoints.len() as u64).sum(),
    );
    let blobs = &status.blobs;
    let per_blob = |f: &dyn Fn(&lazypull_transport::BlobCacheInfo) -> u64| -> Vec<(String, u64)> {
        blobs
            .iter()
            .map(|b| (format!("{{blob=\"{}\"}}", label(&b.blob)), f(b)))
            .collect()
    };
    e.metric(
        "lazypull_blob_size_bytes",
        "gauge",
        "Size of each blob served.",
        &per_blob(&|b| b.size),
    );
    e.metric(
        "lazypull_blob_cached_bytes",
        "gauge",
        "Bytes of each blob in the cache.",
        &per_blob(&|b| b.cached_bytes),
    );
    e.metric(
        "lazypull_blob_fetched_bytes_total",
        "counter",
        "Stored bytes fetched for each blob from its backend.",
        &per_blob(&|b| b.source.bytes),
    );
    e.metric(
        "lazypull_blob_requests_total",
        "counter",
        "Backend reads issued for each blob.",
        &per_blob(&|b| b.source.requests),
    );
    e.metric(
        "lazypull_blob_errors_total",
        "counter",
        "Failed backend reads and failed verifications for each blob.",
        &per_blob(&|b| b.source.errors),
    );
    e.metric(
        "lazypull_blob_in_flight_bytes",
        "gauge",
        "Stored bytes of each blob being fetched now.",
        &per_blob(&|b| b.source.in_flight_bytes),
    );
    e.0
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, source: Arc<dyn StatusSource>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("accepting a metrics connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let source = source.clone();
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        let body = tokio::task::spawn_blocking(move || render(&source.status()))
                            .await
                            .unwrap_or_default();
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(body)))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                    };
                    Ok::<_, hyper::http::Error>(response.expect("static response parts"))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                warn!("metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_have_help_type_and_escaped_labels() {
        let mut e = Exposition(String::new());
        e.metric(
            "x_total",
            "counter",
            "An x.",
            &[(format!("{{blob=\"{}\"}}", label("a\"b")), 3)],
        );
        assert_eq!(
            e.0,
            "# HELP x_total An x.\n# TYPE x_total counter\nx_total{blob=\"a\\\"b\"} 3\n"
        );
    }

    #[test]
    fn the_page_counts_cachefiles_device_read_errors() {
        let status = Status {
            pid: 1,
            version: "0.0.0",
            uptime_secs: 7,
            transport: crate::status::TransportStatus {
                kind: "cachefiles",
                reason: "test".into(),
                counters: serde_json::json!({"reads": 5, "device_read_errors": 2}),
                kernel: Default::default(),
            },
            fetch: Default::default(),
            backend_http: Default::default(),
            backends: vec![],
            images: vec![],
            blobs: vec![],
            prefetching: vec![],
            restoring: vec![],
            cache: None,
            kubelet_credentials: Vec::new(),
        };
        let page = render(&status);
        assert!(
            page.contains("lazypull_cachefiles_device_read_errors_total 2\n"),
            "{page}"
        );
    }

    #[test]
    fn the_page_renders_a_status_snapshot() {
        let status = Status {
            pid: 1,
            version: "0.0.0",
            uptime_secs: 7,
            transport: crate::status::TransportStatus {
                kind: "fuse",
                reason: "test".into(),
                counters: serde_json::Value::Null,
                kernel: crate::status::KernelCounters {
                    reads: 5,
                    read_failures: 1,
                    bytes_written: 4096,
                    prefetched_bytes: 0,
                },
            },
            fetch: Default::default(),
            backend_http: Default::default(),
            backends: vec![lazypull_backend::BackendHealth {
                backend: "http://127.0.0.1:5000".into(),
                state: "open",
                down_since_unix: Some(1),
                down_secs: Some(2.0),
                last_cause: Some("connection refused".into()),
                consecutive_failures: 6,
                opens: 1,
                fast_failures: 3,
                probes: 2,
            }],
            images: vec![crate::catalog::ImageInfo {
                fsid: "ab".into(),
                reference: "r".into(),
                manifest_digest: String::new(),
                blobs: vec![],
                mountpoints: vec!["/mnt/a".into(), "/mnt/b".into()],
            }],
            blobs: vec![],
            prefetching: vec![],
            restoring: vec![],
            cache: None,
            kubelet_credentials: Vec::new(),
        };
        let page = render(&status);
        for line in [
            "lazypull_info{version=\"0.0.0\",transport=\"fuse\"} 1\n",
            "lazypull_uptime_seconds 7\n",
            "lazypull_kernel_reads_total 5\n",
            "lazypull_kernel_read_failures_total 1\n",
            "lazypull_cache_written_bytes_total 4096\n",
            "lazypull_images 1\n",
            "lazypull_mounts 2\n",
            "lazypull_backend_up{backend=\"http://127.0.0.1:5000\"} 0\n",
            "lazypull_backend_breaker_opens_total{backend=\"http://127.0.0.1:5000\"} 1\n",
            "lazypull_backend_fast_failures_total{backend=\"http://127.0.0.1:5000\"} 3\n",
            "lazypull_backend_probes_total{backend=\"http://127.0.0.1:5000\"} 2\n",
        ] {
            assert!(page.contains(line), "{line:?} missing from:\n{page}");
        }
    }
}
