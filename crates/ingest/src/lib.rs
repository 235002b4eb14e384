//! `lazypull-ingest` reads image sources — what users have — into lazypull
//! EROFS images: a layer directory, a tar layer (plain or gzip), an OCI image
//! layout directory, or a `docker save` archive ([`build_from_source`]); and
//! hands back the source image's config, verified, for the lazy image's
//! runtime config ([`build_source_image`]).
//!
//! It owns telling these formats apart (by content, never by file name),
//! selecting the image and its layers (OCI indexes and manifests, the
//! `docker save` `manifest.json`), checking blobs against their descriptors,
//! and extracting tar layers, streaming and without privileges, into private
//! temporary directories whose entries' metadata is recorded from the tar
//! headers. Hostile or broken input (paths leaving the root, writes through
//! symlinks, dangling hard links, truncated or corrupt archives, malformed
//! JSON, missing blobs, digest mismatches) is refused with a clear
//! [`IngestError`], and leaves no image behind.
//!
//! It must not touch the EROFS on-disk format — merging layers and writing
//! the image is `lazypull-erofs`'s ([`lazypull_erofs::build_from_layer_inputs`]);
//! nor the network (sources are local files and directories; registries are
//! other crates'), nor the kernel (nothing is mounted). OCI media types and
//! descriptors come from `lazypull-oci`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod extract;
mod source;

use std::path::PathBuf;

use lazypull_erofs::BuildError;

pub use source::{
    build_from_source, build_from_source_with, build_source_image, SourceConfig, SourceImage,
};

/// Default of [`IngestOptions::max_layer_size`]: 32 GiB. Above ordinary
/// layers (even toolkit and model layers of a few GB; bigger ones can raise
/// it), yet a decompression bomb or a sparse entry of 2^60 bytes stops long
/// before it fills the disk.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 32 << 30;

/// Limits on what reading a source may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestOptions {
    /// Most bytes one tar layer may expand to: its decompressed stream, and
    /// the file bytes its entries declare (a GNU sparse file counts at its
    /// full size, holes included, as that is what extraction writes). A
    /// layer past it is refused with [`IngestError::TooLarge`] before the
    /// bytes that would cross it are written.
    pub max_layer_size: u64,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            max_layer_size: DEFAULT_MAX_LAYER_SIZE,
        }
    }
}

/// Errors from [`build_from_source`]: the source's own faults, or the
/// build's ([`BuildError`], shown as is).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Building the image failed (I/O, options, what EROFS cannot represent).
    #[error(transparent)]
    Build(#[from] BuildError),
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
    /// A layer expands to more than [`IngestOptions::max_layer_size`].
    #[error(
        "layer {layer}: {what}, more than the limit of {limit} bytes one layer may expand to \
         (lazypull build --max-layer-size): refusing it"
    )]
    TooLarge {
        /// Which layer (source path or digest).
        layer: String,
        /// What crossed the limit.
        what: String,
        /// The limit.
        limit: u64,
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
}

/// An I/O error on `path`, as the builder reports them.
fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
    move |source| {
        IngestError::Build(BuildError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use lazypull_erofs::BuildOptions;

    use super::*;

    #[test]
    fn build_errors_pass_through_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = BuildOptions {
            chunk_size: 1000,
            ..BuildOptions::default()
        };
        let err = build_from_source(tmp.path(), &tmp.path().join("out"), &opts).unwrap_err();
        assert!(
            matches!(err, IngestError::Build(BuildError::InvalidChunkSize(1000))),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            BuildError::InvalidChunkSize(1000).to_string()
        );
        // An I/O error reads as the builder's, with the same cause below it.
        let missing = tmp.path().join("missing");
        let err = build_from_source(&missing, &tmp.path().join("out"), &BuildOptions::default())
            .unwrap_err();
        assert!(
            matches!(err, IngestError::Build(BuildError::Io { .. })),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .starts_with(&format!("{}: ", missing.display())));
        let cause = err.source().expect("the io::Error");
        assert!(
            cause.downcast_ref::<std::io::Error>().is_some(),
            "{cause:?}"
        );
    }
}
