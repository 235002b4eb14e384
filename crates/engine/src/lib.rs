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

mod buf;
pub mod chunked;
pub mod local_cache;
mod private_dir;

pub use buf::AlignedBuf;
pub use chunked::{
    ChunkedBlob, FetchContext, FetchOptions, FetchStats, FetchStatsSnapshot, PriorityGate,
};
use lazypull_source::BlobSource;
pub use lazypull_source::Priority;
pub use local_cache::{CacheFile, CacheReadError, NO_BINDING};
pub use private_dir::private_dir;
use std::io;
use std::sync::Mutex;

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

/// Which fill windows of one object have been written.
#[derive(Debug)]
pub struct FillMap {
    window: u64,
    bits: Mutex<Vec<u64>>,
}

impl FillMap {
    pub fn new(object_size: u64, window: u64) -> Self {
        let windows = object_size.div_ceil(window);
        FillMap {
            window,
            bits: Mutex::new(vec![0; windows.div_ceil(64) as usize]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        // A panic while holding this lock cannot leave the bitmap half-updated
        // (single word stores), so a poisoned lock is still usable.
        self.bits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A map restored from [`words`](Self::words) saved earlier (missing words
    /// read as unfilled, extra ones are ignored).
    pub fn from_words(object_size: u64, window: u64, mut words: Vec<u64>) -> Self {
        let windows = object_size.div_ceil(window);
        words.resize(windows.div_ceil(64) as usize, 0);
        if let Some(last) = words.last_mut() {
            let used = windows % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        FillMap {
            window,
            bits: Mutex::new(words),
        }
    }

    /// The bitmap, one bit per window, for saving.
    pub fn words(&self) -> Vec<u64> {
        self.lock().clone()
    }

    /// Bytes of an object of `object_size` covered by filled windows.
    pub fn filled_bytes(&self, object_size: u64) -> u64 {
        let bits = self.lock();
        let windows = object_size.div_ceil(self.window);
        let mut total = bits.iter().map(|w| w.count_ones() as u64).sum::<u64>() * self.window;
        // The last window may be short.
        let last = windows.saturating_sub(1);
        if windows > 0
            && bits
                .get((last / 64) as usize)
                .is_some_and(|w| w & (1 << (last % 64)) != 0)
        {
            total -= windows * self.window - object_size;
        }
        total
    }

    pub fn is_filled(&self, index: u64) -> bool {
        let bits = self.lock();
        bits.get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    fn mark(&self, index: u64) {
        let mut bits = self.lock();
        if let Some(w) = bits.get_mut((index / 64) as usize) {
            *w |= 1 << (index % 64);
        }
    }

    /// Number of windows written so far.
    pub fn filled_windows(&self) -> u64 {
        self.lock().iter().map(|w| w.count_ones() as u64).sum()
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

/// Fills the windows of `[off, off + len)` (clamped to the object size) from the
/// target's source into its sink, reading and writing in pieces of `buf`'s
/// capacity (a non-zero multiple of [`ALIGN`]; see [`FillPolicy::buffer_size_for`]).
pub fn fill(
    target: &Target<'_>,
    off: u64,
    len: u64,
    policy: &FillPolicy,
    buf: &mut AlignedBuf,
) -> Result<FillOutcome, FillError> {
    let Target {
        source,
        object_size,
        map,
        sink,
        priority,
    } = *target;
    let mut outcome = FillOutcome::default();
    let end = off.saturating_add(len).min(object_size);
    if off >= end {
        return Ok(outcome);
    }
    let w = policy.window;
    let (first, last) = (off / w, (end - 1) / w);
    let wanted: Vec<u64> = (first..=last).filter(|&i| !map.is_filled(i)).collect();
    outcome.windows_overlapped = (last - first + 1) - wanted.len() as u64;
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
                .map_err(|e| FillError::Read {
                    blob: source.name().to_owned(),
                    off: start,
                    len: (run_stop - start) as usize,
                    source: e,
                })?;
            hold = Some(next);
        }
        let mut pos = start;
        while pos < stop {
            let n = (stop - pos).min(buf.capacity() as u64) as usize;
            let piece = buf.slice_mut(n);
            let got =
                source
                    .read_at_priority(piece, pos, priority)
                    .map_err(|e| FillError::Read {
                        blob: source.name().to_owned(),
                        off: pos,
                        len: n,
                        source: e,
                    })?;
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
            outcome.bytes_written += n as u64;
            pos += n as u64;
        }
        map.mark(index);
        outcome.windows_written += 1;
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
