//! The cachefiles character device, `/dev/cachefiles`.
//!
//! Only one process may hold it open (others get EBUSY) and it needs
//! CAP_SYS_ADMIN. Closing it unbinds the cache: every pending and future request
//! of every mount fails with EIO, which is why a daemon that wants to survive a
//! restart must hand this fd to its successor rather than close it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use crate::command::Command;
use crate::msg::{self, ParseError, Request, MSG_HEADER_SIZE, MSG_MAX_SIZE, OP_OPEN};
use crate::object::AnonFd;

/// Where the kernel exposes the device.
pub const DEFAULT_PATH: &str = "/dev/cachefiles";

/// An open cachefiles device.
#[derive(Debug)]
pub struct CacheDevice {
    fd: OwnedFd,
}

/// One request taken off the device. For OPEN the kernel has already installed an
/// anonymous fd in this process; it is owned here so that it can never leak, even
/// when the rest of the message fails to parse.
#[derive(Debug)]
pub struct Received {
    pub request: Result<Request, ParseError>,
    pub anon_fd: Option<AnonFd>,
}

impl CacheDevice {
    /// Opens the device non-blocking, ready for `poll`/epoll readiness.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(CacheDevice { fd })
    }

    /// Wraps a device fd received from elsewhere (a previous daemon, the systemd fd store).
    pub fn from_fd(fd: OwnedFd) -> Self {
        CacheDevice { fd }
    }

    /// Writes one command. The error says which command the kernel refused,
    /// and keeps its errno ([`os_error`]).
    pub fn send(&self, cmd: &Command) -> io::Result<()> {
        let bytes = cmd
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match rustix::io::write(&self.fd, &bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "short write of `{cmd}` to the cachefiles device ({n} of {} bytes)",
                bytes.len()
            ))),
            Err(e) => Err(io::Error::new(
                io::Error::from(e).kind(),
                Refused {
                    command: cmd.to_string(),
                    errno: e.raw_os_error(),
                },
            )),
        }
    }

    /// Reads the next pending request, or `None` when nothing is pending
    /// (the kernel returns 0, or EAGAIN on a non-blocking fd).
    pub fn recv(&self) -> io::Result<Option<Received>> {
        let mut buf = [0u8; MSG_MAX_SIZE];
        let n = loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => break n,
                Err(rustix::io::Errno::AGAIN) => return Ok(None),
                // Read again: "nothing pending" would have the caller wait for the
                // next readiness edge while requests are queued.
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let raw = &buf[..n];
        let request = msg::parse(raw);
        let anon_fd = match &request {
            Ok(Request::Open(open)) => Some(open.fd),
            // A malformed OPEN still carried an fd that the kernel installed: take it
            // so it is closed rather than leaked.
            Err(_) if n >= MSG_HEADER_SIZE + 12 && raw[4..8] == OP_OPEN.to_le_bytes() => {
                Some(u32::from_le_bytes(
                    raw[MSG_HEADER_SIZE + 8..MSG_HEADER_SIZE + 12]
                        .try_into()
                        .unwrap(),
                ))
            }
            _ => None,
        }
        .and_then(AnonFd::adopt_from_kernel);
        Ok(Some(Received { request, anon_fd }))
    }

    /// Gives the fd up, e.g. to pass it to a successor daemon.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// A command the kernel refused. Carried inside the `io::Error` that
/// [`CacheDevice::send`] returns, whose `raw_os_error()` cannot see it:
/// [`os_error`] does.
#[derive(Debug)]
pub struct Refused {
    pub command: String,
    pub errno: i32,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cachefiles device refused `{}`: {}",
            self.command,
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for Refused {}

/// The errno behind `e`: an OS error's, or that of a command the device refused.
pub fn os_error(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
        .or_else(|| e.get_ref()?.downcast_ref::<Refused>().map(|r| r.errno))
}

impl AsFd for CacheDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
