//! The OCI image vocabulary, in one place: media types ([`media_type`]),
//! content descriptors, image manifests and image indexes ([`Descriptor`],
//! [`ImageManifest`], [`ImageIndex`]), the `oci-layout` marker of an image
//! layout directory ([`ImageLayout`]), and how a lazypull image is laid out in
//! them ([`lazy`]), and a lazypull image's recorded prefetch order
//! ([`prefetch`]).
//!
//! Registries, image ingestion and publishing all speak these types; none of
//! them spells a media type or a descriptor field of its own. Parsing is as
//! lenient as the images in the wild need (a descriptor's `mediaType` may be
//! missing in an OCI layout's index); what a caller requires, it checks.
//!
//! Only data types and their validation live here: no I/O, no network.
#![forbid(unsafe_code)]

pub mod lazy;
pub mod media_type;
pub mod prefetch;
mod types;

pub use types::{Descriptor, ImageIndex, ImageLayout, ImageManifest, Platform};
