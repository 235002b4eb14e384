//! `lazypull-bench fuse`: on the host, the FUSE transport against the plain
//! file-backed EROFS mount of the same bytes (the limit: no daemon at all), in
//! the same run, rounds alternating their order.
//!
//! Per round, each cold (fresh daemon, fresh cache, kernel caches dropped):
//! - limit: `mount -t erofs -o device=<plain blob> <meta>`, read the big file,
//!   then every small file;
//! - lazypull: `lazypull daemon --transport fuse --blob-dir <stored blobs>`
//!   (zstd units + chunk tables, as `lazypull build` writes them; every unit
//!   decompressed and verified) and `lazypull mount --fsid`; the same reads cold,
//!   then warm (caches dropped again: served from lazypull's cache through
//!   FUSE), then after a remount (the blobs are complete now: the mount plan
//!   points EROFS at the cache files directly).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazypull_erofs::{build_from_layers, BuildOptions};

fn drop_caches() -> Result<()> {
    Command::new("sync").status()?;
    fs::write("/proc/sys/vm/drop_caches", "3").context("drop_caches (root)")
}

fn read_all(path: &Path, buf: &mut [u8]) -> Result<u64> {
    let mut f = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut n = 0u64;
    loop {
        let k = f.read(buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

/// Seconds to read the big file, then every other file.
fn read_tree(mnt: &Path, small: &[PathBuf]) -> Result<(f64, f64)> {
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    read_all(&mnt.join("big.bin"), &mut buf)?;
    let big = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in small {
        read_all(&mnt.join(p), &mut buf)?;
    }
    Ok((big, t.elapsed().as_secs_f64()))
}

struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::empty());
    }
}

fn mount_limit(meta: &Path, blobs: &[PathBuf], mnt: &Path) -> Result<Mounted> {
    fs::create_dir_all(mnt)?;
    let opts: Vec<String> = blobs
        .iter()
        .map(|b| format!("device={}", b.display()))
        .collect();
    let data = std::ffi::CString::new(opts.join(","))?;
    rustix::mount::mount(
        meta,
        mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        data.as_c_str(),
    )
    .context("mounting the limit")?;
    Ok(Mounted(mnt.to_path_buf()))
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    lazypull: PathBuf,
}

impl Daemon {
    fn start(
        lazypull: &Path,
        work: &Path,
        blob_dir: &Path,
        config: &Path,
        transport: &str,
    ) -> Result<Daemon> {
        let run = work.join("run");
        let _ = fs::remove_dir_all(work.join("cache"));
        let socket = run.join("ctl.sock");
        let child = Command::new(lazypull)
            .arg("daemon")
            .arg("--config")
            .arg(config)
            .args(["--transport", transport, "--no-fd-store"])
            .arg("--cache-dir")
            .arg(work.join("cache"))
            .arg("--work-dir")
            .arg(work.join("state"))
            .arg("--run-dir")
            .arg(&run)
            .arg("--fuse-dir")
            .arg(work.join("fuse"))
            .arg("--socket")
            .arg(&socket)
            .arg("--blob-dir")
            .arg(blob_dir)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let d = Daemon {
            child,
            socket,
            lazypull: lazypull.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d
            .lp(&["status", "--json"])
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            if Instant::now() > deadline {
                bail!("the daemon did not come up");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(d)
    }

    fn lp(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.lazypull)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
    }

    fn mount(&self, meta: &str, mnt: &Path) -> Result<Mounted> {
        let out = self.lp(&["mount", "--fsid", meta, mnt.to_str().unwrap()])?;
        if !out.status.success() {
            bail!("lazypull mount: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Mounted(mnt.to_path_buf()))
    }

    fn hwm_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// A `/proc/PID/status` field in KiB (0 if unreadable).
    fn status_kib(&self, field: &str) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) -> Result<()> {
        self.lp(&["shutdown"])?;
        self.child.wait()?;
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    crate::median(&mut v)
}

pub fn run(rounds: u32, work: &Path, daemon_config: &Path, transport: &str) -> Result<()> {
    lazypull_guest::require_root()?;
    let lazypull = crate::sibling("lazypull")?;
    let _ = fs::remove_dir_all(work);
    let tree = work.join("tree");
    fs::create_dir_all(&tree)?;
    crate::copy_tree(&["/usr/lib/python3.11", "/usr/share/perl"], &tree)?;
    crate::write_random(&tree.join("big.bin"), 256 << 20, 42)?;
    let mut small: Vec<PathBuf> = walkdir::WalkDir::new(&tree)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file() && e.file_name() != "big.bin")
        .map(|e| e.path().strip_prefix(&tree).unwrap().to_path_buf())
        .collect();
    small.sort();
    let plain = work.join("plain");
    let img = build_from_layers(
        std::slice::from_ref(&tree),
        &plain,
        &BuildOptions::default(),
    )?;
    let stored = work.join("stored");
    fs::create_dir_all(&stored)?;
    fs::copy(img.meta_path(&plain), stored.join(&img.meta_digest))?;
    for b in &img.blobs {
        lazypull_blob::pack(&plain.join(&b.digest), &stored, &Default::default())?;
    }
    let blob_paths = img.blob_paths(&plain);
    eprintln!(
        "image: {} small files + a 256 MiB file, {} data blob(s), {:.1} MB",
        small.len(),
        img.blobs.len(),
        img.blobs.iter().map(|b| b.size).sum::<u64>() as f64 / 1e6
    );
    let mnt = work.join("mnt");
    // Several transports in one run (`--transport fuse,fanotify`): each
    // round reads the limit and every transport, in an order rotating with
    // the round, and each ratio is against the limit of the same round.
    let transports: Vec<&str> = transport.split(',').map(str::trim).collect();
    // Per round: the limit's [big, small] and again, then per transport
    // [cold big, cold small, warm big, warm small, remount big, remount small].
    let mut limits: Vec<[f64; 4]> = Vec::new();
    let mut arms: Vec<Vec<[f64; 6]>> = vec![Vec::new(); transports.len()];
    let mut hwm = vec![0u64; transports.len()];
    let mut last_rss_parts = vec![(0, 0); transports.len()];
    for round in 0..rounds as usize {
        let n = transports.len() + 1;
        let mut limit = [0.0f64; 4];
        for k in 0..n {
            let arm = (k + round) % n;
            if arm == 0 {
                drop_caches()?;
                let m = mount_limit(&img.meta_path(&plain), &blob_paths, &mnt)?;
                let first = read_tree(&mnt, &small)?;
                drop(m);
                // The limit once more, caches dropped again (the baseline of
                // lazypull's warm and remounted reads, which also start cold
                // in the kernel).
                drop_caches()?;
                let m = mount_limit(&img.meta_path(&plain), &blob_paths, &mnt)?;
                let again = read_tree(&mnt, &small)?;
                drop(m);
                limit = [first.0, first.1, again.0, again.1];
                continue;
            }
            let t = arm - 1;
            let d = Daemon::start(&lazypull, work, &stored, daemon_config, transports[t])?;
            drop_caches()?;
            let m = d.mount(&img.meta_digest, &mnt)?;
            let cold = read_tree(&mnt, &small)?;
            // What the peak is made of, right after the cold reads:
            // anonymous memory (heap, stacks) against mapped files (the
            // binary's own pages).
            let rss_parts = (d.status_kib("RssAnon:"), d.status_kib("RssFile:"));
            drop_caches()?;
            let warm = read_tree(&mnt, &small)?;
            drop(m);
            drop_caches()?;
            let m = d.mount(&img.meta_digest, &mnt)?;
            let remount = read_tree(&mnt, &small)?;
            drop(m);
            hwm[t] = hwm[t].max(d.hwm_kib());
            last_rss_parts[t] = rss_parts;
            d.stop()?;
            arms[t].push([cold.0, cold.1, warm.0, warm.1, remount.0, remount.1]);
        }
        eprintln!(
            "round {round}: limit {limit:?}; {:?}",
            arms.iter().map(|a| a.last()).collect::<Vec<_>>()
        );
        limits.push(limit);
    }
    println!("Result ({rounds} rounds; medians; ratios are per round, then the median):");
    println!();
    let mut head = String::from("| read | limit (s) |");
    let mut rule = String::from("|---|---|");
    for t in &transports {
        head.push_str(&format!(" lazypull {t} (s) | ratio |"));
        rule.push_str("---|---|");
    }
    println!("{head}");
    println!("{rule}");
    for (what, lim, i) in [
        ("256 MiB file, cold", 0, 0),
        ("every small file, cold", 1, 1),
        (
            "256 MiB file, warm (kernel caches dropped; lazypull's cache answers)",
            2,
            2,
        ),
        ("every small file, warm", 3, 3),
        ("256 MiB file after a remount (blobs complete)", 2, 4),
        ("every small file after a remount", 3, 5),
    ] {
        let mut row = format!(
            "| {what} | {:.3} |",
            median(limits.iter().map(|l| l[lim]).collect())
        );
        for arm in &arms {
            let ratio = median(
                arm.iter()
                    .zip(&limits)
                    .map(|(a, l)| a[i] / l[lim])
                    .collect(),
            );
            row.push_str(&format!(
                " {:.3} | **{ratio:.2}×** |",
                median(arm.iter().map(|a| a[i]).collect())
            ));
        }
        println!("{row}");
    }
    println!();
    for (t, name) in transports.iter().enumerate() {
        println!(
            "{name}: daemon peak RSS (VmHWM, max over rounds) {:.1} MB; after the last cold read \
             {:.1} MB anonymous, {:.1} MB of mapped files",
            hwm[t] as f64 / 1024.0,
            last_rss_parts[t].0 as f64 / 1024.0,
            last_rss_parts[t].1 as f64 / 1024.0
        );
    }
    Ok(())
}
