//! `lazypull push`: uploads a built image to an OCI registry as a lazy image
//! (format 2, `lazypull_oci::lazy`) — the meta blob, every data blob's chunk
//! table and stored units as annotated layers, and the source image's runtime
//! config (the image directory's `image-config.json`, else a minimal one) as
//! the OCI config, under an OCI manifest. Blobs already there are skipped. The forms are `lazypull-oci`'s and
//! `lazypull-blob`'s, the registry protocol `lazypull-backend`'s.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use lazypull_backend::registry::{Reference, Registry};
use lazypull_blob::{pack, Compression, PackOptions};
use lazypull_oci::lazy::{BlobRef, DataBlob, LazyImage, FORMAT_VERSION};
use sha2::{Digest, Sha256};

use super::build::{read_image_config, IMAGE_CONFIG_FILE};
use super::output::byte_bar;
use super::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// A built image directory (`lazypull build` output, with manifest.json).
    pub(crate) image: PathBuf,
    /// Where to push: REGISTRY/REPOSITORY:TAG, e.g. 127.0.0.1:5000/lazy/app:v1.
    pub(crate) target: String,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// SHA-256 of a file, as `sha256:<hex>`, and its size.
fn file_digest(path: &Path) -> anyhow::Result<BlobRef> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(BlobRef {
        digest: format!("sha256:{}", hex::encode(h.finalize())),
        size,
    })
}

/// One file to upload.
struct Upload {
    path: PathBuf,
    blob: BlobRef,
}

/// What a push did.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Pushed {
    pub(crate) target: String,
    pub(crate) manifest_digest: String,
    /// The lazypull image format pushed.
    pub(crate) format: u32,
    /// The config's digest.
    pub(crate) config_digest: String,
    pub(crate) meta: String,
    pub(crate) blobs: usize,
    pub(crate) uploaded_bytes: u64,
    pub(crate) skipped_bytes: u64,
}

/// Pushes the image in `dir` to `target` (a tag).
pub(crate) fn push_dir(
    dir: &Path,
    target: &Reference,
    registry: &Registry,
    quiet: bool,
) -> anyhow::Result<Pushed> {
    if target.is_digest() {
        bail!("push needs a tag, not a digest: {target}");
    }
    let manifest_path = dir.join(lazypull_erofs::MANIFEST_FILE);
    let built: lazypull_erofs::Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).with_context(|| {
            format!(
                "reading {} (is this a `lazypull build` output?)",
                manifest_path.display()
            )
        })?)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let meta_path = dir.join(&built.meta);
    let meta = file_digest(&meta_path)?;
    if meta.digest[7..] != built.meta {
        bail!(
            "meta blob {} does not hash to its name (got {}): the image directory is damaged",
            meta_path.display(),
            meta.digest
        );
    }
    let mut uploads = vec![Upload {
        path: meta_path,
        blob: meta.clone(),
    }];
    let mut blobs = Vec::new();
    let scratch = tempfile::tempdir_in(dir)
        .or_else(|_| tempfile::tempdir())
        .context("creating a scratch directory")?;
    for digest in &built.blobs {
        let lazypull_blob::StoredPaths {
            table: mut table_path,
            data: mut data_path,
        } = lazypull_blob::StoredPaths::in_dir(dir, digest);
        if !table_path.exists() {
            // A plain blob (`--compression none`): give it a chunk table, units raw.
            let plain = dir.join(digest);
            let packed = pack(
                &plain,
                scratch.path(),
                &PackOptions {
                    compression: Compression::None,
                    ..PackOptions::default()
                },
            )
            .with_context(|| format!("preparing {} for upload", plain.display()))?;
            table_path = packed.table_path;
            data_path = packed.data_path;
        }
        let table_bytes = std::fs::read(&table_path)
            .with_context(|| format!("reading {}", table_path.display()))?;
        let table = lazypull_blob::ChunkTable::decode(&table_bytes)
            .with_context(|| format!("chunk table {} is corrupt", table_path.display()))?;
        lazypull_blob::names::check_table_is_for(&table, digest)
            .with_context(|| format!("chunk table {}", table_path.display()))?;
        let table_ref = BlobRef {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&table_bytes))),
            size: table_bytes.len() as u64,
        };
        let data_ref = file_digest(&data_path)?;
        lazypull_blob::names::check_stored_len(&table, data_ref.size)
            .with_context(|| format!("stored data {}", data_path.display()))?;
        blobs.push(DataBlob {
            digest: digest.clone(),
            size: table.uncompressed_size(),
            table: table_ref.clone(),
            data: data_ref.clone(),
        });
        uploads.push(Upload {
            path: table_path,
            blob: table_ref,
        });
        uploads.push(Upload {
            path: data_path,
            blob: data_ref,
        });
    }
    let image = LazyImage {
        meta,
        chunk_size: built.chunk_size,
        blobs,
    };
    let recorded = dir.join(IMAGE_CONFIG_FILE);
    let source_config = if recorded.exists() {
        let bytes = read_image_config(&recorded)?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", recorded.display()))?
    } else {
        lazypull_oci::lazy::minimal_config()
    };
    let config = image
        .config(&source_config)
        .with_context(|| format!("the runtime config of {}", dir.display()))?;
    let config_bytes = serde_json::to_vec(&config)?;
    let config_path = scratch.path().join("config.json");
    std::fs::write(&config_path, &config_bytes)?;
    let config_ref = BlobRef {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes))),
        size: config_bytes.len() as u64,
    };
    let config_digest = config_ref.digest.clone();
    uploads.push(Upload {
        path: config_path,
        blob: config_ref,
    });

    let total: u64 = uploads.iter().map(|u| u.blob.size).sum();
    let pb = byte_bar(quiet, total, &format!("pushing to {target}"));
    let (mut uploaded, mut skipped) = (0u64, 0u64);
    for u in &uploads {
        let base = pb.position();
        let path = u.path.clone();
        let open =
            move || -> std::io::Result<Box<dyn Read + Send>> { Ok(Box::new(File::open(&path)?)) };
        let progress = {
            let pb = pb.clone();
            move |n: u64| pb.set_position(base + n)
        };
        let sent = registry
            .push_blob(&u.blob.digest, u.blob.size, &open, &progress)
            .with_context(|| format!("uploading {} ({})", u.path.display(), u.blob.digest))?;
        pb.set_position(base + u.blob.size);
        if sent {
            uploaded += u.blob.size;
        } else {
            skipped += u.blob.size;
        }
    }
    let manifest = image.manifest(&config_bytes);
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = registry
        .put_manifest(
            &target.reference,
            lazypull_oci::lazy::MANIFEST_MEDIA_TYPE,
            &manifest_bytes,
        )
        .with_context(|| format!("putting the manifest of {target}"))?;
    pb.finish_and_clear();
    Ok(Pushed {
        target: target.to_string(),
        manifest_digest,
        format: FORMAT_VERSION,
        config_digest,
        meta: built.meta,
        blobs: built.blobs.len(),
        uploaded_bytes: uploaded,
        skipped_bytes: skipped,
    })
}

pub(crate) fn report(p: &Pushed, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(p)?);
    } else {
        println!(
            "pushed {} ({}), lazypull image format {}: meta {}, {} data blobs; uploaded {}, already there {}",
            p.target,
            p.manifest_digest,
            p.format,
            &p.meta[..12],
            p.blobs,
            indicatif::HumanBytes(p.uploaded_bytes),
            indicatif::HumanBytes(p.skipped_bytes)
        );
    }
    Ok(())
}

pub fn push(args: PushArgs) -> anyhow::Result<()> {
    let target = Reference::parse(&args.target)?;
    let registry = args.registry.connect(&target)?;
    let pushed = push_dir(&args.image, &target, &registry, args.json)?;
    report(&pushed, args.json)
}
