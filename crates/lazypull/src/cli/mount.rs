//! `lazypull mount` and `umount`: registering an image with the daemon over
//! its control socket, the mount(2) / umount(2) calls themselves (in this
//! process's mount namespace), and telling the daemon. How an image mounts
//! is the daemon's plan; this only carries it out.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use lazypull_backend::registry::Reference;

use super::registry_args::RegistryArgs;
use crate::control::{self, MountPlan, PrefetchSpec, RegisterRequest, Registered, Request};

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The lazy image: REGISTRY/REPOSITORY[:TAG|@DIGEST] (pushed with `lazypull
    /// push`), or with --fsid the meta blob name of an image in the daemon's
    /// --blob-dir / --blob-url (what `lazypull build` printed).
    pub(crate) reference: String,
    /// Where to mount it (created if missing).
    pub(crate) mountpoint: PathBuf,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    /// Share the cache of equal blobs with other images mounted with the same
    /// domain (EROFS `domain_id`).
    #[arg(long, value_name = "NAME")]
    pub(crate) domain: Option<String>,
    /// After mounting, fetch the whole image in the background (reads that
    /// wait always go first).
    #[arg(long)]
    pub(crate) prefetch_all: bool,
    /// After mounting, fetch these files first, in order, in the background:
    /// a file with one absolute path per line (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub(crate) prefetch_list: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// The image is named by its meta blob (fsid) in the daemon's blob store,
    /// not by a registry reference.
    #[arg(long)]
    pub(crate) fsid: bool,
    /// Honour the setuid and setgid bits of the image's files. Without it the
    /// image is mounted `nosuid`: a setuid-root binary in the image runs with
    /// its caller's rights. (A container root file system stacked on the
    /// mount with overlayfs keeps setuid without this: the overlay's own mount
    /// flags apply to its files.)
    #[arg(long)]
    pub(crate) suid: bool,
    /// Let device nodes in the image be opened. Without it the image is
    /// mounted `nodev`: opening one fails with EACCES (also as root).
    #[arg(long)]
    pub(crate) dev: bool,
}

/// What an image's own file modes may grant beyond reading it. Off unless
/// asked for: an image comes from elsewhere, and its mount is reachable by
/// every local user who reaches the mountpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ImageTrust {
    /// Setuid and setgid bits take effect (else `nosuid`).
    pub(crate) suid: bool,
    /// Device nodes can be opened (else `nodev`).
    pub(crate) dev: bool,
}

impl ImageTrust {
    /// The mount(2) flags of an image mounted with this trust.
    pub(crate) fn mount_flags(self) -> rustix::mount::MountFlags {
        use rustix::mount::MountFlags;
        let mut flags = MountFlags::RDONLY;
        if !self.suid {
            flags |= MountFlags::NOSUID;
        }
        if !self.dev {
            flags |= MountFlags::NODEV;
        }
        flags
    }
}

#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    pub(crate) mountpoint: PathBuf,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
}

fn prefetch_spec(args: &MountArgs) -> anyhow::Result<PrefetchSpec> {
    let mut spec = PrefetchSpec {
        all: args.prefetch_all,
        paths: Vec::new(),
        skip_record: false,
    };
    if let Some(list) = &args.prefetch_list {
        let mut text = String::new();
        if list == Path::new("-") {
            std::io::stdin().read_to_string(&mut text)?;
        } else {
            text = std::fs::read_to_string(list)
                .with_context(|| format!("reading the prefetch list {}", list.display()))?;
        }
        spec.paths = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
    }
    Ok(spec)
}

fn mount_error_hint(errno: Option<i32>, cachefiles: bool) -> &'static str {
    match errno {
        Some(libc::ENODEV) => " (this kernel has no EROFS)",
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTBLK) if !cachefiles => {
            " (this kernel's EROFS cannot mount files: it needs Linux 6.12+ with CONFIG_EROFS_FS_BACKED_BY_FILE)"
        }
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            " (this kernel's EROFS lacks fscache on-demand mode: CONFIG_EROFS_FS_ONDEMAND; or the daemon is not bound)"
        }
        Some(libc::EPERM) => " (mounting needs root / CAP_SYS_ADMIN)",
        // The FUSE blob files let in only uid 0 with gid 0 (no `allow_other`).
        Some(libc::EACCES) if !cachefiles => {
            " (the daemon's FUSE blob files are root's only: mount as root, with group root)"
        }
        Some(libc::EBUSY) => {
            " (this image is already mounted: the kernel allows one on-demand mount per image fsid)"
        }
        Some(libc::EIO) | Some(libc::ENOENT) => " (the daemon could not serve the image: see its log)",
        _ => "",
    }
}

pub fn mount(args: MountArgs) -> anyhow::Result<()> {
    let prefetch = prefetch_spec(&args)?;
    let req = if args.fsid {
        RegisterRequest {
            fsid: Some(args.reference.clone()),
            ..RegisterRequest::default()
        }
    } else {
        let reference = Reference::parse(&args.reference)?;
        let creds = args.registry.credentials(&reference.registry)?;
        RegisterRequest {
            reference: args.reference.clone(),
            fsid: None,
            username: creds.as_ref().map(|c| c.username.clone()),
            password: creds.map(|c| c.password),
            insecure: args.registry.insecure,
        }
    };
    let m = mount_image(
        &args.socket,
        req,
        &args.reference,
        None,
        &args.mountpoint,
        args.domain.as_deref(),
        &prefetch,
        ImageTrust {
            suid: args.suid,
            dev: args.dev,
        },
    )?;
    let (registered, mountpoint, mounted_ms, after) =
        (m.registered, m.mountpoint, m.mount_ms, m.prefetch);
    if args.json {
        let out = serde_json::json!({
            "reference": registered.reference,
            "manifest_digest": registered.manifest_digest,
            "mountpoint": mountpoint,
            "fsid": registered.fsid,
            "blobs": registered.blobs,
            "data_bytes": registered.data_bytes,
            "fetched_bytes": registered.fetched_bytes,
            "register_ms": registered.elapsed_ms,
            "mount_ms": mounted_ms,
            "prefetch": after,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "mounted {} at {} in {:.0} ms: {} data blobs, {} of data; fetched {} to mount{}",
            registered.reference,
            mountpoint.display(),
            mounted_ms,
            registered.blobs,
            indicatif::HumanBytes(registered.data_bytes),
            indicatif::HumanBytes(registered.fetched_bytes),
            if prefetch.is_empty() {
                ""
            } else {
                "; prefetching in the background"
            }
        );
    }
    Ok(())
}

/// The loop transport's plan made real: a read-only loop device over the
/// source file and over each `device=` file of `options`. Returns the source
/// and options naming the devices instead, with the devices (to hold until
/// the mount has opened them).
fn loop_backed(
    source: &str,
    options: &str,
    direct_io: bool,
) -> anyhow::Result<(String, String, Vec<lazypull_transport::loopdev::LoopDevice>)> {
    use lazypull_transport::loopdev::{self, Options};
    let attach = |file: &str| {
        loopdev::attach(Path::new(file), Options { direct_io })
            .with_context(|| format!("a loop device for the blob file {file}"))
    };
    let mut loops = Vec::new();
    let meta = attach(source)?;
    let source = meta.path().display().to_string();
    loops.push(meta);
    let mut out = Vec::new();
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        match opt.strip_prefix("device=") {
            Some(file) => {
                let dev = attach(file)?;
                out.push(format!("device={}", dev.path().display()));
                loops.push(dev);
            }
            None => out.push(opt.to_owned()),
        }
    }
    Ok((source, out.join(","), loops))
}

/// An image registered with the daemon and mounted.
pub(crate) struct Mounted {
    pub(crate) registered: Registered,
    pub(crate) mountpoint: PathBuf,
    pub(crate) mount_ms: f64,
    /// The daemon's answer about prefetching.
    pub(crate) prefetch: serde_json::Value,
}

/// Registers `req` with the daemon at `socket`, mounts the image at
/// `mountpoint` as the daemon's plan says (mount(2) in this process's mount
/// namespace, read-only, and `nosuid` / `nodev` unless `trust` says
/// otherwise), and tells the daemon. `what` names the image in errors.
/// With `expect_fsid`, an image whose meta blob is another (a tag that moved
/// since the caller learnt the fsid) is refused before anything is mounted.
/// If the daemon cannot be told, the mount is undone: a mount the daemon
/// does not know would not survive its restart.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mount_image(
    socket: &Path,
    req: RegisterRequest,
    what: &str,
    expect_fsid: Option<&str>,
    mountpoint: &Path,
    domain: Option<&str>,
    prefetch: &PrefetchSpec,
    trust: ImageTrust,
) -> anyhow::Result<Mounted> {
    let started = Instant::now();
    let reply = control::call(socket, &Request::Register(req), Duration::from_secs(600))?;
    let plan: MountPlan = serde_json::from_value(reply["mount"].clone())
        .context("the daemon's register reply has no valid mount plan")?;
    let registered: Registered =
        serde_json::from_value(reply).context("the daemon's register reply is not valid")?;
    if let Some(expected) = expect_fsid {
        if registered.fsid != expected {
            anyhow::bail!(
                "{what} is now the image with meta blob {} (manifest {}), but meta blob {expected} was expected: the tag moved since the pull; pull the image again",
                registered.fsid,
                registered.manifest_digest
            );
        }
    }

    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("creating the mountpoint {}", mountpoint.display()))?;
    let mut data = plan.options.clone();
    if let Some(domain) = &domain {
        if !plan.domain {
            anyhow::bail!("--domain applies to the cachefiles transport only: with FUSE, images share equal blobs (and their cache) by name anyway");
        }
        data.push_str(&format!(",domain_id={domain}"));
    }
    let mut source = plan.source.clone();
    // The loop transport: held open until mount(2) has opened them (then the
    // mount is their only opener, and its unmount releases them: autoclear).
    let _loops = if plan.loop_devices {
        let (s, d, loops) = loop_backed(&source, &data, plan.loop_direct_io)?;
        (source, data) = (s, d);
        loops
    } else {
        Vec::new()
    };
    let data = std::ffi::CString::new(data).context("mount options contain a NUL byte")?;
    rustix::mount::mount(
        source.as_str(),
        mountpoint,
        plan.fstype.as_str(),
        trust.mount_flags(),
        Some(data.as_c_str()),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "mounting {} at {}: {e}{}",
            what,
            mountpoint.display(),
            mount_error_hint(Some(e.raw_os_error()), plan.domain)
        )
    })?;
    let mount_ms = started.elapsed().as_secs_f64() * 1000.0;
    let told = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("resolving the mountpoint {}", mountpoint.display()))
        .and_then(|mountpoint| {
            let after = control::call(
                socket,
                &Request::Mounted {
                    fsid: registered.fsid.clone(),
                    mountpoint: mountpoint.clone(),
                    prefetch: prefetch.clone(),
                },
                Duration::from_secs(30),
            )
            .context("telling the daemon about the mount (so the mount was undone)")?;
            Ok((mountpoint, after))
        });
    let (mountpoint, after) = match told {
        Ok(t) => t,
        Err(e) => {
            if let Err(undo) =
                rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty())
            {
                tracing::warn!(mountpoint = %mountpoint.display(), "undoing the mount failed: {undo}");
            }
            return Err(e);
        }
    };
    Ok(Mounted {
        registered,
        mountpoint,
        mount_ms,
        prefetch: after,
    })
}

pub fn umount(args: UmountArgs) -> anyhow::Result<()> {
    let mountpoint = std::fs::canonicalize(&args.mountpoint)
        .with_context(|| format!("{} does not exist", args.mountpoint.display()))?;
    rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::empty()).map_err(|e| {
        let hint = match e.raw_os_error() {
            libc::EINVAL => " (nothing is mounted there)",
            libc::EBUSY => " (a process still uses it)",
            _ => "",
        };
        anyhow::anyhow!("unmounting {}: {e}{hint}", mountpoint.display())
    })?;
    match control::call(
        &args.socket,
        &Request::Unmounted {
            mountpoint: mountpoint.clone(),
        },
        Duration::from_secs(10),
    ) {
        Ok(_) => {}
        Err(e) => eprintln!("lazypull: warning: unmounted, but could not tell the daemon: {e:#}"),
    }
    println!("unmounted {}", mountpoint.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::mount::MountFlags;

    #[test]
    fn images_mount_nosuid_and_nodev_unless_trusted() {
        let flags = |suid, dev| ImageTrust { suid, dev }.mount_flags();
        assert_eq!(
            flags(false, false),
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV
        );
        assert_eq!(flags(true, false), MountFlags::RDONLY | MountFlags::NODEV);
        assert_eq!(flags(false, true), MountFlags::RDONLY | MountFlags::NOSUID);
        assert_eq!(flags(true, true), MountFlags::RDONLY);
        let none = ImageTrust {
            suid: false,
            dev: false,
        };
        assert_eq!(ImageTrust::default(), none);
    }
}
