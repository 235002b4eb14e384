//! The read seams: what a blob looks like to the engine and the transports
//! ([`BlobSource`]), and what a backend looks like to the engine ([`RangeRead`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Random access to one blob's bytes.
pub trait BlobSource: Send + Sync + std::fmt::Debug {
    /// The blob's name (its key).
    fn name(&self) -> &str;
    /// Its size in bytes, as known when it was opened.
    fn size(&self) -> u64;
    /// Reads as many bytes as are available at `off` into `buf`; fewer than
    /// `buf.len()` only at the end of the blob.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;

    /// The read size this source serves best, if it has one (e.g. the unit a
    /// compressed blob must decompress whole): callers read in pieces of at
    /// least this size where they can.
    fn preferred_read_size(&self) -> Option<usize> {
        None
    }

    /// Announces that `[off, off + len)` is about to be read: a source that
    /// fetches remotely can fetch it now in as few requests as it likes, and
    /// keep what it fetched for the caller until the returned hold drops
    /// (reads within [`ReadHold::covers`] then fetch nothing again). An error
    /// is the error reading that range would have: the caller fails rather
    /// than read (and fetch) it again.
    fn will_read(&self, off: u64, len: u64, _priority: Priority) -> io::Result<ReadHold> {
        Ok(ReadHold::nothing(off..off.saturating_add(len)))
    }

    /// [`read_at`](Self::read_at) on behalf of work of the given priority.
    fn read_at_priority(&self, buf: &mut [u8], off: u64, _priority: Priority) -> io::Result<usize> {
        self.read_at(buf, off)
    }

    /// A local file holding exactly this blob's bytes, complete, if there is
    /// one: a transport may then read it, or have the kernel read it, directly
    /// rather than through a cache.
    fn local_path(&self) -> Option<&Path> {
        None
    }

    /// What the bytes of this source are verified against, if anything: the
    /// SHA-256 of its chunk table. A cache of the blob's bytes is only reused
    /// for a source of the same binding (two images may declare one blob name
    /// with different tables).
    fn content_binding(&self) -> Option<[u8; 32]> {
        None
    }

    /// What this source has fetched so far.
    fn source_stats(&self) -> SourceStats {
        SourceStats::default()
    }
}

/// What a [`BlobSource::will_read`] fetched, kept alive for its caller: while
/// it lives, reads of [`covers`](Self::covers) are served without a fetch.
pub struct ReadHold {
    covers: std::ops::Range<u64>,
    _kept: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl ReadHold {
    /// A hold of `covers` keeping `kept` (whatever the source needs alive).
    pub fn new(covers: std::ops::Range<u64>, kept: Box<dyn std::any::Any + Send + Sync>) -> Self {
        ReadHold {
            covers,
            _kept: Some(kept),
        }
    }

    /// A hold that keeps nothing (the source needs no announcement).
    pub fn nothing(covers: std::ops::Range<u64>) -> Self {
        ReadHold {
            covers,
            _kept: None,
        }
    }

    /// The byte range the announcement took care of (it may be less than
    /// announced: the caller announces the rest when it gets there).
    pub fn covers(&self) -> std::ops::Range<u64> {
        self.covers.clone()
    }
}

impl std::fmt::Debug for ReadHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadHold")
            .field("covers", &self.covers)
            .finish_non_exhaustive()
    }
}

/// What one source fetched from where its bytes live.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceStats {
    /// Reads issued to the backend (range requests, for remote sources).
    pub requests: u64,
    /// Bytes those reads returned (stored bytes: compressed where the blob is).
    pub bytes: u64,
    /// Reads that failed, and fetched units that failed verification.
    pub errors: u64,
    /// Stored bytes being fetched right now.
    pub in_flight_bytes: u64,
}

/// Atomic counters behind [`SourceStats`], for implementations.
#[derive(Debug, Default)]
pub struct SourceCounters {
    requests: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    in_flight_bytes: std::sync::atomic::AtomicU64,
}

impl SourceCounters {
    /// Marks a read of `len` bytes as started; call [`finish`](Self::finish) after.
    pub fn start(&self, len: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.in_flight_bytes.fetch_add(len, Relaxed);
    }

    /// Ends a read started with `len`: `got` bytes arrived, or it failed.
    pub fn finish(&self, len: u64, got: Option<u64>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.in_flight_bytes.fetch_sub(len, Relaxed);
        match got {
            Some(n) => self.bytes.fetch_add(n, Relaxed),
            None => self.errors.fetch_add(1, Relaxed),
        };
    }

    /// Counts an error found after the bytes arrived (a failed verification).
    pub fn error(&self) {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SourceStats {
        use std::sync::atomic::Ordering::Relaxed;
        SourceStats {
            requests: self.requests.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            in_flight_bytes: self.in_flight_bytes.load(Relaxed),
        }
    }
}

/// Whether a read is for a reader who waits (foreground) or ahead of need
/// (background: prefetch), which yields to foreground work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Foreground,
    Background,
}

/// Random access to a blob's *stored* bytes (a local file, an HTTP or registry
/// blob fetched by Range): the engine's view of a backend. Retries and timeouts
/// are the implementation's business; what it returns is exactly what was asked.
pub trait RangeRead: Send + Sync + std::fmt::Debug {
    /// Fills all of `buf` from `off`, or fails; running out of bytes is an error
    /// of kind `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
}

impl RangeRead for File {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, off)
    }
}

impl<T: RangeRead + ?Sized> RangeRead for Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, off)
    }
}

/// A plain (uncompressed, unchunked) blob whose bytes come through a
/// [`RangeRead`], such as an HTTP blob: a [`BlobSource`] of known size.
#[derive(Debug)]
pub struct RangeBlob {
    name: String,
    size: u64,
    reader: Arc<dyn RangeRead>,
    counters: SourceCounters,
}

impl RangeBlob {
    pub fn new(name: impl Into<String>, size: u64, reader: Arc<dyn RangeRead>) -> Self {
        RangeBlob {
            name: name.into(),
            size,
            reader,
            counters: SourceCounters::default(),
        }
    }
}

impl BlobSource for RangeBlob {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let end = off.saturating_add(buf.len() as u64).min(self.size);
        if off >= end {
            return Ok(0);
        }
        let n = (end - off) as usize;
        self.counters.start(n as u64);
        let r = self.reader.read_exact_at(&mut buf[..n], off);
        self.counters
            .finish(n as u64, r.is_ok().then_some(n as u64));
        r?;
        Ok(n)
    }

    fn source_stats(&self) -> SourceStats {
        self.counters.snapshot()
    }
}
