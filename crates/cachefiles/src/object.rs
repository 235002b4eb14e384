//! The anonymous fd of one cache object, and aligned buffers for writing it.
//!
//! Kernel behaviour this relies on (fs/cachefiles/ondemand.c, 6.12):
//! - The fd is write-only. `pwrite` goes to the backing cache file as a direct
//!   write, so the user buffer, the offset and the length must be aligned to the
//!   cache file system's block size (4096 is safe); only the last write of an object
//!   may end unaligned, at the object's size. An unaligned buffer gives EINVAL.
//! - `ioctl(fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)` completes a READ. The kernel
//!   re-checks the range afterwards: a hole left behind makes the reader get EIO,
//!   which is how a daemon reports a failed READ (there is no error field).
//! - `lseek(SEEK_DATA / SEEK_HOLE)` tells which ranges the cache already holds.
//! - Closing the fd releases the object (the answer to a CLOSE request).
//!
//! Callers build aligned buffers themselves (lazypull's engine has one); this
//! module only refuses unaligned ones before the kernel does, with a clearer error.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Alignment used for every write to an anonymous fd.
pub const CACHE_ALIGN: usize = 4096;

/// `_IOW(0x98, 1, int)`.
pub const CACHEFILES_IOC_READ_COMPLETE: libc::c_ulong = 0x4004_9801;

/// The anonymous fd of a cache object, owned: dropping it closes the fd.
#[derive(Debug)]
pub struct AnonFd {
    fd: OwnedFd,
}

impl AnonFd {
    /// Takes ownership of an fd number that the kernel installed in this process
    /// while handing out an OPEN request. Only [`crate::device::CacheDevice::recv`]
    /// calls this, once per OPEN read, so the number is always freshly ours.
    pub(crate) fn adopt_from_kernel(fd: u32) -> Option<AnonFd> {
        let raw = RawFd::try_from(fd).ok().filter(|&raw| raw >= 0)?;
        // SAFETY: the kernel's OPEN read just installed `raw` in our fd table for this
        // request (cachefiles_ondemand_get_fd + fd_install) and nothing else in this
        // process knows the number yet, so we are its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Some(AnonFd { fd })
    }

    /// Wraps an fd obtained elsewhere (fd passing from a previous daemon).
    pub fn from_owned(fd: OwnedFd) -> Self {
        AnonFd { fd }
    }

    /// Writes `buf` at `off` in full. `buf` must start on a [`CACHE_ALIGN`] boundary
    /// (use [`AlignedBuf`]); `off` and `buf.len()` should be aligned except at the
    /// end of the object.
    pub fn write_all_at(&self, mut buf: &[u8], mut off: u64) -> io::Result<()> {
        if !(buf.as_ptr() as usize).is_multiple_of(CACHE_ALIGN) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "anon fd writes need a 4096-aligned buffer (the kernel writes it with O_DIRECT)",
            ));
        }
        while !buf.is_empty() {
            match rustix::io::pwrite(&self.fd, buf, off) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    buf = &buf[n..];
                    off += n as u64;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Completes READ `msg_id` on this object.
    pub fn complete_read(&self, msg_id: u32) -> io::Result<()> {
        // SAFETY: plain ioctl on an fd we own; CACHEFILES_IOC_READ_COMPLETE takes the
        // msg_id by value (not a pointer), so no memory is shared with the kernel.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                CACHEFILES_IOC_READ_COMPLETE as _,
                msg_id as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The first offset at or after `off` that the cache holds data for, if any.
    pub fn next_data(&self, off: u64) -> io::Result<Option<u64>> {
        seek(&self.fd, rustix::fs::SeekFrom::Data(off))
    }

    /// The first offset at or after `off` that the cache does not hold, if any.
    pub fn next_hole(&self, off: u64) -> io::Result<Option<u64>> {
        seek(&self.fd, rustix::fs::SeekFrom::Hole(off))
    }
}

fn seek(fd: &OwnedFd, from: rustix::fs::SeekFrom) -> io::Result<Option<u64>> {
    match rustix::fs::seek(fd, from) {
        Ok(pos) => Ok(Some(pos)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl AsFd for AnonFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_iow_0x98_1_int() {
        // _IOW(type, nr, size) = (1 << 30) | (size << 16) | (type << 8) | nr
        let expect: libc::c_ulong = (1 << 30) | (4 << 16) | (0x98 << 8) | 1;
        assert_eq!(CACHEFILES_IOC_READ_COMPLETE, expect);
    }

    #[test]
    fn unaligned_write_is_refused_before_reaching_the_kernel() {
        let f = std::fs::File::create(std::env::temp_dir().join("lp-anon-test")).unwrap();
        let fd = AnonFd::from_owned(f.into());
        // Find a 4096-aligned window inside an ordinary Vec.
        let v = vec![0u8; 3 * CACHE_ALIGN];
        let start = v.as_ptr().align_offset(CACHE_ALIGN);
        let aligned = &v[start..start + CACHE_ALIGN];
        let err = fd
            .write_all_at(&v[start + 1..start + 1 + 512], 0)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        fd.write_all_at(aligned, 0).unwrap();
    }
}
