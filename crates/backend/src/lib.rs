//! Blob backends: where the stored bytes of blobs live, and how to read them.
//!
//! A blob is named by the key the kernel uses for it (an EROFS `fsid` or a device
//! tag, normally a sha256 hex digest). This crate turns such a name into a
//! [`BlobSource`] that answers positional reads. It owns name validation (a name
//! from the kernel must never escape the blob directory) and the mapping of I/O
//! failures to errno values a transport can hand back to the kernel.
//!
//! Besides local directories it reaches blobs over the network: [`http`] (a
//! blob at a URL, read by Range requests) and [`registry`] (an OCI
//! distribution registry: manifests, whole blobs, Range reads, pushes), with
//! [`retry`] for transient failures. Those check the sha256 of whole blobs and
//! manifests they download by digest.
//!
//! It must not decompress, verify chunk contents, cache, or know which
//! transport asked.

pub mod http;
pub mod registry;
pub mod retry;
mod transport;

pub use http::HttpBlob;
pub use registry::{
    docker_config_credentials, ClientOptions, Credentials, Manifest, Reference, Registry,
    RegistryError, RequestStats,
};
pub use retry::RetryPolicy;
pub use transport::totals as http_totals;

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
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
    /// fetches remotely can fetch it now in as few requests as it likes.
    fn will_read(&self, _off: u64, _len: u64, _priority: Priority) -> io::Result<()> {
        Ok(())
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

    /// What this source has fetched so far.
    fn source_stats(&self) -> SourceStats {
        SourceStats::default()
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
/// [`RangeRead`], such as an [`HttpBlob`]: a [`BlobSource`] of known size.
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

/// Why a blob could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid blob name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("blob {name:?} not found at {path}")]
    NotFound { name: String, path: PathBuf },
    #[error("blob {name:?} at {path} is not a regular file")]
    NotAFile { name: String, path: PathBuf },
    #[error("cannot open blob {name:?} at {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
}

impl OpenError {
    /// The errno a transport should report for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::InvalidName { .. } => libc::EINVAL,
            OpenError::NotFound { .. } => libc::ENOENT,
            OpenError::NotAFile { .. } => libc::EISDIR,
            OpenError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Checks that a kernel-supplied key is a plain file name: no path separators,
/// no `.`/`..`, no control bytes, at most 255 bytes.
pub fn validate_name(name: &[u8]) -> Result<&str, OpenError> {
    let invalid = |why| OpenError::InvalidName {
        name: String::from_utf8_lossy(name).into_owned(),
        why,
    };
    let s = std::str::from_utf8(name).map_err(|_| invalid("not UTF-8"))?;
    if s.is_empty() {
        return Err(invalid("empty"));
    }
    if s.len() > 255 {
        return Err(invalid("longer than 255 bytes"));
    }
    if s == "." || s == ".." {
        return Err(invalid("is a directory reference"));
    }
    if s.bytes().any(|b| b == b'/' || b < 0x20 || b == 0x7f) {
        return Err(invalid("contains '/' or a control character"));
    }
    Ok(s)
}

/// Blobs stored as files named by their key in one directory.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the blob named `name` (raw bytes as the kernel sent them).
    pub fn open(&self, name: &[u8]) -> Result<Arc<LocalBlob>, OpenError> {
        let name = validate_name(name)?;
        let path = self.root.join(name);
        let file = File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => OpenError::NotFound {
                name: name.to_owned(),
                path: path.clone(),
            },
            _ => OpenError::Io {
                name: name.to_owned(),
                path: path.clone(),
                source,
            },
        })?;
        let meta = file.metadata().map_err(|source| OpenError::Io {
            name: name.to_owned(),
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(OpenError::NotAFile {
                name: name.to_owned(),
                path,
            });
        }
        // A second handle with O_DIRECT where the file system allows it: the
        // engine's aligned reads then go straight from the device into its buffer,
        // skipping a page-cache copy of bytes that are about to live in the
        // kernel's cache file anyway.
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok();
        Ok(Arc::new(LocalBlob {
            name: name.to_owned(),
            path,
            size: meta.len(),
            file,
            direct,
            counters: SourceCounters::default(),
        }))
    }
}

/// One blob file in a [`LocalDir`].
#[derive(Debug)]
pub struct LocalBlob {
    name: String,
    path: PathBuf,
    size: u64,
    file: File,
    direct: Option<File>,
    counters: SourceCounters,
}

/// Alignment O_DIRECT reads need (buffer address, offset and length).
const DIRECT_ALIGN: usize = 4096;

impl LocalBlob {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlobSource for LocalBlob {
    fn name(&self) -> &str {
        &self.name
    }

    fn local_path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn source_stats(&self) -> SourceStats {
        self.counters.snapshot()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let aligned = (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && off.is_multiple_of(DIRECT_ALIGN as u64);
        let file = match &self.direct {
            Some(direct) if aligned => direct,
            _ => &self.file,
        };
        let mut done = 0;
        self.counters.start(buf.len() as u64);
        while done < buf.len() {
            match file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.counters.finish(buf.len() as u64, None);
                    return Err(e);
                }
            }
        }
        self.counters.finish(buf.len() as u64, Some(done as u64));
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"../etc/passwd",
            b"x\0y",
            b"\xff\xfe",
            &[b'a'; 256],
        ] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.errno(), libc::EINVAL, "{err}");
        }
        assert_eq!(
            validate_name(b"sha256-abc.meta").unwrap(),
            "sha256-abc.meta"
        );
    }

    #[test]
    fn opens_reads_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blob1"), b"hello world").unwrap();
        std::fs::create_dir(dir.path().join("adir")).unwrap();
        let store = LocalDir::new(dir.path());
        let blob = store.open(b"blob1").unwrap();
        assert_eq!(blob.size(), 11);
        let mut buf = [0u8; 8];
        assert_eq!(blob.read_at(&mut buf, 6).unwrap(), 5);
        assert_eq!(&buf[..5], b"world");
        let err = store.open(b"nope").unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(err.to_string().contains("nope"), "{err}");
        assert_eq!(store.open(b"adir").unwrap_err().errno(), libc::EISDIR);
    }

    #[test]
    fn aligned_and_unaligned_reads_agree() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("b"), &data).unwrap();
        let blob = LocalDir::new(dir.path()).open(b"b").unwrap();
        // An aligned window inside a Vec, for the O_DIRECT path.
        let mut v = vec![0u8; 4 * 4096];
        let start = v.as_ptr().align_offset(4096);
        let aligned = &mut v[start..start + 2 * 4096];
        assert_eq!(blob.read_at(aligned, 4096).unwrap(), 2 * 4096);
        assert_eq!(aligned, &data[4096..3 * 4096]);
        // The unaligned tail goes through the buffered handle.
        let mut tail = [0u8; 200];
        assert_eq!(blob.read_at(&mut tail, 3 * 4096).unwrap(), 100);
        assert_eq!(&tail[..100], &data[3 * 4096..]);
    }
}
