//! Which kernel interface serves the images — `--transport
//! auto|cachefiles|fuse`, and why — and starting it: fresh, or adopting the
//! connection a previous daemon parked. Auto binds `/dev/cachefiles` if the
//! kernel accepts on-demand mode, else uses FUSE (which needs `/dev/fuse` and
//! an EROFS that mounts files).
//!
//! It owns that choice and the transports' settings; it must not serve
//! control requests or touch the fd store (handover does).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use lazypull_cachefiles::CacheDevice;
use lazypull_engine::FillPolicy;
use lazypull_source::BlobResolver;
use lazypull_transport::cachefiles::{self, BindError, Server};
use lazypull_transport::fuse::{self, FuseServer};

use super::handover::Parked;
use super::persist::TransportState;
use super::view::TransportView;
use crate::config::{DaemonConfig, TransportKind};

/// The transport serving the kernel.
pub(crate) enum Running {
    Cachefiles(Server),
    Fuse(Arc<FuseServer>),
}

impl Running {
    /// What the transport offers the request handlers.
    pub(crate) fn view(&self, fuse_dir: &Path) -> TransportView {
        match self {
            Running::Cachefiles(server) => TransportView::Cachefiles {
                objects: server.objects(),
                stats: server.stats(),
            },
            Running::Fuse(server) => TransportView::Fuse {
                blobs: server.blobs(),
                stats: server.stats(),
                dir: fuse_dir.to_path_buf(),
            },
        }
    }
}

fn policy(cfg: &DaemonConfig) -> FillPolicy {
    FillPolicy {
        window: cfg.fill_window,
        io_size: cfg.io_size,
    }
}

fn cachefiles_config(cfg: &DaemonConfig) -> cachefiles::Config {
    cachefiles::Config {
        device: cfg.device.clone(),
        cache_dir: cfg.cache_dir.clone(),
        tag: cfg.tag.clone(),
        max_in_flight: cfg.max_in_flight,
        policy: policy(cfg),
        drain_timeout: Duration::from_secs(10),
        readahead: cfg.readahead,
        meta_up_front_max: cachefiles::DEFAULT_META_UP_FRONT_MAX,
    }
}

fn fuse_config(cfg: &DaemonConfig) -> fuse::Config {
    fuse::Config {
        mountpoint: cfg.fuse_dir.clone(),
        device: lazypull_fuse::device::DEFAULT_PATH.into(),
        cache_dir: cfg.cache_dir.join("blobs"),
        threads: cfg.fuse_threads,
        policy: policy(cfg),
        flush_interval: Duration::from_secs(1),
        readahead: cfg.readahead,
    }
}

/// What the FUSE transport needs of the kernel besides /dev/fuse: EROFS
/// able to mount a regular file (file-backed, Linux 6.12+).
fn fuse_unusable() -> Option<String> {
    if !Path::new(lazypull_fuse::device::DEFAULT_PATH).exists() {
        return Some("no /dev/fuse (CONFIG_FUSE_FS, or `modprobe fuse`)".into());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("erofs"))
    {
        return Some("this kernel has no EROFS (CONFIG_EROFS_FS, or `modprobe erofs`)".into());
    }
    None
}

/// How each transport turns what the kernel names into a blob.
pub(crate) struct Resolvers {
    /// cachefiles: an OPEN names an image root mounted, also without `lazypull
    /// mount` (`mount -t erofs -o fsid=` of a blob store's image), so any
    /// blob of the blob store resolves.
    pub(crate) cachefiles: Arc<dyn BlobResolver>,
    /// FUSE: a LOOKUP is anything that stats a name in the blob dir; only
    /// names the catalog registered resolve (`lazypull mount` registers
    /// first), others are ENOENT without reaching a backend.
    pub(crate) fuse: Arc<dyn BlobResolver>,
}

/// Why `auto` must not fall back to FUSE when binding cachefiles failed with
/// `e`, if it must not: the device is held by another process (a daemon serving
/// this node's cachefiles mounts), and a FUSE daemon beside it would split the
/// images between two daemons and hide that one already runs.
fn auto_refusal(device: &Path, e: &BindError) -> Option<anyhow::Error> {
    e.device_busy().then(|| {
        anyhow::anyhow!(
            "another daemon holds {}: not falling back to FUSE beside it (stop it, or replace it with `lazypull daemon --takeover`): {e}",
            device.display()
        )
    })
}

/// Starts the transport, or takes over the one a previous daemon parked.
/// Returns it with why it was chosen.
pub(crate) fn start(
    cfg: &DaemonConfig,
    resolvers: Resolvers,
    parked: &mut Parked,
    saved: TransportState,
) -> anyhow::Result<(Running, String)> {
    if let Some((fd, handed)) = parked.take_cachefiles(saved.objects) {
        let n = handed.len();
        let server = Server::adopt(
            cachefiles_config(cfg),
            resolvers.cachefiles,
            CacheDevice::from_fd(fd),
            handed,
        )?;
        return Ok((
            Running::Cachefiles(server),
            format!("took over the bound cachefiles cache from the previous daemon ({n} open objects handed over)"),
        ));
    }
    if let Some((fd, session)) = parked.take_fuse(saved.fuse) {
        let server = FuseServer::adopt(fuse_config(cfg), resolvers.fuse, fd, session)?;
        return Ok((
            Running::Fuse(Arc::new(server)),
            "took over the FUSE connection from the previous daemon".into(),
        ));
    }
    let fuse = |why: String| -> anyhow::Result<(Running, String)> {
        if let Some(missing) = fuse_unusable() {
            bail!("no transport can serve images on this kernel: {why}; FUSE: {missing}");
        }
        let server = FuseServer::mount(fuse_config(cfg), resolvers.fuse.clone())
            .with_context(|| format!("starting the FUSE transport ({why})"))?;
        Ok((Running::Fuse(Arc::new(server)), why))
    };
    match cfg.transport {
        TransportKind::Cachefiles => {
            let server = Server::bind(cachefiles_config(cfg), resolvers.cachefiles.clone())?;
            Ok((Running::Cachefiles(server), "--transport cachefiles".into()))
        }
        TransportKind::Fuse => fuse("--transport fuse".into()),
        TransportKind::Auto => {
            if !cfg.device.exists() {
                return fuse(format!(
                    "{} does not exist (this kernel has no cachefiles): using FUSE",
                    cfg.device.display()
                ));
            }
            match Server::bind(cachefiles_config(cfg), resolvers.cachefiles.clone()) {
                Ok(server) => Ok((
                    Running::Cachefiles(server),
                    "the kernel has cachefiles on-demand mode".into(),
                )),
                Err(e) => match auto_refusal(&cfg.device, &e) {
                    Some(refused) => Err(refused),
                    None => fuse(format!(
                        "cachefiles on-demand mode is unusable ({e}): using FUSE"
                    )),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_refuses_a_device_another_daemon_holds() {
        let device = Path::new("/dev/cachefiles");
        let busy = BindError::open(device, std::io::Error::from_raw_os_error(libc::EBUSY));
        let refused = auto_refusal(device, &busy).expect("EBUSY is refused, not a FUSE fallback");
        let msg = format!("{refused:#}");
        assert!(
            msg.starts_with("another daemon holds /dev/cachefiles: ")
                && msg.contains("Device or resource busy"),
            "{msg}"
        );
        for errno in [libc::ENOENT, libc::EOPNOTSUPP, libc::EPERM] {
            let other = BindError::open(device, std::io::Error::from_raw_os_error(errno));
            assert!(
                auto_refusal(device, &other).is_none(),
                "errno {errno} falls back to FUSE"
            );
        }
    }
}
