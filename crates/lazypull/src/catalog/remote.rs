//! Images in OCI registries: what mounting one by reference fetches — the
//! manifest (lazypull image format 2, whose layers and annotations say all
//! the daemon needs: the config is the container runtime's and is not
//! fetched), the meta blob (whole, verified, kept in the work dir) and every
//! chunk table (verified against the manifest's annotations) — and the
//! [`ChunkedBlob`]s that then read its data blobs' stored bytes by Range from
//! the registry.
//!
//! It owns the registry side of registering an image; it must not record
//! what is registered (the catalog does).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use lazypull_backend::registry::{
    docker_config_credentials, ClientOptions, Credentials, Reference, Registry,
};
use lazypull_blob::ChunkTable;
use lazypull_engine::{ChunkedBlob, FetchContext};
use lazypull_oci::lazy::LazyImage;

use super::meta_dir::MetaDir;
use crate::control::RegisterRequest;

/// Default of [`RemoteSettings::max_meta_size`] (config key `max_meta_size`),
/// 1 GiB: a meta blob holds metadata only (inodes, directories, chunk
/// indexes), some hundred bytes a file, so this is millions of files. It is
/// fetched whole and parsed in memory, hence a limit at all.
pub(crate) const DEFAULT_MAX_META_SIZE: u64 = 1 << 30;

/// Settings for remote images.
#[derive(Debug, Clone)]
pub(crate) struct RemoteSettings {
    pub(crate) client: ClientOptions,
    /// Docker-style config file for credentials (None: the default places).
    pub(crate) docker_config: Option<PathBuf>,
    /// Largest meta blob fetched (from a registry, a blob URL or a blob dir).
    pub(crate) max_meta_size: u64,
    /// What `lazypull cri-proxy` handed over from kubelet's pulls: used for
    /// an image registered without credentials, before the docker config.
    pub(crate) kubelet: Arc<super::kubelet_credentials::KubeletCredentials>,
}

/// Refuses a blob whose trusted descriptor declares more than `limit` bytes,
/// before any of it is fetched.
fn check_declared(what: &str, declared: u64, limit: u64) -> anyhow::Result<()> {
    if declared > limit {
        bail!("{what} declares {declared} bytes, more than the limit of {limit} bytes: refusing to fetch it");
    }
    Ok(())
}

/// What registering an image of a registry fetched.
pub(crate) struct FetchedImage {
    /// The meta blob's name: the `fsid` to mount.
    pub(crate) fsid: String,
    /// The reference as asked for.
    pub(crate) reference: String,
    /// The same, pinned to the manifest fetched now.
    pub(crate) pinned: String,
    pub(crate) manifest_digest: String,
    /// The verified meta blob in the work dir.
    pub(crate) meta_path: PathBuf,
    /// Its data blobs, in device table order.
    pub(crate) blobs: Vec<FetchedBlob>,
    /// Bytes fetched (manifest, meta blob, tables, prefetch record).
    pub(crate) fetched_bytes: u64,
    /// The blob ranges of its recorded prefetch, in order (empty without one).
    pub(crate) recorded: Vec<super::BlobRange>,
}

/// One data blob of a fetched image, ready to serve.
pub(crate) struct FetchedBlob {
    pub(crate) digest: String,
    /// Uncompressed size.
    pub(crate) size: u64,
    pub(crate) source: Arc<ChunkedBlob>,
}

/// The credentials the daemon itself has for `reference`, in order: what
/// kubelet sent for its repository (`lazypull cri-proxy`), else the docker
/// config's (its entry or credential helper) for its registry.
fn own_credentials(
    kubelet: &super::kubelet_credentials::KubeletCredentials,
    docker_config: Option<&std::path::Path>,
    reference: &Reference,
) -> anyhow::Result<Option<Credentials>> {
    if let Some(c) = kubelet.get(&reference.registry, &reference.repository) {
        tracing::debug!(%reference, "logging in with the credentials kubelet sent for its pull");
        return Ok(Some(c));
    }
    Ok(docker_config_credentials(
        docker_config,
        &reference.registry,
    )?)
}

/// Fetches and verifies what image `req.reference` needs at mount. Blocking
/// (network I/O): call it off the async runtime.
pub(crate) fn fetch_image(
    req: &RegisterRequest,
    remote: &RemoteSettings,
    meta_dir: &MetaDir,
    fetch: &Arc<FetchContext>,
) -> anyhow::Result<FetchedImage> {
    let reference = Reference::parse(&req.reference)?;
    let mut client = remote.client.clone();
    if req.insecure && !client.insecure_hosts.contains(&reference.registry) {
        client.insecure_hosts.push(reference.registry.clone());
    }
    let creds = match (&req.username, &req.password) {
        (Some(u), Some(p)) => Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        }),
        (Some(_), None) | (None, Some(_)) => {
            bail!("give both a username and a password, or neither")
        }
        (None, None) => {
            own_credentials(&remote.kubelet, remote.docker_config.as_deref(), &reference)?
        }
    };
    let explicit = req.username.is_some();
    let registry = Registry::new(&reference.registry, &reference.repository, creds, &client)?;
    if !explicit {
        // Credentials that rotate under a long-lived mount (kubelet's for a
        // newer pull, a credential helper's): asked again when the registry
        // refuses the ones in use.
        let (kubelet, docker_config) = (remote.kubelet.clone(), remote.docker_config.clone());
        let reference = reference.clone();
        registry.set_credential_source(Arc::new(move || {
            own_credentials(&kubelet, docker_config.as_deref(), &reference)
                .ok()
                .flatten()
        }));
    }
    let manifest = registry
        .get_manifest(&reference.reference)
        .with_context(|| format!("fetching the manifest of {reference}"))?;
    let mut fetched = manifest.bytes.len() as u64;
    let (parsed, lazy) =
        LazyImage::parse_manifest(&manifest.bytes).with_context(|| format!("{reference}"))?;
    let record_ref =
        lazypull_oci::lazy::prefetch_record(&parsed).with_context(|| format!("{reference}"))?;
    // Every size below comes from the manifest, whose digest was checked,
    // and is bounded before a byte is fetched; the download then stops at
    // the declared size.
    let fsid = lazy.meta_hex().to_owned();

    let meta_path = fetch_meta(
        &registry,
        &lazy,
        meta_dir,
        remote.max_meta_size,
        &mut fetched,
    )?;
    let meta =
        std::fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
    let image = lazypull_erofs::Image::from_bytes(meta)
        .with_context(|| format!("the meta blob of {reference} is not a valid EROFS image"))?;
    let tags: Vec<String> = image
        .devices()
        .iter()
        .map(|d| String::from_utf8_lossy(d.tag_bytes()).into_owned())
        .collect();
    let names: Vec<String> = lazy.blobs.iter().map(|b| b.digest.clone()).collect();
    if tags != names {
        bail!(
            "{reference}: the manifest lists blobs {names:?} but its meta blob's device table names {tags:?}"
        );
    }

    // A recorded prefetch must name files of this image and ranges within
    // them: checked here, so a bad record refuses the image at register.
    let recorded = match &record_ref {
        None => Vec::new(),
        Some(r) => {
            let bytes = registry
                .get_blob_sized(&r.digest, r.size, &|_| {})
                .with_context(|| {
                    format!("fetching the prefetch record {} of {reference}", r.digest)
                })?;
            fetched += bytes.len() as u64;
            let record = lazypull_oci::prefetch::Record::parse(&bytes).with_context(|| {
                format!("refusing {reference}: its prefetch record {}", r.digest)
            })?;
            super::recorded::spans_of(&image, &names, &record).with_context(|| {
                format!("refusing {reference}: its prefetch record {}", r.digest)
            })?
        }
    };

    let mut blobs = Vec::new();
    for b in &lazy.blobs {
        check_declared(
            &format!(
                "the manifest of {reference}: the chunk table of blob {} ({} bytes)",
                b.digest, b.size
            ),
            b.table.size,
            lazypull_blob::format::max_table_len(b.size),
        )?;
        let table_bytes = registry
            .get_blob_sized(&b.table.digest, b.table.size, &|_| {})
            .with_context(|| format!("fetching the chunk table of blob {}", b.digest))?;
        fetched += table_bytes.len() as u64;
        let table = ChunkTable::decode(&table_bytes)
            .with_context(|| format!("the chunk table of blob {} is corrupt", b.digest))?;
        if table.digest() != b.digest
            || table.uncompressed_size() != b.size
            || table.stored_size() != b.data.size
        {
            bail!(
                "{reference}: chunk table {} describes blob {} ({} bytes, {} stored), the manifest says {} ({} bytes, {} stored)",
                b.table.digest, table.digest(), table.uncompressed_size(), table.stored_size(),
                b.digest, b.size, b.data.size
            );
        }
        let stored = registry.blob_reader(&b.data.digest, b.data.size);
        blobs.push(FetchedBlob {
            digest: b.digest.clone(),
            size: b.size,
            source: Arc::new(ChunkedBlob::new(
                b.digest.clone(),
                table,
                stored,
                fetch.clone(),
            )),
        });
    }
    Ok(FetchedImage {
        fsid,
        reference: reference.to_string(),
        pinned: pinned(&reference, &manifest.digest),
        manifest_digest: manifest.digest,
        meta_path,
        blobs,
        fetched_bytes: fetched,
        recorded,
    })
}

/// The meta blob in the work dir, fetched and verified unless a verified
/// copy is already there.
fn fetch_meta(
    registry: &Registry,
    image: &LazyImage,
    meta_dir: &MetaDir,
    max_meta_size: u64,
    fetched: &mut u64,
) -> anyhow::Result<PathBuf> {
    let hex = image.meta_hex();
    if let Some(path) = meta_dir.verified(hex)? {
        return Ok(path);
    }
    check_declared(
        "the manifest: its meta blob",
        image.meta.size,
        max_meta_size,
    )?;
    let bytes = registry
        .get_blob_sized(&image.meta.digest, image.meta.size, &|_| {})
        .context("fetching the meta blob")?;
    *fetched += bytes.len() as u64;
    meta_dir.keep(hex, &bytes)
}

/// `reference` with its tag replaced by the manifest digest.
fn pinned(reference: &Reference, digest: &str) -> String {
    format!("{}/{}@{}", reference.registry, reference.repository, digest)
}
