//! [`build_from_layers`]: layer directories in, meta blob + data blobs +
//! `manifest.json` out.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blob::{self, ChunkRef};
use crate::layout::{self, BLOCK_SIZE};
use crate::meta::{self, DeviceInfo};
use crate::tree::{LayerMeta, Tree};
use crate::BuildError;

/// Name of the manifest written next to the blobs.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Options for [`build_from_layers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Chunk size in bytes: a power of two, at least 4096. Default 1 MiB.
    pub chunk_size: u32,
    /// Superblock build time (seconds; nanoseconds 0). Inodes whose mtime
    /// equals it (and whose other fields fit) use the compact form. Default:
    /// the newest mtime (seconds and nanoseconds) in the merged tree.
    pub build_time: Option<u64>,
    /// Store all-zero chunks as holes (EROFS_NULL_ADDR) instead of pointing
    /// them at one shared stored chunk of zeros. Smaller blobs, but such images
    /// read wrong through Linux 6.12's EROFS fscache path (a hole chunk zeroes
    /// the rest of the read request), so only for file-backed use. Default off.
    pub sparse_holes: bool,
    /// Where progress goes (nothing by default).
    pub progress: crate::Progress,
}

impl BuildOptions {
    /// Checks the options as the builders do before writing anything:
    /// [`BuildError::InvalidChunkSize`] unless `chunk_size` is a power of two
    /// between 4096 and 2^31. For callers that do work of their own (such as
    /// extracting archives) before building and want to fail first.
    pub fn validate(&self) -> Result<(), BuildError> {
        check_chunk_size(self.chunk_size)
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: 1 << 20,
            build_time: None,
            sparse_holes: false,
            progress: crate::Progress::default(),
        }
    }
}

/// One data blob of a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// SHA-256 of the blob file, lowercase hex (64 chars); also its file name
    /// and its device table tag.
    pub digest: String,
    /// Size in bytes (a multiple of 4096).
    pub size: u64,
    /// Chunks stored in it.
    pub chunks: u64,
}

/// What [`build_from_layers`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// SHA-256 of the meta blob, lowercase hex; also its file name.
    pub meta_digest: String,
    /// Meta blob size in bytes.
    pub meta_size: u64,
    /// Data blobs in device table order (device id = index + 1).
    pub blobs: Vec<BlobInfo>,
    /// Chunk size used.
    pub chunk_size: u32,
    /// Superblock build time (seconds, nanoseconds).
    pub build_time: (u64, u32),
    /// Inodes in the image (all types).
    pub inodes: u64,
    /// Regular-file inodes in the image.
    pub files: u64,
    /// Sum of regular file sizes in the image (apparent, each inode once).
    pub bytes: u64,
    /// Chunks stored across all blobs.
    pub chunks_stored: u64,
    /// Non-zero chunks that were duplicates of a stored chunk (all layers,
    /// including files a later layer hides).
    pub chunks_deduplicated: u64,
    /// All-zero chunks stored as holes.
    pub chunks_holes: u64,
    /// Path of the written `manifest.json`.
    pub manifest_path: PathBuf,
}

impl BuiltImage {
    /// Path of the meta blob in `out_dir`.
    pub fn meta_path(&self, out_dir: &Path) -> PathBuf {
        out_dir.join(&self.meta_digest)
    }

    /// Paths of the data blobs in `out_dir`, in device table order (the order
    /// of `-o device=` mount options).
    pub fn blob_paths(&self, out_dir: &Path) -> Vec<PathBuf> {
        self.blobs.iter().map(|b| out_dir.join(&b.digest)).collect()
    }
}

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Meta blob digest (hex).
    pub meta: String,
    /// Data blob digests (hex) in device table order.
    pub blobs: Vec<String>,
    /// Chunk size in bytes.
    pub chunk_size: u32,
}

/// Build an image from layer directories applied in order.
///
/// A later layer's entry replaces an earlier one at the same path;
/// directories merge (the later directory's attributes win); a later
/// non-directory replaces a whole directory. Hard links are detected per
/// layer (same `st_dev`/`st_ino`).
///
/// Writes into `out_dir` (created if missing): the meta blob as
/// `<sha256 hex>`, each data blob as `<sha256 hex>`, and
/// [`MANIFEST_FILE`]. Everything is written under temporary names and
/// renamed at the end, so a failed build leaves no partial file under a final
/// name. The same input gives byte-identical output.
///
/// Each layer that stores at least one chunk gets one data blob holding the
/// chunks of *all* its regular files in sorted path order, minus chunks
/// already stored (in it or an earlier layer) and all-zero chunks. A layer's
/// blob therefore depends only on that layer and the layers before it: images
/// sharing a first layer share its blob.
pub fn build_from_layers(
    layers: &[PathBuf],
    out_dir: &Path,
    opts: &BuildOptions,
) -> Result<BuiltImage, BuildError> {
    let inputs: Vec<LayerInput<'_>> = layers
        .iter()
        .map(|path| LayerInput {
            path: path.clone(),
            recorded: None,
        })
        .collect();
    build_from_layer_inputs(&inputs, out_dir, opts)
}

/// One layer directory for [`build_from_layer_inputs`].
#[derive(Debug, Clone)]
pub struct LayerInput<'a> {
    /// The layer's root directory.
    pub path: PathBuf,
    /// Metadata recorded when the layer was extracted from an archive: it
    /// replaces what the files carry on disk (see [`LayerMeta`]). `None`: the
    /// filesystem's metadata is used, as by [`build_from_layers`].
    pub recorded: Option<&'a LayerMeta>,
}

fn check_chunk_size(cs: u32) -> Result<(), BuildError> {
    if !cs.is_power_of_two() || u64::from(cs) < BLOCK_SIZE || cs > (1 << 31) {
        return Err(BuildError::InvalidChunkSize(cs));
    }
    Ok(())
}

/// [`build_from_layers`] for layer directories that may carry recorded
/// metadata (layers extracted from archives, as `lazypull-ingest` does):
/// the same merge, output and guarantees.
pub fn build_from_layer_inputs(
    layers: &[LayerInput<'_>],
    out_dir: &Path,
    opts: &BuildOptions,
) -> Result<BuiltImage, BuildError> {
    let cs = opts.chunk_size;
    check_chunk_size(cs)?;
    if layers.is_empty() {
        return Err(BuildError::NoLayers);
    }
    let ioerr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { path, source }
    };
    fs::create_dir_all(out_dir).map_err(ioerr(out_dir))?;

    let mut tree = Tree::new();
    for (i, layer) in layers.iter().enumerate() {
        tree.apply_layer(i, &layer.path, layer.recorded)?;
    }

    opts.progress.stage(crate::Stage::Chunking {
        files: tree.files.len() as u64,
        bytes: tree.files.iter().map(|f| f.size).sum(),
    });
    let (blobs, maps) = blob::write_blobs(
        &tree.files,
        layers.len(),
        out_dir,
        cs,
        opts.sparse_holes,
        &opts.progress,
    )?;
    opts.progress.stage(crate::Stage::Meta);
    let mut devices = Vec::with_capacity(blobs.len());
    for b in &blobs {
        let mut tag = [0u8; layout::DEVICE_TAG_LEN];
        tag.copy_from_slice(hex::encode(b.digest).as_bytes());
        devices.push(DeviceInfo {
            tag,
            blocks: u32::try_from(b.size / BLOCK_SIZE).map_err(|_| BuildError::TooLarge {
                what: "data blob".into(),
            })?,
        });
    }
    let (meta_bytes, stats) = meta::build_meta(&tree, &maps, &devices, cs, opts.build_time)?;
    let meta_digest = hex::encode(Sha256::digest(&meta_bytes));
    let meta_tmp = blob::temp_with(out_dir, ".meta-", &meta_bytes)?;

    let mut holes = 0;
    let mut nonzero = 0;
    for r in maps.iter().flatten() {
        match r {
            ChunkRef::Hole => holes += 1,
            ChunkRef::Stored { .. } => nonzero += 1,
        }
    }
    let stored: u64 = blobs.iter().map(|b| b.chunks).sum();
    let infos: Vec<BlobInfo> = blobs
        .iter()
        .map(|b| BlobInfo {
            digest: hex::encode(b.digest),
            size: b.size,
            chunks: b.chunks,
        })
        .collect();
    let manifest = Manifest {
        meta: meta_digest.clone(),
        blobs: infos.iter().map(|b| b.digest.clone()).collect(),
        chunk_size: cs,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| BuildError::Io {
        path: out_dir.join(MANIFEST_FILE),
        source: e.into(),
    })?;
    json.push(b'\n');
    let manifest_tmp = blob::temp_with(out_dir, ".manifest-", &json)?;

    // Everything is complete: move into place, the manifest last.
    let persist = |t: tempfile::NamedTempFile, name: &str| -> Result<(), BuildError> {
        let dest = out_dir.join(name);
        t.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(ioerr(t.path()))?;
        t.persist(&dest).map_err(|e| BuildError::Io {
            path: dest,
            source: e.error,
        })?;
        Ok(())
    };
    for (b, info) in blobs.into_iter().zip(&infos) {
        persist(b.file, &info.digest)?;
    }
    persist(meta_tmp, &meta_digest)?;
    persist(manifest_tmp, MANIFEST_FILE)?;
    if let Ok(d) = fs::File::open(out_dir) {
        let _ = d.sync_all();
    }

    Ok(BuiltImage {
        meta_digest,
        meta_size: meta_bytes.len() as u64,
        blobs: infos,
        chunk_size: cs,
        build_time: (stats.build_time, stats.build_time_nsec),
        inodes: stats.inodes,
        files: stats.files,
        bytes: stats.bytes,
        chunks_stored: stored,
        chunks_deduplicated: nonzero - stored,
        chunks_holes: holes,
        manifest_path: out_dir.join(MANIFEST_FILE),
    })
}

/// Appends the [blob trailer](crate::trailer) `trailer` to the meta blob of
/// `img` (built into `out_dir` without one) once the data blobs' stored forms
/// are final: the meta blob gets its new name (its new sha256), and
/// `manifest.json` names it. The trailer must list the image's data blobs in
/// device table order. The new meta blob and manifest are written under
/// temporary names and renamed; the old meta blob is removed last.
pub fn seal_output(
    out_dir: &Path,
    img: &BuiltImage,
    trailer: &crate::Trailer,
) -> Result<BuiltImage, BuildError> {
    let old = img.meta_path(out_dir);
    let bytes = fs::read(&old).map_err(|e| BuildError::Io {
        path: old.clone(),
        source: e,
    })?;
    let invalid = |why: String| BuildError::Io {
        path: old.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
    };
    let image = crate::Image::from_bytes(bytes).map_err(|e| invalid(e.to_string()))?;
    if image.image_len() != image.data().len() as u64 {
        return Err(invalid("the meta blob already has a blob trailer".into()));
    }
    let sealed = crate::append_trailer(image.data().to_vec(), trailer);
    crate::Image::from_bytes(sealed.clone())
        .and_then(|i| i.trailer())
        .map_err(|e| invalid(e.to_string()))?;
    let meta_digest = hex::encode(Sha256::digest(&sealed));
    let meta_tmp = blob::temp_with(out_dir, ".meta-", &sealed)?;
    let manifest = Manifest {
        meta: meta_digest.clone(),
        blobs: img.blobs.iter().map(|b| b.digest.clone()).collect(),
        chunk_size: img.chunk_size,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| BuildError::Io {
        path: out_dir.join(MANIFEST_FILE),
        source: e.into(),
    })?;
    json.push(b'\n');
    let manifest_tmp = blob::temp_with(out_dir, ".manifest-", &json)?;
    for (t, name) in [
        (meta_tmp, meta_digest.as_str()),
        (manifest_tmp, MANIFEST_FILE),
    ] {
        let dest = out_dir.join(name);
        t.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(|e| BuildError::Io {
                path: t.path().to_path_buf(),
                source: e,
            })?;
        t.persist(&dest).map_err(|e| BuildError::Io {
            path: dest,
            source: e.error,
        })?;
    }
    if meta_digest != img.meta_digest {
        fs::remove_file(&old).map_err(|e| BuildError::Io {
            path: old.clone(),
            source: e,
        })?;
    }
    if let Ok(d) = fs::File::open(out_dir) {
        let _ = d.sync_all();
    }
    Ok(BuiltImage {
        meta_digest,
        meta_size: sealed.len() as u64,
        ..img.clone()
    })
}
