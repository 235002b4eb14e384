//! The daemon's catalog: which blob names the kernel may open and where their
//! bytes come from.
//!
//! Images mounted by reference are registered here: at mount the daemon fetches
//! the manifest, the config, the meta blob (whole, verified, kept in the work
//! dir) and every chunk table (verified), and from then on a data blob's name
//! resolves to a [`ChunkedBlob`] reading its stored bytes by Range from the
//! registry. Names not registered fall back to the local blob directory.
//!
//! It owns no format, fetch or protocol logic: it wires the library crates.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use lazypull_backend::registry::{
    docker_config_credentials, ClientOptions, Credentials, Reference, Registry,
};
use lazypull_backend::{BlobSource, HttpBlob, LocalDir, OpenError, RangeBlob, RangeRead};
use lazypull_blob::oci::{ImageConfig, Manifest};
use lazypull_blob::ChunkTable;
use lazypull_engine::{ChunkedBlob, FetchContext};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

/// What `lazypull mount` asks the daemon to register: an image in a registry
/// (`reference`), or one the daemon's blob dir or blob URL holds (`fsid`, the
/// meta blob's name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    #[serde(default)]
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Speak plain HTTP to this registry (loopback registries always are).
    #[serde(default)]
    pub insecure: bool,
}

/// What registering an image did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registered {
    /// The meta blob's name: the `fsid` to mount.
    pub fsid: String,
    pub reference: String,
    pub manifest_digest: String,
    pub blobs: usize,
    /// Uncompressed bytes of all data blobs.
    pub data_bytes: u64,
    /// Bytes fetched to register it (manifest, config, meta blob, tables).
    pub fetched_bytes: u64,
    pub elapsed_ms: f64,
}

/// One data blob of an image, in device table order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBlob {
    pub digest: String,
    /// Uncompressed size.
    pub size: u64,
}

/// One registered image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub fsid: String,
    pub reference: String,
    pub manifest_digest: String,
    pub blobs: Vec<String>,
    pub mountpoints: Vec<PathBuf>,
}

struct Image {
    info: ImageInfo,
    blobs: Vec<ImageBlob>,
    /// How it was registered: replayed when a restarted daemon takes over.
    request: RegisterRequest,
}

#[derive(Default)]
struct State {
    /// Data blob name → its fetcher (shared by every image and object using it).
    blobs: HashMap<String, Arc<ChunkedBlob>>,
    /// Meta blob name → path of the verified copy in the work dir.
    metas: HashMap<String, PathBuf>,
    images: BTreeMap<String, Image>,
}

/// Settings for remote images.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    pub client: ClientOptions,
    /// Docker-style config file for credentials (None: the default places).
    pub docker_config: Option<PathBuf>,
}

pub struct Catalog {
    work_dir: PathBuf,
    blob_dir: Option<LocalDir>,
    /// Base URL of a blob directory served over HTTP(S) (Range support needed).
    blob_url: Option<String>,
    fetch: Arc<FetchContext>,
    remote: RemoteSettings,
    state: Mutex<State>,
    /// Where registered images are recorded for a successor daemon.
    state_file: Option<PathBuf>,
    /// Serialises writers of the state file.
    save_lock: Mutex<()>,
}

impl Catalog {
    pub fn new(
        work_dir: PathBuf,
        blob_dir: Option<PathBuf>,
        blob_url: Option<String>,
        fetch: Arc<FetchContext>,
        remote: RemoteSettings,
        state_file: Option<PathBuf>,
    ) -> Self {
        Catalog {
            work_dir,
            blob_dir: blob_dir.map(LocalDir::new),
            blob_url: blob_url.map(|u| u.trim_end_matches('/').to_owned()),
            fetch,
            remote,
            state: Mutex::default(),
            state_file,
            save_lock: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn fetch_context(&self) -> &Arc<FetchContext> {
        &self.fetch
    }

    /// The blob the kernel names `cookie`: a registered data or meta blob, else
    /// one under the blob URL, else one in the local blob dir (stored form
    /// first, then a plain file, in both places).
    pub fn resolve(&self, cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> {
        let name = lazypull_backend::validate_name(cookie)?;
        {
            let st = self.lock();
            if let Some(blob) = st.blobs.get(name) {
                return Ok(blob.clone());
            }
            if let Some(path) = st.metas.get(name) {
                let dir = LocalDir::new(path.parent().unwrap_or(Path::new("/")));
                return Ok(dir.open(cookie)?);
            }
        }
        self.resolve_unregistered(name)
    }

    /// A blob of the blob URL or blob dir.
    fn resolve_unregistered(&self, name: &str) -> Result<Arc<dyn BlobSource>, OpenError> {
        let cookie = name.as_bytes();
        if let Some(base) = &self.blob_url {
            match self.resolve_http(base, name) {
                Err(e) if e.errno() == libc::ENOENT && self.blob_dir.is_some() => {}
                other => return other,
            }
        }
        let Some(store) = &self.blob_dir else {
            return Err(OpenError::NotFound {
                name: name.to_owned(),
                path: PathBuf::from(format!(
                    "(no mounted image has blob {name}, and no blob dir is configured)"
                )),
            });
        };
        match lazypull_blob::open_local(store.root(), name) {
            Ok(Some(stored)) => {
                let (name, table, file) = stored.into_parts();
                let stored: Arc<dyn RangeRead> = Arc::new(file);
                Ok(Arc::new(ChunkedBlob::new(
                    name,
                    table,
                    stored,
                    self.fetch.clone(),
                )))
            }
            Ok(None) => Ok(store.open(cookie)?),
            Err(e) => Err(OpenError::Io {
                name: name.to_owned(),
                path: store.root().join(format!("{name}.table")),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            }),
        }
    }

    /// `<base>/<name>.table` + `<name>.zst` (verified unit by unit), else the
    /// plain `<base>/<name>`.
    fn resolve_http(&self, base: &str, name: &str) -> Result<Arc<dyn BlobSource>, OpenError> {
        let io = |what: &str, e: lazypull_backend::RegistryError| {
            let errno = e.errno();
            let err = OpenError::Io {
                name: name.to_owned(),
                path: PathBuf::from(what),
                source: std::io::Error::other(e.to_string()),
            };
            if errno == libc::ENOENT {
                OpenError::NotFound {
                    name: name.to_owned(),
                    path: PathBuf::from(what),
                }
            } else {
                err
            }
        };
        let opts = &self.remote.client;
        // OPEN is answered on the serving task: let the runtime move other work
        // off this thread while the network answers.
        tokio::task::block_in_place(|| {
            let table_url = format!("{base}/{name}.table");
            match HttpBlob::open(&table_url, opts) {
                Ok(t) => {
                    let mut bytes = vec![0u8; t.size() as usize];
                    t.read_exact_at(&mut bytes, 0).map_err(|e| OpenError::Io {
                        name: name.to_owned(),
                        path: PathBuf::from(&table_url),
                        source: e,
                    })?;
                    let bad = |why: String| OpenError::Io {
                        name: name.to_owned(),
                        path: PathBuf::from(&table_url),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
                    };
                    let table = ChunkTable::decode(&bytes).map_err(|e| bad(e.to_string()))?;
                    if table.digest() != name {
                        return Err(bad(format!(
                            "the chunk table is for blob {}",
                            table.digest()
                        )));
                    }
                    let data_url = format!("{base}/{name}.zst");
                    let data = HttpBlob::open(&data_url, opts).map_err(|e| io(&data_url, e))?;
                    if data.size() != table.stored_size() {
                        return Err(bad(format!(
                            "{data_url} has {} bytes, the table says {}",
                            data.size(),
                            table.stored_size()
                        )));
                    }
                    Ok(Arc::new(ChunkedBlob::new(
                        name.to_owned(),
                        table,
                        Arc::new(data),
                        self.fetch.clone(),
                    )) as Arc<dyn BlobSource>)
                }
                Err(e) if e.errno() == libc::ENOENT => {
                    let url = format!("{base}/{name}");
                    let plain = HttpBlob::open(&url, opts).map_err(|e| io(&url, e))?;
                    Ok(
                        Arc::new(RangeBlob::new(name, plain.size(), Arc::new(plain)))
                            as Arc<dyn BlobSource>,
                    )
                }
                Err(e) => Err(io(&table_url, e)),
            }
        })
    }

    /// Fetches what an image needs at mount and registers its blobs. Blocking
    /// (network I/O): call it off the async runtime.
    pub fn register(&self, req: &RegisterRequest) -> anyhow::Result<Registered> {
        let registered = match &req.fsid {
            Some(fsid) if req.reference.is_empty() => self.register_local(fsid, req)?,
            Some(_) => bail!("give an image reference or an fsid, not both"),
            None => self.register_remote(req)?,
        };
        self.save_state();
        Ok(registered)
    }

    /// Registers an image whose meta blob the blob URL or blob dir holds: the
    /// meta blob is copied (whole, checked against its name when that is a
    /// sha256) into the work dir, its device table names the data blobs.
    fn register_local(&self, fsid: &str, req: &RegisterRequest) -> anyhow::Result<Registered> {
        let started = Instant::now();
        let name = lazypull_backend::validate_name(fsid.as_bytes())?.to_owned();
        let existing = self.lock().metas.get(&name).cloned();
        let (meta_path, fetched) = match existing {
            Some(path) => (path, 0),
            None => {
                let source = self.resolve_unregistered(&name).map_err(|e| {
                    anyhow::anyhow!(
                        "image {name}: {e} (is it in the daemon's --blob-dir or --blob-url?)"
                    )
                })?;
                let size = source.size();
                if size > MAX_META_BYTES {
                    bail!("meta blob {name} is {size} bytes; more than {MAX_META_BYTES} is not a meta blob");
                }
                let mut bytes = vec![0u8; size as usize];
                let mut done = 0;
                while done < bytes.len() {
                    let n = source
                        .read_at(&mut bytes[done..], done as u64)
                        .with_context(|| format!("reading meta blob {name}"))?;
                    if n == 0 {
                        bail!("meta blob {name} ended after {done} of {size} bytes");
                    }
                    done += n;
                }
                if is_sha256_hex(&name) && hex::encode(Sha256::digest(&bytes)) != name {
                    bail!("meta blob {name} does not match its digest: refusing to serve it");
                }
                (self.keep_meta(&name, &bytes)?, size)
            }
        };
        let meta = std::fs::read(&meta_path)
            .with_context(|| format!("reading {}", meta_path.display()))?;
        let image = lazypull_erofs::Image::from_bytes(meta)
            .with_context(|| format!("meta blob {name} is not a valid EROFS image"))?;
        let mut blobs = Vec::new();
        for d in image.devices() {
            let tag = String::from_utf8_lossy(d.tag_bytes()).into_owned();
            let blob = self
                .resolve(tag.as_bytes())
                .map_err(|e| anyhow::anyhow!("image {name}: data blob {tag}: {e}"))?;
            blobs.push(ImageBlob {
                digest: tag,
                size: blob.size(),
            });
        }
        let mut st = self.lock();
        st.metas.insert(name.clone(), meta_path);
        let mountpoints = st
            .images
            .get(&name)
            .map(|i| i.info.mountpoints.clone())
            .unwrap_or_default();
        let info = ImageInfo {
            fsid: name.clone(),
            reference: format!("{} (blob dir)", name),
            manifest_digest: String::new(),
            blobs: blobs.iter().map(|b| b.digest.clone()).collect(),
            mountpoints,
        };
        st.images.insert(
            name.clone(),
            Image {
                info: info.clone(),
                blobs: blobs.clone(),
                request: req.clone(),
            },
        );
        drop(st);
        info!(fsid = %name, blobs = blobs.len(), "image registered from the blob store");
        Ok(Registered {
            fsid: name,
            reference: info.reference,
            manifest_digest: String::new(),
            blobs: blobs.len(),
            data_bytes: blobs.iter().map(|b| b.size).sum(),
            fetched_bytes: fetched,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    fn register_remote(&self, req: &RegisterRequest) -> anyhow::Result<Registered> {
        let started = Instant::now();
        let reference = Reference::parse(&req.reference)?;
        let mut client = self.remote.client.clone();
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
            (None, None) => docker_config_credentials(
                self.remote.docker_config.as_deref(),
                &reference.registry,
            )?,
        };
        let registry = Registry::new(&reference.registry, &reference.repository, creds, &client)?;
        let manifest = registry
            .get_manifest(&reference.reference)
            .with_context(|| format!("fetching the manifest of {reference}"))?;
        let mut fetched = manifest.bytes.len() as u64;
        let parsed =
            Manifest::parse_lazypull(&manifest.bytes).with_context(|| format!("{reference}"))?;
        let config_bytes = registry
            .get_blob(&parsed.config.digest, &|_| {})
            .with_context(|| format!("fetching the config of {reference}"))?;
        fetched += config_bytes.len() as u64;
        let config = ImageConfig::parse(&config_bytes).with_context(|| format!("{reference}"))?;
        let fsid = config.meta_hex().to_owned();

        let meta_path = self.fetch_meta(&registry, &config, &mut fetched)?;
        let meta = std::fs::read(&meta_path)
            .with_context(|| format!("reading {}", meta_path.display()))?;
        let image = lazypull_erofs::Image::from_bytes(meta)
            .with_context(|| format!("the meta blob of {reference} is not a valid EROFS image"))?;
        let tags: Vec<String> = image
            .devices()
            .iter()
            .map(|d| String::from_utf8_lossy(d.tag_bytes()).into_owned())
            .collect();
        let names: Vec<String> = config.blobs.iter().map(|b| b.digest.clone()).collect();
        if tags != names {
            bail!(
                "{reference}: the image config lists blobs {names:?} but its meta blob's device table names {tags:?}"
            );
        }

        let mut blobs = Vec::new();
        for b in &config.blobs {
            let table_bytes = registry
                .get_blob(&b.table.digest, &|_| {})
                .with_context(|| format!("fetching the chunk table of blob {}", b.digest))?;
            fetched += table_bytes.len() as u64;
            let table = ChunkTable::decode(&table_bytes)
                .with_context(|| format!("the chunk table of blob {} is corrupt", b.digest))?;
            if table.digest() != b.digest
                || table.uncompressed_size() != b.size
                || table.stored_size() != b.data.size
            {
                bail!(
                    "{reference}: chunk table {} describes blob {} ({} bytes, {} stored), the config says {} ({} bytes, {} stored)",
                    b.table.digest, table.digest(), table.uncompressed_size(), table.stored_size(),
                    b.digest, b.size, b.data.size
                );
            }
            let stored = registry.blob_reader(&b.data.digest, b.data.size);
            blobs.push((b.digest.clone(), table, stored));
        }

        let mut st = self.lock();
        for (name, table, stored) in blobs {
            // A blob already served (by another image) keeps its fetcher: the
            // kernel may have it open, and its bytes are the same by digest.
            st.blobs.entry(name.clone()).or_insert_with(|| {
                Arc::new(ChunkedBlob::new(name, table, stored, self.fetch.clone()))
            });
        }
        st.metas.insert(fsid.clone(), meta_path);
        let mountpoints = st
            .images
            .get(&fsid)
            .map(|i| i.info.mountpoints.clone())
            .unwrap_or_default();
        st.images.insert(
            fsid.clone(),
            Image {
                info: ImageInfo {
                    fsid: fsid.clone(),
                    reference: reference.to_string(),
                    manifest_digest: manifest.digest.clone(),
                    blobs: names,
                    mountpoints,
                },
                blobs: config
                    .blobs
                    .iter()
                    .map(|b| ImageBlob {
                        digest: b.digest.clone(),
                        size: b.size,
                    })
                    .collect(),
                // Pinned to the manifest fetched now: a restarted daemon
                // serves the same image even if the tag moved.
                request: RegisterRequest {
                    reference: pinned(&reference, &manifest.digest),
                    ..req.clone()
                },
            },
        );
        drop(st);
        let registered = Registered {
            fsid,
            reference: reference.to_string(),
            manifest_digest: manifest.digest,
            blobs: config.blobs.len(),
            data_bytes: config.blobs.iter().map(|b| b.size).sum(),
            fetched_bytes: fetched,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        info!(
            reference = %registered.reference,
            fsid = %registered.fsid,
            blobs = registered.blobs,
            fetched_bytes = registered.fetched_bytes,
            elapsed_ms = registered.elapsed_ms as u64,
            "image registered"
        );
        Ok(registered)
    }

    /// The meta blob in the work dir, fetched and verified unless a verified
    /// copy is already there.
    fn fetch_meta(
        &self,
        registry: &Registry,
        config: &ImageConfig,
        fetched: &mut u64,
    ) -> anyhow::Result<PathBuf> {
        let dir = self.work_dir.join("meta");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the work dir {}", dir.display()))?;
        let hex = config.meta_hex();
        let path = dir.join(hex);
        if let Ok(existing) = std::fs::read(&path) {
            if hex::encode(Sha256::digest(&existing)) == hex {
                return Ok(path);
            }
        }
        let bytes = registry
            .get_blob(&config.meta.digest, &|_| {})
            .context("fetching the meta blob")?;
        *fetched += bytes.len() as u64;
        self.keep_meta(hex, &bytes)
    }

    /// Writes a verified meta blob into the work dir (atomically).
    fn keep_meta(&self, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let dir = self.work_dir.join("meta");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the work dir {}", dir.display()))?;
        let path = dir.join(name);
        crate::files::write_atomically(&path, bytes, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Records where an image got mounted.
    pub fn mounted(&self, fsid: &str, mountpoint: &Path) -> anyhow::Result<()> {
        let mut st = self.lock();
        let Some(image) = st.images.get_mut(fsid) else {
            bail!("no image with fsid {fsid} is registered");
        };
        if !image.info.mountpoints.iter().any(|m| m == mountpoint) {
            image.info.mountpoints.push(mountpoint.to_owned());
        }
        drop(st);
        self.save_state();
        Ok(())
    }

    /// Forgets a mountpoint; returns the image's fsid if one was mounted there.
    pub fn unmounted(&self, mountpoint: &Path) -> Option<String> {
        let mut st = self.lock();
        let mut found = None;
        for image in st.images.values_mut() {
            if let Some(pos) = image.info.mountpoints.iter().position(|m| m == mountpoint) {
                image.info.mountpoints.remove(pos);
                found = Some(image.info.fsid.clone());
                break;
            }
        }
        drop(st);
        if found.is_some() {
            self.save_state();
        }
        found
    }

    pub fn images(&self) -> Vec<ImageInfo> {
        self.lock()
            .images
            .values()
            .map(|i| i.info.clone())
            .collect()
    }

    /// The data blobs and meta blob path of a registered image.
    pub fn image(&self, fsid: &str) -> Option<(Vec<ImageBlob>, PathBuf)> {
        let st = self.lock();
        let image = st.images.get(fsid)?;
        Some((image.blobs.clone(), st.metas.get(fsid)?.clone()))
    }

    /// Writes what a successor needs to serve the same images (see
    /// [`restore`](Self::restore)) to the state file, if there is one.
    fn save_state(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let _one_writer = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let saved = SavedState {
            images: self
                .lock()
                .images
                .values()
                .map(|i| SavedImage {
                    request: i.request.clone(),
                    mountpoints: i.info.mountpoints.clone(),
                })
                .collect(),
        };
        let write = || -> std::io::Result<()> {
            crate::files::write_atomically(path, &serde_json::to_vec_pretty(&saved)?, 0o600)
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), "cannot save the daemon state (a restarted daemon will not know the mounted images): {e}");
        }
    }

    /// Registers again every image a previous daemon had registered (from the
    /// state file): a daemon taking over mounts must resolve their blobs
    /// before the kernel asks. Failures are logged; those images' reads fail.
    pub fn restore(&self) -> usize {
        let Some(path) = &self.state_file else {
            return 0;
        };
        let saved: SavedState = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    warn!(path = %path.display(), "ignoring an unreadable state file: {e}");
                    return 0;
                }
            },
            Err(_) => return 0,
        };
        let mut restored = 0;
        for image in saved.images {
            let what = image
                .request
                .fsid
                .clone()
                .unwrap_or_else(|| image.request.reference.clone());
            match self.register(&image.request) {
                Ok(r) => {
                    for m in &image.mountpoints {
                        let _ = self.mounted(&r.fsid, m);
                    }
                    restored += 1;
                }
                Err(e) => {
                    error!(image = %what, "cannot serve an image a previous daemon served; its reads will fail: {e:#}")
                }
            }
        }
        restored
    }
}

/// The state file: what was registered, how, and where it is mounted. It holds
/// registry credentials, so it is written mode 0600 (under /run by default,
/// gone at reboot with the mounts it describes).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    images: Vec<SavedImage>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedImage {
    request: RegisterRequest,
    mountpoints: Vec<PathBuf>,
}

/// Meta blobs are small (metadata only); anything bigger is a mistake.
const MAX_META_BYTES: u64 = 1 << 30;

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `reference` with its tag replaced by the manifest digest.
fn pinned(reference: &Reference, digest: &str) -> String {
    format!("{}/{}@{}", reference.registry, reference.repository, digest)
}
