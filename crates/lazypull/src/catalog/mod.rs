//! The daemon's catalog: which images are registered, by whom, and which
//! blob names the kernel may open — a registered image's data and meta blobs,
//! else whatever the blob store (`--blob-url`, `--blob-dir`) holds.
//!
//! Registering an image by reference fetches what it needs at mount
//! ([`remote`]); by fsid, its meta blob comes from the blob store
//! ([`blob_store`]); either way the meta blob is kept in the work dir
//! ([`meta_dir`]), and what was registered is saved for a successor daemon
//! ([`persist`]). From then on a data blob's name resolves to the
//! [`ChunkedBlob`] serving it.
//!
//! It owns the record of images and names; it owns no format, fetch or
//! protocol logic (those are its submodules' and the library crates').

mod blob_store;
mod meta_dir;
mod persist;
mod remote;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use lazypull_engine::{ChunkedBlob, FetchContext};
use lazypull_source::{BlobSource, OpenError};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::control::{RegisterRequest, Registered};
use blob_store::BlobStore;
use meta_dir::MetaDir;
use persist::{SavedImage, StateFile};
pub(crate) use remote::RemoteSettings;

/// One data blob of an image, in device table order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ImageBlob {
    pub(crate) digest: String,
    /// Uncompressed size.
    pub(crate) size: u64,
}

/// One registered image.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ImageInfo {
    pub(crate) fsid: String,
    pub(crate) reference: String,
    pub(crate) manifest_digest: String,
    pub(crate) blobs: Vec<String>,
    pub(crate) mountpoints: Vec<PathBuf>,
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

pub(crate) struct Catalog {
    /// Where blobs not registered by reference come from.
    store: BlobStore,
    /// The verified meta blob copies.
    meta_dir: MetaDir,
    fetch: Arc<FetchContext>,
    remote: RemoteSettings,
    state: Mutex<State>,
    /// Where registered images are recorded for a successor daemon.
    state_file: Option<StateFile>,
}

impl Catalog {
    pub(crate) fn new(
        work_dir: PathBuf,
        blob_dir: Option<PathBuf>,
        blob_url: Option<String>,
        fetch: Arc<FetchContext>,
        remote: RemoteSettings,
        state_file: Option<PathBuf>,
    ) -> Self {
        Catalog {
            store: BlobStore::new(blob_dir, blob_url, remote.client.clone(), fetch.clone()),
            meta_dir: MetaDir::new(&work_dir),
            fetch,
            remote,
            state: Mutex::default(),
            state_file: state_file.map(StateFile::new),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn fetch_context(&self) -> &Arc<FetchContext> {
        &self.fetch
    }

    /// The blob the kernel names `cookie`: a registered data or meta blob, else
    /// one under the blob URL, else one in the local blob dir (stored form
    /// first, then a plain file, in both places).
    pub(crate) fn resolve(&self, cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> {
        let name = lazypull_source::validate_name(cookie)?;
        {
            let st = self.lock();
            if let Some(blob) = st.blobs.get(name) {
                return Ok(blob.clone());
            }
            if let Some(path) = st.metas.get(name) {
                return blob_store::open_meta_copy(path, cookie);
            }
        }
        self.store.open(name)
    }

    /// Fetches what an image needs at mount and registers its blobs. Blocking
    /// (network I/O): call it off the async runtime.
    pub(crate) fn register(&self, req: &RegisterRequest) -> anyhow::Result<Registered> {
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
        let name = lazypull_source::validate_name(fsid.as_bytes())?.to_owned();
        let existing = self.lock().metas.get(&name).cloned();
        let (meta_path, fetched) = match existing {
            Some(path) => (path, 0),
            None => {
                let bytes = self.store.read_meta(&name)?;
                (self.meta_dir.keep(&name, &bytes)?, bytes.len() as u64)
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
        let image = remote::fetch_image(req, &self.remote, &self.meta_dir, &self.fetch)?;
        let fsid = image.fsid.clone();
        let mut st = self.lock();
        for b in &image.blobs {
            // A blob already served (by another image) keeps its fetcher: the
            // kernel may have it open, and its bytes are the same by digest.
            st.blobs
                .entry(b.digest.clone())
                .or_insert_with(|| b.source.clone());
        }
        st.metas.insert(fsid.clone(), image.meta_path.clone());
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
                    reference: image.reference.clone(),
                    manifest_digest: image.manifest_digest.clone(),
                    blobs: image.blobs.iter().map(|b| b.digest.clone()).collect(),
                    mountpoints,
                },
                blobs: image
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
                    reference: image.pinned.clone(),
                    ..req.clone()
                },
            },
        );
        drop(st);
        let registered = Registered {
            fsid,
            reference: image.reference,
            manifest_digest: image.manifest_digest,
            blobs: image.blobs.len(),
            data_bytes: image.blobs.iter().map(|b| b.size).sum(),
            fetched_bytes: image.fetched_bytes,
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

    /// Writes what a successor needs to serve the same images (see
    /// [`restore`](Self::restore)) to the state file, if there is one.
    fn save_state(&self) {
        let Some(file) = &self.state_file else {
            return;
        };
        file.save(|| {
            self.lock()
                .images
                .values()
                .map(|i| SavedImage {
                    request: i.request.clone(),
                    mountpoints: i.info.mountpoints.clone(),
                })
                .collect()
        });
    }

    /// Records where an image got mounted.
    pub(crate) fn mounted(&self, fsid: &str, mountpoint: &Path) -> anyhow::Result<()> {
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
    pub(crate) fn unmounted(&self, mountpoint: &Path) -> Option<String> {
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

    pub(crate) fn images(&self) -> Vec<ImageInfo> {
        self.lock()
            .images
            .values()
            .map(|i| i.info.clone())
            .collect()
    }

    /// The data blobs and meta blob path of a registered image.
    pub(crate) fn image(&self, fsid: &str) -> Option<(Vec<ImageBlob>, PathBuf)> {
        let st = self.lock();
        let image = st.images.get(fsid)?;
        Some((image.blobs.clone(), st.metas.get(fsid)?.clone()))
    }

    /// Registers again every image a previous daemon had registered (from the
    /// state file): a daemon taking over mounts must resolve their blobs
    /// before the kernel asks. Failures are logged; those images' reads fail.
    pub(crate) fn restore(&self) -> usize {
        let Some(file) = &self.state_file else {
            return 0;
        };
        let mut restored = 0;
        for image in file.load() {
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
