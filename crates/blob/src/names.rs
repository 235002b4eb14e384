//! The one place that names a data blob's stored form and checks that its two
//! files belong together.
//!
//! A data blob `<digest>` (its uncompressed bytes hash to `<digest>`) is stored as
//! `<digest>.table`, its chunk table, and `<digest>.zst`, its stored units
//! (zstd-compressed or raw). A table belongs to the blob when it declares that
//! digest; the stored units belong to the table when their length is the one the
//! table declares. Every reader and writer of stored blobs (a local directory, a
//! web server, a registry upload) names and checks them through this module.

use std::path::{Path, PathBuf};

use crate::ChunkTable;

/// File-name suffix of a stored blob's chunk table.
pub const TABLE_SUFFIX: &str = ".table";
/// File-name suffix of a stored blob's units.
pub const DATA_SUFFIX: &str = ".zst";

/// `<digest>.table`.
pub fn table_file(digest: &str) -> String {
    format!("{digest}{TABLE_SUFFIX}")
}

/// `<digest>.zst`.
pub fn data_file(digest: &str) -> String {
    format!("{digest}{DATA_SUFFIX}")
}

/// Where the stored form of `digest` lives in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPaths {
    /// `<dir>/<digest>.table`
    pub table: PathBuf,
    /// `<dir>/<digest>.zst`
    pub data: PathBuf,
}

impl StoredPaths {
    pub fn in_dir(dir: &Path, digest: &str) -> StoredPaths {
        StoredPaths {
            table: dir.join(table_file(digest)),
            data: dir.join(data_file(digest)),
        }
    }
}

/// Why the two files of a stored blob do not belong together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("the chunk table describes blob {actual}, expected {expected}")]
    WrongBlob { expected: String, actual: String },
    #[error("the stored data is {actual} bytes, its chunk table says {expected}")]
    DataSize { expected: u64, actual: u64 },
}

/// Checks that `table` is the chunk table of blob `digest` (hex, any case).
pub fn check_table_is_for(table: &ChunkTable, digest: &str) -> Result<(), Mismatch> {
    let actual = table.digest();
    if actual != digest.to_ascii_lowercase() {
        return Err(Mismatch::WrongBlob {
            expected: digest.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// Checks that `stored_len` bytes of stored units are what `table` describes.
pub fn check_stored_len(table: &ChunkTable, stored_len: u64) -> Result<(), Mismatch> {
    if stored_len != table.stored_size() {
        return Err(Mismatch::DataSize {
            expected: table.stored_size(),
            actual: stored_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(table_file("ab"), "ab.table");
        assert_eq!(data_file("ab"), "ab.zst");
        let p = StoredPaths::in_dir(Path::new("/d"), "ab");
        assert_eq!(p.table, Path::new("/d/ab.table"));
        assert_eq!(p.data, Path::new("/d/ab.zst"));
    }
}
