//! Handing the mounts from one daemon to the next. The kernel connection
//! lives in the fd store as long as the mounts do; at a handover the
//! cachefiles objects' fds join it and their keys (or the FUSE session) go to
//! the run dir; the next daemon takes them back ([`Parked`]) — after a crash,
//! an upgrade, or `--takeover`, which first asks the running daemon to hand
//! over ([`request_handover`]). Shutting down for good releases everything
//! instead.
//!
//! It owns the fd store's entries and what is parked there; it must not
//! choose or start a transport.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use lazypull_transport::cachefiles::{HandedObject, OpenObjects};
use lazypull_transport::fanotify::FanotifyServer;
use lazypull_transport::fuse::{self, FuseServer};
use tracing::{info, warn};

use super::persist::{self, ParkedObject, TransportState};
use crate::config::DaemonConfig;
use crate::control::{self, Request};
use crate::fdstore;

/// Fd store entry of the cachefiles device.
const DEVICE_ENTRY: &str = "cachefiles-device";
/// Fd store entry of the FUSE connection.
const FUSE_ENTRY: &str = "fuse-connection";
/// Fd store entry of the fanotify group. Parked, the group outlives the
/// daemon: the kernel never allows a pending event by itself (a closed group
/// would, and readers would read a hole's zeros).
const FANOTIFY_ENTRY: &str = "fanotify-group";
/// Fd store entries of the fanotify transport's cache files, opened before
/// they were marked: `fanfile:<blob>`.
const FANOTIFY_FILE_PREFIX: &str = "fanfile:";
/// Fd store entries of handed-over cachefiles objects: `obj:<object id>`.
const OBJECT_PREFIX: &str = "obj:";
/// Fd store entry of the credentials kubelet sent (`lazypull cri-proxy`):
/// a sealed memfd, so they outlive the daemon without touching a file
/// system.
const KUBELET_CREDENTIALS_ENTRY: &str = "kubelet-credentials";

/// Asks the daemon on the control socket to hand over, and waits until it is gone.
pub(crate) fn request_handover(cfg: &DaemonConfig) -> anyhow::Result<()> {
    if cfg.fd_store.is_none() {
        bail!("--takeover needs the fd store: it carries the kernel connections from the old daemon to the new one");
    }
    let status = control::call(&cfg.socket, &Request::Status, Duration::from_secs(10))
        .context("--takeover: no daemon to take over from")?;
    let pid = status["pid"]
        .as_u64()
        .context("the old daemon did not say its pid")?;
    info!(pid, "asking the running daemon to hand over");
    match control::call(&cfg.socket, &Request::Handover, Duration::from_secs(120)) {
        Ok(_) => {}
        Err(e) => {
            warn!("the old daemon's handover reply: {e:#} (checking whether it exited anyway)")
        }
    }
    control::wait_for_exit(pid, Duration::from_secs(60))?;
    Ok(())
}

/// What the fd store gave back at start: the kernel connection (and objects)
/// a previous daemon parked, until the transport claims them.
#[derive(Default)]
pub(crate) struct Parked {
    held: Vec<fdstore::Entry>,
}

impl Parked {
    pub(crate) fn from_store(store: Option<&fdstore::Client>) -> anyhow::Result<Parked> {
        let held = match store {
            Some(s) => s.get().context("reading the fd store")?,
            None => Vec::new(),
        };
        Ok(Parked { held })
    }

    /// Whether a previous daemon left a kernel connection: its mounts are
    /// to be taken over.
    pub(crate) fn has_connection(&self) -> bool {
        self.held
            .iter()
            .any(|e| e.name == DEVICE_ENTRY || e.name == FUSE_ENTRY || e.name == FANOTIFY_ENTRY)
    }

    /// Whether that connection is a cachefiles device (whose kernel cache
    /// outlives the daemon, see `Catalog::keep_kernel_bindings`).
    pub(crate) fn has_cachefiles(&self) -> bool {
        self.held.iter().any(|e| e.name == DEVICE_ENTRY)
    }

    /// Takes an entry out of what the fd store gave back.
    fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let pos = self.held.iter().position(|e| e.name == name)?;
        Some(self.held.remove(pos).fd)
    }

    /// The bound cachefiles device a previous daemon parked, with the objects
    /// it handed over (those of `saved` whose fds are parked too).
    pub(crate) fn take_cachefiles(
        &mut self,
        saved: Vec<ParkedObject>,
    ) -> Option<(OwnedFd, Vec<HandedObject>)> {
        let fd = self.take(DEVICE_ENTRY)?;
        let mut handed = Vec::new();
        for parked in saved {
            if let Some(fd) = self.take(&format!("{OBJECT_PREFIX}{}", parked.object_id)) {
                handed.push(HandedObject {
                    object_id: parked.object_id,
                    fd,
                    volume: parked.volume,
                    cookie: parked.cookie,
                    size: parked.size,
                });
            }
        }
        Some((fd, handed))
    }

    /// The memfd of kubelet credentials a previous daemon parked (it stays
    /// in the store: the entry is replaced at the next change).
    pub(crate) fn take_kubelet_credentials(&mut self) -> Option<OwnedFd> {
        self.take(KUBELET_CREDENTIALS_ENTRY)
    }

    /// The fanotify group a previous daemon parked.
    pub(crate) fn take_fanotify(&mut self) -> Option<OwnedFd> {
        self.take(FANOTIFY_ENTRY)
    }

    /// The fanotify transport's cache files a previous daemon parked, by
    /// blob name.
    pub(crate) fn take_fanotify_files(&mut self) -> Vec<(String, OwnedFd)> {
        let (files, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|e| e.name.starts_with(FANOTIFY_FILE_PREFIX));
        self.held = rest;
        files
            .into_iter()
            .map(|e| (e.name[FANOTIFY_FILE_PREFIX.len()..].to_owned(), e.fd))
            .collect()
    }

    /// The FUSE connection a previous daemon parked, with its session (as
    /// `saved`, else assumed).
    pub(crate) fn take_fuse(
        &mut self,
        saved: Option<fuse::Session>,
    ) -> Option<(OwnedFd, fuse::Session)> {
        let fd = self.take(FUSE_ENTRY)?;
        let session = saved.unwrap_or_else(|| {
            warn!("no saved FUSE session: assuming protocol 7.40 with resend; nodes the old daemon named are unknown");
            fuse::Session {
                minor: 40,
                kernel_flags: lazypull_fuse::abi::init_flags::HAS_RESEND,
                max_read: 1 << 20,
                nodes: Vec::new(),
            }
        });
        Some((fd, session))
    }

    /// Drops whatever the transport did not claim, from the fd store too.
    pub(crate) fn drop_unclaimed(self, store: Option<&fdstore::Client>) -> anyhow::Result<()> {
        let held = self.held;
        for stale in &held {
            warn!(entry = %stale.name, "the fd store held an fd nothing claims; dropped");
        }
        if let Some(s) = store {
            let names: Vec<String> = held.iter().map(|e| e.name.clone()).collect();
            if !names.is_empty() {
                s.remove(&names)?;
            }
        }
        drop(held);
        Ok(())
    }
}

/// Keeps the bound cachefiles device in the fd store, for as long as the
/// mounts live.
pub(crate) fn park_cachefiles_device(
    store: &fdstore::Client,
    fd: BorrowedFd<'_>,
) -> anyhow::Result<()> {
    store
        .put(DEVICE_ENTRY, fd, true)
        .context("parking the kernel connection in the fd store")
}

/// Keeps the FUSE connection in the fd store, for as long as the mounts live.
pub(crate) fn park_fuse_connection(
    store: &fdstore::Client,
    fd: BorrowedFd<'_>,
) -> anyhow::Result<()> {
    store
        .put(FUSE_ENTRY, fd, true)
        .context("parking the kernel connection in the fd store")
}

/// Parks a fanotify cache file (opened before its mark) for a successor.
pub(crate) fn park_fanotify_file(
    store: &fdstore::Client,
    blob: &str,
    fd: BorrowedFd<'_>,
) -> anyhow::Result<()> {
    store
        .put(&format!("{FANOTIFY_FILE_PREFIX}{blob}"), fd, true)
        .with_context(|| format!("parking the cache file of blob {blob} in the fd store"))
}

/// Keeps the fanotify group in the fd store, for as long as the mounts live.
pub(crate) fn park_fanotify_group(
    store: &fdstore::Client,
    fd: BorrowedFd<'_>,
) -> anyhow::Result<()> {
    store
        .put(FANOTIFY_ENTRY, fd, true)
        .context("parking the fanotify group in the fd store")
}

/// Parks `bytes` (the kubelet credentials' snapshot) in the fd store: a new
/// memfd, sealed against any change, replacing the previous entry.
pub(crate) fn park_kubelet_credentials(
    store: &fdstore::Client,
    bytes: &[u8],
) -> anyhow::Result<()> {
    use rustix::fs::{MemfdFlags, SealFlags};
    use std::io::Write;
    let fd = rustix::fs::memfd_create(
        "lazypull-kubelet-credentials",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .context("creating a memfd for the kubelet credentials")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)
        .context("writing the kubelet credentials into their memfd")?;
    // Sealed: whoever gets it from the store can read it, nobody can change it.
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )
    .context("sealing the kubelet credentials' memfd")?;
    store
        .put(KUBELET_CREDENTIALS_ENTRY, file.as_fd(), true)
        .context("parking the kubelet credentials in the fd store")
}

/// What a parked kubelet credentials memfd holds. Read with `pread` from 0:
/// the store's dup shares the file offset.
pub(crate) fn read_kubelet_credentials(fd: OwnedFd) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd);
    let len = file
        .metadata()
        .context("the parked kubelet credentials' memfd")?
        .len();
    if len > 64 << 20 {
        bail!("the parked kubelet credentials' memfd holds {len} bytes: not ours");
    }
    let mut bytes = vec![0; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .context("reading the parked kubelet credentials")?;
    Ok(bytes)
}

/// What is left of the transport once it stopped serving: what a handover
/// parks, or a shutdown releases.
pub(crate) enum Finished {
    Cachefiles(OpenObjects),
    Fuse(Arc<FuseServer>),
    Fanotify(Arc<FanotifyServer>),
}

/// Parks what a successor needs: the cachefiles objects' fds in the fd store,
/// their keys (or the FUSE session) in the run dir. The kernel connection
/// itself is already in the store.
pub(crate) fn hand_over(
    finished: &Finished,
    store: Option<&fdstore::Client>,
    run_dir: &Path,
) -> anyhow::Result<()> {
    let store = store.context("no fd store: nothing can carry the mounts to a successor")?;
    let mut state = TransportState::default();
    match finished {
        Finished::Cachefiles(objects) => {
            for o in objects.for_handover()? {
                store.put(
                    &format!("{OBJECT_PREFIX}{}", o.object_id),
                    o.fd.as_fd(),
                    false,
                )?;
                state.objects.push(ParkedObject {
                    object_id: o.object_id,
                    volume: o.volume,
                    cookie: o.cookie,
                    size: o.size,
                });
            }
        }
        Finished::Fuse(server) => state.fuse = server.session(),
        Finished::Fanotify(_) => state.fanotify_fd_limit = Some(super::transport::fd_limit()),
    }
    state.save(run_dir)?;
    info!(
        objects = state.objects.len(),
        "handed over: the fd store keeps the kernel connection for the next daemon"
    );
    Ok(())
}

/// Ends serving for good: the cache is unbound (cachefiles) or the blob mount
/// detached (FUSE) once the fd store lets go of its fds.
pub(crate) fn shut_down(finished: &Finished, store: Option<&fdstore::Client>, run_dir: &Path) {
    if let Finished::Fuse(server) = finished {
        if let Err(e) = server.unmount() {
            warn!("{e}");
        }
    }
    if let Some(s) = store {
        if let Err(e) = s.exit() {
            warn!("releasing the fd store: {e:#}");
        }
    }
    persist::forget(run_dir);
}
