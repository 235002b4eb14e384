//! The *stored* form of lazypull data blobs.
//!
//! A data blob, as the kernel sees it, is an uncompressed byte space named by
//! its SHA-256. What a backend holds (a local directory now, a registry later)
//! is its stored form: the blob cut into fixed-size units, each zstd-compressed
//! or raw, plus a chunk table mapping every unit to its stored bytes and the
//! SHA-256 of its uncompressed bytes ([`format`] describes the bytes exactly).
//!
//! This crate owns that format, writing it ([`pack`]) and turning stored bytes
//! back into verified uncompressed bytes ([`StoredBlob`], a
//! [`lazypull_source::BlobSource`]): a byte is only ever handed out as part of
//! a unit that decompressed to its declared length and hashed to its table
//! entry; anything else is an `InvalidData` error, never wrong bytes.
//!
//! It must not know the kernel, EROFS, or where stored bytes live: it reads them
//! through the small [`StoredRead`] trait.
#![forbid(unsafe_code)]

pub mod format;
pub mod names;
mod pack;
mod read;

pub use format::{ChunkTable, FormatError, UnitEntry, UnitKind};
pub use lazypull_source::RangeRead as StoredRead;
pub use names::StoredPaths;
pub use pack::{pack, Compression, PackError, PackOptions, Packed};
pub use read::{corrupt_unit, open_local, read_stored, OpenStoredError, StoredBlob, UnitDecoder};

#[cfg(test)]
mod tests;
