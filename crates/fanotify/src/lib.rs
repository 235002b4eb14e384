//! fanotify pre-content events (`include/uapi/linux/fanotify.h`, Linux 6.14+)
//! as far as a daemon that fills sparse files on demand needs them.
//!
//! - [`event`]: strict parsing of what `read(2)` on a fanotify group returns
//!   (event metadata and their info records, the range record of a
//!   pre-content event among them) into typed values, and the encoding of a
//!   response. Malformed input is an [`event::ParseError`], never a panic.
//! - [`journal`]: failing closed across a daemon's death: the record of the
//!   events being served, and a successor's answer to each event it inherits.
//! - [`group`]: the group itself: `fanotify_init`, `fanotify_mark`, reading
//!   events, writing responses. All `unsafe` of this path lives there.
//!
//! How the kernel behaves (Linux 6.18, measured by this crate's tests): a
//! read of a marked file raises a `FAN_PRE_ACCESS` event carrying the range
//! read and an fd of the file opened by the kernel without notification, so
//! writes through it raise no event; the reader blocks until the event is
//! answered. `FAN_ALLOW` lets the read go on (to whatever the file holds
//! then: holes read as zeros), `FAN_DENY_ERRNO(EIO)` fails it with EIO. When
//! the group's last fd closes, every pending event is allowed: that is why a
//! daemon must keep the group alive beyond itself (the fd store) to fail
//! closed.
//!
//! It must not know about blobs, images or caches.

pub mod event;
pub mod group;
pub mod journal;

pub use event::{Event, ParseError, Response};
pub use group::Group;
