//! The fetch engine: given that bytes `[off, off + len)` of a blob are needed in a
//! cache object, read them from the blob's [`BlobSource`] and write them to a
//! [`CacheSink`] in aligned pieces.
//!
//! It owns the fill policy: requests are widened to whole *fill windows* (a power
//! of two, 4 KiB or more), so that one kernel miss fills a useful region and the
//! readahead ramp of 4 KiB, 16 KiB, 32 KiB... reads does not each come back as a
//! separate request. It also keeps, per object, a [`FillMap`] of the windows it has
//! written, so repeated requests for written data are visible (they should not
//! happen: the kernel serves cached ranges itself).
//!
//! Correctness rule: a window is written only with bytes read from the blob. A
//! short read (truncated blob) or an I/O error leaves the rest unwritten and
//! returns an error, so the transport can fail the reader with EIO; nothing is
//! ever padded or guessed.
//!
//! It must not know which transport asked (cachefiles, FUSE, a test) nor where the
//! blob lives.
#![forbid(unsafe_code)]

pub mod budget;
mod buf;
pub mod chunked;
pub mod local_cache;
mod private_dir;
pub mod readahead;

pub use budget::{BudgetSnapshot, CacheBudget, CacheLimit};
pub use buf::{pooled_bytes, AlignedBuf, PooledBuf, POOL_MAX_FREE};
pub use chunked::{
    ChunkedBlob, FetchContext, FetchOptions, FetchStats, FetchStatsSnapshot, PriorityGate,
};
use lazypull_source::BlobSource;
pub use lazypull_source::Priority;
pub use local_cache::{is_disk_full, CacheFile, CacheReadError, Pinned, NO_BINDING};
pub use private_dir::private_dir;
pub use readahead::{Ahead, ReadAheadPool, Stream, DEFAULT_READAHEAD};
use std::io;
use std::sync::{Condvar, Mutex};

/// Whether a cache is refusing writes (a full disk) right now: so that an
/// episode is logged once when it starts and once when it ends, not once
/// per read. A disk at the edge of full takes some writes and refuses
/// others; the episode ends only with a write that succeeds
/// [`WriteTrouble::QUIET`] after the last refusal.
#[derive(Debug, Default)]
pub struct WriteTrouble {
    failing: std::sync::atomic::AtomicBool,
    episodes: std::sync::atomic::AtomicU64,
    /// [`now_nanos`] of the last refusal.
    last_failure: std::sync::atomic::AtomicU64,
}

impl WriteTrouble {
    /// How long writes must have gone without a refusal for an episode to end.
    pub const QUIET: std::time::Duration = std::time::Duration::from_secs(2);

    /// A write into the cache failed with `error`; `meanwhile` says what
    /// readers get until writes succeed again.
    pub fn failed(&self, error: &dyn std::fmt::Display, meanwhile: &str) {
        use std::sync::atomic::Ordering;
        self.last_failure.store(now_nanos(), Ordering::Release);
        if !self.failing.swap(true, Ordering::AcqRel) {
            self.episodes.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "the cache refuses writes ({error}); {meanwhile} until it takes them again"
            );
        }
    }

    /// A write into the cache succeeded.
    pub fn succeeded(&self) {
        use std::sync::atomic::Ordering;
        if !self.failing.load(Ordering::Acquire) {
            return;
        }
        let since = now_nanos().saturating_sub(self.last_failure.load(Ordering::Acquire));
        if since >= Self::QUIET.as_nanos() as u64 && self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("the cache takes writes again");
        }
    }

    pub fn is_failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Episodes so far (each a run of failing writes).
    pub fn episodes(&self) -> u64 {
        self.episodes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Alignment of every write the engine makes (O_DIRECT-safe on 4 KiB file systems).
pub const ALIGN: u64 = 4096;

/// Where filled bytes go: a cachefiles anonymous fd, a FUSE cache file, a test buffer.
pub trait CacheSink {
    /// Writes `buf` (which starts on an [`ALIGN`] boundary) at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
}

/// How requests are widened and split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillPolicy {
    /// Fill window in bytes: a power of two, at least [`ALIGN`].
    pub window: u64,
    /// Largest single read/write, a multiple of [`ALIGN`] (bounds buffer memory).
    pub io_size: usize,
}

impl Default for FillPolicy {
    fn default() -> Self {
        FillPolicy {
            window: 1 << 20,
            io_size: 256 << 10,
        }
    }
}

impl FillPolicy {
    /// Checks the invariants the fill code relies on.
    pub fn validate(&self) -> Result<(), String> {
        if !self.window.is_power_of_two() || self.window < ALIGN {
            return Err(format!(
                "fill window must be a power of two of at least {ALIGN} bytes, got {}",
                self.window
            ));
        }
        if self.io_size == 0 || !(self.io_size as u64).is_multiple_of(ALIGN) {
            return Err(format!(
                "io size must be a non-zero multiple of {ALIGN}, got {}",
                self.io_size
            ));
        }
        Ok(())
    }

    /// The buffer capacity a fill needs.
    pub fn buffer_size(&self) -> usize {
        self.io_size.min(self.window as usize)
    }

    /// The buffer capacity for fills from `source`: larger when the source
    /// reads best in bigger pieces (up to one window), so that a compressed unit
    /// is decompressed once per window rather than once per piece.
    pub fn buffer_size_for(&self, source: &dyn BlobSource) -> usize {
        let base = self.buffer_size();
        match source.preferred_read_size() {
            Some(p) => {
                let p = p.min(self.window as usize).next_multiple_of(ALIGN as usize);
                p.max(base)
            }
            None => base,
        }
    }
}

/// Which fill windows of one object have been written, which are being
/// filled now (claimed by one filler: others wait for it or skip them, so a
/// window is fetched and written once), and which were filled ahead of need
/// by read-ahead and not yet read.
#[derive(Debug)]
pub struct FillMap {
    window: u64,
    bits: Mutex<Bits>,
    /// Signalled whenever a claim ends (filled or given up).
    settled: Condvar,
}

#[derive(Debug)]
struct Bits {
    filled: Vec<u64>,
    busy: Vec<u64>,
    ahead: Vec<u64>,
    /// Readers between "these windows are filled" and the end of their read
    /// of them, per window: a pinned window is never evicted (see
    /// [`FillMap::pin_filled`]). Few at a time, so a map, not a vector.
    pins: std::collections::HashMap<u64, u32>,
    /// When each window was last filled or pinned ([`now_nanos`]): what
    /// eviction orders by (least recently used first).
    last_use: Vec<u64>,
}

/// Nanoseconds on a monotonic clock since the first call in this process:
/// the time stamps of [`FillMap`]'s least-recently-used order.
pub fn now_nanos() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    // Never 0: 0 stands for "never used".
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
        + 1
}

fn bit(words: &[u64], index: u64) -> bool {
    words
        .get((index / 64) as usize)
        .is_some_and(|w| w & (1 << (index % 64)) != 0)
}

fn set_bit(words: &mut [u64], index: u64, on: bool) {
    if let Some(w) = words.get_mut((index / 64) as usize) {
        if on {
            *w |= 1 << (index % 64);
        } else {
            *w &= !(1 << (index % 64));
        }
    }
}

/// What [`FillMap::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// Written already.
    Filled,
    /// Another filler has it: wait for it ([`FillMap::wait_settled`]) or skip it.
    Busy,
    /// Now the caller's to fill; it must [`FillMap::finish`] it.
    Claimed,
}

impl FillMap {
    pub fn new(object_size: u64, window: u64) -> Self {
        let windows = object_size.div_ceil(window);
        Self::from_words(object_size, window, vec![0; windows.div_ceil(64) as usize])
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bits> {
        // A panic while holding this lock cannot leave the bitmaps half-updated
        // (single word stores), so a poisoned lock is still usable.
        self.bits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A map restored from [`words`](Self::words) saved earlier (missing words
    /// read as unfilled, extra ones are ignored).
    pub fn from_words(object_size: u64, window: u64, mut words: Vec<u64>) -> Self {
        let windows = object_size.div_ceil(window);
        let n = windows.div_ceil(64) as usize;
        words.resize(n, 0);
        if let Some(last) = words.last_mut() {
            let used = windows % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        FillMap {
            window,
            bits: Mutex::new(Bits {
                filled: words,
                busy: vec![0; n],
                ahead: vec![0; n],
                pins: Default::default(),
                last_use: vec![0; windows as usize],
            }),
            settled: Condvar::new(),
        }
    }

    /// Marks filled every window set in `words` (a bitmap as [`words`]
    /// gives: what a cache file was found to hold), keeping what is filled.
    ///
    /// [`words`]: Self::words
    pub fn add_filled_words(&self, words: &[u64]) {
        {
            let mut bits = self.lock();
            for (have, add) in bits.filled.iter_mut().zip(words) {
                *have |= add;
            }
        }
        self.settled.notify_all();
    }

    /// The bitmap of filled windows, one bit per window, for saving.
    pub fn words(&self) -> Vec<u64> {
        self.lock().filled.clone()
    }

    /// Bytes of window `index` in an object of `object_size`.
    fn window_bytes(&self, index: u64, object_size: u64) -> u64 {
        let start = index * self.window;
        (start + self.window).min(object_size).saturating_sub(start)
    }

    /// Bytes of an object of `object_size` covered by filled windows.
    pub fn filled_bytes(&self, object_size: u64) -> u64 {
        let bits = self.lock();
        let windows = object_size.div_ceil(self.window);
        let mut total = bits
            .filled
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum::<u64>()
            * self.window;
        // The last window may be short.
        let last = windows.saturating_sub(1);
        if windows > 0 && bit(&bits.filled, last) {
            total -= windows * self.window - object_size;
        }
        total
    }

    pub fn is_filled(&self, index: u64) -> bool {
        bit(&self.lock().filled, index)
    }

    /// Whether window `index` is filled or being filled now.
    pub fn is_filled_or_busy(&self, index: u64) -> bool {
        let bits = self.lock();
        bit(&bits.filled, index) || bit(&bits.busy, index)
    }

    /// Takes window `index` for the caller to fill, unless it is filled or
    /// another filler has it.
    pub fn claim(&self, index: u64) -> WindowState {
        let mut bits = self.lock();
        if bit(&bits.filled, index) {
            WindowState::Filled
        } else if bit(&bits.busy, index) {
            WindowState::Busy
        } else {
            set_bit(&mut bits.busy, index, true);
            WindowState::Claimed
        }
    }

    /// Ends the caller's claim of window `index`: `filled` when its bytes are
    /// written (then `ahead` marks it as read ahead of need), else given up.
    pub fn finish(&self, index: u64, filled: bool, ahead: bool) {
        {
            let mut bits = self.lock();
            set_bit(&mut bits.busy, index, false);
            if filled {
                set_bit(&mut bits.filled, index, true);
                set_bit(&mut bits.ahead, index, ahead);
                if let Some(t) = bits.last_use.get_mut(index as usize) {
                    *t = now_nanos();
                }
            }
        }
        self.settled.notify_all();
    }

    /// Blocks until nobody is filling window `index`.
    pub fn wait_settled(&self, index: u64) {
        let mut bits = self.lock();
        while bit(&bits.busy, index) {
            bits = self.settled.wait(bits).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A reader touched `[off, off + len)`: windows there that read-ahead
    /// filled count as used from now on. Returns the bytes of read-ahead
    /// windows this is the first touch of.
    pub fn touch(&self, off: u64, len: u64, object_size: u64) -> u64 {
        let end = off.saturating_add(len).min(object_size);
        if off >= end {
            return 0;
        }
        let mut used = 0;
        let mut bits = self.lock();
        for i in off / self.window..=(end - 1) / self.window {
            if bit(&bits.ahead, i) {
                set_bit(&mut bits.ahead, i, false);
                used += self.window_bytes(i, object_size);
            }
        }
        used
    }

    /// Bytes of windows read ahead that no reader has touched yet.
    pub fn unread_ahead_bytes(&self, object_size: u64) -> u64 {
        let bits = self.lock();
        let windows = object_size.div_ceil(self.window);
        (0..windows)
            .filter(|&i| bit(&bits.ahead, i))
            .map(|i| self.window_bytes(i, object_size))
            .sum()
    }

    /// Pins windows `first..=last` if every one of them is filled: until
    /// [`unpin`](Self::unpin), none of them is evicted
    /// ([`take_for_eviction`](Self::take_for_eviction) skips them), so a
    /// reader can read their bytes from the cache file. Marks them used now.
    /// Returns false (pinning nothing) if any is not filled.
    pub fn pin_filled(&self, first: u64, last: u64) -> bool {
        let mut bits = self.lock();
        if !(first..=last).all(|i| bit(&bits.filled, i)) {
            return false;
        }
        let now = now_nanos();
        for i in first..=last {
            *bits.pins.entry(i).or_insert(0) += 1;
            if let Some(t) = bits.last_use.get_mut(i as usize) {
                *t = now;
            }
        }
        true
    }

    /// Ends one [`pin_filled`](Self::pin_filled) of windows `first..=last`.
    pub fn unpin(&self, first: u64, last: u64) {
        let mut bits = self.lock();
        let now = now_nanos();
        for i in first..=last {
            if let std::collections::hash_map::Entry::Occupied(mut e) = bits.pins.entry(i) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
            // A read ends now: it is as recent a use as its start.
            if let Some(t) = bits.last_use.get_mut(i as usize) {
                *t = now;
            }
        }
    }

    /// The windows that could be evicted now (filled, not being filled, not
    /// pinned) and last used before `used_before`, with when they were last used.
    pub fn evictable(&self, used_before: u64) -> Vec<(u64, u64)> {
        let bits = self.lock();
        let mut out = Vec::new();
        for (wi, &w) in bits.filled.iter().enumerate() {
            let mut free = w & !bits.busy[wi];
            while free != 0 {
                let i = wi as u64 * 64 + free.trailing_zeros() as u64;
                free &= free - 1;
                let used = bits.last_use.get(i as usize).copied().unwrap_or(0);
                if used < used_before && !bits.pins.contains_key(&i) {
                    out.push((used, i));
                }
            }
        }
        out
    }

    /// Takes, of `windows`, those still evictable (filled, not busy, not
    /// pinned): each is marked not filled and busy, so no reader trusts its
    /// bytes and no filler writes it until the evictor
    /// [`finish`](Self::finish)es it (not filled) once its bytes are gone.
    /// Returns the windows taken.
    pub fn take_for_eviction(&self, windows: &[u64]) -> Vec<u64> {
        let mut bits = self.lock();
        let mut taken = Vec::new();
        for &i in windows {
            if bit(&bits.filled, i) && !bit(&bits.busy, i) && !bits.pins.contains_key(&i) {
                set_bit(&mut bits.filled, i, false);
                set_bit(&mut bits.ahead, i, false);
                set_bit(&mut bits.busy, i, true);
                taken.push(i);
            }
        }
        taken
    }

    /// Gives back windows [`take_for_eviction`](Self::take_for_eviction)
    /// took whose bytes are still intact (the eviction did not happen).
    pub fn untake(&self, windows: &[u64]) {
        {
            let mut bits = self.lock();
            for &i in windows {
                set_bit(&mut bits.busy, i, false);
                set_bit(&mut bits.filled, i, true);
            }
        }
        self.settled.notify_all();
    }

    /// Bytes of the windows in `windows` (in an object of `object_size`).
    pub fn bytes_of(&self, windows: &[u64], object_size: u64) -> u64 {
        windows
            .iter()
            .map(|&i| self.window_bytes(i, object_size))
            .sum()
    }

    /// Bytes of the windows `[off, off + len)` touches (in an object of
    /// `object_size`): the most a fill of that range can write.
    pub fn range_bytes(&self, off: u64, len: u64, object_size: u64) -> u64 {
        let end = off.saturating_add(len).min(object_size);
        if off >= end {
            return 0;
        }
        (off / self.window..=(end - 1) / self.window)
            .map(|i| self.window_bytes(i, object_size))
            .sum()
    }

    /// Number of windows written so far.
    pub fn filled_windows(&self) -> u64 {
        self.lock()
            .filled
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    pub fn window(&self) -> u64 {
        self.window
    }
}

/// What one fill did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FillOutcome {
    pub bytes_written: u64,
    pub windows_written: u64,
    /// Windows the request covered that were already written when it ran
    /// (another request or a prefetch filled them meanwhile): they are neither
    /// fetched nor written again.
    pub windows_overlapped: u64,
}

/// Why a fill failed. Bytes written before the failure are correct blob bytes.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("reading blob {blob} at {off} (+{len}): {source}")]
    Read {
        blob: String,
        off: u64,
        len: usize,
        source: io::Error,
    },
    #[error("blob {blob} is truncated: wanted {len} bytes at {off}, it has only {got} there (size now shorter than the {size} it had when opened)")]
    Truncated {
        blob: String,
        off: u64,
        len: usize,
        got: usize,
        size: u64,
    },
    #[error("no room in the cache for {needed} more bytes of blob {blob}: its limit is {limit} bytes and all it holds is in use")]
    NoRoom {
        blob: String,
        needed: u64,
        limit: u64,
    },
    #[error("writing {len} bytes at {off} into the cache: {source}")]
    Write {
        off: u64,
        len: usize,
        source: io::Error,
    },
}

/// One cache object being filled: the blob it mirrors, its size as the kernel
/// knows it, its fill map and where its bytes go.
pub struct Target<'a> {
    pub source: &'a dyn BlobSource,
    pub object_size: u64,
    pub map: &'a FillMap,
    pub sink: &'a dyn CacheSink,
    /// Foreground for a reader's miss, background for prefetch.
    pub priority: Priority,
}

/// The windows a filler claimed: each ends filled as it is written, and any
/// left when this drops (an error, a panic) are given up, so waiters go on.
struct WindowClaims<'a> {
    map: &'a FillMap,
    pending: Vec<u64>,
}

impl WindowClaims<'_> {
    fn filled(&mut self, index: u64, ahead: bool) {
        if let Some(pos) = self.pending.iter().position(|&i| i == index) {
            self.pending.swap_remove(pos);
        }
        self.map.finish(index, true, ahead);
    }
}

impl Drop for WindowClaims<'_> {
    fn drop(&mut self) {
        for &i in &self.pending {
            self.map.finish(i, false, false);
        }
    }
}

fn read_error(source: &dyn BlobSource, off: u64, len: u64, e: io::Error) -> FillError {
    FillError::Read {
        blob: source.name().to_owned(),
        off,
        len: len as usize,
        source: e,
    }
}

/// Reads window `index` from the source and writes it to the sink, in pieces
/// of `buf`'s capacity. Returns the bytes written.
fn write_window(
    target: &Target<'_>,
    index: u64,
    policy: &FillPolicy,
    buf: &mut AlignedBuf,
    priority: Priority,
) -> Result<u64, FillError> {
    let Target {
        source,
        object_size,
        sink,
        ..
    } = *target;
    let start = index * policy.window;
    let stop = (start + policy.window).min(object_size);
    let mut pos = start;
    while pos < stop {
        let n = (stop - pos).min(buf.capacity() as u64) as usize;
        let piece = buf.slice_mut(n);
        let got = source
            .read_at_priority(piece, pos, priority)
            .map_err(|e| read_error(source, pos, n as u64, e))?;
        if got < n {
            return Err(FillError::Truncated {
                blob: source.name().to_owned(),
                off: pos,
                len: n,
                got,
                size: object_size,
            });
        }
        sink.write_at(buf.slice(n), pos)
            .map_err(|e| FillError::Write {
                off: pos,
                len: n,
                source: e,
            })?;
        pos += n as u64;
    }
    Ok(stop - start)
}

/// Fills the windows of `[off, off + len)` (clamped to the object size) from the
/// target's source into its sink, reading and writing in pieces of `buf`'s
/// capacity (a non-zero multiple of [`ALIGN`]; see [`FillPolicy::buffer_size_for`]).
///
/// Each window is claimed in the map first: a window another filler has (a
/// concurrent READ, read-ahead) is waited for after this fill's own windows
/// are written, and filled here only if that filler gave it up. So a window
/// is fetched and written once, and the call returns when every window of the
/// range is filled (or with the error of one this call filled).
pub fn fill(
    target: &Target<'_>,
    off: u64,
    len: u64,
    policy: &FillPolicy,
    buf: &mut AlignedBuf,
) -> Result<FillOutcome, FillError> {
    if target.priority == Priority::Background {
        // Background work (prefetch) takes its turn before it claims any
        // window, like read-ahead (see `fill_ahead`): a reader must never
        // wait for a window whose filler waits for readers to finish. It then
        // waits for the windows others were filling, so the range is filled
        // when it returns (unless one of them failed).
        let out = fill_fetch_first(target, off, len, policy, buf, &|| false, false)?;
        let end = off.saturating_add(len).min(target.object_size);
        if off < end {
            for i in off / policy.window..=(end - 1) / policy.window {
                target.map.wait_settled(i);
            }
        }
        return Ok(out);
    }
    let mut outcome = FillOutcome::default();
    let end = off.saturating_add(len).min(target.object_size);
    if off >= end {
        return Ok(outcome);
    }
    let w = policy.window;
    let mut todo: Vec<u64> = (off / w..=(end - 1) / w).collect();
    while !todo.is_empty() {
        let mut claims = WindowClaims {
            map: target.map,
            pending: Vec::new(),
        };
        let mut others = Vec::new();
        for &i in &todo {
            match target.map.claim(i) {
                WindowState::Filled => outcome.windows_overlapped += 1,
                WindowState::Busy => others.push(i),
                WindowState::Claimed => claims.pending.push(i),
            }
        }
        let mine = claims.pending.clone();
        fill_claimed(target, &mine, policy, buf, &mut claims, &mut outcome, false)?;
        drop(claims);
        // Claim first, wait after: this fill holds no claim while it waits,
        // so two fills waiting for each other's windows cannot happen.
        for &i in &others {
            target.map.wait_settled(i);
        }
        todo = others;
    }
    Ok(outcome)
}

/// Fills the windows `wanted` (sorted, claimed by the caller) at the target's
/// priority.
fn fill_claimed(
    target: &Target<'_>,
    wanted: &[u64],
    policy: &FillPolicy,
    buf: &mut AlignedBuf,
    claims: &mut WindowClaims<'_>,
    outcome: &mut FillOutcome,
    ahead: bool,
) -> Result<(), FillError> {
    let Target {
        source,
        object_size,
        priority,
        ..
    } = *target;
    let w = policy.window;
    // One announcement per run of consecutive missing windows lets a remote
    // source fetch each run in as few requests as it likes, and keep what it
    // fetched until this fill is done with it (a unit too large for the
    // source's own cache is then fetched once, not once per window). A run
    // never spans a window that is already filled: its bytes would be fetched
    // again for nothing. Where the hold covers less than the run, the rest is
    // announced when the fill gets there. A failed announcement fails the
    // fill: reading the same range would fetch (and fail) again.
    let mut hold: Option<lazypull_source::ReadHold> = None;
    for (k, &index) in wanted.iter().enumerate() {
        let start = index * w;
        let stop = (start + w).min(object_size);
        let covered = hold
            .as_ref()
            .is_some_and(|h| h.covers().start <= start && stop <= h.covers().end);
        if !covered {
            let mut run_end = k + 1;
            while run_end < wanted.len() && wanted[run_end] == wanted[run_end - 1] + 1 {
                run_end += 1;
            }
            let run_stop = ((wanted[run_end - 1] + 1) * w).min(object_size);
            // The new hold is made before the old one drops: units both
            // cover stay alive.
            let next = source
                .will_read(start, run_stop - start, priority)
                .map_err(|e| read_error(source, start, run_stop - start, e))?;
            hold = Some(next);
        }
        outcome.bytes_written += write_window(target, index, policy, buf, priority)?;
        claims.filled(index, ahead);
        outcome.windows_written += 1;
    }
    Ok(())
}

/// Fills, ahead of need, the windows of `[off, off + len)` that are neither
/// filled nor being filled, at the target's priority (background, for
/// read-ahead), checking `cancelled` before each run of windows. Marks the
/// windows as read ahead (see [`FillMap::touch`]). Windows another filler
/// has are skipped, never waited for.
///
/// At background priority it first takes its turn: it waits, holding no
/// claim, until no foreground fetch runs (a zero-length background
/// announcement; see [`ChunkedBlob`](crate::ChunkedBlob)'s `will_read`).
/// Only then does it claim the next run of free windows and fetch them
/// without waiting again (the turn lasts until the run is written, at most
/// `MAX_RUN` windows), so a reader that finds a window
/// claimed by read-ahead waits for a fetch under way, never for one waiting
/// on other readers (priority inversion); and the windows it fetches are
/// claimed before their units are asked for, so nobody fetches them again.
pub fn fill_ahead(
    target: &Target<'_>,
    off: u64,
    len: u64,
    policy: &FillPolicy,
    buf: &mut AlignedBuf,
    cancelled: &dyn Fn() -> bool,
) -> Result<FillOutcome, FillError> {
    fill_fetch_first(target, off, len, policy, buf, cancelled, true)
}

/// Windows [`fill_ahead`] claims per turn.
const MAX_RUN: usize = 8;

/// [`fill_ahead`]; `ahead` marks the windows written as read ahead.
fn fill_fetch_first(
    target: &Target<'_>,
    off: u64,
    len: u64,
    policy: &FillPolicy,
    buf: &mut AlignedBuf,
    cancelled: &dyn Fn() -> bool,
    ahead: bool,
) -> Result<FillOutcome, FillError> {
    let Target {
        source,
        object_size,
        map,
        priority,
        ..
    } = *target;
    let mut outcome = FillOutcome::default();
    let end = off.saturating_add(len).min(object_size);
    if off >= end {
        return Ok(outcome);
    }
    let w = policy.window;
    let (mut next, last) = (off / w, (end - 1) / w);
    while next <= last && !cancelled() {
        // The turn lasts until this run is written: the run's fetches go
        // out without waiting again (readers may be waiting for its windows).
        let _turn = if priority == Priority::Background {
            Some(
                source
                    .will_read(next * w, 0, Priority::Background)
                    .map_err(|e| read_error(source, next * w, 0, e))?,
            )
        } else {
            None
        };
        let mut claims = WindowClaims {
            map,
            pending: Vec::new(),
        };
        // The next run of windows nobody has: claimed now, fetched next.
        while next <= last {
            match map.claim(next) {
                WindowState::Claimed => {
                    claims.pending.push(next);
                    next += 1;
                    break;
                }
                WindowState::Filled => outcome.windows_overlapped += 1,
                WindowState::Busy => {}
            }
            next += 1;
        }
        // At most MAX_RUN windows per turn: readers waiting for them wait
        // for one bounded fetch, and background work yields between runs.
        while next <= last && !claims.pending.is_empty() && claims.pending.len() < MAX_RUN {
            if map.claim(next) != WindowState::Claimed {
                break;
            }
            claims.pending.push(next);
            next += 1;
        }
        if claims.pending.is_empty() {
            break;
        }
        let run = claims.pending.clone();
        fill_claimed(target, &run, policy, buf, &mut claims, &mut outcome, ahead)?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug)]
    struct MemBlob(Vec<u8>, u64);
    impl BlobSource for MemBlob {
        fn name(&self) -> &str {
            "mem"
        }
        fn size(&self) -> u64 {
            self.1
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let off = off as usize;
            if off >= self.0.len() {
                return Ok(0);
            }
            let n = buf.len().min(self.0.len() - off);
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            Ok(n)
        }
    }

    /// A model cache file: records every write and checks the kernel's alignment rules.
    struct MemSink {
        data: RefCell<Vec<Option<u8>>>,
        writes: RefCell<Vec<(u64, usize)>>,
    }
    impl MemSink {
        fn new(size: usize) -> Self {
            MemSink {
                data: RefCell::new(vec![None; size]),
                writes: RefCell::new(vec![]),
            }
        }
    }
    impl CacheSink for MemSink {
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            let size = self.data.borrow().len();
            assert_eq!(buf.as_ptr() as u64 % ALIGN, 0, "unaligned buffer");
            assert_eq!(off % ALIGN, 0, "unaligned offset");
            assert!(
                (buf.len() as u64).is_multiple_of(ALIGN) || off as usize + buf.len() == size,
                "unaligned length not at object end"
            );
            let mut d = self.data.borrow_mut();
            for (i, b) in buf.iter().enumerate() {
                d[off as usize + i] = Some(*b);
            }
            self.writes.borrow_mut().push((off, buf.len()));
            Ok(())
        }
    }

    fn target<'a>(blob: &'a MemBlob, map: &'a FillMap, sink: &'a MemSink) -> Target<'a> {
        Target {
            source: blob,
            object_size: blob.1,
            map,
            sink,
            priority: Priority::Foreground,
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn small_read_fills_its_whole_window_with_blob_bytes() {
        let size = 3 * 65536 + 1000;
        let blob = MemBlob(pattern(size), size as u64);
        let policy = FillPolicy {
            window: 65536,
            io_size: 16384,
        };
        let map = FillMap::new(size as u64, policy.window);
        let sink = MemSink::new(size);
        let mut buf = AlignedBuf::new(policy.buffer_size());
        let out = fill(&target(&blob, &map, &sink), 70000, 10, &policy, &mut buf).unwrap();
        assert_eq!(out.bytes_written, 65536);
        assert_eq!(out.windows_written, 1);
        let d = sink.data.borrow();
        for i in 65536..131072 {
            assert_eq!(d[i], Some(blob.0[i]));
        }
        assert!(d[..65536].iter().all(|b| b.is_none()));
        assert!(map.is_filled(1) && !map.is_filled(0));
        // The last window ends unaligned, exactly at the object size.
        drop(d);
        let out = fill(
            &target(&blob, &map, &sink),
            size as u64 - 1,
            1,
            &policy,
            &mut buf,
        )
        .unwrap();
        assert_eq!(out.bytes_written, 1000);
        // Asking again for a filled window is counted.
        let out = fill(&target(&blob, &map, &sink), 65536, 4096, &policy, &mut buf).unwrap();
        assert_eq!(out.windows_overlapped, 1);
    }

    #[test]
    fn truncated_blob_writes_nothing_past_the_truncation() {
        let size = 4 * 4096;
        let mut data = pattern(size);
        data.truncate(4096 + 100);
        let blob = MemBlob(data, size as u64);
        let policy = FillPolicy {
            window: 16384,
            io_size: 4096,
        };
        let map = FillMap::new(size as u64, policy.window);
        let sink = MemSink::new(size);
        let mut buf = AlignedBuf::new(policy.buffer_size());
        let err = fill(
            &Target {
                source: &blob,
                object_size: size as u64,
                map: &map,
                sink: &sink,
                priority: Priority::Foreground,
            },
            0,
            16384,
            &policy,
            &mut buf,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                FillError::Truncated {
                    off: 4096,
                    got: 100,
                    ..
                }
            ),
            "{err}"
        );
        let d = sink.data.borrow();
        assert!(d[..4096].iter().all(|b| b.is_some()));
        assert!(d[4096..].iter().all(|b| b.is_none()), "no guessed bytes");
        assert!(!map.is_filled(0));
    }

    #[test]
    fn announcements_skip_windows_already_filled() {
        #[derive(Debug)]
        struct Announced(MemBlob, std::sync::Mutex<Vec<(u64, u64)>>);
        impl BlobSource for Announced {
            fn name(&self) -> &str {
                "a"
            }
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
                self.0.read_at(buf, off)
            }
            fn will_read(
                &self,
                off: u64,
                len: u64,
                _p: Priority,
            ) -> io::Result<lazypull_source::ReadHold> {
                self.1.lock().unwrap().push((off, len));
                Ok(lazypull_source::ReadHold::nothing(off..off + len))
            }
        }
        let size = 5 * 4096;
        let blob = Announced(MemBlob(pattern(size), size as u64), Default::default());
        let policy = FillPolicy {
            window: 4096,
            io_size: 4096,
        };
        let map = FillMap::new(size as u64, policy.window);
        let sink = MemSink::new(size);
        let mut buf = AlignedBuf::new(policy.buffer_size());
        let target = Target {
            source: &blob,
            object_size: size as u64,
            map: &map,
            sink: &sink,
            priority: Priority::Foreground,
        };
        fill(&target, 2 * 4096, 10, &policy, &mut buf).unwrap();
        blob.1.lock().unwrap().clear();
        let out = fill(&target, 0, size as u64, &policy, &mut buf).unwrap();
        assert_eq!(out.windows_overlapped, 1);
        assert_eq!(
            *blob.1.lock().unwrap(),
            [(0, 2 * 4096), (3 * 4096, 2 * 4096)],
            "two runs around the filled window"
        );
    }

    #[test]
    fn policy_validation() {
        assert!(FillPolicy::default().validate().is_ok());
        assert!(FillPolicy {
            window: 3000,
            io_size: 4096
        }
        .validate()
        .is_err());
        assert!(FillPolicy {
            window: 1 << 20,
            io_size: 1000
        }
        .validate()
        .is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_request_gets_exactly_the_blob_bytes(
            size in 1usize..200_000, off in 0u64..220_000, len in 0u64..100_000,
            window_shift in 12u32..17, io_pages in 1usize..5,
        ) {
            let blob = MemBlob(pattern(size), size as u64);
            let policy = FillPolicy { window: 1 << window_shift, io_size: io_pages * 4096 };
            let map = FillMap::new(size as u64, policy.window);
            let sink = MemSink::new(size);
            let mut buf = AlignedBuf::new(policy.buffer_size());
            fill(&target(&blob, &map, &sink), off, len, &policy, &mut buf).unwrap();
            let d = sink.data.borrow();
            let end = (off + len).min(size as u64);
            for i in off..end {
                proptest::prop_assert_eq!(d[i as usize], Some(blob.0[i as usize]));
            }
            for (i, b) in d.iter().enumerate() {
                if let Some(b) = b { proptest::prop_assert_eq!(*b, blob.0[i]); }
            }
        }
    }
}
