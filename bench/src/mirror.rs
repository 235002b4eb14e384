//! `lazypull-bench mirror`: how much upstream traffic a pull-through mirror
//! saves a second node's cold read of a lazy image, and what it does to
//! the time (issue 18).
//!
//! Upstream: Debian's `docker-registry` in a network namespace behind a
//! shaped veth and testkit's delaying, logging proxy (`shaped.rs`, as
//! `startup` has it; default 100 Mbit/s and 20 ms RTT). Mirror: a second
//! `docker-registry` on the host's loopback as a pull-through cache
//! (`proxy: remoteurl:`) of the upstream as clients name it (the proxy:
//! the mirror's own fetches cross the shaped link too), with a logging
//! proxy of its own in front (no delay) counting what it answered.
//!
//! Image: testkit's python image (the host's python3.11, some 30 MB, no
//! download), pushed ordinary and converted with `lazypull convert`, both
//! unshaped, before the clock.
//!
//! Per sample, a fresh mirror (empty storage) and three "nodes", each a
//! `lazypull daemon` (FUSE) of its own with a fresh cache, its kernel
//! caches dropped before `lazypull mount` of the lazy image by reference,
//! then a cold read of every file of the mount (one thread, in path
//! order):
//! - `no-mirror`: the daemon reads none of containerd's `hosts.toml`
//!   (`--hosts-dir ""`): straight to the shaped upstream;
//! - `node1`: its `hosts.toml` declares the mirror for the upstream host:
//!   the first node behind the cold mirror;
//! - `node2`: the same, right after `node1`: the mirror holds what `node1`
//!   made it fetch.
//!
//! `no-mirror` runs first on even samples and last on odd ones; `node2`
//! always follows `node1`. A node's traffic is counted from its mount until
//! both proxies have been idle for 2 s after its daemon stopped: a
//! pull-through cache goes on filling itself after its client has gone, and
//! that is the node's doing. Every node must read the same bytes (a digest
//! over paths and contents), else the run fails.
//!
//! Figures (medians over samples): mount and read seconds; requests and
//! body bytes the upstream answered, split into whole-body (200) and Range
//! (206) answers; requests and bytes the mirror answered, and how many
//! Range requests it answered with the whole blob (200); the daemon's
//! mirror fallbacks (`lazypull status`). Derived: node 2's upstream bytes
//! against node 1's (the saving) and against no mirror; node 2's times
//! against node 1's and no mirror's.
//!
//! Output: a Markdown table (or `--json`) on standard output, `mirror.json`
//! and `mirror.svg` (upstream bytes and time per arm) in the work
//! directory; progress on standard error.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazypull_testkit::containerd;
use lazypull_testkit::proxy::{FaultSource, LogEntry, Proxy};
use lazypull_testkit::python_image::python_image;
use lazypull_testkit::registry::{RegistryOptions, RegistryServer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::containers::{drop_caches, median, start_daemon};
use crate::shaped::{self, push_and_convert, Net, Shape};
use crate::startup::chart;

/// What `lazypull-bench mirror` was asked to do.
#[derive(Debug, Clone)]
pub struct Args {
    /// Samples (each with a fresh mirror and fresh nodes).
    pub samples: u32,
    /// The upstream's network shape: `1g` or `100m`.
    pub network: String,
    /// Work directory (rebuilt); gets mirror.json and mirror.svg.
    pub work: PathBuf,
    /// Print the JSON report instead of Markdown.
    pub json: bool,
    /// The `lazypull` binary (default: beside this one).
    pub lazypull: Option<PathBuf>,
}

/// The arms, in report order.
const ARMS: [&str; 3] = ["no-mirror", "node1", "node2"];

fn arm_title(arm: &str) -> &'static str {
    match arm {
        "no-mirror" => "no mirror (straight to the upstream)",
        "node1" => "node 1, cold mirror",
        "node2" => "node 2, after node 1",
        _ => "?",
    }
}

/// What one node measured.
#[derive(Debug, Clone, Default)]
struct NodeSample {
    mount_secs: f64,
    read_secs: f64,
    files: u64,
    bytes_read: u64,
    /// sha256 over every file's path, length and bytes, in path order.
    content: String,
    upstream: Traffic,
    mirror: Traffic,
    /// Range requests the mirror answered with a whole body (200).
    mirror_whole_for_range: u64,
    /// The daemon's `backend_http.mirror_fallbacks`.
    mirror_fallbacks: u64,
}

/// Requests and body bytes a proxy logged, by kind of answer.
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    requests: u64,
    bytes: u64,
    /// Of those, 200 answers to GETs of blobs (whole blobs).
    whole_blob_requests: u64,
    whole_blob_bytes: u64,
    /// Of those, 206 answers (Range reads).
    range_requests: u64,
    range_bytes: u64,
}

impl Traffic {
    fn of(entries: &[LogEntry]) -> Traffic {
        let mut t = Traffic::default();
        for e in entries {
            t.requests += 1;
            t.bytes += e.bytes;
            if e.status == 206 {
                t.range_requests += 1;
                t.range_bytes += e.bytes;
            } else if e.status == 200 && e.method == "GET" && e.path.contains("/blobs/") {
                t.whole_blob_requests += 1;
                t.whole_blob_bytes += e.bytes;
            }
        }
        t
    }

    fn to_json(self) -> Value {
        json!({
            "requests": self.requests,
            "bytes": self.bytes,
            "whole_blob_requests": self.whole_blob_requests,
            "whole_blob_bytes": self.whole_blob_bytes,
            "range_requests": self.range_requests,
            "range_bytes": self.range_bytes,
        })
    }
}

impl NodeSample {
    fn to_json(&self) -> Value {
        json!({
            "mount_secs": self.mount_secs,
            "read_secs": self.read_secs,
            "files": self.files,
            "bytes_read": self.bytes_read,
            "content_sha256": self.content,
            "upstream": self.upstream.to_json(),
            "mirror": self.mirror.to_json(),
            "mirror_whole_for_range": self.mirror_whole_for_range,
            "mirror_fallbacks": self.mirror_fallbacks,
        })
    }

    fn total_secs(&self) -> f64 {
        self.mount_secs + self.read_secs
    }
}

/// The mirror of one sample: the pull-through registry and the logging
/// proxy in front of it.
struct Mirror {
    registry: RegistryServer,
    proxy: Proxy,
    log: PathBuf,
}

impl Mirror {
    fn start(dir: &Path, upstream: &str) -> Result<Mirror> {
        let remote = format!("http://{upstream}");
        let registry = RegistryServer::start_with(
            &dir.join("mirror"),
            &RegistryOptions {
                proxy_remote: Some(&remote),
                ..RegistryOptions::default()
            },
        )
        .context("starting the pull-through mirror")?;
        let log = dir.join("mirror-proxy.log");
        let proxy = Proxy::start(
            registry.addr(),
            log.clone(),
            FaultSource::Fixed(String::new()),
        )
        .context("starting the mirror's proxy")?;
        Ok(Mirror {
            registry,
            proxy,
            log,
        })
    }

    /// `host:port` the nodes name the mirror by (its proxy).
    fn host(&self) -> String {
        self.proxy.addr().to_string()
    }
}

/// containerd's `certs.d` layout under `dir`: `UPSTREAM/hosts.toml`
/// declaring `mirror` (pull and resolve) before the upstream (plain HTTP).
fn write_hosts_dir(dir: &Path, upstream: &str, mirror: &str) -> Result<()> {
    let host_dir = dir.join(upstream);
    fs::create_dir_all(&host_dir).with_context(|| format!("creating {}", host_dir.display()))?;
    let toml = lazypull_testkit::containerd::mirror_hosts_toml(upstream, mirror);
    fs::write(host_dir.join("hosts.toml"), toml).context("writing hosts.toml")
}

/// Reads every regular file under `root` once, in path order: (files,
/// bytes, sha256 over each file's path, length and bytes).
fn read_all(root: &Path) -> Result<(u64, u64, String)> {
    let mut hasher = Sha256::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.with_context(|| format!("walking {}", root.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(path);
        let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut n = 0u64;
        let mut file_hash = Sha256::new();
        loop {
            let got = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            file_hash.update(&buf[..got]);
            n += got as u64;
        }
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        hasher.update(n.to_le_bytes());
        hasher.update(file_hash.finalize());
        files += 1;
        bytes += n;
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((files, bytes, digest))
}

/// `lazypull status --json` of the daemon at `socket`.
fn daemon_status(lazypull: &Path, socket: &Path) -> Result<Value> {
    let out = Command::new(lazypull)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .context("running lazypull status")?;
    if !out.status.success() {
        bail!(
            "lazypull status: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("lazypull status --json's output")
}

/// Entries of the log at `log` after `from`, once `proxy` has settled.
fn settled_tail(proxy: &Proxy, log: &Path, from: usize) -> Result<Vec<LogEntry>> {
    // Long: on 100 Mbit/s a pull-through cache filling a 30 MB image in
    // the background takes seconds, and a slower link or larger image more.
    let all = shaped::settle(proxy, log, Duration::from_secs(2), Duration::from_secs(900))?;
    Ok(all[from.min(all.len())..].to_vec())
}

/// One node: a fresh daemon in `dir` (`--hosts-dir` that directory, or none
/// at all with `None`; else the defaults), caches dropped, `lazypull mount` of
/// `reference`, every file read; traffic counted until the proxies settle
/// after the daemon stopped.
fn node(
    dir: &Path,
    lazypull: &Path,
    net: &Net,
    mirror: &Mirror,
    hosts_dir: Option<&Path>,
    reference: &str,
) -> Result<NodeSample> {
    let upstream = net.host();
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // `--hosts-dir ""`: none, not the node's /etc/containerd/certs.d.
    let hosts = hosts_dir.map(|p| p.to_string_lossy().into_owned());
    let daemon = start_daemon(
        dir,
        lazypull,
        None,
        &[
            "--insecure-registry",
            &upstream,
            "--hosts-dir",
            hosts.as_deref().unwrap_or(""),
        ],
    )?;
    let socket = dir.join("d/run/ctl.sock");
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt)?;
    // Both logs complete before the clock: nothing of an earlier node's
    // is counted as this one's.
    let up_from = settled_tail(&net.proxy, &net.log, 0)?.len();
    let mirror_from = settled_tail(&mirror.proxy, &mirror.log, 0)?.len();
    drop_caches()?;
    let t0 = Instant::now();
    let out = Command::new(lazypull)
        .args(["mount", reference])
        .arg(&mnt)
        .arg("--socket")
        .arg(&socket)
        .args(["--insecure", "--json"])
        .output()
        .context("running lazypull mount")?;
    let mount_secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "lazypull mount {reference}: {}: {}; see {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            dir.join("daemon.log").display()
        );
    }
    let t1 = Instant::now();
    let (files, bytes_read, content) = read_all(&mnt)?;
    let read_secs = t1.elapsed().as_secs_f64();
    let status = daemon_status(lazypull, &socket)?;
    let mirror_fallbacks = status["backend_http"]["mirror_fallbacks"]
        .as_u64()
        .context("lazypull status: backend_http.mirror_fallbacks")?;
    let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
    drop(daemon);
    containerd::unmount_under(dir);
    let up = settled_tail(&net.proxy, &net.log, up_from)?;
    let mir = settled_tail(&mirror.proxy, &mirror.log, mirror_from)?;
    // The daemon's cache is of no further use; its log stays.
    let _ = fs::remove_dir_all(dir.join("d/cache"));
    Ok(NodeSample {
        mount_secs,
        read_secs,
        files,
        bytes_read,
        content,
        upstream: Traffic::of(&up),
        mirror: Traffic::of(&mir),
        mirror_whole_for_range: mir
            .iter()
            .filter(|e| e.range.is_some() && e.status == 200)
            .count() as u64,
        mirror_fallbacks,
    })
}

/// Runs the benchmark; prints the report; writes `mirror.json` and
/// `mirror.svg` into the work directory.
pub fn run(args: &Args) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("run as root: namespaces, FUSE mounts and drop_caches need it");
    }
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let shape: Shape = shaped::shape(&args.network)?;
    let lazypull = match &args.lazypull {
        Some(p) => p.clone(),
        None => crate::sibling("lazypull")?,
    };
    let work = &args.work;
    if work.exists() {
        containerd::unmount_under(work);
        fs::remove_dir_all(work).with_context(|| format!("clearing {}", work.display()))?;
    }
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let net = Net::start(work)?;
    eprintln!(
        "network namespace {} (upstream registry {}), its proxy {}",
        net.ns.name(),
        net.registry.addr(),
        net.host()
    );
    let name = "testkit-python";
    eprintln!("[{name}] building the image");
    let image = python_image().context("building testkit's python image")?;
    net.set_shape(None)?;
    let converted = push_and_convert(&net, &lazypull, &image, name)?;
    net.set_shape(Some(shape))?;

    let mut samples: Vec<Vec<(&'static str, NodeSample)>> = Vec::new();
    for s in 0..args.samples {
        let dir = work.join(format!("s{s}"));
        let mirror = Mirror::start(&dir, &net.host())?;
        let hosts_dir = dir.join("certs.d");
        write_hosts_dir(&hosts_dir, &net.host(), &mirror.host())?;
        eprintln!(
            "[#{s}] mirror {} (its proxy {})",
            mirror.registry.addr(),
            mirror.host()
        );
        let order: &[&'static str] = if s % 2 == 0 {
            &["no-mirror", "node1", "node2"]
        } else {
            &["node1", "node2", "no-mirror"]
        };
        let mut got = Vec::new();
        for &arm in order {
            let hosts = (arm != "no-mirror").then_some(hosts_dir.as_path());
            let n = node(
                &dir.join(arm),
                &lazypull,
                &net,
                &mirror,
                hosts,
                &converted.lazy,
            )
            .with_context(|| format!("sample {s}, {arm}"))?;
            eprintln!(
                "[#{s}] {arm}: mount {:.2} s, read {:.2} s ({} files, {:.1} MB); upstream {:.1} MB \
                 in {} requests ({} whole blobs, {} ranges); mirror {:.1} MB in {} requests \
                 ({} whole answers to a Range); {} mirror fallbacks",
                n.mount_secs,
                n.read_secs,
                n.files,
                n.bytes_read as f64 / 1e6,
                n.upstream.bytes as f64 / 1e6,
                n.upstream.requests,
                n.upstream.whole_blob_requests,
                n.upstream.range_requests,
                n.mirror.bytes as f64 / 1e6,
                n.mirror.requests,
                n.mirror_whole_for_range,
                n.mirror_fallbacks
            );
            got.push((arm, n));
        }
        drop(mirror);
        containerd::unmount_under(&dir);
        samples.push(got);
    }
    net.set_shape(None)?;
    drop(net);

    // Every node read the same tree: else a figure compares different work.
    let first = &samples[0][0].1;
    for (s, got) in samples.iter().enumerate() {
        for (arm, n) in got {
            if n.content != first.content || n.bytes_read != first.bytes_read {
                bail!(
                    "sample {s}, {arm} read {} files, {} bytes, content {}; sample 0, {} read \
                     {} files, {} bytes, content {}",
                    n.files,
                    n.bytes_read,
                    n.content,
                    samples[0][0].0,
                    first.files,
                    first.bytes_read,
                    first.content
                );
            }
        }
    }
    if first.bytes_read == 0 {
        bail!("the mounted image has no bytes to read");
    }

    let report = Report::new(args, shape, &converted, &samples);
    let json = report.to_json();
    fs::write(work.join("mirror.json"), serde_json::to_vec_pretty(&json)?)
        .context("writing mirror.json")?;
    let svg = work.join("mirror.svg");
    report.chart(&svg)?;
    eprintln!(
        "wrote {} and {}",
        work.join("mirror.json").display(),
        svg.display()
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        report.print_markdown();
    }
    Ok(())
}

/// The samples by arm, and what is derived from them.
struct Report<'a> {
    args: &'a Args,
    shape: Shape,
    lazy_bytes: u64,
    ordinary_bytes: u64,
    files: u64,
    bytes_read: u64,
    /// Per arm of [`ARMS`], its samples.
    arms: Vec<(&'static str, Vec<&'a NodeSample>)>,
}

impl<'a> Report<'a> {
    fn new(
        args: &'a Args,
        shape: Shape,
        converted: &shaped::Converted,
        samples: &'a [Vec<(&'static str, NodeSample)>],
    ) -> Report<'a> {
        let arms = ARMS
            .iter()
            .map(|&arm| {
                let v = samples
                    .iter()
                    .flat_map(|got| got.iter().filter(|(a, _)| *a == arm).map(|(_, n)| n))
                    .collect();
                (arm, v)
            })
            .collect();
        let first = &samples[0][0].1;
        Report {
            args,
            shape,
            lazy_bytes: converted.lazy_bytes,
            ordinary_bytes: converted.ordinary_bytes,
            files: first.files,
            bytes_read: first.bytes_read,
            arms,
        }
    }

    fn samples(&self, arm: &str) -> &[&'a NodeSample] {
        self.arms
            .iter()
            .find(|(a, _)| *a == arm)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }

    fn med(&self, arm: &str, g: impl Fn(&NodeSample) -> f64) -> f64 {
        median(self.samples(arm).iter().map(|n| g(n)).collect())
    }

    /// Median over samples of `g(node2) / g(other)` in the same sample.
    fn ratio(&self, arm: &str, other: &str, g: impl Fn(&NodeSample) -> f64) -> f64 {
        let a = self.samples(arm);
        let b = self.samples(other);
        median(a.iter().zip(b).map(|(x, y)| g(x) / g(y)).collect())
    }

    fn derived(&self) -> Value {
        let up = |n: &NodeSample| n.upstream.bytes as f64;
        let read = |n: &NodeSample| n.read_secs;
        let total = |n: &NodeSample| n.total_secs();
        json!({
            // 1 - node 2's upstream bytes / node 1's, per sample, median.
            "upstream_saving_node2_vs_node1": 1.0 - self.ratio("node2", "node1", up),
            "upstream_node2_vs_no_mirror": self.ratio("node2", "no-mirror", up),
            "upstream_node1_vs_no_mirror": self.ratio("node1", "no-mirror", up),
            "read_node2_vs_node1": self.ratio("node2", "node1", read),
            "read_node2_vs_no_mirror": self.ratio("node2", "no-mirror", read),
            "read_node1_vs_no_mirror": self.ratio("node1", "no-mirror", read),
            "total_node2_vs_node1": self.ratio("node2", "node1", total),
            "total_node2_vs_no_mirror": self.ratio("node2", "no-mirror", total),
            "total_node1_vs_no_mirror": self.ratio("node1", "no-mirror", total),
        })
    }

    fn to_json(&self) -> Value {
        let arms: serde_json::Map<String, Value> = self
            .arms
            .iter()
            .map(|(arm, v)| {
                let m = |g: fn(&NodeSample) -> f64| self.med(arm, g);
                (
                    arm.to_string(),
                    json!({
                        "samples": v.iter().map(|n| n.to_json()).collect::<Vec<_>>(),
                        "median_mount_secs": m(|n| n.mount_secs),
                        "median_read_secs": m(|n| n.read_secs),
                        "median_total_secs": m(|n| n.total_secs()),
                        "median_upstream_bytes": m(|n| n.upstream.bytes as f64),
                        "median_upstream_requests": m(|n| n.upstream.requests as f64),
                        "median_mirror_bytes": m(|n| n.mirror.bytes as f64),
                        "median_mirror_requests": m(|n| n.mirror.requests as f64),
                        "median_mirror_fallbacks": m(|n| n.mirror_fallbacks as f64),
                    }),
                )
            })
            .collect();
        json!({
            "samples": self.args.samples,
            "network": {
                "name": self.shape.name,
                "bits_per_sec": self.shape.bits_per_sec,
                "rtt_ms": self.shape.rtt.as_secs_f64() * 1e3,
            },
            "image": {
                "name": "testkit-python",
                "ordinary_bytes": self.ordinary_bytes,
                "lazy_bytes": self.lazy_bytes,
                "files": self.files,
                "bytes_read": self.bytes_read,
            },
            "arms": arms,
            "derived": self.derived(),
        })
    }

    fn chart(&self, path: &Path) -> Result<()> {
        let mut rows = Vec::new();
        let max = |v: Vec<f64>| v.into_iter().fold(f64::NAN, f64::max);
        for (arm, v) in &self.arms {
            let up: Vec<f64> = v.iter().map(|n| n.upstream.bytes as f64 / 1e6).collect();
            let secs: Vec<f64> = v.iter().map(|n| n.total_secs()).collect();
            for (panel, values) in [("upstream", up), ("time", secs)] {
                rows.push(chart::Row {
                    image: "testkit-python".into(),
                    panel: panel.into(),
                    arm: arm.to_string(),
                    median: median(values.clone()),
                    p95: max(values),
                });
            }
        }
        let net = self.shape.name;
        let panels = [
            chart::Panel {
                key: "upstream".into(),
                caption: format!(
                    "Bytes the upstream sent (MB), network {net}: median, whisker to max"
                ),
                y_desc: "MB".into(),
            },
            chart::Panel {
                key: "time".into(),
                caption: format!("Mount + cold read (s), network {net}: median, whisker to max"),
                y_desc: "seconds".into(),
            },
        ];
        chart::draw_panels(path, &rows, &panels)
    }

    fn print_markdown(&self) {
        let mb = |b: f64| b / 1e6;
        // Megabytes, but a handful of bytes as bytes: "0.0 MB" would hide
        // whether anything at all was sent.
        let amount = |b: f64| {
            if b < 100_000.0 {
                format!("{b:.0} B")
            } else {
                format!("{:.1} MB", b / 1e6)
            }
        };
        println!(
            "{} sample(s), each with a fresh mirror and fresh nodes, kernel caches dropped before \
             each node's mount; upstream behind {} ({} Mbit/s, {} ms RTT); image testkit-python: \
             {:.1} MB lazy ({:.1} MB ordinary), {} files, {:.1} MB read per node. Medians.\n",
            self.args.samples,
            self.shape.name,
            self.shape.bits_per_sec / 1_000_000,
            self.shape.rtt.as_secs_f64() * 1e3,
            mb(self.lazy_bytes as f64),
            mb(self.ordinary_bytes as f64),
            self.files,
            mb(self.bytes_read as f64),
        );
        println!(
            "| arm | mount (s) | cold read (s) | upstream sent (requests) | of which whole \
             blobs (n) | of which ranges (n) | mirror answered (requests) | mirror's whole \
             answers to a Range | daemon's mirror fallbacks |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for arm in ARMS {
            let m = |g: fn(&NodeSample) -> f64| self.med(arm, g);
            println!(
                "| {} | {:.2} | {:.2} | {} ({:.0}) | {} ({:.0}) | {} ({:.0}) | {} ({:.0}) | {:.0} | {:.0} |",
                arm_title(arm),
                m(|n| n.mount_secs),
                m(|n| n.read_secs),
                amount(m(|n| n.upstream.bytes as f64)),
                m(|n| n.upstream.requests as f64),
                amount(m(|n| n.upstream.whole_blob_bytes as f64)),
                m(|n| n.upstream.whole_blob_requests as f64),
                amount(m(|n| n.upstream.range_bytes as f64)),
                m(|n| n.upstream.range_requests as f64),
                amount(m(|n| n.mirror.bytes as f64)),
                m(|n| n.mirror.requests as f64),
                m(|n| n.mirror_whole_for_range as f64),
                m(|n| n.mirror_fallbacks as f64),
            );
        }
        let d = self.derived();
        let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
        println!();
        println!("| ratio (median of per-sample ratios) | value |\n|---|---|");
        println!(
            "| upstream bytes saved, node 2 vs node 1 | **{:.1}%** (median bytes: node 2 {:.0}, \
             node 1 {:.0}) |",
            100.0 * f("upstream_saving_node2_vs_node1"),
            self.med("node2", |n| n.upstream.bytes as f64),
            self.med("node1", |n| n.upstream.bytes as f64),
        );
        println!(
            "| upstream bytes, node 2 / no mirror | {:.3} |",
            f("upstream_node2_vs_no_mirror")
        );
        println!(
            "| upstream bytes, node 1 / no mirror | {:.2} |",
            f("upstream_node1_vs_no_mirror")
        );
        for (what, key) in [("cold read", "read"), ("mount + cold read", "total")] {
            println!(
                "| {what} time, node 2 / node 1 | **{:.2}** |",
                f(&format!("{key}_node2_vs_node1"))
            );
            println!(
                "| {what} time, node 2 / no mirror | **{:.2}** |",
                f(&format!("{key}_node2_vs_no_mirror"))
            );
            println!(
                "| {what} time, node 1 / no mirror | {:.2} |",
                f(&format!("{key}_node1_vs_no_mirror"))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazypull_testkit::proxy::Fault;

    fn entry(method: &str, path: &str, range: Option<&str>, status: u16, bytes: u64) -> LogEntry {
        LogEntry {
            n: 1,
            method: method.into(),
            path: path.into(),
            range: range.map(Into::into),
            status,
            bytes,
            fault: Fault::None,
            ms: 0,
        }
    }

    /// Whole blobs are 200 answers to blob GETs; ranges are 206 answers;
    /// manifests and HEADs count in the totals only.
    #[test]
    fn traffic_splits_whole_blobs_from_ranges() {
        let t = Traffic::of(&[
            entry("GET", "/v2/r/manifests/v1", None, 200, 700),
            entry("HEAD", "/v2/r/blobs/sha256:a", None, 200, 0),
            entry("GET", "/v2/r/blobs/sha256:a", None, 200, 5000),
            entry("GET", "/v2/r/blobs/sha256:a", Some("bytes=0-9"), 206, 10),
            entry("GET", "/v2/r/blobs/sha256:b", Some("bytes=0-9"), 200, 3000),
        ]);
        assert_eq!((t.requests, t.bytes), (5, 8710));
        assert_eq!((t.whole_blob_requests, t.whole_blob_bytes), (2, 8000));
        assert_eq!((t.range_requests, t.range_bytes), (1, 10));
    }
}
