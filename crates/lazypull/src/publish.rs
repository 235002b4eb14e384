//! `lazypull push` and `lazypull convert`: publishing lazy images to an OCI
//! registry. Front ends over `lazypull-backend` (registry client),
//! `lazypull-blob` (stored form, OCI layout) and `lazypull-erofs` (build).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use lazypull_backend::registry::{
    docker_config_credentials, ClientOptions, Credentials, Reference, Registry,
};
use lazypull_blob::oci::{BlobRef, DataBlob, ImageConfig, CONFIG_VERSION};
use lazypull_blob::{pack, Compression, PackOptions};
use serde_json::json;
use sha2::{Digest, Sha256};

/// How to reach and log in to a registry (shared by push, convert and mount).
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Registry user name. Also LAZYPULL_REGISTRY_USER. Without a user, the
    /// docker config file (`docker login`) is consulted.
    #[arg(long, env = "LAZYPULL_REGISTRY_USER", value_name = "USER")]
    pub username: Option<String>,
    /// Read the registry password from standard input (one line). Also
    /// LAZYPULL_REGISTRY_PASSWORD.
    #[arg(long)]
    pub password_stdin: bool,
    /// Speak plain HTTP to the registry (loopback registries always do).
    #[arg(long)]
    pub insecure: bool,
    /// Extra trusted root certificate (PEM); repeatable.
    #[arg(long = "ca-file", value_name = "FILE")]
    pub ca_files: Vec<PathBuf>,
    /// Docker-style config file with credentials. Default:
    /// $DOCKER_CONFIG/config.json, then ~/.docker/config.json.
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
}

impl RegistryArgs {
    /// Credentials from flags/env, else from the docker config file.
    pub fn credentials(&self, registry: &str) -> anyhow::Result<Option<Credentials>> {
        let password = if self.password_stdin {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            Some(line.trim_end_matches(['\r', '\n']).to_owned())
        } else {
            std::env::var("LAZYPULL_REGISTRY_PASSWORD").ok()
        };
        match (&self.username, password) {
            (Some(u), Some(p)) => Ok(Some(Credentials {
                username: u.clone(),
                password: p,
            })),
            (Some(u), None) => bail!(
                "a user name ({u}) but no password: pass --password-stdin or set LAZYPULL_REGISTRY_PASSWORD"
            ),
            (None, Some(_)) if self.password_stdin => {
                bail!("--password-stdin needs --username (or LAZYPULL_REGISTRY_USER)")
            }
            (None, _) => Ok(docker_config_credentials(self.docker_config.as_deref(), registry)?),
        }
    }

    pub fn client_options(&self, registry: &str) -> ClientOptions {
        let mut o = ClientOptions {
            ca_files: self.ca_files.clone(),
            ..ClientOptions::default()
        };
        if self.insecure {
            o.insecure_hosts.push(registry.to_owned());
        }
        o
    }

    pub fn connect(&self, reference: &Reference) -> anyhow::Result<Registry> {
        let creds = self.credentials(&reference.registry)?;
        Ok(Registry::new(
            &reference.registry,
            &reference.repository,
            creds,
            &self.client_options(&reference.registry),
        )?)
    }
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// A built image directory (`lazypull build` output, with manifest.json).
    pub image: PathBuf,
    /// Where to push: REGISTRY/REPOSITORY:TAG, e.g. 127.0.0.1:5000/lazy/app:v1.
    pub target: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// An ordinary OCI or Docker image in a registry: REGISTRY/REPOSITORY[:TAG|@DIGEST].
    pub source: String,
    /// Where to push the lazy image: REGISTRY/REPOSITORY:TAG.
    pub target: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Chunk size of the built image.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = crate::config::parse_size)]
    pub chunk_size: u64,
    /// Keep the downloaded layers and built image here instead of a temporary dir.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn byte_bar(hidden: bool, total: u64, msg: &str) -> ProgressBar {
    let pb = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_owned());
    pb
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
pub struct Pushed {
    pub target: String,
    pub manifest_digest: String,
    pub meta: String,
    pub blobs: usize,
    pub uploaded_bytes: u64,
    pub skipped_bytes: u64,
}

/// Pushes the image in `dir` to `target` (a tag).
fn push_dir(
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
        let (mut table_path, mut data_path) = (
            dir.join(format!("{digest}.table")),
            dir.join(format!("{digest}.zst")),
        );
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
        if table.digest() != *digest {
            bail!(
                "chunk table {} is for blob {}, not {digest}",
                table_path.display(),
                table.digest()
            );
        }
        let table_ref = BlobRef {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&table_bytes))),
            size: table_bytes.len() as u64,
        };
        let data_ref = file_digest(&data_path)?;
        if data_ref.size != table.stored_size() {
            bail!(
                "{} is {} bytes, its chunk table says {}",
                data_path.display(),
                data_ref.size,
                table.stored_size()
            );
        }
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
    let config = ImageConfig {
        lazypull: CONFIG_VERSION,
        meta,
        chunk_size: built.chunk_size,
        blobs,
    };
    let config_bytes = serde_json::to_vec(&config)?;
    let config_path = scratch.path().join("config.json");
    std::fs::write(&config_path, &config_bytes)?;
    let config_ref = BlobRef {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes))),
        size: config_bytes.len() as u64,
    };
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
    let manifest = config.manifest(&config_bytes);
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = registry
        .put_manifest(
            &target.reference,
            lazypull_blob::oci::MANIFEST_MEDIA_TYPE,
            &manifest_bytes,
        )
        .with_context(|| format!("putting the manifest of {target}"))?;
    pb.finish_and_clear();
    Ok(Pushed {
        target: target.to_string(),
        manifest_digest,
        meta: built.meta,
        blobs: built.blobs.len(),
        uploaded_bytes: uploaded,
        skipped_bytes: skipped,
    })
}

fn report(p: &Pushed, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(p)?);
    } else {
        println!(
            "pushed {} ({}): meta {}, {} data blobs; uploaded {}, already there {}",
            p.target,
            p.manifest_digest,
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

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Picks the linux/amd64 manifest of an index (or the only one).
fn pick_platform(index: &serde_json::Value) -> anyhow::Result<String> {
    let manifests = index["manifests"]
        .as_array()
        .context("the image index has no manifests")?;
    let digest_of = |m: &serde_json::Value| m["digest"].as_str().map(str::to_owned);
    let wanted = manifests
        .iter()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64");
    match (wanted, manifests.len()) {
        (Some(m), _) => digest_of(m).context("a manifest entry without a digest"),
        (None, 1) => digest_of(&manifests[0]).context("a manifest entry without a digest"),
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
    let src = args.registry.connect(&source)?;
    let dst = args.registry.connect(&target)?;
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
    if INDEX_TYPES.contains(&manifest.media_type.as_str()) {
        let index: serde_json::Value = serde_json::from_slice(&manifest.bytes)?;
        let digest = pick_platform(&index)?;
        manifest = src.get_manifest(&digest)?;
    }
    let parsed: serde_json::Value =
        serde_json::from_slice(&manifest.bytes).context("parsing the source manifest")?;
    if parsed["config"]["mediaType"] == lazypull_blob::oci::CONFIG_MEDIA_TYPE {
        bail!("{source} is already a lazypull image");
    }
    let layers = parsed["layers"]
        .as_array()
        .context("the source manifest has no layers")?;
    let total: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    let pb = byte_bar(args.json, total, &format!("pulling {source}"));
    for l in layers {
        let digest = l["digest"].as_str().context("a layer without a digest")?;
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
        src.get_blob_to(digest, &mut file, &progress)
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
            "mediaType": if manifest.media_type.is_empty() { "application/vnd.oci.image.manifest.v1+json" } else { manifest.media_type.as_str() },
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
    let built = lazypull_erofs::build_from_source(
        &layout,
        &out,
        &lazypull_erofs::BuildOptions {
            chunk_size,
            ..lazypull_erofs::BuildOptions::default()
        },
    )
    .with_context(|| format!("building {source}"))?;
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
