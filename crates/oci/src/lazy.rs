//! How a lazypull image is stored in an OCI registry (image format 2): an
//! OCI image manifest that any registry stores and containerd pulls, whose
//! config is the source image's runtime config and whose layers are lazypull's
//! blobs, each labelled for containerd's snapshotter.
//!
//! * **Manifest**: an OCI image manifest (`mediaType` set) with the manifest
//!   annotation [`FORMAT_ANNOTATION`] (`org.lazypull.image.format`) = `"2"`.
//! * **Config** ([`CONFIG_MEDIA_TYPE`], the OCI image config): the source
//!   image's config JSON with every field as it was (architecture, os,
//!   `config.{Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Volumes,
//!   Labels, StopSignal}`, history, created, author, unknown fields), only
//!   `rootfs` replaced by `{"type":"layers","diff_ids":[...]}` with one diff id
//!   per manifest layer, equal to that layer's digest (the layers are stored
//!   uncompressed as far as OCI is concerned, so a layer's diff id is its
//!   digest). Sources without a config (a directory, a tar) get
//!   [`minimal_config`]. The config is the runtime's: the daemon never fetches
//!   it.
//! * **Layers**, in this order: the meta blob ([`META_MEDIA_TYPE`]; its raw
//!   bytes, so its registry digest is `sha256:` + its own name), then per data
//!   blob, in device table order, its chunk table ([`TABLE_MEDIA_TYPE`]) and
//!   its stored units ([`DATA_MEDIA_TYPE`]). The media types start with
//!   `application/vnd.oci.image.layer.`, so containerd labels and hands them to
//!   its unpacker as layers, but have no base media type containerd can
//!   decompress: a runtime without lazypull's snapshotter fails the unpack with
//!   `failed to get stream processor for application/vnd.oci.image.layer.lazypull.meta.v2:
//!   no processor for media-type` (containerd 1.6's `diff/apply`), and never
//!   extracts a wrong file system. Pulling the content (`ctr content fetch`)
//!   works with any runtime.
//! * **Layer annotations** (prefix `containerd.io/snapshot/`, which
//!   containerd's pull-time unpacker passes to the snapshotter as Prepare
//!   labels, so each layer's labels are enough alone):
//!   - every layer: [`LABEL_FORMAT`] = `"2"`, [`LABEL_ROLE`] = `meta` |
//!     `table` | `data`;
//!   - meta: [`LABEL_CHUNK_SIZE`] (decimal) and [`LABEL_BLOBS`] (number of data
//!     blobs);
//!   - table and data: [`LABEL_BLOB`] (hex uncompressed SHA-256 of the data
//!     blob, the kernel's name for it) and [`LABEL_BLOB_SIZE`] (decimal
//!     uncompressed size);
//!   - data: [`LABEL_TABLE`] (the digest of its chunk table layer).
//!
//! What the daemon needs ([`LazyImage`]: meta blob, chunk size, data blobs)
//! comes from the manifest alone ([`LazyImage::from_manifest`], strictly
//! validated), so every digest chains from the manifest's own: manifest ->
//! layers; the meta blob is named by its digest; each chunk table binds its
//! data blob's name, size and stored size.
//!
//! * **Recorded prefetch** (optional, `lazypull optimize`): the manifest
//!   annotations [`crate::prefetch::ANNOTATION_DIGEST`] and
//!   [`crate::prefetch::ANNOTATION_SIZE`] name a blob of the same repository
//!   holding a [`crate::prefetch::Record`]: the files and ranges a workload
//!   read first, in order. The daemon fetches those first at mount. It is
//!   not a layer (containerd would hand it to the snapshotter as one), so an
//!   image with a record pulls and runs as the same image without it; being
//!   in the manifest, it is covered by the manifest's digest. Read it with
//!   [`prefetch_record`], add it with [`with_prefetch_record`].
//!
//! Format 1 (config `application/vnd.lazypull.image.config.v1+json`, a
//! lazypull-only document) is refused with an error naming it
//! ([`ImageError::Format1`]): push or convert such images again.
//!
//! Only data types and their validation live here: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{media_type, Descriptor, ImageManifest};

/// The media type of a lazypull image's manifest: an ordinary OCI manifest.
pub const MANIFEST_MEDIA_TYPE: &str = media_type::OCI_MANIFEST;
/// The config is the OCI image config (the source image's runtime config).
pub const CONFIG_MEDIA_TYPE: &str = media_type::OCI_CONFIG;
/// The config media type of lazypull image format 1 (refused).
pub const FORMAT1_CONFIG_MEDIA_TYPE: &str = "application/vnd.lazypull.image.config.v1+json";
/// The meta blob layer (an EROFS image with chunk indexes, raw).
pub const META_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.lazypull.meta.v2";
/// A data blob's chunk table layer.
pub const TABLE_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.lazypull.table.v2";
/// A data blob's stored units layer.
pub const DATA_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.lazypull.units.v2";
/// The common prefix of lazypull's layer media types.
pub const LAYER_MEDIA_TYPE_PREFIX: &str = "application/vnd.oci.image.layer.lazypull.";

/// Manifest annotation carrying the format version.
pub const FORMAT_ANNOTATION: &str = "org.lazypull.image.format";
/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// [`FORMAT_VERSION`] as the annotations spell it.
pub const FORMAT_VERSION_STR: &str = "2";

/// The prefix containerd passes on to snapshotters as Prepare labels.
pub const LABEL_PREFIX: &str = "containerd.io/snapshot/lazypull.";
/// Layer annotation: the format version (`"2"`).
pub const LABEL_FORMAT: &str = "containerd.io/snapshot/lazypull.format";
/// Layer annotation: [`ROLE_META`], [`ROLE_TABLE`] or [`ROLE_DATA`].
pub const LABEL_ROLE: &str = "containerd.io/snapshot/lazypull.role";
/// Meta layer annotation: the chunk size (decimal).
pub const LABEL_CHUNK_SIZE: &str = "containerd.io/snapshot/lazypull.chunk-size";
/// Meta layer annotation: the number of data blobs (decimal).
pub const LABEL_BLOBS: &str = "containerd.io/snapshot/lazypull.blobs";
/// Table and data layer annotation: the data blob's name (hex uncompressed SHA-256).
pub const LABEL_BLOB: &str = "containerd.io/snapshot/lazypull.blob";
/// Table and data layer annotation: the data blob's uncompressed size (decimal).
pub const LABEL_BLOB_SIZE: &str = "containerd.io/snapshot/lazypull.blob-size";
/// Data layer annotation: the digest of its chunk table layer.
pub const LABEL_TABLE: &str = "containerd.io/snapshot/lazypull.table";
/// [`LABEL_ROLE`] of the meta blob layer.
pub const ROLE_META: &str = "meta";
/// [`LABEL_ROLE`] of a chunk table layer.
pub const ROLE_TABLE: &str = "table";
/// [`LABEL_ROLE`] of a stored units layer.
pub const ROLE_DATA: &str = "data";

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

/// What the daemon needs of a lazypull image, all of it in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyImage {
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
    #[error("not a lazypull image: its manifest has no {FORMAT_ANNOTATION} annotation and no lazypull layers (config media type {0:?}); convert ordinary images with `lazypull convert`")]
    NotLazypull(String),
    #[error("lazypull image format 1 (config media type {FORMAT1_CONFIG_MEDIA_TYPE}); this lazypull reads format {FORMAT_VERSION} only: push or convert the image again with this lazypull")]
    Format1,
    #[error("lazypull image format {0:?} (manifest annotation {FORMAT_ANNOTATION}); this lazypull reads format {FORMAT_VERSION} only")]
    UnsupportedFormat(String),
    #[error("malformed lazypull manifest: {0}")]
    Manifest(String),
    #[error("malformed lazypull manifest: layer {index}: {problem}")]
    Layer { index: usize, problem: String },
    #[error("unusable image config: {0}")]
    Config(String),
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(is_hex64)
}

/// Whether `m` claims to be a lazypull image (of any format): a format
/// annotation, a format-1 config or a lazypull layer.
pub fn is_lazypull(m: &Manifest) -> bool {
    m.annotations.contains_key(FORMAT_ANNOTATION)
        || m.config.media_type == FORMAT1_CONFIG_MEDIA_TYPE
        || m.layers
            .iter()
            .any(|l| l.media_type.starts_with(LAYER_MEDIA_TYPE_PREFIX) || has_lazypull_labels(l))
}

fn has_lazypull_labels(l: &Descriptor) -> bool {
    l.annotations.keys().any(|k| k.starts_with(LABEL_PREFIX))
}

/// The host's architecture in OCI (Go) naming: `amd64`, `arm64`, ...
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        "mips64" => "mips64le",
        other => other,
    }
}

/// The config of an image built from a source without one (a directory, a
/// tar): the host's architecture, linux, an empty runtime config.
pub fn minimal_config() -> Value {
    json!({
        "architecture": host_architecture(),
        "os": "linux",
        "config": {},
    })
}

/// Reads a `layer {index}` annotation.
fn label<'a>(l: &'a Descriptor, index: usize, key: &str) -> Result<&'a str, ImageError> {
    l.annotations
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| ImageError::Layer {
            index,
            problem: format!("missing annotation {key}"),
        })
}

fn number<T: std::str::FromStr>(l: &Descriptor, index: usize, key: &str) -> Result<T, ImageError> {
    let v = label(l, index, key)?;
    // Decimal digits only: no sign, no spaces.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ImageError::Layer {
            index,
            problem: format!("annotation {key} = {v:?} is not a decimal number"),
        });
    }
    v.parse().map_err(|_| ImageError::Layer {
        index,
        problem: format!("annotation {key} = {v:?} is out of range"),
    })
}

/// Checks a layer's media type, format and role, digest and size.
fn check_layer(l: &Descriptor, index: usize, media: &str, role: &str) -> Result<(), ImageError> {
    let bad = |problem: String| ImageError::Layer { index, problem };
    if l.media_type != media {
        return Err(bad(format!(
            "media type {:?}, expected {media} (the {role} layer)",
            l.media_type
        )));
    }
    let format = label(l, index, LABEL_FORMAT)?;
    if format != FORMAT_VERSION_STR {
        return Err(bad(format!(
            "annotation {LABEL_FORMAT} = {format:?}, expected {FORMAT_VERSION_STR:?}"
        )));
    }
    let got = label(l, index, LABEL_ROLE)?;
    if got != role {
        return Err(bad(format!(
            "annotation {LABEL_ROLE} = {got:?}, expected {role:?}"
        )));
    }
    if !is_digest(&l.digest) {
        return Err(bad(format!(
            "digest {:?} is not sha256:<64 lowercase hex>",
            l.digest
        )));
    }
    if l.size == 0 {
        return Err(bad("size 0".into()));
    }
    Ok(())
}

impl LazyImage {
    /// Parses a manifest and derives the image from it: the manifest and the
    /// image, or why it is not a lazypull image of this format.
    pub fn parse_manifest(bytes: &[u8]) -> Result<(Manifest, LazyImage), ImageError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ImageError::Manifest(e.to_string()))?;
        let image = LazyImage::from_manifest(&m)?;
        Ok((m, image))
    }

    /// What the daemon needs, from the manifest's layers and annotations
    /// alone, validated strictly: format, order and roles, one table and data
    /// pair per blob, counts, digests, sizes and annotation values.
    pub fn from_manifest(m: &Manifest) -> Result<LazyImage, ImageError> {
        if m.config.media_type == FORMAT1_CONFIG_MEDIA_TYPE {
            return Err(ImageError::Format1);
        }
        match m.annotations.get(FORMAT_ANNOTATION) {
            Some(v) if v == FORMAT_VERSION_STR => {}
            Some(v) => return Err(ImageError::UnsupportedFormat(v.clone())),
            None if is_lazypull(m) => {
                return Err(ImageError::Manifest(format!(
                    "lazypull layers but no {FORMAT_ANNOTATION} annotation"
                )))
            }
            None => return Err(ImageError::NotLazypull(m.config.media_type.clone())),
        }
        if m.schema_version != 2 {
            return Err(ImageError::Manifest(format!(
                "schemaVersion {}, expected 2",
                m.schema_version
            )));
        }
        if m.media_type.as_deref() != Some(MANIFEST_MEDIA_TYPE) {
            return Err(ImageError::Manifest(format!(
                "mediaType {:?}, expected {MANIFEST_MEDIA_TYPE}",
                m.media_type
            )));
        }
        if m.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(ImageError::Manifest(format!(
                "config media type {:?}, expected {CONFIG_MEDIA_TYPE}",
                m.config.media_type
            )));
        }
        if !is_digest(&m.config.digest) {
            return Err(ImageError::Manifest(format!(
                "config digest {:?} is not sha256:<64 lowercase hex>",
                m.config.digest
            )));
        }
        let Some(meta) = m.layers.first() else {
            return Err(ImageError::Manifest(
                "no layers (the first must be the meta blob)".into(),
            ));
        };
        check_layer(meta, 0, META_MEDIA_TYPE, ROLE_META)?;
        let chunk_size: u32 = number(meta, 0, LABEL_CHUNK_SIZE)?;
        if !chunk_size.is_power_of_two() || chunk_size < 4096 {
            return Err(ImageError::Layer {
                index: 0,
                problem: format!(
                    "annotation {LABEL_CHUNK_SIZE} = {chunk_size} is not a power of two of at least 4096"
                ),
            });
        }
        let count: usize = number(meta, 0, LABEL_BLOBS)?;
        let pairs = m.layers.len() - 1;
        if !pairs.is_multiple_of(2) || pairs / 2 != count {
            return Err(ImageError::Manifest(format!(
                "{} layers, but the meta layer's {LABEL_BLOBS} = {count} needs {} (meta, then a table and a data layer per blob)",
                m.layers.len(),
                count.saturating_mul(2).saturating_add(1)
            )));
        }
        let mut blobs = Vec::with_capacity(count);
        for (i, pair) in m.layers[1..].chunks_exact(2).enumerate() {
            let (ti, di) = (1 + 2 * i, 2 + 2 * i);
            let (table, data) = (&pair[0], &pair[1]);
            check_layer(table, ti, TABLE_MEDIA_TYPE, ROLE_TABLE)?;
            check_layer(data, di, DATA_MEDIA_TYPE, ROLE_DATA)?;
            let name = label(table, ti, LABEL_BLOB)?;
            if !is_hex64(name) {
                return Err(ImageError::Layer {
                    index: ti,
                    problem: format!("annotation {LABEL_BLOB} = {name:?} is not 64 lowercase hex"),
                });
            }
            let size: u64 = number(table, ti, LABEL_BLOB_SIZE)?;
            if size == 0 {
                return Err(ImageError::Layer {
                    index: ti,
                    problem: format!("annotation {LABEL_BLOB_SIZE} = 0"),
                });
            }
            let data_name = label(data, di, LABEL_BLOB)?;
            if data_name != name {
                return Err(ImageError::Layer {
                    index: di,
                    problem: format!(
                        "annotation {LABEL_BLOB} = {data_name:?}, but its table layer {ti} is for blob {name:?}"
                    ),
                });
            }
            let data_size: u64 = number(data, di, LABEL_BLOB_SIZE)?;
            if data_size != size {
                return Err(ImageError::Layer {
                    index: di,
                    problem: format!(
                        "annotation {LABEL_BLOB_SIZE} = {data_size}, but its table layer {ti} says {size}"
                    ),
                });
            }
            let table_digest = label(data, di, LABEL_TABLE)?;
            if table_digest != table.digest {
                return Err(ImageError::Layer {
                    index: di,
                    problem: format!(
                        "annotation {LABEL_TABLE} = {table_digest:?}, but the table layer before it is {}",
                        table.digest
                    ),
                });
            }
            if blobs.iter().any(|b: &DataBlob| b.digest == name) {
                return Err(ImageError::Layer {
                    index: ti,
                    problem: format!("blob {name} listed twice"),
                });
            }
            blobs.push(DataBlob {
                digest: name.to_owned(),
                size,
                table: BlobRef {
                    digest: table.digest.clone(),
                    size: table.size,
                },
                data: BlobRef {
                    digest: data.digest.clone(),
                    size: data.size,
                },
            });
        }
        Ok(LazyImage {
            meta: BlobRef {
                digest: meta.digest.clone(),
                size: meta.size,
            },
            chunk_size,
            blobs,
        })
    }

    /// The meta blob's hex name (its EROFS `fsid`).
    pub fn meta_hex(&self) -> &str {
        self.meta.digest.trim_start_matches("sha256:")
    }

    /// The manifest layers, annotated.
    pub fn layers(&self) -> Vec<Descriptor> {
        let layer = |media: &str, r: &BlobRef, role: &str, extra: Vec<(&str, String)>| {
            let mut annotations = BTreeMap::from([
                (LABEL_FORMAT.to_owned(), FORMAT_VERSION_STR.to_owned()),
                (LABEL_ROLE.to_owned(), role.to_owned()),
            ]);
            annotations.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
            Descriptor {
                annotations,
                ..Descriptor::new(media, r.digest.clone(), r.size)
            }
        };
        let mut layers = vec![layer(
            META_MEDIA_TYPE,
            &self.meta,
            ROLE_META,
            vec![
                (LABEL_CHUNK_SIZE, self.chunk_size.to_string()),
                (LABEL_BLOBS, self.blobs.len().to_string()),
            ],
        )];
        for b in &self.blobs {
            let blob = || {
                vec![
                    (LABEL_BLOB, b.digest.clone()),
                    (LABEL_BLOB_SIZE, b.size.to_string()),
                ]
            };
            layers.push(layer(TABLE_MEDIA_TYPE, &b.table, ROLE_TABLE, blob()));
            let mut data = blob();
            data.push((LABEL_TABLE, b.table.digest.clone()));
            layers.push(layer(DATA_MEDIA_TYPE, &b.data, ROLE_DATA, data));
        }
        layers
    }

    /// The config's `rootfs.diff_ids`: each layer's digest, in order.
    pub fn diff_ids(&self) -> Vec<String> {
        let mut ids = vec![self.meta.digest.clone()];
        for b in &self.blobs {
            ids.push(b.table.digest.clone());
            ids.push(b.data.digest.clone());
        }
        ids
    }

    /// The image's config: `source` (the source image's config, OCI or
    /// Docker; [`minimal_config`] if it had none) with every field kept and
    /// only `rootfs` replaced by this image's layers. Serialize the result
    /// once and give those bytes to [`LazyImage::manifest`].
    pub fn config(&self, source: &Value) -> Result<Value, ImageError> {
        let Value::Object(fields) = source else {
            return Err(ImageError::Config(format!(
                "the source config is a JSON {}, not an object",
                json_kind(source)
            )));
        };
        for key in ["architecture", "os"] {
            match fields.get(key) {
                Some(Value::String(s)) if !s.is_empty() => {}
                _ => {
                    return Err(ImageError::Config(format!(
                        "the source config has no {key:?} string (the OCI image spec requires one)"
                    )))
                }
            }
        }
        let mut fields = fields.clone();
        fields.insert(
            "rootfs".into(),
            json!({"type": "layers", "diff_ids": self.diff_ids()}),
        );
        Ok(Value::Object(fields))
    }

    /// Checks that `config` (the bytes the manifest's config descriptor
    /// names) is an image config for this image: an object whose
    /// `rootfs.diff_ids` are this image's layer digests.
    pub fn check_config(&self, config: &[u8]) -> Result<Value, ImageError> {
        let v: Value = serde_json::from_slice(config)
            .map_err(|e| ImageError::Config(format!("malformed JSON: {e}")))?;
        let ids = v
            .get("rootfs")
            .filter(|r| r.get("type").and_then(Value::as_str) == Some("layers"))
            .and_then(|r| r.get("diff_ids"))
            .and_then(Value::as_array)
            .ok_or_else(|| {
                ImageError::Config("no rootfs of type \"layers\" with diff_ids".into())
            })?;
        let want = self.diff_ids();
        if ids.len() != want.len() || ids.iter().zip(&want).any(|(a, b)| a.as_str() != Some(b)) {
            return Err(ImageError::Config(format!(
                "rootfs.diff_ids {ids:?} are not the layer digests {want:?}"
            )));
        }
        Ok(v)
    }

    /// The manifest of this image with the config whose serialized bytes are
    /// `config_bytes`.
    pub fn manifest(&self, config_bytes: &[u8]) -> Manifest {
        use sha2::{Digest, Sha256};
        Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
            config: Descriptor::new(
                CONFIG_MEDIA_TYPE,
                format!("sha256:{}", hex::encode(Sha256::digest(config_bytes))),
                config_bytes.len() as u64,
            ),
            layers: self.layers(),
            annotations: BTreeMap::from([(
                FORMAT_ANNOTATION.to_owned(),
                FORMAT_VERSION_STR.to_owned(),
            )]),
        }
    }
}

/// The recorded prefetch blob the manifest names, if any (see the module
/// doc): both annotations or neither, a sha256 digest, a size from 1 to
/// [`crate::prefetch::MAX_RECORD_SIZE`].
pub fn prefetch_record(m: &Manifest) -> Result<Option<BlobRef>, ImageError> {
    use crate::prefetch::{ANNOTATION_DIGEST, ANNOTATION_SIZE, MAX_RECORD_SIZE};
    let (digest, size) = match (
        m.annotations.get(ANNOTATION_DIGEST),
        m.annotations.get(ANNOTATION_SIZE),
    ) {
        (None, None) => return Ok(None),
        (Some(d), Some(s)) => (d, s),
        _ => {
            return Err(ImageError::Manifest(format!(
                "a prefetch record needs both annotations {ANNOTATION_DIGEST} and {ANNOTATION_SIZE}"
            )))
        }
    };
    if !is_digest(digest) {
        return Err(ImageError::Manifest(format!(
            "annotation {ANNOTATION_DIGEST} = {digest:?} is not sha256:<64 lowercase hex>"
        )));
    }
    let size = Some(size.as_str())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|n| (1..=MAX_RECORD_SIZE).contains(n))
        .ok_or_else(|| {
            ImageError::Manifest(format!(
                "annotation {ANNOTATION_SIZE} = {size:?} is not a size from 1 to {MAX_RECORD_SIZE}"
            ))
        })?;
    Ok(Some(BlobRef {
        digest: digest.clone(),
        size,
    }))
}

/// `m` naming `record` as its recorded prefetch (replacing any it had).
pub fn with_prefetch_record(mut m: Manifest, record: &BlobRef) -> Manifest {
    use crate::prefetch::{ANNOTATION_DIGEST, ANNOTATION_SIZE};
    m.annotations
        .insert(ANNOTATION_DIGEST.to_owned(), record.digest.clone());
    m.annotations
        .insert(ANNOTATION_SIZE.to_owned(), record.size.to_string());
    m
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn image() -> LazyImage {
        let blob = |name: char, table: char, data: char| DataBlob {
            digest: hex(name),
            size: 1 << 20,
            table: BlobRef {
                digest: format!("sha256:{}", hex(table)),
                size: 152,
            },
            data: BlobRef {
                digest: format!("sha256:{}", hex(data)),
                size: 1000,
            },
        };
        LazyImage {
            meta: BlobRef {
                digest: format!("sha256:{}", hex('a')),
                size: 8192,
            },
            chunk_size: 1 << 20,
            blobs: vec![blob('b', 'c', 'd'), blob('e', 'f', '0')],
        }
    }

    fn source_config() -> Value {
        json!({
            "architecture": "arm64",
            "os": "linux",
            "variant": "v8",
            "created": "2024-01-02T03:04:05Z",
            "author": "someone",
            "config": {
                "Entrypoint": ["/bin/app"],
                "Cmd": ["--serve"],
                "Env": ["PATH=/bin", "A=b"],
                "WorkingDir": "/srv",
                "User": "1000:1000",
                "ExposedPorts": {"8080/tcp": {}},
                "Volumes": {"/data": {}},
                "Labels": {"z": "1", "a": "2"},
                "StopSignal": "SIGTERM",
            },
            "history": [{"created_by": "x", "empty_layer": true}],
            "rootfs": {"type": "layers", "diff_ids": ["sha256:1234"]},
            "x-unknown": {"nested": [1, 2.5, null]},
        })
    }

    fn manifest() -> (Manifest, Vec<u8>) {
        let img = image();
        let config = serde_json::to_vec(&img.config(&source_config()).unwrap()).unwrap();
        (img.manifest(&config), config)
    }

    #[test]
    fn manifest_round_trips_and_lists_every_blob() {
        let img = image();
        let (m, _) = manifest();
        let bytes = serde_json::to_vec(&m).unwrap();
        let (parsed, back) = LazyImage::parse_manifest(&bytes).unwrap();
        assert_eq!(parsed, m);
        assert_eq!(back, img);
        let digests: Vec<_> = m.layers.iter().map(|l| &l.digest[7..8]).collect();
        assert_eq!(digests, ["a", "c", "d", "f", "0"]);
        assert_eq!(m.layers[1].annotations[LABEL_BLOB], hex('b'));
        assert_eq!(m.layers[2].annotations[LABEL_TABLE], m.layers[1].digest);
        assert_eq!(m.layers[0].annotations[LABEL_BLOBS], "2");
        assert_eq!(m.layers[0].annotations[LABEL_CHUNK_SIZE], "1048576");
        assert_eq!(m.layers[4].annotations[LABEL_BLOB_SIZE], "1048576");
        assert_eq!(m.annotations[FORMAT_ANNOTATION], "2");
        assert_eq!(img.meta_hex(), hex('a'));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"schemaVersion\":2") && text.contains("\"mediaType\""));
    }

    #[test]
    fn what_containerd_relies_on() {
        let (m, config) = manifest();
        assert_eq!(m.media_type.as_deref(), Some(media_type::OCI_MANIFEST));
        assert_eq!(m.config.media_type, media_type::OCI_CONFIG);
        for (i, l) in m.layers.iter().enumerate() {
            // containerd treats these as layers, but can decompress none of them.
            assert!(
                l.media_type.starts_with("application/vnd.oci.image.layer."),
                "layer {i}: {}",
                l.media_type
            );
            assert!(!l.media_type.ends_with("tar") && !l.media_type.contains("tar+"));
            assert!(!l.annotations.is_empty());
            for k in l.annotations.keys() {
                assert!(k.starts_with("containerd.io/snapshot/"), "layer {i}: {k}");
            }
            assert_eq!(l.annotations[LABEL_FORMAT], "2");
        }
        let v: Value = serde_json::from_slice(&config).unwrap();
        let ids = v["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(ids.len(), m.layers.len());
        for (id, l) in ids.iter().zip(&m.layers) {
            assert_eq!(id.as_str().unwrap(), l.digest);
        }
        assert_eq!(v["rootfs"]["type"], "layers");
        image().check_config(&config).unwrap();
    }

    #[test]
    fn the_source_config_is_kept_but_for_rootfs() {
        let src = source_config();
        let out = image().config(&src).unwrap();
        let (Value::Object(a), Value::Object(b)) = (&src, &out) else {
            panic!()
        };
        assert_eq!(a.len(), b.len());
        for (k, v) in a {
            if k != "rootfs" {
                assert_eq!(&b[k], v, "{k}");
            }
        }
        assert_ne!(a["rootfs"], b["rootfs"]);
        // A docker config keeps its own fields too.
        let docker = json!({"architecture":"amd64","os":"linux","container_config":{"Hostname":"x"},
            "docker_version":"24.0","config":{"Cmd":["sh"]}});
        let out = image().config(&docker).unwrap();
        assert_eq!(out["container_config"], docker["container_config"]);
        assert_eq!(out["docker_version"], "24.0");
        // Minimal config: the host's architecture in Go naming.
        let min = image().config(&minimal_config()).unwrap();
        assert_eq!(min["os"], "linux");
        assert_eq!(min["config"], json!({}));
        let arch = min["architecture"].as_str().unwrap();
        assert!(!["x86_64", "aarch64"].contains(&arch), "{arch}");
        // What is not a config is refused.
        for bad in [
            json!([1]),
            json!({"os": "linux"}),
            json!({"architecture": "", "os": "linux"}),
        ] {
            let err = image().config(&bad).unwrap_err();
            assert!(matches!(err, ImageError::Config(_)), "{err}");
        }
        let err = image()
            .check_config(br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("diff_ids"), "{err}");
        assert!(image().check_config(b"{").is_err());
    }

    /// `edit` applied to a valid manifest; the error it gets.
    fn refused(edit: impl FnOnce(&mut Manifest)) -> String {
        let (mut m, _) = manifest();
        edit(&mut m);
        let bytes = serde_json::to_vec(&m).unwrap();
        LazyImage::parse_manifest(&bytes).unwrap_err().to_string()
    }

    fn has(err: &str, parts: &[&str]) {
        for p in parts {
            assert!(err.contains(p), "{p:?} not in: {err}");
        }
    }

    #[test]
    fn every_malformed_manifest_is_refused_naming_the_problem() {
        let set = |i: usize, k: &'static str, v: &'static str| {
            move |m: &mut Manifest| {
                m.layers[i].annotations.insert(k.into(), v.into());
            }
        };
        let del = |i: usize, k: &'static str| {
            move |m: &mut Manifest| {
                m.layers[i].annotations.remove(k);
            }
        };
        has(&refused(|m| m.schema_version = 1), &["schemaVersion 1"]);
        has(&refused(|m| m.media_type = None), &["mediaType None"]);
        has(
            &refused(|m| m.config.media_type = media_type::DOCKER_CONFIG.into()),
            &["config media type"],
        );
        has(
            &refused(|m| m.config.digest = "sha256:zz".into()),
            &["config digest"],
        );
        has(&refused(|m| m.layers.clear()), &["no layers"]);
        // Order and roles.
        has(
            &refused(|m| m.layers.swap(0, 1)),
            &["layer 0", "media type", META_MEDIA_TYPE],
        );
        has(
            &refused(|m| m.layers.swap(1, 2)),
            &["layer 1", TABLE_MEDIA_TYPE],
        );
        has(
            &refused(set(0, LABEL_ROLE, "data")),
            &["layer 0", LABEL_ROLE, "\"meta\""],
        );
        has(
            &refused(del(3, LABEL_ROLE)),
            &["layer 3", "missing annotation", LABEL_ROLE],
        );
        has(
            &refused(set(2, LABEL_FORMAT, "3")),
            &["layer 2", LABEL_FORMAT],
        );
        // Counts.
        has(&refused(set(0, LABEL_BLOBS, "3")), &["5 layers", "needs 7"]);
        has(
            &refused(|m| {
                m.layers.pop();
            }),
            &["4 layers"],
        );
        has(
            &refused(set(0, LABEL_BLOBS, "-1")),
            &["layer 0", "not a decimal number"],
        );
        has(
            &refused(set(0, LABEL_BLOBS, "99999999999999999999999")),
            &["layer 0", "out of range"],
        );
        // Values.
        has(
            &refused(set(0, LABEL_CHUNK_SIZE, "4097")),
            &["layer 0", "power of two"],
        );
        has(
            &refused(set(0, LABEL_CHUNK_SIZE, "1MiB")),
            &["layer 0", LABEL_CHUNK_SIZE],
        );
        has(
            &refused(del(0, LABEL_CHUNK_SIZE)),
            &["layer 0", LABEL_CHUNK_SIZE],
        );
        has(
            &refused(|m| m.layers[3].digest = "sha256:ABC".into()),
            &["layer 3", "digest"],
        );
        has(
            &refused(|m| m.layers[0].digest = format!("sha512:{}", hex('a'))),
            &["layer 0", "digest"],
        );
        has(&refused(|m| m.layers[4].size = 0), &["layer 4", "size 0"]);
        has(
            &refused(set(1, LABEL_BLOB, "xyz")),
            &["layer 1", LABEL_BLOB, "64 lowercase hex"],
        );
        has(
            &refused(set(1, LABEL_BLOB_SIZE, "0")),
            &["layer 1", LABEL_BLOB_SIZE],
        );
        has(
            &refused(set(1, LABEL_BLOB_SIZE, "")),
            &["layer 1", LABEL_BLOB_SIZE],
        );
        has(
            &refused(set(
                2,
                LABEL_BLOB,
                "9999999999999999999999999999999999999999999999999999999999999999",
            )),
            &["layer 2", "table layer 1"],
        );
        has(
            &refused(set(2, LABEL_BLOB_SIZE, "5")),
            &["layer 2", LABEL_BLOB_SIZE],
        );
        has(&refused(del(4, LABEL_TABLE)), &["layer 4", LABEL_TABLE]);
        has(
            &refused(|m| {
                let t = m.layers[1].digest.clone();
                m.layers[4].annotations.insert(LABEL_TABLE.into(), t);
            }),
            &["layer 4", LABEL_TABLE],
        );
        // The same blob twice.
        has(
            &refused(|m| {
                let (t, d) = (m.layers[1].clone(), m.layers[2].clone());
                m.layers[3] = t;
                m.layers[4] = d;
            }),
            &["layer 3", "twice"],
        );
        // Format versions.
        has(
            &refused(|m| {
                m.annotations.insert(FORMAT_ANNOTATION.into(), "3".into());
            }),
            &["format \"3\"", FORMAT_ANNOTATION],
        );
        has(
            &refused(|m| {
                m.annotations.clear();
            }),
            &["no org.lazypull.image.format"],
        );
        assert!(LazyImage::parse_manifest(b"{").is_err());
    }

    #[test]
    fn a_prefetch_record_rides_in_the_manifest_annotations() {
        use crate::prefetch::{ANNOTATION_DIGEST, ANNOTATION_SIZE};
        let (m, _) = manifest();
        assert_eq!(prefetch_record(&m).unwrap(), None);
        let rec = BlobRef {
            digest: format!("sha256:{}", hex('9')),
            size: 123,
        };
        let with = with_prefetch_record(m.clone(), &rec);
        // Still the same image, layers untouched.
        let bytes = serde_json::to_vec(&with).unwrap();
        let (parsed, img) = LazyImage::parse_manifest(&bytes).unwrap();
        assert_eq!(img, image());
        assert_eq!(parsed.layers, m.layers);
        assert_eq!(prefetch_record(&parsed).unwrap(), Some(rec.clone()));
        let bad = |k: &str, v: &str| {
            let mut m = with.clone();
            m.annotations.insert(k.into(), v.into());
            prefetch_record(&m).unwrap_err().to_string()
        };
        has(&bad(ANNOTATION_DIGEST, "sha256:xyz"), &[ANNOTATION_DIGEST]);
        has(&bad(ANNOTATION_SIZE, "0"), &[ANNOTATION_SIZE]);
        has(&bad(ANNOTATION_SIZE, "99999999999"), &[ANNOTATION_SIZE]);
        has(&bad(ANNOTATION_SIZE, "+5"), &[ANNOTATION_SIZE]);
        let mut half = with.clone();
        half.annotations.remove(ANNOTATION_SIZE);
        has(
            &prefetch_record(&half).unwrap_err().to_string(),
            &["both annotations"],
        );
    }

    #[test]
    fn old_format_and_ordinary_images_get_their_own_errors() {
        let v1 = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.lazypull.image.config.v1+json","digest":"sha256:00","size":2},"layers":[{"mediaType":"application/vnd.lazypull.meta.v1.erofs","digest":"sha256:00","size":1}]}"#;
        let err = LazyImage::parse_manifest(v1).unwrap_err();
        assert!(matches!(err, ImageError::Format1), "{err}");
        has(&err.to_string(), &["format 1", "again"]);
        let m: Manifest = serde_json::from_slice(v1).unwrap();
        assert!(is_lazypull(&m));

        let ordinary = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:00","size":1}]}"#;
        let err = LazyImage::parse_manifest(ordinary).unwrap_err();
        assert!(matches!(err, ImageError::NotLazypull(_)), "{err}");
        has(
            &err.to_string(),
            &["not a lazypull image", "lazypull convert"],
        );
        let m: Manifest = serde_json::from_slice(ordinary).unwrap();
        assert!(!is_lazypull(&m));
        let (v2, _) = manifest();
        assert!(is_lazypull(&v2));
    }
}
