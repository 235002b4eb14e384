//! Serving the uncompressed blob from its stored form.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use lazypull_source::{BlobSource, RangeRead as StoredRead};
use sha2::{Digest, Sha256};

use crate::format::{ChunkTable, FormatError, UnitEntry, UnitKind};

/// An uncompressed blob served from its stored form: a [`BlobSource`] whose every
/// byte handed out belongs to a unit that hashed to its table entry.
#[derive(Debug)]
pub struct StoredBlob<R: StoredRead> {
    name: String,
    table: ChunkTable,
    stored: R,
}

/// Turns one unit's stored bytes into its verified uncompressed bytes. Reusable
/// across units (it keeps a zstd context); one per thread.
pub struct UnitDecoder {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl Default for UnitDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for UnitDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnitDecoder").finish_non_exhaustive()
    }
}

/// An `InvalidData` error naming blob `name` and unit `index`.
pub fn corrupt_unit(name: &str, index: u64, cause: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("blob {name}: unit {index}: {cause}"),
    )
}

impl UnitDecoder {
    pub fn new() -> Self {
        UnitDecoder { dctx: None }
    }

    /// Writes the uncompressed bytes of unit `index` (entry `e` of blob `name`)
    /// into `dst` (exactly `e.len` bytes), from `stored` (exactly its
    /// `e.stored_len` stored bytes). Succeeds only if they decompress to the
    /// declared length and hash to the entry's SHA-256; on error `dst` is
    /// zeroed, so it never keeps unverified bytes.
    pub fn decode(
        &mut self,
        name: &str,
        index: u64,
        e: &UnitEntry,
        stored: &[u8],
        dst: &mut [u8],
    ) -> io::Result<()> {
        let result = self.decode_unchecked(name, index, e, stored, dst);
        if result.is_err() {
            dst.fill(0);
        }
        result
    }

    fn decode_unchecked(
        &mut self,
        name: &str,
        index: u64,
        e: &UnitEntry,
        stored: &[u8],
        dst: &mut [u8],
    ) -> io::Result<()> {
        if dst.len() != e.len as usize || stored.len() != e.stored_len as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "blob {name}: unit {index}: buffers of {} / {} bytes for a unit of {} / {} bytes",
                    dst.len(),
                    stored.len(),
                    e.len,
                    e.stored_len
                ),
            ));
        }
        match e.kind {
            UnitKind::Raw => dst.copy_from_slice(stored),
            UnitKind::Zstd => {
                if self.dctx.is_none() {
                    self.dctx = Some(zstd::bulk::Decompressor::new().map_err(|err| {
                        io::Error::new(err.kind(), format!("zstd decompressor: {err}"))
                    })?);
                }
                let dctx = self.dctx.as_mut().expect("just set");
                // `dst` is exactly the declared length, so a frame that would
                // produce more fails here instead of growing anything.
                let n = dctx.decompress_to_buffer(stored, dst).map_err(|err| {
                    corrupt_unit(
                        name,
                        index,
                        format_args!(
                            "zstd decompression failed (declared length {}): {err}",
                            e.len
                        ),
                    )
                })?;
                if n != dst.len() {
                    return Err(corrupt_unit(
                        name,
                        index,
                        format_args!("decompressed to {n} bytes, declared {}", e.len),
                    ));
                }
            }
        }
        let actual = Sha256::digest(&*dst);
        if actual.as_slice() != e.sha256 {
            return Err(corrupt_unit(
                name,
                index,
                format_args!(
                    "sha256 mismatch: expected {}, got {}",
                    hex::encode(e.sha256),
                    hex::encode(actual)
                ),
            ));
        }
        Ok(())
    }
}

/// Per-call working memory: at most one stored unit and one uncompressed unit.
struct Work {
    stored: Vec<u8>,
    unit: Vec<u8>,
    decoder: UnitDecoder,
}

impl<R: StoredRead> StoredBlob<R> {
    pub fn new(name: String, table: ChunkTable, stored: R) -> Self {
        StoredBlob {
            name,
            table,
            stored,
        }
    }

    pub fn table(&self) -> &ChunkTable {
        &self.table
    }

    pub fn stored(&self) -> &R {
        &self.stored
    }

    /// Its name, chunk table and stored bytes, for a caller that serves them
    /// another way (the engine's fetcher).
    pub fn into_parts(self) -> (String, ChunkTable, R) {
        (self.name, self.table, self.stored)
    }

    /// Reads unit `index`'s stored bytes and decodes them into `dst`.
    fn load_unit(&self, index: u64, e: &UnitEntry, dst: &mut [u8], w: &mut Work) -> io::Result<()> {
        w.stored.resize(e.stored_len as usize, 0);
        if let Err(err) = read_stored(&self.name, index, e, &self.stored, &mut w.stored) {
            dst.fill(0);
            return Err(err);
        }
        w.decoder.decode(&self.name, index, e, &w.stored, dst)
    }
}

/// Reads unit `index`'s stored bytes into `buf`, naming the blob and unit in
/// errors (a short read is corruption: the table promised those bytes).
pub fn read_stored(
    name: &str,
    index: u64,
    e: &UnitEntry,
    stored: &dyn StoredRead,
    buf: &mut [u8],
) -> io::Result<()> {
    stored
        .read_exact_at(buf, e.stored_offset)
        .map_err(|err| match err.kind() {
            io::ErrorKind::UnexpectedEof => corrupt_unit(
                name,
                index,
                format_args!(
                    "stored data truncated (need bytes {:?}): {err}",
                    e.stored_range()
                ),
            ),
            kind => io::Error::new(
                kind,
                format!(
                    "blob {name}: unit {index}: reading stored bytes {:?}: {err}",
                    e.stored_range()
                ),
            ),
        })
}

impl<R: StoredRead> BlobSource for StoredBlob<R> {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.table.uncompressed_size()
    }

    /// A whole unit: reading less still decompresses and verifies all of it.
    fn preferred_read_size(&self) -> Option<usize> {
        Some(self.table.unit_size() as usize)
    }

    /// Whole units covered by the request are decompressed straight into `buf`
    /// (and zeroed again if they fail verification); partly covered units go
    /// through a scratch buffer and are verified before any byte is copied.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let size = self.table.uncompressed_size();
        let end = off.saturating_add(buf.len() as u64).min(size);
        if off >= end {
            return Ok(0);
        }
        let mut w = Work {
            stored: Vec::new(),
            unit: Vec::new(),
            decoder: UnitDecoder::new(),
        };
        for index in self.table.units_for(off, end - off) {
            let e = self.table.unit(index).expect("index from units_for");
            let from = off.max(e.offset);
            let to = end.min(e.offset + u64::from(e.len));
            let dst = &mut buf[(from - off) as usize..(to - off) as usize];
            if from == e.offset && dst.len() == e.len as usize {
                self.load_unit(index, e, dst, &mut w)?;
            } else {
                let mut unit = std::mem::take(&mut w.unit);
                unit.resize(e.len as usize, 0);
                let result = self.load_unit(index, e, &mut unit, &mut w);
                if result.is_ok() {
                    let at = (from - e.offset) as usize;
                    dst.copy_from_slice(&unit[at..at + dst.len()]);
                }
                w.unit = unit;
                result?;
            }
        }
        Ok((end - off) as usize)
    }
}

/// Why [`open_local`] could not open a stored blob.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoredError {
    #[error(transparent)]
    Name(#[from] lazypull_source::OpenError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("chunk table {path} is corrupt: {source}")]
    Table { path: PathBuf, source: FormatError },
    #[error("chunk table {path} describes blob {actual}, expected {expected}")]
    WrongBlob {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("stored data {path} is missing (its chunk table exists)")]
    MissingData { path: PathBuf },
    #[error("stored data {path} is {actual} bytes, its chunk table says {expected}")]
    DataSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
}

impl OpenStoredError {
    /// The errno a transport should report for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            OpenStoredError::Name(e) => e.errno(),
            OpenStoredError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            OpenStoredError::MissingData { .. } => libc::ENOENT,
            _ => libc::EIO,
        }
    }
}

/// Opens the stored form of blob `digest` in `dir`: `None` when
/// `<digest>.table` does not exist (the caller may fall back to a plain
/// `<digest>` file); an error when the table exists but is unreadable, corrupt
/// or for another blob, or when `<digest>.zst` is missing or of the wrong length.
pub fn open_local(dir: &Path, digest: &str) -> Result<Option<StoredBlob<File>>, OpenStoredError> {
    let name = lazypull_source::validate_name(digest.as_bytes())?;
    let crate::StoredPaths {
        table: table_path,
        data: data_path,
    } = crate::StoredPaths::in_dir(dir, name);
    let bytes = match std::fs::read(&table_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(OpenStoredError::Io {
                op: "reading",
                path: table_path,
                source,
            })
        }
    };
    let table = ChunkTable::decode(&bytes).map_err(|source| OpenStoredError::Table {
        path: table_path.clone(),
        source,
    })?;
    if let Err(crate::names::Mismatch::WrongBlob { expected, actual }) =
        crate::names::check_table_is_for(&table, name)
    {
        return Err(OpenStoredError::WrongBlob {
            path: table_path,
            expected,
            actual,
        });
    }
    let file = match File::open(&data_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OpenStoredError::MissingData { path: data_path })
        }
        Err(source) => {
            return Err(OpenStoredError::Io {
                op: "opening",
                path: data_path,
                source,
            })
        }
    };
    let len = file
        .metadata()
        .map_err(|source| OpenStoredError::Io {
            op: "inspecting",
            path: data_path.clone(),
            source,
        })?
        .len();
    if let Err(crate::names::Mismatch::DataSize { expected, actual }) =
        crate::names::check_stored_len(&table, len)
    {
        return Err(OpenStoredError::DataSize {
            path: data_path,
            expected,
            actual,
        });
    }
    Ok(Some(StoredBlob::new(name.to_owned(), table, file)))
}
