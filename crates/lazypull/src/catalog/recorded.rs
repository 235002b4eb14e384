//! Recorded prefetch, the catalog's side: tracing which blob ranges the
//! readers of an image waited for ([`Tracer`], fed by [`Traced`], the wrapper
//! every registered data blob is served through), mapping such a trace back
//! to files and ranges within them through the meta blob ([`record_of`]), and
//! mapping an image's record to blob ranges, refusing a record that names a
//! file the image lacks or a range past a file's end ([`spans_of`]).
//!
//! What is traced is the announcements of the engine's fills
//! (`BlobSource::will_read`): a window is announced only when it is missing,
//! so the trace holds each range's first touch only. Both priorities are
//! traced: a reader's own fills (foreground) and the read-ahead its
//! sequential reads start (background), which fetches what the reader reads
//! next before it asks; `lazypull optimize` mounts the image it records
//! without prefetching, so no other background fill reaches the trace (but
//! a prefetch of another image sharing a blob would). A blob whose windows
//! are cached already is not traced at all: record from a cold cache.
//!
//! It owns no threads; the tracer's lock is held for a push, never across I/O.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use lazypull_oci::prefetch::{Entry, Record};
use lazypull_source::{BlobSource, Priority, ReadHold, SourceStats};

/// One range of one data blob (uncompressed offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobRange {
    pub(crate) blob: String,
    pub(crate) off: u64,
    pub(crate) len: u64,
}

/// Most ranges one recording keeps; past it the recording is marked
/// truncated (what came first is what matters most).
const MAX_EVENTS: usize = 1 << 18;

/// One image being recorded.
struct Recording {
    blobs: HashSet<String>,
    events: Vec<BlobRange>,
    truncated: bool,
}

/// What a finished recording saw.
pub(crate) struct Trace {
    pub(crate) events: Vec<BlobRange>,
    pub(crate) truncated: bool,
}

/// The daemon's recordings, by image fsid.
#[derive(Default)]
pub(crate) struct Tracer {
    /// How many recordings run: the read path takes no lock when none does.
    active: AtomicUsize,
    recordings: Mutex<HashMap<String, Recording>>,
}

impl Tracer {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Recording>> {
        self.recordings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts recording the reads of image `fsid`, whose data blobs are `blobs`.
    pub(crate) fn start(&self, fsid: &str, blobs: &[String]) -> anyhow::Result<()> {
        let mut recs = self.lock();
        if recs.contains_key(fsid) {
            bail!("image {fsid} is being recorded already");
        }
        recs.insert(
            fsid.to_owned(),
            Recording {
                blobs: blobs.iter().cloned().collect(),
                events: Vec::new(),
                truncated: false,
            },
        );
        self.active.store(recs.len(), Ordering::Release);
        Ok(())
    }

    /// Ends the recording of `fsid`: what it saw, in order.
    pub(crate) fn stop(&self, fsid: &str) -> Option<Trace> {
        let mut recs = self.lock();
        let r = recs.remove(fsid)?;
        self.active.store(recs.len(), Ordering::Release);
        Some(Trace {
            events: r.events,
            truncated: r.truncated,
        })
    }

    fn note(&self, blob: &str, off: u64, len: u64) {
        if self.active.load(Ordering::Acquire) == 0 || len == 0 {
            return;
        }
        for r in self.lock().values_mut() {
            if !r.blobs.contains(blob) {
                continue;
            }
            if r.events.len() < MAX_EVENTS {
                r.events.push(BlobRange {
                    blob: blob.to_owned(),
                    off,
                    len,
                });
            } else {
                r.truncated = true;
            }
        }
    }
}

/// A data blob served through the tracer: everything is the inner source's,
/// and announcements are noted first.
#[derive(Debug)]
pub(crate) struct Traced {
    inner: Arc<dyn BlobSource>,
    tracer: Arc<Tracer>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl Traced {
    pub(crate) fn wrap(inner: Arc<dyn BlobSource>, tracer: Arc<Tracer>) -> Arc<dyn BlobSource> {
        Arc::new(Traced { inner, tracer })
    }
}

impl BlobSource for Traced {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at(buf, off)
    }
    fn preferred_read_size(&self) -> Option<usize> {
        self.inner.preferred_read_size()
    }
    fn will_read(&self, off: u64, len: u64, priority: Priority) -> io::Result<ReadHold> {
        self.tracer.note(self.inner.name(), off, len);
        self.inner.will_read(off, len, priority)
    }
    fn read_at_priority(&self, buf: &mut [u8], off: u64, priority: Priority) -> io::Result<usize> {
        self.inner.read_at_priority(buf, off, priority)
    }
    fn local_path(&self) -> Option<&Path> {
        self.inner.local_path()
    }
    fn content_binding(&self) -> Option<[u8; 32]> {
        self.inner.content_binding()
    }
    fn source_stats(&self) -> SourceStats {
        self.inner.source_stats()
    }
}

/// Where one piece of a file lives: `len` bytes at `blob_off` of device
/// `device` (1-based) hold the file's bytes from `file_off`.
struct Piece {
    device: u16,
    blob_off: u64,
    len: u64,
    path: Arc<str>,
    file_off: u64,
}

/// Every chunk of every regular file of `meta` stored in a data blob, in
/// blob order. A chunk shared by several files (dedup) names each of them.
fn pieces(meta: &lazypull_erofs::Image) -> anyhow::Result<Vec<Piece>> {
    let mut out: Vec<Piece> = Vec::new();
    let mut seen = HashSet::new();
    for w in meta.walk().context("walking the meta blob")? {
        let Some(map) = &w.inode.chunks else { continue };
        if !seen.insert(w.inode.nid) {
            // A hard link: its bytes are named under the first path.
            continue;
        }
        let path: Arc<str> = format!("/{}", String::from_utf8_lossy(&w.path)).into();
        let mut pos = 0u64;
        while pos < w.inode.size {
            let len = (map.chunk_size - pos % map.chunk_size).min(w.inode.size - pos);
            if let Some((device, blob_off)) = map.locate(pos) {
                if device > 0 {
                    match out.last_mut() {
                        Some(p)
                            if p.path == path
                                && p.device == device
                                && p.blob_off + p.len == blob_off
                                && p.file_off + p.len == pos =>
                        {
                            p.len += len
                        }
                        _ => out.push(Piece {
                            device,
                            blob_off,
                            len,
                            path: path.clone(),
                            file_off: pos,
                        }),
                    }
                }
            }
            pos += len;
        }
    }
    out.sort_by_key(|p| (p.device, p.blob_off));
    Ok(out)
}

/// The record of a trace of the image with meta blob `meta` and data blobs
/// `blobs` (device table order): each traced range mapped back to the files
/// it holds and the ranges within them, in trace order, merged.
pub(crate) fn record_of(
    meta: &lazypull_erofs::Image,
    blobs: &[String],
    trace: &[BlobRange],
) -> anyhow::Result<Record> {
    let pieces = pieces(meta)?;
    let mut entries = Vec::new();
    for r in trace {
        let Some(index) = blobs.iter().position(|b| *b == r.blob) else {
            continue;
        };
        let device = u16::try_from(index + 1).context("more data blobs than devices")?;
        let end = r.off.saturating_add(r.len);
        // The first piece of this device ending after `r.off`.
        let first = pieces.partition_point(|p| (p.device, p.blob_off + p.len) <= (device, r.off));
        for p in pieces[first..]
            .iter()
            .take_while(|p| p.device == device && p.blob_off < end)
        {
            let from = r.off.max(p.blob_off);
            let to = end.min(p.blob_off + p.len);
            if from < to {
                entries.push(Entry {
                    path: p.path.to_string(),
                    offset: p.file_off + (from - p.blob_off),
                    length: to - from,
                });
            }
        }
    }
    Ok(Record::new(entries))
}

/// The blob ranges `record` names in the image with meta blob `meta` and
/// data blobs `blobs`, in record order, consecutive ones merged. A record
/// naming a path the image lacks, something other than a regular file, or a
/// range past a file's end is refused. Bytes kept in the meta blob itself
/// (device 0) need no fetching and are left out.
pub(crate) fn spans_of(
    meta: &lazypull_erofs::Image,
    blobs: &[String],
    record: &Record,
) -> anyhow::Result<Vec<BlobRange>> {
    record.validate()?;
    let mut spans: Vec<BlobRange> = Vec::new();
    for (i, e) in record.entries.iter().enumerate() {
        let refuse = |why: String| anyhow::anyhow!("prefetch record entry {i} ({}): {why}", e.path);
        let inode = meta
            .lookup(e.path.as_bytes())
            .map_err(|err| refuse(format!("not in the image: {err}")))?;
        if inode.file_type != lazypull_erofs::layout::FileType::Regular {
            return Err(refuse(format!(
                "a {:?}, not a regular file",
                inode.file_type
            )));
        }
        if e.end() > inode.size {
            return Err(refuse(format!(
                "bytes {}..{} but the file has {} bytes",
                e.offset,
                e.end(),
                inode.size
            )));
        }
        let Some(map) = &inode.chunks else {
            // Stored in the meta blob, which is local.
            continue;
        };
        let mut pos = e.offset;
        while pos < e.end() {
            let len = (map.chunk_size - pos % map.chunk_size).min(e.end() - pos);
            if let Some((device, off)) = map.locate(pos) {
                if device > 0 {
                    let blob = blobs.get(usize::from(device) - 1).ok_or_else(|| {
                        refuse(format!(
                            "a chunk on device {device}, which the image does not have"
                        ))
                    })?;
                    push_merged(&mut spans, blob, off, len);
                }
            }
            pos += len;
        }
    }
    Ok(spans)
}

/// Gaps up to this between one span and the next of the same blob are
/// fetched too, so that a record of many small pieces becomes few requests.
const MERGE_GAP: u64 = 64 << 10;

/// Appends `[off, off+len)` of `blob`, joined to the last span when it
/// continues it (within [`MERGE_GAP`]) or lies inside it.
fn push_merged(spans: &mut Vec<BlobRange>, blob: &str, off: u64, len: u64) {
    if let Some(last) = spans.last_mut() {
        let end = last.off + last.len;
        if last.blob == blob && off >= last.off && off <= end + MERGE_GAP {
            last.len = (off + len).max(end) - last.off;
            return;
        }
    }
    spans.push(BlobRange {
        blob: blob.to_owned(),
        off,
        len,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_merge_what_continues_within_a_small_gap_and_keep_the_order() {
        let mut s = Vec::new();
        push_merged(&mut s, "b", 0, 4096);
        push_merged(&mut s, "b", 4096, 4096); // continues
        push_merged(&mut s, "b", 8192 + 1000, 10); // a small gap
        push_merged(&mut s, "b", 100, 10); // inside
        push_merged(&mut s, "c", 0, 10); // another blob
        push_merged(&mut s, "b", 1 << 30, 10); // far on
        push_merged(&mut s, "b", 0, 10); // back: a new span, in its place
        let got: Vec<_> = s.iter().map(|r| (r.blob.as_str(), r.off, r.len)).collect();
        assert_eq!(
            got,
            [
                ("b", 0, 9202),
                ("c", 0, 10),
                ("b", 1 << 30, 10),
                ("b", 0, 10)
            ]
        );
    }

    /// A built image: `/a` (3 chunks of 4 KiB), `/d/b` (2), `/e` (empty),
    /// one data blob holding a then b; its meta blob and data blob name.
    fn built() -> (lazypull_erofs::Image, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        let noise = |seed: u8, len: usize| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
                .collect()
        };
        std::fs::write(src.join("a"), noise(1, 3 * 4096)).unwrap();
        std::fs::write(src.join("d/b"), noise(2, 2 * 4096)).unwrap();
        std::fs::write(src.join("e"), b"").unwrap();
        let out = dir.path().join("out");
        let built = lazypull_erofs::build_from_layers(
            &[src],
            &out,
            &lazypull_erofs::BuildOptions {
                chunk_size: 4096,
                ..lazypull_erofs::BuildOptions::default()
            },
        )
        .unwrap();
        let meta = std::fs::read(out.join(&built.meta_digest)).unwrap();
        let blob = built.blobs[0].digest.clone();
        (lazypull_erofs::Image::from_bytes(meta).unwrap(), blob, dir)
    }

    fn entry(path: &str, offset: u64, length: u64) -> Entry {
        Entry {
            path: path.into(),
            offset,
            length,
        }
    }

    #[test]
    fn a_trace_maps_to_files_and_back_to_the_same_blob_ranges() {
        let (meta, blob, _dir) = built();
        let blobs = vec![blob.clone()];
        let r = |off, len| BlobRange {
            blob: blob.clone(),
            off,
            len,
        };
        // b's first chunk, then a range covering a's last two chunks and b's
        // first again (read already: not named twice); a blob not the
        // image's is ignored.
        let trace = [
            r(12288, 4096),
            r(4096, 12288),
            BlobRange {
                blob: "other".into(),
                off: 0,
                len: 10,
            },
        ];
        let record = record_of(&meta, &blobs, &trace).unwrap();
        assert_eq!(
            record.entries,
            [entry("/d/b", 0, 4096), entry("/a", 4096, 8192)]
        );
        // Back to blob ranges: the same ones, in the same order.
        let spans = spans_of(&meta, &blobs, &record).unwrap();
        assert_eq!(spans, [r(12288, 4096), r(4096, 8192)]);
        // A whole-file record is one span per file; b continues a: one span.
        let whole = Record::new(vec![entry("/a", 0, 12288), entry("/d/b", 0, 8192)]);
        assert_eq!(spans_of(&meta, &blobs, &whole).unwrap(), [r(0, 20480)]);
    }

    #[test]
    fn a_record_naming_what_the_image_lacks_is_refused() {
        let (meta, blob, _dir) = built();
        let blobs = vec![blob];
        let refused = |e: Entry| {
            spans_of(&meta, &blobs, &Record::new(vec![entry("/a", 0, 1), e]))
                .unwrap_err()
                .to_string()
        };
        let has = |err: String, parts: &[&str]| {
            for p in parts {
                assert!(err.contains(p), "{p:?} not in {err}");
            }
        };
        has(
            refused(entry("/nope", 0, 1)),
            &["entry 1", "/nope", "not in the image"],
        );
        has(
            refused(entry("/a", 12288, 1)),
            &["entry 1", "the file has 12288 bytes"],
        );
        has(
            refused(entry("/e", 0, 1)),
            &["entry 1", "the file has 0 bytes"],
        );
        has(
            refused(entry("/d", 0, 1)),
            &["entry 1", "not a regular file"],
        );
        has(refused(entry("/../a", 0, 1)), &["entry 1", "normalised"]);
        // Data blobs the meta blob's devices do not match.
        let err = spans_of(&meta, &[], &Record::new(vec![entry("/a", 0, 1)])).unwrap_err();
        has(err.to_string(), &["device 1"]);
    }

    #[test]
    fn the_tracer_keeps_what_recorded_images_announce_in_order() {
        let tracer = Arc::new(Tracer::default());
        tracer.note("x", 0, 10); // nothing recorded: dropped
        tracer.start("img", &["x".into()]).unwrap();
        assert!(tracer.start("img", &[]).is_err());
        tracer.note("x", 5, 10);
        tracer.note("y", 0, 10); // not this image's
        tracer.note("x", 0, 1);
        let t = tracer.stop("img").unwrap();
        let got: Vec<_> = t.events.iter().map(|r| (r.off, r.len)).collect();
        assert_eq!(got, [(5, 10), (0, 1)]);
        assert!(!t.truncated);
        assert!(tracer.stop("img").is_none());
        tracer.note("x", 0, 10);
        assert_eq!(tracer.active.load(Ordering::Relaxed), 0);
    }
}
