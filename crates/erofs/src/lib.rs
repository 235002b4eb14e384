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
//! This crate does no I/O beyond the readers, writers and paths it is
//! handed, and knows nothing of the kernel's cachefiles protocol or of
//! daemons. The on-disk structures live in [`layout`]; [`build_from_layers`]
//! writes images from layer directories, [`build_from_source`] from a
//! directory, a tar layer, an OCI image layout or a `docker save` archive; [`Image`] parses and validates them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod blob;
mod build;
mod extract;
pub mod layout;
mod meta;
mod progress;
mod reader;
mod source;
#[cfg(test)]
mod tests;
mod tree;

pub use build::{build_from_layers, BlobInfo, BuildOptions, BuiltImage, Manifest, MANIFEST_FILE};
pub use progress::{BuildProgress, Progress, Stage};
pub use reader::{
    ChunkEntry, ChunkMap, DirEntry, Extent, Image, Inode, ReadError, WalkEntry, Xattr,
};
pub use source::build_from_source;

use std::path::PathBuf;

/// Errors from [`build_from_layers`] and [`build_from_source`].
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
    /// A layer archive is unreadable: truncated tar, corrupt compression,
    /// unsupported compression.
    #[error("layer {layer}: {reason}")]
    InvalidArchive {
        /// Which layer (source path or digest).
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer archive entry is hostile or inconsistent (path leaving the
    /// root, write through a symlink, dangling hard link, ...).
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    InvalidEntry {
        /// Which layer (source path or digest).
        layer: String,
        /// The entry's path as stored in the archive.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// An image source (OCI layout, `docker save` archive) is malformed,
    /// incomplete, ambiguous or unsupported.
    #[error("{}: {reason}", path.display())]
    InvalidSource {
        /// File or directory at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A blob's content does not match its descriptor's digest (or size).
    #[error(
        "layer {layer}: content does not match its descriptor: expected {expected}, got {actual}"
    )]
    DigestMismatch {
        /// Which layer (or blob).
        layer: String,
        /// Digest (and size) from the descriptor.
        expected: String,
        /// Digest (and size) of the content.
        actual: String,
    },
    /// A size or count exceeds the format's limits.
    #[error("too large: {what}")]
    TooLarge {
        /// What overflowed.
        what: String,
    },
}
