//! The user-space side of the Linux cachefiles **on-demand read** interface
//! (`include/uapi/linux/cachefiles.h`, as of Linux 6.12).
//!
//! This crate owns the wire protocol and the syscall edge for it, nothing more:
//! - [`msg`]: strict parsing of the binary requests the kernel hands out on
//!   `/dev/cachefiles` (OPEN, CLOSE, READ) into typed values; malformed input is a
//!   [`msg::ParseError`], never a panic.
//! - [`command`]: the text commands written back to the device (`dir`, `tag`,
//!   `bind ondemand`, `copen`, `restore`, culling limits).
//! - [`device`]: the open `/dev/cachefiles` file itself.
//! - [`object`]: the anonymous fd the kernel installs for each cache object, with the
//!   aligned writes and the `CACHEFILES_IOC_READ_COMPLETE` ioctl it requires.
//!
//! It must not know about images, blobs or backends: it is equally usable by a
//! daemon serving EROFS images or by a test harness poking the kernel by hand.
//! All `unsafe` of the project's cachefiles path lives in [`object`].

pub mod command;
pub mod device;
pub mod msg;
pub mod object;

pub use command::Command;
pub use device::CacheDevice;
pub use msg::{CloseRequest, OpenRequest, ParseError, ReadRequest, Request};
pub use object::{AnonFd, CACHE_ALIGN};
