//! `/dev/fuse`: one FUSE connection.
//!
//! Kernel behaviour this relies on (fs/fuse/dev.c, Linux 6.9+):
//! - `read` hands out one whole request per call, into a buffer of at least
//!   [`MIN_READ_BUFFER`](crate::abi::MIN_READ_BUFFER) bytes (and at least
//!   `max_write` plus headers); with O_NONBLOCK it fails with EAGAIN when none is
//!   pending; ENOENT means the request was aborted meanwhile (read again); ENODEV
//!   means the connection is gone (unmounted or aborted).
//! - A reply is one `write`/`writev` of header + body; ENOENT means the request
//!   was interrupted or aborted meanwhile and the reply is no longer wanted.
//! - The connection lives as long as any process holds an fd of it open. A
//!   daemon that dies while another process (a successor, an fd store) keeps a
//!   dup of the fd leaves the mount working; the requests it had read but not
//!   answered stay pending until `FUSE_NOTIFY_RESEND` re-queues them.
//! - `FUSE_DEV_IOC_BACKING_OPEN` registers an open file as a passthrough
//!   backing file (needs CAP_SYS_ADMIN and `CONFIG_FUSE_PASSTHROUGH`).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};
use rustix::mount::MountFlags;

use crate::abi;

/// Where the kernel exposes the device.
pub const DEFAULT_PATH: &str = "/dev/fuse";

/// `_IOW(229, 1, struct fuse_backing_map)`.
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = 0x4010_e501;
/// `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// `struct fuse_backing_map`.
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

/// An open FUSE connection.
#[derive(Debug)]
pub struct FuseDevice {
    fd: OwnedFd,
}

/// What [`FuseDevice::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// A request may be pending (another thread may take it first).
    Request,
    /// The stop fd became readable.
    Stop,
    /// The timeout passed.
    Idle,
}

impl FuseDevice {
    /// Opens `/dev/fuse` (non-blocking, close-on-exec) for a new connection.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            let hint = match e {
                rustix::io::Errno::NOENT => {
                    " (no FUSE in this kernel: CONFIG_FUSE_FS, or `modprobe fuse`)"
                }
                rustix::io::Errno::ACCESS | rustix::io::Errno::PERM => " (needs root)",
                _ => "",
            };
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot open {}: {e}{hint}", path.display()),
            )
        })?;
        Ok(FuseDevice { fd })
    }

    /// Wraps a connection fd received from elsewhere (a previous daemon, an fd
    /// store). It must already be mounted and initialised; it is made
    /// non-blocking here, since the serving loop polls.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
        Ok(FuseDevice { fd })
    }

    /// Mounts this connection at `target` as a read-only `fuse.<subtype>` file
    /// system named `fsname`, with the kernel checking permissions from the
    /// modes given (`default_permissions`).
    ///
    /// Without `allow_other` the kernel lets only processes whose uids and
    /// gids are all `user_id` / `group_id` (0: root) into the mount
    /// (`fuse_allow_current_process`). What reads through it on others'
    /// behalf still works: a file-backed EROFS mount opens its backing file
    /// once, as the root process mounting it, and later reads of an open
    /// FUSE file are not checked again.
    pub fn mount(&self, target: &Path, fsname: &str, subtype: &str) -> io::Result<()> {
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
            self.fd.as_raw_fd()
        );
        let data = std::ffi::CString::new(data).expect("no NUL in mount options");
        rustix::mount::mount(
            fsname,
            target,
            format!("fuse.{subtype}"),
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::RDONLY,
            data.as_c_str(),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mounting FUSE at {}: {e}", target.display()),
            )
        })
    }

    /// Waits until a request may be pending, `stop` is readable, or `timeout` passes.
    pub fn wait(&self, stop: BorrowedFd<'_>, timeout: Duration) -> io::Result<Readiness> {
        let mut fds = [
            PollFd::new(&self.fd, PollFlags::IN),
            PollFd::new(&stop, PollFlags::IN),
        ];
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => Ok(Readiness::Idle),
            Ok(_) => {
                if !fds[1].revents().is_empty() {
                    Ok(Readiness::Stop)
                } else if fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) {
                    Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the FUSE connection was closed (unmounted or aborted)",
                    ))
                } else {
                    Ok(Readiness::Request)
                }
            }
            Err(rustix::io::Errno::INTR) => Ok(Readiness::Idle),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads one request into `buf` (at least [`abi::MIN_READ_BUFFER`] bytes).
    /// `None` when nothing is pending (or it went away meanwhile).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        debug_assert!(buf.len() >= abi::MIN_READ_BUFFER);
        match rustix::io::read(&self.fd, buf) {
            Ok(n) => Ok(Some(n)),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR | rustix::io::Errno::NOENT) => {
                Ok(None)
            }
            Err(rustix::io::Errno::NODEV) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the FUSE connection is gone (unmounted or aborted)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes one reply (or notification) made of `parts`. A reply to a request
    /// the kernel no longer waits for (interrupted, aborted) is not an error.
    pub fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        loop {
            return match rustix::io::writev(&self.fd, &slices) {
                Ok(n) if n == total => Ok(()),
                Ok(n) => Err(io::Error::other(format!(
                    "short FUSE reply write: {n} of {total} bytes"
                ))),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("writing a FUSE reply: {e}"),
                )),
            };
        }
    }

    /// Asks the kernel to hand out again every request that was read and not
    /// answered (after taking the connection over from a daemon that died).
    /// Kernels before 6.9 answer EINVAL: their pending requests stay lost.
    pub fn notify_resend(&self) -> io::Result<()> {
        self.send(&[&abi::notification(abi::NOTIFY_RESEND)])
            .map_err(|e| io::Error::new(e.kind(), format!("FUSE_NOTIFY_RESEND: {e}")))
    }

    /// Registers `file` as a passthrough backing file; returns its backing id.
    pub fn backing_open(&self, file: BorrowedFd<'_>) -> io::Result<u32> {
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: FUSE_DEV_IOC_BACKING_OPEN reads a `struct fuse_backing_map`
        // (16 bytes: i32 fd, u32 flags, u64 padding), which `BackingMap` lays out
        // with repr(C); the pointer is valid for the call, and the kernel only
        // reads it.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_OPEN,
                &map as *const BackingMap,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("FUSE_DEV_IOC_BACKING_OPEN: {e} (passthrough needs CONFIG_FUSE_PASSTHROUGH, root, and a connection initialised with FUSE_PASSTHROUGH)"),
            ));
        }
        Ok(rc as u32)
    }

    /// Releases a backing id from [`backing_open`](Self::backing_open).
    pub fn backing_close(&self, id: u32) -> io::Result<()> {
        // SAFETY: FUSE_DEV_IOC_BACKING_CLOSE reads a u32 through the pointer,
        // which points at a live local for the duration of the call.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE,
                &id as *const u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A second fd of the same connection, e.g. for an fd store.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Gives the fd up.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for FuseDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_macros() {
        // _IOW(type, nr, size) = 1 << 30 | size << 16 | type << 8 | nr
        let iow = |ty: libc::c_ulong, nr: libc::c_ulong, size: libc::c_ulong| {
            (1 << 30) | (size << 16) | (ty << 8) | nr
        };
        assert_eq!(FUSE_DEV_IOC_BACKING_OPEN, iow(229, 1, 16));
        assert_eq!(FUSE_DEV_IOC_BACKING_CLOSE, iow(229, 2, 4));
        assert_eq!(std::mem::size_of::<BackingMap>(), 16);
    }

    #[test]
    fn opening_a_missing_device_names_the_cause() {
        let err = FuseDevice::open(Path::new("/nonexistent/fuse")).unwrap_err();
        assert!(err.to_string().contains("no FUSE in this kernel"), "{err}");
    }
}
