//! Which kernel interface serves the images — `--transport
//! auto|cachefiles|fuse|loop|fanotify`, and why — and starting it: fresh, or adopting
//! the connection a previous daemon parked.
//!
//! `auto` takes the first of these the kernel offers, in this fixed order:
//!
//! 1. **cachefiles** on-demand: `/dev/cachefiles` binds in on-demand mode.
//!    The kernel keeps the cache and reads it with no daemon in the way.
//! 2. **fuse**: `/dev/fuse`, EROFS, and an EROFS that mounts regular files
//!    (file-backed, Linux 6.12+; see [`file_backed_erofs`]). One page cache
//!    (EROFS's own) above the daemon's cache file.
//! 3. **loop**: `/dev/fuse`, EROFS (with extra devices, 5.16+) and
//!    `/dev/loop-control`. The same FUSE blob files, each behind a read-only
//!    loop device: it adds the block layer and the loop device's page cache
//!    on the way, so it comes after file-backed mounts, which need neither.
//!
//! `fanotify` (sparse cache files filled on pre-content events, 6.14+) is
//! never picked by `auto`: measured against FUSE on the same kernel
//! (BENCHMARKS.md) it is at the limit warm and even on a large file cold, but
//! slower on small files cold, which is what a container's start reads.
//! `--transport fanotify` asks for it.
//!
//! A successor that takes a FUSE connection over keeps what its predecessor
//! served through: with `auto`, loop when the predecessor's mounts hold loop
//! devices over the blob files (found by their backing files), else as a
//! fresh start would choose.
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
use lazypull_transport::fanotify::{self as fan, FanotifyServer};
use lazypull_transport::fuse::{self, FuseServer};
use tracing::{info, warn};

use super::handover::Parked;
use super::persist::TransportState;
use super::view::TransportView;
use crate::config::{DaemonConfig, FuseRecovery, TransportKind};

/// The transport serving the kernel.
pub(crate) enum Running {
    Cachefiles(Box<Server>),
    Fuse(Arc<FuseServer>),
    /// The FUSE server, its files mounted through loop devices.
    Loop(Arc<FuseServer>),
    /// Sparse cache files filled on fanotify pre-content events; `adopted`
    /// when the group is a predecessor's (its events are answered by
    /// `FanotifyServer::recover` once the blobs are known again).
    Fanotify {
        server: Arc<FanotifyServer>,
        adopted: bool,
    },
}

impl Running {
    /// What the transport offers the request handlers.
    pub(crate) fn view(
        &self,
        fuse_dir: &Path,
        loop_direct_io: bool,
        resolver: Arc<dyn BlobResolver>,
    ) -> TransportView {
        match self {
            Running::Fanotify { server, .. } => TransportView::Fanotify {
                server: server.clone(),
                resolver,
            },
            Running::Cachefiles(server) => TransportView::Cachefiles {
                objects: server.objects(),
                stats: server.stats(),
            },
            Running::Fuse(server) | Running::Loop(server) => TransportView::Fuse {
                blobs: server.blobs(),
                stats: server.stats(),
                dir: fuse_dir.to_path_buf(),
                loop_devices: matches!(self, Running::Loop(_)),
                loop_direct_io,
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

/// The cachefiles transport's settings; `cache_limit` bounds the kernel's
/// cache directory (`registered` says which blobs an image still names: the
/// others' objects are culled first).
fn cachefiles_config(
    cfg: &DaemonConfig,
    registered: &Registered,
) -> anyhow::Result<cachefiles::Config> {
    let cull = cfg
        .cache_limit
        .resolve(&cfg.cache_dir)
        .context("resolving cache_limit")?
        .map(|limit| cachefiles::CullConfig {
            limit,
            registered: registered.clone(),
        });
    Ok(cachefiles::Config {
        cull,
        device: cfg.device.clone(),
        cache_dir: cfg.cache_dir.clone(),
        tag: cfg.tag.clone(),
        max_in_flight: cfg.max_in_flight,
        policy: policy(cfg),
        drain_timeout: Duration::from_secs(10),
        readahead: cfg.readahead,
        meta_up_front_max: cachefiles::DEFAULT_META_UP_FRONT_MAX,
    })
}

/// The byte budget of a cache in `dir` (`cache_limit`), with what earlier
/// runs left there counted.
fn cache_budget(
    cfg: &DaemonConfig,
    dir: &Path,
    min_idle: Duration,
) -> anyhow::Result<Option<Arc<lazypull_engine::CacheBudget>>> {
    let Some(limit) = cfg
        .cache_limit
        .resolve(&cfg.cache_dir)
        .context("resolving cache_limit")?
    else {
        return Ok(None);
    };
    let budget = lazypull_engine::CacheBudget::with_min_idle(limit, min_idle);
    budget
        .scan(dir)
        .with_context(|| format!("counting what the cache in {} holds", dir.display()))?;
    info!(
        limit,
        cache_limit = %cfg.cache_limit,
        used = budget.used(),
        dir = %dir.display(),
        "cache limit"
    );
    Ok(Some(budget))
}

fn fuse_config(cfg: &DaemonConfig) -> anyhow::Result<fuse::Config> {
    let cache_dir = cfg.cache_dir.join("blobs");
    Ok(fuse::Config {
        budget: cache_budget(cfg, &cache_dir, Duration::ZERO)?,
        mountpoint: cfg.fuse_dir.clone(),
        device: lazypull_fuse::device::DEFAULT_PATH.into(),
        cache_dir,
        threads: cfg.fuse_threads,
        policy: policy(cfg),
        flush_interval: Duration::from_secs(1),
        readahead: cfg.readahead,
        recovery: match cfg.fuse_recovery {
            FuseRecovery::Auto => fuse::Recovery::Auto,
            FuseRecovery::Journal => fuse::Recovery::Journal,
        },
    })
}

/// The fanotify transport's cache lives beside the FUSE one, in its own
/// directory (the cache files are the mounted files: they must be on a
/// local file system with pre-content events, not tmpfs).
fn fanotify_config(cfg: &DaemonConfig) -> anyhow::Result<fan::Config> {
    let cache_dir = cfg.cache_dir.join("sparse");
    Ok(fan::Config {
        budget: cache_budget(cfg, &cache_dir, fan::EVICT_MIN_IDLE)?,
        cache_dir,
        policy: policy(cfg),
        threads: cfg.fuse_threads,
        journal: cfg.run_dir.join("fanotify-events.journal"),
        readahead: cfg.readahead,
    })
}

/// A fanotify server on a new group, or on `adopted` (a predecessor's), its
/// cache directory made private first.
fn fanotify_server(
    cfg: &DaemonConfig,
    adopted: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<Arc<FanotifyServer>> {
    let config = fanotify_config(cfg)?;
    lazypull_engine::private_dir(&config.cache_dir).context("the fanotify cache directory")?;
    let fresh = adopted.is_none();
    FanotifyServer::new(config, adopted).with_context(|| {
        if fresh {
            "starting the fanotify transport (it needs Linux 6.14+ with \
             CONFIG_FANOTIFY_ACCESS_PERMISSIONS and pre-content events, and CAP_SYS_ADMIN)"
        } else {
            "taking over the fanotify group"
        }
    })
}

/// This process's soft fd limit: every event fd of its group is below it.
pub(crate) fn fd_limit() -> i32 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map_or(i32::MAX, |n| n.min(i32::MAX as u64) as i32)
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

/// What the loop transport needs besides FUSE's /dev/fuse and EROFS.
fn loop_unusable() -> Option<String> {
    loop_unusable_on(
        &kernel_release(),
        Path::new(lazypull_transport::loopdev::CONTROL).exists(),
    )
}

/// [`loop_unusable`] for a kernel `release` with or without loop devices.
/// lazypull's images keep each layer's data in a blob of its own, which
/// EROFS reads as an extra device (`device=`, Linux 5.16): before it (5.15,
/// Ubuntu 22.04's GA kernel) EROFS mounts one device only, and lazypull
/// refuses rather than serve half an image.
fn loop_unusable_on(release: &str, loop_control: bool) -> Option<String> {
    if kernel_version(release).is_some_and(|v| v < (5, 16)) {
        return Some(format!(
            "EROFS mounts extra devices (`device=`, one per data blob) from Linux 5.16 on; \
             this is {release}: upgrade the kernel (Ubuntu 22.04: the HWE kernel)"
        ));
    }
    (!loop_control).then(|| {
        format!(
            "no {} (CONFIG_BLK_DEV_LOOP, or `modprobe loop`)",
            lazypull_transport::loopdev::CONTROL
        )
    })
}

/// Whether this kernel's EROFS mounts regular files (`EROFS_FS_BACKED_BY_FILE`,
/// Linux 6.12+), and why not. EROFS lists no sysfs feature for it
/// (/sys/fs/erofs/features names on-disk features only), so: the kernel
/// release, and the kernel's config where it is readable (/proc/config.gz is
/// compressed and often absent; /boot/config-<release> is plain text).
fn file_backed_erofs() -> Result<(), String> {
    let release = kernel_release();
    let release = release.as_str();
    let version = kernel_version(release);
    if version.is_none_or(|v| v < (6, 12)) {
        return Err(format!(
            "EROFS mounts files from Linux 6.12 on; this is {release}"
        ));
    }
    if let Ok(config) = std::fs::read_to_string(format!("/boot/config-{release}")) {
        if config
            .lines()
            .any(|l| l.trim() == "# CONFIG_EROFS_FS_BACKED_BY_FILE is not set")
        {
            return Err(format!(
                "{release} is built without CONFIG_EROFS_FS_BACKED_BY_FILE"
            ));
        }
    }
    Ok(())
}

/// The running kernel's release, such as `6.18.44-fc-v1045` (empty if
/// unreadable).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

/// `(major, minor)` of a kernel release such as `6.18.44-fc-v1045`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
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
    /// Whether a registered image names a blob (cachefiles culls the
    /// objects of the others first).
    pub(crate) registered: Registered,
}

use lazypull_transport::cachefiles_cull::Registered;

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
            cachefiles_config(cfg, &resolvers.registered)?,
            resolvers.cachefiles,
            CacheDevice::from_fd(fd),
            handed,
        )?;
        return Ok((
            Running::Cachefiles(Box::new(server)),
            format!("took over the bound cachefiles cache from the previous daemon ({n} open objects handed over)"),
        ));
    }
    if let Some(fd) = parked.take_fanotify() {
        let server = fanotify_server(cfg, Some(fd))?;
        server.hand_in_files(parked.take_fanotify_files());
        return Ok((
            Running::Fanotify {
                server,
                adopted: true,
            },
            "took over the fanotify group from the previous daemon".into(),
        ));
    }
    if let Some((fd, session)) = parked.take_fuse(saved.fuse) {
        let server = Arc::new(FuseServer::adopt(
            fuse_config(cfg)?,
            resolvers.fuse,
            fd,
            session,
        )?);
        let took = "took over the FUSE connection from the previous daemon";
        // The previous daemon's mounts keep their loop devices (the mounts
        // hold them open; autoclear releases each at its unmount): found by
        // their backing files, the blob files of this same FUSE mount.
        let held = lazypull_transport::loopdev::attached_under(&cfg.fuse_dir).unwrap_or_else(|e| {
            warn!("listing loop devices in /sys/block: {e}");
            Vec::new()
        });
        for dev in &held {
            info!(device = %dev.device.display(), backing_file = %dev.backing_file.display(), "a mount's loop device over a blob file, taken over");
        }
        let as_loop = match cfg.transport {
            TransportKind::Loop => true,
            TransportKind::Fuse | TransportKind::Cachefiles | TransportKind::Fanotify => false,
            TransportKind::Auto => !held.is_empty() || file_backed_erofs().is_err(),
        };
        let (running, how) = if as_loop {
            (Running::Loop(server), "serving through loop devices")
        } else {
            (Running::Fuse(server), "serving file-backed")
        };
        return Ok((
            running,
            format!(
                "{took} ({how}; {} loop devices of its mounts found by backing file)",
                held.len()
            ),
        ));
    }
    let fuse = |why: String| -> anyhow::Result<(Running, String)> {
        if let Some(missing) = fuse_unusable() {
            bail!("no transport can serve images on this kernel: {why}; FUSE: {missing}");
        }
        let server = FuseServer::mount(fuse_config(cfg)?, resolvers.fuse.clone())
            .with_context(|| format!("starting the FUSE transport ({why})"))?;
        Ok((Running::Fuse(Arc::new(server)), why))
    };
    let loop_transport = |why: String| -> anyhow::Result<(Running, String)> {
        if let Some(missing) = fuse_unusable().or_else(loop_unusable) {
            bail!("no transport can serve images on this kernel: {why}; loop: {missing}");
        }
        let server = FuseServer::mount(fuse_config(cfg)?, resolvers.fuse.clone())
            .with_context(|| format!("starting the FUSE server of the loop transport ({why})"))?;
        Ok((Running::Loop(Arc::new(server)), why))
    };
    // Auto once cachefiles is out: file-backed FUSE, else loop devices.
    let fuse_or_loop = |why: String| -> anyhow::Result<(Running, String)> {
        if let Some(missing) = fuse_unusable() {
            bail!("no transport can serve images on this kernel: {why}; FUSE: {missing}");
        }
        match file_backed_erofs() {
            Ok(()) => fuse(format!("{why}; EROFS mounts files: using FUSE")),
            Err(no) => loop_transport(format!(
                "{why}; {no}: using loop devices over the FUSE files"
            )),
        }
    };
    match cfg.transport {
        TransportKind::Cachefiles => {
            let server = Server::bind(
                cachefiles_config(cfg, &resolvers.registered)?,
                resolvers.cachefiles.clone(),
            )?;
            Ok((
                Running::Cachefiles(Box::new(server)),
                "--transport cachefiles".into(),
            ))
        }
        TransportKind::Fuse => fuse("--transport fuse".into()),
        TransportKind::Loop => loop_transport("--transport loop".into()),
        TransportKind::Fanotify => {
            let server = fanotify_server(cfg, None)?;
            server.probe().with_context(|| {
                format!(
                    "the fanotify transport cannot mark files in {}",
                    server.cache_dir().display()
                )
            })?;
            Ok((
                Running::Fanotify {
                    server,
                    adopted: false,
                },
                "--transport fanotify".into(),
            ))
        }
        TransportKind::Auto => {
            if !cfg.device.exists() {
                return fuse_or_loop(format!(
                    "{} does not exist (this kernel has no cachefiles)",
                    cfg.device.display()
                ));
            }
            match Server::bind(
                cachefiles_config(cfg, &resolvers.registered)?,
                resolvers.cachefiles.clone(),
            ) {
                Ok(server) => Ok((
                    Running::Cachefiles(Box::new(server)),
                    "the kernel has cachefiles on-demand mode".into(),
                )),
                Err(e) => match auto_refusal(&cfg.device, &e) {
                    Some(refused) => Err(refused),
                    None => fuse_or_loop(format!("cachefiles on-demand mode is unusable ({e})")),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse_from_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v1045"), Some((6, 18)));
        assert_eq!(kernel_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("6.12"), Some((6, 12)));
        assert_eq!(kernel_version("garbage"), None);
        assert!((6, 11) < (6, 12) && (5, 19) < (6, 12) && (6, 12) <= (6, 18));
    }

    #[test]
    fn loop_devices_need_5_16s_extra_devices_and_loop_control() {
        let old = loop_unusable_on("5.15.0-91-generic", true).expect("5.15 is refused");
        assert!(
            old.contains("extra devices")
                && old.contains("5.16")
                && old.contains("5.15.0-91-generic"),
            "{old}"
        );
        assert_eq!(loop_unusable_on("5.16.0", true), None);
        assert_eq!(loop_unusable_on("6.1.0-28-amd64", true), None);
        let no_loop = loop_unusable_on("6.1.0", false).expect("no /dev/loop-control");
        assert!(no_loop.contains("CONFIG_BLK_DEV_LOOP"), "{no_loop}");
    }

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
