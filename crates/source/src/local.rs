//! Blobs that are files in one local directory.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{validate_name, BlobSource, OpenError, SourceCounters, SourceStats};

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
    use crate::BlobSource;

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
