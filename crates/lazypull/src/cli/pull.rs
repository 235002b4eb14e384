//! `lazypull pull`: makes a lazy image an unpacked image in containerd
//! without fetching its layers. Fetches the manifest (the host platform's,
//! from an index) and the config from the registry (`lazypull-backend`),
//! refuses what is not a lazy image, and hands them to [`crate::pull`],
//! which writes them to containerd and has its snapshotter make the remote
//! snapshots. Flags, progress (stderr) and the result (stdout) here.

use std::path::PathBuf;

use anyhow::{bail, Context};
use lazypull_backend::registry::Reference;
use lazypull_oci::{media_type, ImageIndex};

use super::build::MAX_IMAGE_CONFIG;
use super::registry_args::RegistryArgs;
use crate::containerd_client::{self, Client};
use crate::pull::{self, Fetched, Ids};

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The lazy image: REGISTRY/REPOSITORY[:TAG|@DIGEST] (made with `lazypull
    /// convert` or `lazypull push`). containerd's image record gets this
    /// name (`:latest` added if it has neither tag nor digest): use it with
    /// `ctr run`.
    pub(crate) reference: String,
    /// containerd's gRPC socket.
    #[arg(long, value_name = "SOCKET", default_value = containerd_client::DEFAULT_ADDRESS)]
    pub(crate) address: PathBuf,
    /// containerd namespace (`ctr -n`). Also CONTAINERD_NAMESPACE.
    #[arg(long, env = "CONTAINERD_NAMESPACE", value_name = "NAME", default_value = containerd_client::DEFAULT_NAMESPACE)]
    pub(crate) namespace: String,
    /// The name containerd knows lazypull's snapshotter by
    /// (`[proxy_plugins.NAME]` in its config).
    #[arg(long, value_name = "NAME", default_value = "lazypull")]
    pub(crate) snapshotter: String,
    /// Have the daemon fetch the whole image in the background as soon as a
    /// container first mounts it (reads that wait still go first).
    #[arg(long)]
    pub(crate) eager: bool,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    /// Print what was done as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The host platform's manifest digest in an index (or its only entry).
fn pick_platform(index: &ImageIndex, what: &Reference) -> anyhow::Result<String> {
    let arch = lazypull_oci::lazy::host_architecture();
    let wanted = index.for_platform("linux", arch).next();
    match (wanted, index.manifests.as_slice()) {
        (Some(m), _) => Ok(m.digest.clone()),
        (None, [only]) => Ok(only.digest.clone()),
        (None, []) => bail!("the image index of {what} has no manifests"),
        _ => bail!("the image index of {what} has no linux/{arch} manifest"),
    }
}

/// The manifest and config of `reference`, checked to be a lazy image.
fn fetch(args: &PullArgs, reference: &Reference) -> anyhow::Result<Fetched> {
    let registry = args.registry.connect(reference)?;
    let mut manifest = registry
        .get_manifest(&reference.reference)
        .with_context(|| format!("fetching the manifest of {reference}"))?;
    if media_type::is_index(&manifest.media_type) {
        let index: ImageIndex = serde_json::from_slice(&manifest.bytes)
            .with_context(|| format!("parsing the image index of {reference}"))?;
        let digest = pick_platform(&index, reference)?;
        manifest = registry
            .get_manifest(&digest)
            .with_context(|| format!("fetching the manifest {digest} of {reference}"))?;
    }
    let (parsed, _) =
        lazypull_oci::lazy::LazyImage::parse_manifest(&manifest.bytes).with_context(|| {
            format!(
                "{reference} cannot be pulled lazily (pull ordinary images with `ctr image pull`)"
            )
        })?;
    if parsed.config.size > MAX_IMAGE_CONFIG {
        bail!(
            "the config of {reference} declares {} bytes, more than the limit of {MAX_IMAGE_CONFIG}",
            parsed.config.size
        );
    }
    let config = registry
        .get_blob_sized(&parsed.config.digest, parsed.config.size, &|_| {})
        .with_context(|| format!("fetching the config of {reference}"))?;
    Ok(Fetched {
        name: reference.to_string(),
        repository: format!("{}/{}", reference.registry, reference.repository),
        manifest: manifest.bytes,
        config,
    })
}

pub fn pull(args: PullArgs) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.reference)?;
    // The registry client blocks: it runs before (not inside) the runtime.
    let fetched = fetch(&args, &reference)?;
    let plan = pull::plan(&fetched, &args.snapshotter, args.eager)?;
    eprintln!(
        "lazypull pull: {} is lazy image {} ({} layers); writing it to containerd at {} (namespace {}, snapshotter {})",
        plan.name,
        plan.pinned,
        plan.layers.len(),
        args.address.display(),
        args.namespace,
        plan.snapshotter
    );
    let ids = Ids::new()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let report = runtime.block_on(async {
        let client = Client::connect(&args.address, &args.namespace).await?;
        pull::run(&client, &plan, &ids, &fetched, &|line| {
            eprintln!("lazypull pull: {line}")
        })
        .await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "pulled {} ({}) into containerd lazily in {:.0} ms: {} snapshots committed by {}, no layer data fetched",
            report.name,
            report.manifest_digest,
            report.elapsed_ms,
            report.chain.len(),
            report.snapshotter
        );
    }
    Ok(())
}
