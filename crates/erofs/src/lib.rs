//! `lazypull-erofs` owns the EROFS on-disk format for lazypull: it builds
//! chunked, multi-blob EROFS images from layer directories and reads them
//! back.
//!
//! An image is a *meta blob* (a complete EROFS filesystem image with 4 KiB
//! blocks: superblock, device table, inodes, xattrs, directories, symlinks
//! and chunk indexes) plus one *data blob* per layer that contributed file
//! data. Regular file contents are cut into `chunk_size` chunks,
//! deduplicated by SHA-256 across files and layers, and referenced from the
//! meta blob as (device id, block address) pairs, so the kernel can mount the
//! meta blob with the data blobs as extra devices:
//!
//! ```text
//! mount -t erofs -o ro,device=BLOB1,device=BLOB2 META MOUNTPOINT
//! ```
//!
//! `lazypull build` then appends a [blob trailer](trailer) to the meta blob,
//! after the last block the superblock counts (the kernel never reads it):
//! each data blob's chunk table by sha256 and size, so the meta blob's own
//! sha256 (the fsid) vouches for every byte an image serves.
//!
//! This crate does no I/O beyond the readers, writers and paths it is
//! handed, and knows nothing of the kernel's cachefiles protocol, of daemons
//! or of image archives. The on-disk structures live in [`layout`];
//! [`build_from_layers`] writes images from layer directories;
//! [`Image`] parses and validates them.
//!
//! Reading what users have (tar layers, OCI image layouts, `docker save`
//! archives) is `lazypull-ingest`'s job: it extracts archive layers to
//! directories, records each entry's metadata from its header in a
//! [`LayerMeta`], and builds with [`build_from_layer_inputs`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod blob;
mod build;
pub mod layout;
mod meta;
mod progress;
mod reader;
#[cfg(test)]
mod tests;
pub mod trailer;
mod tree;

pub use build::seal_output;
pub use build::{
    build_from_layer_inputs, build_from_layers, BlobInfo, BuildOptions, BuiltImage, LayerInput,
    Manifest, MANIFEST_FILE,
};
pub use progress::{BuildProgress, Progress, Stage};
pub use reader::{
    ChunkEntry, ChunkMap, DirEntry, Extent, Image, Inode, ReadError, WalkEntry, Xattr,
};
pub use trailer::{append_trailer, TableRef, Trailer, TrailerEntry, TrailerError};
pub use tree::{check_xattrs, EntryMeta, LayerMeta, Meta, Special, XattrList};

use std::path::PathBuf;

/// Errors from [`build_from_layers`] and [`build_from_layer_inputs`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An I/O error on a path.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `chunk_size` is not a power of two >= 4096 (or too large).
    #[error("invalid chunk size {0}: must be a power of two between 4096 and 2^31")]
    InvalidChunkSize(u32),
    /// No layers given.
    #[error("no layers given")]
    NoLayers,
    /// A layer path is not a directory.
    #[error("{}: layer is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// An xattr name fits none of the standard EROFS name indexes
    /// (`user.`, `trusted.`, `security.`, `system.posix_acl_access`,
    /// `system.posix_acl_default`).
    #[error("{}: xattr {name:?} has a prefix EROFS cannot index (allowed: user., trusted., security., system.posix_acl_access, system.posix_acl_default)", path.display())]
    UnsupportedXattr {
        /// File carrying the xattr.
        path: PathBuf,
        /// Full xattr name.
        name: String,
    },
    /// An xattr name or value is too long for the on-disk fields.
    #[error("{}: xattr {name:?} is too large", path.display())]
    XattrTooLarge {
        /// File carrying the xattr.
        path: PathBuf,
        /// Full xattr name.
        name: String,
    },
    /// A file name is longer than 255 bytes.
    #[error("{}: file name longer than 255 bytes", .0.display())]
    NameTooLong(PathBuf),
    /// A regular file shrank while it was being read.
    #[error("{}: file changed while building (shorter than its size)", .0.display())]
    FileChanged(PathBuf),
    /// Something this builder cannot represent.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported {
        /// Path involved.
        path: PathBuf,
        /// What is unsupported.
        what: String,
    },
    /// A size or count exceeds the format's limits.
    #[error("too large: {what}")]
    TooLarge {
        /// What overflowed.
        what: String,
    },
}
