//! `lazypull mount`, `umount` and `status`: clients of the daemon's control
//! socket, plus the mount(2) / umount(2) calls themselves.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use lazypull_backend::registry::Reference;

use crate::catalog::{RegisterRequest, Registered};
use crate::control::{self, PrefetchSpec, Request};
use crate::publish::RegistryArgs;

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The lazy image: REGISTRY/REPOSITORY[:TAG|@DIGEST] (pushed with `lazypull push`).
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

fn mount_error_hint(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::ENODEV) => " (this kernel has no EROFS)",
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
    let started = Instant::now();
    let reference = Reference::parse(&args.reference)?;
    let creds = args.registry.credentials(&reference.registry)?;
    let prefetch = prefetch_spec(&args)?;
    let req = RegisterRequest {
        reference: args.reference.clone(),
        username: creds.as_ref().map(|c| c.username.clone()),
        password: creds.map(|c| c.password),
        insecure: args.registry.insecure,
    };
    let registered: Registered = serde_json::from_value(control::call(
        &args.socket,
        &Request::Register(req),
        Duration::from_secs(600),
    )?)
    .context("the daemon's register reply is not valid")?;

    std::fs::create_dir_all(&args.mountpoint)
        .with_context(|| format!("creating the mountpoint {}", args.mountpoint.display()))?;
    let mut data = format!("fsid={}", registered.fsid);
    if let Some(domain) = &args.domain {
        data.push_str(&format!(",domain_id={domain}"));
    }
    let data = std::ffi::CString::new(data).context("mount options contain a NUL byte")?;
    rustix::mount::mount(
        "lazypull",
        &args.mountpoint,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        Some(data.as_c_str()),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "mounting {} at {}: {e}{}",
            args.reference,
            args.mountpoint.display(),
            mount_error_hint(Some(e.raw_os_error()))
        )
    })?;
    let mounted_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mountpoint = std::fs::canonicalize(&args.mountpoint)?;
    let after = control::call(
        &args.socket,
        &Request::Mounted {
            fsid: registered.fsid.clone(),
            mountpoint: mountpoint.clone(),
            prefetch: prefetch.clone(),
        },
        Duration::from_secs(30),
    )
    .context("telling the daemon about the mount (the image is mounted)")?;
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
    let t = &s["transport"];
    let f = &s["fetch"];
    println!("lazypull daemon pid {} up {}s", s["pid"], s["uptime_secs"]);
    println!(
        "  kernel: {} opens, {} reads ({} failed), {} written",
        t["opens"],
        t["reads"],
        t["read_failures"],
        indicatif::HumanBytes(t["bytes_written"].as_u64().unwrap_or(0))
    );
    println!(
        "  fetch: {} range requests, {} fetched, {} units ({} shared in flight, {} cached), {} verify failures",
        f["range_requests"],
        indicatif::HumanBytes(f["stored_bytes"].as_u64().unwrap_or(0)),
        f["units_fetched"],
        f["dedup_waits"],
        f["cache_hits"],
        f["verify_failures"]
    );
    if let Some(images) = s["images"].as_array() {
        for i in images {
            println!(
                "  image {} fsid {} mounted at {}",
                i["reference"].as_str().unwrap_or("?"),
                &i["fsid"].as_str().unwrap_or("?")
                    [..12.min(i["fsid"].as_str().unwrap_or("?").len())],
                i["mountpoints"]
            );
        }
    }
    Ok(())
}
