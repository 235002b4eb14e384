//! A fanotify group of class `FAN_CLASS_PRE_CONTENT`: marks, events, responses.
//! The two `fanotify_*` calls (libc has them, rustix does not) and adopting
//! the fds the kernel hands out are the only `unsafe` of this path; reads and
//! writes go through rustix.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::event::{self, Event, Response, FAN_NOFD, FAN_PRE_ACCESS};

/// `FAN_CLOEXEC`, `FAN_NONBLOCK`, `FAN_CLASS_PRE_CONTENT`.
const FAN_CLOEXEC: u32 = 0x01;
const FAN_NONBLOCK: u32 = 0x02;
const FAN_CLASS_PRE_CONTENT: u32 = 0x08;
/// `FAN_MARK_ADD`, `FAN_MARK_REMOVE`.
const FAN_MARK_ADD: u32 = 0x01;
const FAN_MARK_REMOVE: u32 = 0x02;

/// A pre-content fanotify group.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
}

/// One event read from the group, with the fd the kernel opened for it.
/// Answer it with [`Group::respond`]: until then the reader waits (and the
/// fd number stays the event's id; closing `file` before answering would let
/// the number be reused).
#[derive(Debug)]
pub struct Pending {
    pub event: Event,
    /// The file, opened by the kernel for this event with `O_RDWR` (the
    /// group's event flags) and without notification: writes through it
    /// raise no event of their own. `None` for an overflow.
    pub file: Option<OwnedFd>,
}

impl Group {
    /// A new group whose event fds are opened read-write (for filling).
    /// `nonblock`: reads return `WouldBlock` when no event waits.
    pub fn new(nonblock: bool) -> io::Result<Group> {
        let flags = FAN_CLOEXEC | FAN_CLASS_PRE_CONTENT | if nonblock { FAN_NONBLOCK } else { 0 };
        let event_flags = (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
        // SAFETY: fanotify_init takes two integer arguments and returns a new
        // fd or -1; it touches no memory of ours.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("fanotify_init(FAN_CLASS_PRE_CONTENT): {e} (needs CAP_SYS_ADMIN and CONFIG_FANOTIFY_ACCESS_PERMISSIONS)"),
            ));
        }
        // SAFETY: fd was just returned by the kernel and is owned by nobody else.
        Ok(Group {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Takes over a group fd (one parked in the fd store by a predecessor).
    pub fn from_fd(fd: OwnedFd) -> Group {
        Group { fd }
    }

    fn mark(&self, flags: u32, path: &Path) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
        // SAFETY: the group fd is open for the duration of the call and `c`
        // is a NUL-terminated string that outlives it; the kernel only reads it.
        let r = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                FAN_PRE_ACCESS,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "fanotify_mark(FAN_PRE_ACCESS) on {}: {e} (pre-content events need Linux 6.14+ and a file system that allows them, e.g. ext4 or xfs, not tmpfs)",
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Marks `path` (an inode mark): reads of it raise `FAN_PRE_ACCESS`. The
    /// kernel decides at open time whether a file raises pre-content events,
    /// so mark before the file is opened by its readers.
    pub fn mark_pre_access(&self, path: &Path) -> io::Result<()> {
        self.mark(FAN_MARK_ADD, path)
    }

    /// Removes the mark of `path`.
    pub fn unmark(&self, path: &Path) -> io::Result<()> {
        self.mark(FAN_MARK_REMOVE, path)
    }

    /// Reads the events waiting (blocking unless the group is non-blocking;
    /// `WouldBlock` then). Each event's fd becomes owned here.
    pub fn read_events(&self, buf: &mut [u8]) -> io::Result<Vec<Pending>> {
        let n = rustix::io::read(&self.fd, &mut *buf).map_err(io::Error::from)?;
        let events = event::parse(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(events
            .into_iter()
            .map(|event| {
                let file = (event.fd != FAN_NOFD && event.fd >= 0).then(|| {
                    // SAFETY: the kernel installed this fd in our table for
                    // this event, and nothing else owns it.
                    unsafe { OwnedFd::from_raw_fd(event.fd as RawFd) }
                });
                Pending { event, file }
            })
            .collect())
    }

    /// Answers the event with fd number `fd`.
    pub fn respond(&self, fd: i32, response: Response) -> io::Result<()> {
        let msg = response.encode(fd);
        let n = rustix::io::write(&self.fd, &msg).map_err(io::Error::from)?;
        if n != msg.len() {
            return Err(io::Error::other(format!(
                "fanotify response: wrote {n} of 8 bytes"
            )));
        }
        Ok(())
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
