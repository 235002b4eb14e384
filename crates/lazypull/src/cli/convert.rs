//! `lazypull convert`: pulls an ordinary OCI/Docker image from a registry
//! (layers and config, each checked against the manifest's digests), builds
//! it into a lazy image (`lazypull-ingest`) that keeps the source's runtime
//! config, and pushes that (as `lazypull push` does). The registry protocol
//! is `lazypull-backend`'s.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::ProgressBar;
use lazypull_backend::registry::Reference;
use lazypull_blob::{pack, PackOptions};
use lazypull_oci::{media_type, ImageIndex, ImageManifest};
use serde_json::json;

use super::build::{record_image_config, MAX_IMAGE_CONFIG};
use super::output::byte_bar;
use super::push::{push_dir, report};
use super::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// An ordinary OCI or Docker image in a registry: REGISTRY/REPOSITORY[:TAG|@DIGEST].
    pub(crate) source: String,
    /// Where to push the lazy image: REGISTRY/REPOSITORY:TAG. The
    /// --username / --password-stdin credentials (and the environment's) are
    /// this registry's; the source gets them only if it is on the same
    /// registry host, else its own docker config entry.
    pub(crate) target: String,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    /// Chunk size of the built image.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = crate::config::parse_size)]
    pub(crate) chunk_size: u64,
    /// Keep the downloaded layers and built image here instead of a temporary dir.
    #[arg(long, value_name = "DIR")]
    pub(crate) work_dir: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Picks the linux/amd64 manifest of an index (or the only one).
fn pick_platform(index: &ImageIndex) -> anyhow::Result<String> {
    let wanted = index.for_platform("linux", "amd64").next();
    match (wanted, index.manifests.as_slice()) {
        (Some(m), _) => Ok(m.digest.clone()),
        (None, [only]) => Ok(only.digest.clone()),
        (None, []) => bail!("the image index has no manifests"),
        _ => bail!("the image index has no linux/amd64 manifest"),
    }
}

pub fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let source = Reference::parse(&args.source)?;
    let target = Reference::parse(&args.target)?;
    let chunk_size = u32::try_from(args.chunk_size)
        .ok()
        .filter(|c| c.is_power_of_two() && *c >= 4096)
        .context("--chunk-size must be a power of two of at least 4KiB")?;
    // The credentials given are the target's (pushing needs them): the
    // source gets them only on the same registry host.
    let (dst, src) = args.registry.connect_pair(&target, &source)?;
    let scratch = tempfile::tempdir().context("creating a temporary directory")?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    let layout = work.join("source");
    let blobs_dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs_dir)
        .with_context(|| format!("creating {}", blobs_dir.display()))?;

    let mut manifest = src
        .get_manifest(&source.reference)
        .with_context(|| format!("fetching the manifest of {source}"))?;
    if media_type::is_index(&manifest.media_type) {
        let index: ImageIndex =
            serde_json::from_slice(&manifest.bytes).context("parsing the source image index")?;
        let digest = pick_platform(&index)?;
        manifest = src.get_manifest(&digest)?;
    }
    let parsed: ImageManifest =
        serde_json::from_slice(&manifest.bytes).context("parsing the source manifest")?;
    if lazypull_oci::lazy::is_lazypull(&parsed) {
        bail!("{source} is already a lazypull image");
    }
    // The runtime config, verified against the manifest (digest and size);
    // ingest checks it again as it reads the layout.
    let config_hex = parsed
        .config
        .digest
        .strip_prefix("sha256:")
        .context("a config digest that is not sha256")?;
    if parsed.config.size > MAX_IMAGE_CONFIG {
        bail!(
            "the config of {source} declares {} bytes, more than the limit of {MAX_IMAGE_CONFIG}",
            parsed.config.size
        );
    }
    let config = src
        .get_blob_sized(&parsed.config.digest, parsed.config.size, &|_| {})
        .with_context(|| format!("downloading the config of {source}"))?;
    std::fs::write(blobs_dir.join(config_hex), &config)?;
    let layers = &parsed.layers;
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let pb = byte_bar(args.json, total, &format!("pulling {source}"));
    for l in layers {
        let digest = l.digest.as_str();
        let hex = digest
            .strip_prefix("sha256:")
            .context("a layer digest that is not sha256")?;
        let path = blobs_dir.join(hex);
        let base = pb.position();
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let progress = {
            let pb = pb.clone();
            move |n: u64| pb.set_position(base + n)
        };
        // No more than the (digest-checked) manifest declares lands on disk.
        src.get_blob_to_sized(digest, l.size, &mut file, &progress)
            .with_context(|| format!("downloading layer {digest}"))?;
        file.flush()?;
    }
    pb.finish_and_clear();
    let mhex = manifest.digest.trim_start_matches("sha256:");
    std::fs::write(blobs_dir.join(mhex), &manifest.bytes)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": if manifest.media_type.is_empty() { media_type::OCI_MANIFEST } else { manifest.media_type.as_str() },
            "digest": manifest.digest,
            "size": manifest.bytes.len(),
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;

    let out = work.join("image");
    let pb = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    pb.set_message(format!("building the lazy image of {source}"));
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let built = lazypull_ingest::build_source_image(
        &layout,
        &out,
        &lazypull_erofs::BuildOptions {
            chunk_size,
            ..lazypull_erofs::BuildOptions::default()
        },
        &lazypull_ingest::IngestOptions::default(),
    )
    .with_context(|| format!("building {source}"))?;
    let Some(config) = &built.config else {
        bail!("building {source}: the image layout gave no config");
    };
    record_image_config(&out, Some(&config.bytes))?;
    let built = built.image;
    for b in &built.blobs {
        pb.set_message(format!("compressing blob {}", &b.digest[..12]));
        let plain = out.join(&b.digest);
        pack(&plain, &out, &PackOptions::default())
            .with_context(|| format!("compressing {}", plain.display()))?;
        std::fs::remove_file(&plain)?;
    }
    pb.finish_and_clear();
    let pushed = push_dir(&out, &target, &dst, args.json)?;
    report(&pushed, args.json)
}
