//! The seams between lazypull's layers, with no network and no kernel in them.
//!
//! A blob is named by the key the kernel uses for it (an EROFS `fsid` or a device
//! tag, normally a sha256 hex digest). This crate owns:
//!
//! - [`BlobSource`]: a blob as the engine and the transports see it, positional
//!   reads of its (uncompressed) bytes, with [`Priority`] and [`SourceStats`];
//! - [`RangeRead`]: a backend as the engine sees it, exact reads of a blob's
//!   *stored* bytes, whatever carries them (a file, HTTP, a registry);
//! - [`BlobResolver`]: how a transport turns what the kernel named into a blob;
//! - name validation ([`validate_name`]: a name from the kernel must never escape
//!   a directory) and [`OpenError`], which maps to the errno a transport hands back;
//! - [`LocalDir`]: blobs that are files in one directory, the one backend with no
//!   network.
//!
//! Everything above the kernel edge and below the network depends on this crate,
//! so it must not depend on an HTTP client, TLS, the kernel protocols, the image
//! format or the stored-blob format. Network backends live in `lazypull-backend`.
#![forbid(unsafe_code)]

mod local;
mod name;
mod resolver;
mod source;

pub use local::{LocalBlob, LocalDir};
pub use name::{validate_name, OpenError};
pub use resolver::BlobResolver;
pub use source::{
    BlobSource, Priority, RangeBlob, RangeRead, ReadHold, SourceCounters, SourceStats,
};
