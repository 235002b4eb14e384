//! The daemon's own cache of blob bytes, for transports whose kernel side keeps
//! no cache of its own (FUSE): per blob, a sparse data file the size of the blob
//! and a fill map recording which windows of it hold verified blob bytes.
//!
//! The map is persisted next to the data (`<name>.map`), so a restarted daemon
//! serves what an earlier one fetched without fetching it again. Persisting
//! follows one rule: the map on disk never claims a window whose bytes are not
//! on disk. [`CacheFile::flush`] snapshots the map, syncs the data file, and only
//! then replaces the map file (write to a temporary name, rename). A crash loses
//! at most the windows filled since the last flush; they are fetched again.
//!
//! Map file layout (little-endian): `b"LPFMAP"` and the format version as two
//! ASCII digits ([`MAP_VERSION`]: `02`), u64 blob size, u64 window, u32 CRC32C
//! of the bitmap bytes, u32 reserved, the 32-byte *binding* (see below), then
//! the bitmap as u64 words. A map of
//! another format version (older or newer), or that does not match the blob's
//! size or the window, or fails its checksum, is discarded and the cache starts
//! over in a new data file (the old one is never truncated: a live mount may
//! read it, see `start_over`): nothing is trusted that this code did not write
//! for this blob.
//!
//! The binding (version 2 on) is what the cache was filled under: the sha256
//! of the blob's chunk table, whose unit digests verified every byte written
//! (all zero for a source without one). Blob names are shared by every image
//! that declares them, and two images can declare the same name with different
//! tables (one of them lying): a cache filled under another table than the one
//! it is opened with is discarded like any other map it cannot vouch for, so
//! bytes verified against one image's table are never served to another's.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lazypull_source::{BlobSource, Priority};
use tracing::{debug, warn};

use crate::budget::CacheBudget;
use crate::{fill, AlignedBuf, CacheSink, FillError, FillMap, FillOutcome, FillPolicy, Target};

/// A map file starts with this, then [`MAP_VERSION`] as two ASCII digits.
const MAGIC_PREFIX: &[u8; 6] = b"LPFMAP";
/// The map format this code reads and writes. Whoever changes the layout bumps
/// it: a map of any other version is discarded, never read as this one.
const MAP_VERSION: u8 = 2;
/// Fixed header fields, then the 32-byte binding, then the bitmap.
const MAP_HEADER: usize = 32;
const MAP_BINDING: usize = 32;
/// The binding of a source without a chunk table.
pub const NO_BINDING: [u8; 32] = [0; 32];

/// One blob's cache: its data file and fill map.
#[derive(Debug)]
pub struct CacheFile {
    name: String,
    size: u64,
    policy: FillPolicy,
    /// The chunk table digest this cache is filled under (see the module doc).
    binding: [u8; 32],
    data: File,
    data_path: PathBuf,
    map_path: PathBuf,
    map: FillMap,
    dirty: AtomicBool,
    /// Held while the map is written: a save and an eviction never
    /// interleave (see [`evict_windows`](Self::evict_windows)).
    map_io: Mutex<()>,
    /// The budget this cache is held to, if any (see [`crate::budget`]).
    budget: Option<Arc<CacheBudget>>,
}

/// Windows of a cache a reader is reading: none of them is evicted until
/// this drops (see [`CacheFile::fill_pinned`]).
#[must_use]
pub struct Pinned<'a> {
    map: &'a FillMap,
    windows: Option<(u64, u64)>,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        if let Some((first, last)) = self.windows {
            self.map.unpin(first, last);
        }
    }
}

impl Drop for CacheFile {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.closed(&self.data_path, &self.map_path, self.cached_bytes());
        }
    }
}

impl CacheSink for File {
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }
}

/// Why a cached read failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheReadError {
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error("reading {len} bytes at {off} from the cache file {path}: {source}")]
    Read {
        path: PathBuf,
        off: u64,
        len: usize,
        source: io::Error,
    },
}

impl CacheFile {
    /// Opens (or creates) the cache of blob `name` of `size` bytes in `dir`,
    /// for a source without a chunk table ([`NO_BINDING`]).
    pub fn open(dir: &Path, name: &str, size: u64, policy: FillPolicy) -> io::Result<CacheFile> {
        Self::open_bound(dir, name, size, policy, NO_BINDING)
    }

    /// [`open`](Self::open) for a blob whose bytes are verified against the
    /// chunk table of sha256 `binding`: a cache filled under another table is
    /// discarded (see the module doc).
    pub fn open_bound(
        dir: &Path,
        name: &str,
        size: u64,
        policy: FillPolicy,
        binding: [u8; 32],
    ) -> io::Result<CacheFile> {
        policy
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // Blob bytes (also of files an image keeps from other users): root only.
        crate::private_dir(dir)?;
        let data_path = dir.join(format!("{name}.data"));
        let map_path = dir.join(format!("{name}.map"));
        let loaded = load_map(name, &map_path, size, policy.window, &binding);
        let kept = match loaded {
            Some(words) => match OpenOptions::new().read(true).write(true).open(&data_path) {
                Ok(data) if data.metadata()?.len() == size => Some((data, words)),
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("opening the cache file {}: {e}", data_path.display()),
                    ))
                }
            },
            None => None,
        };
        let (data, map) = match kept {
            Some((data, words)) => (data, FillMap::from_words(size, policy.window, words)),
            None => (
                start_over(&data_path, &map_path, size)?,
                FillMap::new(size, policy.window),
            ),
        };
        debug!(
            blob = name,
            windows_filled = map.filled_windows(),
            "cache file opened"
        );
        Ok(CacheFile {
            name: name.to_owned(),
            size,
            policy,
            binding,
            data,
            data_path,
            map_path,
            map,
            dirty: AtomicBool::new(false),
            map_io: Mutex::new(()),
            budget: None,
        })
    }

    /// The cache of blob `name` on `data`, a file opened earlier (by a
    /// predecessor, before a fanotify mark made new opens of it raise
    /// events): the same inode stays the cache, whatever its map says. The
    /// map in `dir` is used if it is trusted; otherwise the cache starts
    /// empty *in place* — its bytes are refilled as they are asked for —
    /// and is never replaced by a new file, since a mount may be reading
    /// this one.
    pub fn adopt_file(
        dir: &Path,
        name: &str,
        size: u64,
        policy: FillPolicy,
        binding: [u8; 32],
        data: File,
    ) -> io::Result<CacheFile> {
        policy
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let data_path = dir.join(format!("{name}.data"));
        let map_path = dir.join(format!("{name}.map"));
        let len = data.metadata()?.len();
        if len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the cache file of blob {name} handed over is {len} bytes, the blob {size}"
                ),
            ));
        }
        let map = match load_map(name, &map_path, size, policy.window, &binding) {
            Some(words) => FillMap::from_words(size, policy.window, words),
            None => FillMap::new(size, policy.window),
        };
        debug!(
            blob = name,
            windows_filled = map.filled_windows(),
            "cache file adopted"
        );
        Ok(CacheFile {
            name: name.to_owned(),
            size,
            policy,
            binding,
            data,
            data_path,
            map_path,
            map,
            dirty: AtomicBool::new(false),
            map_io: Mutex::new(()),
            budget: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The data file: once [`is_complete`](Self::is_complete), a plain copy of the blob.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    pub fn data_file(&self) -> &File {
        &self.data
    }

    pub fn map(&self) -> &FillMap {
        &self.map
    }

    /// Whether every window holds blob bytes.
    pub fn is_complete(&self) -> bool {
        self.map.filled_windows() == self.size.div_ceil(self.policy.window)
    }

    /// Bytes of the blob held in the cache.
    pub fn cached_bytes(&self) -> u64 {
        self.map.filled_bytes(self.size)
    }

    /// Whether every window of `[off, off + len)` is filled.
    pub fn covers(&self, off: u64, len: u64) -> bool {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return true;
        }
        let w = self.policy.window;
        (off / w..=(end - 1) / w).all(|i| self.map.is_filled(i))
    }

    /// Fills the missing windows of `[off, off + len)` from `source`.
    ///
    /// Under a budget, room for them is reserved first (evicting the least
    /// recently used windows of any cache of the budget); with no room to
    /// be had this fails with [`FillError::NoRoom`] and writes nothing. A
    /// full file system (ENOSPC, EDQUOT) under a budget evicts a batch and
    /// tries once more.
    pub fn fill(
        &self,
        source: &dyn BlobSource,
        off: u64,
        len: u64,
        priority: Priority,
    ) -> Result<FillOutcome, FillError> {
        match self.fill_once(source, off, len, priority) {
            Err(FillError::Write { source: e, .. })
                if is_disk_full(&e)
                    && self
                        .budget
                        .as_ref()
                        .is_some_and(|b| b.evict(len.max(self.policy.window) * 8) > 0) =>
            {
                self.fill_once(source, off, len, priority)
            }
            other => other,
        }
    }

    fn fill_once(
        &self,
        source: &dyn BlobSource,
        off: u64,
        len: u64,
        priority: Priority,
    ) -> Result<FillOutcome, FillError> {
        if self.covers(off, len) {
            return Ok(FillOutcome::default());
        }
        let reserved = self.reserve(off, len)?;
        let mut buf = AlignedBuf::new(self.policy.buffer_size_for(source));
        let target = Target {
            source,
            object_size: self.size,
            map: &self.map,
            sink: &self.data,
            priority,
        };
        let before = self.map.filled_windows();
        let out = fill(&target, off, len, &self.policy, &mut buf);
        // A fill that failed part-way may still have completed some windows.
        if self.map.filled_windows() != before {
            self.dirty.store(true, Ordering::Release);
        }
        // What was written is counted as filled from now on.
        if let Some(b) = &self.budget {
            b.release(reserved);
        }
        out
    }

    /// Reserves room in the budget (if any) for every window of
    /// `[off, off + len)`; returns the bytes reserved.
    ///
    /// Every window, not only those missing now: a window another filler
    /// holds may be given up and written by this fill, and one filled now
    /// may be evicted (by another fill's admission) before this fill claims
    /// it. Counting only the missing ones let a window be written that no
    /// reservation covered (the cache went one window over its limit under
    /// concurrent readers and read-ahead). The reservation lasts only as
    /// long as the fill.
    fn reserve(&self, off: u64, len: u64) -> Result<u64, FillError> {
        let Some(budget) = &self.budget else {
            return Ok(0);
        };
        let needed = self.map.range_bytes(off, len, self.size);
        if budget.reserve(needed) {
            Ok(needed)
        } else {
            Err(FillError::NoRoom {
                blob: self.name.clone(),
                needed,
                limit: budget.limit(),
            })
        }
    }

    /// [`fill`](Self::fill)s `[off, off + len)` and pins its windows: they
    /// stay in the cache file until the returned guard drops, for the
    /// caller to read them from [`data_file`](Self::data_file).
    pub fn fill_pinned(
        &self,
        source: &dyn BlobSource,
        off: u64,
        len: u64,
        priority: Priority,
    ) -> Result<(FillOutcome, Pinned<'_>), FillError> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Ok((
                FillOutcome::default(),
                Pinned {
                    map: &self.map,
                    windows: None,
                },
            ));
        }
        let (first, last) = (off / self.policy.window, (end - 1) / self.policy.window);
        let mut total = FillOutcome::default();
        // A window evicted between its fill and the pin is filled again; a
        // budget so small that this keeps happening is out of room.
        for _ in 0..8 {
            let out = self.fill(source, off, len, priority)?;
            total.bytes_written += out.bytes_written;
            total.windows_written += out.windows_written;
            total.windows_overlapped += out.windows_overlapped;
            if self.map.pin_filled(first, last) {
                return Ok((
                    total,
                    Pinned {
                        map: &self.map,
                        windows: Some((first, last)),
                    },
                ));
            }
        }
        Err(FillError::NoRoom {
            blob: self.name.clone(),
            needed: len,
            limit: self.budget.as_ref().map_or(0, |b| b.limit()),
        })
    }

    /// Fills, ahead of need and at background priority, the windows of
    /// `[off, off + len)` that are neither filled nor being filled (see
    /// [`fill_ahead`](crate::fill_ahead)); `cancelled` is checked between
    /// windows.
    pub fn fill_ahead(
        &self,
        source: &dyn BlobSource,
        off: u64,
        len: u64,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<FillOutcome, FillError> {
        // Read-ahead that finds no room is skipped: a reader's miss fills
        // (and evicts for) what it needs.
        let Ok(reserved) = self.reserve(off, len) else {
            return Ok(FillOutcome::default());
        };
        let mut buf = AlignedBuf::new(self.policy.buffer_size_for(source));
        let target = Target {
            source,
            object_size: self.size,
            map: &self.map,
            sink: &self.data,
            priority: Priority::Background,
        };
        let before = self.map.filled_windows();
        let out = crate::fill_ahead(&target, off, len, &self.policy, &mut buf, cancelled);
        if self.map.filled_windows() != before {
            self.dirty.store(true, Ordering::Release);
        }
        if let Some(b) = &self.budget {
            b.release(reserved);
        }
        out
    }

    /// A reader read `[off, off + len)`: returns the bytes of windows filled
    /// by read-ahead that this is the first read of (see [`FillMap::touch`]).
    pub fn touch(&self, off: u64, len: u64) -> u64 {
        self.map.touch(off, len, self.size)
    }

    pub fn policy(&self) -> &FillPolicy {
        &self.policy
    }

    /// A read someone waits on of `[off, off + len)`, followed on `stream`:
    /// what of this blob to fill ahead of the reader now, at most
    /// `readahead` bytes ahead (none when it is all cached already), and
    /// the bytes of earlier read-ahead this read is the first to use. A
    /// read that neither missed nor used read-ahead is followed (for
    /// sequential detection) and asks for nothing more.
    pub fn read_ahead_for(
        &self,
        stream: &crate::Stream,
        off: u64,
        len: u64,
        readahead: u64,
    ) -> (Option<crate::Ahead>, u64) {
        let missed = !self.covers(off, len);
        let used = self.touch(off, len);
        let distance = if missed || used > 0 { readahead } else { 0 };
        let ahead = stream
            .observe(off, len, self.size, self.policy.window, distance)
            .filter(|a| !self.covers(a.off, a.len));
        (ahead, used)
    }

    /// Reads `out.len()` bytes at `off` (within the blob), filling what is
    /// missing from `source` first. Never returns fewer bytes than asked: a
    /// short read would reach the reader as zeros.
    pub fn read(
        &self,
        source: &dyn BlobSource,
        off: u64,
        out: &mut [u8],
        priority: Priority,
    ) -> Result<FillOutcome, CacheReadError> {
        let (outcome, _pinned) = self.fill_pinned(source, off, out.len() as u64, priority)?;
        self.data
            .read_exact_at(out, off)
            .map_err(|e| CacheReadError::Read {
                path: self.data_path.clone(),
                off,
                len: out.len(),
                source: e,
            })?;
        Ok(outcome)
    }

    /// Persists the fill map if windows were filled since the last flush.
    pub fn flush(&self) -> io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let result = self.save_map();
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }

    /// Writes the map as it is now (durably: data synced first, then the map
    /// replaced by a rename). One save at a time (`map_io`), so an older
    /// snapshot never lands after a newer one.
    fn save_map(&self) -> io::Result<()> {
        let _io = self.map_io.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| {
            let words = self.map.words();
            self.data.sync_data()?;
            let tmp = self.map_path.with_extension("map.tmp");
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&encode_map(
                self.size,
                self.policy.window,
                &self.binding,
                &words,
            ))?;
            f.sync_data()?;
            std::fs::rename(&tmp, &self.map_path)?;
            sync_dir(&self.map_path)
        })();
        result.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("saving the cache map {}: {e}", self.map_path.display()),
            )
        })
    }

    /// Removes the saved map (durably), so the disk claims none of this
    /// cache's windows until the next save.
    fn forget_saved_map(&self) -> io::Result<()> {
        let _io = self.map_io.lock().unwrap_or_else(|p| p.into_inner());
        match std::fs::remove_file(&self.map_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = std::fs::remove_file(self.map_path.with_extension("map.tmp"));
        sync_dir(&self.map_path)
    }

    /// [`open_bound`](Self::open_bound), under `budget` if there is one
    /// (see [`CacheBudget::open`]).
    pub fn open_under(
        budget: Option<&Arc<CacheBudget>>,
        dir: &Path,
        name: &str,
        size: u64,
        policy: FillPolicy,
        binding: [u8; 32],
    ) -> io::Result<Arc<CacheFile>> {
        match budget {
            Some(b) => b.open(dir, name, size, policy, binding),
            None => Self::open_bound(dir, name, size, policy, binding).map(Arc::new),
        }
    }

    /// [`adopt_file`](Self::adopt_file), under `budget` if there is one
    /// (see [`CacheBudget::adopt`]).
    pub fn adopt_under(
        budget: Option<&Arc<CacheBudget>>,
        dir: &Path,
        name: &str,
        size: u64,
        policy: FillPolicy,
        binding: [u8; 32],
        data: File,
    ) -> io::Result<Arc<CacheFile>> {
        match budget {
            Some(b) => b.adopt(dir, name, size, policy, binding, data),
            None => Self::adopt_file(dir, name, size, policy, binding, data).map(Arc::new),
        }
    }

    /// Puts this cache under `budget` (see [`CacheBudget::open`]).
    pub(crate) fn set_budget(&mut self, budget: Arc<CacheBudget>) {
        self.budget = Some(budget);
    }

    /// Whether this cache is held to a budget.
    pub fn is_budgeted(&self) -> bool {
        self.budget.is_some()
    }

    /// Evicts `windows` (sorted) that are still evictable: marks them
    /// missing, saves the map that says so, then punches their bytes out of
    /// the data file. Returns the windows and bytes evicted. A map that
    /// cannot be saved evicts nothing (the windows stay filled: their bytes
    /// are untouched).
    pub fn evict_windows(&self, windows: &[u64]) -> (u64, u64) {
        let taken = self.map.take_for_eviction(windows);
        if taken.is_empty() {
            return (0, 0);
        }
        // Missing on disk before the bytes go: a crash after the punch
        // leaves a map that does not claim them.
        if let Err(e) = self.save_map() {
            // A full disk has no room for a new map (eviction is what makes
            // room): removing the saved one frees space and claims nothing,
            // at the cost of the whole map if the daemon dies before its
            // next save.
            let forgotten = is_disk_full(&e) && self.forget_saved_map().is_ok();
            if !forgotten {
                warn!(blob = %self.name, "not evicting from the cache: {e}");
                self.map.untake(&taken);
                return (0, 0);
            }
            self.dirty.store(true, Ordering::Release);
        }
        let w = self.policy.window;
        let mut k = 0;
        while k < taken.len() {
            let mut end = k + 1;
            while end < taken.len() && taken[end] == taken[end - 1] + 1 {
                end += 1;
            }
            let start = taken[k] * w;
            let stop = ((taken[end - 1] + 1) * w).min(self.size);
            if let Err(e) = rustix::fs::fallocate(
                &self.data,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                start,
                stop - start,
            ) {
                // Marked missing all the same: refilled when read.
                warn!(blob = %self.name, start, len = stop - start, "punching evicted windows out of the cache file: {e}");
            }
            k = end;
        }
        for &i in &taken {
            self.map.finish(i, false, false);
        }
        let bytes = self.map.bytes_of(&taken, self.size);
        debug!(blob = %self.name, windows = taken.len(), bytes, "evicted");
        (taken.len() as u64, bytes)
    }
}

/// Whether a write failed because the file system is full (ENOSPC, EDQUOT).
pub fn is_disk_full(e: &io::Error) -> bool {
    // By kind too: an error given context (`io::Error::new(e.kind(), ..)`)
    // keeps its kind but not its errno.
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT)
    ) || matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// The fill map saved at `map_path`, if it is there and trusted.
fn load_map(
    name: &str,
    map_path: &Path,
    size: u64,
    window: u64,
    binding: &[u8; 32],
) -> Option<Vec<u64>> {
    match std::fs::read(map_path) {
        Ok(bytes) => match decode_map(&bytes, size, window, binding) {
            Ok(words) => Some(words),
            Err(why) => {
                warn!(blob = name, map = %map_path.display(), "discarding the cache map: {why}");
                None
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(blob = name, map = %map_path.display(), error = %e, "cannot read the cache map; starting empty");
            None
        }
    }
}

/// Starts the cache of a blob over: nothing of the old data file is vouched
/// for. The old file is never truncated nor written: a complete data file is
/// what EROFS mounts directly (no daemon on its read path), so a live mount
/// may be reading it, and zeroing it would hand that mount zeros where it
/// expects the blob (EROFS does not detect that). Instead:
/// 1. the map goes first, durably (removal, then a directory fsync), so no
///    crash can leave a map vouching for the new, empty file;
/// 2. a fresh sparse file of `size` bytes replaces the data file by a rename:
///    a new inode under the old name; open fds (the mount's) keep the old
///    inode and its complete bytes until they close;
/// 3. the directory is fsynced again, so the rename is durable.
fn start_over(data_path: &Path, map_path: &Path, size: u64) -> io::Result<File> {
    let context = |what: &str, path: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    match std::fs::remove_file(map_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context("removing the stale cache map", map_path, e)),
    }
    sync_dir(map_path)?;
    let tmp = data_path.with_extension("data.tmp");
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| context("creating the cache file", &tmp, e))?;
    data.set_len(size)
        .map_err(|e| context("sizing the cache file", &tmp, e))?;
    std::fs::rename(&tmp, data_path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        context("replacing the cache file", data_path, e)
    })?;
    sync_dir(data_path)?;
    Ok(data)
}

/// Fsyncs the directory holding `path`: makes a rename or removal there durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("syncing {}: {e}", dir.display())))
}

fn encode_map(size: u64, window: u64, binding: &[u8; 32], words: &[u64]) -> Vec<u8> {
    let mut bits = Vec::with_capacity(words.len() * 8);
    for w in words {
        bits.extend_from_slice(&w.to_le_bytes());
    }
    let mut out = Vec::with_capacity(MAP_HEADER + MAP_BINDING + bits.len());
    out.extend_from_slice(MAGIC_PREFIX);
    out.extend_from_slice(format!("{MAP_VERSION:02}").as_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&window.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&bits).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(binding);
    out.extend_from_slice(&bits);
    out
}

fn decode_map(
    bytes: &[u8],
    size: u64,
    window: u64,
    binding: &[u8; 32],
) -> Result<Vec<u64>, String> {
    if bytes.len() < 8 || &bytes[..6] != MAGIC_PREFIX {
        return Err("not a lazypull cache map".into());
    }
    let version = std::str::from_utf8(&bytes[6..8])
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .ok_or("not a lazypull cache map (no format version)")?;
    if version != MAP_VERSION {
        return Err(format!(
            "it is in cache map format version {version}; this daemon reads version {MAP_VERSION} only"
        ));
    }
    if bytes.len() < MAP_HEADER + MAP_BINDING {
        return Err("truncated cache map header".into());
    }
    let field = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (got_size, got_window) = (field(8), field(16));
    if got_size != size || got_window != window {
        return Err(format!(
            "it is for a blob of {got_size} bytes in {got_window}-byte windows, not {size} in {window}"
        ));
    }
    let filled_under = &bytes[MAP_HEADER..MAP_HEADER + MAP_BINDING];
    if filled_under != binding {
        return Err(format!(
            "it was filled under chunk table sha256:{}, this blob is served under sha256:{}",
            hex::encode(filled_under),
            hex::encode(binding)
        ));
    }
    let bits = &bytes[MAP_HEADER + MAP_BINDING..];
    let want = size.div_ceil(window).div_ceil(64) as usize * 8;
    if bits.len() != want {
        return Err(format!("bitmap of {} bytes, expected {want}", bits.len()));
    }
    let crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    if crc32c::crc32c(bits) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(bits
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[derive(Debug)]
    struct Counted {
        data: Vec<u8>,
        reads: AtomicU64,
    }
    impl BlobSource for Counted {
        fn name(&self) -> &str {
            "b"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let off = off as usize;
            let n = buf.len().min(self.data.len().saturating_sub(off));
            buf[..n].copy_from_slice(&self.data[off..off + n]);
            Ok(n)
        }
    }

    fn blob(n: usize) -> Counted {
        Counted {
            data: (0..n).map(|i| (i * 13 % 251) as u8).collect(),
            reads: AtomicU64::new(0),
        }
    }

    const POLICY: FillPolicy = FillPolicy {
        window: 16384,
        io_size: 8192,
    };

    #[test]
    fn reads_fill_once_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let src = blob(100_000);
        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        let mut out = vec![0u8; 5000];
        c.read(&src, 20_000, &mut out, Priority::Foreground)
            .unwrap();
        assert_eq!(out, src.data[20_000..25_000]);
        let reads = src.reads.load(Ordering::Relaxed);
        assert!(reads > 0);
        c.read(&src, 17_000, &mut out, Priority::Foreground)
            .unwrap();
        assert_eq!(
            src.reads.load(Ordering::Relaxed),
            reads,
            "same window: no fetch"
        );
        assert_eq!(c.cached_bytes(), 16384);
        c.flush().unwrap();
        drop(c);

        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        assert!(c.covers(16384, 16384) && !c.covers(0, 1));
        c.read(&src, 16384, &mut out, Priority::Foreground).unwrap();
        assert_eq!(out, src.data[16384..16384 + 5000]);
        assert_eq!(
            src.reads.load(Ordering::Relaxed),
            reads,
            "restored from the map"
        );
        // The tail window ends unaligned at the blob's end.
        let mut tail = vec![0u8; 100];
        c.read(&src, 99_900, &mut tail, Priority::Foreground)
            .unwrap();
        assert_eq!(tail, src.data[99_900..]);
        c.fill(&src, 0, src.size(), Priority::Background).unwrap();
        assert!(c.is_complete());
        assert_eq!(std::fs::read(c.data_path()).unwrap(), src.data);
    }

    #[test]
    fn unflushed_fills_are_forgotten_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let src = blob(50_000);
        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        let mut out = vec![0u8; 10];
        c.read(&src, 0, &mut out, Priority::Foreground).unwrap();
        drop(c); // no flush: as after kill -9 before the flusher ran
        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        assert_eq!(c.map().filled_windows(), 0);
    }

    #[test]
    fn a_map_for_another_blob_or_a_corrupt_map_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let src = blob(50_000);
        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        c.fill(&src, 0, 50_000, Priority::Foreground).unwrap();
        c.flush().unwrap();
        drop(c);
        // Same name, another size: nothing kept, the data file emptied.
        let c = CacheFile::open(dir.path(), "b", 40_000, POLICY).unwrap();
        assert_eq!(c.map().filled_windows(), 0);
        assert_eq!(std::fs::read(c.data_path()).unwrap(), vec![0u8; 40_000]);
        c.fill(&src, 0, 40_000, Priority::Foreground).unwrap();
        c.flush().unwrap();
        drop(c);
        let map = dir.path().join("b.map");
        let mut bytes = std::fs::read(&map).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&map, bytes).unwrap();
        let c = CacheFile::open(dir.path(), "b", 40_000, POLICY).unwrap();
        assert_eq!(c.map().filled_windows(), 0, "checksum caught the flip");
    }

    #[test]
    fn an_adopted_file_stays_the_cache_whatever_its_map_says() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let src = blob(50_000);
        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        c.fill(&src, 0, 20_000, Priority::Foreground).unwrap();
        c.flush().unwrap();
        let inode = c.data_file().metadata().unwrap().ino();
        let handed = c.data_file().try_clone().unwrap();
        drop(c);
        // A trusted map: what it vouches for is kept.
        let c =
            CacheFile::adopt_file(dir.path(), "b", src.size(), POLICY, NO_BINDING, handed).unwrap();
        assert!(c.covers(0, 16_384));
        let handed = c.data_file().try_clone().unwrap();
        drop(c);
        // No map (a daemon killed before it saved one): empty, same inode.
        std::fs::remove_file(dir.path().join("b.map")).unwrap();
        let c =
            CacheFile::adopt_file(dir.path(), "b", src.size(), POLICY, NO_BINDING, handed).unwrap();
        assert_eq!(c.map().filled_windows(), 0);
        assert_eq!(
            c.data_file().metadata().unwrap().ino(),
            inode,
            "never a new file"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("b.data")).unwrap().ino(),
            inode,
            "the path still names it"
        );
        let mut out = vec![0u8; 100];
        c.read(&src, 30_000, &mut out, Priority::Foreground)
            .unwrap();
        assert_eq!(out, src.data[30_000..30_100]);
        // A file of another size is refused, not adopted.
        let short = tempfile::tempfile().unwrap();
        short.set_len(10).unwrap();
        assert!(
            CacheFile::adopt_file(dir.path(), "b", src.size(), POLICY, NO_BINDING, short).is_err()
        );
    }

    #[test]
    fn a_discarded_map_never_changes_the_bytes_a_mount_reads() {
        let dir = tempfile::tempdir().unwrap();
        let src = blob(50_000);
        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        c.fill(&src, 0, src.size(), Priority::Foreground).unwrap();
        assert!(c.is_complete());
        c.flush().unwrap();
        drop(c);
        // A complete data file is what EROFS mounts directly: the mount holds
        // it open.
        let mounted = File::open(dir.path().join("b.data")).unwrap();
        // A restart with another fill window rejects the map.
        let other = FillPolicy {
            window: 32768,
            io_size: 8192,
        };
        let c = CacheFile::open(dir.path(), "b", src.size(), other).unwrap();
        assert_eq!(c.map().filled_windows(), 0);
        assert!(!dir.path().join("b.map").exists(), "the map is gone");
        assert_eq!(
            std::fs::read(c.data_path()).unwrap(),
            vec![0u8; 50_000],
            "the cache starts over in a new file"
        );
        let mut seen = vec![0u8; 50_000];
        mounted.read_exact_at(&mut seen, 0).unwrap();
        assert!(
            seen == src.data,
            "the live mount still reads the blob's bytes"
        );
        let mut out = vec![0u8; 100];
        c.read(&src, 40_000, &mut out, Priority::Foreground)
            .unwrap();
        assert_eq!(out, src.data[40_000..40_100]);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["b.data"], "no temporary left");
    }

    #[test]
    fn a_map_of_another_format_version_is_discarded_by_name() {
        let size = 50_000;
        let words = vec![u64::MAX];
        let good = encode_map(size, POLICY.window, &NO_BINDING, &words);
        assert_eq!(
            decode_map(&good, size, POLICY.window, &NO_BINDING).unwrap(),
            words
        );
        // 01: the map before it recorded its binding.
        for version in [b"00", b"01", b"03", b"99"] {
            let mut other = good.clone();
            other[6..8].copy_from_slice(version);
            let why = decode_map(&other, size, POLICY.window, &NO_BINDING).unwrap_err();
            let v = std::str::from_utf8(version).unwrap().parse::<u8>().unwrap();
            assert!(why.contains(&format!("format version {v};")), "{why}");
        }
        // And opening a cache whose map is of an older version starts over.
        let dir = tempfile::tempdir().unwrap();
        let src = blob(size as usize);
        let c = CacheFile::open(dir.path(), "b", size, POLICY).unwrap();
        c.fill(&src, 0, size, Priority::Foreground).unwrap();
        c.flush().unwrap();
        drop(c);
        let map = dir.path().join("b.map");
        let mut old = std::fs::read(&map).unwrap();
        old[6..8].copy_from_slice(b"00");
        std::fs::write(&map, old).unwrap();
        let c = CacheFile::open(dir.path(), "b", size, POLICY).unwrap();
        assert_eq!(c.map().filled_windows(), 0, "an old map is not trusted");
    }

    #[test]
    fn a_cache_filled_under_another_chunk_table_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let src = blob(50_000);
        let trusted = [0x11; 32];
        let c = CacheFile::open_bound(dir.path(), "b", src.size(), POLICY, trusted).unwrap();
        c.fill(&src, 0, src.size(), Priority::Foreground).unwrap();
        c.flush().unwrap();
        drop(c);
        // The same name and size under the same table: kept.
        let c = CacheFile::open_bound(dir.path(), "b", src.size(), POLICY, trusted).unwrap();
        assert!(c.is_complete());
        drop(c);
        // Under another table (another image declaring the same name): none
        // of it is served.
        let c = CacheFile::open_bound(dir.path(), "b", src.size(), POLICY, [0x22; 32]).unwrap();
        assert_eq!(c.map().filled_windows(), 0);
        assert_eq!(std::fs::read(c.data_path()).unwrap(), vec![0u8; 50_000]);
        drop(c);
        // Nor to a source without a table.
        let c = CacheFile::open_bound(dir.path(), "b", src.size(), POLICY, [0x22; 32]).unwrap();
        c.fill(&src, 0, src.size(), Priority::Foreground).unwrap();
        c.flush().unwrap();
        drop(c);
        let c = CacheFile::open(dir.path(), "b", src.size(), POLICY).unwrap();
        assert_eq!(c.map().filled_windows(), 0);
    }

    #[test]
    fn a_failed_fill_writes_no_window_and_reads_fail() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = blob(40_000);
        let c = CacheFile::open(dir.path(), "b", 40_000, POLICY).unwrap();
        src.data.truncate(20_000); // the source lost its tail
        let mut out = vec![0u8; 100];
        assert!(c
            .read(&src, 30_000, &mut out, Priority::Foreground)
            .is_err());
        assert!(!c.covers(30_000, 100));
        c.read(&src, 100, &mut out, Priority::Foreground).unwrap();
        assert_eq!(out, src.data[100..200]);
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;
    use crate::budget::CacheBudget;
    use std::os::unix::fs::MetadataExt;

    #[derive(Debug)]
    struct Mem(Vec<u8>, &'static str);
    impl BlobSource for Mem {
        fn name(&self) -> &str {
            self.1
        }
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let off = off as usize;
            let n = buf.len().min(self.0.len().saturating_sub(off));
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            Ok(n)
        }
    }

    fn mem(n: usize, seed: usize, name: &'static str) -> Mem {
        Mem((0..n).map(|i| ((i * 7 + seed) % 253) as u8).collect(), name)
    }

    const W: u64 = 16384;
    const POLICY: FillPolicy = FillPolicy {
        window: W,
        io_size: 8192,
    };

    fn allocated(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "data"))
            .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
            .sum()
    }

    #[test]
    fn a_budget_of_a_quarter_holds_reads_of_two_blobs_to_it_with_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (mem(40 * W as usize, 1, "a"), mem(24 * W as usize, 5, "b"));
        let limit = (a.size() + b.size()) / 4;
        let budget = CacheBudget::new(limit);
        let ca = budget
            .open(dir.path(), "a", a.size(), POLICY, NO_BINDING)
            .unwrap();
        let cb = budget
            .open(dir.path(), "b", b.size(), POLICY, NO_BINDING)
            .unwrap();
        for pass in 0..2 {
            for (c, src) in [(&ca, &a), (&cb, &b)] {
                let mut off = 0;
                while off < src.size() {
                    let len = (5000 + off % 3000).min(src.size() - off);
                    let mut out = vec![0; len as usize];
                    c.read(src, off, &mut out, Priority::Foreground).unwrap();
                    assert_eq!(
                        out,
                        src.0[off as usize..(off + len) as usize],
                        "pass {pass} at {off}"
                    );
                    assert!(budget.used() <= limit, "used {} > {limit}", budget.used());
                    assert!(
                        allocated(dir.path()) <= limit,
                        "on disk {} > {limit}",
                        allocated(dir.path())
                    );
                    off += len;
                }
            }
        }
        let s = budget.snapshot();
        assert!(s.evicted_windows > 0 && s.evicted_bytes > 0, "{s:?}");
        // Least recently used went first: the last windows read are in.
        assert!(cb.covers(b.size() - W, W) && !ca.covers(0, W));
    }

    #[test]
    fn an_evicted_window_is_missing_in_the_saved_map_before_its_bytes_go() {
        let dir = tempfile::tempdir().unwrap();
        let a = mem(8 * W as usize, 3, "a");
        let budget = CacheBudget::new(5 * W);
        let c = budget
            .open(dir.path(), "a", a.size(), POLICY, NO_BINDING)
            .unwrap();
        let mut out = vec![0; W as usize];
        for i in 0..4 {
            c.read(&a, i * W, &mut out, Priority::Foreground).unwrap();
        }
        c.flush().unwrap();
        assert_eq!(c.evict_windows(&[0, 1]), (2, 2 * W));
        // What a restarted daemon would find: windows 2 and 3 only.
        drop(c);
        let again = CacheFile::open(dir.path(), "a", a.size(), POLICY).unwrap();
        assert!(!again.covers(0, 2 * W) && again.covers(2 * W, 2 * W));
        let mut hole = vec![1; W as usize];
        again.data_file().read_exact_at(&mut hole, 0).unwrap();
        assert!(hole.iter().all(|&b| b == 0), "punched out");
    }

    #[test]
    fn pinned_windows_are_never_evicted_and_a_full_budget_says_no_room() {
        let dir = tempfile::tempdir().unwrap();
        let a = mem(8 * W as usize, 9, "a");
        // Room for two windows (less the file system's share), not three.
        let budget = CacheBudget::new(2 * W + W / 2);
        let c = budget
            .open(dir.path(), "a", a.size(), POLICY, NO_BINDING)
            .unwrap();
        let (_, pin) = c.fill_pinned(&a, 0, 2 * W, Priority::Foreground).unwrap();
        let e = c.fill(&a, 4 * W, 10, Priority::Foreground).unwrap_err();
        assert!(matches!(e, FillError::NoRoom { .. }), "{e}");
        assert!(e.to_string().contains("no room"), "{e}");
        assert!(c.covers(0, 2 * W));
        drop(pin);
        c.fill(&a, 4 * W, 10, Priority::Foreground).unwrap();
        assert!(budget.used() <= 2 * W + W / 2);
        // More than the whole budget at once: no room, nothing evicted.
        assert!(matches!(
            c.fill(&a, 5 * W, 3 * W, Priority::Foreground),
            Err(FillError::NoRoom { .. })
        ));
    }

    #[test]
    fn a_window_another_filler_gives_up_is_written_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(mem(8 * W as usize, 4, "a"));
        // Room for three windows.
        let budget = CacheBudget::new(3 * W + W / 2);
        let c = budget
            .open(dir.path(), "a", a.size(), POLICY, NO_BINDING)
            .unwrap();
        c.fill(&*a, 0, 2 * W, Priority::Foreground).unwrap();
        // Another filler (read-ahead, say) holds window 5.
        assert_eq!(c.map().claim(5), crate::WindowState::Claimed);
        let waiter = {
            let (c, a) = (c.clone(), a.clone());
            std::thread::spawn(move || c.fill(&*a, 5 * W, 10, Priority::Foreground).map(drop))
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        // The cache fills up meanwhile, then the holder gives window 5 up:
        // the waiting fill writes it, and must have had room for it.
        c.fill(&*a, 2 * W, W, Priority::Foreground).unwrap();
        c.map().finish(5, false, false);
        waiter.join().unwrap().unwrap();
        assert!(c.covers(5 * W, 10));
        assert!(
            c.cached_bytes() <= 3 * W && allocated(dir.path()) <= 3 * W + W / 2,
            "{} bytes cached, {} on disk",
            c.cached_bytes(),
            allocated(dir.path())
        );
    }

    #[test]
    fn caches_no_open_file_stands_for_are_removed_first_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (mem(4 * W as usize, 1, "a"), mem(4 * W as usize, 2, "b"));
        {
            let c = CacheFile::open(dir.path(), "old", a.size(), POLICY).unwrap();
            let mut out = vec![0; (4 * W) as usize];
            c.read(&a, 0, &mut out, Priority::Foreground).unwrap();
            c.flush().unwrap();
        }
        let budget = CacheBudget::new(5 * W);
        budget.scan(dir.path()).unwrap();
        assert_eq!(budget.used(), 4 * W, "the old cache counts");
        let c = budget
            .open(dir.path(), "b", b.size(), POLICY, NO_BINDING)
            .unwrap();
        let mut out = vec![0; (3 * W) as usize];
        c.read(&b, 0, &mut out, Priority::Foreground).unwrap();
        assert_eq!(out, b.0[..(3 * W) as usize]);
        assert!(!dir.path().join("old.data").exists() && !dir.path().join("old.map").exists());
        assert_eq!(budget.snapshot().removed_blobs, 1);
        // A budgeted cache that closes leaves an orphan, counted.
        drop(c);
        assert_eq!(budget.used(), 3 * W);
    }
}
