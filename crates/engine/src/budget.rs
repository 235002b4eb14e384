//! A byte budget for lazypull's own cache (the FUSE, loop and fanotify
//! transports' cache files): what the cache may hold on disk, and the
//! least-recently-used eviction that keeps it there.
//!
//! It owns the accounting and the choice of victims; the cache files own
//! their bytes ([`CacheFile::evict_windows`] does the removal). The rules that
//! keep eviction from ever serving wrong bytes:
//! - room is *reserved* before a fill writes (`used` counts filled windows,
//!   reservations and orphans), so the cache never holds more than the limit,
//!   not even for a moment; a fill that finds no room gets
//!   [`FillError::NoRoom`](crate::FillError::NoRoom) and the transport serves
//!   the read another way (FUSE: straight from the source) or fails it;
//! - a window a reader has pinned ([`crate::FillMap::pin_filled`]: FUSE pins from
//!   "filled" to the end of the splice) is never taken;
//! - a taken window is marked missing in memory and *on disk* (the map is
//!   saved) before its bytes are punched out, so neither a reader nor a
//!   restarted daemon trusts bytes that are gone;
//! - a cache file some mount reads directly (a complete `.data`) must not be
//!   under a budget: the transports stop handing out complete files directly
//!   when a budget is set (see the FUSE transport's mount plan), so every read
//!   of a budgeted cache passes through the daemon or raises an event.
//!
//! Whole blobs no open cache file stands for (*orphans*: caches of images no
//! longer registered, found at start or left when a cache file closes) go
//! first, oldest first; then windows, least recently used first.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::local_cache::CacheFile;
use crate::{now_nanos, FillPolicy};

/// The limit of a cache: what `cache_limit` says, resolved to bytes.
#[derive(Debug)]
pub struct CacheBudget {
    limit: u64,
    /// Windows used more recently than this are not evicted (fanotify: a
    /// read allowed a moment ago may still be reading them; see the
    /// fanotify transport). Zero for FUSE, whose readers pin.
    min_idle: Duration,
    files: Mutex<Vec<Weak<CacheFile>>>,
    /// Cache files on disk that no open [`CacheFile`] stands for.
    orphans: Mutex<Vec<Orphan>>,
    /// Bytes reserved by fills under way.
    reserved: AtomicU64,
    /// Serialises admissions, and the evictions they need: two fills never
    /// count the same free bytes.
    admit: Mutex<()>,
    stats: BudgetStats,
}

#[derive(Debug, Clone)]
struct Orphan {
    data: PathBuf,
    map: PathBuf,
    bytes: u64,
    /// Modification time (seconds): the oldest goes first.
    age: i64,
}

#[derive(Debug, Default)]
struct BudgetStats {
    evicted_windows: AtomicU64,
    evicted_bytes: AtomicU64,
    removed_blobs: AtomicU64,
    no_room: AtomicU64,
}

/// A point-in-time view of a budget, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BudgetSnapshot {
    pub limit_bytes: u64,
    /// Bytes held: filled windows of open cache files, orphans, reservations.
    pub used_bytes: u64,
    pub evicted_windows: u64,
    pub evicted_bytes: u64,
    /// Whole cache files removed (orphans).
    pub removed_blobs: u64,
    /// Fills refused for want of room (everything in the cache in use).
    pub no_room: u64,
}

/// How long an admission waits, at most, for windows to become idle enough
/// to evict (only with a `min_idle`).
const ADMIT_PATIENCE: Duration = Duration::from_secs(3);

impl CacheBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Self::with_min_idle(limit, Duration::ZERO)
    }

    /// A budget of `limit` bytes whose windows are evicted only once unused
    /// for `min_idle`.
    pub fn with_min_idle(limit: u64, min_idle: Duration) -> Arc<Self> {
        Arc::new(CacheBudget {
            limit,
            min_idle,
            files: Mutex::default(),
            orphans: Mutex::default(),
            reserved: AtomicU64::new(0),
            admit: Mutex::default(),
            stats: BudgetStats::default(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// What the cached bytes themselves may take: the limit less 1/64 of
    /// it, left for what the file system spends on the cache files beyond
    /// their bytes (a punched sparse file's extent tree blocks, measured at
    /// 4 KiB on ext4 for a few hundred holes) and for the fill maps, so the
    /// cache's blocks on disk stay within the limit too.
    fn data_limit(&self) -> u64 {
        self.limit - self.limit / 64
    }

    /// Counts the cache files already in `dir` (from earlier runs) as
    /// orphans until a [`open`](Self::open) claims them.
    pub fn scan(&self, dir: &Path) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("listing {}: {e}", dir.display()),
                ))
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("data") {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            found.push(Orphan {
                map: path.with_extension("map"),
                data: path,
                // What it holds on disk (a sparse file: its blocks).
                bytes: meta.blocks() * 512,
                age: meta.mtime(),
            });
        }
        let mut orphans = lock(&self.orphans);
        for o in found {
            if !orphans.iter().any(|have| have.data == o.data) {
                orphans.push(o);
            }
        }
        Ok(())
    }

    /// Opens the cache of blob `name` in `dir` under this budget (see
    /// [`CacheFile::open_bound`]).
    pub fn open(
        self: &Arc<Self>,
        dir: &Path,
        name: &str,
        size: u64,
        policy: FillPolicy,
        binding: [u8; 32],
    ) -> io::Result<Arc<CacheFile>> {
        self.claim(|| CacheFile::open_bound(dir, name, size, policy, binding))
    }

    /// Adopts `data` as the cache of blob `name` under this budget (see
    /// [`CacheFile::adopt_file`]).
    pub fn adopt(
        self: &Arc<Self>,
        dir: &Path,
        name: &str,
        size: u64,
        policy: FillPolicy,
        binding: [u8; 32],
        data: fs::File,
    ) -> io::Result<Arc<CacheFile>> {
        self.claim(|| CacheFile::adopt_file(dir, name, size, policy, binding, data))
    }

    /// Opens a cache file with `open` and puts it under this budget: no
    /// longer an orphan, counted by what it holds.
    fn claim(
        self: &Arc<Self>,
        open: impl FnOnce() -> io::Result<CacheFile>,
    ) -> io::Result<Arc<CacheFile>> {
        // Held across the open: an orphan is never removed under a cache
        // file opening it.
        let mut orphans = lock(&self.orphans);
        let file = open()?;
        orphans.retain(|o| o.data != file.data_path());
        Ok(self.register(file))
    }

    fn register(self: &Arc<Self>, mut file: CacheFile) -> Arc<CacheFile> {
        file.set_budget(self.clone());
        let file = Arc::new(file);
        let mut files = lock(&self.files);
        files.retain(|f| f.strong_count() > 0);
        files.push(Arc::downgrade(&file));
        file
    }

    /// A budgeted cache file closed: its bytes stay on disk, as an orphan.
    pub(crate) fn closed(&self, data: &Path, map: &Path, bytes: u64) {
        let mut orphans = lock(&self.orphans);
        if !orphans.iter().any(|o| o.data == data) {
            orphans.push(Orphan {
                data: data.to_path_buf(),
                map: map.to_path_buf(),
                bytes,
                age: fs::metadata(data).map(|m| m.mtime()).unwrap_or(0),
            });
        }
    }

    fn live_files(&self) -> Vec<Arc<CacheFile>> {
        let mut files = lock(&self.files);
        files.retain(|f| f.strong_count() > 0);
        files.iter().filter_map(Weak::upgrade).collect()
    }

    /// Bytes held now (see [`BudgetSnapshot::used_bytes`]).
    pub fn used(&self) -> u64 {
        let files = self.live_files();
        let filled: u64 = files.iter().map(|f| f.cached_bytes()).sum();
        let orphans: u64 = lock(&self.orphans).iter().map(|o| o.bytes).sum();
        filled + orphans + self.reserved.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BudgetSnapshot {
            limit_bytes: self.limit,
            used_bytes: self.used(),
            evicted_windows: g(&self.stats.evicted_windows),
            evicted_bytes: g(&self.stats.evicted_bytes),
            removed_blobs: g(&self.stats.removed_blobs),
            no_room: g(&self.stats.no_room),
        }
    }

    /// Reserves room for `bytes` more, evicting what it must. False when
    /// there is no room to be had: `bytes` exceed the whole limit, or what
    /// the cache holds is all in use.
    pub(crate) fn reserve(&self, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        if bytes > self.data_limit() {
            self.stats.no_room.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let _admit = lock(&self.admit);
        let started = std::time::Instant::now();
        let room = self.data_limit();
        loop {
            let used = self.used();
            if used + bytes <= room {
                self.reserved.fetch_add(bytes, Ordering::AcqRel);
                return true;
            }
            // Evict a batch beyond the need, so that not every fill evicts.
            let need = used + bytes - room + self.limit / 16;
            if self.evict_locked(need) > 0 {
                continue;
            }
            if self.min_idle.is_zero() || started.elapsed() >= ADMIT_PATIENCE {
                self.stats.no_room.fetch_add(1, Ordering::Relaxed);
                debug!(
                    bytes,
                    used,
                    limit = self.limit,
                    "no room in the cache budget"
                );
                return false;
            }
            // Windows in use a moment ago become evictable soon.
            std::thread::sleep(self.min_idle / 4);
        }
    }

    /// Returns a reservation made by [`reserve`](Self::reserve).
    pub(crate) fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.reserved.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Frees at least `bytes` if it can (a full disk: see
    /// [`CacheFile::fill`]). Returns the bytes freed.
    pub fn evict(&self, bytes: u64) -> u64 {
        let _admit = lock(&self.admit);
        let started = std::time::Instant::now();
        loop {
            let freed = self.evict_locked(bytes);
            // Under a `min_idle`, windows filled a moment ago become
            // evictable shortly: wait for them rather than fail the read.
            if freed > 0
                || self.min_idle.is_zero()
                || started.elapsed() >= ADMIT_PATIENCE
                || self.used() == 0
            {
                return freed;
            }
            std::thread::sleep(self.min_idle / 4);
        }
    }

    fn evict_locked(&self, need: u64) -> u64 {
        let mut freed = self.remove_orphans(need);
        if freed >= need {
            return freed;
        }
        let files = self.live_files();
        let used_before = now_nanos().saturating_sub(self.min_idle.as_nanos() as u64);
        let mut candidates: Vec<(u64, usize, u64)> = Vec::new();
        for (k, f) in files.iter().enumerate() {
            for (used, window) in f.map().evictable(used_before) {
                candidates.push((used, k, window));
            }
        }
        candidates.sort_unstable();
        let mut chosen: HashMap<usize, Vec<u64>> = HashMap::new();
        let mut planned = 0;
        for (_, k, window) in candidates {
            if freed + planned >= need {
                break;
            }
            let f = &files[k];
            planned += f.map().bytes_of(&[window], f.size());
            chosen.entry(k).or_default().push(window);
        }
        for (k, mut windows) in chosen {
            windows.sort_unstable();
            let f = &files[k];
            let (n, bytes) = f.evict_windows(&windows);
            self.stats.evicted_windows.fetch_add(n, Ordering::Relaxed);
            self.stats.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
            freed += bytes;
        }
        if freed > 0 {
            debug!(freed, need, "evicted from the cache");
        }
        freed
    }

    /// Removes whole orphan cache files, oldest first, until `need` bytes
    /// are freed.
    fn remove_orphans(&self, need: u64) -> u64 {
        let mut orphans = lock(&self.orphans);
        orphans.sort_by_key(|o| o.age);
        let mut freed = 0;
        while freed < need && !orphans.is_empty() {
            let o = orphans.remove(0);
            // The map first: a crash between the two leaves a data file
            // nothing vouches for (started over), never a map without bytes.
            let removed = remove_if_there(&o.map).and_then(|()| remove_if_there(&o.data));
            match removed {
                Ok(()) => {
                    info!(cache = %o.data.display(), bytes = o.bytes, "removed the cache of a blob no registered image uses (cache limit)");
                    self.stats.removed_blobs.fetch_add(1, Ordering::Relaxed);
                    freed += o.bytes;
                }
                Err(e) => {
                    warn!(cache = %o.data.display(), "cannot remove an unused cache file: {e}")
                }
            }
        }
        freed
    }
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its data consistent between statements.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parses a `cache_limit`: `unlimited`, a size (`10GiB`, `500MB`, `1073741824`)
/// or a percentage of the cache file system's size (`20%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLimit {
    Unlimited,
    Bytes(u64),
    /// Percent of the file system holding the cache.
    Percent(u8),
}

impl std::str::FromStr for CacheLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("none") {
            return Ok(CacheLimit::Unlimited);
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| {
                format!("cache limit {s:?}: a percentage is a whole number from 1 to 100")
            })?;
            if !(1..=100).contains(&p) {
                return Err(format!("cache limit {s:?}: a percentage is from 1 to 100"));
            }
            return Ok(CacheLimit::Percent(p));
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("cache limit {s:?}: expected `unlimited`, a size such as `10GiB` or a percentage such as `20%`")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "kB" | "KB" => 1000,
            "MB" => 1000 * 1000,
            "GB" => 1000 * 1000 * 1000,
            "TB" => 1000 * 1000 * 1000 * 1000,
            other => {
                return Err(format!(
                "cache limit {s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
            ))
            }
        };
        let bytes = n
            .checked_mul(mult)
            .ok_or_else(|| format!("cache limit {s:?} is too large"))?;
        if bytes == 0 {
            return Err(format!(
                "cache limit {s:?}: zero leaves no room for any read; say `unlimited` for no limit"
            ));
        }
        Ok(CacheLimit::Bytes(bytes))
    }
}

impl std::fmt::Display for CacheLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheLimit::Unlimited => f.write_str("unlimited"),
            CacheLimit::Bytes(b) => write!(f, "{b}"),
            CacheLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl CacheLimit {
    /// The limit in bytes for a cache in `dir` (whose file system's size a
    /// percentage is of); `None` when unlimited.
    pub fn resolve(&self, dir: &Path) -> io::Result<Option<u64>> {
        match *self {
            CacheLimit::Unlimited => Ok(None),
            CacheLimit::Bytes(b) => Ok(Some(b)),
            CacheLimit::Percent(p) => {
                let st = rustix::fs::statvfs(dir).map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("the size of the file system of {}: {e}", dir.display()),
                    )
                })?;
                let total = st.f_blocks.saturating_mul(st.f_frsize);
                Ok(Some((total / 100).saturating_mul(p as u64).max(1)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_limits_parse_sizes_percentages_and_unlimited() {
        let ok = |s: &str| s.parse::<CacheLimit>().unwrap();
        assert_eq!(ok("unlimited"), CacheLimit::Unlimited);
        assert_eq!(ok("20%"), CacheLimit::Percent(20));
        assert_eq!(ok("10GiB"), CacheLimit::Bytes(10 << 30));
        assert_eq!(ok("500MB"), CacheLimit::Bytes(500_000_000));
        assert_eq!(ok("4096"), CacheLimit::Bytes(4096));
        for bad in ["0", "0%", "101%", "10 parsecs", "-5", "", "%"] {
            let e = bad.parse::<CacheLimit>().unwrap_err();
            assert!(e.contains("cache limit"), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let b = CacheLimit::Percent(50)
            .resolve(dir.path())
            .unwrap()
            .unwrap();
        assert!(b > 0);
        assert_eq!(CacheLimit::Unlimited.resolve(dir.path()).unwrap(), None);
    }
}
