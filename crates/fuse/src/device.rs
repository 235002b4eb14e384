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
//! - A reply can also be spliced in (`fuse_dev_splice_write`): one `splice`
//!   from a pipe holding header + body, of exactly the bytes the pipe holds
//!   for that reply. The kernel copies the pipe's pages into the request's
//!   pages, so a body spliced into the pipe from a file's page cache reaches
//!   the reader with one copy and never passes through the daemon's memory.
//!   The whole message must be in the pipe before the splice (a splice of
//!   more bytes than the pipe holds is EINVAL); the kernel consumes the
//!   pipe's buffers even when the request is gone meanwhile (ENOENT).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};
use rustix::mount::MountFlags;
use rustix::pipe::{PipeFlags, SpliceFlags};

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
        self.write_reply(parts).map(drop)
    }

    /// Writes one whole message of `parts`; `false` when the kernel refused
    /// it with ENOENT (no request with its unique is being processed).
    fn write_reply(&self, parts: &[&[u8]]) -> io::Result<bool> {
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        loop {
            return match rustix::io::writev(&self.fd, &slices) {
                Ok(n) if n == total => Ok(true),
                Ok(n) => Err(io::Error::other(format!(
                    "short FUSE reply write: {n} of {total} bytes"
                ))),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::NOENT) => Ok(false),
                Err(e) => Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("writing a FUSE reply: {e}"),
                )),
            };
        }
    }

    /// Answers request `unique` with `len` bytes of `file` at `off`, spliced
    /// through `pipe`: the body goes from the file's page cache to the
    /// kernel's request with no copy into this process.
    ///
    /// On an error the pipe may hold a partial message: the caller drops it
    /// (never reuses it) and may answer the request another way. A reply
    /// the kernel no longer waits for (ENOENT) is not an error, as in
    /// [`send`](Self::send).
    pub fn splice_reply(
        &self,
        pipe: &ReplyPipe,
        unique: u64,
        file: BorrowedFd<'_>,
        off: u64,
        len: usize,
    ) -> io::Result<()> {
        if len > pipe.max_body {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {len}-byte reply does not fit the {}-byte splice pipe",
                    pipe.max_body
                ),
            ));
        }
        let header = abi::out_header(unique, 0, len);
        let total = header.len() + len;
        // The pipe is empty here (every use drains it, or it is dropped):
        // 16 bytes always fit.
        let n = rustix::io::write(&pipe.write, &header)?;
        if n != header.len() {
            return Err(io::Error::other(format!(
                "short write of a reply header into the splice pipe: {n} of {}",
                header.len()
            )));
        }
        let mut pos = off;
        let mut left = len;
        while left > 0 {
            // Non-blocking on the pipe side: should the pipe fill up (pages
            // larger or folios smaller than it was sized for), this fails
            // with EAGAIN instead of waiting for a reader that is this
            // thread.
            match rustix::pipe::splice(
                file,
                Some(&mut pos),
                &pipe.write,
                None,
                left,
                SpliceFlags::NONBLOCK,
            ) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "splicing a reply: the file ends before {}",
                            off + len as u64
                        ),
                    ))
                }
                Ok(n) => left -= n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("splicing {len} bytes at {off} into the reply pipe: {e}"),
                    ))
                }
            }
        }
        loop {
            return match rustix::pipe::splice(
                &pipe.read,
                None,
                &self.fd,
                None,
                total,
                SpliceFlags::empty(),
            ) {
                Ok(n) if n == total => Ok(()),
                Ok(n) => Err(io::Error::other(format!(
                    "short spliced FUSE reply: {n} of {total} bytes"
                ))),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("splicing a FUSE reply: {e}"),
                )),
            };
        }
    }

    /// Writes a whole reply `msg` and says whether the kernel was waiting for
    /// it: `false` when no request with its unique is being processed
    /// (ENOENT: never read, already answered, or aborted). A successor
    /// uses it to find requests a killed predecessor read unrecorded.
    pub fn answer_if_waiting(&self, msg: &[u8]) -> io::Result<bool> {
        self.write_reply(&[msg])
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

/// Lets the kernel read ahead up to `bytes` at once in the files of the FUSE
/// mount at `mountpoint` (its bdi's `read_ahead_kb`, in sysfs; needs root).
///
/// The kernel gives a FUSE mount the default 128 KiB of read-ahead and never
/// more than the `max_readahead` of the INIT reply, so a reader moving
/// through a file sends READs of at most 128 KiB however large `max_pages`
/// allows them: raising it lets read-ahead send READs of up to `max_pages`.
/// The mount's device number is taken with `AT_STATX_DONT_SYNC`, from the
/// attributes the kernel has, without a request to the (maybe not yet
/// serving) daemon.
pub fn set_readahead(mountpoint: &Path, bytes: u64) -> io::Result<()> {
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        mountpoint,
        rustix::fs::AtFlags::STATX_DONT_SYNC,
        rustix::fs::StatxFlags::BASIC_STATS,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("statx {}: {e}", mountpoint.display()),
        )
    })?;
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        st.stx_dev_major, st.stx_dev_minor
    );
    std::fs::write(&knob, format!("{}\n", bytes.div_ceil(1024)))
        .map_err(|e| io::Error::new(e.kind(), format!("writing {knob}: {e}")))
}

/// The largest READ, in pages, this kernel lets a FUSE server negotiate:
/// `/proc/sys/fs/fuse/max_pages_limit` (Linux 6.13+), else 256
/// (`FUSE_MAX_MAX_PAGES`, which older kernels hard-code).
pub fn max_pages_limit() -> u16 {
    std::fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(256, |n| n.clamp(1, u64::from(u16::MAX)) as u16)
}

/// A pipe that READ replies are spliced through ([`FuseDevice::splice_reply`]).
/// One per serving thread: a message is written into it and spliced out by
/// the same thread, so it is empty between replies.
#[derive(Debug)]
pub struct ReplyPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Largest reply body it carries.
    max_body: usize,
}

/// Pipe buffers hold at most a page each. Sizing assumes 4 KiB pages; on
/// larger pages the pipe holds more, never less.
const PIPE_PAGE: usize = 4096;

impl ReplyPipe {
    /// A pipe for reply bodies of up to `max_body` bytes (fewer if the pipe
    /// cannot be made that large: see [`max_body`](Self::max_body)).
    pub fn new(max_body: usize) -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
        // A message takes one pipe buffer for the header and one per page
        // the body touches: one more than its length in pages when it does
        // not start on a page boundary. Root may size a pipe beyond
        // /proc/sys/fs/pipe-max-size (1 MiB by default: one page short for a
        // 1 MiB READ); where that is refused, the largest allowed is taken.
        let want = (max_body + 2 * PIPE_PAGE).next_power_of_two();
        let size = match rustix::pipe::fcntl_setpipe_size(&write, want) {
            Ok(n) => n,
            Err(_) => {
                let allowed = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                rustix::pipe::fcntl_setpipe_size(&write, allowed.min(want))
                    .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?
            }
        };
        Ok(ReplyPipe {
            read,
            write,
            max_body: size.saturating_sub(2 * PIPE_PAGE).min(max_body),
        })
    }

    /// The largest reply body this pipe carries.
    pub fn max_body(&self) -> usize {
        self.max_body
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

    /// A file of `n` bytes of a pattern, and the pattern.
    fn patterned(n: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 % 253) as u8).collect();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &bytes).unwrap();
        (f, bytes)
    }

    /// A "device" whose replies land in a file: `fuse_dev_splice_write`
    /// itself needs a live connection (the FUSE tests of the daemon cover
    /// it); what goes into the pipe is the same.
    fn recording_device() -> (FuseDevice, tempfile::NamedTempFile) {
        let out = tempfile::NamedTempFile::new().unwrap();
        let fd = std::fs::OpenOptions::new()
            .write(true)
            .open(out.path())
            .unwrap();
        (FuseDevice::from_fd(fd.into()).unwrap(), out)
    }

    #[test]
    fn a_spliced_reply_is_the_header_and_exactly_the_bytes_asked() {
        let (src, bytes) = patterned(3 << 20);
        let file = std::fs::File::open(src.path()).unwrap();
        let pipe = ReplyPipe::new(1 << 20).unwrap();
        // 1 MiB where the pipe may grow past pipe-max-size (CAP_SYS_RESOURCE),
        // else that limit less the two pages a message may need beyond its body.
        let max = pipe.max_body();
        assert!(max >= (1 << 20) - 8192, "{max}");
        let (dev, out) = recording_device();
        // Unaligned start and length, then a full-size reply, on one pipe.
        dev.splice_reply(&pipe, 7, file.as_fd(), 4097, 300_001)
            .unwrap();
        dev.splice_reply(&pipe, 8, file.as_fd(), 1 << 20, max)
            .unwrap();
        let got = std::fs::read(out.path()).unwrap();
        let (first, second) = got.split_at(16 + 300_001);
        assert_eq!(first[..16], abi::out_header(7, 0, 300_001));
        assert!(first[16..] == bytes[4097..4097 + 300_001]);
        assert_eq!(second[..16], abi::out_header(8, 0, max));
        assert!(second[16..] == bytes[1 << 20..(1 << 20) + max]);
    }

    #[test]
    fn a_splice_past_the_end_of_the_file_or_the_pipe_fails() {
        let (src, _) = patterned(10_000);
        let file = std::fs::File::open(src.path()).unwrap();
        let pipe = ReplyPipe::new(64 << 10).unwrap();
        let (dev, out) = recording_device();
        let e = dev
            .splice_reply(&pipe, 1, file.as_fd(), 8_000, 4_000)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let e = dev
            .splice_reply(&pipe, 2, file.as_fd(), 0, pipe.max_body() + 1)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(
            std::fs::read(out.path()).unwrap().is_empty(),
            "nothing reached the device"
        );
    }

    #[test]
    fn opening_a_missing_device_names_the_cause() {
        let err = FuseDevice::open(Path::new("/nonexistent/fuse")).unwrap_err();
        assert!(err.to_string().contains("no FUSE in this kernel"), "{err}");
    }
}
