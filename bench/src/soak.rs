//! `soak`: lazypull under sustained load and faults for a long run (issue
//! 17's RELIABILITY.md figures). On the host, with the FUSE transport:
//! - several images pushed to Debian's docker-registry, reached through the
//!   fault proxy injecting every fault kind (503s, resets, truncated and
//!   corrupted bodies, slow answers) on blob reads;
//! - a daemon with a cache limit of half the images' size (so eviction
//!   runs all the time), SIGKILLed at random moments and replaced by a
//!   successor that takes the FUSE connection over;
//! - many readers of random ranges of the mounted images, every byte
//!   compared with the source; a watchdog calls a read that takes longer
//!   than a limit a hang;
//! - one more image mounted, checked whole and unmounted in a loop.
//!
//! It reports reads served, wrong bytes (must be 0), EIOs and the causes
//! the daemons logged, hangs (must be 0), daemon restarts, peak RSS and
//! fds, cache use against its limit; and fails (exit 1) on any wrong byte
//! or hang.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazypull_testkit::proxy::{FaultSource, Proxy};
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

/// Every fault kind, on every N-th blob request (primes: they interleave).
pub const FAULTS: &str = "5xx:7,reset:11,truncate:13,slow:17,corrupt:19,slow_ms:2000,only:/blobs/";
const IMAGES: usize = 4;
const BIG_FILES: usize = 4;
const BIG_BYTES: usize = 8 << 20;
const SMALL_FILES: usize = 40;
/// A read taking longer than this is a hang.
const HANG: Duration = Duration::from_secs(120);

struct Image {
    src: PathBuf,
    files: Vec<(String, u64)>,
    reference: String,
}

struct Daemon {
    lazypull: PathBuf,
    work: PathBuf,
    limit: u64,
    child: Child,
    started: u32,
}

impl Daemon {
    fn socket(&self) -> PathBuf {
        self.work.join("run/ctl.sock")
    }

    fn start(&mut self) -> Result<()> {
        self.started += 1;
        let log = fs::File::create(self.work.join(format!("daemon-{}.log", self.started)))?;
        let w = &self.work;
        let child = Command::new(&self.lazypull)
            .arg("daemon")
            .arg("--config")
            .arg(w.join("config.toml"))
            .args(["--transport", "fuse"])
            .arg("--cache-dir")
            .arg(w.join("cache"))
            .arg("--work-dir")
            .arg(w.join("state"))
            .arg("--run-dir")
            .arg(w.join("run"))
            .arg("--fuse-dir")
            .arg(w.join("blobs"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--fd-store")
            .arg(w.join("run/fdstore.sock"))
            .args(["--cache-limit", &self.limit.to_string()])
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let pid = u64::from(child.id());
        self.child = child;
        let deadline = Instant::now() + Duration::from_secs(60);
        while status(&self.lazypull, &self.socket()).and_then(|s| s["pid"].as_u64()) != Some(pid) {
            if Instant::now() > deadline {
                bail!("daemon {} not up in 60 s", self.started);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill_and_restart(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.start()
    }
}

fn status(lazypull: &Path, socket: &Path) -> Option<serde_json::Value> {
    let out = Command::new(lazypull)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn make_image(lazypull: &Path, work: &Path, registry: &RegistryServer, i: usize) -> Result<Image> {
    let src = work.join(format!("src{i}"));
    fs::create_dir_all(&src)?;
    let mut files = Vec::new();
    for f in 0..BIG_FILES {
        let name = format!("big{f}.bin");
        let data = lazypull_testkit::maketree::random_bytes(BIG_BYTES, (i * 100 + f) as u64);
        fs::write(src.join(&name), &data)?;
        files.push((name, BIG_BYTES as u64));
    }
    for f in 0..SMALL_FILES {
        let name = format!("small{f}.txt");
        let len = 4096 + (f * 1543 % 60_000);
        let data = lazypull_testkit::maketree::random_bytes(len, (i * 1000 + f) as u64 + 7);
        fs::write(src.join(&name), &data)?;
        files.push((name, len as u64));
    }
    let out = work.join(format!("img{i}"));
    run_ok(
        Command::new(lazypull)
            .arg("build")
            .arg(&src)
            .arg("-o")
            .arg(&out),
        "lazypull build",
    )?;
    let pushed = format!("{}/lp/soak{i}:v1", registry.addr());
    run_ok(
        Command::new(lazypull).arg("push").arg(&out).arg(&pushed),
        "lazypull push",
    )?;
    Ok(Image {
        src,
        files,
        reference: format!("lp/soak{i}:v1"),
    })
}

fn mount(lazypull: &Path, socket: &Path, reference: &str, mnt: &Path) -> Result<()> {
    fs::create_dir_all(mnt)?;
    run_ok(
        Command::new(lazypull)
            .arg("mount")
            .arg(reference)
            .arg(mnt)
            .arg("--insecure")
            .arg("--socket")
            .arg(socket),
        "lazypull mount",
    )
}

fn umount(lazypull: &Path, socket: &Path, mnt: &Path) -> Result<()> {
    run_ok(
        Command::new(lazypull)
            .arg("umount")
            .arg(mnt)
            .arg("--socket")
            .arg(socket),
        "lazypull umount",
    )
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    bytes: AtomicU64,
    eio: AtomicU64,
    wrong: AtomicU64,
    other_errors: AtomicU64,
    hangs: AtomicU64,
    cycles: AtomicU64,
    cycle_failures: AtomicU64,
}

fn fds_and_rss(pid: u32) -> (u64, u64) {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let rss = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    (fds, rss * 1024)
}

/// A small xorshift generator (reproducible from the printed seed).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The causes of EIO the daemons logged, by message with numbers and
/// digests taken out.
fn eio_causes(work: &Path, daemons: u32) -> BTreeMap<String, u64> {
    let mut causes = BTreeMap::new();
    for i in 1..=daemons {
        let Ok(text) = fs::read_to_string(work.join(format!("daemon-{i}.log"))) else {
            continue;
        };
        for line in text.lines().filter(|l| l.contains("EIO")) {
            let msg = line.split_once(": ").map_or(line, |(_, m)| m);
            // Digests and numbers out: one line per kind of cause.
            let cause: Vec<String> = msg
                .split_whitespace()
                .map(|w| {
                    if w.chars().filter(|c| c.is_ascii_hexdigit()).count() >= 12 {
                        "<digest>".to_string()
                    } else if w.chars().any(|c| c.is_ascii_digit()) {
                        "N".to_string()
                    } else {
                        w.to_string()
                    }
                })
                .collect();
            let cause: String = cause.join(" ").chars().take(200).collect();
            *causes.entry(cause).or_default() += 1;
        }
    }
    causes
}

pub fn run(minutes: u64, readers: usize, work: &Path) -> Result<()> {
    let lazypull = super::sibling("lazypull")?;
    for m in ["blobs", "mnt0", "mnt1", "mnt2", "mnt3"] {
        let _ = rustix::mount::unmount(work.join(m), rustix::mount::UnmountFlags::DETACH);
    }
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work)?;
    fs::write(work.join("config.toml"), "")?;
    let registry = RegistryServer::start(&work.join("registry"), None)?;
    eprintln!("soak: building and pushing {IMAGES} images");
    let images: Vec<Image> = (0..IMAGES)
        .map(|i| make_image(&lazypull, work, &registry, i))
        .collect::<Result<_>>()?;
    let faults = work.join("faults");
    fs::write(&faults, FAULTS)?;
    let proxy = Proxy::start(
        registry.addr(),
        work.join("proxy.log"),
        FaultSource::File(faults),
    )?;
    let image_bytes: u64 = images
        .iter()
        .map(|i| i.files.iter().map(|f| f.1).sum::<u64>())
        .sum();
    let limit = image_bytes / 2;
    let mut daemon = Daemon {
        lazypull: lazypull.clone(),
        work: work.to_path_buf(),
        limit,
        child: Command::new("true").spawn()?,
        started: 0,
    };
    daemon.start()?;
    let socket = daemon.socket();
    let refs: Vec<String> = images
        .iter()
        .map(|i| format!("{}/{}", proxy.addr(), i.reference))
        .collect();
    for (i, r) in refs.iter().enumerate().take(IMAGES - 1) {
        mount(&lazypull, &socket, r, &work.join(format!("mnt{i}")))?;
    }
    let images = Arc::new(images);
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    eprintln!("soak: {readers} readers for {minutes} min, seed {seed}, cache limit {limit} of {image_bytes} image bytes");
    // Per reader: when its read under way started (0: none).
    let busy: Arc<Vec<AtomicU64>> = Arc::new((0..readers).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let mut threads = Vec::new();
    for r in 0..readers {
        let (images, counts, stop, busy) =
            (images.clone(), counts.clone(), stop.clone(), busy.clone());
        let work = work.to_path_buf();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(seed ^ ((r as u64 + 1) * 0x9e37_79b9_7f4a_7c15));
            let mut got = vec![0u8; 256 << 10];
            let mut want = vec![0u8; 256 << 10];
            while !stop.load(Ordering::Acquire) {
                let i = rng.below(IMAGES as u64 - 1) as usize;
                let (name, size) =
                    &images[i].files[rng.below(images[i].files.len() as u64) as usize];
                let len = (1 + rng.below((256 << 10).min(*size))) as usize;
                let off = rng.below(size - len as u64 + 1);
                busy[r].store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Release);
                let result = fs::File::open(work.join(format!("mnt{i}")).join(name))
                    .and_then(|f| f.read_exact_at(&mut got[..len], off));
                busy[r].store(0, Ordering::Release);
                match result {
                    Ok(()) => {
                        let src = fs::File::open(images[i].src.join(name))
                            .and_then(|f| f.read_exact_at(&mut want[..len], off));
                        if src.is_err() || got[..len] != want[..len] {
                            counts.wrong.fetch_add(1, Ordering::Relaxed);
                            eprintln!("soak: WRONG BYTES in image {i} {name} at {off} (+{len})");
                        } else {
                            counts.reads.fetch_add(1, Ordering::Relaxed);
                            counts.bytes.fetch_add(len as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        counts.eio.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counts.other_errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("soak: reader {r}: image {i} {name}: {e}");
                    }
                }
            }
        }));
    }
    // The mount/umount cycle of the last image.
    let cycler = {
        let (images, counts, stop) = (images.clone(), counts.clone(), stop.clone());
        let (lazypull, socket, reference) =
            (lazypull.clone(), socket.clone(), refs[IMAGES - 1].clone());
        let mnt = work.join(format!("mnt{}", IMAGES - 1));
        std::thread::spawn(move || {
            let img = &images[IMAGES - 1];
            while !stop.load(Ordering::Acquire) {
                let cycle = (|| -> Result<()> {
                    mount(&lazypull, &socket, &reference, &mnt)?;
                    let checked = (|| -> Result<()> {
                        for (name, _) in img.files.iter().step_by(7) {
                            let got = Sha256::digest(fs::read(mnt.join(name))?);
                            let want = Sha256::digest(fs::read(img.src.join(name))?);
                            if got != want {
                                counts.wrong.fetch_add(1, Ordering::Relaxed);
                                eprintln!("soak: WRONG BYTES in the cycled image's {name}");
                            }
                        }
                        Ok(())
                    })();
                    umount(&lazypull, &socket, &mnt)?;
                    checked
                })();
                match cycle {
                    Ok(()) => counts.cycles.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        // A kill under way refuses mounts for a moment; an EIO
                        // from the backend's faults is counted like a reader's.
                        let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
                        eprintln!("soak: a mount cycle failed: {e:#}");
                        std::thread::sleep(Duration::from_millis(500));
                        counts.cycle_failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };

    let until = Instant::now() + Duration::from_secs(minutes * 60);
    let mut rng = Rng(seed);
    let mut next_kill = Instant::now() + Duration::from_secs(30 + rng.below(60));
    let (mut peak_rss, mut peak_fds, mut peak_used, mut restarts) = (0, 0, 0, 0u64);
    let mut last_report = Instant::now();
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
        let (fds, rss) = fds_and_rss(daemon.child.id());
        peak_fds = peak_fds.max(fds);
        peak_rss = peak_rss.max(rss);
        let now = epoch.elapsed().as_millis() as u64;
        for b in busy.iter() {
            let since = b.load(Ordering::Acquire);
            if since != 0 && now.saturating_sub(since) > HANG.as_millis() as u64 {
                // Counted once: the stamp moves so the read counts again
                // only after another full HANG.
                b.store(now, Ordering::Release);
                counts.hangs.fetch_add(1, Ordering::Relaxed);
                eprintln!("soak: a read has taken longer than {HANG:?}");
            }
        }
        // The page cache would answer most reads after a while: dropped
        // every 5 s, reads reach the daemon (and the cache limit evicts).
        if epoch.elapsed().as_secs().is_multiple_of(5) {
            rustix::fs::sync();
            let _ = fs::write("/proc/sys/vm/drop_caches", "3");
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            if let Some(s) = status(&lazypull, &socket) {
                let used = s["cache"]["used_bytes"].as_u64().unwrap_or(0);
                peak_used = peak_used.max(used);
            }
            eprintln!(
                "soak: {:>4} s: {} reads right, {} EIO, {} wrong, {} hangs, {} restarts, {} mount cycles, RSS {} MiB, {} fds",
                epoch.elapsed().as_secs(),
                counts.reads.load(Ordering::Relaxed),
                counts.eio.load(Ordering::Relaxed),
                counts.wrong.load(Ordering::Relaxed),
                counts.hangs.load(Ordering::Relaxed),
                restarts,
                counts.cycles.load(Ordering::Relaxed),
                rss >> 20,
                fds
            );
        }
        if Instant::now() >= next_kill {
            daemon.kill_and_restart()?;
            restarts += 1;
            next_kill = Instant::now() + Duration::from_secs(30 + rng.below(60));
        }
    }
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(120);
    while threads.iter().any(|t| !t.is_finished()) || !cycler.is_finished() {
        if Instant::now() > deadline {
            counts.hangs.fetch_add(1, Ordering::Relaxed);
            bail!("readers still reading 120 s after the end: a hang");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = cycler.join();
    let final_status = status(&lazypull, &socket);
    let proxy_log = fs::read_to_string(work.join("proxy.log")).unwrap_or_default();
    let mut faults_injected: BTreeMap<String, u64> = BTreeMap::new();
    for line in proxy_log.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(f) = v["fault"].as_str() {
                *faults_injected.entry(f.to_string()).or_default() += 1;
            }
        }
    }
    for i in 0..IMAGES - 1 {
        let _ = umount(&lazypull, &socket, &work.join(format!("mnt{i}")));
    }
    let _ = Command::new(&lazypull)
        .arg("shutdown")
        .arg("--socket")
        .arg(&socket)
        .arg("--fd-store")
        .arg(work.join("run/fdstore.sock"))
        .output();
    let _ = daemon.child.wait();
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = serde_json::json!({
        "minutes": minutes,
        "readers": readers,
        "seed": seed,
        "images": IMAGES,
        "image_bytes": image_bytes,
        "faults": FAULTS,
        "faults_injected": faults_injected,
        "reads_right": g(&counts.reads),
        "bytes_read": g(&counts.bytes),
        "wrong_bytes": g(&counts.wrong),
        "eio": g(&counts.eio),
        "eio_causes_logged": eio_causes(work, daemon.started),
        "other_errors": g(&counts.other_errors),
        "hangs": g(&counts.hangs),
        "daemon_restarts": restarts,
        "mount_cycles": g(&counts.cycles),
        "mount_cycle_failures": g(&counts.cycle_failures),
        "peak_rss_bytes": peak_rss,
        "peak_fds": peak_fds,
        "cache_limit_bytes": limit,
        "cache_peak_used_bytes": peak_used,
        "cache_final": final_status.as_ref().map(|s| s["cache"].clone()),
    });
    let text = serde_json::to_string_pretty(&report)?;
    fs::write(work.join("soak.json"), &text)?;
    println!("{text}");
    if g(&counts.wrong) > 0 || g(&counts.hangs) > 0 {
        bail!("the soak saw wrong bytes or hangs");
    }
    Ok(())
}
