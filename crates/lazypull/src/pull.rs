//! What `lazypull pull` writes to containerd so that a lazy image (format 2)
//! is an ordinary, unpacked image there, without a byte of its layers
//! fetched: the plan ([`plan`]: chain ids, labels, garbage collection
//! references) and carrying it out ([`run`]) with [`crate::containerd_client`].
//!
//! In order, under a containerd lease (so that nothing half-written is
//! collected meanwhile, and everything is if the pull fails):
//! 1. the manifest and the config go into containerd's content store, the
//!    manifest labelled `containerd.io/gc.ref.content.config` and
//!    `containerd.io/gc.ref.content.l.<i>` (what it references), the config
//!    `containerd.io/gc.ref.snapshot.<snapshotter>` = the top chain id (the
//!    snapshot chain the image keeps alive) — the labels containerd's own
//!    pull and unpack set;
//! 2. per layer, in order, a `Prepare` through containerd's snapshots service
//!    (key `extract-<random>-<chain id>`, parent the previous chain id) with
//!    the layer's `containerd.io/snapshot/*` annotations,
//!    `containerd.io/snapshot.ref` = its chain id and
//!    `containerd.io/snapshot/lazypull.image-ref` = the image pinned by
//!    manifest digest, as containerd's unpacker would send them: lazypull's
//!    snapshotter makes the committed snapshot and answers AlreadyExists;
//!    one that makes an active snapshot instead is not lazypull's (the
//!    snapshot is removed and the pull fails saying so);
//! 3. the image record (`Create`, or `Update` of its target) names the
//!    manifest; the lease is deleted.
//!
//! The registry side (which manifest, and checking that it is a lazy image)
//! is the caller's; this works on the fetched bytes.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use lazypull_containerd_api::containerd::types::Descriptor;
use lazypull_oci::lazy::{LazyImage, Manifest};
use lazypull_snapshotter::lazy::{LABEL_EAGER, LABEL_IMAGE_REF, LABEL_SNAPSHOT_REF};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::containerd_client::{Client, ImagePut, Prepared, Written};

/// The prefix of the layer annotations that go to the snapshotter as
/// `Prepare` labels (containerd's unpacker passes these on too).
const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";
/// The manifest's reference to its config, for containerd's GC.
const LABEL_GC_CONFIG: &str = "containerd.io/gc.ref.content.config";
/// How long the lease lives if `lazypull pull` dies before deleting it.
pub const LEASE_EXPIRE: Duration = Duration::from_secs(3600);

/// The image as fetched from the registry.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The image record's name: the reference as asked for, normalized
    /// (`REGISTRY/REPOSITORY:TAG` or `@sha256:...`).
    pub name: String,
    /// `REGISTRY/REPOSITORY` (the pinned reference is this `@` the manifest
    /// digest).
    pub repository: String,
    /// The image manifest's exact bytes (the platform's, if the reference
    /// named an index).
    pub manifest: Vec<u8>,
    /// The config's exact bytes.
    pub config: Vec<u8>,
}

/// What to do, derived from the fetched image alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub name: String,
    /// `REGISTRY/REPOSITORY@sha256:<manifest>`.
    pub pinned: String,
    pub snapshotter: String,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Layer>,
}

/// A blob to write to the content store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub labels: HashMap<String, String>,
}

/// A layer's remote snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layer {
    pub digest: String,
    pub media_type: String,
    /// containerd's name for the committed snapshot.
    pub chain_id: String,
    /// The previous layer's chain id ("" for the first).
    pub parent: String,
    /// The `Prepare` labels.
    pub labels: HashMap<String, String>,
}

/// What [`run`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    pub pinned: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub snapshotter: String,
    pub lease: String,
    /// "committed" (written now) or "existed", for the manifest and config.
    pub manifest: &'static str,
    pub config: &'static str,
    /// The chain ids of the committed snapshots, bottom first.
    pub chain: Vec<String>,
    /// "created" or "updated".
    pub image: &'static str,
    pub elapsed_ms: f64,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The chain ids of a layer stack (OCI image spec): the first diff id, then
/// `sha256(<parent chain id> + " " + <diff id>)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(parent) => sha256(format!("{parent} {d}").as_bytes()),
        };
        out.push(id);
    }
    out
}

/// The plan for `fetched`: refuses anything but a lazy image of this
/// format whose config matches its manifest.
pub fn plan(fetched: &Fetched, snapshotter: &str, eager: bool) -> anyhow::Result<Plan> {
    let (manifest, lazy): (Manifest, LazyImage) = LazyImage::parse_manifest(&fetched.manifest)
        .with_context(|| format!("{} cannot be pulled lazily", fetched.name))?;
    let manifest_digest = sha256(&fetched.manifest);
    let config_digest = sha256(&fetched.config);
    if config_digest != manifest.config.digest
        || fetched.config.len() as u64 != manifest.config.size
    {
        bail!(
            "the config of {} is {config_digest} ({} bytes), but its manifest names {} ({} bytes)",
            fetched.name,
            fetched.config.len(),
            manifest.config.digest,
            manifest.config.size
        );
    }
    lazy.check_config(&fetched.config)
        .with_context(|| format!("the config of {}", fetched.name))?;
    let pinned = format!("{}@{manifest_digest}", fetched.repository);
    let chain = chain_ids(&lazy.diff_ids());
    let Some(top) = chain.last() else {
        bail!("{} has no layers", fetched.name);
    };
    let mut manifest_labels =
        HashMap::from([(LABEL_GC_CONFIG.to_owned(), manifest.config.digest.clone())]);
    for (i, l) in manifest.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    let config_labels = HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
        top.clone(),
    )]);
    let layers = manifest
        .layers
        .iter()
        .zip(&chain)
        .enumerate()
        .map(|(i, (l, id))| {
            let mut labels: HashMap<String, String> = l
                .annotations
                .iter()
                .filter(|(k, _)| k.starts_with(SNAPSHOT_LABEL_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.insert(LABEL_SNAPSHOT_REF.to_owned(), id.clone());
            labels.insert(LABEL_IMAGE_REF.to_owned(), pinned.clone());
            if eager {
                labels.insert(LABEL_EAGER.to_owned(), "true".to_owned());
            }
            Layer {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                chain_id: id.clone(),
                parent: if i == 0 {
                    String::new()
                } else {
                    chain[i - 1].clone()
                },
                labels,
            }
        })
        .collect();
    Ok(Plan {
        name: fetched.name.clone(),
        pinned,
        snapshotter: snapshotter.to_owned(),
        manifest: Blob {
            media_type: manifest
                .media_type
                .clone()
                .unwrap_or_else(|| lazypull_oci::lazy::MANIFEST_MEDIA_TYPE.to_owned()),
            digest: manifest_digest,
            size: fetched.manifest.len() as u64,
            labels: manifest_labels,
        },
        config: Blob {
            media_type: manifest.config.media_type.clone(),
            digest: config_digest,
            size: fetched.config.len() as u64,
            labels: config_labels,
        },
        layers,
    })
}

/// A random hex string of `bytes` bytes (the kernel's randomness).
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(hex::encode(buf))
}

/// Identifiers a pull uses, random so that concurrent pulls do not collide.
#[derive(Debug, Clone)]
pub struct Ids {
    /// The lease id.
    pub lease: String,
    /// The part of the snapshot keys and content ingest refs that is unique
    /// to this pull.
    pub unique: String,
}

impl Ids {
    pub fn new() -> anyhow::Result<Ids> {
        let unique = random_hex(8)?;
        Ok(Ids {
            lease: format!("lazypull-pull-{unique}"),
            unique,
        })
    }
}

/// Carries out `plan` on `client` (whose namespace is the pull's):
/// `progress` hears each step. The lease is deleted at the end, also when a
/// step failed (so that containerd collects what was written).
pub async fn run(
    client: &Client,
    plan: &Plan,
    ids: &Ids,
    fetched: &Fetched,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    let lease = client
        .create_lease(&ids.lease, LEASE_EXPIRE, SystemTime::now())
        .await?;
    let leased = client.with_lease(&lease)?;
    let result = steps(&leased, plan, ids, fetched, progress).await;
    // Deleted either way: on success the image, the manifest's and the
    // config's labels hold everything; on failure nothing should.
    let deleted = client.delete_lease(&lease, false).await;
    let (manifest, config, image) = result?;
    deleted?;
    Ok(Report {
        name: plan.name.clone(),
        pinned: plan.pinned.clone(),
        manifest_digest: plan.manifest.digest.clone(),
        config_digest: plan.config.digest.clone(),
        snapshotter: plan.snapshotter.clone(),
        lease,
        manifest,
        config,
        chain: plan.layers.iter().map(|l| l.chain_id.clone()).collect(),
        image,
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

fn written(w: Written) -> &'static str {
    match w {
        Written::Committed => "committed",
        Written::Existed => "existed",
    }
}

async fn steps(
    client: &Client,
    plan: &Plan,
    ids: &Ids,
    fetched: &Fetched,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<(&'static str, &'static str, &'static str)> {
    // The config first: once the manifest is there, its references are.
    let config = client
        .write_content(
            &format!("lazypull-{}-config-{}", ids.unique, plan.config.digest),
            &fetched.config,
            &plan.config.digest,
            &plan.config.labels,
        )
        .await?;
    progress(&format!(
        "config {} ({} bytes): {}",
        plan.config.digest,
        plan.config.size,
        written(config)
    ));
    let manifest = client
        .write_content(
            &format!("lazypull-{}-manifest-{}", ids.unique, plan.manifest.digest),
            &fetched.manifest,
            &plan.manifest.digest,
            &plan.manifest.labels,
        )
        .await?;
    progress(&format!(
        "manifest {} ({} bytes): {}",
        plan.manifest.digest,
        plan.manifest.size,
        written(manifest)
    ));
    for (i, layer) in plan.layers.iter().enumerate() {
        let key = format!("extract-{}-{}", ids.unique, layer.chain_id);
        let prepared = client
            .prepare_snapshot(&plan.snapshotter, &key, &layer.parent, layer.labels.clone())
            .await
            .map_err(|e| {
                let hint = match &e {
                    crate::containerd_client::Error::Call { status, .. }
                        if status.message().contains("snapshotter not loaded") =>
                    {
                        format!(
                            "containerd has no snapshotter {:?}: add lazypull's as a proxy plugin ([proxy_plugins.{}] type = \"snapshot\", see `lazypull snapshotter --help`) or pass its name with --snapshotter",
                            plan.snapshotter, plan.snapshotter
                        )
                    }
                    _ => format!("layer {i} ({})", layer.digest),
                };
                anyhow::Error::new(e).context(hint)
            })?;
        match prepared {
            Prepared::AlreadyExists(_) => {}
            Prepared::Active(_) => {
                let removed = client.remove_snapshot(&plan.snapshotter, &key).await;
                let note = match removed {
                    Ok(()) => String::new(),
                    Err(e) => format!(" (and removing it failed: {e})"),
                };
                bail!(
                    "snapshotter {:?} is not lazypull's: Prepare of layer {i} ({}) succeeded with an active snapshot instead of answering AlreadyExists with a remote snapshot{note}; run `lazypull snapshotter` as containerd's proxy snapshotter and pass its name with --snapshotter",
                    plan.snapshotter,
                    layer.digest
                );
            }
        }
        progress(&format!(
            "layer {i}/{} {} ({}): snapshot {} committed",
            plan.layers.len(),
            layer.digest,
            layer
                .labels
                .get(lazypull_snapshotter::lazy::LABEL_ROLE)
                .map(String::as_str)
                .unwrap_or("?"),
            layer.chain_id
        ));
    }
    let target = Descriptor {
        media_type: plan.manifest.media_type.clone(),
        digest: plan.manifest.digest.clone(),
        size: plan.manifest.size as i64,
        annotations: HashMap::new(),
    };
    let image = match client.put_image(&plan.name, target).await? {
        ImagePut::Created => "created",
        ImagePut::Updated => "updated",
    };
    progress(&format!(
        "image {} -> {}: {image}",
        plan.name, plan.manifest.digest
    ));
    Ok((written(manifest), written(config), image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazypull_oci::lazy::{BlobRef, DataBlob, LABEL_ROLE};

    fn hex64(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn fetched() -> Fetched {
        let blob = |name: char, table: char, data: char| DataBlob {
            digest: hex64(name),
            size: 1 << 20,
            table: BlobRef {
                digest: format!("sha256:{}", hex64(table)),
                size: 152,
            },
            data: BlobRef {
                digest: format!("sha256:{}", hex64(data)),
                size: 1000,
            },
        };
        let img = LazyImage {
            meta: BlobRef {
                digest: format!("sha256:{}", hex64('a')),
                size: 8192,
            },
            chunk_size: 1 << 20,
            blobs: vec![blob('b', 'c', 'd')],
        };
        let config =
            serde_json::to_vec(&img.config(&lazypull_oci::lazy::minimal_config()).unwrap())
                .unwrap();
        let manifest = serde_json::to_vec(&img.manifest(&config)).unwrap();
        Fetched {
            name: "127.0.0.1:5000/lazy/app:v1".into(),
            repository: "127.0.0.1:5000/lazy/app".into(),
            manifest,
            config,
        }
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // Diff ids sha256("a"), sha256("b"), sha256("c"); the expected chain
        // ids computed with `printf '%s %s' PARENT DIFF | sha256sum`.
        let ids = chain_ids(&[
            "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb".into(),
            "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d".into(),
            "sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6".into(),
        ]);
        assert_eq!(
            ids,
            [
                "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
                "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676",
                "sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106",
            ]
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn the_plan_labels_what_containerd_needs() {
        let f = fetched();
        let p = plan(&f, "lazypull", false).unwrap();
        assert_eq!(p.manifest.digest, sha256(&f.manifest));
        assert_eq!(
            p.pinned,
            format!("127.0.0.1:5000/lazy/app@{}", p.manifest.digest)
        );
        assert_eq!(p.layers.len(), 3);
        // The meta layer's chain id is its digest: sha256:<meta hex>.
        assert_eq!(p.layers[0].chain_id, format!("sha256:{}", hex64('a')));
        assert_eq!(p.layers[0].parent, "");
        assert_eq!(p.layers[1].parent, p.layers[0].chain_id);
        assert_eq!(p.layers[2].parent, p.layers[1].chain_id);
        assert_eq!(p.manifest.labels[LABEL_GC_CONFIG], p.config.digest);
        assert_eq!(
            p.manifest.labels["containerd.io/gc.ref.content.l.2"],
            format!("sha256:{}", hex64('d'))
        );
        assert_eq!(p.manifest.labels.len(), 4);
        assert_eq!(
            p.config.labels["containerd.io/gc.ref.snapshot.lazypull"],
            p.layers[2].chain_id
        );
        for (l, role) in p.layers.iter().zip(["meta", "table", "data"]) {
            assert_eq!(l.labels[LABEL_ROLE], role);
            assert_eq!(l.labels[LABEL_SNAPSHOT_REF], l.chain_id);
            assert_eq!(l.labels[LABEL_IMAGE_REF], p.pinned);
            assert!(!l.labels.contains_key(LABEL_EAGER));
            assert!(l
                .labels
                .keys()
                .all(|k| k.starts_with("containerd.io/snapshot")));
        }
        let eager = plan(&f, "other", true).unwrap();
        assert!(eager.layers.iter().all(|l| l.labels[LABEL_EAGER] == "true"));
        assert!(eager
            .config
            .labels
            .contains_key("containerd.io/gc.ref.snapshot.other"));
    }

    #[test]
    fn what_is_not_a_lazy_image_is_refused() {
        let mut f = fetched();
        f.config.push(b' ');
        let err = format!("{:#}", plan(&f, "lazypull", false).unwrap_err());
        assert!(
            err.contains("the config of") && err.contains("manifest names"),
            "{err}"
        );

        let mut f = fetched();
        f.manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:00","size":1}]}"#.to_vec();
        let err = format!("{:#}", plan(&f, "lazypull", false).unwrap_err());
        assert!(
            err.contains("cannot be pulled lazily")
                && err.contains("not a lazypull image")
                && err.contains("lazypull convert"),
            "{err}"
        );
    }

    #[test]
    fn ids_are_random() {
        let (a, b) = (Ids::new().unwrap(), Ids::new().unwrap());
        assert_ne!(a.unique, b.unique);
        assert_eq!(a.unique.len(), 16);
        assert!(a.lease.starts_with("lazypull-pull-"));
    }
}
