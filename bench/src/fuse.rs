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
    let mut rows: Vec<[f64; 10]> = Vec::new();
    let mut hwm = 0;
    let mut last_rss_parts = (0, 0);
    for round in 0..rounds {
        let mut limit = (0.0, 0.0);
        let mut limit_again = (0.0, 0.0);
        let mut lp = [0.0f64; 6];
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_limit in order {
            if is_limit {
                drop_caches()?;
                let m = mount_limit(&img.meta_path(&plain), &blob_paths, &mnt)?;
                limit = read_tree(&mnt, &small)?;
                drop(m);
                // The limit once more, caches dropped again (the baseline of
                // lazypull's warm and remounted reads, which also start cold
                // in the kernel).
                drop_caches()?;
                let m = mount_limit(&img.meta_path(&plain), &blob_paths, &mnt)?;
                limit_again = read_tree(&mnt, &small)?;
                drop(m);
            } else {
                let d = Daemon::start(&lazypull, work, &stored, daemon_config, transport)?;
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
                hwm = hwm.max(d.hwm_kib());
                last_rss_parts = rss_parts;
                d.stop()?;
                lp[0] = cold.0;
                lp[1] = cold.1;
                lp[2] = warm.0;
                lp[3] = warm.1;
                lp[4] = remount.0;
                lp[5] = remount.1;
            }
        }
        let row = [
            limit.0,
            limit.1,
            lp[0],
            lp[1],
            lp[2],
            lp[3],
            lp[4],
            lp[5],
            limit_again.0,
            limit_again.1,
        ];
        eprintln!("round {round}: {row:?}");
        rows.push(row);
    }
    let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<_>>();
    let ratio = |num: usize, den: usize| median(rows.iter().map(|r| r[num] / r[den]).collect());
    println!("Result ({rounds} rounds; medians; ratios are per round, then the median):");
    println!();
    println!("| read | limit (s) | lazypull {transport} (s) | ratio |");
    println!("|---|---|---|---|");
    let line = |what: &str, lim: usize, lp: usize| {
        println!(
            "| {what} | {:.3} | {:.3} | **{:.2}×** |",
            median(col(lim)),
            median(col(lp)),
            ratio(lp, lim)
        );
    };
    line("256 MiB file, cold", 0, 2);
    line("every small file, cold", 1, 3);
    line(
        "256 MiB file, warm (kernel caches dropped; lazypull's cache answers)",
        8,
        4,
    );
    line("every small file, warm", 9, 5);
    line(
        "256 MiB file after a remount (blobs complete: mounted directly)",
        8,
        6,
    );
    line("every small file after a remount", 9, 7);
    println!();
    println!(
        "Daemon peak RSS (VmHWM, max over rounds): {:.1} MB; after the last cold read: \
         {:.1} MB anonymous, {:.1} MB of mapped files",
        hwm as f64 / 1024.0,
        last_rss_parts.0 as f64 / 1024.0,
        last_rss_parts.1 as f64 / 1024.0
    );
    Ok(())
}
