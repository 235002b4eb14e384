//! Data blobs: regular file contents cut into chunks, deduplicated by SHA-256
//! and stored block-aligned, one blob per layer that stores any chunk.
//!
//! Contents are streamed with a bounded buffer. All-zero chunks (and holes
//! found with `SEEK_DATA`) all point at one stored chunk of zeros by default,
//! or become [`ChunkRef::Hole`] (EROFS_NULL_ADDR, free) with `sparse_holes`.
//!
//! Why not always holes: Linux 6.12's EROFS fscache path
//! (`erofs_fscache_data_read_slice`) zero-fills the *whole rest of a read
//! request* when it meets an unmapped chunk, so a readahead spanning a hole
//! chunk and a following data chunk returns zeros for the data. File-backed
//! mounts (iomap) handle holes correctly; images meant for cachefiles must not
//! contain them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::layout::BLOCK_SIZE;
use crate::tree::FileSource;
use crate::BuildError;

/// Read/write granularity.
const BUF_SIZE: usize = 1 << 20;

/// Where one chunk of a file lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkRef {
    /// All zeros.
    Hole,
    /// `device` is the 1-based device table index; `blkaddr` is in 4 KiB
    /// blocks within that blob.
    Stored { device: u16, blkaddr: u32 },
}

/// A finished blob still under its temporary name.
pub(crate) struct BlobOut {
    pub file: NamedTempFile,
    pub digest: [u8; 32],
    pub size: u64,
    pub chunks: u64,
}

fn is_zero(b: &[u8]) -> bool {
    // Branch-free OR over 8-byte words vectorises well.
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    let any = words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    });
    any == 0 && tail.iter().all(|&x| x == 0)
}

struct Writer<'a> {
    out_dir: &'a Path,
    chunk_size: u64,
    dedup: HashMap<[u8; 32], (u16, u32)>,
    blobs: Vec<BlobOut>,
    buf: Vec<u8>,
    zeros: Vec<u8>,
    /// Store all-zero chunks as holes instead of pointing at a zero chunk.
    sparse_holes: bool,
    /// SHA-256 of a full chunk of zeros: the dedup key of the shared zero chunk.
    zero_digest: [u8; 32],
}

/// State of the blob being written for the current layer.
struct Current {
    file: NamedTempFile,
    /// Committed length (a multiple of the block size).
    len: u64,
    hasher: Sha256,
    chunks: u64,
}

impl<'a> Writer<'a> {
    fn current<'c>(&self, cur: &'c mut Option<Current>) -> Result<&'c mut Current, BuildError> {
        if cur.is_none() {
            let file = NamedTempFile::with_prefix_in(".blob-", self.out_dir).map_err(|e| {
                BuildError::Io {
                    path: self.out_dir.to_path_buf(),
                    source: e,
                }
            })?;
            *cur = Some(Current {
                file,
                len: 0,
                hasher: Sha256::new(),
                chunks: 0,
            });
        }
        Ok(cur.as_mut().expect("just set"))
    }

    /// Where an all-zero chunk (of any length up to the chunk size) points: a
    /// hole, or the image's one stored chunk of zeros, written on first use into
    /// the current layer's blob (so a blob still depends only on its layer and
    /// the layers before it).
    fn zero_ref(&mut self, cur: &mut Option<Current>) -> Result<ChunkRef, BuildError> {
        if self.sparse_holes {
            return Ok(ChunkRef::Hole);
        }
        if let Some(&(device, blkaddr)) = self.dedup.get(&self.zero_digest) {
            return Ok(ChunkRef::Stored { device, blkaddr });
        }
        let device = self.device_for_current()?;
        let chunk_size = self.chunk_size;
        let zeros_len = self.zeros.len() as u64;
        let c = self.current(cur)?;
        let blkaddr = blkaddr_of(c.len)?;
        let mut off = 0;
        while off < chunk_size {
            let n = (chunk_size - off).min(zeros_len) as usize;
            c.file
                .as_file()
                .write_all_at(&self.zeros[..n], c.len + off)
                .map_err(|e| BuildError::Io {
                    path: c.file.path().to_path_buf(),
                    source: e,
                })?;
            c.hasher.update(&self.zeros[..n]);
            off += n as u64;
        }
        c.len += chunk_size;
        c.chunks += 1;
        self.dedup.insert(self.zero_digest, (device, blkaddr));
        Ok(ChunkRef::Stored { device, blkaddr })
    }

    fn device_for_current(&self) -> Result<u16, BuildError> {
        u16::try_from(self.blobs.len() + 1).map_err(|_| BuildError::TooLarge {
            what: "number of data blobs".into(),
        })
    }

    /// Store one file's chunks; returns its chunk map.
    fn add_file(
        &mut self,
        src: &FileSource,
        cur: &mut Option<Current>,
    ) -> Result<Vec<ChunkRef>, BuildError> {
        let ioerr = |e: io::Error| BuildError::Io {
            path: src.path.clone(),
            source: e,
        };
        let f = File::open(&src.path).map_err(ioerr)?;
        let nchunks = src.size.div_ceil(self.chunk_size);
        let mut refs = Vec::with_capacity(usize::try_from(nchunks).unwrap_or(0));
        for k in 0..nchunks {
            let start = k * self.chunk_size;
            let len = self.chunk_size.min(src.size - start);
            // Fast path: the whole chunk is a hole in the source file.
            match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(start)) {
                Ok(d) if d >= start + len => {
                    refs.push(self.zero_ref(cur)?);
                    continue;
                }
                Err(rustix::io::Errno::NXIO) => {
                    refs.push(self.zero_ref(cur)?);
                    continue;
                }
                _ => {}
            }
            let r = if len <= BUF_SIZE as u64 {
                self.chunk_buffered(&f, src, start, len as usize, cur)?
            } else {
                self.chunk_streamed(&f, src, start, len, cur)?
            };
            refs.push(r);
        }
        // A file that shrank may have looked like a trailing hole.
        if f.metadata().map_err(ioerr)?.len() != src.size {
            return Err(BuildError::FileChanged(src.path.clone()));
        }
        Ok(refs)
    }

    fn read_piece(f: &File, src: &FileSource, off: u64, buf: &mut [u8]) -> Result<(), BuildError> {
        f.read_exact_at(buf, off).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                BuildError::FileChanged(src.path.clone())
            } else {
                BuildError::Io {
                    path: src.path.clone(),
                    source: e,
                }
            }
        })
    }

    /// Chunk fits the buffer: read, hash, and write only if new.
    fn chunk_buffered(
        &mut self,
        f: &File,
        src: &FileSource,
        start: u64,
        len: usize,
        cur: &mut Option<Current>,
    ) -> Result<ChunkRef, BuildError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len, 0);
        let res = (|| {
            Self::read_piece(f, src, start, &mut buf)?;
            if is_zero(&buf) {
                return self.zero_ref(cur);
            }
            let digest: [u8; 32] = Sha256::digest(&buf).into();
            if let Some(&(device, blkaddr)) = self.dedup.get(&digest) {
                return Ok(ChunkRef::Stored { device, blkaddr });
            }
            let device = self.device_for_current()?;
            let pad = pad_len(len as u64);
            let zeros = &self.zeros[..pad as usize];
            let c = self.current(cur)?;
            let blkaddr = blkaddr_of(c.len)?;
            let path = c.file.path();
            let werr = |e| BuildError::Io {
                path: path.to_path_buf(),
                source: e,
            };
            let file = c.file.as_file();
            file.write_all_at(&buf, c.len).map_err(werr)?;
            file.write_all_at(zeros, c.len + len as u64).map_err(werr)?;
            c.hasher.update(&buf);
            c.hasher.update(zeros);
            c.len += len as u64 + pad;
            c.chunks += 1;
            self.dedup.insert(digest, (device, blkaddr));
            Ok(ChunkRef::Stored { device, blkaddr })
        })();
        self.buf = buf;
        res
    }

    /// Chunk larger than the buffer: stream it, writing speculatively once
    /// non-zero data shows up, and roll back on a duplicate.
    fn chunk_streamed(
        &mut self,
        f: &File,
        src: &FileSource,
        start: u64,
        len: u64,
        cur: &mut Option<Current>,
    ) -> Result<ChunkRef, BuildError> {
        let mut buf = std::mem::take(&mut self.buf);
        let res = (|| {
            let mut hasher = Sha256::new();
            let mut zero_prefix: u64 = 0;
            let mut writing = false;
            let mut done: u64 = 0;
            while done < len {
                let n = (len - done).min(BUF_SIZE as u64) as usize;
                buf.resize(n, 0);
                Self::read_piece(f, src, start + done, &mut buf)?;
                hasher.update(&buf);
                if !writing && is_zero(&buf) {
                    zero_prefix += n as u64;
                } else {
                    let zeros_len = self.zeros.len() as u64;
                    let c = self.current(cur)?;
                    let path = c.file.path().to_path_buf();
                    let werr = |e| BuildError::Io {
                        path: path.clone(),
                        source: e,
                    };
                    if !writing {
                        // Materialise the zero prefix seen so far.
                        let mut z = 0;
                        while z < zero_prefix {
                            let m = (zero_prefix - z).min(zeros_len) as usize;
                            c.file
                                .as_file()
                                .write_all_at(&self.zeros[..m], c.len + z)
                                .map_err(werr)?;
                            z += m as u64;
                        }
                        writing = true;
                    }
                    c.file
                        .as_file()
                        .write_all_at(&buf, c.len + done)
                        .map_err(werr)?;
                }
                done += n as u64;
            }
            if !writing {
                return self.zero_ref(cur);
            }
            let digest: [u8; 32] = hasher.finalize().into();
            let c = cur.as_mut().expect("writing implies a current blob");
            let path = c.file.path().to_path_buf();
            let werr = |e| BuildError::Io {
                path: path.clone(),
                source: e,
            };
            if let Some(&(device, blkaddr)) = self.dedup.get(&digest) {
                c.file.as_file().set_len(c.len).map_err(werr)?;
                return Ok(ChunkRef::Stored { device, blkaddr });
            }
            let device = self.device_for_current()?;
            let blkaddr = blkaddr_of(c.len)?;
            let pad = pad_len(len);
            c.file
                .as_file()
                .write_all_at(&self.zeros[..pad as usize], c.len + len)
                .map_err(werr)?;
            // Feed the committed bytes to the blob hash by reading them back
            // (they are in the page cache).
            let mut off = 0;
            while off < len + pad {
                let n = (len + pad - off).min(BUF_SIZE as u64) as usize;
                buf.resize(n, 0);
                c.file
                    .as_file()
                    .read_exact_at(&mut buf, c.len + off)
                    .map_err(werr)?;
                c.hasher.update(&buf);
                off += n as u64;
            }
            c.len += len + pad;
            c.chunks += 1;
            self.dedup.insert(digest, (device, blkaddr));
            Ok(ChunkRef::Stored { device, blkaddr })
        })();
        self.buf = buf;
        res
    }

    fn finish_layer(&mut self, cur: Option<Current>) -> Result<(), BuildError> {
        let Some(c) = cur else { return Ok(()) };
        if c.chunks == 0 {
            return Ok(());
        }
        let path = c.file.path().to_path_buf();
        let file = c.file;
        // Drop anything past the committed length (a rolled-back tail).
        file.as_file()
            .set_len(c.len)
            .and_then(|_| file.as_file().sync_data())
            .map_err(|e| BuildError::Io { path, source: e })?;
        self.blobs.push(BlobOut {
            file,
            digest: c.hasher.finalize().into(),
            size: c.len,
            chunks: c.chunks,
        });
        Ok(())
    }
}

fn pad_len(len: u64) -> u64 {
    len.next_multiple_of(BLOCK_SIZE) - len
}

fn blkaddr_of(off: u64) -> Result<u32, BuildError> {
    u32::try_from(off / BLOCK_SIZE)
        .ok()
        .filter(|&b| b != crate::layout::NULL_ADDR)
        .ok_or(BuildError::TooLarge {
            what: "data blob (more than 2^32-1 blocks)".into(),
        })
}

/// Write the data blobs for all layers. Returns the finished blobs (in
/// device table order) and the chunk map of every entry of `files`.
pub(crate) fn write_blobs(
    files: &[FileSource],
    layers: usize,
    out_dir: &Path,
    chunk_size: u32,
    sparse_holes: bool,
    progress: &crate::Progress,
) -> Result<(Vec<BlobOut>, Vec<Vec<ChunkRef>>), BuildError> {
    let zero_digest = {
        let mut h = Sha256::new();
        let zeros = vec![0u8; BUF_SIZE];
        let mut left = u64::from(chunk_size);
        while left > 0 {
            let n = left.min(BUF_SIZE as u64) as usize;
            h.update(&zeros[..n]);
            left -= n as u64;
        }
        h.finalize().into()
    };
    let mut w = Writer {
        sparse_holes,
        zero_digest,
        out_dir,
        chunk_size: u64::from(chunk_size),
        dedup: HashMap::new(),
        blobs: Vec::new(),
        buf: Vec::with_capacity(BUF_SIZE),
        zeros: vec![0u8; BUF_SIZE.max(BLOCK_SIZE as usize)],
    };
    let mut maps = Vec::with_capacity(files.len());
    let mut next = 0;
    for layer in 0..layers {
        let mut cur: Option<Current> = None;
        while next < files.len() && files[next].layer == layer {
            let refs = w.add_file(&files[next], &mut cur)?;
            progress.advance(files[next].size);
            maps.push(refs);
            next += 1;
        }
        w.finish_layer(cur)?;
    }
    debug_assert_eq!(next, files.len());
    Ok((w.blobs, maps))
}

/// Write `data` to a fresh temp file in `dir`.
pub(crate) fn temp_with(
    dir: &Path,
    prefix: &str,
    data: &[u8],
) -> Result<NamedTempFile, BuildError> {
    let ioerr = |e| BuildError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut t = NamedTempFile::with_prefix_in(prefix, dir).map_err(ioerr)?;
    t.write_all(data).map_err(ioerr)?;
    t.as_file().sync_data().map_err(ioerr)?;
    Ok(t)
}
