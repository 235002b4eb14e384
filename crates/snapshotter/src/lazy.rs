//! Lazy (remote) snapshots: layers of a lazypull image (format 2), which
//! are never fetched or unpacked here, and container snapshots on them,
//! whose lower layer is the whole image mounted once per image by the
//! lazypull daemon.
//!
//! * **Remote layers**: a `Prepare` whose labels carry [`LABEL_ROLE`] (the
//!   layer annotations containerd's unpacker passes on) and
//!   [`LABEL_SNAPSHOT_REF`] (the layer's chain id) makes a *committed*
//!   snapshot named by that chain id, on the given parent, with all the
//!   labels, and answers `AlreadyExists`, so that containerd neither fetches
//!   nor applies the layer. The image's chain starts at its meta layer (role
//!   `meta`), whose chain id is `sha256:<meta hex>`, the image's EROFS fsid.
//! * **Container snapshots**: a `Prepare` / `View` without role labels on a
//!   chain of lazy layers asks the [`LazyMounts`] provider to mount the image
//!   (by the image reference the chain's labels carry) at
//!   `<root>/lazy/<meta hex>` once for all snapshots of that image, and
//!   answers an overlay whose only lower dir is that mount.
//! * **Mount lifetime**: the users of a lazy mount are the active and view
//!   snapshots in the store whose chain starts at its meta layer: nothing
//!   else is recorded, so the store's crash safety covers it. After a
//!   `Remove`, on `Cleanup` and at start-up, a mount under `<root>/lazy`
//!   that no snapshot uses is unmounted (so one a crash left behind goes);
//!   one in use is kept as it is (a restarted snapshotter does not remount).
//!   A used one found missing (after a reboot) is mounted again on `Mounts`
//!   or the next `Prepare`.
//! * **Mixed chains** (ordinary layers on lazy ones or lazy on ordinary) are
//!   refused, naming the snapshots.
//!
//! This crate does not know the daemon: [`LazyMounts`] is implemented by the
//! `lazypull` binary with the daemon's control client. All calls here are
//! blocking (called from the service's blocking threads). One mutex orders
//! the mount decisions of `Prepare`, `Remove` and `Cleanup`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::Error;
use crate::store::{Info, Kind, Store};

/// A lazy layer's role: `meta`, `table` or `data` (lazypull-oci's `LABEL_ROLE`).
pub const LABEL_ROLE: &str = "containerd.io/snapshot/lazypull.role";
/// The image format of a lazy layer: `"2"`.
pub const LABEL_FORMAT: &str = "containerd.io/snapshot/lazypull.format";
/// A table or data layer's blob (hex), the daemon's name for it.
pub const LABEL_BLOB: &str = "containerd.io/snapshot/lazypull.blob";
/// The target chain id containerd's unpacker sends with a layer's `Prepare`.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// The image reference `lazypull pull` sets, pinned by manifest digest.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/lazypull.image-ref";
/// The image reference containerd's CRI plugin sets.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// `"true"`: have the daemon fetch the whole image once it is mounted.
pub const LABEL_EAGER: &str = "containerd.io/snapshot/lazypull.eager";
/// The only lazy image format this snapshotter knows.
pub const FORMAT: &str = "2";

/// Mounts lazy images for the snapshotter: the lazypull daemon's client
/// (in the `lazypull` binary), or a fake in tests. Called on blocking
/// threads; errors should name the cause (an unreachable daemon:
/// [`Error::Unavailable`] naming its socket and how to start it).
pub trait LazyMounts: Send + Sync + 'static {
    /// Mounts the image `image_ref`, whose meta blob must be `meta_hex`
    /// (refuse otherwise, e.g. a moved tag), read-only at the existing empty
    /// directory `dir`, in this process's mount namespace. `eager`: fetch
    /// the whole image in the background.
    fn mount(&self, image_ref: &str, meta_hex: &str, dir: &Path, eager: bool) -> Result<(), Error>;

    /// Unmounts `dir` (mounted by [`LazyMounts::mount`], perhaps by an
    /// earlier process) and tells whoever serves it.
    fn unmount(&self, dir: &Path) -> Result<(), Error>;

    /// Bytes of blob `blob_hex` (meta or data) cached locally; `None` if the
    /// server does not know the blob.
    fn cached_bytes(&self, blob_hex: &str) -> Result<Option<u64>, Error>;

    /// The mount points at or under `dir`, as this process's mount
    /// namespace has them (default: `/proc/self/mountinfo`).
    fn mounted_under(&self, dir: &Path) -> Result<Vec<PathBuf>, Error> {
        mounts_under(dir)
    }
}

/// No daemon: lazy layers are still recorded, but containers on them are
/// refused; leftover mounts are unmounted with umount(2) alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDaemon;

impl LazyMounts for NoDaemon {
    fn mount(&self, image_ref: &str, _: &str, _: &Path, _: bool) -> Result<(), Error> {
        Err(Error::FailedPrecondition(format!(
            "{image_ref} is a lazypull image, and this snapshotter was started without the lazypull daemon to mount it"
        )))
    }

    fn unmount(&self, dir: &Path) -> Result<(), Error> {
        rustix::mount::unmount(dir, rustix::mount::UnmountFlags::empty())
            .map_err(|e| Error::io("unmount", dir)(e.into()))
    }

    fn cached_bytes(&self, _: &str) -> Result<Option<u64>, Error> {
        Ok(None)
    }
}

/// Undoes `/proc/self/mountinfo`'s octal escapes (`\040` for a space, ...).
pub fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points in mountinfo text `text` at or under `dir`.
pub fn parse_mounts_under(text: &str, dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent major:minor root MOUNTPOINT options ...
        let Some(field) = line.split(' ').nth(4) else {
            continue;
        };
        let point = PathBuf::from(unescape_mountinfo(field));
        if point.starts_with(dir) && !out.contains(&point) {
            out.push(point);
        }
    }
    out
}

/// The mount points at or under `dir` in this process's mount namespace.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(Error::io("read", path))?;
    Ok(parse_mounts_under(&text, dir))
}

/// What a `Prepare` / `View` is, by its labels and its parent chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// An ordinary overlay snapshot.
    Ordinary,
    /// A lazy layer: commit it as `target` and answer AlreadyExists.
    Remote {
        /// The chain id to commit under.
        target: String,
    },
    /// A container snapshot on a lazy image.
    Container(LazyImage),
}

/// The lazy image under a container snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyImage {
    /// The meta blob's hex digest (the image's fsid).
    pub meta_hex: String,
    /// The reference to register it by.
    pub image_ref: String,
    /// Fetch it all once mounted.
    pub eager: bool,
}

fn is_lazy(i: &Info) -> bool {
    i.labels.contains_key(LABEL_ROLE)
}

fn meta_hex_of(name: &str) -> Option<&str> {
    let hex = name.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
    .then_some(hex)
}

fn check_layer_labels(what: &str, labels: &HashMap<String, String>) -> Result<(), Error> {
    let role = labels.get(LABEL_ROLE).map(String::as_str).unwrap_or("");
    if !matches!(role, "meta" | "table" | "data") {
        return Err(Error::InvalidArgument(format!(
            "{what}: label {LABEL_ROLE}={role:?} is not a lazypull layer role (meta, table or data)"
        )));
    }
    if let Some(f) = labels.get(LABEL_FORMAT) {
        if f != FORMAT {
            return Err(Error::InvalidArgument(format!(
                "{what}: lazypull image format {f:?} (label {LABEL_FORMAT}); this snapshotter reads format {FORMAT}"
            )));
        }
    }
    Ok(())
}

/// The lazy image under `chain` (a parent chain, nearest first, all lazy),
/// with `labels` (the new snapshot's) consulted first for the reference.
pub fn lazy_image(
    key: &str,
    chain: &[Info],
    labels: &HashMap<String, String>,
) -> Result<LazyImage, Error> {
    let root = chain
        .last()
        .ok_or_else(|| Error::InvalidArgument(format!("snapshot {key}: no lazy parent chain")))?;
    let role = root.labels.get(LABEL_ROLE).map(String::as_str);
    let meta_hex = match (role, meta_hex_of(&root.name)) {
        (Some("meta"), Some(hex)) => hex.to_string(),
        _ => {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key}: the lazy chain's first layer {} is not a lazypull meta layer named sha256:<meta digest>",
                root.name
            )))
        }
    };
    let find = |k: &str| -> Option<String> {
        labels
            .get(k)
            .cloned()
            .or_else(|| chain.iter().find_map(|i| i.labels.get(k).cloned()))
    };
    let image_ref = labels
        .get(LABEL_IMAGE_REF)
        .or_else(|| labels.get(LABEL_CRI_IMAGE_REF))
        .cloned()
        .or_else(|| {
            chain.iter().find_map(|i| {
                i.labels
                    .get(LABEL_IMAGE_REF)
                    .or_else(|| i.labels.get(LABEL_CRI_IMAGE_REF))
                    .cloned()
            })
        })
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "snapshot {key}: its lazy layers carry no image reference ({LABEL_IMAGE_REF} or {LABEL_CRI_IMAGE_REF}): pull the image with `lazypull pull`, or through CRI with `disable_snapshot_annotations = false` (containerd 1.6 defaults to true and then sends no {LABEL_CRI_IMAGE_REF})"
            ))
        })?;
    let eager = find(LABEL_EAGER).as_deref() == Some("true");
    Ok(LazyImage {
        meta_hex,
        image_ref,
        eager,
    })
}

/// Decides what the new snapshot `key` on `parent` with `labels` is.
pub fn plan(
    store: &Store,
    kind: Kind,
    key: &str,
    parent: &str,
    labels: &HashMap<String, String>,
) -> Result<Plan, Error> {
    let chain = store.chain(parent).map_err(|e| match e {
        Error::NotFound(_) => {
            Error::NotFound(format!("parent snapshot {parent} of {key} does not exist"))
        }
        e => e,
    })?;
    let lazy_parents = chain.iter().filter(|i| is_lazy(i)).count();
    if labels.contains_key(LABEL_ROLE) {
        let what = format!("lazypull layer {key}");
        if kind != Kind::Active {
            return Err(Error::InvalidArgument(format!(
                "{what}: lazy layers are prepared, not viewed"
            )));
        }
        check_layer_labels(&what, labels)?;
        let target = labels
            .get(LABEL_SNAPSHOT_REF)
            .filter(|t| !t.is_empty())
            .cloned()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{what}: no {LABEL_SNAPSHOT_REF} label naming its chain id (containerd's unpacker and `lazypull pull` send it)"
                ))
            })?;
        let role = labels.get(LABEL_ROLE).map(String::as_str);
        if role == Some("meta") {
            if !parent.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{what}: a meta layer is an image's first layer, but it has parent {parent}"
                )));
            }
            if meta_hex_of(&target).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "{what}: a meta layer's chain id is sha256:<its digest>, not {target}"
                )));
            }
        } else if parent.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{what}: a {} layer needs the image's earlier layers as parent",
                role.unwrap_or("")
            )));
        }
        if lazy_parents != chain.len() {
            let ordinary = chain.iter().find(|i| !is_lazy(i)).map(|i| i.name.clone());
            return Err(Error::FailedPrecondition(format!(
                "{what}: lazy layers on ordinary ones (snapshot {}) are not supported",
                ordinary.unwrap_or_default()
            )));
        }
        return Ok(Plan::Remote { target });
    }
    if lazy_parents == 0 {
        return Ok(Plan::Ordinary);
    }
    if lazy_parents != chain.len() {
        let ordinary = chain.iter().find(|i| !is_lazy(i)).map(|i| i.name.clone());
        return Err(Error::FailedPrecondition(format!(
            "snapshot {key}: its parent chain mixes ordinary layers (snapshot {}) and lazypull layers, which is not supported",
            ordinary.unwrap_or_default()
        )));
    }
    if labels.contains_key(LABEL_SNAPSHOT_REF) {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {key}: an ordinary layer on lazypull layers (parent {parent}) is not supported: images must be lazy throughout"
        )));
    }
    Ok(Plan::Container(lazy_image(key, &chain, labels)?))
}

/// The meta hex of the lazy image a parent chain (nearest first) is, if it
/// is one: all its layers lazy, its first a meta layer.
pub fn image_of_chain(chain: &[Info]) -> Option<String> {
    let root = chain.last()?;
    if chain.iter().all(is_lazy) && root.labels.get(LABEL_ROLE).map(String::as_str) == Some("meta")
    {
        meta_hex_of(&root.name).map(str::to_string)
    } else {
        None
    }
}

/// The lazy mounts of one snapshotter root.
pub struct Lazy {
    provider: Arc<dyn LazyMounts>,
    dir: PathBuf,
    lock: Mutex<()>,
}

impl Lazy {
    /// Lazy mounts under `<root>/lazy` (created 0700) through `provider`.
    pub fn open(root: &Path, provider: Arc<dyn LazyMounts>) -> Result<Lazy, Error> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = root.join("lazy");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io("create directory", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(Error::io("chmod", &dir))?;
        // Compared with mountinfo's (canonical) paths.
        let dir = fs::canonicalize(&dir).map_err(Error::io("resolve", &dir))?;
        Ok(Lazy {
            provider,
            dir,
            lock: Mutex::new(()),
        })
    }

    /// The provider.
    pub fn provider(&self) -> &dyn LazyMounts {
        self.provider.as_ref()
    }

    /// Where the image with meta blob `meta_hex` is mounted.
    pub fn mount_dir(&self, meta_hex: &str) -> PathBuf {
        self.dir.join(meta_hex)
    }

    /// Held while deciding about mounts.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_mounted(&self, dir: &Path) -> Result<bool, Error> {
        Ok(self.provider.mounted_under(dir)?.iter().any(|p| p == dir))
    }

    /// Mounts `image` unless it is mounted already (call with [`Lazy::lock`] held).
    pub fn ensure_mounted(&self, image: &LazyImage) -> Result<PathBuf, Error> {
        let dir = self.mount_dir(&image.meta_hex);
        if self.is_mounted(&dir)? {
            return Ok(dir);
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create directory", &dir)(e)),
        }
        tracing::info!(image = %image.image_ref, dir = %dir.display(), eager = image.eager, "mounting lazy image");
        if let Err(e) = self
            .provider
            .mount(&image.image_ref, &image.meta_hex, &dir, image.eager)
        {
            // rmdir only: never a recursive delete where a mount may be.
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    /// Meta hex -> number of active and view snapshots on that image.
    fn users(store: &Store) -> HashMap<String, usize> {
        let all = store.list(&crate::filter::Filter::default());
        let by_name: HashMap<&str, &Info> = all.iter().map(|i| (i.name.as_str(), i)).collect();
        let mut users = HashMap::new();
        for i in all.iter().filter(|i| i.kind != Kind::Committed) {
            let mut chain = Vec::new();
            let mut cur = i.parent.as_str();
            while let Some(p) = by_name.get(cur) {
                chain.push((*p).clone());
                if chain.len() > all.len() {
                    break;
                }
                cur = p.parent.as_str();
            }
            if let Some(hex) = image_of_chain(&chain) {
                *users.entry(hex).or_insert(0) += 1;
            }
        }
        users
    }

    /// Unmounts every mount under `<root>/lazy` that no snapshot uses and
    /// removes unused directories there; keeps those in use. Returns how
    /// many it unmounted. Takes [`Lazy::lock`].
    pub fn reconcile(&self, store: &Store) -> Result<usize, Error> {
        let _guard = self.lock();
        let users = Self::users(store);
        let mounted = self.provider.mounted_under(&self.dir)?;
        let mut unmounted = 0;
        let mut first_error = None;
        for point in &mounted {
            let Ok(rest) = point.strip_prefix(&self.dir) else {
                continue;
            };
            let name = rest.to_string_lossy().into_owned();
            if name.is_empty() {
                continue; // the lazy dir itself is a mount point: not ours
            }
            if users.get(&name).copied().unwrap_or(0) > 0 {
                tracing::debug!(dir = %point.display(), users = users[&name], "lazy mount in use: kept");
                continue;
            }
            tracing::info!(dir = %point.display(), "unmounting lazy image no snapshot uses");
            match self.provider.unmount(point) {
                Ok(()) => unmounted += 1,
                Err(e) => {
                    tracing::warn!(dir = %point.display(), error = %e, "cannot unmount unused lazy image");
                    first_error.get_or_insert(e);
                }
            }
        }
        // Empty directories of images not mounted: rmdir only (never a
        // recursive delete under a directory that may hold a mount).
        let still = self.provider.mounted_under(&self.dir)?;
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if still.contains(&p) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if users.get(&name).copied().unwrap_or(0) == 0 {
                    let _ = fs::remove_dir(&p);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(unmounted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text = "22 1 0:21 / /proc rw - proc proc rw\n\
            90 22 0:50 / /var/lib/x/lazy/ab rw - erofs /dev/x ro\n\
            91 22 0:51 / /var/lib/x/lazy/a\\040b ro - erofs x ro\n\
            92 22 0:52 / /var/lib/x/lazyother ro - erofs x ro\n";
        assert_eq!(
            parse_mounts_under(text, Path::new("/var/lib/x/lazy")),
            vec![
                PathBuf::from("/var/lib/x/lazy/ab"),
                PathBuf::from("/var/lib/x/lazy/a b")
            ]
        );
        assert_eq!(unescape_mountinfo("a\\134b\\"), "a\\b\\");
    }

    #[test]
    fn meta_names_are_sha256_hex() {
        let hex = "ab".repeat(32);
        assert_eq!(meta_hex_of(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(meta_hex_of("sha256:AB"), None);
        assert_eq!(meta_hex_of(&hex), None);
    }
}
