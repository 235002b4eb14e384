//! `lazypull mount`, `umount` and `status`: clients of the daemon's control
//! socket, plus the mount(2) / umount(2) calls themselves.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use lazypull_backend::registry::Reference;

use crate::catalog::{RegisterRequest, Registered};
use crate::control::{self, MountPlan, PrefetchSpec, Request};
use crate::publish::RegistryArgs;

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The lazy image: REGISTRY/REPOSITORY[:TAG|@DIGEST] (pushed with `lazypull
    /// push`), or with --fsid the meta blob name of an image in the daemon's
    /// --blob-dir / --blob-url (what `lazypull build` printed).
    pub reference: String,
    /// Where to mount it (created if missing).
    pub mountpoint: PathBuf,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Share the cache of equal blobs with other images mounted with the same
    /// domain (EROFS `domain_id`).
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// After mounting, fetch the whole image in the background (reads that
    /// wait always go first).
    #[arg(long)]
    pub prefetch_all: bool,
    /// After mounting, fetch these files first, in order, in the background:
    /// a file with one absolute path per line (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The image is named by its meta blob (fsid) in the daemon's blob store,
    /// not by a registry reference.
    #[arg(long)]
    pub fsid: bool,
}

#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the raw status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShutdownArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The fd store to release when no daemon answers (after a crash).
    #[arg(long, value_name = "PATH", default_value = crate::fdstore::DEFAULT_SOCKET)]
    pub fd_store: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct HandoverArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `lazypull handover`: asks the daemon to stop serving and park its mounts
/// for the next daemon; returns once it has exited.
pub fn handover(args: HandoverArgs) -> anyhow::Result<()> {
    let status = control::call(&args.socket, &Request::Status, Duration::from_secs(10))?;
    let pid = status["pid"].as_u64().unwrap_or(0);
    control::call(&args.socket, &Request::Handover, Duration::from_secs(120))?;
    control::wait_for_exit(pid, Duration::from_secs(60))?;
    println!(
        "lazypull daemon (pid {pid}) handed over; the next `lazypull daemon` takes the mounts"
    );
    Ok(())
}

/// `lazypull shutdown`: asks the daemon to stop for good; with no daemon
/// running, releases what the fd store still holds.
pub fn shutdown(args: ShutdownArgs) -> anyhow::Result<()> {
    match control::call(&args.socket, &Request::Shutdown, Duration::from_secs(30)) {
        Ok(v) => {
            println!("lazypull daemon (pid {}) is shutting down", v["pid"]);
            Ok(())
        }
        Err(daemon_err) => match crate::fdstore::Client::connect(&args.fd_store) {
            Ok(store) => {
                store.exit()?;
                println!(
                    "no daemon answered; released the kernel connections the fd store at {} held",
                    args.fd_store.display()
                );
                Ok(())
            }
            Err(_) => Err(daemon_err.context("no daemon and no fd store to stop")),
        },
    }
}

fn prefetch_spec(args: &MountArgs) -> anyhow::Result<PrefetchSpec> {
    let mut spec = PrefetchSpec {
        all: args.prefetch_all,
        paths: Vec::new(),
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
        &args.mountpoint,
        args.domain.as_deref(),
        &prefetch,
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

/// An image registered with the daemon and mounted.
pub struct Mounted {
    pub registered: Registered,
    pub mountpoint: PathBuf,
    pub mount_ms: f64,
    /// The daemon's answer about prefetching.
    pub prefetch: serde_json::Value,
}

/// Registers `req` with the daemon at `socket`, mounts the image at
/// `mountpoint` as the daemon's plan says (mount(2) in this process's mount
/// namespace), and tells the daemon. `what` names the image in errors.
pub fn mount_image(
    socket: &Path,
    req: RegisterRequest,
    what: &str,
    mountpoint: &Path,
    domain: Option<&str>,
    prefetch: &PrefetchSpec,
) -> anyhow::Result<Mounted> {
    let started = Instant::now();
    let reply = control::call(socket, &Request::Register(req), Duration::from_secs(600))?;
    let plan: MountPlan = serde_json::from_value(reply["mount"].clone())
        .context("the daemon's register reply has no valid mount plan")?;
    let registered: Registered =
        serde_json::from_value(reply).context("the daemon's register reply is not valid")?;

    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("creating the mountpoint {}", mountpoint.display()))?;
    let mut data = plan.options.clone();
    if let Some(domain) = &domain {
        if !plan.domain {
            anyhow::bail!("--domain applies to the cachefiles transport only: with FUSE, images share equal blobs (and their cache) by name anyway");
        }
        data.push_str(&format!(",domain_id={domain}"));
    }
    let data = std::ffi::CString::new(data).context("mount options contain a NUL byte")?;
    rustix::mount::mount(
        plan.source.as_str(),
        mountpoint,
        plan.fstype.as_str(),
        rustix::mount::MountFlags::RDONLY,
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
    let mountpoint = std::fs::canonicalize(mountpoint)?;
    let after = control::call(
        socket,
        &Request::Mounted {
            fsid: registered.fsid.clone(),
            mountpoint: mountpoint.clone(),
            prefetch: prefetch.clone(),
        },
        Duration::from_secs(30),
    )
    .context("telling the daemon about the mount (the image is mounted)")?;
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

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let s = control::call(&args.socket, &Request::Status, Duration::from_secs(10))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let bytes = |v: &serde_json::Value| indicatif::HumanBytes(v.as_u64().unwrap_or(0));
    let t = &s["transport"];
    let c = &t["counters"];
    let f = &s["fetch"];
    let h = &s["backend_http"];
    println!(
        "lazypull daemon {} pid {} up {}s",
        s["version"].as_str().unwrap_or("?"),
        s["pid"],
        s["uptime_secs"]
    );
    println!(
        "  transport: {} ({})",
        t["kind"].as_str().unwrap_or("?"),
        t["reason"].as_str().unwrap_or("")
    );
    println!(
        "  kernel: {} reads ({} failed), {} written into the cache, {} prefetched",
        c["reads"],
        c["read_failures"],
        bytes(&c["bytes_written"]),
        bytes(&c["prefetched_bytes"])
    );
    println!(
        "  fetch: {} range requests, {} fetched, {} units ({} shared in flight, {} cached), {} verify failures",
        f["range_requests"],
        bytes(&f["stored_bytes"]),
        f["units_fetched"],
        f["dedup_waits"],
        f["cache_hits"],
        f["verify_failures"]
    );
    println!(
        "  backend: {} HTTP requests ({} ranges, {} retries, {} failed), {} received",
        h["requests"],
        h["range_requests"],
        h["retries"],
        h["failures"],
        bytes(&h["bytes_received"])
    );
    let short = |v: &serde_json::Value| {
        let s = v.as_str().unwrap_or("?");
        s[..12.min(s.len())].to_owned()
    };
    for i in s["images"].as_array().into_iter().flatten() {
        println!(
            "  image {} fsid {} mounted at {}",
            i["reference"].as_str().unwrap_or("?"),
            short(&i["fsid"]),
            i["mountpoints"]
        );
    }
    for b in s["blobs"].as_array().into_iter().flatten() {
        println!(
            "  blob {}: {} of {} cached, {} fetched in {} requests, {} errors, {} in flight",
            short(&b["blob"]),
            bytes(&b["cached_bytes"]),
            bytes(&b["size"]),
            bytes(&b["source"]["bytes"]),
            b["source"]["requests"],
            b["source"]["errors"],
            bytes(&b["source"]["in_flight_bytes"])
        );
    }
    Ok(())
}
