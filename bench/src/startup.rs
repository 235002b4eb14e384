//! `lazypull-bench startup`: time to ready of realistic workloads (issue
//! 14), containerd's full pull against lazypull, over an emulated network,
//! all arms in the same run.
//!
//! Images: testkit's `debian_image` workloads (python + numpy, gcc,
//! postgresql, a bloated python image: Debian bookworm root file systems
//! built with mmdebstrap and cached in /var/cache/lazypull-bench/images),
//! or `testkit-python` (testkit's 30 MB python image, built from the host's
//! python3.11 without any download: the CI smoke test's). Each is pushed
//! to Debian's `docker-registry` as an ordinary image (one gzip layer) and
//! converted with `lazypull convert`.
//!
//! Network (`shaped.rs`): the registry runs in a network namespace of its
//! own (testkit's `netns`), reached over a veth pair shaped with `tbf` on
//! both ends; in front of it, on the host end's address, testkit's proxy
//! adds the round-trip time (this kernel has no netem) and logs every
//! response (its body bytes: the bytes moved, and the requests). Shapes: `1g`
//! (1 Gbit/s, 0.5 ms RTT) and `100m` (100 Mbit/s, 20 ms RTT). The registry
//! is plain HTTP on a non-loopback address: `ctr images pull --plain-http`,
//! `lazypull daemon --insecure-registry`, `lazypull pull --insecure`.
//!
//! Arms, each sample on fresh state (a new containerd root, daemon cache
//! and snapshotter root; kernel caches dropped just before the clock
//! starts), arm order rotating per sample:
//! - A: `ctr images pull` (overlayfs) + `ctr run`;
//! - B: lazypull cold: `lazypull pull` + `ctr run --snapshotter lazypull`,
//!   no prefetch (the daemon and snapshotter started before the clock);
//! - C: as B, of the image `lazypull optimize` made from a recorded run
//!   (the hook [`optimized_reference`]; reported "not run" when the
//!   `lazypull optimize` command is missing);
//! - D: a warm second `ctr run` right after A (`D-A`) and after B (`D-B`),
//!   on the same state: the floor.
//!
//! Per arm: time to ready (pull start to the ready line), bytes and
//! requests the registry answered by then and in all, the daemon's CPU time
//! and peak RSS (`/proc/<pid>`: containerd for A, the lazypull daemon for
//! B and C), the fraction of the image's stored bytes fetched by ready.
//! After the ready line the container reads every file of its root file
//! system once (`find / -xdev -type f | xargs cat | wc -c`); that
//! throughput is reported against A's.
//!
//! Output: a Markdown table (or `--json`), and `startup.json` and
//! `startup.svg` (time to ready per workload and arm, one panel per
//! network) in the work directory. Progress goes to standard error.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lazypull_testkit::containerd::{self, Containerd, ContainerdOptions};
use lazypull_testkit::debian_image;
use lazypull_testkit::oci_image::Image;
use lazypull_testkit::proxy::read_log;
use lazypull_testkit::python_image::{python_image, PYTHON_OUTPUT};
use serde_json::{json, Value};

use crate::containers::{drop_caches, lazypull_pull, median, start_lazypull};
use crate::shaped::{self, push_and_convert, Converted, Net, Shape, SHAPES};

pub(crate) mod chart;

/// What `lazypull-bench startup` was asked to do.
#[derive(Debug, Clone)]
pub struct Args {
    /// Samples per arm, image and network.
    pub samples: u32,
    /// Workloads: `python`, `gcc`, `postgres`, `bloated`, `testkit-python`.
    pub images: Vec<String>,
    /// Network shapes: `1g`, `100m`.
    pub networks: Vec<String>,
    /// Work directory (rebuilt; short: sockets live in it).
    pub work: PathBuf,
    /// Print the JSON report instead of Markdown.
    pub json: bool,
    /// Read every file after ready.
    pub full_read: bool,
    /// The `lazypull` binary (default: beside this one).
    pub lazypull: Option<PathBuf>,
    /// Only build (and cache) the images.
    pub prepare: bool,
}

/// An image under test and how its container is run.
struct Subject {
    image: Image,
    ready_line: String,
    /// `ctr run ... REF ID <command...>`: ready, then (with the full read)
    /// `FULLREAD <bytes>`.
    command: Vec<String>,
    /// Bytes of the root file system, when known (the tar's size).
    rootfs_bytes: Option<u64>,
}

/// The full read in a shell: every regular file of the root file system
/// once, the byte count printed as `FULLREAD <n>`.
const SH_FULL_READ: &str =
    "find / -xdev -type f -print0 | xargs -0 cat | wc -c | sed 's/^/FULLREAD /'";

/// The testkit image has python but no shell: the app, then the same walk.
const PY_APP_AND_FULL_READ: &str = "\
import os, runpy, stat, sys
sys.argv = ['/srv/app.py', 'from-cmd']
runpy.run_path('/srv/app.py', run_name='__main__')
FULL
";

// Only directories are compared with the root's device: overlayfs reports a
// lower layer's own device for its non-directories when the layers are not
// on one file system (Documentation/filesystems/overlayfs.rst, "Inode
// properties"), as the lazy arms' EROFS layers are not.
const PY_FULL_READ: &str = "\
dev = os.stat('/').st_dev
n = 0
for d, dirs, files in os.walk('/'):
    dirs[:] = [x for x in dirs if os.lstat(os.path.join(d, x)).st_dev == dev]
    for f in files:
        p = os.path.join(d, f)
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            with open(p, 'rb') as fh:
                while True:
                    b = fh.read(1 << 20)
                    if not b:
                        break
                    n += len(b)
print('FULLREAD', n)
";

fn subject(name: &str, full_read: bool) -> Result<Subject> {
    if name == "testkit-python" {
        let full = if full_read { PY_FULL_READ } else { "" };
        return Ok(Subject {
            image: python_image()?,
            ready_line: PYTHON_OUTPUT.into(),
            command: vec![
                "/usr/bin/python3".into(),
                "-u".into(),
                "-c".into(),
                PY_APP_AND_FULL_READ.replace("FULL\n", full),
            ],
            rootfs_bytes: None,
        });
    }
    let Some(w) = debian_image::workload(name) else {
        bail!("unknown image {name:?}: python, gcc, postgres, bloated or testkit-python");
    };
    let script = if full_read {
        format!("{} && {SH_FULL_READ}", w.ready)
    } else {
        w.ready.to_owned()
    };
    Ok(Subject {
        image: w.image()?,
        ready_line: w.ready_line.into(),
        command: vec!["/bin/sh".into(), "-c".into(), script],
        rootfs_bytes: Some(w.tar_bytes()?),
    })
}

/// What one arm measured in one sample.
#[derive(Debug, Clone, Default)]
struct Sample {
    ready_secs: f64,
    bytes_to_ready: u64,
    requests_to_ready: u64,
    bytes: u64,
    requests: u64,
    /// CPU seconds (user + system) of the daemon: containerd (A) or the
    /// lazypull daemon (B, C), from its start; for D, what the warm run
    /// added. Peak RSS: the daemon's `VmHWM` after the run.
    cpu_secs: f64,
    peak_rss_kib: u64,
    /// The full read: bytes and seconds from the ready line.
    full_read_bytes: Option<u64>,
    full_read_secs: Option<f64>,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({
            "ready_secs": self.ready_secs,
            "bytes_to_ready": self.bytes_to_ready,
            "requests_to_ready": self.requests_to_ready,
            "bytes": self.bytes,
            "requests": self.requests,
            "daemon_cpu_secs": self.cpu_secs,
            "daemon_peak_rss_kib": self.peak_rss_kib,
            "full_read_bytes": self.full_read_bytes,
            "full_read_secs": self.full_read_secs,
        })
    }

    fn full_read_mb_per_sec(&self) -> Option<f64> {
        Some(self.full_read_bytes? as f64 / 1e6 / self.full_read_secs?)
    }
}

/// The arms, in report order.
const ARMS: [&str; 5] = ["A", "B", "C", "D-A", "D-B"];

fn arm_title(arm: &str) -> &'static str {
    match arm {
        "A" => "A: ctr pull + run (overlayfs)",
        "B" => "B: lazypull cold",
        "C" => "C: lazypull, recorded prefetch",
        "D-A" => "D-A: warm second run of A",
        "D-B" => "D-B: warm second run of B",
        _ => "?",
    }
}

/// CPU seconds (user + system) and peak RSS (KiB) of process `pid`.
fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    // After the comm: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        Ok(fields.get(i - 3).context("/proc/pid/stat field")?.parse()?)
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let cpu = (ticks(14)? + ticks(15)?) as f64 / hz;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok((cpu, hwm))
}

/// containerd's pid (the process whose command line names its config).
fn containerd_pid(ctr: &Containerd) -> Option<u32> {
    let needle = ctr.config_path().to_string_lossy().into_owned();
    containerd::processes_mentioning(&needle)
        .into_iter()
        .next()
        .map(|p| p as u32)
}

/// What one `ctr run` showed.
struct Run {
    ready_secs: f64,
    /// Proxy log entries by the ready line.
    log_at_ready: usize,
    full_read: Option<(u64, f64)>,
}

/// `ctr run --rm --snapshotter S REF ID COMMAND...`, its output read as it
/// comes: seconds from `t0` to the ready line, then the full read.
fn run_container(
    ctr: &Containerd,
    snapshotter: &str,
    reference: &str,
    id: &str,
    subject: &Subject,
    t0: Instant,
    net: &Net,
) -> Result<Run> {
    let mut args: Vec<&str> = vec![
        "--timeout",
        "1800s",
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        reference,
        id,
    ];
    args.extend(subject.command.iter().map(String::as_str));
    let mut child = ctr
        .ctr_unstarted(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ctr run")?;
    let stdout = child.stdout.take().context("ctr's stdout")?;
    let mut ready = None;
    let mut full = None;
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let now = t0.elapsed().as_secs_f64();
        if ready.is_none() && line.trim_end() == subject.ready_line {
            let at = read_log(&net.log)?.len();
            ready = Some((now, at, Instant::now()));
        } else if let (Some((_, _, at)), Some(n)) = (&ready, line.strip_prefix("FULLREAD ")) {
            full = Some((n.trim().parse::<u64>()?, at.elapsed().as_secs_f64()));
        } else if seen.len() < 20 {
            seen.push(line);
        }
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child.wait()?;
    let Some((ready_secs, log_at_ready, _)) = ready else {
        bail!(
            "ctr run --snapshotter {snapshotter} {reference}: {status}, no ready line {:?}; \
             other output: {seen:?}; stderr: {}; containerd's log: {}",
            subject.ready_line,
            stderr.trim(),
            ctr.log_path().display()
        );
    };
    if !status.success() {
        bail!(
            "ctr run --snapshotter {snapshotter} {reference}: {status} after the ready line; \
             stderr: {}",
            stderr.trim()
        );
    }
    Ok(Run {
        ready_secs,
        log_at_ready,
        full_read: full,
    })
}

fn sample_of(run: &Run, net: &Net, from: usize, usage: (f64, u64)) -> Result<Sample> {
    let log = read_log(&net.log)?;
    let upto = &log[from.min(log.len())..run.log_at_ready.max(from).min(log.len())];
    let (requests, bytes) = net.settled_since(from)?;
    Ok(Sample {
        ready_secs: run.ready_secs,
        bytes_to_ready: upto.iter().map(|e| e.bytes).sum(),
        requests_to_ready: upto.len() as u64,
        bytes,
        requests,
        cpu_secs: usage.0,
        peak_rss_kib: usage.1,
        full_read_bytes: run.full_read.map(|f| f.0),
        full_read_secs: run.full_read.map(|f| f.1),
    })
}

/// The cold run (its clock `t0` and the proxy log's position `from` taken
/// before the pull) and then a warm second run of `reference` under
/// `snapshotter`, containers `<id>1` and `<id>2`; `pid` is the daemon whose
/// CPU and peak RSS each sample reports (the warm one: the CPU it added).
#[allow(clippy::too_many_arguments)]
fn cold_then_warm(
    ctr: &Containerd,
    snapshotter: &str,
    reference: &str,
    id: &str,
    subject: &Subject,
    net: &Net,
    pid: u32,
    from: usize,
    t0: Instant,
) -> Result<(Sample, Sample)> {
    let run = run_container(
        ctr,
        snapshotter,
        reference,
        &format!("{id}1"),
        subject,
        t0,
        net,
    )?;
    let cold_usage = proc_usage(pid)?;
    let cold = sample_of(&run, net, from, cold_usage)?;
    let from = net.log_len()?;
    let t1 = Instant::now();
    let run = run_container(
        ctr,
        snapshotter,
        reference,
        &format!("{id}2"),
        subject,
        t1,
        net,
    )?;
    let warm_usage = proc_usage(pid)?;
    let warm = sample_of(&run, net, from, (warm_usage.0 - cold_usage.0, warm_usage.1))?;
    Ok((cold, warm))
}

/// Arm A and its warm second run (D-A).
fn containerd_arm(
    dir: &Path,
    net: &Net,
    reference: &str,
    subject: &Subject,
) -> Result<(Sample, Sample)> {
    let ctr = Containerd::start(&dir.join("c"), &ContainerdOptions::default())?;
    let pid = containerd_pid(&ctr).context("containerd's pid")?;
    drop_caches()?;
    let from = net.log_len()?;
    let t0 = Instant::now();
    ctr.ctr(&[
        "--timeout",
        "1800s",
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        reference,
    ])?;
    let (a, d) = cold_then_warm(
        &ctr,
        "overlayfs",
        reference,
        "a",
        subject,
        net,
        pid,
        from,
        t0,
    )?;
    drop(ctr);
    containerd::unmount_under(dir);
    Ok((a, d))
}

/// Arm B (or C, given the optimized reference) and its warm second run.
fn lazypull_arm(
    dir: &Path,
    lazypull: &Path,
    daemon_config: &Path,
    net: &Net,
    reference: &str,
    subject: &Subject,
) -> Result<(Sample, Sample)> {
    let host = net.host();
    let (daemon, snap, ctr) = start_lazypull(
        dir,
        lazypull,
        daemon_config,
        &["--insecure-registry", &host],
    )?;
    let pid = daemon.pid().context("the daemon's pid")?;
    drop_caches()?;
    let from = net.log_len()?;
    let t0 = Instant::now();
    lazypull_pull(lazypull, &ctr, reference, &["--insecure"])?;
    let (b, d) = cold_then_warm(
        &ctr, "lazypull", reference, "b", subject, net, pid, from, t0,
    )?;
    drop(ctr);
    drop(snap);
    drop(daemon);
    containerd::unmount_under(dir);
    Ok((b, d))
}

/// Arm C's hook: `lazypull optimize LAZY --out OPT -- COMMAND...` (the
/// ready command alone, no full read), run once on the unshaped network
/// against a daemon of its own with an empty cache (started and stopped
/// here, in `dir`), giving the reference of an image carrying the recorded
/// prefetch order; `Err` with the reason when that fails.
fn optimized_reference(
    dir: &Path,
    lazypull: &Path,
    daemon_config: &Path,
    net: &Net,
    lazy: &str,
    subject: &Subject,
) -> Result<String, String> {
    let opt = lazy.replace("-lazy:", "-opt:");
    let mut command = subject.command.clone();
    // The recorded run is the ready part only.
    if let Some(last) = command.last_mut() {
        if let Some(ready) = last.strip_suffix(&format!(" && {SH_FULL_READ}")) {
            *last = ready.to_owned();
        }
        if let Some(ready) = last.strip_suffix(PY_FULL_READ) {
            *last = ready.to_owned();
        }
    }
    let host = net.host();
    let (daemon, snap, ctr) = start_lazypull(
        dir,
        lazypull,
        daemon_config,
        &["--insecure-registry", &host],
    )
    .map_err(|e| format!("not run: starting a daemon for lazypull optimize: {e:#}"))?;
    let out = Command::new(lazypull)
        .args(["optimize", lazy, "--out", &opt, "--insecure", "--socket"])
        .arg(dir.join("d/run/ctl.sock"))
        .arg("--work-dir")
        .arg(dir.join("optimize"))
        .arg("--")
        .args(&command)
        .stdin(Stdio::null())
        .output();
    drop(ctr);
    drop(snap);
    drop(daemon);
    containerd::unmount_under(dir);
    let out = out.map_err(|e| format!("not run: lazypull optimize: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "not run: lazypull optimize failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(opt)
}

/// Nearest-rank percentile `p` (0..=100) of `v`.
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// Per image: what the registry stores, and the measurements.
struct ImageResult {
    name: String,
    ordinary_bytes: u64,
    lazy_bytes: u64,
    rootfs_bytes: Option<u64>,
    /// Per network, per arm: samples (or why none).
    arms: BTreeMap<String, BTreeMap<&'static str, Result<Vec<Sample>, String>>>,
}

fn arm_summary(samples: &[Sample]) -> Value {
    let f = |g: fn(&Sample) -> f64| samples.iter().map(g).collect::<Vec<f64>>();
    let full: Vec<f64> = samples
        .iter()
        .filter_map(Sample::full_read_mb_per_sec)
        .collect();
    json!({
        "samples": samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
        "median_ready_secs": median(f(|s| s.ready_secs)),
        "p95_ready_secs": percentile(f(|s| s.ready_secs), 95.0),
        "median_bytes_to_ready": median(f(|s| s.bytes_to_ready as f64)),
        "median_bytes": median(f(|s| s.bytes as f64)),
        "median_requests_to_ready": median(f(|s| s.requests_to_ready as f64)),
        "median_requests": median(f(|s| s.requests as f64)),
        "median_daemon_cpu_secs": median(f(|s| s.cpu_secs)),
        "median_daemon_peak_rss_kib": median(f(|s| s.peak_rss_kib as f64)),
        "median_full_read_mb_per_sec": if full.is_empty() { Value::Null } else { json!(median(full)) },
    })
}

fn med(samples: &[Sample], g: fn(&Sample) -> f64) -> f64 {
    median(samples.iter().map(g).collect())
}

/// Runs the benchmark; prints the report; writes `startup.json` and
/// `startup.svg` into the work directory.
pub fn run(args: &Args) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("run as root: namespaces, containerd, mounts and drop_caches need it");
    }
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if args.prepare {
        for name in &args.images {
            eprintln!(
                "[{name}] building the image (cached in {})",
                debian_image::CACHE_DIR
            );
            let subject = subject(name, args.full_read)?;
            eprintln!("[{name}] ready: {}", subject.image.manifest_digest());
        }
        return Ok(());
    }
    let lazypull = match &args.lazypull {
        Some(p) => p.clone(),
        None => crate::sibling("lazypull")?,
    };
    let shapes: Vec<Shape> = args
        .networks
        .iter()
        .map(|n| shaped::shape(n))
        .collect::<Result<_>>()?;
    let work = &args.work;
    if work.exists() {
        containerd::unmount_under(work);
        fs::remove_dir_all(work).with_context(|| format!("clearing {}", work.display()))?;
    }
    fs::create_dir_all(work)?;
    let daemon_config = work.join("daemon.toml");
    fs::write(&daemon_config, "")?;
    let net = Net::start(work)?;
    eprintln!(
        "network namespace {} (registry {}), proxy {}",
        net.ns.name(),
        net.registry.addr(),
        net.host()
    );
    let mut results = Vec::new();
    for name in &args.images {
        eprintln!("[{name}] building the image");
        let subject = subject(name, args.full_read)?;
        // Pushed and converted unshaped.
        net.set_shape(None)?;
        let Converted {
            ordinary,
            lazy,
            ordinary_bytes,
            lazy_bytes,
        } = push_and_convert(&net, &lazypull, &subject.image, name)?;
        let optimized = optimized_reference(
            &work.join(format!("optimize-{name}")),
            &lazypull,
            &daemon_config,
            &net,
            &lazy,
            &subject,
        );
        if let Err(why) = &optimized {
            eprintln!("[{name}] arm C {why}");
        }
        let mut per_net = BTreeMap::new();
        for shape in &shapes {
            net.set_shape(Some(*shape))?;
            let mut arms: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
            for s in 0..args.samples {
                let dir = work.join(format!("s-{name}-{}-{s}", shape.name));
                // Rotate the arms' order per sample.
                let mut order = vec!["A", "B", "C"];
                order.rotate_left(s as usize % 3);
                for arm in order {
                    let arm_dir = dir.join(arm.to_lowercase());
                    let pair = match arm {
                        "A" => Some(containerd_arm(&arm_dir, &net, &ordinary, &subject)),
                        "B" => Some(lazypull_arm(
                            &arm_dir,
                            &lazypull,
                            &daemon_config,
                            &net,
                            &lazy,
                            &subject,
                        )),
                        _ => optimized.as_ref().ok().map(|opt| {
                            lazypull_arm(&arm_dir, &lazypull, &daemon_config, &net, opt, &subject)
                        }),
                    };
                    let Some(pair) = pair else { continue };
                    let (cold, warm) = pair.with_context(|| {
                        format!("{name}, network {}, sample {s}, arm {arm}", shape.name)
                    })?;
                    eprintln!(
                        "[{name} {} #{s}] {arm}: ready {:.2} s, {:.1} MB / {} requests by ready, \
                         {:.1} MB in all; warm {:.2} s",
                        shape.name,
                        cold.ready_secs,
                        cold.bytes_to_ready as f64 / 1e6,
                        cold.requests_to_ready,
                        cold.bytes as f64 / 1e6,
                        warm.ready_secs
                    );
                    arms.entry(arm).or_default().push(cold);
                    if arm != "C" {
                        arms.entry(if arm == "A" { "D-A" } else { "D-B" })
                            .or_default()
                            .push(warm);
                    }
                }
                containerd::unmount_under(&dir);
                let _ = fs::remove_dir_all(&dir);
            }
            let mut by_arm: BTreeMap<&'static str, Result<Vec<Sample>, String>> = BTreeMap::new();
            for arm in ARMS {
                match arms.remove(arm) {
                    Some(v) => by_arm.insert(arm, Ok(v)),
                    None => by_arm.insert(
                        arm,
                        Err(optimized.clone().err().unwrap_or_else(|| "not run".into())),
                    ),
                };
            }
            per_net.insert(shape.name.to_owned(), by_arm);
        }
        net.set_shape(None)?;
        results.push(ImageResult {
            name: name.clone(),
            ordinary_bytes,
            lazy_bytes,
            rootfs_bytes: subject.rootfs_bytes,
            arms: per_net,
        });
    }
    drop(net);

    let report = json_report(args, &results);
    fs::write(
        work.join("startup.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    let svg = work.join("startup.svg");
    chart::draw(&svg, &chart_rows(&results), &args.networks)?;
    eprintln!(
        "wrote {} and {}",
        work.join("startup.json").display(),
        svg.display()
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_markdown(args, &results);
    }
    Ok(())
}

fn json_report(args: &Args, results: &[ImageResult]) -> Value {
    let images: Vec<Value> = results
        .iter()
        .map(|r| {
            let nets: serde_json::Map<String, Value> = r
                .arms
                .iter()
                .map(|(net, arms)| {
                    let arms: serde_json::Map<String, Value> = arms
                        .iter()
                        .map(|(arm, v)| {
                            let value = match v {
                                Ok(s) => arm_summary(s),
                                Err(why) => json!({ "not_run": why }),
                            };
                            (arm.to_string(), value)
                        })
                        .collect();
                    (net.clone(), Value::Object(arms))
                })
                .collect();
            json!({
                "image": r.name,
                "ordinary_bytes": r.ordinary_bytes,
                "lazy_bytes": r.lazy_bytes,
                "rootfs_bytes": r.rootfs_bytes,
                "networks": nets,
            })
        })
        .collect();
    json!({
        "samples": args.samples,
        "networks": SHAPES.iter().filter(|s| args.networks.iter().any(|n| n == s.name)).map(|s| json!({
            "name": s.name, "bits_per_sec": s.bits_per_sec, "rtt_ms": s.rtt.as_secs_f64() * 1e3,
        })).collect::<Vec<_>>(),
        "full_read": args.full_read,
        "images": images,
    })
}

fn chart_rows(results: &[ImageResult]) -> Vec<chart::Row> {
    let mut rows = Vec::new();
    for r in results {
        for (net, arms) in &r.arms {
            for (arm, v) in arms {
                if let Ok(s) = v {
                    rows.push(chart::Row {
                        image: r.name.clone(),
                        panel: net.clone(),
                        arm: arm.to_string(),
                        median: med(s, |x| x.ready_secs),
                        p95: percentile(s.iter().map(|x| x.ready_secs).collect(), 95.0),
                    });
                }
            }
        }
    }
    rows
}

fn print_markdown(args: &Args, results: &[ImageResult]) {
    let mb = |b: f64| b / 1e6;
    println!(
        "{} sample(s) per arm, fresh state per sample, caches dropped; registry in its own \
         network namespace behind a veth shaped with tbf and testkit's proxy adding the RTT.\n",
        args.samples
    );
    println!("| image | ordinary (gzip) | lazy | root fs |\n|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {:.1} MB | {:.1} MB | {} |",
            r.name,
            mb(r.ordinary_bytes as f64),
            mb(r.lazy_bytes as f64),
            r.rootfs_bytes
                .map(|b| format!("{:.1} MB", mb(b as f64)))
                .unwrap_or_else(|| "-".into())
        );
    }
    for net in &args.networks {
        println!("\n### Network {net}\n");
        println!(
            "| image | arm | ready median (s) | p95 (s) | MB by ready | requests by ready | \
             MB in all | fetched by ready / lazy image | daemon CPU (s) | daemon peak RSS (MB) | \
             full read MB/s (vs A) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for r in results {
            let Some(arms) = r.arms.get(net) else {
                continue;
            };
            let a_full = arms
                .get("A")
                .and_then(|v| v.as_ref().ok())
                .map(|s| median(s.iter().filter_map(Sample::full_read_mb_per_sec).collect()))
                .unwrap_or(f64::NAN);
            for arm in ARMS {
                match arms.get(arm) {
                    Some(Ok(s)) => {
                        let full: Vec<f64> =
                            s.iter().filter_map(Sample::full_read_mb_per_sec).collect();
                        let full = if full.is_empty() {
                            "-".to_owned()
                        } else {
                            let m = median(full);
                            format!("{m:.0} ({:.2}x)", m / a_full)
                        };
                        let fraction = if arm.starts_with('A') || arm == "D-A" {
                            "-".to_owned()
                        } else {
                            format!(
                                "{:.1}%",
                                100.0 * med(s, |x| x.bytes_to_ready as f64) / r.lazy_bytes as f64
                            )
                        };
                        println!(
                            "| {} | {} | {:.2} | {:.2} | {:.1} | {:.0} | {:.1} | {} | {:.2} | {:.0} | {} |",
                            r.name,
                            arm_title(arm),
                            med(s, |x| x.ready_secs),
                            percentile(s.iter().map(|x| x.ready_secs).collect(), 95.0),
                            mb(med(s, |x| x.bytes_to_ready as f64)),
                            med(s, |x| x.requests_to_ready as f64),
                            mb(med(s, |x| x.bytes as f64)),
                            fraction,
                            med(s, |x| x.cpu_secs),
                            med(s, |x| x.peak_rss_kib as f64) / 1024.0,
                            full
                        );
                    }
                    Some(Err(why)) => {
                        println!("| {} | {} | {why} |", r.name, arm_title(arm));
                    }
                    None => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(v.clone(), 95.0), 5.0);
        assert_eq!(percentile(v.clone(), 50.0), 3.0);
        assert_eq!(percentile(vec![7.0], 95.0), 7.0);
        assert!(percentile(Vec::new(), 95.0).is_nan());
    }
}
