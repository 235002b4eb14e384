//! The snapshot store: which snapshots exist (kind, parent, labels, times,
//! usage of committed ones) in one JSON file, and their directories under
//! `<root>/snapshots/<id>/{fs,work}` — the layout of containerd's overlay
//! snapshotter.
//!
//! # Crash safety
//!
//! `<root>/metadata.json` is only ever replaced whole: the new state is
//! written to `metadata.json.tmp` (0600), fsynced, renamed over the old file
//! and the root directory fsynced. A SIGKILL at any instant therefore leaves
//! the old or the new state, never a mix. The state is small (one entry per
//! snapshot) so rewriting it per change is cheap, and a file we fully own
//! needs no database crate.
//!
//! Directories are ordered around that one commit point so that a crash
//! leaves at most *orphans* (directories the store does not name), never a
//! store entry without its directory:
//!
//! * create: `new-<id>/{fs,work}` is made and fsynced, renamed to `<id>`,
//!   `snapshots/` fsynced, and only then the entry is stored;
//! * remove: the entry is dropped from the store first, then the directory
//!   is deleted;
//! * commit and update change the store only.
//!
//! Orphans are deleted when the store opens and by `Cleanup`. Ids come from a
//! counter stored with the state; on open it is also raised past every
//! numeric directory name found, so an id whose directory a crash left
//! behind is never handed out again.
//!
//! All methods do blocking I/O: call them from a blocking thread
//! (`tokio::task::spawn_blocking`). One mutex serialises changes; it is never
//! held across an await (there is none here). A `lock` file (flock) keeps a
//! second process off the same root.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::du::{disk_usage, Usage};
use crate::error::Error;
use crate::filter::{Fields, Filter};

const STATE_FILE: &str = "metadata.json";
const STATE_TMP: &str = "metadata.json.tmp";
const STATE_VERSION: u32 = 1;

/// What a snapshot is (containerd's `snapshots.Kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only, from `View`.
    View,
    /// Writable, from `Prepare`; becomes committed by `Commit`.
    Active,
    /// Immutable; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The name filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A point in time, UTC, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

impl Timestamp {
    fn now() -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: u64,
    kind: Kind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    parent: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    created: Timestamp,
    updated: Timestamp,
    /// Set at commit; active snapshots' usage is measured on demand.
    #[serde(default)]
    usage: Usage,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    version: u32,
    next_id: u64,
    snapshots: BTreeMap<String, Entry>,
}

/// What containerd's `Stat` / `Walk` return for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The parent's name, empty if none.
    pub parent: String,
    /// Its kind.
    pub kind: Kind,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it was created (committed: when it was committed).
    pub created: Timestamp,
    /// When it was last changed.
    pub updated: Timestamp,
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first()?.as_str() {
            "kind" => Some(self.kind.as_str().to_string()),
            "name" => Some(self.name.clone()),
            "parent" => Some(self.parent.clone()),
            "labels" => {
                if self.labels.is_empty() {
                    return None;
                }
                self.labels.get(&path[1..].join(".")).cloned()
            }
            _ => None,
        }
    }
}

/// What mounts are built from: the snapshot's id and kind and its parents'
/// ids, nearest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot's id (its directory name).
    pub id: u64,
    /// Active or view.
    pub kind: Kind,
    /// Ids of the parent chain, nearest first.
    pub parent_ids: Vec<u64>,
}

/// Changes to labels for [`Store::update`].
#[derive(Debug, Clone, Default)]
pub struct UpdateRequest {
    /// The snapshot.
    pub name: String,
    /// The labels sent.
    pub labels: HashMap<String, String>,
    /// Field paths: `labels`, `labels.<key>`; none = all mutable fields.
    pub paths: Vec<String>,
}

#[cfg(test)]
pub(crate) type CrashHook = std::sync::Arc<dyn Fn(&'static str) + Send + Sync>;

/// The store under one `--root`.
pub struct Store {
    root: PathBuf,
    state: Mutex<State>,
    _lock: File,
    #[cfg(test)]
    hook: Option<CrashHook>,
}

fn drop_empty(labels: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    // containerd does not store labels with empty values.
    labels.into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

fn mkdir(path: &Path, mode: u32) -> Result<(), Error> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(Error::io("create directory", path))?;
    // The mode exactly, whatever the umask.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io("chmod", path))
}

fn fsync_dir(path: &Path) -> Result<(), Error> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(Error::io("fsync directory", path))
}

fn remove_tree(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove snapshot directory");
        }
    }
}

/// Refuses a root whose file system does not report file types in directory
/// entries (`d_type`; XFS made with `ftype=0`, for one): overlayfs needs them
/// for whiteouts and opaque directories, and mounts on such a lower layer go
/// wrong (containerd's overlay snapshotter refuses such roots too). `probe` is
/// a regular file known to be in `root`.
fn check_d_type(root: &Path, probe: &str) -> Result<(), Error> {
    let dir = fs::File::open(root).map_err(Error::io("open", root))?;
    let entries = rustix::fs::Dir::read_from(&dir)
        .map_err(|e| Error::io("read directory", root)(e.into()))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("read directory", root)(e.into()))?;
        if entry.file_name().to_bytes() == probe.as_bytes() {
            return match entry.file_type() {
                rustix::fs::FileType::RegularFile => Ok(()),
                other => Err(Error::FailedPrecondition(format!(
                    "snapshotter root {}: its file system reports {other:?} as the type of a regular file in directory entries (no d_type support); overlayfs needs d_type: use another file system (ext4, or XFS made with ftype=1) for --root",
                    root.display()
                ))),
            };
        }
    }
    Err(Error::Io {
        what: "find the lock file in",
        path: root.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

impl Store {
    /// Opens (creating if need be) the store under `root`: takes the root's
    /// lock, loads the state, deletes orphaned directories.
    pub fn open(root: &Path) -> Result<Store, Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(Error::io("create directory", root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(Error::io("chmod", root))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(Error::io("open", &lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(Error::Locked {
                    root: root.to_path_buf(),
                })
            }
            Err(e) => return Err(Error::io("lock", &lock_path)(e.into())),
        }
        check_d_type(root, "lock")?;
        let snapshots = root.join("snapshots");
        match mkdir(&snapshots, 0o700) {
            Ok(()) => {}
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            }
            Err(e) => return Err(e),
        }
        let state_path = root.join(STATE_FILE);
        let mut state = match fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes).map_err(|e| Error::Corrupt {
                path: state_path.clone(),
                msg: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                version: STATE_VERSION,
                next_id: 1,
                ..State::default()
            },
            Err(e) => return Err(Error::io("read", &state_path)(e)),
        };
        if state.version != STATE_VERSION {
            return Err(Error::Corrupt {
                path: state_path,
                msg: format!(
                    "version {} (this lazypull reads version {STATE_VERSION})",
                    state.version
                ),
            });
        }
        let _ = fs::remove_file(root.join(STATE_TMP));
        let store = Store {
            root: root.to_path_buf(),
            state: Mutex::new(State::default()),
            _lock: lock,
            #[cfg(test)]
            hook: None,
        };
        // Never reuse an id a crash left a directory for.
        for name in store.dir_names()? {
            let digits = name.strip_prefix("new-").unwrap_or(&name);
            if let Ok(id) = digits.parse::<u64>() {
                state.next_id = state.next_id.max(id.saturating_add(1));
            }
        }
        state.next_id = state.next_id.max(1);
        for (name, e) in &state.snapshots {
            if !store.snapshot_dir(e.id).is_dir() {
                tracing::warn!(snapshot = %name, dir = %store.snapshot_dir(e.id).display(), "snapshot directory is missing");
            }
        }
        *store.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        let removed = store.cleanup()?;
        if removed > 0 {
            tracing::info!(removed, "removed orphaned snapshot directories");
        }
        Ok(store)
    }

    #[cfg(test)]
    pub(crate) fn set_crash_hook(&mut self, hook: CrashHook) {
        self.hook = Some(hook);
    }

    /// A crash point, for the crash tests.
    #[inline]
    fn step(&self, _name: &'static str) {
        #[cfg(test)]
        if let Some(h) = &self.hook {
            h(_name)
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// `<root>/snapshots/<id>/fs`: the snapshot's contents (overlay upper dir).
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    /// `<root>/snapshots/<id>/work`: the overlay work dir of an active snapshot.
    pub fn work_path(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock happens only before the state in
        // memory is replaced (replace is the last step), so it stays valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir_names(&self) -> Result<Vec<String>, Error> {
        let dir = self.snapshots_dir();
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let e = e.map_err(Error::io("read directory", &dir))?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Writes `next` durably, then makes it the state in memory.
    fn persist(&self, guard: &mut MutexGuard<'_, State>, next: State) -> Result<(), Error> {
        let tmp = self.root.join(STATE_TMP);
        let path = self.root.join(STATE_FILE);
        let bytes = serde_json::to_vec(&next).map_err(|e| Error::Corrupt {
            path: path.clone(),
            msg: format!("cannot encode: {e}"),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io("create", &tmp))?;
        f.write_all(&bytes).map_err(Error::io("write", &tmp))?;
        self.step("persist.written");
        f.sync_all().map_err(Error::io("fsync", &tmp))?;
        drop(f);
        self.step("persist.synced");
        fs::rename(&tmp, &path).map_err(Error::io("rename into place", &path))?;
        // From here on the new state is the state: callers must not undo.
        **guard = next;
        self.step("persist.renamed");
        if let Err(e) = fsync_dir(&self.root) {
            tracing::warn!(error = %e, "snapshot store written but its directory not synced");
        }
        Ok(())
    }

    fn parent_ids(state: &State, parent: &str) -> Result<Vec<u64>, Error> {
        let mut ids = Vec::new();
        let mut name = parent;
        while !name.is_empty() {
            let e = state
                .snapshots
                .get(name)
                .ok_or_else(|| Error::NotFound(format!("parent snapshot {name} does not exist")))?;
            ids.push(e.id);
            if ids.len() > state.snapshots.len() {
                return Err(Error::FailedPrecondition(format!(
                    "parent chain of {parent} has a cycle"
                )));
            }
            name = &e.parent;
        }
        Ok(ids)
    }

    /// `Prepare` (kind active) or `View` (kind view): a new snapshot on
    /// `parent` (committed, or empty for none).
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Snapshot, Error> {
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "snapshot {key}: only active or view snapshots can be created"
            )));
        }
        self.create_entry(kind, key, parent, labels)
    }

    /// A committed snapshot `name` on `parent` made directly, with an empty
    /// `fs` and no usage: a remote (lazily pulled) layer, whose contents are
    /// served elsewhere. Crash-safe as [`Store::create`] is.
    pub fn create_committed(
        &self,
        name: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        self.create_entry(Kind::Committed, name, parent, labels)
            .map(|_| ())
    }

    /// `name`'s info and its parents', nearest first (`name` first; empty
    /// `name`: none).
    pub fn chain(&self, name: &str) -> Result<Vec<Info>, Error> {
        let guard = self.lock();
        let mut out = Vec::new();
        let mut cur = name;
        while !cur.is_empty() {
            let e = guard
                .snapshots
                .get(cur)
                .ok_or_else(|| Error::NotFound(format!("snapshot {cur} does not exist")))?;
            out.push(Self::info(cur, e));
            if out.len() > guard.snapshots.len() {
                return Err(Error::FailedPrecondition(format!(
                    "parent chain of {name} has a cycle"
                )));
            }
            cur = &e.parent;
        }
        Ok(out)
    }

    fn create_entry(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Snapshot, Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let mut guard = self.lock();
        if guard.snapshots.contains_key(key) {
            return Err(Error::AlreadyExists(format!(
                "snapshot {key}: already exists"
            )));
        }
        let mut parent_ids = Vec::new();
        if !parent.is_empty() {
            let p = guard.snapshots.get(parent).ok_or_else(|| {
                Error::NotFound(format!("parent snapshot {parent} of {key} does not exist"))
            })?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent} of {key} is not a committed snapshot"
                )));
            }
            parent_ids = Self::parent_ids(&guard, parent)?;
        }
        let id = guard.next_id;
        let tmp = self.snapshots_dir().join(format!("new-{id}"));
        let dir = self.snapshot_dir(id);
        let made = self.make_dirs(kind, &tmp, &dir, parent_ids.first().copied());
        if let Err(e) = made {
            remove_tree(&tmp);
            remove_tree(&dir);
            return Err(e);
        }
        let now = Timestamp::now();
        let mut next = guard.clone();
        next.next_id = id + 1;
        next.snapshots.insert(
            key.to_string(),
            Entry {
                id,
                kind,
                parent: parent.to_string(),
                labels: drop_empty(labels),
                created: now,
                updated: now,
                usage: Usage::default(),
            },
        );
        if let Err(e) = self.persist(&mut guard, next) {
            remove_tree(&dir);
            return Err(e);
        }
        self.step("create.stored");
        Ok(Snapshot {
            id,
            kind,
            parent_ids,
        })
    }

    fn make_dirs(
        &self,
        kind: Kind,
        tmp: &Path,
        dir: &Path,
        parent: Option<u64>,
    ) -> Result<(), Error> {
        // Leftovers of a failed earlier attempt with this id: not in the
        // store (we hold its lock), so orphans.
        for leftover in [tmp, dir] {
            if leftover.exists() {
                remove_tree(leftover);
            }
        }
        mkdir(tmp, 0o700)?;
        self.step("create.tmp");
        let fs_dir = tmp.join("fs");
        mkdir(&fs_dir, 0o755)?;
        if kind == Kind::Active {
            mkdir(&tmp.join("work"), 0o711)?;
        }
        self.step("create.subdirs");
        if let Some(pid) = parent {
            // The new upper dir belongs to whoever owns the parent's root.
            let pfs = self.fs_path(pid);
            let md = fs::metadata(&pfs).map_err(Error::io("stat parent", &pfs))?;
            std::os::unix::fs::lchown(&fs_dir, Some(md.uid()), Some(md.gid()))
                .map_err(Error::io("chown", &fs_dir))?;
        }
        fsync_dir(tmp)?;
        self.step("create.synced");
        fs::rename(tmp, dir).map_err(Error::io("rename into place", dir))?;
        self.step("create.renamed");
        fsync_dir(&self.snapshots_dir())
    }

    /// What `Mounts` is built from; only active and view snapshots have mounts.
    pub fn snapshot(&self, key: &str) -> Result<Snapshot, Error> {
        let guard = self.lock();
        let e = guard
            .snapshots
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
        if e.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed: only active or view snapshots have mounts"
            )));
        }
        Ok(Snapshot {
            id: e.id,
            kind: e.kind,
            parent_ids: Self::parent_ids(&guard, &e.parent)?,
        })
    }

    /// `Commit`: active `key` becomes committed `name` with `labels` (not
    /// inherited), and its usage is measured and kept.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "commit of {key}: name must not be empty"
            )));
        }
        let check = |state: &State| -> Result<u64, Error> {
            if state.snapshots.contains_key(name) {
                return Err(Error::AlreadyExists(format!(
                    "committed snapshot {name}: already exists"
                )));
            }
            let e = state
                .snapshots
                .get(key)
                .ok_or_else(|| Error::NotFound(format!("active snapshot {key} does not exist")))?;
            if e.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            Ok(e.id)
        };
        let id = check(&self.lock())?;
        // Measure without holding the lock: the walk may be long.
        let usage = disk_usage(&self.fs_path(id))?;
        let mut guard = self.lock();
        if check(&guard)? != id {
            return Err(Error::NotFound(format!(
                "active snapshot {key} was replaced during commit"
            )));
        }
        let mut next = guard.clone();
        let Some(mut e) = next.snapshots.remove(key) else {
            return Err(Error::NotFound(format!(
                "active snapshot {key} does not exist"
            )));
        };
        let now = Timestamp::now();
        e.kind = Kind::Committed;
        e.created = now;
        e.updated = now;
        e.labels = drop_empty(labels);
        e.usage = usage;
        next.snapshots.insert(name.to_string(), e);
        self.persist(&mut guard, next)
    }

    /// `Remove`: drops `key` (not if it has children) and deletes its directory.
    pub fn remove(&self, key: &str) -> Result<(), Error> {
        let mut guard = self.lock();
        let e = guard
            .snapshots
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
        if let Some((child, _)) = guard.snapshots.iter().find(|(_, c)| c.parent == key) {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key}: snapshot {child} is its child"
            )));
        }
        let id = e.id;
        let mut next = guard.clone();
        next.snapshots.remove(key);
        self.persist(&mut guard, next)?;
        drop(guard);
        self.step("remove.stored");
        remove_tree(&self.snapshot_dir(id));
        Ok(())
    }

    fn info(name: &str, e: &Entry) -> Info {
        Info {
            name: name.to_string(),
            parent: e.parent.clone(),
            kind: e.kind,
            labels: e.labels.clone(),
            created: e.created,
            updated: e.updated,
        }
    }

    /// `Stat`.
    pub fn stat(&self, key: &str) -> Result<Info, Error> {
        let guard = self.lock();
        let e = guard
            .snapshots
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
        Ok(Self::info(key, e))
    }

    /// `Update`: only labels are mutable.
    pub fn update(&self, req: UpdateRequest) -> Result<Info, Error> {
        let mut guard = self.lock();
        let name = req.name.as_str();
        let e = guard
            .snapshots
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("snapshot {name} does not exist")))?;
        let mut labels = e.labels.clone();
        if req.paths.is_empty() {
            labels = drop_empty(req.labels.clone());
        }
        for path in &req.paths {
            if let Some(k) = path.strip_prefix("labels.") {
                match req.labels.get(k).filter(|v| !v.is_empty()) {
                    Some(v) => labels.insert(k.to_string(), v.clone()),
                    None => labels.remove(k),
                };
            } else if path == "labels" {
                labels = drop_empty(req.labels.clone());
            } else {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {path:?} field on snapshot {name:?}"
                )));
            }
        }
        let mut next = guard.clone();
        let Some(e) = next.snapshots.get_mut(name) else {
            return Err(Error::NotFound(format!("snapshot {name} does not exist")));
        };
        e.labels = labels;
        e.updated = Timestamp::now();
        let info = Self::info(name, e);
        self.persist(&mut guard, next)?;
        Ok(info)
    }

    /// `List` / `Walk`: the snapshots matching `filter`, by name.
    pub fn list(&self, filter: &Filter) -> Vec<Info> {
        let guard = self.lock();
        guard
            .snapshots
            .iter()
            .map(|(n, e)| Self::info(n, e))
            .filter(|i| filter.matches(i))
            .collect()
    }

    /// `Usage`: committed snapshots' as stored at commit, active ones' measured now.
    pub fn usage(&self, key: &str) -> Result<Usage, Error> {
        let (id, kind, usage) = {
            let guard = self.lock();
            let e = guard
                .snapshots
                .get(key)
                .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
            (e.id, e.kind, e.usage)
        };
        if kind == Kind::Active {
            return disk_usage(&self.fs_path(id));
        }
        Ok(usage)
    }

    /// `Cleanup`: deletes directories under `snapshots/` the store does not
    /// name (crash leftovers). Returns how many.
    pub fn cleanup(&self) -> Result<usize, Error> {
        let guard = self.lock();
        let known: HashSet<String> = guard.snapshots.values().map(|e| e.id.to_string()).collect();
        let mut removed = 0;
        for name in self.dir_names()? {
            if !known.contains(&name) {
                remove_tree(&self.snapshots_dir().join(&name));
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn committed(store: &Store, name: &str, parent: &str) -> u64 {
        let key = format!("{name}-active");
        let s = store
            .create(Kind::Active, &key, parent, HashMap::new())
            .unwrap();
        store.commit(name, &key, HashMap::new()).unwrap();
        s.id
    }

    #[test]
    fn lifecycle_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let store = Store::open(&root).unwrap();
        assert_eq!(
            fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let a = store
            .create(Kind::Active, "a", "", labels(&[("x", "1"), ("empty", "")]))
            .unwrap();
        assert_eq!(
            fs::metadata(store.fs_path(a.id))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(store.work_path(a.id))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o711
        );
        assert_eq!(
            store.stat("a").unwrap().labels,
            [("x".to_string(), "1".to_string())].into()
        );
        assert!(
            matches!(store.create(Kind::Active, "a", "", HashMap::new()), Err(Error::AlreadyExists(m)) if m.contains("a"))
        );
        assert!(matches!(
            store.create(Kind::Active, "b", "a", HashMap::new()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(
            matches!(store.create(Kind::Active, "b", "nope", HashMap::new()), Err(Error::NotFound(m)) if m.contains("nope"))
        );

        fs::write(store.fs_path(a.id).join("f"), vec![7u8; 8192]).unwrap();
        let live = store.usage("a").unwrap();
        assert_eq!(live.inodes, 2);
        store.commit("c", "a", labels(&[("y", "2")])).unwrap();
        assert!(matches!(store.stat("a"), Err(Error::NotFound(_))));
        let c = store.stat("c").unwrap();
        assert_eq!(c.kind, Kind::Committed);
        assert_eq!(
            c.labels,
            [("y".to_string(), "2".to_string())].into(),
            "labels replaced, not inherited"
        );
        assert_eq!(store.usage("c").unwrap(), live);
        assert!(matches!(
            store.snapshot("c"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            store.commit("c", "x", HashMap::new()),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            store.commit("d", "x", HashMap::new()),
            Err(Error::NotFound(_))
        ));

        let v = store.create(Kind::View, "v", "c", HashMap::new()).unwrap();
        assert_eq!(v.parent_ids, vec![a.id]);
        assert!(!store.work_path(v.id).exists());
        assert!(matches!(
            store.commit("d", "v", HashMap::new()),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(store.remove("c"), Err(Error::FailedPrecondition(m)) if m.contains("c")));
        store.remove("v").unwrap();
        assert!(!store.snapshot_dir(v.id).exists());
        store.remove("c").unwrap();
        assert!(matches!(store.remove("c"), Err(Error::NotFound(_))));
        assert!(store.list(&Filter::default()).is_empty());
    }

    #[test]
    fn update_field_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .create(Kind::Active, "a", "", labels(&[("x", "1"), ("y", "2")]))
            .unwrap();
        let before = store.stat("a").unwrap();
        let up = |l: &[(&str, &str)], p: &[&str]| {
            store.update(UpdateRequest {
                name: "a".into(),
                labels: labels(l),
                paths: p.iter().map(|s| s.to_string()).collect(),
            })
        };
        let i = up(&[("x", "9"), ("z", "3")], &["labels.x"]).unwrap();
        assert_eq!(
            i.labels,
            [("x".into(), "9".into()), ("y".into(), "2".into())].into()
        );
        let i = up(&[], &["labels.y"]).unwrap();
        assert_eq!(
            i.labels,
            [("x".into(), "9".into())].into(),
            "absent value deletes the label"
        );
        let i = up(&[("q", "1")], &[]).unwrap();
        assert_eq!(i.labels, [("q".into(), "1".into())].into());
        assert!(i.updated >= before.updated && i.created == before.created);
        assert!(matches!(up(&[], &["name"]), Err(Error::InvalidArgument(m)) if m.contains("name")));
        assert_eq!(store.stat("a").unwrap().labels, i.labels);
        // The state survives a reopen.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.stat("a").unwrap().labels, i.labels);
    }

    #[test]
    fn second_process_on_the_same_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _one = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(Error::Locked { .. })));
    }

    #[test]
    fn cleanup_removes_unknown_dirs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.create(Kind::Active, "a", "", HashMap::new()).unwrap();
        fs::create_dir(store.snapshots_dir().join("99")).unwrap();
        fs::create_dir(store.snapshots_dir().join("new-5")).unwrap();
        assert_eq!(store.cleanup().unwrap(), 2);
        assert!(store.snapshot_dir(a.id).is_dir());
        assert_eq!(store.dir_names().unwrap(), vec![a.id.to_string()]);
    }

    /// Ids of entries and names of directories, after a reopen.
    fn check_consistent(store: &Store) {
        let state = store.lock().clone();
        let mut ids: Vec<String> = state.snapshots.values().map(|e| e.id.to_string()).collect();
        ids.sort();
        let mut dirs = store.dir_names().unwrap();
        dirs.sort();
        assert_eq!(
            ids, dirs,
            "every entry has its directory and no orphan is left"
        );
        for e in state.snapshots.values() {
            assert!(store.fs_path(e.id).is_dir());
            if e.kind == Kind::Active {
                assert!(store.work_path(e.id).is_dir());
            }
            assert!(e.id < state.next_id);
        }
        assert!(!store.root.join(STATE_TMP).exists());
    }

    /// Crashes (a panic that skips all clean-up, as SIGKILL would) at each
    /// step of each changing operation, reopens, and checks the store is
    /// consistent, the operation happened wholly or not at all, and no id
    /// is handed out twice.
    #[test]
    fn crash_at_every_step_reopens_consistent() {
        type Op = fn(&Store);
        let ops: [(&str, Op, &[&str]); 5] = [
            (
                "remote",
                |s| {
                    s.create_committed("new", "base", labels(&[("l", "v")]))
                        .unwrap();
                },
                &[
                    "create.tmp",
                    "create.synced",
                    "create.renamed",
                    "persist.written",
                    "persist.synced",
                    "persist.renamed",
                    "create.stored",
                ],
            ),
            (
                "prepare",
                |s| {
                    s.create(Kind::Active, "new", "base", HashMap::new())
                        .unwrap();
                },
                &[
                    "create.tmp",
                    "create.subdirs",
                    "create.synced",
                    "create.renamed",
                    "persist.written",
                    "persist.synced",
                    "persist.renamed",
                    "create.stored",
                ],
            ),
            (
                "view",
                |s| {
                    s.create(Kind::View, "new", "base", HashMap::new()).unwrap();
                },
                &[
                    "create.tmp",
                    "create.synced",
                    "create.renamed",
                    "persist.synced",
                    "persist.renamed",
                ],
            ),
            (
                "commit",
                |s| s.commit("new", "active", labels(&[("l", "v")])).unwrap(),
                &["persist.written", "persist.synced", "persist.renamed"],
            ),
            (
                "remove",
                |s| s.remove("active").unwrap(),
                &[
                    "persist.written",
                    "persist.synced",
                    "persist.renamed",
                    "remove.stored",
                ],
            ),
        ];
        for (op_name, op, steps) in ops {
            for &step in steps {
                let dir = tempfile::tempdir().unwrap();
                let mut store = Store::open(dir.path()).unwrap();
                committed(&store, "base", "");
                store
                    .create(Kind::Active, "active", "base", HashMap::new())
                    .unwrap();
                let before: Vec<String> = store.lock().snapshots.keys().cloned().collect();
                let fired = Arc::new(AtomicBool::new(false));
                let f = Arc::clone(&fired);
                store.set_crash_hook(Arc::new(move |s| {
                    if s == step {
                        f.store(true, Ordering::SeqCst);
                        panic!("simulated crash at {s}");
                    }
                }));
                let crashed = catch_unwind(AssertUnwindSafe(|| op(&store))).is_err();
                assert!(
                    crashed && fired.load(Ordering::SeqCst),
                    "{op_name}: step {step} never reached"
                );
                let max_seen = store
                    .dir_names()
                    .unwrap()
                    .iter()
                    .filter_map(|n| n.trim_start_matches("new-").parse::<u64>().ok())
                    .max()
                    .unwrap_or(0);
                drop(store);

                let store = Store::open(dir.path())
                    .unwrap_or_else(|e| panic!("{op_name}@{step}: reopen: {e}"));
                check_consistent(&store);
                let after: Vec<String> = store.lock().snapshots.keys().cloned().collect();
                let expect_done: Vec<String> = match op_name {
                    "prepare" | "view" | "remote" => {
                        vec!["active".into(), "base".into(), "new".into()]
                    }
                    "commit" => vec!["base".into(), "new".into()],
                    _ => vec!["base".into()],
                };
                assert!(
                    after == before || after == expect_done,
                    "{op_name}@{step}: half-done state {after:?}"
                );
                if op_name == "remote" && after == expect_done {
                    let i = store.stat("new").unwrap();
                    assert_eq!((i.kind, i.parent.as_str()), (Kind::Committed, "base"));
                }
                if op_name == "commit" && after == expect_done {
                    assert_eq!(store.stat("new").unwrap().kind, Kind::Committed);
                }
                let next = store
                    .create(Kind::Active, "later", "", HashMap::new())
                    .unwrap();
                assert!(
                    next.id > max_seen,
                    "{op_name}@{step}: id {} reused (saw {max_seen})",
                    next.id
                );
                check_consistent(&store);
            }
        }
    }
}
