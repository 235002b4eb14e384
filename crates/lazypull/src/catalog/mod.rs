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

mod bindings;
mod blob_store;
pub(crate) mod kubelet_credentials;
mod meta_dir;
mod persist;
mod recorded;
mod remote;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use lazypull_engine::FetchContext;
use lazypull_source::{BlobSource, OpenError};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::control::{RegisterRequest, Registered};
use bindings::{Binding, KernelBindings};
use blob_store::BlobStore;
use meta_dir::MetaDir;
use persist::{SavedImage, StateFile};
pub(crate) use recorded::BlobRange;
use recorded::{Traced, Tracer};
pub(crate) use remote::{RemoteSettings, DEFAULT_MAX_META_SIZE};

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

/// An image a previous daemon served that is not registered again yet (see
/// [`Catalog::restore`]): kept in the state file, retried in the background,
/// shown by `lazypull status`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RestoringImage {
    pub(crate) reference: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fsid: Option<String>,
    pub(crate) mountpoints: Vec<PathBuf>,
    /// `restoring` until an attempt failed, then `failed` (and retried), or
    /// [`REFUSED`] (an image this lazypull cannot read: not retried).
    pub(crate) state: &'static str,
    /// Why the last attempt failed.
    pub(crate) error: Option<String>,
    pub(crate) attempts: u32,
}

/// The state of a restoring image that failed for a reason retries cannot
/// change (an image format this lazypull does not read).
pub(crate) const REFUSED: &str = "refused";

/// Whether a failed registration failed for a reason a retry cannot change:
/// the image itself is one this lazypull refuses (anywhere in the chain).
fn retries_cannot_help(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<lazypull_oci::lazy::ImageError>())
}

struct Image {
    info: ImageInfo,
    blobs: Vec<ImageBlob>,
    /// How it was registered: replayed when a restarted daemon takes over.
    request: RegisterRequest,
    /// The blob ranges its recorded prefetch names, in order (checked
    /// against its meta blob at register); empty without a record.
    recorded: Vec<BlobRange>,
}

/// A data blob name as registered: what serves it and what it is bound to.
struct Bound {
    /// Its fetcher (shared by every image and object using it).
    source: Arc<dyn BlobSource>,
    /// Its chunk table's sha256 (see [`bindings`]).
    binding: Binding,
    /// The image that registered it first.
    image: String,
}

#[derive(Default)]
struct State {
    /// Data blob name → what serves it: one binding per name.
    blobs: HashMap<String, Bound>,
    /// Meta blob name → path of the verified copy in the work dir.
    metas: HashMap<String, PathBuf>,
    images: BTreeMap<String, Image>,
    /// Images of the state file not registered again yet, in its order.
    restoring: Vec<(SavedImage, RestoringImage)>,
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
    /// The work dir (for the kernel bindings file).
    work_dir: PathBuf,
    /// Under cachefiles: the bindings the kernel's cache holds bytes under,
    /// persisted across daemons (see [`bindings`]). Locked after `state`.
    kernel: Mutex<Option<KernelBindings>>,
    /// Serialises writers of the kernel bindings file (each writes the latest
    /// snapshot), so no lock the serving path takes is held across the write.
    kernel_writer: Mutex<()>,
    /// Records, for `lazypull optimize`, what the readers of an image waited for.
    tracer: Arc<Tracer>,
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
            store: BlobStore::new(blob_dir, blob_url, remote.client.clone(), fetch.clone())
                .with_max_meta_size(remote.max_meta_size),
            meta_dir: MetaDir::new(&work_dir),
            work_dir,
            kernel: Mutex::default(),
            kernel_writer: Mutex::default(),
            fetch,
            remote,
            state: Mutex::default(),
            state_file: state_file.map(StateFile::new),
            tracer: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn fetch_context(&self) -> &Arc<FetchContext> {
        &self.fetch
    }

    /// The circuit breaker of every backend host reached so far (registries
    /// and the blob URL share one pool of hosts).
    pub(crate) fn backends(&self) -> Vec<lazypull_backend::BackendHealth> {
        self.remote.client.hosts.health()
    }

    /// The blob the kernel names `cookie`: a registered data or meta blob, else
    /// one under the blob URL, else one in the local blob dir (stored form
    /// first, then a plain file, in both places).
    pub(crate) fn resolve(&self, cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> {
        let name = lazypull_source::validate_name(cookie)?;
        {
            let st = self.lock();
            if let Some(blob) = st.blobs.get(name) {
                return Ok(blob.source.clone());
            }
            if let Some(path) = st.metas.get(name) {
                return blob_store::open_meta_copy(path, cookie);
            }
        }
        self.store.open(name)
    }

    /// Whether a registered image names the blob `cookie` (its meta blob or
    /// one of its data blobs).
    pub(crate) fn is_registered(&self, cookie: &[u8]) -> bool {
        let Ok(name) = lazypull_source::validate_name(cookie) else {
            return false;
        };
        let st = self.lock();
        st.blobs.contains_key(name)
            || st.metas.contains_key(name)
            || st
                .images
                .values()
                .any(|i| i.blobs.iter().any(|b| b.digest == name))
    }

    /// Like [`resolve`](Self::resolve), but only for names the catalog
    /// registered (a registered image's meta blob or one of its data blobs):
    /// any other name is `NotFound` at once, without asking a backend.
    pub(crate) fn resolve_registered(
        &self,
        cookie: &[u8],
    ) -> Result<Arc<dyn BlobSource>, OpenError> {
        let name = lazypull_source::validate_name(cookie)?;
        if !self.is_registered(cookie) {
            return Err(OpenError::NotFound {
                name: name.to_owned(),
                path: PathBuf::from(
                    "(no registered image has it: `lazypull mount` registers images)",
                ),
            });
        }
        self.resolve(cookie)
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
        self.save_kernel_bindings();
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
        // What the fsid (the meta blob's sha256, checked) vouches for about
        // the data blobs' stored forms: their chunk tables, by sha256 and size.
        let trailer = image
            .trailer()
            .with_context(|| format!("meta blob {name}"))?;
        let label = format!("{name} (blob dir)");
        let mut blobs = Vec::new();
        let mut sources = Vec::new();
        for d in image.devices() {
            let tag = String::from_utf8_lossy(d.tag_bytes()).into_owned();
            // Opened (and its table checked) even if another image serves the
            // name already: [`bind`](Self::bind) then compares the bindings.
            let blob = lazypull_source::validate_name(tag.as_bytes())
                .and_then(|_| self.store.open_data(&tag, trailer.as_ref()))
                .map_err(|e| anyhow::anyhow!("image {name}: data blob {tag}: {e}"))?;
            blobs.push(ImageBlob {
                digest: tag.clone(),
                size: blob.size(),
            });
            sources.push((tag, blob));
        }
        let mut st = self.lock();
        self.bind(&mut st, &label, sources)?;
        st.metas.insert(name.clone(), meta_path);
        let mountpoints = st
            .images
            .get(&name)
            .map(|i| i.info.mountpoints.clone())
            .unwrap_or_default();
        let info = ImageInfo {
            fsid: name.clone(),
            reference: label,
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
                recorded: Vec::new(),
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
        self.bind(
            &mut st,
            &image.reference,
            image
                .blobs
                .iter()
                .map(|b| (b.digest.clone(), b.source.clone() as Arc<dyn BlobSource>))
                .collect(),
        )?;
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
                recorded: image.recorded.clone(),
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

    /// Records the data blobs `sources` of image `image`, or refuses the image
    /// (recording nothing) if one of its names is bound to other content:
    /// a blob name maps to exactly one chunk table, in this daemon and, under
    /// cachefiles, in the kernel's cache (see [`bindings`]). A name served
    /// already under the same binding keeps its fetcher: the kernel may have
    /// it open, and the same table verifies the same bytes.
    fn bind(
        &self,
        st: &mut State,
        image: &str,
        sources: Vec<(String, Arc<dyn BlobSource>)>,
    ) -> anyhow::Result<()> {
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        for (name, source) in &sources {
            let binding = source.content_binding();
            let existing = st
                .blobs
                .get(name)
                .map(|b| (b.binding, b.image.as_str()))
                .or_else(|| kernel.as_ref().and_then(|k| k.get(name)));
            if let Some((bound, first)) = existing {
                if bound != binding {
                    bail!(
                        "refusing image {image}: it declares data blob {name} with {}, but \
                         {name} is already bound to {} by image {first}{}; a blob name is the \
                         digest of its bytes, so one of the two images lies about it (or is \
                         damaged), and bytes verified for one are never served to the other",
                        bindings::describe(&binding),
                        bindings::describe(&bound),
                        if st.blobs.contains_key(name) {
                            ""
                        } else {
                            " (in the kernel's cachefiles cache, recorded by an earlier daemon)"
                        },
                    );
                }
            }
        }
        if let Some(k) = kernel.as_mut() {
            k.add(
                sources
                    .iter()
                    .map(|(n, s)| (n.as_str(), s.content_binding(), image)),
            );
        }
        for (name, source) in sources {
            st.blobs.entry(name).or_insert_with(|| Bound {
                binding: source.content_binding(),
                // Every read of it can be recorded (`lazypull optimize`).
                source: Traced::wrap(source, self.tracer.clone()),
                image: image.to_owned(),
            });
        }
        Ok(())
    }

    /// The daemon serves the cachefiles transport: the kernel keeps cached
    /// bytes by name beyond this daemon's life, so blob bindings are kept in
    /// the work dir and checked by later daemons too. Call before anything is
    /// registered for the kernel (before [`restore`](Self::restore)).
    pub(crate) fn keep_kernel_bindings(&self) -> anyhow::Result<()> {
        if self
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let mut k = KernelBindings::load(self.work_dir.join("kernel-bindings.json"))?;
        // `state` before `kernel`, as in `bind`.
        let st = self.lock();
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        if kernel.is_some() {
            return Ok(());
        }
        for (name, b) in &st.blobs {
            if let Some((bound, first)) = k.get(name) {
                if bound != b.binding {
                    error!(
                        blob = %name,
                        "bound to {} by image {first} in the kernel's cache, but registered \
                         with {} by image {}",
                        bindings::describe(&bound),
                        bindings::describe(&b.binding),
                        b.image
                    );
                }
            }
        }
        k.add(
            st.blobs
                .iter()
                .map(|(n, b)| (n.as_str(), b.binding, b.image.as_str())),
        );
        *kernel = Some(k);
        drop(kernel);
        drop(st);
        self.save_kernel_bindings();
        Ok(())
    }

    /// Writes the kernel bindings, if kept, with no lock of the serving path
    /// held.
    fn save_kernel_bindings(&self) {
        let _one = self.kernel_writer.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = self
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(KernelBindings::snapshot);
        if let Some(s) = snapshot {
            bindings::save(s);
        }
    }

    /// Writes what a successor needs to serve the same images (see
    /// [`restore`](Self::restore)) to the state file, if there is one.
    fn save_state(&self) {
        let Some(file) = &self.state_file else {
            return;
        };
        file.save(|| {
            let st = self.lock();
            let mut saved: Vec<SavedImage> = st
                .images
                .values()
                .map(|i| SavedImage {
                    request: i.request.clone(),
                    fsid: Some(i.info.fsid.clone()),
                    mountpoints: i.info.mountpoints.clone(),
                })
                .collect();
            // Images not back yet stay in the file: this daemon's retries or a
            // successor still serve them (unless registered again meanwhile).
            saved.extend(
                st.restoring
                    .iter()
                    .filter(|(s, _)| {
                        !st.images.values().any(|i| {
                            i.request == s.request || s.fsid.as_deref() == Some(&i.info.fsid)
                        })
                    })
                    .map(|(s, _)| s.clone()),
            );
            saved
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
        let mut restoring = false;
        if found.is_none() {
            // An image not back yet is unmounted: it is restored without it.
            for (saved, info) in st.restoring.iter_mut() {
                if let Some(pos) = saved.mountpoints.iter().position(|m| m == mountpoint) {
                    saved.mountpoints.remove(pos);
                    info.mountpoints.retain(|m| m != mountpoint);
                    found = info.fsid.clone();
                    restoring = true;
                    break;
                }
            }
        }
        drop(st);
        if found.is_some() || restoring {
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

    /// The blob ranges image `fsid`'s recorded prefetch names, in order
    /// (empty if it has none).
    pub(crate) fn recorded(&self, fsid: &str) -> Vec<BlobRange> {
        self.lock()
            .images
            .get(fsid)
            .map(|i| i.recorded.clone())
            .unwrap_or_default()
    }

    /// Starts recording which ranges of image `fsid`'s data blobs its
    /// readers wait for; returns the blobs.
    pub(crate) fn record_start(&self, fsid: &str) -> anyhow::Result<Vec<ImageBlob>> {
        let (blobs, _) = self
            .image(fsid)
            .with_context(|| format!("no registered image has fsid {fsid}"))?;
        let names: Vec<String> = blobs.iter().map(|b| b.digest.clone()).collect();
        self.tracer.start(fsid, &names)?;
        Ok(blobs)
    }

    /// Drops the recording of image `fsid`, if one runs (its last mount went).
    pub(crate) fn record_cancel(&self, fsid: &str) {
        self.tracer.stop(fsid);
    }

    /// Ends the recording of image `fsid`: what its readers read first, as
    /// files and ranges within them, and whether the trace hit its bound.
    pub(crate) fn record_stop(
        &self,
        fsid: &str,
    ) -> anyhow::Result<(lazypull_oci::prefetch::Record, bool, usize)> {
        let trace = self
            .tracer
            .stop(fsid)
            .with_context(|| format!("image {fsid} is not being recorded"))?;
        let (blobs, meta_path) = self
            .image(fsid)
            .with_context(|| format!("image {fsid} was unregistered while it was recorded"))?;
        let meta = std::fs::read(&meta_path)
            .with_context(|| format!("reading {}", meta_path.display()))?;
        let meta =
            lazypull_erofs::Image::from_bytes(meta).with_context(|| format!("meta blob {fsid}"))?;
        let names: Vec<String> = blobs.iter().map(|b| b.digest.clone()).collect();
        let record = recorded::record_of(&meta, &names, &trace.events)?;
        Ok((record, trace.truncated, trace.events.len()))
    }

    /// Registers again every image a previous daemon had registered (from the
    /// state file): a daemon taking over mounts must resolve their blobs
    /// before the kernel asks. Returns how many are back. Those that fail
    /// (a registry unreachable) are kept — in the state file too, so that no
    /// restart loses them — and reported as restoring; their reads fail until
    /// [`retry_restoring`](Self::retry_restoring) brings them back.
    pub(crate) fn restore(&self) -> usize {
        let Some(file) = &self.state_file else {
            return 0;
        };
        let saved = file.load();
        self.lock().restoring = saved
            .into_iter()
            .map(|s| {
                let info = RestoringImage {
                    reference: s.request.reference.clone(),
                    fsid: s.fsid.clone().or_else(|| s.request.fsid.clone()),
                    mountpoints: s.mountpoints.clone(),
                    state: "restoring",
                    error: None,
                    attempts: 0,
                };
                (s, info)
            })
            .collect();
        self.retry_restoring().0
    }

    /// Tries once to register again each image still restoring. Returns how
    /// many came back and how many are left. Blocking (network I/O).
    pub(crate) fn retry_restoring(&self) -> (usize, usize) {
        let todo: Vec<SavedImage> = self
            .lock()
            .restoring
            .iter()
            .filter(|(_, info)| info.state != REFUSED)
            .map(|(s, _)| s.clone())
            .collect();
        let mut restored = 0;
        for image in todo {
            let what = image
                .request
                .fsid
                .clone()
                .unwrap_or_else(|| image.request.reference.clone());
            match self.register(&image.request) {
                Ok(r) => {
                    let mut st = self.lock();
                    st.restoring.retain(|(s, _)| s.request != image.request);
                    if let Some(registered) = st.images.get_mut(&r.fsid) {
                        for m in &image.mountpoints {
                            if !registered.info.mountpoints.contains(m) {
                                registered.info.mountpoints.push(m.clone());
                            }
                        }
                    }
                    drop(st);
                    self.save_state();
                    info!(image = %what, "serving again an image a previous daemon served");
                    restored += 1;
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    // An image this lazypull cannot read (format 1, or not a
                    // lazypull image any more) stays so whatever the retries:
                    // refused once, not retried in a loop that logs forever.
                    let permanent = retries_cannot_help(&e);
                    if permanent {
                        error!(image = %what, "refusing an image a previous daemon served; its reads fail (not retried: push or convert the image again, then mount it again): {why}");
                    } else {
                        error!(image = %what, "cannot serve an image a previous daemon served; its reads fail until it is back (retrying): {why}");
                    }
                    let mut st = self.lock();
                    if let Some((_, info)) = st
                        .restoring
                        .iter_mut()
                        .find(|(s, _)| s.request == image.request)
                    {
                        info.state = if permanent { REFUSED } else { "failed" };
                        info.error = Some(why);
                        info.attempts += 1;
                    }
                }
            }
        }
        let left = self
            .lock()
            .restoring
            .iter()
            .filter(|(_, info)| info.state != REFUSED)
            .count();
        (restored, left)
    }

    /// Keeps the credentials kubelet sent with a successful pull of `image`
    /// (see [`kubelet_credentials`]), dropping those no image has used for
    /// long; returns the (registry, repository) they are for.
    pub(crate) fn put_kubelet_credentials(
        &self,
        image: &str,
        username: &str,
        secret: &str,
    ) -> anyhow::Result<(String, String)> {
        let scope = self.remote.kubelet.put(image, username, secret)?;
        self.prune_kubelet_credentials();
        Ok(scope)
    }

    /// Drops kubelet credentials of repositories no registered or restoring
    /// image is from, once old enough; whether any went.
    pub(crate) fn prune_kubelet_credentials(&self) -> bool {
        let in_use: Vec<(String, String)> = {
            let st = self.lock();
            st.images
                .values()
                .map(|i| i.info.reference.clone())
                .chain(st.restoring.iter().map(|(_, r)| r.reference.clone()))
                .filter_map(|r| kubelet_credentials::scope_of(&r).ok())
                .collect()
        };
        self.remote.kubelet.prune(&in_use)
    }

    /// The kubelet credentials this daemon holds.
    pub(crate) fn kubelet_credentials(&self) -> &Arc<kubelet_credentials::KubeletCredentials> {
        &self.remote.kubelet
    }

    /// The images a previous daemon served that are not back yet.
    pub(crate) fn restoring(&self) -> Vec<RestoringImage> {
        self.lock()
            .restoring
            .iter()
            .map(|(_, info)| info.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::blob_store::trust_tests::{build, data, forge, Form};
    use super::*;
    use crate::blob_server::BlobServer;
    use lazypull_backend::registry::ClientOptions;

    #[test]
    fn a_refused_image_format_is_not_retried_but_an_outage_is() {
        let format1 = anyhow::Error::new(lazypull_oci::lazy::ImageError::Format1)
            .context("registry.example/app:1");
        assert!(retries_cannot_help(&format1));
        let outage = anyhow::Error::new(std::io::Error::other("503 Service Unavailable"))
            .context("registry.example/app:1");
        assert!(!retries_cannot_help(&outage));
    }

    fn catalog(work: &Path, url: String) -> Catalog {
        Catalog::new(
            work.to_path_buf(),
            None,
            Some(url),
            FetchContext::new(Default::default()),
            RemoteSettings {
                client: ClientOptions::default(),
                docker_config: None,
                max_meta_size: DEFAULT_MAX_META_SIZE,
                kubelet: Default::default(),
            },
            None,
        )
    }

    fn by_fsid(fsid: &str) -> RegisterRequest {
        RegisterRequest {
            fsid: Some(fsid.to_owned()),
            ..RegisterRequest::default()
        }
    }

    /// Under cachefiles the kernel keeps cached bytes by blob name beyond the
    /// daemon's life: a later daemon refuses an image (from another web
    /// server) that declares a name the kernel's cache holds under another
    /// chunk table, naming both images; FUSE daemons, whose cache maps record
    /// their own binding, do not carry the refusal over.
    #[test]
    fn a_name_bound_in_the_kernel_cache_stays_bound_across_daemons() {
        let dir = tempfile::tempdir().unwrap();
        let (www_a, www_b) = (dir.path().join("a"), dir.path().join("b"));
        let (fsid_a, name) = build(&www_a, &data(1), Form::Sealed);
        let (fsid_b, same) = build(&www_b, &data(1), Form::Sealed);
        assert_eq!(name, same);
        let liar_out = dir.path().join("liar");
        let (_, liar) = build(&liar_out, &data(2), Form::Sealed);
        let hostile = forge(&www_b, &fsid_b, &name, &liar_out, &liar);
        let (a, b) = (
            BlobServer::start(&www_a).unwrap(),
            BlobServer::start(&www_b).unwrap(),
        );
        let work = dir.path().join("work");

        let first = catalog(&work, a.url());
        first.keep_kernel_bindings().unwrap();
        first.register(&by_fsid(&fsid_a)).unwrap();
        drop(first);
        let file = std::fs::read_to_string(work.join("kernel-bindings.json")).unwrap();
        assert!(file.contains(&name), "{file}");

        let second = catalog(&work, b.url());
        second.keep_kernel_bindings().unwrap();
        let err = format!("{:#}", second.register(&by_fsid(&hostile)).unwrap_err());
        for want in [
            "refusing image",
            hostile.as_str(),
            fsid_a.as_str(),
            name.as_str(),
            "kernel's cachefiles cache",
        ] {
            assert!(err.contains(want), "want {want:?} in: {err}");
        }
        assert!(second.images().is_empty(), "nothing of it was registered");
        assert!(
            second.resolve(name.as_bytes()).is_err(),
            "its blob is not served"
        );

        // A FUSE daemon on the same work dir: its cache maps do the job.
        let fuse = catalog(&work, b.url());
        fuse.register(&by_fsid(&hostile)).unwrap();
    }

    /// Within one daemon, a name keeps one binding: a second image declaring
    /// it with the same table shares the first one's fetcher, one with another
    /// table is refused whole.
    #[test]
    fn one_name_one_binding_in_a_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        let (fsid, name) = build(&www, &data(5), Form::Sealed);
        let server = BlobServer::start(&www).unwrap();
        let c = catalog(&dir.path().join("work"), server.url());
        c.register(&by_fsid(&fsid)).unwrap();
        let served = c.resolve(name.as_bytes()).unwrap();
        c.register(&by_fsid(&fsid)).unwrap();
        assert!(
            Arc::ptr_eq(&served, &c.resolve(name.as_bytes()).unwrap()),
            "registering again keeps the fetcher the kernel may have open"
        );
        // Another image (same server) declaring the name with a forged table.
        let liar_out = dir.path().join("liar");
        let (_, liar) = build(&liar_out, &data(6), Form::Sealed);
        let copy = dir.path().join("copy");
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::copy(www.join(&fsid), copy.join(&fsid)).unwrap();
        let hostile = forge(&copy, &fsid, &name, &liar_out, &liar);
        std::fs::copy(copy.join(&hostile), www.join(&hostile)).unwrap();
        // The web server holds the trusted table: the forged trailer does not
        // match it, and the hostile image is refused before binding.
        let err = format!("{:#}", c.register(&by_fsid(&hostile)).unwrap_err());
        assert!(err.contains("vouches for sha256:"), "{err}");
        assert_eq!(c.images().len(), 1);
        assert!(Arc::ptr_eq(&served, &c.resolve(name.as_bytes()).unwrap()));
    }
}
