//! Transports: the kernel-facing side of lazypull.
//!
//! [`cachefiles`] serves the cachefiles on-demand protocol: it binds the device,
//! answers OPEN by resolving the cookie to a blob, hands READs to the engine
//! concurrently (bounded), completes every READ (a failed fill leaves a hole, so
//! the reader gets EIO instead of hanging) and releases objects on CLOSE.
//!
//! A transport must not contain fetch logic (that is the engine's) nor decide
//! where blobs live (that is the resolver's, given by the daemon).

pub mod cachefiles;
