//! Writing the stored form of an uncompressed blob.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::format::{self, ChunkTable, FormatError, StoredUnit, UnitKind};

/// How units are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Every unit raw.
    None,
    /// zstd at `level`; a unit that does not shrink is stored raw.
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 3 }
    }
}

/// Options for [`pack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// Unit size: a power of two in `[64 KiB, 64 MiB]`.
    pub unit_size: u32,
    pub compression: Compression,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            unit_size: format::DEFAULT_UNIT_SIZE,
            compression: Compression::default(),
        }
    }
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// Lowercase hex SHA-256 of the uncompressed blob.
    pub digest: String,
    pub uncompressed_size: u64,
    /// Length of `<digest>.zst`.
    pub stored_size: u64,
    /// Length of `<digest>.table`.
    pub table_size: u64,
    pub units: u64,
    /// Units stored raw (incompressible, or `Compression::None`).
    pub raw_units: u64,
    pub data_path: PathBuf,
    pub table_path: PathBuf,
}

/// Why [`pack`] failed. No final files are left behind on failure.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("invalid pack options: {0}")]
    Options(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("blob {path} has sha256 {actual}, but its name says {expected}")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("compressing unit {unit} of {path}: {source}")]
    Compress {
        path: PathBuf,
        unit: u64,
        source: io::Error,
    },
    #[error("blob {path} is too large for its unit size")]
    TooLarge { path: PathBuf },
    #[error("internal: built an invalid chunk table: {0}")]
    Table(#[from] FormatError),
}

/// The digest a file name claims, when it is exactly 64 hex digits.
pub(crate) fn name_digest(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

/// Reads until `buf` is full or the reader is at its end; returns the count.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads the uncompressed blob at `blob_path` one unit at a time and writes
/// `<digest>.zst` and `<digest>.table` into `out_dir`.
///
/// When the file name is a 64-hex digest, the content must hash to it. Both
/// files are written under temporary names, synced, and renamed at the end,
/// the data first, so a present table implies complete data.
pub fn pack(blob_path: &Path, out_dir: &Path, opts: &PackOptions) -> Result<Packed, PackError> {
    format::check_unit_size(opts.unit_size).map_err(|e| PackError::Options(e.to_string()))?;
    let mut compressor = match opts.compression {
        Compression::None => None,
        Compression::Zstd { level } => {
            if !zstd::compression_level_range().contains(&level) {
                return Err(PackError::Options(format!(
                    "zstd level {level} outside {:?}",
                    zstd::compression_level_range()
                )));
            }
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| PackError::Options(e.to_string()))?;
            Some(c)
        }
    };
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| PackError::Io { op, path, source }
    };
    let mut input = File::open(blob_path).map_err(io_err("opening", blob_path))?;
    let mut data_tmp = tempfile::Builder::new()
        .prefix(".lazypull-blob-")
        .suffix(&format!("{}.tmp", crate::names::DATA_SUFFIX))
        .tempfile_in(out_dir)
        .map_err(io_err("creating a temporary file in", out_dir))?;
    let unit_size = opts.unit_size as usize;
    let mut unit = vec![0u8; unit_size];
    let mut packed_buf: Vec<u8> = Vec::with_capacity(zstd::zstd_safe::compress_bound(unit_size));
    let mut whole = Sha256::new();
    let mut units = Vec::new();
    let mut size = 0u64;
    loop {
        let n = read_full(&mut input, &mut unit).map_err(io_err("reading", blob_path))?;
        if n == 0 {
            break;
        }
        let bytes = &unit[..n];
        whole.update(bytes);
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        let mut stored: &[u8] = bytes;
        let mut kind = UnitKind::Raw;
        if let Some(c) = compressor.as_mut() {
            packed_buf.clear();
            c.compress_to_buffer(bytes, &mut packed_buf)
                .map_err(|source| PackError::Compress {
                    path: blob_path.to_owned(),
                    unit: units.len() as u64,
                    source,
                })?;
            if packed_buf.len() < n {
                stored = &packed_buf;
                kind = UnitKind::Zstd;
            }
        }
        data_tmp
            .write_all(stored)
            .map_err(io_err("writing", data_tmp.path()))?;
        units.push(StoredUnit {
            stored_len: stored.len() as u32,
            kind,
            sha256,
        });
        size = size
            .checked_add(n as u64)
            .ok_or_else(|| PackError::TooLarge {
                path: blob_path.to_owned(),
            })?;
        if n < unit_size {
            break;
        }
    }
    let digest_bytes: [u8; 32] = whole.finalize().into();
    let digest = hex::encode(digest_bytes);
    if let Some(expected) = name_digest(blob_path) {
        if expected != digest {
            return Err(PackError::DigestMismatch {
                path: blob_path.to_owned(),
                expected,
                actual: digest,
            });
        }
    }
    let table = ChunkTable::from_units(opts.unit_size, size, digest_bytes, &units)?;
    let table_bytes = table.encode();
    let mut table_tmp = tempfile::Builder::new()
        .prefix(".lazypull-blob-")
        .suffix(&format!("{}.tmp", crate::names::TABLE_SUFFIX))
        .tempfile_in(out_dir)
        .map_err(io_err("creating a temporary file in", out_dir))?;
    table_tmp
        .write_all(&table_bytes)
        .map_err(io_err("writing", table_tmp.path()))?;
    for tmp in [&data_tmp, &table_tmp] {
        tmp.as_file()
            .sync_all()
            .map_err(io_err("syncing", tmp.path()))?;
    }
    let crate::StoredPaths {
        table: table_path,
        data: data_path,
    } = crate::StoredPaths::in_dir(out_dir, &digest);
    data_tmp.persist(&data_path).map_err(|e| PackError::Io {
        op: "renaming into place",
        path: data_path.clone(),
        source: e.error,
    })?;
    table_tmp.persist(&table_path).map_err(|e| PackError::Io {
        op: "renaming into place",
        path: table_path.clone(),
        source: e.error,
    })?;
    Ok(Packed {
        digest,
        uncompressed_size: size,
        stored_size: table.stored_size(),
        table_size: table_bytes.len() as u64,
        units: table.unit_count(),
        raw_units: units.iter().filter(|u| u.kind == UnitKind::Raw).count() as u64,
        data_path,
        table_path,
    })
}
