//! Heap buffers: aligned ones, built in safe code, and the pool that
//! recycles the large buffers of cold reads.
//!
//! Why a pool: every cold read allocates megabytes (the stored bytes of a
//! range read, a decoded unit per unit, a fill buffer), on whichever thread
//! serves it. Fresh allocations cost a `memset` each (about a tenth of a cold
//! read's CPU, measured with perf), and glibc keeps what those threads free in
//! per-thread arenas it rarely returns, so the daemon's resident memory grew
//! to several times what it holds at once. Recycling the buffers here keeps
//! both down: a recycled buffer is not zeroed again (it is overwritten whole
//! by its next user) and the pool keeps at most [`POOL_MAX_FREE`] bytes idle.

use std::sync::Mutex;

/// Most bytes of idle buffers the pool keeps; a buffer returned beyond that
/// is freed.
pub const POOL_MAX_FREE: usize = 8 << 20;

/// Buffers smaller than this are not worth pooling: the allocator serves
/// them from its caches without the costs above.
const POOL_MIN: usize = 64 << 10;

/// Idle buffers, each with `len() == capacity()` (initialised whole).
struct Pool {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A byte buffer of a fixed length from the pool: its contents are
/// unspecified (a previous user's bytes, or zeros), so a user overwrites what
/// it reads. Dropping it gives it back.
pub struct PooledBuf {
    storage: Vec<u8>,
    len: usize,
}

impl PooledBuf {
    /// A buffer of `len` bytes: an idle one of at least `len` and at most
    /// twice that, else a new one.
    pub fn new(len: usize) -> Self {
        if len >= POOL_MIN {
            let mut p = pool();
            // The smallest idle buffer that fits.
            let best = p
                .free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len && b.len() <= len.saturating_mul(2))
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let storage = p.free.swap_remove(i);
                p.bytes -= storage.len();
                return PooledBuf { storage, len };
            }
        }
        PooledBuf {
            storage: vec![0u8; len],
            len,
        }
    }

    /// A buffer holding `bytes` (not pooled until it is dropped).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        PooledBuf {
            storage: bytes,
            len,
        }
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[..self.len]
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[..self.len]
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuf({} bytes)", self.len)
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let storage = std::mem::take(&mut self.storage);
        let size = storage.len();
        if size < POOL_MIN {
            return;
        }
        let mut p = pool();
        if p.bytes + size <= POOL_MAX_FREE {
            p.bytes += size;
            p.free.push(storage);
        }
    }
}

/// Bytes the pool keeps idle now.
pub fn pooled_bytes() -> usize {
    pool().bytes
}

/// A heap buffer whose contents start on a [`crate::ALIGN`] boundary: over-allocate
/// by one alignment unit and start at the first aligned byte. The heap allocation
/// never moves, so the alignment holds for the buffer's whole life. Cachefiles
/// anonymous fds write with O_DIRECT semantics and reject unaligned user buffers.
///
/// The storage comes from the pool ([`PooledBuf`]): its contents start out
/// unspecified.
pub struct AlignedBuf {
    storage: PooledBuf,
    start: usize,
    capacity: usize,
}

impl AlignedBuf {
    pub fn new(capacity: usize) -> Self {
        let align = crate::ALIGN as usize;
        let storage = PooledBuf::new(capacity + align);
        let start = storage.as_ptr().align_offset(align);
        assert!(start < align, "align_offset on u8 is always satisfiable");
        AlignedBuf {
            storage,
            start,
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The first `len` bytes (at most the capacity), aligned.
    pub fn slice(&self, len: usize) -> &[u8] {
        &self.storage[self.start..self.start + len.min(self.capacity)]
    }

    /// The first `len` bytes (at most the capacity), aligned, writable.
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.capacity);
        &mut self.storage[self.start..self.start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_recycles_large_buffers_within_its_bound() {
        // Other tests of this crate use the pool at the same time, so this
        // reads only what it can know: its own buffer comes back.
        let a = PooledBuf::new(1 << 20);
        let ptr = a.as_ptr();
        assert_eq!(a.len(), 1 << 20);
        drop(a);
        let mut found = false;
        let mut taken = Vec::new();
        for _ in 0..64 {
            let b = PooledBuf::new(1 << 20);
            found |= b.as_ptr() == ptr;
            taken.push(b);
            if found {
                break;
            }
        }
        drop(taken);
        assert!(found, "a dropped 1 MiB buffer was handed out again");
        // A buffer is never handed out for a request less than half its size.
        let small = PooledBuf::new(POOL_MIN);
        assert_eq!(small.len(), POOL_MIN);
        assert!(pooled_bytes() <= POOL_MAX_FREE);
        // Far more returned at once than the bound: the rest is freed.
        let many: Vec<_> = (0..((2 * POOL_MAX_FREE) >> 20))
            .map(|_| PooledBuf::new(1 << 20))
            .collect();
        drop(many);
        assert!(pooled_bytes() <= POOL_MAX_FREE);
    }

    #[test]
    fn aligned_for_any_capacity() {
        for cap in [0, 1, 4095, 4096, 131072, 1 << 20] {
            let mut b = AlignedBuf::new(cap);
            assert_eq!(b.slice(cap).as_ptr() as usize % crate::ALIGN as usize, 0);
            assert_eq!(b.slice_mut(cap).len(), cap);
            assert_eq!(b.slice(cap + 10).len(), cap);
        }
    }
}
