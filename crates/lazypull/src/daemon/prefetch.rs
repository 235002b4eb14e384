//! Prefetch: after a mount, fetching an image's data ahead of need — listed
//! files first, in the order given, then (optionally) every data blob whole —
//! at background priority, on a thread of its own, so reads someone waits on
//! always go first.
//!
//! It owns the plan and its thread; the filling itself is the transport's
//! ([`Prefetch`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use lazypull_transport::Prefetch;
use tracing::{debug, info, warn};

use crate::catalog::ImageBlob;
use crate::control::PrefetchSpec;

/// One range of one data blob to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) blob: String,
    pub(crate) off: u64,
    pub(crate) len: u64,
}

/// Largest piece filled at once: between pieces, foreground work can start.
const PIECE: u64 = 4 << 20;

/// The spans `spec` asks for of the image with data blobs `blobs` and the
/// meta blob at `meta_path`, in order. Unknown or non-regular paths are
/// reported in the returned warnings, not errors: prefetch is best effort.
pub(crate) fn plan(
    blobs: &[ImageBlob],
    meta_path: &Path,
    spec: &PrefetchSpec,
) -> anyhow::Result<(Vec<Span>, Vec<String>)> {
    let meta =
        std::fs::read(meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
    let image = lazypull_erofs::Image::from_bytes(meta)?;
    Ok(plan_spans(blobs, &image, spec))
}

/// The spans `spec` asks for of the image `meta` describes.
fn plan_spans(
    blobs: &[ImageBlob],
    meta: &lazypull_erofs::Image,
    spec: &PrefetchSpec,
) -> (Vec<Span>, Vec<String>) {
    let mut spans = Vec::new();
    let mut warnings = Vec::new();
    for path in &spec.paths {
        let inode = match meta.lookup(path.as_bytes()) {
            Ok(i) => i,
            Err(e) => {
                warnings.push(format!("prefetch path {path}: {e}"));
                continue;
            }
        };
        let Some(map) = &inode.chunks else {
            // Flat files live in the meta blob, which is local already.
            continue;
        };
        for x in map.extents(inode.size) {
            match blobs.get(usize::from(x.device_id).wrapping_sub(1)) {
                Some(b) => spans.push(Span {
                    blob: b.digest.clone(),
                    off: x.offset,
                    len: x.len,
                }),
                None => warnings.push(format!(
                    "prefetch path {path}: chunk on device {} which the image does not have",
                    x.device_id
                )),
            }
        }
    }
    if spec.all {
        for b in blobs {
            spans.push(Span {
                blob: b.digest.clone(),
                off: 0,
                len: b.size,
            });
        }
    }
    (spans, warnings)
}

/// Fills `spans` of image `fsid` through `prefetcher` on a thread of its own;
/// failures are logged.
pub(crate) fn start(
    prefetcher: Arc<dyn Prefetch>,
    fsid: String,
    spans: Vec<Span>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("lazypull-prefetch".into())
        .spawn(move || {
            if let Err(e) = run(prefetcher.as_ref(), &fsid, &spans) {
                warn!("{e:#}");
            }
        })
        .context("starting the prefetch thread")?;
    Ok(())
}

/// Fills `spans` through the open objects, piece by piece. Windows already
/// filled are skipped by the engine, so overlapping spans cost nothing twice.
fn run(objects: &dyn Prefetch, fsid: &str, spans: &[Span]) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut written = 0u64;
    let mut failures = 0u64;
    for span in spans {
        let mut off = span.off;
        let end = span.off + span.len;
        while off < end {
            let len = (end - off).min(PIECE - off % PIECE);
            match objects.prefetch(&span.blob, off, len) {
                Ok(Some(out)) => written += out.bytes_written,
                Ok(None) => {
                    debug!(blob = %span.blob, "prefetch: the kernel has no object open for this blob; skipped");
                    break;
                }
                Err(e) => {
                    failures += 1;
                    warn!(blob = %span.blob, off, len, "prefetch piece failed (a later read will fetch it): {e}");
                }
            }
            off += len;
        }
    }
    info!(
        %fsid,
        bytes_written = written,
        failures,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "prefetch finished"
    );
    if failures > 0 {
        Err(anyhow::anyhow!("{failures} prefetch pieces failed")).context("prefetch")
    } else {
        Ok(written)
    }
}
