//! The user-space side of the Linux FUSE protocol (`include/uapi/linux/fuse.h`),
//! as far as a read-only server of a flat directory of files needs it.
//!
//! - [`abi`]: strict parsing of the binary requests read from `/dev/fuse` into
//!   typed values (malformed input is a [`abi::ParseError`], never a panic), and
//!   the encoding of replies.
//! - [`device`]: `/dev/fuse` itself: mounting a connection, reading requests,
//!   writing replies, the `FUSE_NOTIFY_RESEND` notification and the passthrough
//!   ioctls. All `unsafe` of the FUSE path lives there.
//!
//! Why not a FUSE crate: lazypull must adopt a connection a previous daemon set
//! up (failover), which means serving requests on an fd whose `FUSE_INIT` was
//! answered long ago, and re-queueing the requests the previous daemon had read
//! but not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9). `fuser` 0.18 always waits
//! for `FUSE_INIT` on a new session and has no resend, so the protocol, which is
//! small for a read-only flat file system, is spoken here.
//!
//! It must not know about blobs, images or caches.

pub mod abi;
pub mod device;

pub use abi::{InHeader, Operation, ParseError, Request};
pub use device::{FuseDevice, ReplyPipe};
