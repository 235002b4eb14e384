//! Serving a blob from its stored form (chunk table + zstd units) wherever the
//! stored bytes live — a local file or a registry reached by Range requests —
//! with the fewest, largest useful fetches.
//!
//! [`ChunkedBlob`] is a [`BlobSource`] that owns, for one blob:
//! * **in-flight dedup**: a unit being fetched is fetched once; concurrent
//!   readers of it wait for that fetch and share its result (or its error);
//! * **merging**: a request's missing units that are adjacent in the stored
//!   data are fetched with one range read, up to [`FetchOptions::max_merge`]
//!   stored bytes;
//! * **verification** before anything leaves it: a unit's bytes are handed out
//!   only after they decompressed to the declared length and hashed to the
//!   table's SHA-256; a mismatch is an `InvalidData` error, logged and counted,
//!   and nothing of that unit is kept, so a later read fetches it again;
//! * a small **unit cache** of verified units, so the windows of one request
//!   (and units a merged fetch brought along) are not fetched twice;
//! * **holds**: the units an announcement ([`BlobSource::will_read`]) fetched
//!   stay alive for its caller until its [`ReadHold`] drops, even those the
//!   unit cache cannot keep, so one fill fetches each unit once;
//! * **priority**: background (prefetch) fetches wait while reads someone is
//!   waiting on are fetching ([`PriorityGate`]), and wait *before* they claim
//!   a unit: a reader never waits for a claim whose owner waits for readers.
//!
//! Claim-then-wait ordering keeps it deadlock-free: a caller first fetches every
//! unit it claimed, and only then waits for units others claimed; a claimed unit
//! is always resolved (with data or an error), even if its fetch panics.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lazypull_blob::{ChunkTable, UnitDecoder};
use lazypull_source::{BlobSource, Priority, RangeRead, ReadHold, SourceCounters, SourceStats};

/// Limits of the fetcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOptions {
    /// Largest range request, in stored bytes, that adjacent units are merged
    /// into (a single unit larger than this is still fetched whole).
    pub max_merge: u64,
    /// Verified units kept per blob, in uncompressed bytes.
    pub cache_bytes: usize,
    /// Threads that decompress and verify the units of one range read at
    /// once (the calling thread is one of them); 0 means one per core. A
    /// run's units are cut into that many shares, each decoded on its own
    /// thread while the others are: memory stays what the run holds anyway
    /// (its stored bytes and its decoded units, bounded by `max_merge` and
    /// the hold budget, `cache_bytes`).
    pub decode_threads: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_merge: 4 << 20,
            cache_bytes: 8 << 20,
            decode_threads: 0,
        }
    }
}

/// Counters of all fetches through one [`FetchContext`].
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Range reads issued to backends.
    pub range_requests: AtomicU64,
    /// Stored bytes those reads returned.
    pub stored_bytes: AtomicU64,
    /// Units fetched, verified and handed out.
    pub units_fetched: AtomicU64,
    /// Units a caller got from another caller's in-flight fetch.
    pub dedup_waits: AtomicU64,
    /// Units served from the unit cache.
    pub cache_hits: AtomicU64,
    /// Units whose bytes failed decompression or their SHA-256 check.
    pub verify_failures: AtomicU64,
    /// Range reads that failed (after the backend's own retries).
    pub fetch_failures: AtomicU64,
    /// Units fetched at background priority (prefetch, read-ahead).
    pub background_units: AtomicU64,
    /// Microseconds spent in range reads (waiting on backends), summed over
    /// the reads: with reads in parallel this exceeds the wall time.
    pub fetch_micros: AtomicU64,
    /// Microseconds spent decompressing and verifying units, summed over the
    /// threads that did it (the CPU side of a cold read).
    pub decode_micros: AtomicU64,
}

/// A plain copy of [`FetchStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FetchStatsSnapshot {
    pub range_requests: u64,
    pub stored_bytes: u64,
    pub units_fetched: u64,
    pub dedup_waits: u64,
    pub cache_hits: u64,
    pub verify_failures: u64,
    pub fetch_failures: u64,
    pub background_units: u64,
    pub fetch_micros: u64,
    pub decode_micros: u64,
}

impl FetchStats {
    pub fn snapshot(&self) -> FetchStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FetchStatsSnapshot {
            range_requests: l(&self.range_requests),
            stored_bytes: l(&self.stored_bytes),
            units_fetched: l(&self.units_fetched),
            dedup_waits: l(&self.dedup_waits),
            cache_hits: l(&self.cache_hits),
            verify_failures: l(&self.verify_failures),
            fetch_failures: l(&self.fetch_failures),
            background_units: l(&self.background_units),
            fetch_micros: l(&self.fetch_micros),
            decode_micros: l(&self.decode_micros),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn micros_since(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Lets background work yield to foreground work: background fetches start
/// only while no foreground fetch is running.
#[derive(Debug, Default)]
pub struct PriorityGate {
    foreground: AtomicUsize,
    /// Background callers waiting in [`wait_idle`](Self::wait_idle) now.
    waiting: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

/// Held while foreground work runs.
pub struct ForegroundGuard<'a>(&'a PriorityGate);

impl Drop for ForegroundGuard<'_> {
    fn drop(&mut self) {
        if self.0.foreground.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = self.0.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.0.idle.notify_all();
        }
    }
}

impl PriorityGate {
    /// Marks foreground work as running until the guard drops.
    pub fn foreground(&self) -> ForegroundGuard<'_> {
        self.foreground.fetch_add(1, Ordering::AcqRel);
        ForegroundGuard(self)
    }

    /// Number of foreground fetches running now.
    pub fn foreground_active(&self) -> usize {
        self.foreground.load(Ordering::Acquire)
    }

    /// Background callers waiting for foreground work to end, now.
    pub fn background_waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Blocks until no foreground work runs.
    pub fn wait_idle(&self) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.foreground.load(Ordering::Acquire) > 0 {
            // A timeout as well as the notification: a guard dropped between the
            // load and the wait must not strand the waiter.
            g = self
                .idle
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every [`ChunkedBlob`] of one daemon shares.
#[derive(Debug, Default)]
pub struct FetchContext {
    pub options: FetchOptions,
    pub stats: FetchStats,
    pub gate: PriorityGate,
}

impl FetchContext {
    pub fn new(options: FetchOptions) -> Arc<Self> {
        Arc::new(FetchContext {
            options,
            ..Default::default()
        })
    }
}

type Unit = Arc<crate::PooledBuf>;
type UnitResult = Result<Unit, (io::ErrorKind, String)>;

/// One unit being fetched: its result, once there is one.
#[derive(Default)]
struct Slot {
    result: Mutex<Option<UnitResult>>,
    ready: Condvar,
}

impl Slot {
    fn set(&self, r: UnitResult) {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.ready.notify_all();
    }

    fn wait(&self) -> UnitResult {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = &*g {
                return r.clone();
            }
            g = self.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Verified units, least recently used first.
#[derive(Default)]
struct UnitCache {
    order: VecDeque<u64>,
    units: HashMap<u64, Unit>,
    bytes: usize,
}

impl UnitCache {
    fn get(&mut self, index: u64) -> Option<Unit> {
        let unit = self.units.get(&index)?.clone();
        if let Some(pos) = self.order.iter().position(|&i| i == index) {
            self.order.remove(pos);
        }
        self.order.push_back(index);
        Some(unit)
    }

    fn insert(&mut self, index: u64, unit: Unit, budget: usize) {
        if unit.len() > budget {
            return;
        }
        if let Some(old) = self.units.insert(index, unit.clone()) {
            self.bytes -= old.len();
            if let Some(pos) = self.order.iter().position(|&i| i == index) {
                self.order.remove(pos);
            }
        }
        self.bytes += unit.len();
        self.order.push_back(index);
        while self.bytes > budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(u) = self.units.remove(&oldest) {
                self.bytes -= u.len();
            }
        }
    }
}

#[derive(Default)]
struct State {
    inflight: HashMap<u64, Arc<Slot>>,
    cache: UnitCache,
    /// Units some caller's [`ReadHold`] keeps alive (dead entries are swept
    /// when holds are added).
    held: HashMap<u64, Weak<crate::PooledBuf>>,
}

/// Dead entries of `State::held` are swept when it reaches this many.
const HELD_SWEEP: usize = 256;

/// Units this caller claimed: resolved as they are fetched, and on drop any
/// still unresolved get an error (a panic or early return never strands the
/// callers waiting on them).
struct Claims<'a> {
    blob: &'a ChunkedBlob,
    pending: Vec<(u64, Arc<Slot>)>,
}

impl Claims<'_> {
    fn resolve(&mut self, index: u64, result: UnitResult) {
        if let Some(pos) = self.pending.iter().position(|(i, _)| *i == index) {
            let (_, slot) = self.pending.swap_remove(pos);
            let mut st = self.blob.lock();
            st.inflight.remove(&index);
            if let Ok(unit) = &result {
                st.cache
                    .insert(index, unit.clone(), self.blob.ctx.options.cache_bytes);
                // Findable for as long as anyone holds it, from the moment
                // it is out of flight: the unit cache may evict it before the
                // claimant's hold is registered, and a fill that then claimed
                // its window would fetch it again.
                if st.held.len() >= HELD_SWEEP {
                    st.held.retain(|_, w| w.strong_count() > 0);
                }
                st.held.insert(index, Arc::downgrade(unit));
            }
            drop(st);
            slot.set(result);
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        for (index, _) in self.pending.clone() {
            self.resolve(
                index,
                Err((io::ErrorKind::Other, "fetch abandoned".to_owned())),
            );
        }
    }
}

/// A blob served from its stored form through the fetcher (see the module doc).
pub struct ChunkedBlob {
    name: String,
    table: ChunkTable,
    stored: Arc<dyn RangeRead>,
    ctx: Arc<FetchContext>,
    state: Mutex<State>,
    counters: SourceCounters,
}

impl fmt::Debug for ChunkedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkedBlob")
            .field("name", &self.name)
            .field("stored", &self.stored)
            .finish_non_exhaustive()
    }
}

thread_local! {
    static DECODER: std::cell::RefCell<UnitDecoder> = std::cell::RefCell::new(UnitDecoder::new());
    /// This thread is background work that took its turn (see [`Turn`]).
    static IN_TURN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Background work's turn, taken once no foreground fetch ran: while it
/// lives, the thread's background fetches go out without waiting again.
struct Turn(std::thread::ThreadId);

impl Turn {
    fn take() -> Turn {
        IN_TURN.with(|t| t.set(true));
        Turn(std::thread::current().id())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if std::thread::current().id() == self.0 {
            IN_TURN.with(|t| t.set(false));
        }
    }
}

impl ChunkedBlob {
    pub fn new(
        name: String,
        table: ChunkTable,
        stored: Arc<dyn RangeRead>,
        ctx: Arc<FetchContext>,
    ) -> Self {
        ChunkedBlob {
            name,
            table,
            stored,
            ctx,
            state: Mutex::default(),
            counters: SourceCounters::default(),
        }
    }

    pub fn table(&self) -> &ChunkTable {
        &self.table
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The verified bytes of units `first..=last`, fetching what is neither
    /// cached nor already being fetched.
    pub fn units(&self, first: u64, last: u64, priority: Priority) -> io::Result<Vec<Unit>> {
        let count = (last + 1).saturating_sub(first) as usize;
        let mut out: Vec<Option<Unit>> = vec![None; count];
        let mut waits = Vec::new();
        let mut claims = Claims {
            blob: self,
            pending: Vec::new(),
        };
        if priority == Priority::Background
            && !IN_TURN.with(std::cell::Cell::get)
            && !self.all_at_hand(first, last)
        {
            // Wait for foreground work to end before claiming anything: a
            // claim held while waiting would make a reader of that unit wait
            // for as long as other readers keep coming (priority inversion).
            // Units at hand (cached, held) claim nothing and are read at
            // once: read-ahead writes the units its announcement holds
            // without waiting again.
            self.ctx.gate.wait_idle();
        }
        {
            let mut st = self.lock();
            for index in first..=last {
                if let Some(unit) = st.cache.get(index) {
                    bump(&self.ctx.stats.cache_hits, 1);
                    out[(index - first) as usize] = Some(unit);
                } else if let Some(unit) = st.held.get(&index).and_then(Weak::upgrade) {
                    bump(&self.ctx.stats.cache_hits, 1);
                    out[(index - first) as usize] = Some(unit);
                } else if let Some(slot) = st.inflight.get(&index) {
                    waits.push((index, slot.clone()));
                } else {
                    let slot = Arc::new(Slot::default());
                    st.inflight.insert(index, slot.clone());
                    claims.pending.push((index, slot));
                }
            }
        }
        let mut first_error: Option<io::Error> = None;
        let mine: Vec<u64> = claims.pending.iter().map(|(i, _)| *i).collect();
        for run in self.runs(&mine) {
            let results = self.fetch_run(run, priority);
            for (index, result) in run.iter().copied().zip(results) {
                if let Ok(unit) = &result {
                    out[(index - first) as usize] = Some(unit.clone());
                } else if first_error.is_none() {
                    let (kind, msg) = result.clone().unwrap_err();
                    first_error = Some(io::Error::new(kind, msg));
                }
                claims.resolve(index, result);
            }
        }
        drop(claims);
        for (index, slot) in waits {
            bump(&self.ctx.stats.dedup_waits, 1);
            match slot.wait() {
                Ok(unit) => out[(index - first) as usize] = Some(unit),
                Err((kind, msg)) => {
                    first_error.get_or_insert_with(|| io::Error::new(kind, msg));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(out
            .into_iter()
            .map(|u| u.expect("every unit resolved or an error returned"))
            .collect())
    }

    /// Whether units `first..=last` are all cached or held (fetching none).
    fn all_at_hand(&self, first: u64, last: u64) -> bool {
        let st = self.lock();
        (first..=last).all(|i| {
            st.cache.units.contains_key(&i) || st.held.get(&i).is_some_and(|w| w.strong_count() > 0)
        })
    }

    /// Splits sorted unit indices into runs of consecutive units whose stored
    /// bytes together stay within `max_merge` (a run has at least one unit).
    fn runs<'a>(&self, indices: &'a [u64]) -> Vec<&'a [u64]> {
        let mut runs = Vec::new();
        let mut start = 0;
        let mut stored = 0u64;
        for (k, &index) in indices.iter().enumerate() {
            let len = self
                .table
                .unit(index)
                .map_or(0, |e| u64::from(e.stored_len));
            let joins = k > start
                && index == indices[k - 1] + 1
                && stored + len <= self.ctx.options.max_merge;
            if k > start && !joins {
                runs.push(&indices[start..k]);
                start = k;
                stored = 0;
            }
            stored += len;
        }
        if start < indices.len() {
            runs.push(&indices[start..]);
        }
        runs
    }

    /// Fetches one run of adjacent units with one range read and verifies
    /// each. A unit that fails verification is fetched once more on its own:
    /// bytes damaged on the way (a proxy, a flaky link) heal, a backend that
    /// keeps serving wrong bytes fails the read (never serves them).
    fn fetch_run(&self, run: &[u64], priority: Priority) -> Vec<UnitResult> {
        let mut results = self.fetch_run_once(run, priority);
        for k in 0..run.len() {
            if matches!(&results[k], Err((kind, _)) if *kind == io::ErrorKind::InvalidData) {
                if let Some(again) = self.fetch_run_once(&run[k..=k], priority).pop() {
                    results[k] = again;
                }
            }
        }
        results
    }

    /// One range read of the run, each unit verified.
    fn fetch_run_once(&self, run: &[u64], priority: Priority) -> Vec<UnitResult> {
        let entries: Vec<_> = run
            .iter()
            .map(|&i| self.table.unit(i).expect("index within the table").clone())
            .collect();
        let start = entries[0].stored_offset;
        let end = entries.last().map_or(start, |e| e.stored_range().end);
        // Background work waited for foreground work before it claimed this
        // run (see `units`), and does not wait again holding the claims.
        let _fg = (priority == Priority::Foreground).then(|| self.ctx.gate.foreground());
        let mut stored = crate::PooledBuf::new((end - start) as usize);
        let stats = &self.ctx.stats;
        bump(&stats.range_requests, 1);
        self.counters.start(end - start);
        let began = std::time::Instant::now();
        let fetched = self.stored.read_exact_at(&mut stored, start);
        bump(&stats.fetch_micros, micros_since(began));
        self.counters
            .finish(end - start, fetched.is_ok().then_some(end - start));
        if let Err(e) = fetched {
            bump(&stats.fetch_failures, 1);
            tracing::warn!(
                blob = %self.name,
                units = ?(run[0]..=run[run.len() - 1]),
                stored_range = ?(start..end),
                error = %e,
                "fetch failed"
            );
            let msg = format!(
                "blob {}: fetching units {}..={} (stored bytes {start}..{end}): {e}",
                self.name,
                run[0],
                run[run.len() - 1]
            );
            return run.iter().map(|_| Err((e.kind(), msg.clone()))).collect();
        }
        bump(&stats.stored_bytes, end - start);
        let decode = |k: usize| -> UnitResult {
            let (index, e) = (run[k], &entries[k]);
            let at = (e.stored_offset - start) as usize;
            let src = &stored[at..at + e.stored_len as usize];
            let began = std::time::Instant::now();
            let mut dst = crate::PooledBuf::new(e.len as usize);
            let r = DECODER.with(|d| d.borrow_mut().decode(&self.name, index, e, src, &mut dst));
            bump(&stats.decode_micros, micros_since(began));
            match r {
                Ok(()) => {
                    bump(&stats.units_fetched, 1);
                    if priority == Priority::Background {
                        bump(&stats.background_units, 1);
                    }
                    Ok(Arc::new(dst))
                }
                Err(err) => {
                    bump(&stats.verify_failures, 1);
                    self.counters.error();
                    tracing::error!(blob = %self.name, unit = index, error = %err,
                        "chunk failed verification: nothing of it is written");
                    Err((err.kind(), err.to_string()))
                }
            }
        };
        // Units are decompressed and hashed on several threads at once (the
        // caller's among them): unit k goes to share k % shares. Every unit is
        // verified before the run returns, and none leaves it unverified.
        let shares = self.decode_shares(run.len());
        if shares <= 1 {
            return (0..run.len()).map(decode).collect();
        }
        let mut results: Vec<Option<UnitResult>> = vec![None; run.len()];
        let decode = &decode;
        let done: Vec<Vec<(usize, UnitResult)>> = std::thread::scope(|s| {
            let helpers: Vec<_> = (1..shares)
                .map(|share| {
                    std::thread::Builder::new()
                        .name("lazypull-decode".into())
                        .spawn_scoped(s, move || {
                            (share..run.len())
                                .step_by(shares)
                                .map(|k| (k, decode(k)))
                                .collect::<Vec<_>>()
                        })
                })
                .collect();
            let mut done = Vec::with_capacity(shares);
            // Units of a share whose thread could not start are decoded here.
            let mut mine: Vec<usize> = (0..run.len()).step_by(shares).collect();
            let mut started = Vec::new();
            for (share, h) in (1..shares).zip(helpers) {
                match h {
                    Ok(h) => started.push(h),
                    Err(_) => mine.extend((share..run.len()).step_by(shares)),
                }
            }
            done.push(mine.into_iter().map(|k| (k, decode(k))).collect());
            for h in started {
                // A panicking decoder (a bug) fails the units it had: they
                // stay unresolved below.
                if let Ok(v) = h.join() {
                    done.push(v);
                }
            }
            done
        });
        for (k, r) in done.into_iter().flatten() {
            results[k] = Some(r);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err((
                        io::ErrorKind::Other,
                        format!("blob {}: decoding a unit panicked (a bug)", self.name),
                    ))
                })
            })
            .collect()
    }

    /// How many threads decode a run of `units` units.
    fn decode_shares(&self, units: usize) -> usize {
        let threads = match self.ctx.options.decode_threads {
            0 => crate::readahead::default_threads(),
            n => n,
        };
        threads.min(units).max(1)
    }

    /// Fetches (at `priority`) every unit of `[off, off + len)` not yet cached,
    /// bounded to what the unit cache can hold.
    pub fn ensure(&self, off: u64, len: u64, priority: Priority) -> io::Result<()> {
        self.hold(off, len, priority).map(drop)
    }

    /// [`ensure`](Self::ensure), keeping the units for the caller until the
    /// hold drops: at most the unit cache's budget, or one unit if a unit is
    /// larger than that. The hold covers that part of the range.
    fn hold(&self, off: u64, len: u64, priority: Priority) -> io::Result<ReadHold> {
        if len == 0 && priority == Priority::Background {
            // A zero-length background announcement is background work
            // taking its turn (`crate::fill_ahead`): it returns once no
            // foreground fetch runs, and claims nothing. Until the returned
            // hold drops, this thread's background fetches do not wait again:
            // the caller claims windows now, and readers may wait for them.
            self.ctx.gate.wait_idle();
            return Ok(ReadHold::new(off..off, Box::new(Turn::take())));
        }
        let size = self.table.uncompressed_size();
        let end = off.saturating_add(len).min(size);
        if off >= end {
            return Ok(ReadHold::nothing(off..off.saturating_add(len)));
        }
        let unit = u64::from(self.table.unit_size());
        let first = off / unit;
        let budget_units = (self.ctx.options.cache_bytes as u64 / unit).max(1);
        let last = ((end - 1) / unit).min(first + budget_units - 1);
        let units = self.units(first, last, priority)?;
        {
            let mut st = self.lock();
            st.held.retain(|_, w| w.strong_count() > 0);
            for (index, u) in (first..).zip(&units) {
                // Another live hold of the unit stays as good as this one.
                st.held
                    .entry(index)
                    .and_modify(|w| {
                        if w.strong_count() == 0 {
                            *w = Arc::downgrade(u);
                        }
                    })
                    .or_insert_with(|| Arc::downgrade(u));
            }
        }
        // Past the end of the blob is covered too: nothing is there to fetch.
        let covered_end = if (last + 1) * unit >= end {
            off.saturating_add(len)
        } else {
            (last + 1) * unit
        };
        Ok(ReadHold::new(off..covered_end, Box::new(units)))
    }
}

impl BlobSource for ChunkedBlob {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.table.uncompressed_size()
    }

    fn preferred_read_size(&self) -> Option<usize> {
        Some(self.table.unit_size() as usize)
    }

    /// Every byte is verified against the chunk table: its sha256 binds it.
    fn content_binding(&self) -> Option<[u8; 32]> {
        Some(self.table.sha256())
    }

    fn source_stats(&self) -> SourceStats {
        self.counters.snapshot()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.read_at_priority(buf, off, Priority::Foreground)
    }

    fn will_read(&self, off: u64, len: u64, priority: Priority) -> io::Result<ReadHold> {
        self.hold(off, len, priority)
    }

    fn read_at_priority(&self, buf: &mut [u8], off: u64, priority: Priority) -> io::Result<usize> {
        let size = self.table.uncompressed_size();
        let end = off.saturating_add(buf.len() as u64).min(size);
        if off >= end {
            return Ok(0);
        }
        let unit = u64::from(self.table.unit_size());
        let first = off / unit;
        let units = self.units(first, (end - 1) / unit, priority)?;
        for (k, data) in units.iter().enumerate() {
            let ustart = (first + k as u64) * unit;
            let from = off.max(ustart);
            let to = end.min(ustart + data.len() as u64);
            buf[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&data[(from - ustart) as usize..(to - ustart) as usize]);
        }
        Ok((end - off) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazypull_blob::{pack, Compression, PackOptions};
    use std::sync::atomic::AtomicBool;

    /// Stored bytes in memory that log every range read and can be told to
    /// corrupt or fail them, or to hold them at a gate.
    #[derive(Debug, Default)]
    struct Remote {
        data: Vec<u8>,
        log: Mutex<Vec<(u64, usize)>>,
        corrupt: AtomicBool,
        /// Corrupts the next read only.
        corrupt_once: AtomicBool,
        fail: AtomicBool,
        gate: Mutex<Gate>,
        gate_changed: Condvar,
        /// `ctx.gate.foreground_active()` at each read, once `ctx` is set.
        ctx: std::sync::OnceLock<Arc<FetchContext>>,
        foreground_at_read: Mutex<Vec<usize>>,
    }

    /// While `closed`, reads (already logged) wait; `held` counts them.
    #[derive(Debug, Default)]
    struct Gate {
        closed: bool,
        held: usize,
    }

    impl Remote {
        fn close_gate(&self) {
            self.gate.lock().unwrap().closed = true;
        }

        fn open_gate(&self) {
            self.gate.lock().unwrap().closed = false;
            self.gate_changed.notify_all();
        }

        /// Reads waiting at the closed gate.
        fn held(&self) -> usize {
            self.gate.lock().unwrap().held
        }
    }

    /// Waits for `cond` (set by other threads). No time limit: these tests
    /// depend on the order of events only, never on how fast threads run.
    fn until(cond: impl Fn() -> bool) {
        while !cond() {
            std::thread::yield_now();
        }
    }

    impl RangeRead for Remote {
        fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.log.lock().unwrap().push((off, buf.len()));
            if let Some(ctx) = self.ctx.get() {
                let active = ctx.gate.foreground_active();
                self.foreground_at_read.lock().unwrap().push(active);
            }
            {
                let mut g = self.gate.lock().unwrap();
                g.held += 1;
                while g.closed {
                    g = self.gate_changed.wait(g).unwrap();
                }
                g.held -= 1;
            }
            if self.fail.load(Ordering::Relaxed) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "injected reset",
                ));
            }
            let start = off as usize;
            let src = self
                .data
                .get(start..start + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            if self.corrupt.load(Ordering::Relaxed)
                || self.corrupt_once.swap(false, Ordering::Relaxed)
            {
                let mid = buf.len() / 2;
                buf[mid] ^= 0xff;
            }
            Ok(())
        }
    }

    /// A 64 KiB-unit blob of `units` units (the last one short), packed with
    /// zstd; returns its bytes, the remote and the blob.
    fn fixture(units: usize, opts: FetchOptions) -> (Vec<u8>, Arc<Remote>, ChunkedBlob) {
        let dir = tempfile::tempdir().unwrap();
        let unit = 64 << 10;
        let data: Vec<u8> = (0..units * unit - 1000)
            .map(|i| ((i / 7) % 251) as u8 ^ (i % 13) as u8)
            .collect();
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        let packed = pack(
            &path,
            dir.path(),
            &PackOptions {
                unit_size: unit as u32,
                compression: Compression::Zstd { level: 1 },
            },
        )
        .unwrap();
        let table = ChunkTable::decode(&std::fs::read(&packed.table_path).unwrap()).unwrap();
        let remote = Arc::new(Remote {
            data: std::fs::read(&packed.data_path).unwrap(),
            ..Default::default()
        });
        let blob = ChunkedBlob::new(
            packed.digest,
            table,
            remote.clone(),
            FetchContext::new(opts),
        );
        (data, remote, blob)
    }

    fn read(blob: &ChunkedBlob, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = blob.read_at(&mut buf, off)?;
        buf.truncate(n);
        Ok(buf)
    }

    #[test]
    fn reads_return_the_blob_bytes() {
        let (data, _remote, blob) = fixture(5, FetchOptions::default());
        assert_eq!(blob.size(), data.len() as u64);
        for (off, len) in [
            (0, 10),
            (65530, 20),
            (100_000, 200_000),
            (0, data.len() + 50),
        ] {
            let got = read(&blob, off as u64, len).unwrap();
            let end = (off + len).min(data.len());
            assert_eq!(got, &data[off..end], "at {off} +{len}");
        }
        assert!(read(&blob, data.len() as u64, 10).unwrap().is_empty());
    }

    #[test]
    fn adjacent_units_are_merged_up_to_the_limit() {
        let (data, remote, blob) = fixture(
            8,
            FetchOptions {
                max_merge: 1 << 30,
                cache_bytes: 16 << 20,
                decode_threads: 0,
            },
        );
        blob.ensure(0, data.len() as u64, Priority::Foreground)
            .unwrap();
        assert_eq!(
            remote.log.lock().unwrap().len(),
            1,
            "one range read for 8 units"
        );
        // Everything is cached now: reading it all costs no request.
        assert_eq!(read(&blob, 0, data.len()).unwrap(), data);
        assert_eq!(remote.log.lock().unwrap().len(), 1);

        // A limit below two units' stored size: one request per unit.
        let (data, remote, blob) = fixture(
            4,
            FetchOptions {
                max_merge: 1,
                cache_bytes: 16 << 20,
                decode_threads: 0,
            },
        );
        assert_eq!(read(&blob, 0, data.len()).unwrap(), data);
        let log = remote.log.lock().unwrap();
        assert_eq!(log.len(), 4, "{log:?}");
        let expected: Vec<_> = (0..4)
            .map(|i| {
                let e = blob.table().unit(i).unwrap();
                (e.stored_offset, e.stored_len as usize)
            })
            .collect();
        assert_eq!(*log, expected);
    }

    #[test]
    fn concurrent_readers_of_the_same_units_fetch_each_once() {
        let (data, remote, blob) = fixture(
            4,
            FetchOptions {
                max_merge: 1,
                cache_bytes: 0,
                decode_threads: 0,
            },
        );
        // No fetch completes before every reader has claimed its units or
        // registered as a waiter on them: without a unit cache, a unit
        // fetched twice could only be in-flight dedup failing.
        remote.close_gate();
        let blob = Arc::new(blob);
        let threads: Vec<_> = (0..64)
            .map(|t| {
                let blob = blob.clone();
                std::thread::spawn(move || {
                    // Different shapes over the same units: whole, halves, a byte.
                    let (off, len) = match t % 3 {
                        0 => (0, 4 << 16),
                        1 => (1 << 16, 2 << 16),
                        _ => (3 << 16, 1),
                    };
                    (off, read(&blob, off as u64, len).unwrap())
                })
            })
            .collect();
        // A reader past its claims either holds a fetch at the gate (its first
        // one) or waits for a unit someone else claimed (counted once, before
        // it waits): one each, while nothing completes.
        until(|| remote.held() + blob.ctx.stats.snapshot().dedup_waits as usize == 64);
        remote.open_gate();
        for t in threads {
            let (off, got) = t.join().unwrap();
            assert_eq!(got, &data[off..off + got.len()]);
        }
        let mut log = remote.log.lock().unwrap().clone();
        log.sort();
        let before = log.len();
        log.dedup();
        assert_eq!(before, log.len(), "a unit was fetched twice: {log:?}");
        assert_eq!(log.len(), 4);
        let stats = blob.ctx.stats.snapshot();
        assert_eq!(stats.units_fetched, 4);
        // 22 readers of units 0..=3, 21 of 1..=2, 21 of 3: 151 unit requests,
        // of which 4 fetched and every other one waited.
        assert_eq!(stats.dedup_waits, 22 * 4 + 21 * 2 + 21 - 4, "{stats:?}");
    }

    #[test]
    fn bytes_corrupted_once_on_the_way_are_fetched_again_and_read_right() {
        let (data, remote, blob) = fixture(3, FetchOptions::default());
        remote.corrupt_once.store(true, Ordering::Relaxed);
        assert_eq!(read(&blob, 70_000, 100).unwrap(), &data[70_000..70_100]);
        assert_eq!(blob.ctx.stats.snapshot().verify_failures, 1);
        assert_eq!(remote.log.lock().unwrap().len(), 2, "fetched once more");
    }

    #[test]
    fn corrupt_bytes_are_an_error_and_never_kept() {
        let (data, remote, blob) = fixture(3, FetchOptions::default());
        remote.corrupt.store(true, Ordering::Relaxed);
        let err = read(&blob, 70_000, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("unit 1"), "{err}");
        // Fetched twice (the second time on its own), failed twice.
        assert_eq!(blob.ctx.stats.snapshot().verify_failures, 2);
        assert_eq!(remote.log.lock().unwrap().len(), 2);
        // Nothing of the bad fetch was cached: with the network healed, the
        // next read fetches again and gets the right bytes.
        remote.corrupt.store(false, Ordering::Relaxed);
        assert_eq!(read(&blob, 70_000, 100).unwrap(), &data[70_000..70_100]);
        assert_eq!(remote.log.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_failed_fetch_fails_its_waiters_too_and_is_retried_later() {
        let (data, remote, blob) = fixture(2, FetchOptions::default());
        remote.fail.store(true, Ordering::Relaxed);
        // The fetch fails only once all 8 readers are in: the one that claimed
        // the unit holds its fetch at the gate, the other 7 wait for it.
        remote.close_gate();
        let blob = Arc::new(blob);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let blob = blob.clone();
                std::thread::spawn(move || read(&blob, 10, 10))
            })
            .collect();
        until(|| remote.held() + blob.ctx.stats.snapshot().dedup_waits as usize == 8);
        assert_eq!(remote.held(), 1, "one reader fetches");
        remote.open_gate();
        for t in threads {
            let err = t.join().unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
            assert!(err.to_string().contains("injected reset"), "{err}");
        }
        assert_eq!(
            remote.log.lock().unwrap().len(),
            1,
            "waiters shared the one failure"
        );
        assert_eq!(blob.ctx.stats.snapshot().dedup_waits, 7);
        remote.fail.store(false, Ordering::Relaxed);
        assert_eq!(read(&blob, 10, 10).unwrap(), &data[10..20]);
        assert_eq!(blob.ctx.stats.snapshot().fetch_failures, 1);
        assert_eq!(remote.log.lock().unwrap().len(), 2);
    }

    #[test]
    fn background_fetches_wait_for_foreground_ones() {
        let (_data, remote, blob) = fixture(2, FetchOptions::default());
        remote.ctx.set(blob.ctx.clone()).unwrap();
        let blob = Arc::new(blob);
        let guard = blob.ctx.gate.foreground();
        let bg = {
            let blob = blob.clone();
            std::thread::spawn(move || blob.ensure(0, 1, Priority::Background))
        };
        // Once the background fetch waits at the gate, only the gate stands
        // in its way.
        until(|| blob.ctx.gate.background_waiting() == 1);
        assert!(
            remote.log.lock().unwrap().is_empty(),
            "background ran during foreground work"
        );
        drop(guard);
        bg.join().unwrap().unwrap();
        assert_eq!(remote.log.lock().unwrap().len(), 1);
        assert_eq!(
            *remote.foreground_at_read.lock().unwrap(),
            [0],
            "the background fetch went out while foreground work ran"
        );
        assert_eq!(blob.ctx.stats.snapshot().background_units, 1);
    }

    /// A fill target's sink in memory.
    struct VecSink(Mutex<Vec<u8>>);

    impl crate::CacheSink for VecSink {
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            d[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    /// Fills `[off, off + len)` of `blob` into `sink` as a transport would.
    fn fill_into(
        blob: &ChunkedBlob,
        sink: &VecSink,
        off: u64,
        len: u64,
        policy: &crate::FillPolicy,
    ) -> Result<crate::FillOutcome, crate::FillError> {
        let map = crate::FillMap::new(blob.size(), policy.window);
        let mut buf = crate::AlignedBuf::new(policy.buffer_size_for(blob));
        let target = crate::Target {
            source: blob,
            object_size: blob.size(),
            map: &map,
            sink,
            priority: Priority::Foreground,
        };
        crate::fill(&target, off, len, policy, &mut buf)
    }

    #[test]
    fn a_background_fetch_waiting_for_foreground_work_claims_nothing() {
        let (data, remote, blob) = fixture(2, FetchOptions::default());
        let blob = Arc::new(blob);
        // Foreground work of others runs for as long as this test likes.
        let guard = blob.ctx.gate.foreground();
        let bg = {
            let blob = blob.clone();
            std::thread::spawn(move || blob.ensure(0, 1, Priority::Background))
        };
        until(|| blob.ctx.gate.background_waiting() == 1);
        assert!(
            blob.lock().inflight.is_empty(),
            "the waiting background fetch holds a claim a reader would wait on"
        );
        // So a reader of that unit is served now, foreground work or not.
        assert_eq!(read(&blob, 10, 10).unwrap(), &data[10..20]);
        assert_eq!(remote.log.lock().unwrap().len(), 1);
        drop(guard);
        bg.join().unwrap().unwrap();
        // The background fetch found the unit cached.
        assert_eq!(remote.log.lock().unwrap().len(), 1);
        assert_eq!(blob.ctx.stats.snapshot().background_units, 0);
    }

    #[test]
    fn a_failing_unit_is_fetched_once_per_fill() {
        let (_data, remote, blob) = fixture(2, FetchOptions::default());
        remote.fail.store(true, Ordering::Relaxed);
        let sink = VecSink(Mutex::new(vec![0; blob.size() as usize]));
        let err = fill_into(&blob, &sink, 0, 10, &crate::FillPolicy::default()).unwrap_err();
        assert!(
            matches!(err, crate::FillError::Read { .. })
                && err.to_string().contains("injected reset"),
            "{err}"
        );
        assert_eq!(
            remote.log.lock().unwrap().len(),
            1,
            "the announcement and the read fetched the failing units each"
        );
        assert_eq!(blob.ctx.stats.snapshot().fetch_failures, 1);
    }

    #[test]
    fn a_unit_larger_than_the_unit_cache_is_fetched_once_per_fill() {
        // 64 KiB units, a unit cache that holds none of them, 4 KiB windows:
        // one fill of the whole blob covers 32 windows of 2 units.
        let (data, remote, blob) = fixture(
            2,
            FetchOptions {
                cache_bytes: 16 << 10,
                ..FetchOptions::default()
            },
        );
        let policy = crate::FillPolicy {
            window: 4096,
            io_size: 4096,
        };
        let sink = VecSink(Mutex::new(vec![0; blob.size() as usize]));
        let out = fill_into(&blob, &sink, 0, blob.size(), &policy).unwrap();
        assert_eq!(out.bytes_written, data.len() as u64);
        assert!(*sink.0.lock().unwrap() == data);
        let expected: Vec<_> = (0..2)
            .map(|i| {
                let e = blob.table().unit(i).unwrap();
                (e.stored_offset, e.stored_len as usize)
            })
            .collect();
        assert_eq!(*remote.log.lock().unwrap(), expected, "each unit once");
        assert_eq!(blob.ctx.stats.snapshot().units_fetched, 2);
        // Nothing is kept past the fill: the cache budget holds.
        assert_eq!(blob.lock().cache.bytes, 0);
    }

    #[test]
    fn unit_cache_stays_within_budget() {
        let mut cache = UnitCache::default();
        for i in 0..10 {
            cache.insert(i, Arc::new(crate::PooledBuf::from_vec(vec![0; 100])), 350);
        }
        assert_eq!(cache.bytes, 300);
        assert!(cache.get(9).is_some() && cache.get(6).is_none());
        cache.insert(
            100,
            Arc::new(crate::PooledBuf::from_vec(vec![0; 1000])),
            350,
        );
        assert!(
            cache.get(100).is_none(),
            "a unit larger than the budget is not kept"
        );
    }

    fn opts(max_merge: u64, cache_bytes: usize, decode_threads: usize) -> FetchOptions {
        FetchOptions {
            max_merge,
            cache_bytes,
            decode_threads,
        }
    }

    /// 64 KiB windows: one per unit of the fixtures.
    const POLICY: crate::FillPolicy = crate::FillPolicy {
        window: 64 << 10,
        io_size: 64 << 10,
    };

    fn target<'a>(
        blob: &'a ChunkedBlob,
        map: &'a crate::FillMap,
        sink: &'a VecSink,
        priority: Priority,
    ) -> crate::Target<'a> {
        crate::Target {
            source: blob,
            object_size: blob.size(),
            map,
            sink,
            priority,
        }
    }

    fn assert_each_stored_byte_once(remote: &Remote) {
        let mut log = remote.log.lock().unwrap().clone();
        log.sort();
        for w in log.windows(2) {
            assert!(
                w[0].0 + w[0].1 as u64 <= w[1].0,
                "overlapping fetches: {w:?}"
            );
        }
        let moved: u64 = log.iter().map(|(_, len)| *len as u64).sum();
        assert_eq!(moved, remote.data.len() as u64, "every stored byte once");
    }

    #[test]
    fn parallel_verification_gives_the_same_bytes_as_one_thread() {
        for threads in [1, 2, 3, 8] {
            let (data, remote, blob) = fixture(13, opts(1 << 30, 16 << 20, threads));
            assert_eq!(blob.decode_shares(13), threads.min(13));
            blob.ensure(0, data.len() as u64, Priority::Foreground)
                .unwrap();
            assert_eq!(remote.log.lock().unwrap().len(), 1, "one range read");
            assert_eq!(
                read(&blob, 0, data.len()).unwrap(),
                data,
                "{threads} threads"
            );
            let stats = blob.ctx.stats.snapshot();
            assert_eq!((stats.units_fetched, stats.verify_failures), (13, 0));
        }
    }

    #[test]
    fn a_corrupt_unit_in_the_middle_of_a_multi_unit_fetch_fails_alone_and_is_never_written() {
        let (data, remote, blob) = fixture(9, opts(1 << 30, 16 << 20, 4));
        remote.corrupt.store(true, Ordering::Relaxed);
        // The remote flips the middle byte of each read: one range read of
        // all 9 units corrupts the unit holding the middle stored byte.
        let mid = remote.data.len() as u64 / 2;
        let bad = (0..9)
            .find(|&i| blob.table().unit(i).unwrap().stored_range().contains(&mid))
            .unwrap();
        assert!(bad > 0 && bad < 8, "unit {bad} is not in the middle");
        let map = crate::FillMap::new(blob.size(), POLICY.window);
        let sink = VecSink(Mutex::new(vec![0; blob.size() as usize]));
        let mut buf = crate::AlignedBuf::new(POLICY.buffer_size_for(&blob));
        let err = crate::fill(
            &target(&blob, &map, &sink, Priority::Foreground),
            0,
            blob.size(),
            &POLICY,
            &mut buf,
        )
        .unwrap_err();
        assert!(err.to_string().contains(&format!("unit {bad}")), "{err}");
        // The run, then the bad unit once more on its own (corrupt again).
        assert_eq!(remote.log.lock().unwrap().len(), 2);
        let stats = blob.ctx.stats.snapshot();
        assert_eq!(stats.verify_failures, 2, "{stats:?}");
        // The fill's announcement of the run failed: no window is written.
        // The other units were verified (each on its own) and are cached;
        // nothing of the bad one is kept anywhere.
        for i in 0..9 {
            assert!(!map.is_filled(i) && !map.is_filled_or_busy(i), "window {i}");
        }
        assert!(sink.0.lock().unwrap().iter().all(|&b| b == 0));
        let cached: Vec<u64> = (0..9)
            .filter(|i| blob.lock().cache.units.contains_key(i))
            .collect();
        let others: Vec<u64> = (0..9).filter(|&i| i != bad).collect();
        assert_eq!(cached, others);
        // Healed, the same fill completes with the right bytes.
        remote.corrupt.store(false, Ordering::Relaxed);
        crate::fill(
            &target(&blob, &map, &sink, Priority::Foreground),
            0,
            blob.size(),
            &POLICY,
            &mut buf,
        )
        .unwrap();
        assert!(*sink.0.lock().unwrap() == data);
    }

    /// A reader moving sequentially, window by window, through `windows` of
    /// `blob` (64 KiB windows), reading ahead inline (the job run at once)
    /// up to `distance`. Returns the bytes read ahead.
    fn read_sequentially(
        blob: &ChunkedBlob,
        map: &crate::FillMap,
        sink: &VecSink,
        stream: &crate::Stream,
        windows: std::ops::Range<u64>,
        distance: u64,
    ) -> u64 {
        let w = POLICY.window;
        let mut buf = crate::AlignedBuf::new(POLICY.buffer_size_for(blob));
        let mut ahead = 0;
        for i in windows {
            if let Some(a) = stream.observe(i * w, w, blob.size(), w, distance) {
                let out = crate::fill_ahead(
                    &target(blob, map, sink, Priority::Background),
                    a.off,
                    a.len,
                    &POLICY,
                    &mut buf,
                    &|| stream.is_stale(a.generation),
                )
                .unwrap();
                ahead += out.bytes_written;
            }
            crate::fill(
                &target(blob, map, sink, Priority::Foreground),
                i * w,
                w,
                &POLICY,
                &mut buf,
            )
            .unwrap();
            map.touch(i * w, w, blob.size());
        }
        ahead
    }

    #[test]
    fn read_ahead_never_read_is_bounded_by_the_distance_and_counted() {
        let (data, remote, blob) = fixture(40, opts(1 << 30, 16 << 20, 2));
        let w = POLICY.window;
        let map = crate::FillMap::new(blob.size(), w);
        let sink = VecSink(Mutex::new(vec![0; blob.size() as usize]));
        let stream = crate::Stream::default();
        // Windows 0..4 read; read-ahead ramps up (one window past the
        // reader, then two, then four), never more than the distance (8).
        let ahead = read_sequentially(&blob, &map, &sink, &stream, 0..4, 8 * w);
        assert_eq!(ahead, 6 * w, "windows 2..=7 were read ahead");
        // Of those, 2 and 3 were read: 4 windows were not.
        assert_eq!(map.unread_ahead_bytes(blob.size()), 4 * w);
        // The reader jumps (random access): no read-ahead for it, and
        // read-ahead asked for before the jump is stale.
        let before = stream.generation();
        let jump = read_sequentially(&blob, &map, &sink, &stream, 25..26, 8 * w);
        assert_eq!(jump, 0);
        assert!(stream.is_stale(before));
        // Sequential again from there: the ramp starts over, and at most the
        // distance is left unread past the new position.
        let again = read_sequentially(&blob, &map, &sink, &stream, 26..28, 8 * w);
        assert_eq!(again, 3 * w, "windows 27..=29");
        assert_eq!(map.unread_ahead_bytes(blob.size()), 6 * w);
        // Every byte written is the blob's, and nothing was fetched twice.
        let written = sink.0.lock().unwrap().clone();
        for i in 0..40u64 {
            let r = (i * w) as usize..(((i + 1) * w) as usize).min(data.len());
            if map.is_filled(i) {
                assert_eq!(written[r.clone()], data[r], "window {i}");
            }
        }
        let mut log = remote.log.lock().unwrap().clone();
        let n = log.len();
        log.sort();
        log.dedup();
        assert_eq!(log.len(), n, "a range was fetched twice");
        // Windows 0..=7, 25, 26..=29: each once.
        assert_eq!(blob.ctx.stats.snapshot().units_fetched, 8 + 1 + 4);
    }

    #[test]
    fn a_reader_meeting_read_ahead_in_flight_waits_for_it_and_fetches_nothing() {
        let (data, remote, blob) = fixture(6, opts(1 << 30, 16 << 20, 2));
        let blob = Arc::new(blob);
        let w = POLICY.window;
        let map = Arc::new(crate::FillMap::new(blob.size(), w));
        let sink = Arc::new(VecSink(Mutex::new(vec![0; blob.size() as usize])));
        // Read-ahead of windows 1..=4 claims them, then fetches (held at
        // the gate).
        remote.close_gate();
        let ra = {
            let (blob, map, sink) = (blob.clone(), map.clone(), sink.clone());
            std::thread::spawn(move || {
                let mut buf = crate::AlignedBuf::new(POLICY.buffer_size_for(blob.as_ref()));
                crate::fill_ahead(
                    &target(&blob, &map, &sink, Priority::Background),
                    w,
                    4 * w,
                    &POLICY,
                    &mut buf,
                    &|| false,
                )
                .unwrap()
            })
        };
        until(|| remote.held() == 1);
        assert!(
            (1..=4).all(|i| map.is_filled_or_busy(i)) && !map.is_filled_or_busy(5),
            "read-ahead fetches only windows it claimed"
        );
        // A reader of window 2 waits for the window; it fetches nothing.
        let reader = {
            let (blob, map, sink) = (blob.clone(), map.clone(), sink.clone());
            std::thread::spawn(move || {
                let mut buf = crate::AlignedBuf::new(POLICY.buffer_size_for(blob.as_ref()));
                crate::fill(
                    &target(&blob, &map, &sink, Priority::Foreground),
                    2 * w + 10,
                    10,
                    &POLICY,
                    &mut buf,
                )
                .unwrap()
            })
        };
        remote.open_gate();
        let mine = reader.join().unwrap();
        let ahead = ra.join().unwrap();
        assert_eq!((mine.windows_written, mine.windows_overlapped), (0, 1));
        assert_eq!(ahead.windows_written, 4);
        assert_eq!(remote.log.lock().unwrap().len(), 1, "one fetch for both");
        let written = sink.0.lock().unwrap().clone();
        let r = w as usize..5 * w as usize;
        assert_eq!(written[r.clone()], data[r]);
        assert_eq!(blob.ctx.stats.snapshot().units_fetched, 4);
        // The reader read window 2: the other three are read ahead, unread.
        assert_eq!(map.touch(2 * w + 10, 10, blob.size()), w);
        assert_eq!(map.unread_ahead_bytes(blob.size()), 3 * w);
    }

    #[test]
    fn a_reader_never_waits_for_a_prefetch_waiting_for_foreground_work() {
        let (data, remote, blob) = fixture(2, FetchOptions::default());
        let blob = Arc::new(blob);
        let map = Arc::new(crate::FillMap::new(blob.size(), POLICY.window));
        let sink = Arc::new(VecSink(Mutex::new(vec![0; blob.size() as usize])));
        // Other readers' foreground work goes on for as long as this test likes.
        let guard = blob.ctx.gate.foreground();
        let bg = {
            let (blob, map, sink) = (blob.clone(), map.clone(), sink.clone());
            std::thread::spawn(move || {
                let mut buf = crate::AlignedBuf::new(POLICY.buffer_size_for(blob.as_ref()));
                crate::fill(
                    &target(&blob, &map, &sink, Priority::Background),
                    0,
                    blob.size(),
                    &POLICY,
                    &mut buf,
                )
                .unwrap()
            })
        };
        until(|| blob.ctx.gate.background_waiting() == 1);
        assert!(
            !map.is_filled_or_busy(0),
            "a waiting prefetch holds a window"
        );
        // So a reader of window 0 is served now.
        let mut buf = crate::AlignedBuf::new(POLICY.buffer_size_for(blob.as_ref()));
        crate::fill(
            &target(&blob, &map, &sink, Priority::Foreground),
            0,
            10,
            &POLICY,
            &mut buf,
        )
        .unwrap();
        assert_eq!(sink.0.lock().unwrap()[..10], data[..10]);
        drop(guard);
        let out = bg.join().unwrap();
        assert_eq!(out.windows_written, 1, "the prefetch filled window 1 only");
        assert_eq!(
            blob.ctx.stats.snapshot().background_units,
            1,
            "its unit is counted as background work"
        );
        assert!(*sink.0.lock().unwrap() == data);
        assert_each_stored_byte_once(&remote);
    }

    #[test]
    fn concurrent_read_ahead_and_readers_fetch_every_stored_byte_once() {
        for round in 0..8 {
            // Small requests and a unit cache of 4 units: units are evicted
            // long before the reader gets there, as in a tree walk.
            let (data, remote, blob) = fixture(48, opts(120 << 10, 256 << 10, 2));
            let blob = Arc::new(blob);
            let w = POLICY.window;
            let map = Arc::new(crate::FillMap::new(blob.size(), w));
            let sink = Arc::new(VecSink(Mutex::new(vec![0; blob.size() as usize])));
            let stream = Arc::new(crate::Stream::default());
            let pool = crate::ReadAheadPool::start(2).unwrap();
            let readers: Vec<_> = (0..2)
                .map(|r| {
                    let (blob, map, sink, stream, pool) = (
                        blob.clone(),
                        map.clone(),
                        sink.clone(),
                        stream.clone(),
                        pool.clone(),
                    );
                    std::thread::spawn(move || {
                        let mut buf = crate::AlignedBuf::new(POLICY.buffer_size_for(blob.as_ref()));
                        // Reader 0 reads in 16 KiB steps, reader 1 in windows.
                        let step = if r == 0 { 16 << 10 } else { w };
                        let mut off = 0;
                        while off < blob.size() {
                            let ahead = stream.observe(off, step, blob.size(), w, 6 * w);
                            if let Some(a) = ahead {
                                let (blob, map, sink, stream) =
                                    (blob.clone(), map.clone(), sink.clone(), stream.clone());
                                pool.submit(move |stop| {
                                    let mut buf = crate::AlignedBuf::new(
                                        POLICY.buffer_size_for(blob.as_ref()),
                                    );
                                    crate::fill_ahead(
                                        &target(&blob, &map, &sink, Priority::Background),
                                        a.off,
                                        a.len,
                                        &POLICY,
                                        &mut buf,
                                        &|| {
                                            stop.load(Ordering::Acquire)
                                                || stream.is_stale(a.generation)
                                        },
                                    )
                                    .unwrap();
                                });
                            }
                            crate::fill(
                                &target(&blob, &map, &sink, Priority::Foreground),
                                off,
                                step,
                                &POLICY,
                                &mut buf,
                            )
                            .unwrap();
                            off += step;
                        }
                    })
                })
                .collect();
            for r in readers {
                r.join().unwrap();
            }
            pool.stop();
            assert!(*sink.0.lock().unwrap() == data, "round {round}");
            assert_each_stored_byte_once(&remote);
        }
    }
}
