//! The cachefiles cache within `cache_limit`.
//!
//! The kernel keeps no byte budget for a cachefiles cache (`brun`/`bcull`/
//! `bstop` are free-space percentages of the whole file system), so the daemon
//! counts what the cache directory holds and, when a write would take it over
//! the limit, deletes the cache files of objects no mount has open, least
//! recently used first, with the device's `cull` command. Objects of blobs no
//! registered image names go before any other.
//!
//! An object a mount has open cannot be shrunk safely (the kernel checks a
//! range for data, then reads the backing file with no lock a daemon could
//! take: a hole punched in between reads as zeros), and `cull` refuses it
//! (EBUSY). So a cache whose objects are all in use stays over its limit: the
//! episode is logged once and counted (`no_room`), and reads go on being
//! served: refusing them would turn a full budget into EIO for a mounted image.
//!
//! Kernel behaviour relied on (fs/cachefiles, 6.12):
//! - Layout: `<dir>/cache/I<volume key>/@<fan-out byte>/<object name>`, the
//!   object name `D<cookie key>` when the key is printable (`key.c`,
//!   `cachefiles_cook_key`; lazypull's cookies are blob digests, printable).
//! - `cull <name>` looks `name` up in the *writer's current directory*
//!   (`daemon.c`, `get_fs_pwd(current->fs)`). The culling thread therefore
//!   unshares its `fs_struct` (`CLONE_FS`) first: its `chdir`s then move no
//!   other thread of the daemon.
//! - An object the kernel has open is marked `S_KERNEL_FILE`: `cull` answers
//!   EBUSY for it. Otherwise it marks the inode (so the cache cannot pick the
//!   file up again) and unlinks it (`namei.c`, `cachefiles_cull`). A culled
//!   object is created afresh at its next OPEN, and READs fetch it again.
//! - In on-demand mode only the daemon writes data into cache files (through
//!   the anonymous fds): every byte the budget must admit passes
//!   [`CullBudget::admit`].
//!
//! It owns the culling thread and the accounting; it must not fill objects or
//! answer the kernel's requests (the cachefiles server does).

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use lazypull_cachefiles::{CacheDevice, Command};
use tracing::{debug, info, warn};

/// What the daemon bounds the cachefiles cache by.
#[derive(Clone)]
pub struct CullConfig {
    /// Bytes the cache directory may hold (`cache_limit`, resolved).
    pub limit: u64,
    /// Whether a registered image names this blob (a cookie key): objects
    /// of blobs none names are culled first.
    pub registered: Registered,
}

/// Whether a registered image names a blob (its cookie key).
pub type Registered = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// The keys (`I<volume>/<name>`) of the objects the kernel has open now.
pub type OpenKeys = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

impl std::fmt::Debug for CullConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CullConfig")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// How long a write waits, at most, for a culling pass to make room.
const ROOM_WAIT: Duration = Duration::from_secs(5);
/// A pass runs at least this often (it also recounts the cache directory).
const PASS_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Account {
    /// Bytes the last count of the cache directory found.
    counted: u64,
    /// Bytes written since that count began.
    written: u64,
    /// Bytes admitted and being written now.
    in_flight: u64,
    /// Bytes of writes waiting for a pass to make room for them.
    waiting: u64,
    /// Passes asked for and passes finished.
    asked: u64,
    finished: u64,
    stop: bool,
    /// In an episode of being over the limit with nothing left to cull.
    over: bool,
    /// An object was closed since the last pass began (it may be culled).
    closed_since: bool,
    /// When each object (`I<volume>/<name>`) was last closed by the kernel.
    closed_at: HashMap<String, SystemTime>,
    culled_objects: u64,
    culled_bytes: u64,
    busy: u64,
    over_episodes: u64,
}

impl Account {
    fn used(&self) -> u64 {
        self.counted + self.written + self.in_flight
    }
}

/// The budget of one cachefiles cache, shared by every writer of it.
pub struct CullBudget {
    limit: u64,
    /// What writes may fill: a 64th of the limit is kept for the file
    /// system's own blocks (extent trees, directories, xattrs).
    data_limit: u64,
    account: Mutex<Account>,
    /// Wakes the culling thread (a pass asked for, or stop).
    wake: Condvar,
    /// Wakes writers waiting for a pass.
    passed: Condvar,
}

impl std::fmt::Debug for CullBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CullBudget")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl CullBudget {
    fn lock(&self) -> MutexGuard<'_, Account> {
        self.account.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `bytes` about to be written into a cache file, culling idle
    /// objects first when they would take the cache over its limit (waiting
    /// for the culling thread, at most [`ROOM_WAIT`]). Always admits in the
    /// end: when nothing idle is left, the cache goes over its limit rather
    /// than fail a mounted image's read. Call [`written`](Self::written) once
    /// the write is done (or failed).
    pub fn admit(&self, bytes: u64) {
        let mut acc = self.lock();
        // Over the limit with every object in use: only a CLOSE (or the
        // periodic pass) can change that, so writes do not ask for a pass
        // (each counts the whole cache directory) until one comes.
        let may_cull = !acc.over || acc.closed_since;
        if acc.used() + bytes > self.data_limit && may_cull && !acc.stop {
            let want = acc.asked + 1;
            acc.asked = want;
            acc.waiting += bytes;
            self.wake.notify_all();
            let deadline = Instant::now() + ROOM_WAIT;
            while acc.finished < want && !acc.stop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                acc = self
                    .passed
                    .wait_timeout(acc, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            acc.waiting -= bytes;
        }
        acc.in_flight += bytes;
    }

    /// A write [`admit`](Self::admit)ted for `admitted` bytes is over:
    /// `done` of them landed in the cache file.
    pub fn written(&self, admitted: u64, done: u64) {
        let mut acc = self.lock();
        acc.in_flight = acc.in_flight.saturating_sub(admitted);
        acc.written += done;
    }

    /// The kernel closed the object `cookie` of `volume`: it is idle from now
    /// on, and this is its last use.
    pub fn closed(&self, volume: &[u8], cookie: &[u8]) {
        let key = object_key(volume, cookie);
        let mut acc = self.lock();
        acc.closed_at.insert(key, SystemTime::now());
        acc.closed_since = true;
    }

    fn end_episode(&self, acc: &mut Account) {
        acc.over = false;
        info!(
            used = acc.used(),
            limit = self.limit,
            "the cachefiles cache is within its limit again"
        );
    }

    /// Use against the limit, in the terms of the daemon's other caches.
    pub fn snapshot(&self) -> lazypull_engine::BudgetSnapshot {
        let acc = self.lock();
        lazypull_engine::BudgetSnapshot {
            limit_bytes: self.limit,
            used_bytes: acc.used(),
            evicted_windows: 0,
            evicted_bytes: acc.culled_bytes,
            removed_blobs: acc.culled_objects,
            no_room: acc.over_episodes,
        }
    }
}

/// `I<volume>/<object name>`: an object's place in the cache, but for its
/// fan-out directory (which hashes the key; the names are unique per volume).
pub(crate) fn object_key(volume: &[u8], cookie: &[u8]) -> String {
    let mut key = String::from("I");
    key.push_str(&String::from_utf8_lossy(volume));
    key.push_str("/D");
    key.push_str(&String::from_utf8_lossy(cookie));
    key
}

/// One cache file found by a count.
#[derive(Debug, Clone)]
struct Entry {
    /// Its fan-out directory.
    dir: PathBuf,
    name: String,
    /// `I<volume>/<name>`.
    key: String,
    /// The cookie key, for a `D` name.
    cookie: Option<Vec<u8>>,
    bytes: u64,
    modified: SystemTime,
}

/// Every cache file under `<cache_dir>/cache`, and the bytes the directory
/// holds in all (files and directories, as allocated).
fn count(cache_dir: &Path) -> io::Result<(Vec<Entry>, u64)> {
    let root = cache_dir.join("cache");
    let mut entries = Vec::new();
    let mut total = 0u64;
    let read = match std::fs::read_dir(&root) {
        Ok(r) => r,
        // Not created yet: nothing was ever cached.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((entries, 0)),
        Err(e) => return Err(e),
    };
    for volume in read {
        let volume = volume?;
        let vname = volume.file_name();
        if !vname.as_bytes().starts_with(b"I") || !volume.file_type()?.is_dir() {
            continue;
        }
        for fan in std::fs::read_dir(volume.path())? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            total += fan.metadata()?.blocks() * 512;
            for object in std::fs::read_dir(fan.path())? {
                let object = object?;
                let Ok(meta) = object.metadata() else {
                    continue; // culled or retired meanwhile
                };
                if !meta.is_file() {
                    continue;
                }
                let name = object.file_name();
                let Some(name) = name.to_str().map(str::to_owned) else {
                    continue;
                };
                let bytes = meta.blocks() * 512;
                total += bytes;
                entries.push(Entry {
                    dir: fan.path(),
                    key: format!("{}/{name}", vname.to_string_lossy()),
                    cookie: name.strip_prefix('D').map(|c| c.as_bytes().to_vec()),
                    name,
                    bytes,
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
    }
    Ok((entries, total))
}

/// The order objects are culled in: blobs no registered image names first,
/// then the least recently used (closed by the kernel, else written).
fn cull_order(
    entries: &mut [Entry],
    closed_at: &HashMap<String, SystemTime>,
    registered: &dyn Fn(&[u8]) -> bool,
) {
    entries.sort_by_cached_key(|e| {
        let used = closed_at.get(&e.key).copied().unwrap_or(e.modified);
        let registered = e.cookie.as_deref().is_some_and(registered);
        (registered, used)
    });
}

/// The culling thread and its budget.
pub struct Culler {
    budget: Arc<CullBudget>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Culler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Culler")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Culler {
    /// Counts the cache in `cache_dir` and starts the culling thread, which
    /// writes `cull` to `device` (a duplicate of the bound device's fd).
    /// `open` says which objects (`I<volume>/<name>` keys) the kernel has
    /// open now: those are never asked for.
    pub fn start(
        device: OwnedFd,
        cache_dir: PathBuf,
        config: CullConfig,
        open: OpenKeys,
    ) -> io::Result<Culler> {
        let (_, counted) = count(&cache_dir)?;
        let budget = Arc::new(CullBudget {
            limit: config.limit,
            data_limit: config.limit - config.limit / 64,
            account: Mutex::new(Account {
                counted,
                // A pass at once only if what earlier runs left is over: the
                // count just made is the truth otherwise.
                asked: u64::from(counted > config.limit - config.limit / 64),
                ..Account::default()
            }),
            wake: Condvar::new(),
            passed: Condvar::new(),
        });
        info!(
            limit = config.limit,
            used = counted,
            dir = %cache_dir.display(),
            "cachefiles cache limit: idle objects are culled to stay within it"
        );
        let worker = Worker {
            device: CacheDevice::from_fd(device),
            cache_dir,
            config,
            open,
            budget: budget.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("lp-cull".into())
            .spawn(move || worker.run())?;
        Ok(Culler {
            budget,
            thread: Some(thread),
        })
    }

    pub fn budget(&self) -> &Arc<CullBudget> {
        &self.budget
    }

    /// Stops the culling thread and joins it (blocking: call it off the
    /// async runtime).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.budget.lock().stop = true;
        self.budget.wake.notify_all();
        self.budget.passed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Culler {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

struct Worker {
    device: CacheDevice,
    cache_dir: PathBuf,
    config: CullConfig,
    open: OpenKeys,
    budget: Arc<CullBudget>,
}

impl Worker {
    fn run(self) {
        // SAFETY: unshare(CLONE_FS) gives this thread its own copy of the
        // process's root, cwd and umask; it touches no memory and no fd, and
        // other threads keep the shared fs_struct, so their current directory
        // never moves when this one chdirs for `cull` (which resolves names
        // in the writer's cwd).
        let unshared = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) };
        if let Err(e) = unshared {
            warn!("cannot give the culling thread its own directory ({e}): the cachefiles cache is not bounded");
            let mut acc = self.budget.lock();
            // Writers never wait for passes that would not come.
            acc.finished = u64::MAX;
            acc.asked = u64::MAX;
            drop(acc);
            self.budget.passed.notify_all();
            return;
        }
        loop {
            let want = {
                let mut acc = self.budget.lock();
                let started = Instant::now();
                while acc.asked <= acc.finished && !acc.stop {
                    let left = PASS_INTERVAL.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    acc = self
                        .budget
                        .wake
                        .wait_timeout(acc, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if acc.stop {
                    return;
                }
                acc.asked
            };
            if let Err(e) = self.pass() {
                warn!(dir = %self.cache_dir.display(), "culling the cachefiles cache failed: {e}");
            }
            let mut acc = self.budget.lock();
            acc.finished = acc.finished.max(want);
            drop(acc);
            self.budget.passed.notify_all();
        }
    }

    /// Counts the cache and culls idle objects until it is within its limit.
    fn pass(&self) -> io::Result<()> {
        let (written_before, quiet) = {
            let mut acc = self.budget.lock();
            acc.closed_since = false;
            (acc.written, acc.written == 0 && acc.in_flight == 0)
        };
        let (mut entries, found) = count(&self.cache_dir)?;
        let (target, closed_at, counted) = {
            let mut acc = self.budget.lock();
            // A write the anonymous fd has taken can show in the file's
            // blocks only later (measured in the 6.12 guest: three counts in
            // 150 ms saw none of the writes between them). So a count taken
            // while writes went on never lowers the estimate; one taken when
            // nothing was written since the last is the truth.
            let estimate = acc.counted + written_before;
            acc.counted = if quiet { found } else { found.max(estimate) };
            // Writes done since the count began count on top of it.
            acc.written -= written_before.min(acc.written);
            let counted = acc.counted;
            // Room for what is being written and for the writes waiting.
            let target = self
                .budget
                .data_limit
                .saturating_sub(acc.in_flight + acc.waiting);
            debug!(
                counted,
                written = acc.written,
                in_flight = acc.in_flight,
                waiting = acc.waiting,
                target,
                "culling pass: counted the cache"
            );
            if counted + acc.written <= target {
                // The episode ends well under the limit only: a count can
                // miss writes made a moment ago (above), and an episode that
                // flapped on them would be logged again and again.
                let well_under = self.budget.data_limit - self.budget.limit / 8;
                if acc.over && acc.used() <= well_under {
                    self.budget.end_episode(&mut acc);
                }
                return Ok(());
            }
            (target, acc.closed_at.clone(), counted)
        };
        let open: std::collections::HashSet<String> = (self.open)().into_iter().collect();
        entries.retain(|e| !open.contains(&e.key));
        cull_order(&mut entries, &closed_at, self.config.registered.as_ref());
        let mut used = counted + self.budget.lock().written;
        for e in &entries {
            if used <= target {
                break;
            }
            match self.cull(e) {
                Ok(()) => {
                    used = used.saturating_sub(e.bytes);
                    let mut acc = self.budget.lock();
                    acc.counted = acc.counted.saturating_sub(e.bytes);
                    acc.culled_objects += 1;
                    acc.culled_bytes += e.bytes;
                    acc.closed_at.remove(&e.key);
                    debug!(object = %e.key, bytes = e.bytes, "culled an idle cache object");
                }
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                    debug!(object = %e.key, "not culled: the kernel has it in use");
                    self.budget.lock().busy += 1;
                }
                // Gone meanwhile (the kernel retired it).
                Err(err)
                    if matches!(err.raw_os_error(), Some(libc::ESTALE) | Some(libc::ENOENT)) => {}
                Err(err) => return Err(err),
            }
        }
        debug!(
            counted,
            target,
            used,
            candidates = entries.len(),
            open = open.len(),
            "culling pass"
        );
        let mut acc = self.budget.lock();
        if used <= target && acc.over {
            // Culling made room: mounts went away.
            self.budget.end_episode(&mut acc);
        }
        if used > target && !acc.over {
            acc.over = true;
            acc.over_episodes += 1;
            warn!(
                used,
                limit = self.budget.limit,
                "the cachefiles cache is over its limit and every object left is in use by a mount: \
                 reads go on being cached (culled when their mounts go)"
            );
        }
        Ok(())
    }

    fn cull(&self, e: &Entry) -> io::Result<()> {
        // This thread's own cwd (see `run`): `cull` names a file in it.
        rustix::process::chdir(&e.dir)?;
        self.device.send(&Command::Cull(e.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, cookie: &str, secs: u64) -> Entry {
        Entry {
            dir: PathBuf::new(),
            name: format!("D{cookie}"),
            key: key.into(),
            cookie: Some(cookie.as_bytes().to_vec()),
            bytes: 4096,
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    #[test]
    fn unregistered_blobs_go_first_then_the_least_recently_used() {
        let mut v = vec![
            entry("Ierofs,a/Dnew", "new", 30),
            entry("Ierofs,a/Dold", "old", 10),
            entry("Ierofs,a/Dstray", "stray", 50),
            entry("Ierofs,a/Dclosed", "closed", 5),
        ];
        // Closed recently, though written long ago: used recently.
        let mut closed = HashMap::new();
        closed.insert(
            "Ierofs,a/Dclosed".to_string(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(40),
        );
        cull_order(&mut v, &closed, &|c: &[u8]| c != b"stray");
        let order: Vec<&str> = v.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(order, ["Dstray", "Dold", "Dnew", "Dclosed"]);
    }

    #[test]
    fn a_count_finds_the_objects_of_every_volume_and_their_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let fan = dir.path().join("cache/Ierofs,img/@4a");
        std::fs::create_dir_all(&fan).unwrap();
        std::fs::write(fan.join("Dsha256-x"), vec![1u8; 20000]).unwrap();
        // Sparse: only what is allocated counts.
        let f = std::fs::File::create(fan.join("Dsha256-y")).unwrap();
        f.set_len(1 << 30).unwrap();
        std::fs::create_dir_all(dir.path().join("graveyard")).unwrap();
        let (mut entries, total) = count(dir.path()).unwrap();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].key, "Ierofs,img/Dsha256-x");
        assert_eq!(entries[0].cookie.as_deref(), Some(&b"sha256-x"[..]));
        assert!(
            entries[0].bytes >= 20000 && entries[0].bytes < 40000,
            "{}",
            entries[0].bytes
        );
        assert!(entries[1].bytes < 8192, "sparse: {}", entries[1].bytes);
        assert!(total >= entries[0].bytes + entries[1].bytes);
        assert_eq!(object_key(b"erofs,img", b"sha256-x"), entries[0].key);
        // No cache yet: nothing.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(count(empty.path()).unwrap().1, 0);
    }

    #[test]
    fn a_write_over_the_limit_waits_for_a_pass_but_is_admitted_when_none_comes() {
        let budget = CullBudget {
            limit: 64 << 10,
            data_limit: 63 << 10,
            account: Mutex::new(Account::default()),
            wake: Condvar::new(),
            passed: Condvar::new(),
        };
        budget.admit(32 << 10);
        budget.written(32 << 10, 32 << 10);
        assert_eq!(budget.snapshot().used_bytes, 32 << 10);
        // Over: it asks for a pass; with no thread to run one it gives up
        // after ROOM_WAIT and writes anyway. Marked stopped to not wait here.
        budget.lock().stop = true;
        budget.admit(64 << 10);
        assert_eq!(budget.snapshot().used_bytes, 96 << 10);
        budget.written(64 << 10, 0);
        assert_eq!(budget.snapshot().used_bytes, 32 << 10);
    }
}
