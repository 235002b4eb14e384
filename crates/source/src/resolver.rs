//! How a transport turns the key the kernel names into a blob.

use std::sync::Arc;

use crate::{BlobSource, OpenError};

/// Turns the keys of an OPEN (cachefiles) or a lookup (FUSE) into a blob.
///
/// Both transports hand the resolver what the kernel named; the daemon's
/// catalog implements it. It is called on blocking worker threads, never on an
/// async task, because resolving may touch the network.
pub trait BlobResolver: Send + Sync + 'static {
    /// `volume` is the volume key without its NUL (`erofs,<domain_id|fsid>`),
    /// `cookie` the cookie key up to its first NUL (fsid or device tag). FUSE
    /// passes `fuse` as the volume and the file name as the cookie.
    fn resolve(&self, volume: &[u8], cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError>;
}

impl<F> BlobResolver for F
where
    F: Fn(&[u8], &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> + Send + Sync + 'static,
{
    fn resolve(&self, volume: &[u8], cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> {
        self(volume, cookie)
    }
}
