//! `lazypull-bench`: benchmarks whose every figure is a ratio against a baseline
//! measured in the same run (these machines are noisy; absolute times across runs
//! mean little, TCG even less).
//!
//! `cachefiles`: boots the 6.12 test guest once and, for several rounds, reads the
//! same image cold through lazypull over cachefiles and through a plain file-backed
//! EROFS mount of the same meta and data blobs (the limit: no daemon at all).
//!
//! Run: `cargo build --release -p lazypull -p lazypull-bench && target/release/lazypull-bench cachefiles`

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lazypull_erofs::{build_from_layers, BuildOptions};
use lazypull_guest::{Disk, GuestConfig};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Cold reads through cachefiles vs. the file-backed limit, in the guest.
    Cachefiles {
        /// Rounds (each reads the big file and the small files both ways).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// The daemon's --fill-window.
        #[arg(long, default_value = "1MiB")]
        fill_window: String,
        /// Work directory (rebuilt).
        #[arg(long, default_value = "target/bench-cachefiles")]
        work: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Cachefiles {
            rounds,
            fill_window,
            work,
        } => cachefiles(rounds, &fill_window, &work),
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join(name);
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p lazypull",
            bin.display()
        );
    }
    Ok(bin)
}

/// Deterministic incompressible bytes, written in pieces.
fn write_random(path: &Path, len: usize, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut x = seed | 1;
    let mut left = len;
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        let n = left.min(8);
        f.write_all(&b[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

fn cachefiles(rounds: u32, fill_window: &str, work: &Path) -> Result<()> {
    lazypull_guest::require_root()?;
    let daemon = sibling("lazypull")?;
    let kernel = lazypull_guest::kernel()?;
    let _ = fs::remove_dir_all(work);
    let tree = work.join("tree");
    fs::create_dir_all(&tree)?;
    // The field's reference tree: the host's python3.11 and perl library trees plus
    // one 256 MiB incompressible file.
    for src in ["/usr/lib/python3.11", "/usr/share/perl"] {
        let dst = tree.join(src.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().unwrap())?;
        let st = Command::new("cp").arg("-a").arg(src).arg(&dst).status()?;
        if !st.success() {
            bail!("copying {src}");
        }
    }
    write_random(&tree.join("big.bin"), 256 << 20, 42)?;
    let blobs = work.join("blobs");
    let img = build_from_layers(
        std::slice::from_ref(&tree),
        &blobs,
        &BuildOptions::default(),
    )?;
    fs::remove_file(blobs.join("manifest.json"))?;
    let info = work.join("info");
    fs::create_dir_all(&info)?;
    fs::write(info.join("meta"), &img.meta_digest)?;
    let names: Vec<&str> = img.blobs.iter().map(|b| b.digest.as_str()).collect();
    fs::write(info.join("blobs"), names.join("\n"))?;
    let files = walk_count(&tree)?;
    eprintln!(
        "image: {} files, meta {} bytes, {} data blob(s) {} bytes",
        files,
        img.meta_size,
        img.blobs.len(),
        img.blobs.iter().map(|b| b.size).sum::<u64>()
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-cachefiles.sh");
    let cfg = GuestConfig::new(&kernel)
        .name("bench-cachefiles")
        .timeout(Duration::from_secs(3600))
        .disk(Disk::Ext4From {
            dir: blobs.clone(),
            extra_mib: 64,
        })
        .disk(Disk::EmptyExt4 { size_mib: 2048 })
        .env("LP_BIN", daemon.to_str().unwrap())
        .env("LP_BENCH", fs::canonicalize(&info)?.to_str().unwrap())
        .env("ROUNDS", rounds.to_string())
        .env("FILL_WINDOW", fill_window);
    let run = lazypull_guest::run(&script, &cfg)?;
    if run.status != 0 {
        bail!("bench scenario failed:\n{}", run.log);
    }
    let results = run.read_out("results")?;
    report(&results, rounds, fill_window, files)
}

fn walk_count(dir: &Path) -> Result<usize> {
    let out = Command::new("find")
        .arg(dir)
        .args(["-type", "f"])
        .output()?;
    Ok(out.stdout.iter().filter(|&&b| b == b'\n').count())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn report(results: &str, rounds: u32, fill_window: &str, files: usize) -> Result<()> {
    // (kind, what) -> per-round values; ratios are taken per round, then the median.
    let mut ms: BTreeMap<(String, String), BTreeMap<u32, f64>> = BTreeMap::new();
    let mut mount_us: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut rss: Vec<f64> = Vec::new();
    let mut start: Vec<f64> = Vec::new();
    for line in results.lines() {
        let kv: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let round: u32 = kv["round"].parse()?;
        match (kv["kind"], kv["what"]) {
            (_, "rss_kib") => rss.push(kv["value"].parse()?),
            (_, "start") => start.push(
                kv["ms"]
                    .parse()
                    .with_context(|| format!("startup time in {line:?}"))?,
            ),
            (kind, what) => {
                ms.entry((kind.into(), what.into()))
                    .or_default()
                    .insert(round, kv["ms"].parse()?);
                mount_us
                    .entry(kind.into())
                    .or_default()
                    .push(kv["mount_us"].parse()?);
            }
        }
    }
    println!("## cachefiles, cold reads in the 6.12 guest (qemu TCG, 2 vCPU)");
    println!();
    println!(
        "{rounds} rounds, fill window {fill_window}, tree of {files} files (python3.11 + perl libraries + one 256 MiB file). \
         Ratio = lazypull time / limit time in the same round (limit: same meta + data blobs mounted file-backed, no daemon); median over rounds."
    );
    println!();
    println!(
        "| step | limit (median ms) | lazypull (median ms) | ratio (median) | ratios per round |"
    );
    println!("|---|---|---|---|---|");
    for (what, label) in [
        ("big", "read the 256 MiB file, cold"),
        ("small", "read every small file, cold"),
    ] {
        let limit = ms
            .get(&("limit".into(), what.into()))
            .context("no limit results")?;
        let lazy = ms
            .get(&("daemon".into(), what.into()))
            .context("no daemon results")?;
        let mut ratios: Vec<f64> = lazy
            .iter()
            .filter_map(|(r, d)| limit.get(r).map(|l| d / l))
            .collect();
        let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let mut l: Vec<f64> = limit.values().copied().collect();
        let mut d: Vec<f64> = lazy.values().copied().collect();
        println!(
            "| {label} | {:.0} | {:.0} | **{:.2}×** | {} |",
            median(&mut l),
            median(&mut d),
            median(&mut ratios),
            per_round.join(", ")
        );
    }
    let mut lm = mount_us.get("limit").cloned().unwrap_or_default();
    let mut dm = mount_us.get("daemon").cloned().unwrap_or_default();
    println!(
        "| mount (median) | {:.1} ms | {:.1} ms | {:.2}× | |",
        median(&mut lm) / 1000.0,
        median(&mut dm) / 1000.0,
        median(&mut dm) / median(&mut lm)
    );
    println!();
    println!(
        "Daemon peak RSS (VmHWM, max over runs): {:.1} MB; daemon start → cache bound (median): {:.0} ms.",
        rss.iter().cloned().fold(0.0, f64::max) / 1024.0,
        median(&mut start)
    );
    Ok(())
}
