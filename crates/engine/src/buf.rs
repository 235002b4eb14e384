//! Aligned heap buffers, built in safe code.

/// A heap buffer whose contents start on a [`crate::ALIGN`] boundary: over-allocate
/// by one alignment unit and start at the first aligned byte. The heap allocation
/// never moves, so the alignment holds for the buffer's whole life. Cachefiles
/// anonymous fds write with O_DIRECT semantics and reject unaligned user buffers.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    capacity: usize,
}

impl AlignedBuf {
    pub fn new(capacity: usize) -> Self {
        let align = crate::ALIGN as usize;
        let storage = vec![0u8; capacity + align];
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
    fn aligned_for_any_capacity() {
        for cap in [0, 1, 4095, 4096, 131072, 1 << 20] {
            let mut b = AlignedBuf::new(cap);
            assert_eq!(b.slice(cap).as_ptr() as usize % crate::ALIGN as usize, 0);
            assert_eq!(b.slice_mut(cap).len(), cap);
            assert_eq!(b.slice(cap + 10).len(), cap);
        }
    }
}
