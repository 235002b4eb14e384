//! `lazypull demo`: lazy pulling end to end with nothing to set up.
//!
//! Builds an image from the built-in sample tree ([`sample`]), serves the
//! build output from a web server on 127.0.0.1 ([`http`]), starts a daemon
//! (this executable, in a work directory of its own, with the best transport
//! the kernel has) that reads blobs from that server, mounts the image, reads a
//! few files, and reports what was fetched against the image's size — first
//! cold, then again after dropping the kernel's caches. Everything is undone at
//! the end, also after an error or Ctrl-C. It drives the real commands (the
//! daemon is this executable); it must not take shortcuts around them.

mod sample;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::build::build_image;
use super::mount::{mount_image, ImageTrust};
use super::output::human;
use crate::config::TransportKind;
use crate::control::{self, PrefetchSpec, RegisterRequest, Request};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Kernel interface: auto (cachefiles on-demand if the kernel has it, else
    /// FUSE), cachefiles or fuse.
    #[arg(long, value_enum, default_value_t = TransportKind::Auto)]
    pub(crate) transport: TransportKind,
    /// Work directory (image, server files, cache, logs). Default: a new
    /// directory under /var/tmp, removed at the end.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// Keep the work directory afterwards, for a look at the cache and logs.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Print the result as JSON on stdout (progress goes to stderr).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Everything the demo set up, undone in reverse on drop.
struct Stage {
    dir: PathBuf,
    remove_dir: bool,
    server: Option<crate::blob_server::BlobServer>,
    daemon: Option<Child>,
    socket: PathBuf,
    mountpoint: Option<PathBuf>,
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(m) = self.mountpoint.take() {
            if rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).is_err() {
                let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
            }
        }
        if let Some(mut child) = self.daemon.take() {
            let asked = control::call(&self.socket, &Request::Shutdown, Duration::from_secs(5));
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if asked.is_ok() && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.server.take();
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn say(json: bool, line: impl AsRef<str>) {
    if json {
        eprintln!("{}", line.as_ref());
    } else {
        println!("{}", line.as_ref());
    }
}

fn check(interrupted: &AtomicBool) -> anyhow::Result<()> {
    if interrupted.load(Ordering::Relaxed) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

fn status(socket: &Path) -> anyhow::Result<serde_json::Value> {
    control::call(socket, &Request::Status, Duration::from_secs(10))
}

fn drop_caches() -> anyhow::Result<()> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the kernel's caches")
}

/// One file the demo reads, and what it found.
struct Read {
    path: &'static str,
    bytes: u64,
    ok: bool,
}

fn read_files(mnt: &Path) -> anyhow::Result<Vec<Read>> {
    let mut reads = Vec::new();
    let text = |path: &'static str, want: &str| -> anyhow::Result<Read> {
        let got = std::fs::read_to_string(mnt.join(path))
            .with_context(|| format!("reading {path} from the mounted image"))?;
        Ok(Read {
            path,
            bytes: got.len() as u64,
            ok: got == want,
        })
    };
    reads.push(text("etc/os-release", sample::OS_RELEASE)?);
    reads.push(text("README", sample::README)?);
    reads.push(text("usr/bin/hello", sample::HELLO)?);
    let lib = std::fs::read(mnt.join("usr/lib/libsample-3.so"))
        .context("reading usr/lib/libsample-3.so from the mounted image")?;
    reads.push(Read {
        path: "usr/lib/libsample-3.so",
        bytes: lib.len() as u64,
        ok: Sha256::digest(&lib) == Sha256::digest(sample::library(3)),
    });
    Ok(reads)
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("lazypull demo mounts file systems, which needs root: run `sudo lazypull demo`");
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone())
            .context("installing the Ctrl-C handler")?;
    }
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tempfile::Builder::new()
            .prefix("lazypull-demo-")
            .tempdir_in("/var/tmp")
            .context("creating a work directory under /var/tmp")?
            .keep(),
    };
    let mut stage = Stage {
        remove_dir: !args.keep && args.dir.is_none(),
        socket: dir.join("run/control.sock"),
        dir: dir.clone(),
        server: None,
        daemon: None,
        mountpoint: None,
    };
    let result = demo(&args, &mut stage, &interrupted);
    let kept = (!stage.remove_dir).then(|| stage.dir.clone());
    drop(stage);
    let out = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match kept {
            Some(d) => println!("cleaned up (work directory kept: {})", d.display()),
            None => println!("cleaned up"),
        }
    }
    Ok(())
}

fn demo(
    args: &DemoArgs,
    stage: &mut Stage,
    interrupted: &AtomicBool,
) -> anyhow::Result<serde_json::Value> {
    let json = args.json;
    let dir = stage.dir.clone();
    say(
        json,
        "lazypull demo: a container image, mounted at once, fetched only where read",
    );

    // 1. The image.
    let started = Instant::now();
    let (src, out) = (dir.join("sample"), dir.join("www"));
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&out);
    sample::make(&src).context("writing the sample tree")?;
    check(interrupted)?;
    let limits = lazypull_ingest::IngestOptions::default();
    let (img, stored) = build_image(&src, &out, 1 << 20, Some(3), &limits, true)?;
    std::fs::remove_dir_all(&src)?;
    let data_bytes: u64 = img.blobs.iter().map(|b| b.size).sum();
    let image_bytes = img.meta_size + data_bytes;
    say(
        json,
        format!(
            "  built the sample image in {:.1} s: {} files, {} ({} stored, compressed and chunked)",
            started.elapsed().as_secs_f64(),
            img.files,
            human(image_bytes),
            human(stored + img.meta_size)
        ),
    );
    check(interrupted)?;

    // 2. The web server.
    let server =
        crate::blob_server::BlobServer::start(&out).context("starting the demo's web server")?;
    let url = server.url();
    say(
        json,
        format!("  serving it at {url} (a plain web server with Range requests)"),
    );
    stage.server = Some(server);

    // 3. The daemon.
    let exe = std::env::current_exe().context("finding this executable")?;
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path)?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(exe)
        .arg("daemon")
        .args([
            "--config",
            "/dev/null",
            "--no-fd-store",
            "--tag",
            "lazypull-demo",
        ])
        .args(["--transport", args.transport.name()])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--fuse-dir")
        .arg(dir.join("blobs"))
        .arg("--socket")
        .arg(&stage.socket)
        .args(["--blob-url", &url])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: Ctrl-C reaches the demo, which then shuts
        // the daemon down after unmounting, in that order.
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    stage.daemon = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        check(interrupted)?;
        if let Ok(s) = status(&stage.socket) {
            break s;
        }
        if let Some(st) = stage
            .daemon
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the daemon exited at start ({st}):\n{}", log.trim_end());
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not come up within 30 s; its log: {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let transport = s["transport"]["kind"].as_str().unwrap_or("?").to_owned();
    let reason = s["transport"]["reason"].as_str().unwrap_or("").to_owned();
    say(
        json,
        format!("  daemon up: transport {transport} ({reason})"),
    );

    // 4. Mount.
    let mnt = dir.join("mnt");
    let req = RegisterRequest {
        fsid: Some(img.meta_digest.clone()),
        ..RegisterRequest::default()
    };
    let mounted = mount_image(
        &stage.socket,
        req,
        "the sample image",
        None,
        &mnt,
        None,
        &PrefetchSpec::default(),
        ImageTrust::default(),
    )?;
    stage.mountpoint = Some(mounted.mountpoint.clone());
    let http_at_mount = stage.server.as_ref().map_or(0, |s| s.bytes());
    say(
        json,
        format!(
            "  mounted at {} in {:.0} ms, after fetching {} (the image's metadata)",
            mounted.mountpoint.display(),
            mounted.mount_ms,
            human(http_at_mount)
        ),
    );
    check(interrupted)?;

    // 5. Read, cold.
    let t = Instant::now();
    let reads = read_files(&mounted.mountpoint)?;
    let cold_ms = t.elapsed().as_secs_f64() * 1000.0;
    for r in &reads {
        say(
            json,
            format!(
                "  read /{} ({}): {}",
                r.path,
                human(r.bytes),
                if r.ok {
                    "content correct"
                } else {
                    "CONTENT WRONG"
                }
            ),
        );
    }
    if let Some(bad) = reads.iter().find(|r| !r.ok) {
        bail!("/{} read back wrong from the mounted image", bad.path);
    }
    let first = mounted.mountpoint.join("etc/os-release");
    let name = std::fs::read_to_string(first)?
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or("?")
        .trim_matches('"')
        .to_owned();
    let (requests, fetched) = stage
        .server
        .as_ref()
        .map_or((0, 0), |s| (s.requests(), s.bytes()));
    let read_bytes: u64 = reads.iter().map(|r| r.bytes).sum();
    say(
        json,
        format!(
            "  the image says it is \"{name}\"; {} of files read in {cold_ms:.0} ms",
            human(read_bytes)
        ),
    );
    say(
        json,
        format!(
            "  fetched {} of the image's {} ({:.1}%) in {requests} HTTP requests",
            human(fetched),
            human(image_bytes),
            100.0 * fetched as f64 / image_bytes as f64
        ),
    );
    check(interrupted)?;

    // 6. Again, with the kernel's caches dropped: the cache answers.
    drop_caches()?;
    let again = read_files(&mounted.mountpoint)?;
    if again.iter().any(|r| !r.ok) {
        bail!("a second read returned different bytes");
    }
    let refetched = stage.server.as_ref().map_or(0, |s| s.bytes()) - fetched;
    let where_from = if transport == "cachefiles" {
        "the kernel's cachefiles cache"
    } else {
        "lazypull's local cache"
    };
    say(
        json,
        format!(
            "  after dropping the kernel's caches, reading them again fetched {} (served from {where_from})",
            human(refetched)
        ),
    );
    let s = status(&stage.socket)?;
    Ok(json!({
        "transport": transport,
        "transport_reason": reason,
        "image_bytes": image_bytes,
        "stored_bytes": stored + img.meta_size,
        "files": img.files,
        "mount_ms": mounted.mount_ms,
        "fetched_at_mount_bytes": http_at_mount,
        "read_bytes": read_bytes,
        "fetched_bytes": fetched,
        "fetched_fraction": fetched as f64 / image_bytes as f64,
        "http_requests": requests,
        "refetched_after_drop_caches_bytes": refetched,
        "reads": reads.iter().map(|r| json!({"path": r.path, "bytes": r.bytes, "ok": r.ok})).collect::<Vec<_>>(),
        "daemon_status": s,
    }))
}
