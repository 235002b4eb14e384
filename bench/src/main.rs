//! `lazypull-bench`: benchmarks whose every figure is a ratio against a baseline
//! measured in the same run (these machines are noisy; absolute times across runs
//! mean little, TCG even less).
//!
//! `cachefiles`: boots the 6.12 test guest once and, for several rounds, walks and
//! reads the same tree cold through lazypull over cachefiles (plain blobs, and the
//! default zstd stored form), with `--nydusd PATH --nydus-image PATH` also through
//! `nydusd singleton --fscache` (RAFS v6, plain and zstd), and through a plain
//! file-backed EROFS mount of the plain meta and data blobs (the limit: no daemon
//! at all); then profiles one mount per daemon arm (fscache statistics, the
//! daemon's own time in OPENs and READs).
//!
//! `registry`: the same image read cold from the registry on the host's loopback
//! (Debian's docker-registry, reached from the guest through qemu's user network)
//! and from the local blob directory, through lazypull in the same boot; backend
//! requests per MB read; time from `lazypull mount` to a file's first byte.
//!
//! `fuse`: on the host, the FUSE transport cold, warm and remounted against the
//! plain file-backed EROFS mount of the same bytes.
//!
//! `containers`: on the host, `lazypull pull` + `ctr run --snapshotter lazypull`
//! against `ctr images pull` + `ctr run` with overlayfs, of the python image from
//! the same loopback registry: pull to the container's first line, bytes moved.
//!
//! `startup`: on the host, time to ready of realistic workloads (mmdebstrap
//! images: python + numpy, gcc, postgresql, bloated) from a registry in its own
//! network namespace behind a shaped veth: containerd's pull against lazypull
//! cold, with a recorded prefetch, and warm (issue 14; `startup.rs`).
//!
//! `mirror`: on the host, a second node's cold read of a lazy image through
//! a pull-through mirror (Debian's docker-registry) of a shaped upstream,
//! against the first node's and a node with no mirror: the upstream traffic
//! the mirror saved, and the time (issue 18; `mirror.rs`).
//!
//! `soak`: on the host, a long run under load and every fault kind, with
//! periodic SIGKILL and a cache limit: wrong bytes and hangs (both must be
//! 0), EIOs and their causes, peak RSS and fds (`soak.rs`, RELIABILITY.md).
//!
//! `build`: `lazypull build` against Debian's `mkfs.erofs` on the same ~500 MB tree
//! (wall time, peak RSS), and the deduplication of two overlapping layers.
//!
//! `digest`: the per-unit digest candidates (SHA-256, BLAKE3) on the same units,
//! against zstd decoding of them; run natively and under `qemu-x86_64 -cpu max`.
//!
//! Run: `cargo build --release -p lazypull -p lazypull-bench && target/release/lazypull-bench cachefiles`
//! (or `... registry`, `... build`, `... fuse`, `... soak`, `... containers`, `... startup`,
//! `... mirror`, `... digest`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod containers;
mod digest;
mod fuse;
mod loop_guest;
mod mirror;
mod shaped;
mod soak;
mod startup;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lazypull_erofs::{build_from_layers, BuildOptions, BuiltImage};
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
        /// Rounds (each walks the tree, reads the small files and the big file in every arm).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// The daemon's --fill-window.
        #[arg(long, default_value = "1MiB")]
        fill_window: String,
        /// Work directory (rebuilt).
        #[arg(long, default_value = "target/bench-cachefiles")]
        work: PathBuf,
        /// nydusd 2.x, to read the same tree through `nydusd singleton --fscache` too
        /// (needs --nydus-image).
        #[arg(long, requires = "nydus_image")]
        nydusd: Option<PathBuf>,
        /// nydus-image, to build the tree as RAFS v6 (plain and zstd) for --nydusd.
        #[arg(long, requires = "nydusd")]
        nydus_image: Option<PathBuf>,
    },
    /// In the Linux 6.1 guest: lazypull's loop transport (cold and warm) vs.
    /// the same plain image on loop devices with no daemon.
    LoopGuest {
        /// Rounds (each reads the small files and the big file in every arm).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Work directory (rebuilt).
        #[arg(long, default_value = "target/bench-loop-guest")]
        work: PathBuf,
    },
    /// Cold reads of an image from the loopback registry vs. the local blob dir, in the guest.
    Registry {
        /// Rounds (each reads the big file and the small files both ways).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Work directory (rebuilt).
        #[arg(long, default_value = "target/bench-registry")]
        work: PathBuf,
    },
    /// On the host: the FUSE transport vs. the plain file-backed mount of the same bytes.
    /// On the host: a long run of many readers over several registry images
    /// behind the fault proxy (every fault kind), a cache limit of half the
    /// images, periodic SIGKILL with takeover, mount/umount cycles: reads,
    /// wrong bytes, EIOs and causes, hangs, peak RSS and fds (RELIABILITY.md).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Reader threads.
        #[arg(long, default_value_t = 64)]
        readers: usize,
        /// Work directory (rebuilt).
        #[arg(long, default_value = "target/bench-soak")]
        work: PathBuf,
    },
    Fuse {
        /// Rounds (each reads cold, warm and remounted through lazypull, and the limit twice).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Work directory (rebuilt).
        #[arg(long, default_value = "target/bench-fuse")]
        work: PathBuf,
        /// The daemon's config file (default: none, the built-in defaults),
        /// e.g. to try other `unit_cache` or `max_merge` values.
        #[arg(long, value_name = "FILE", default_value = "/dev/null")]
        daemon_config: PathBuf,
        /// The daemon's transport: `fuse` (EROFS mounts the FUSE blob
        /// files), `loop` (the same files behind loop devices) or `fanotify`
        /// (EROFS mounts sparse cache files filled on pre-content events);
        /// several, comma-separated, are measured in the same run, each
        /// round against the same round's limit.
        #[arg(long, default_value = "fuse", value_parser = parse_transports)]
        transport: String,
    },
    /// On the host: `lazypull pull` + `ctr run` vs. `ctr images pull` + `ctr run` (overlayfs),
    /// pull to the container's first line, and the bytes each moved from the registry.
    Containers {
        /// Rounds (each runs both arms on fresh state, order alternating).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Work directory (rebuilt; short: containerd's sockets live in it).
        #[arg(long, default_value = "/tmp/lpbench-containers")]
        work: PathBuf,
        /// Print JSON instead of a Markdown table.
        #[arg(long)]
        json: bool,
        /// The daemon's `readahead` (bytes; 0: off); default: the daemon's default.
        #[arg(long)]
        readahead: Option<u64>,
        /// The daemon's `fill_window` (bytes); default: the daemon's default.
        #[arg(long)]
        fill_window: Option<u64>,
        /// `lazypull convert --chunk-size` (the EROFS chunk size) for the lazy image;
        /// default: convert's default.
        #[arg(long)]
        chunk_size: Option<String>,
    },
    /// On the host, over an emulated network: time to ready of realistic workloads
    /// (python, gcc, postgres, bloated), full pull vs. lazypull (issue 14).
    Startup {
        /// Samples per arm, image and network (fresh state each).
        #[arg(long, default_value_t = 5)]
        samples: u32,
        /// Workloads: python, gcc, postgres, bloated (mmdebstrap images), testkit-python.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "python,gcc,postgres,bloated"
        )]
        images: Vec<String>,
        /// Network shapes: 1g (1 Gbit/s, 0.5 ms RTT), 100m (100 Mbit/s, 20 ms RTT).
        #[arg(long, value_delimiter = ',', default_value = "1g,100m")]
        networks: Vec<String>,
        /// Work directory (rebuilt; short: sockets live in it); gets startup.json and startup.svg.
        #[arg(long, default_value = "/tmp/lpbench-startup")]
        work: PathBuf,
        /// Print JSON instead of Markdown tables.
        #[arg(long)]
        json: bool,
        /// Skip reading every file of the image after ready.
        #[arg(long)]
        no_full_read: bool,
        /// The lazypull binary (default: beside this one).
        #[arg(long)]
        lazypull: Option<PathBuf>,
        /// Only build (and cache) the images, then exit: the slow, network-bound
        /// part, done once per machine.
        #[arg(long)]
        prepare: bool,
    },
    /// On the host, over an emulated network: a pull-through mirror in front of the
    /// registry, a second node's cold read against the first node's and no mirror's:
    /// upstream traffic saved, time (issue 18).
    Mirror {
        /// Samples (each with a fresh mirror and fresh nodes).
        #[arg(long, default_value_t = 3)]
        samples: u32,
        /// The upstream's network shape: 1g (1 Gbit/s, 0.5 ms RTT) or 100m (100 Mbit/s, 20 ms RTT).
        #[arg(long, default_value = "100m")]
        network: String,
        /// Work directory (rebuilt; short: sockets live in it); gets mirror.json and mirror.svg.
        #[arg(long, default_value = "/tmp/lpbench-mirror")]
        work: PathBuf,
        /// Print JSON instead of Markdown tables.
        #[arg(long)]
        json: bool,
        /// The lazypull binary (default: beside this one).
        #[arg(long)]
        lazypull: Option<PathBuf>,
    },
    /// Image build throughput and memory vs. mkfs.erofs; dedup of overlapping layers.
    Build {
        /// Rounds per builder.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Work directory (rebuilt).
        #[arg(long, default_value = "target/bench-build")]
        work: PathBuf,
    },
    /// Per-unit digest throughput (SHA-256 vs. BLAKE3) against zstd decoding of the same units.
    Digest {
        /// MiB of data per round.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Unit sizes in bytes.
        #[arg(long, value_delimiter = ',', default_value = "65536,1048576,4194304")]
        units: Vec<u32>,
        /// Rounds (figures are medians over them).
        #[arg(long, default_value_t = 7)]
        rounds: u32,
        /// Synthetic data, when no --input is given.
        #[arg(long, value_enum, default_value_t = digest::Data::Words)]
        data: digest::Data,
        /// Take the units from the first --mib MiB of this file instead.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Print JSON instead of a Markdown table.
        #[arg(long)]
        json: bool,
    },
    /// Internal: run a command and print its wall time and peak RSS as JSON.
    #[command(hide = true)]
    Measure {
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Cachefiles {
            rounds,
            fill_window,
            work,
            nydusd,
            nydus_image,
        } => cachefiles(
            rounds,
            &fill_window,
            &work,
            nydusd.as_deref().zip(nydus_image.as_deref()),
        ),
        Bench::Registry { rounds, work } => registry(rounds, &work),
        Bench::LoopGuest { rounds, work } => loop_guest::run(rounds, &work),
        Bench::Build { rounds, work } => build_bench(rounds, &work),
        Bench::Soak {
            minutes,
            readers,
            work,
        } => soak::run(minutes, readers, &work),
        Bench::Fuse {
            rounds,
            work,
            daemon_config,
            transport,
        } => fuse::run(rounds, &work, &daemon_config, &transport),
        Bench::Containers {
            rounds,
            work,
            json,
            readahead,
            fill_window,
            chunk_size,
        } => containers::run(
            rounds,
            &work,
            json,
            readahead,
            fill_window,
            chunk_size.as_deref(),
        ),
        Bench::Startup {
            samples,
            images,
            networks,
            work,
            json,
            no_full_read,
            lazypull,
            prepare,
        } => startup::run(&startup::Args {
            samples,
            images,
            networks,
            work,
            json,
            full_read: !no_full_read,
            lazypull,
            prepare,
        }),
        Bench::Mirror {
            samples,
            network,
            work,
            json,
            lazypull,
        } => mirror::run(&mirror::Args {
            samples,
            network,
            work,
            json,
            lazypull,
        }),
        Bench::Digest {
            mib,
            units,
            rounds,
            data,
            input,
            json,
        } => digest::run(&digest::Args {
            mib,
            units,
            rounds,
            data,
            input,
            json,
        }),
        Bench::Measure { command } => measure(&command),
    }
}

/// Runs `command` as this process's only child; prints `{"secs":..,"maxrss_kib":..}`.
/// `--transport` of `fuse`: a comma-separated list of fuse, loop, fanotify.
fn parse_transports(s: &str) -> Result<String, String> {
    for t in s.split(',').map(str::trim) {
        if !["fuse", "loop", "fanotify"].contains(&t) {
            return Err(format!("unknown transport {t:?}: fuse, loop or fanotify"));
        }
    }
    Ok(s.to_owned())
}

fn measure(command: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    let status = Command::new(&command[0])
        .args(&command[1..])
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {command:?}"))?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `struct rusage` into the pointer it is given,
    // which points at a properly sized and aligned, zero-initialised value.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    if rc != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    // SAFETY: getrusage succeeded, so the value is initialised (it was zeroed too).
    let usage = unsafe { usage.assume_init() };
    println!(
        "{}",
        serde_json::json!({"secs": secs, "maxrss_kib": usage.ru_maxrss})
    );
    Ok(())
}

fn copy_tree(sources: &[&str], dst: &Path) -> Result<()> {
    for src in sources {
        let to = dst.join(src.trim_start_matches('/'));
        fs::create_dir_all(to.parent().unwrap())?;
        if !Command::new("cp")
            .arg("-a")
            .arg(src)
            .arg(&to)
            .status()?
            .success()
        {
            bail!("copying {src}");
        }
    }
    Ok(())
}

fn du_bytes(dir: &Path) -> Result<u64> {
    let out = Command::new("du").args(["-sb"]).arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .context("du output")?
        .parse()?)
}

fn build_bench(rounds: u32, work: &Path) -> Result<()> {
    let lazypull = sibling("lazypull")?;
    let me = std::env::current_exe()?;
    let mkfs = lazypull_guest::find_tool("mkfs.erofs", "erofs-utils")?;
    let _ = fs::remove_dir_all(work);
    let tree = work.join("tree");
    copy_tree(
        &[
            "/usr/lib/python3.11",
            "/usr/share/perl",
            "/usr/include",
            "/usr/lib/gcc",
            "/usr/share/locale",
        ],
        &tree,
    )?;
    let input = du_bytes(&tree)?;
    let files = walk_count(&tree)?;
    // Warm the page cache so every builder reads the input from memory alike.
    Command::new("sh")
        .arg("-c")
        .arg(format!("tar cf - -C {} . > /dev/null", tree.display()))
        .status()?;
    let out = work.join("out");
    let tree_s = tree.to_str().unwrap().to_owned();
    let out_s = out.to_str().unwrap().to_owned();
    let img = format!("{out_s}/plain.erofs");
    let blob = format!("{out_s}/blob");
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "lazypull build (zstd-3 units, the default)",
            vec![
                lazypull.to_str().unwrap().into(),
                "build".into(),
                tree_s.clone(),
                "-o".into(),
                out_s.clone(),
            ],
        ),
        (
            "lazypull build --compression none",
            vec![
                lazypull.to_str().unwrap().into(),
                "build".into(),
                tree_s.clone(),
                "-o".into(),
                out_s.clone(),
                "--compression".into(),
                "none".into(),
            ],
        ),
        (
            "mkfs.erofs (plain image)",
            vec![
                mkfs.to_str().unwrap().into(),
                "--quiet".into(),
                img,
                tree_s.clone(),
            ],
        ),
        (
            "mkfs.erofs --chunksize=1MiB --blobdev",
            vec![
                mkfs.to_str().unwrap().into(),
                "--quiet".into(),
                "--chunksize=1048576".into(),
                format!("--blobdev={blob}"),
                format!("{out_s}/meta.erofs"),
                tree_s.clone(),
            ],
        ),
    ];
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, (_, cmd)) in cases.iter().enumerate() {
            let _ = fs::remove_dir_all(&out);
            fs::create_dir_all(&out)?;
            let o = Command::new(&me).arg("measure").args(cmd).output()?;
            if !o.status.success() {
                bail!("round {round}: {}", String::from_utf8_lossy(&o.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            results[i].push((
                v["secs"].as_f64().unwrap(),
                v["maxrss_kib"].as_f64().unwrap(),
            ));
        }
    }
    let base = {
        let mut t: Vec<f64> = results[2].iter().map(|r| r.0).collect();
        median(&mut t)
    };
    println!(
        "## Image build, {} of input ({files} files), warm page cache, {rounds} rounds",
        fmt_mb(input)
    );
    println!();
    println!("| builder | median time | input MB/s | ratio to mkfs.erofs (plain) | peak RSS |");
    println!("|---|---|---|---|---|");
    for (i, (name, _)) in cases.iter().enumerate() {
        let mut t: Vec<f64> = results[i].iter().map(|r| r.0).collect();
        let rss = results[i].iter().map(|r| r.1).fold(0.0, f64::max);
        let m = median(&mut t);
        println!(
            "| {name} | {m:.2} s | {:.0} | {:.2}× | {:.1} MB |",
            input as f64 / 1e6 / m,
            m / base,
            rss / 1024.0
        );
    }

    // Stored size: the default (zstd) image against a gzip'd tar of the same tree.
    let _ = fs::remove_dir_all(&out);
    let st = Command::new(&lazypull)
        .arg("build")
        .arg(&tree)
        .arg("-o")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("lazypull build failed");
    }
    let image_bytes = du_bytes(&out)?;
    let t0 = std::time::Instant::now();
    let gz = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar cf - -C {} . | gzip -6 | wc -c",
            tree.display()
        ))
        .output()?;
    let gz_secs = t0.elapsed().as_secs_f64();
    let gz_bytes: u64 = String::from_utf8_lossy(&gz.stdout).trim().parse()?;
    println!();
    println!(
        "Stored size: the zstd image (meta blob + compressed data blobs + chunk tables) is {} for {} of input; `tar | gzip -6` of the same tree is {} ({:.0} s): ratio {:.2}.",
        fmt_mb(image_bytes),
        fmt_mb(input),
        fmt_mb(gz_bytes),
        gz_secs,
        image_bytes as f64 / gz_bytes as f64
    );

    // Deduplication of two overlapping layers: A = python + perl, B = perl + include.
    let layer_a = work.join("layer-a");
    let layer_b = work.join("layer-b");
    copy_tree(&["/usr/lib/python3.11", "/usr/share/perl"], &layer_a)?;
    copy_tree(&["/usr/share/perl", "/usr/include"], &layer_b)?;
    let dedup_out = work.join("dedup");
    let img = lazypull_erofs::build_from_layers(
        &[layer_a.clone(), layer_b.clone()],
        &dedup_out,
        &BuildOptions::default(),
    )?;
    let stored: u64 = img.blobs.iter().map(|b| b.size).sum();
    let (a, b) = (du_bytes(&layer_a)?, du_bytes(&layer_b)?);
    println!();
    println!(
        "Two overlapping layers (A = python3.11 + perl, B = perl + include; {} + {}): {} chunks stored, {} deduplicated; data blobs {} (layer B's blob {} — its perl files are A's chunks).",
        fmt_mb(a),
        fmt_mb(b),
        img.chunks_stored,
        img.chunks_deduplicated,
        fmt_mb(stored),
        fmt_mb(img.blobs.last().map_or(0, |b| b.size)),
    );
    Ok(())
}

fn fmt_mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
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

/// `cachefiles`: the arms, in the order of the report's columns.
const CACHEFILES_ARMS: [(&str, &str); 4] = [
    ("lp-plain", "lazypull plain blobs"),
    ("lp-zstd", "lazypull zstd (default)"),
    ("nydus-none", "nydusd plain"),
    ("nydus-zstd", "nydusd zstd (default)"),
];

/// The field's reference tree (the host's python3.11 and perl library trees
/// plus one 256 MiB incompressible file) under `work/tree`, built into
/// `work/blobs/plain` (lazypull's builder, no compression: what the limit
/// mounts) and `work/blobs/zstd` (`lazypull build`'s default stored form);
/// `work/info` names the meta blobs (`meta`, `meta-zstd`) and the plain data
/// blobs (`blobs`). Returns (tree, blobs, info, the plain image).
fn reference_images(work: &Path, daemon: &Path) -> Result<(PathBuf, PathBuf, PathBuf, BuiltImage)> {
    let _ = fs::remove_dir_all(work);
    let tree = work.join("tree");
    fs::create_dir_all(&tree)?;
    // The field's reference tree: the host's python3.11 and perl library trees plus
    // one 256 MiB incompressible file.
    copy_tree(&["/usr/lib/python3.11", "/usr/share/perl"], &tree)?;
    write_random(&tree.join("big.bin"), 256 << 20, 42)?;
    // One disk holds every arm's blobs, each in its own directory: plain/ (the
    // limit's and lazypull's plain arm: what `lazypull build --compression none`
    // writes), zstd/ (`lazypull build`'s default stored form), nydus-*/.
    let blobs = work.join("blobs");
    let plain = blobs.join("plain");
    let img = build_from_layers(
        std::slice::from_ref(&tree),
        &plain,
        &BuildOptions::default(),
    )?;
    fs::remove_file(plain.join("manifest.json"))?;
    let zstd = blobs.join("zstd");
    let out = Command::new(daemon)
        .arg("build")
        .arg(&tree)
        .arg("-o")
        .arg(&zstd)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!(
            "lazypull build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let built: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let meta_zstd = built["meta"]["digest"]
        .as_str()
        .context("lazypull build --json: meta digest")?
        .to_owned();
    let info = work.join("info");
    fs::create_dir_all(&info)?;
    fs::write(info.join("meta"), &img.meta_digest)?;
    fs::write(info.join("meta-zstd"), &meta_zstd)?;
    let names: Vec<&str> = img.blobs.iter().map(|b| b.digest.as_str()).collect();
    fs::write(info.join("blobs"), names.join("\n"))?;
    Ok((tree, blobs, info, img))
}

fn cachefiles(
    rounds: u32,
    fill_window: &str,
    work: &Path,
    nydus: Option<(&Path, &Path)>,
) -> Result<()> {
    lazypull_guest::require_root()?;
    let daemon = sibling("lazypull")?;
    let kernel = lazypull_guest::kernel()?;
    let (tree, blobs, info, img) = reference_images(work, &daemon)?;
    let zstd = blobs.join("zstd");
    if let Some((_, nydus_image)) = nydus {
        for compressor in ["none", "zstd"] {
            let dir = blobs.join(format!("nydus-{compressor}"));
            fs::create_dir_all(&dir)?;
            // RAFS v6 (EROFS-compatible, what fscache mode serves), 1 MiB chunks.
            let st = Command::new(nydus_image)
                .args(["create", "-t", "dir-rafs", "--fs-version", "6"])
                .args(["--chunk-size", "0x100000", "--compressor", compressor])
                .arg("--bootstrap")
                .arg(dir.join("bootstrap"))
                .arg("--blob-dir")
                .arg(&dir)
                .arg(&tree)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .with_context(|| format!("running {}", nydus_image.display()))?;
            if !st.success() {
                bail!("nydus-image create --compressor {compressor} failed");
            }
        }
    }
    let files = walk_count(&tree)?;
    eprintln!(
        "image: {} files, meta {} bytes, {} data blob(s) {} bytes; zstd stored form {} bytes; blobs disk {}",
        files,
        img.meta_size,
        img.blobs.len(),
        img.blobs.iter().map(|b| b.size).sum::<u64>(),
        du_bytes(&zstd)?,
        fmt_mb(du_bytes(&blobs)?),
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-cachefiles.sh");
    let mut cfg = GuestConfig::new(&kernel)
        .name("bench-cachefiles")
        .timeout(Duration::from_secs(3 * 3600))
        .disk(Disk::Ext4From {
            dir: blobs.clone(),
            extra_mib: 64,
        })
        .disk(Disk::EmptyExt4 { size_mib: 2048 })
        .env("LP_BIN", daemon.to_str().unwrap())
        .env("LP_BENCH", fs::canonicalize(&info)?.to_str().unwrap())
        .env("ROUNDS", rounds.to_string())
        .env("FILL_WINDOW", fill_window);
    if let Some((nydusd, _)) = nydus {
        cfg = cfg.env(
            "NYDUSD",
            fs::canonicalize(nydusd)?
                .to_str()
                .context("nydusd path is not UTF-8")?,
        );
    }
    let run = lazypull_guest::run(&script, &cfg)?;
    if run.status != 0 {
        bail!("bench scenario failed:\n{}", run.log);
    }
    let results = run.read_out("results")?;
    report(&results, rounds, fill_window, files)?;
    profile_report(&run)
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
    // (kind, what) -> round -> value; ratios are taken per round, then the median.
    let mut us: BTreeMap<(String, String), BTreeMap<u32, f64>> = BTreeMap::new();
    let mut mount_us: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut rss: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut start: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut internal: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // (kind, step) -> ms per run, in the daemon's order of steps.
    let mut steps: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut step_order: Vec<String> = Vec::new();
    // (kind, what) -> (backend µs, decode µs) per run.
    let mut stages: BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for line in results.lines() {
        if let Some(list) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("list="))
        {
            for step in list
                .split(',')
                .filter_map(|p| p.split_once(':'))
                .map(|p| p.0)
            {
                if !step_order.iter().any(|s| s == step) {
                    step_order.push(step.to_owned());
                }
            }
        }
        let kv: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let num = |k: &str| -> Result<f64> {
            kv.get(k)
                .with_context(|| format!("{k} missing in {line:?}"))?
                .parse::<f64>()
                .with_context(|| format!("{k} in {line:?}"))
        };
        let round = num("round")? as u32;
        let kind = kv["kind"].to_owned();
        match kv["what"] {
            "rss_kib" => rss.entry(kind).or_default().push(num("value")?),
            "steps" => {
                for (step, ms) in kv["list"].split(',').filter_map(|p| p.split_once(':')) {
                    if let Ok(ms) = ms.parse::<f64>() {
                        steps
                            .entry((kind.clone(), step.to_owned()))
                            .or_default()
                            .push(ms);
                    }
                }
            }
            w if w.starts_with("stages_") => {
                let what = w.trim_start_matches("stages_").to_owned();
                let (f, d) = (num("fetch_us")?, num("decode_us")?);
                if f >= 0.0 && d >= 0.0 {
                    let e = stages.entry((kind, what)).or_default();
                    e.0.push(f);
                    e.1.push(d);
                }
            }
            "start" => {
                start.entry(kind.clone()).or_default().push(num("us")?);
                let i = num("internal_ms")?;
                if i >= 0.0 {
                    internal.entry(kind).or_default().push(i);
                }
            }
            what => {
                us.entry((kind.clone(), what.into()))
                    .or_default()
                    .insert(round, num("us")?);
                mount_us.entry(kind).or_default().push(num("mount_us")?);
            }
        }
    }
    let arms: Vec<(&str, &str)> = CACHEFILES_ARMS
        .iter()
        .copied()
        .filter(|(k, _)| us.contains_key(&(k.to_string(), "big".into())))
        .collect();
    println!("## cachefiles, cold reads in the 6.12 guest (qemu TCG, 2 vCPU)");
    println!();
    println!(
        "{rounds} rounds, fill window {fill_window}, tree of {files} files (python3.11 + perl libraries + one 256 MiB file). \
         Each cell: median over rounds of (arm's time / limit's time in the same round), then the arm's median time. \
         Limit: the plain meta + data blobs mounted file-backed, no daemon."
    );
    println!();
    let mut head = String::from("| step | limit (median) |");
    let mut rule = String::from("|---|---|");
    for (_, label) in &arms {
        head.push_str(&format!(" {label} |"));
        rule.push_str("---|");
    }
    println!("{head}");
    println!("{rule}");
    for (what, label) in [
        ("walk", "metadata walk (`find -printf %s`)"),
        ("small", "every small file, cold"),
        ("big", "256 MiB file, cold"),
    ] {
        let limit = us
            .get(&("limit".into(), what.into()))
            .context("no limit results")?;
        let mut l: Vec<f64> = limit.values().copied().collect();
        let mut row = format!("| {label} | {} |", fmt_us(median(&mut l)));
        for (kind, _) in &arms {
            let Some(arm) = us.get(&(kind.to_string(), what.into())) else {
                row.push_str(" – |");
                continue;
            };
            let mut ratios: Vec<f64> = arm
                .iter()
                .filter_map(|(r, d)| limit.get(r).map(|l| d / l))
                .collect();
            let mut d: Vec<f64> = arm.values().copied().collect();
            row.push_str(&format!(
                " **{:.2}×** ({}) |",
                median(&mut ratios),
                fmt_us(median(&mut d))
            ));
        }
        println!("{row}");
    }
    let cell = |m: &BTreeMap<String, Vec<f64>>, kind: &str, f: &dyn Fn(f64) -> String| {
        m.get(kind)
            .filter(|v| !v.is_empty())
            .map(|v| f(median(&mut v.clone())))
            .unwrap_or_else(|| "–".into())
    };
    let ms = |v: f64| format!("{:.1} ms", v / 1000.0);
    let mut row = format!("| mount(2) (median) | {} |", cell(&mount_us, "limit", &ms));
    for (kind, _) in &arms {
        row.push_str(&format!(" {} |", cell(&mount_us, kind, &ms)));
    }
    println!("{row}");
    let mut row = String::from("| daemon launch → cache bound, seen by the script (median) | |");
    for (kind, _) in &arms {
        row.push_str(&format!(" {} |", cell(&start, kind, &ms)));
    }
    println!("{row}");
    let mut row = String::from("| daemon `main` → cache bound, the daemon's own (median) | |");
    for (kind, _) in &arms {
        row.push_str(&format!(
            " {} |",
            cell(&internal, kind, &|v| format!("{v:.1} ms"))
        ));
    }
    println!("{row}");
    let mut row = String::from("| daemon peak RSS (VmHWM, max over runs) | |");
    for (kind, _) in &arms {
        let max = rss
            .get(*kind)
            .map(|v| v.iter().cloned().fold(0.0, f64::max) / 1024.0);
        row.push_str(&match max {
            Some(m) => format!(" {m:.1} MB |"),
            None => " – |".into(),
        });
    }
    println!("{row}");
    let lp_arms: Vec<_> = arms.iter().filter(|(k, _)| k.starts_with("lp-")).collect();
    if !steps.is_empty() {
        println!();
        println!("Where the daemon's start goes (its own steps from `main` to ready, median ms):");
        println!();
        let mut head = String::from("| step |");
        let mut rule = String::from("|---|");
        for (_, label) in &lp_arms {
            head.push_str(&format!(" {label} |"));
            rule.push_str("---|");
        }
        println!("{head}");
        println!("{rule}");
        for step in &step_order {
            let mut row = format!("| {step} |");
            for (kind, _) in &lp_arms {
                row.push_str(&match steps.get(&(kind.to_string(), step.clone())) {
                    Some(v) => format!(" {:.1} |", median(&mut v.clone())),
                    None => " – |".into(),
                });
            }
            println!("{row}");
        }
    }
    if !stages.is_empty() {
        println!();
        println!(
            "Where a cold read's time goes in the daemon (median per run; summed over the \
             threads doing it, so it can exceed the read's wall time):"
        );
        println!();
        println!("| arm | read | wall (median) | backend reads | decompress + verify |");
        println!("|---|---|---|---|---|");
        for (kind, label) in &lp_arms {
            for what in ["small", "big"] {
                let Some((f, d)) = stages.get(&(kind.to_string(), what.to_owned())) else {
                    continue;
                };
                let wall = us
                    .get(&(kind.to_string(), what.to_owned()))
                    .map(|m| median(&mut m.values().copied().collect::<Vec<_>>()))
                    .unwrap_or(f64::NAN);
                println!(
                    "| {label} | {what} | {} | {} | {} |",
                    fmt_us(wall),
                    fmt_us(median(&mut f.clone())),
                    fmt_us(median(&mut d.clone()))
                );
            }
        }
    }
    Ok(())
}

fn fmt_us(us: f64) -> String {
    if us < 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.0} ms", us / 1000.0)
    }
}

/// The profiling mounts: per daemon arm, mount(2)'s time on a fresh cache and
/// on the second mount, what fscache counted, and the daemon's own time in
/// its OPENs and READs (from its log) during each.
fn profile_report(run: &lazypull_guest::GuestRun) -> Result<()> {
    println!();
    println!("### Where a mount's time goes (one profiling mount per arm, daemon log at debug)");
    println!();
    if let Ok(probe) = run.read_out("mkdir-probe") {
        println!("Kernel-only reference: {} (256 mkdirs on the cache's ext4, as cachefiles does for a new volume's fan-out directories).", probe.trim());
        println!();
    }
    for (kind, label) in CACHEFILES_ARMS {
        let dir = format!("profile-{kind}");
        let Ok(log) = run.read_out(format!("{dir}/daemon.log")) else {
            continue;
        };
        println!("**{label}**:");
        println!();
        for n in 1..=2 {
            let stamps = run.read_out(format!("{dir}/stamps-{n}"))?;
            let kv: BTreeMap<&str, &str> = stamps
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            let before = run.read_out(format!("{dir}/stats-before-{n}"))?;
            let after = run.read_out(format!("{dir}/stats-after-{n}"))?;
            let delta = fscache_delta(&before, &after);
            let (opens, open_us, reads, fill_us) = if kind.starts_with("lp-") {
                daemon_share(&log, n)
            } else {
                (0, 0, 0, 0)
            };
            println!(
                "- mount {n} ({}): mount(2) {} µs; daemon: {opens} OPEN(s) {open_us} µs from receipt to copen, {reads} READ(s) {fill_us} µs filling; fscache: {}",
                if n == 1 { "fresh cache" } else { "again, same daemon and cache" },
                kv.get("mount_us").unwrap_or(&"?"),
                delta
            );
        }
        println!();
    }
    Ok(())
}

/// The non-zero changes of /proc/fs/fscache/stats between two reads of it.
fn fscache_delta(before: &str, after: &str) -> String {
    let parse = |s: &str| -> BTreeMap<String, i64> {
        let mut m = BTreeMap::new();
        for line in s.lines() {
            let Some((group, rest)) = line.split_once(':') else {
                continue;
            };
            for kv in rest.split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    if let Ok(v) = v.parse::<i64>() {
                        m.insert(format!("{}.{k}", group.trim()), v);
                    }
                }
            }
        }
        m
    };
    let (b, a) = (parse(before), parse(after));
    let changed: Vec<String> = a
        .iter()
        .filter_map(|(k, v)| {
            let d = v - b.get(k).copied().unwrap_or(0);
            (d != 0).then(|| format!("{k}+{d}"))
        })
        .collect();
    changed.join(" ")
}

/// The daemon's OPENs and READs in mount `n` of a profile log (the n-th
/// group of requests, each mount starting with the meta blob's OPEN or, on a
/// second mount, its first READ after the previous mount's CLOSEs):
/// (OPENs, their µs from receipt to copen, READs, their µs of filling).
fn daemon_share(log: &str, n: usize) -> (u64, u64, u64, u64) {
    // Mounts are separated by the CLOSEs of the previous one's objects.
    let mut mount = 1;
    let mut closing = false;
    let (mut opens, mut open_us, mut reads, mut fill_us) = (0, 0, 0, 0);
    let field = |line: &str, k: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
    };
    for line in log.lines() {
        if line.contains("CLOSE: object released") {
            closing = true;
            continue;
        }
        if closing {
            mount += 1;
            closing = false;
        }
        if mount != n {
            continue;
        }
        if line.contains("OPEN: serving blob") {
            opens += 1;
            open_us += field(line, "open_us").unwrap_or(0);
        } else if line.contains("READ completed") {
            reads += 1;
            fill_us += field(line, "fill_us").unwrap_or(0);
        }
    }
    (opens, open_us, reads, fill_us)
}

/// The reference tree of `cachefiles`, built with `lazypull build` (zstd), pushed
/// to a registry on 127.0.0.1 and also given to the guest as a local blob dir.
fn registry(rounds: u32, work: &Path) -> Result<()> {
    lazypull_guest::require_root()?;
    let lazypull = sibling("lazypull")?;
    let kernel = lazypull_guest::kernel()?;
    let _ = fs::remove_dir_all(work);
    let tree = work.join("tree");
    fs::create_dir_all(&tree)?;
    copy_tree(&["/usr/lib/python3.11", "/usr/share/perl"], &tree)?;
    write_random(&tree.join("big.bin"), 256 << 20, 42)?;
    let out = work.join("image");
    let st = Command::new(&lazypull)
        .arg("build")
        .arg(&tree)
        .arg("-o")
        .arg(&out)
        .arg("--json")
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("lazypull build failed");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json"))?)?;
    let meta = manifest["meta"]
        .as_str()
        .context("manifest meta")?
        .to_owned();
    let server = lazypull_testkit::registry::RegistryServer::start(&work.join("registry"), None)?;
    let st = Command::new(&lazypull)
        .arg("push")
        .arg(&out)
        .arg(format!("{}/bench/tree:v1", server.addr()))
        .arg("--json")
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("lazypull push failed");
    }
    let info = work.join("info");
    fs::create_dir_all(&info)?;
    fs::write(info.join("meta"), &meta)?;
    fs::write(info.join("ref"), "bench/tree:v1")?;
    fs::write(info.join("first"), "usr/share/perl/5.36.0/strict.pm")?;
    let files = walk_count(&tree)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-registry.sh");
    let cfg = GuestConfig::new(&kernel)
        .name("bench-registry")
        .network()
        .timeout(Duration::from_secs(3600))
        .disk(Disk::Ext4From {
            dir: out.clone(),
            extra_mib: 64,
        })
        .disk(Disk::EmptyExt4 { size_mib: 2048 })
        .env("LP_BIN", lazypull.to_str().unwrap())
        .env("LP_BENCH", fs::canonicalize(&info)?.to_str().unwrap())
        .env("ROUNDS", rounds.to_string())
        .env("REG", format!("10.0.2.2:{}", server.addr().port()));
    let run = lazypull_guest::run(&script, &cfg)?;
    if run.status != 0 {
        bail!("bench scenario failed:\n{}", run.log);
    }
    report_registry(&run.read_out("results")?, rounds, files)
}

fn report_registry(results: &str, rounds: u32, files: usize) -> Result<()> {
    // (kind, what) -> round -> (ms, first_ms, requests, bytes)
    let mut rows: BTreeMap<(String, String), BTreeMap<u32, [f64; 4]>> = BTreeMap::new();
    for line in results.lines() {
        let kv: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let num = |k: &str| -> Result<f64> {
            kv.get(k)
                .with_context(|| format!("{k} missing in {line:?}"))?
                .parse::<f64>()
                .with_context(|| format!("{k} in {line:?}"))
        };
        rows.entry((kv["kind"].into(), kv["what"].into()))
            .or_default()
            .insert(
                num("round")? as u32,
                [
                    num("ms")?,
                    num("first_ms")?,
                    num("requests")?,
                    num("bytes")?,
                ],
            );
    }
    println!("## registry vs local blob dir, cold reads in the 6.12 guest (qemu TCG, 2 vCPU)");
    println!();
    println!(
        "{rounds} rounds, tree of {files} files (python3.11 + perl libraries + one 256 MiB incompressible file), \
         zstd stored form. Ratio = registry time / local-dir time in the same round; median over rounds. \
         The registry is Debian's docker-registry on the host's 127.0.0.1, reached through qemu's user network."
    );
    println!();
    println!("| step | local dir (median ms) | registry (median ms) | ratio (median) | ratios per round | registry requests per MB read |");
    println!("|---|---|---|---|---|---|");
    let mut first_local = Vec::new();
    let mut first_reg = Vec::new();
    for (what, label) in [
        ("big", "read the 256 MiB file, cold"),
        ("small", "read every small file, cold"),
    ] {
        let local = rows
            .get(&("local".into(), what.into()))
            .context("no local results")?;
        let reg = rows
            .get(&("registry".into(), what.into()))
            .context("no registry results")?;
        let mut ratios: Vec<f64> = reg
            .iter()
            .filter_map(|(r, d)| local.get(r).map(|l| d[0] / l[0]))
            .collect();
        let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let mut l: Vec<f64> = local.values().map(|v| v[0]).collect();
        let mut d: Vec<f64> = reg.values().map(|v| v[0]).collect();
        let mut per_mb: Vec<f64> = reg
            .values()
            .map(|v| v[2] / (v[3] / (1u64 << 20) as f64).max(1e-9))
            .collect();
        first_local.extend(local.values().map(|v| v[1]));
        first_reg.extend(reg.values().map(|v| v[1]));
        println!(
            "| {label} | {:.0} | {:.0} | **{:.2}×** | {} | {:.2} |",
            median(&mut l),
            median(&mut d),
            median(&mut ratios),
            per_round.join(", "),
            median(&mut per_mb)
        );
    }
    println!();
    println!(
        "Time from mount to the first byte of a small file (median): `lazypull mount` from the registry {:.0} ms \
         (CLI start, manifest + config + meta blob + chunk tables, mount(2), one READ) vs. plain `mount -t erofs` of the local dir {:.0} ms.",
        median(&mut first_reg),
        median(&mut first_local)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::report;

    /// The guest script's result lines, the daemon's steps and stage times
    /// among them, are all understood; a stage line missing its figures is an
    /// error, not a silent gap.
    #[test]
    fn the_cachefiles_report_reads_every_kind_of_result_line() {
        let mut lines = String::new();
        for round in 1..=2 {
            for what in ["walk", "small", "big"] {
                lines += &format!("round={round} kind=limit what={what} us=1000 mount_us=4000\n");
                lines += &format!("round={round} kind=lp-zstd what={what} us=2000 mount_us=9000\n");
                lines += &format!(
                    "round={round} kind=lp-zstd what=stages_{what} fetch_us=300 decode_us=900\n"
                );
            }
            lines += &format!("round={round} kind=lp-zstd what=start us=50000 internal_ms=20.5\n");
            lines += &format!(
                "round={round} kind=lp-zstd what=steps list=main:0.8,fd_store_spawn:0.3,transport:5.0\n"
            );
            lines += &format!("round={round} kind=lp-zstd what=rss_kib value=20000\n");
        }
        report(&lines, 2, "1MiB", 10).unwrap();
        let bad = format!("{lines}round=3 kind=lp-zstd what=stages_big fetch_us=1\n");
        assert!(report(&bad, 2, "1MiB", 10).is_err());
    }
}
