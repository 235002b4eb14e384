//! How a lazypull image is stored in an OCI registry: an ordinary OCI image
//! manifest whose config and layers carry lazypull media types, so any
//! registry stores it unchanged.
//!
//! * config (`application/vnd.lazypull.image.config.v1+json`): [`ImageConfig`],
//!   the map from the kernel's names (the meta blob's and data blobs'
//!   uncompressed SHA-256) to the registry blobs that hold them;
//! * layers, in this order: the meta blob (raw, so its registry digest is its
//!   own SHA-256), then per data blob its chunk table and its stored data,
//!   each annotated with the data blob's uncompressed digest.
//!
//! Only data types and their validation live here: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{media_type, Descriptor, ImageManifest};

/// The media type of a lazypull image's manifest: an ordinary OCI manifest.
pub const MANIFEST_MEDIA_TYPE: &str = media_type::OCI_MANIFEST;
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.lazypull.image.config.v1+json";
pub const META_MEDIA_TYPE: &str = "application/vnd.lazypull.meta.v1.erofs";
pub const TABLE_MEDIA_TYPE: &str = "application/vnd.lazypull.chunk-table.v1";
pub const DATA_MEDIA_TYPE: &str = "application/vnd.lazypull.blob.v1.units";
/// Annotation naming the data blob (uncompressed digest, hex) a layer belongs to.
pub const BLOB_ANNOTATION: &str = "org.lazypull.blob";
/// The config format version this build reads and writes.
pub const CONFIG_VERSION: u32 = 1;

/// A registry blob: `sha256:<hex>` and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

/// One data blob of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataBlob {
    /// SHA-256 (hex) of the uncompressed blob: its device tag, the kernel's name.
    pub digest: String,
    /// Uncompressed size.
    pub size: u64,
    /// The chunk table.
    pub table: BlobRef,
    /// The stored data (units).
    pub data: BlobRef,
}

/// The image config: everything the daemon needs besides the blobs themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub lazypull: u32,
    /// The meta blob (registry digest = `sha256:` + its hex name).
    pub meta: BlobRef,
    pub chunk_size: u32,
    /// Data blobs in device table order.
    pub blobs: Vec<DataBlob>,
}

/// A lazypull image's manifest is an ordinary OCI image manifest.
pub type Manifest = ImageManifest;

/// Why a manifest or config is not a usable lazypull image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a lazypull image: its config media type is {0:?} (expected {CONFIG_MEDIA_TYPE}); convert ordinary images with `lazypull convert`")]
    NotLazypull(String),
    #[error("malformed manifest: {0}")]
    Manifest(String),
    #[error("malformed lazypull image config: {0}")]
    Config(String),
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_ref(what: &str, r: &BlobRef) -> Result<(), ImageError> {
    match r.digest.strip_prefix("sha256:") {
        Some(hex) if is_hex64(hex) => Ok(()),
        _ => Err(ImageError::Config(format!(
            "{what}: digest {:?} is not sha256:<64 lowercase hex>",
            r.digest
        ))),
    }
}

impl ImageConfig {
    /// Parses and validates a config.
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig, ImageError> {
        let c: ImageConfig =
            serde_json::from_slice(bytes).map_err(|e| ImageError::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ImageError> {
        if self.lazypull != CONFIG_VERSION {
            return Err(ImageError::Config(format!(
                "format version {} (this lazypull reads {CONFIG_VERSION})",
                self.lazypull
            )));
        }
        check_ref("meta", &self.meta)?;
        if self.meta.size == 0 {
            return Err(ImageError::Config("meta blob of size 0".into()));
        }
        for (i, b) in self.blobs.iter().enumerate() {
            if !is_hex64(&b.digest) {
                return Err(ImageError::Config(format!(
                    "blob {i}: digest {:?} is not 64 lowercase hex",
                    b.digest
                )));
            }
            check_ref(&format!("blob {i} table"), &b.table)?;
            check_ref(&format!("blob {i} data"), &b.data)?;
        }
        Ok(())
    }

    /// The meta blob's hex name (its EROFS `fsid`).
    pub fn meta_hex(&self) -> &str {
        self.meta.digest.trim_start_matches("sha256:")
    }

    /// The manifest for this config, whose serialized bytes are `config_bytes`.
    pub fn manifest(&self, config_bytes: &[u8]) -> Manifest {
        use sha2::{Digest, Sha256};
        let annotated = |media: &str, r: &BlobRef, blob: &str| Descriptor {
            annotations: BTreeMap::from([(BLOB_ANNOTATION.to_owned(), blob.to_owned())]),
            ..Descriptor::new(media, r.digest.clone(), r.size)
        };
        let mut layers = vec![Descriptor::new(
            META_MEDIA_TYPE,
            self.meta.digest.clone(),
            self.meta.size,
        )];
        for b in &self.blobs {
            layers.push(annotated(TABLE_MEDIA_TYPE, &b.table, &b.digest));
            layers.push(annotated(DATA_MEDIA_TYPE, &b.data, &b.digest));
        }
        Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
            config: Descriptor::new(
                CONFIG_MEDIA_TYPE,
                format!("sha256:{}", hex::encode(Sha256::digest(config_bytes))),
                config_bytes.len() as u64,
            ),
            layers,
            annotations: BTreeMap::new(),
        }
    }
}

impl ImageManifest {
    /// Parses a manifest and checks that it is a lazypull image.
    pub fn parse_lazypull(bytes: &[u8]) -> Result<ImageManifest, ImageError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ImageError::Manifest(e.to_string()))?;
        if m.schema_version != 2 {
            return Err(ImageError::Manifest(format!(
                "schemaVersion {}",
                m.schema_version
            )));
        }
        if m.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(ImageError::NotLazypull(m.config.media_type));
        }
        check_ref(
            "config",
            &BlobRef {
                digest: m.config.digest.clone(),
                size: m.config.size,
            },
        )?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn config() -> ImageConfig {
        ImageConfig {
            lazypull: CONFIG_VERSION,
            meta: BlobRef {
                digest: format!("sha256:{}", hex('a')),
                size: 8192,
            },
            chunk_size: 1 << 20,
            blobs: vec![DataBlob {
                digest: hex('b'),
                size: 1 << 20,
                table: BlobRef {
                    digest: format!("sha256:{}", hex('c')),
                    size: 152,
                },
                data: BlobRef {
                    digest: format!("sha256:{}", hex('d')),
                    size: 1000,
                },
            }],
        }
    }

    #[test]
    fn config_round_trips_and_manifest_lists_every_blob() {
        let c = config();
        let bytes = serde_json::to_vec(&c).unwrap();
        assert_eq!(ImageConfig::parse(&bytes).unwrap(), c);
        let m = c.manifest(&bytes);
        let mbytes = serde_json::to_vec(&m).unwrap();
        let parsed = Manifest::parse_lazypull(&mbytes).unwrap();
        assert_eq!(parsed, m);
        let digests: Vec<_> = m.layers.iter().map(|l| &l.digest[7..8]).collect();
        assert_eq!(digests, ["a", "c", "d"]);
        assert_eq!(m.layers[1].annotations[BLOB_ANNOTATION], hex('b'));
        assert_eq!(c.meta_hex(), hex('a'));
        // The JSON uses OCI's field names.
        let text = String::from_utf8(mbytes).unwrap();
        assert!(text.contains("\"schemaVersion\":2") && text.contains("\"mediaType\""));
    }

    #[test]
    fn bad_configs_and_foreign_manifests_are_refused() {
        let mut c = config();
        c.blobs[0].data.digest = "sha256:xyz".into();
        let err = ImageConfig::parse(&serde_json::to_vec(&c).unwrap()).unwrap_err();
        assert!(err.to_string().contains("blob 0 data"), "{err}");
        let mut c = config();
        c.lazypull = 9;
        assert!(ImageConfig::parse(&serde_json::to_vec(&c).unwrap()).is_err());
        assert!(ImageConfig::parse(b"{").is_err());

        let foreign = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},"layers":[]}"#;
        let err = Manifest::parse_lazypull(foreign).unwrap_err();
        assert!(err.to_string().contains("lazypull convert"), "{err}");
    }
}
