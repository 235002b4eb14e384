//! `lazypull-bench containers`: on the host, from pull to a container's first
//! line of output, lazypull against containerd's own pull, in the same run
//! from the same registry (Debian's `docker-registry` on 127.0.0.1).
//!
//! The image is testkit's python image (the host's python3.11, its shared
//! libraries and its standard library, some 30 MB in three gzip layers),
//! pushed ordinary and converted with `lazypull convert`. Per round, each arm
//! on fresh state (a new containerd root; for lazypull also a new daemon
//! cache and snapshotter root; kernel caches dropped just before the clock
//! starts), the arms' order alternating:
//! - A (containerd): `ctr images pull --plain-http` (fetch and unpack with
//!   the overlayfs snapshotter), then `ctr run --snapshotter overlayfs`;
//! - B (lazypull): `lazypull pull` (the daemon (FUSE) and the snapshotter
//!   were started before the clock), then `ctr run --snapshotter lazypull`.
//!
//! Figures: seconds from the start of the pull to the container's first
//! line (and to the pull's end), the bytes the registry sent in each arm
//! (its access log: the sum of the response bodies), medians and the ratio
//! B/A. The network is loopback: no latency, gigabytes per second, which
//! favours the arm that moves the whole image.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazypull_testkit::containerd::{self, Containerd, ContainerdOptions};
use lazypull_testkit::python_image::{python_image, PYTHON_OUTPUT};
use lazypull_testkit::registry::RegistryServer;

/// What one arm of one round measured.
#[derive(Debug, Clone)]
struct Arm {
    /// Pull start to the pull's end.
    pull_secs: f64,
    /// Pull start to the container's first line of output.
    first_line_secs: f64,
    /// Response body bytes the registry sent during the arm.
    registry_bytes: u64,
    /// Requests the registry answered during the arm.
    registry_requests: u64,
    /// Of `registry_bytes`, those of responses finished by the first line.
    registry_bytes_by_first_line: u64,
    /// lazypull: `registry_bytes` of the lazy image's blobs by layer role.
    by_role: BTreeMap<String, u64>,
}

pub(crate) fn drop_caches() -> Result<()> {
    Command::new("sync").status()?;
    fs::write("/proc/sys/vm/drop_caches", "3").context("drop_caches (run as root)")
}

/// The registry's access log (its standard output, beside its log).
fn access_log(registry: &RegistryServer) -> PathBuf {
    registry
        .log_path()
        .parent()
        .map(|d| d.join("registry.stdout"))
        .unwrap_or_default()
}

fn log_len(registry: &RegistryServer) -> Result<usize> {
    Ok(fs::read(access_log(registry))
        .context("the registry's access log")?
        .len())
}

/// (requests, body bytes) of the access log lines after byte `from`:
/// `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 123 "" "agent"`.
fn sent_since(registry: &RegistryServer, from: usize) -> Result<(u64, u64)> {
    let responses = responses_since(registry, from)?;
    Ok((
        responses.len() as u64,
        responses.iter().map(|(_, b)| b).sum(),
    ))
}

/// (request path, body bytes) of each access log line after byte `from`.
fn responses_since(registry: &RegistryServer, from: usize) -> Result<Vec<(String, u64)>> {
    let text = fs::read(access_log(registry)).context("the registry's access log")?;
    let text = String::from_utf8_lossy(&text[from.min(text.len())..]).into_owned();
    let mut out = Vec::new();
    for l in text.lines() {
        let Some((_, rest)) = l.split_once("] \"") else {
            continue;
        };
        let Some((request, rest)) = rest.split_once('"') else {
            continue;
        };
        let path = request.split(' ').nth(1).unwrap_or("").to_owned();
        let mut fields = rest.split_whitespace();
        if fields.next().and_then(|s| s.parse::<u16>().ok()).is_none() {
            continue;
        }
        out.push((
            path,
            fields.next().and_then(|b| b.parse().ok()).unwrap_or(0),
        ));
    }
    Ok(out)
}

/// Body bytes sent after byte `from` of the lazy image's blobs, by the
/// role (`meta`, `table`, `data`) `roles` gives each digest.
fn bytes_by_role(
    registry: &RegistryServer,
    from: usize,
    roles: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (path, bytes) in responses_since(registry, from)? {
        if let Some(role) = path.split_once("/blobs/").and_then(|(_, d)| roles.get(d)) {
            *out.entry(role.clone()).or_insert(0) += bytes;
        }
    }
    Ok(out)
}

/// A process of the lazypull arm (daemon, snapshotter), stopped (SIGTERM,
/// then SIGKILL) and its mounts under `mounts_under` undone when dropped.
pub(crate) struct Proc {
    child: Option<Child>,
    mounts_under: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command, log: &Path, mounts_under: &Path) -> Result<Proc> {
        let logfile = fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            mounts_under: mounts_under.to_path_buf(),
        })
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn wait_listening(&mut self, socket: &Path, log: &Path) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("exited with {status} during start; see {}", log.display());
                }
            }
            if UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "did not listen on {} in 60 s; see {}",
            socket.display(),
            log.display()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        containerd::unmount_under(&self.mounts_under);
    }
}

/// `ctr run --rm --snapshotter <snapshotter> <reference> <id>`: seconds
/// from `t0` to its first line of output and the registry's body bytes
/// since log offset `from` then; checks the line and the exit.
fn run_first_line(
    ctr: &Containerd,
    snapshotter: &str,
    reference: &str,
    id: &str,
    t0: Instant,
    registry: &RegistryServer,
    from: usize,
) -> Result<(f64, u64)> {
    let mut child = ctr
        .ctr_unstarted(&[
            "--timeout",
            "120s",
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            reference,
            id,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ctr run")?;
    let stdout = child.stdout.take().context("ctr's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let secs = t0.elapsed().as_secs_f64();
    let (_, by_first_line) = sent_since(registry, from)?;
    let out = child.wait_with_output()?;
    if !out.status.success() || line.trim_end() != PYTHON_OUTPUT {
        bail!(
            "ctr run --snapshotter {snapshotter} {reference}: {} with first line {line:?}; stderr: {}; containerd's log: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            ctr.log_path().display()
        );
    }
    Ok((secs, by_first_line))
}

/// Arm A: containerd's pull (overlayfs) and run.
fn containerd_arm(dir: &Path, registry: &RegistryServer, reference: &str) -> Result<Arm> {
    let ctr = Containerd::start(&dir.join("c"), &ContainerdOptions::default())?;
    drop_caches()?;
    let from = log_len(registry)?;
    let t0 = Instant::now();
    ctr.ctr(&[
        "--timeout",
        "300s",
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        reference,
    ])?;
    let pull_secs = t0.elapsed().as_secs_f64();
    let (first_line_secs, registry_bytes_by_first_line) =
        run_first_line(&ctr, "overlayfs", reference, "a1", t0, registry, from)?;
    // The registry writes each line when the response is done: give the
    // last one a moment.
    std::thread::sleep(Duration::from_millis(500));
    let (registry_requests, registry_bytes) = sent_since(registry, from)?;
    let by_role = BTreeMap::new();
    drop(ctr);
    containerd::unmount_under(dir);
    Ok(Arm {
        pull_secs,
        first_line_secs,
        registry_bytes,
        registry_requests,
        registry_bytes_by_first_line,
        by_role,
    })
}

/// `lazypull pull [EXTRA...] REF` into `ctr`'s containerd and namespace.
pub(crate) fn lazypull_pull(
    lazypull: &Path,
    ctr: &Containerd,
    reference: &str,
    extra: &[&str],
) -> Result<()> {
    let out = Command::new(lazypull)
        .arg("pull")
        .args(extra)
        .arg("--address")
        .arg(ctr.address())
        .arg("--namespace")
        .arg(ctr.namespace())
        .arg(reference)
        .output()?;
    if !out.status.success() {
        bail!(
            "lazypull pull {reference}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `lazypull daemon` (FUSE, its config file if any, `daemon_args` added)
/// with everything of its
/// own under `dir/d` (cache, work, run and FUSE directories; control socket
/// `dir/d/run/ctl.sock`), its log `dir/daemon.log`; returned once it listens.
pub(crate) fn start_daemon(
    dir: &Path,
    lazypull: &Path,
    daemon_config: Option<&Path>,
    daemon_args: &[&str],
) -> Result<Proc> {
    fs::create_dir_all(dir)?;
    let d = dir.join("d");
    let control = d.join("run/ctl.sock");
    let mut daemon_cmd = Command::new(lazypull);
    daemon_cmd.arg("daemon");
    if let Some(config) = daemon_config {
        daemon_cmd.arg("--config").arg(config);
    }
    daemon_cmd
        .args(["--transport", "fuse"])
        .arg("--cache-dir")
        .arg(d.join("cache"))
        .arg("--work-dir")
        .arg(d.join("work"))
        .arg("--run-dir")
        .arg(d.join("run"))
        .arg("--fuse-dir")
        .arg(d.join("blobs"))
        .arg("--socket")
        .arg(&control)
        .arg("--fd-store")
        .arg(d.join("run/fdstore.sock"))
        .args(daemon_args);
    let daemon_log = dir.join("daemon.log");
    let mut daemon = Proc::spawn(daemon_cmd, &daemon_log, &d)?;
    daemon
        .wait_listening(&control, &daemon_log)
        .context("lazypull daemon")?;
    Ok(daemon)
}

/// `lazypull daemon` ([`start_daemon`]) and `lazypull snapshotter`
/// in `dir`, then a containerd with the snapshotter as proxy `lazypull`;
/// each returned once it listens. Drop them in the order returned reversed:
/// containerd, the snapshotter, the daemon.
pub(crate) fn start_lazypull(
    dir: &Path,
    lazypull: &Path,
    daemon_config: &Path,
    daemon_args: &[&str],
) -> Result<(Proc, Proc, Containerd)> {
    let daemon = start_daemon(dir, lazypull, Some(daemon_config), daemon_args)?;
    let control = dir.join("d/run/ctl.sock");
    let snap_root = dir.join("snap");
    let snap_socket = dir.join("snap.sock");
    let mut snap_cmd = Command::new(lazypull);
    snap_cmd
        .arg("snapshotter")
        .arg("--root")
        .arg(&snap_root)
        .arg("--address")
        .arg(&snap_socket)
        .arg("--daemon-socket")
        .arg(&control);
    let snap_log = dir.join("snapshotter.log");
    let mut snap = Proc::spawn(snap_cmd, &snap_log, &snap_root)?;
    snap.wait_listening(&snap_socket, &snap_log)
        .context("lazypull snapshotter")?;

    let ctr = Containerd::start(
        &dir.join("c"),
        &ContainerdOptions {
            proxy_snapshotters: vec![("lazypull".into(), snap_socket.clone())],
            ..ContainerdOptions::default()
        },
    )?;
    Ok((daemon, snap, ctr))
}

/// Arm B: `lazypull daemon` (FUSE) and `lazypull snapshotter` started, then
/// timed: `lazypull pull` and the run.
fn lazypull_arm(
    dir: &Path,
    lazypull: &Path,
    daemon_config: &Path,
    registry: &RegistryServer,
    reference: &str,
    roles: &BTreeMap<String, String>,
) -> Result<Arm> {
    let (daemon, snap, ctr) = start_lazypull(dir, lazypull, daemon_config, &[])?;
    drop_caches()?;
    let from = log_len(registry)?;
    let t0 = Instant::now();
    lazypull_pull(lazypull, &ctr, reference, &[])?;
    let pull_secs = t0.elapsed().as_secs_f64();
    let (first_line_secs, registry_bytes_by_first_line) =
        run_first_line(&ctr, "lazypull", reference, "b1", t0, registry, from)?;
    std::thread::sleep(Duration::from_millis(500));
    let (registry_requests, registry_bytes) = sent_since(registry, from)?;
    let by_role = bytes_by_role(registry, from, roles)?;
    // containerd first (it removes its snapshots through the snapshotter),
    // then the snapshotter, the daemon last.
    drop(ctr);
    drop(snap);
    drop(daemon);
    containerd::unmount_under(dir);
    Ok(Arm {
        pull_secs,
        first_line_secs,
        registry_bytes,
        registry_requests,
        registry_bytes_by_first_line,
        by_role,
    })
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Total compressed bytes of a manifest's layers and config, read from the
/// registry's storage.
/// Also each layer's `containerd.io/snapshot/lazypull.role` by digest.
pub(crate) fn image_bytes(
    registry: &RegistryServer,
    manifest_digest: &str,
) -> Result<(u64, BTreeMap<String, String>)> {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .context("manifest digest")?;
    let stored = registry
        .log_path()
        .parent()
        .context("registry dir")?
        .join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ));
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(&stored).with_context(|| format!("reading {}", stored.display()))?,
    )?;
    let layers: u64 = manifest["layers"]
        .as_array()
        .context("manifest layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    let roles = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            Some((
                l["digest"].as_str()?.to_owned(),
                l["annotations"]["containerd.io/snapshot/lazypull.role"]
                    .as_str()?
                    .to_owned(),
            ))
        })
        .collect();
    Ok((
        layers + manifest["config"]["size"].as_u64().unwrap_or(0),
        roles,
    ))
}

/// `readahead`: the daemon's `readahead` config key (bytes), else its
/// default.
/// `fill_window`: the daemon's `fill_window` (bytes fetched around a miss).
/// `chunk_size`: `lazypull convert --chunk-size` (the unit of fetching).
pub fn run(
    rounds: u32,
    work: &Path,
    json: bool,
    readahead: Option<u64>,
    fill_window: Option<u64>,
    chunk_size: Option<&str>,
) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("run as root: containerd, runc, mounts and drop_caches need it");
    }
    let lazypull = crate::sibling("lazypull")?;
    if work.exists() {
        containerd::unmount_under(work);
        fs::remove_dir_all(work).with_context(|| format!("clearing {}", work.display()))?;
    }
    fs::create_dir_all(work)?;
    let mut config = String::new();
    if let Some(n) = readahead {
        config.push_str(&format!("readahead = {n}\n"));
    }
    if let Some(n) = fill_window {
        config.push_str(&format!("fill_window = {n}\n"));
    }
    let daemon_config = work.join("daemon.toml");
    fs::write(&daemon_config, &config)?;
    let registry = RegistryServer::start(&work.join("registry"), None)?;
    let image = python_image()?;
    image.push(registry.addr(), "bench/python", "v1")?;
    let ordinary = format!("{}/bench/python:v1", registry.addr());
    let lazy = format!("{}/bench/python-lazy:v1", registry.addr());
    let mut convert = Command::new(&lazypull);
    convert.args(["convert", &ordinary, &lazy, "--json"]);
    if let Some(c) = chunk_size {
        convert.args(["--chunk-size", c]);
    }
    let out = convert.output()?;
    if !out.status.success() {
        bail!(
            "lazypull convert: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let converted: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let lazy_digest = converted["manifest_digest"]
        .as_str()
        .context("lazypull convert --json: manifest_digest")?;
    let (ordinary_size, _) = image_bytes(&registry, &image.manifest_digest())?;
    let (lazy_size, roles) = image_bytes(&registry, lazy_digest)?;
    eprintln!(
        "python image: ordinary {ordinary_size} bytes (gzip layers + config), lazy {lazy_size} bytes"
    );

    let mut a: Vec<Arm> = Vec::new();
    let mut b: Vec<Arm> = Vec::new();
    for r in 0..rounds {
        let round = work.join(format!("r{r}"));
        let lazy_first = r % 2 == 1;
        for lazy_arm in [lazy_first, !lazy_first] {
            if lazy_arm {
                let arm = lazypull_arm(
                    &round.join("b"),
                    &lazypull,
                    &daemon_config,
                    &registry,
                    &lazy,
                    &roles,
                )
                .with_context(|| format!("round {r}, lazypull"))?;
                eprintln!("round {r} lazypull: {arm:?}");
                b.push(arm);
            } else {
                let arm = containerd_arm(&round.join("a"), &registry, &ordinary)
                    .with_context(|| format!("round {r}, containerd"))?;
                eprintln!("round {r} containerd: {arm:?}");
                a.push(arm);
            }
        }
        containerd::unmount_under(&round);
        let _ = fs::remove_dir_all(&round);
    }

    let med = |v: &[Arm], f: fn(&Arm) -> f64| median(v.iter().map(f).collect());
    let first = |x: &Arm| x.first_line_secs;
    let pull = |x: &Arm| x.pull_secs;
    let bytes = |x: &Arm| x.registry_bytes as f64;
    let requests = |x: &Arm| x.registry_requests as f64;
    let by_first = |x: &Arm| x.registry_bytes_by_first_line as f64;
    let role_median = |role: &str| {
        median(
            b.iter()
                .map(|x| x.by_role.get(role).copied().unwrap_or(0) as f64)
                .collect(),
        )
    };
    let ratios: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(a, b)| b.first_line_secs / a.first_line_secs)
        .collect();
    if json {
        let role_medians: BTreeMap<&str, f64> = ["meta", "table", "data"]
            .into_iter()
            .map(|role| (role, role_median(role)))
            .collect();
        let arm_json = |v: &[Arm]| {
            serde_json::json!({
                "first_line_secs": v.iter().map(first).collect::<Vec<_>>(),
                "pull_secs": v.iter().map(pull).collect::<Vec<_>>(),
                "registry_bytes": v.iter().map(|x| x.registry_bytes).collect::<Vec<_>>(),
                "registry_requests": v.iter().map(|x| x.registry_requests).collect::<Vec<_>>(),
                "median_first_line_secs": med(v, first),
                "median_pull_secs": med(v, pull),
                "registry_bytes_by_first_line": v.iter().map(|x| x.registry_bytes_by_first_line).collect::<Vec<_>>(),
                "median_registry_bytes": med(v, bytes),
                "median_registry_bytes_by_first_line": med(v, by_first),
            })
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "rounds": rounds,
                "daemon_config": config,
                "chunk_size": chunk_size.unwrap_or("default"),
                "network": "loopback",
                "image": {"ordinary_bytes": ordinary_size, "lazy_bytes": lazy_size},
                "containerd_overlayfs": arm_json(&a),
                "lazypull": arm_json(&b),
                "lazypull_median_bytes_by_role": role_medians,
                "ratio_first_line_b_over_a": ratios,
                "median_ratio_first_line": median(ratios.clone()),
                "ratio_registry_bytes": med(&b, bytes) / med(&a, bytes),
            }))?
        );
        return Ok(());
    }
    println!(
        "Python image (python3.11 + shared libraries + stdlib): ordinary {:.1} MB (gzip), lazy {:.1} MB. \
         {rounds} rounds, fresh state per arm, caches dropped; registry on loopback; daemon config {:?}; chunk size {}.\n",
        ordinary_size as f64 / 1e6,
        lazy_size as f64 / 1e6,
        config,
        chunk_size.unwrap_or("default")
    );
    println!("| arm | pull (median s) | pull to first line (median s) | bytes from the registry (median) | of which by the first line | requests (median) |");
    println!("|---|---|---|---|---|---|");
    for (name, v) in [
        ("A: `ctr images pull` + `ctr run` (overlayfs)", &a),
        ("B: `lazypull pull` + `ctr run` (lazypull)", &b),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.1} MB | {:.1} MB | {:.0} |",
            med(v, pull),
            med(v, first),
            med(v, bytes) / 1e6,
            med(v, by_first) / 1e6,
            med(v, requests)
        );
    }
    println!(
        "\nlazypull's registry bytes by layer role (median): meta {:.2} MB, tables {:.2} MB, data {:.2} MB.",
        role_median("meta") / 1e6,
        role_median("table") / 1e6,
        role_median("data") / 1e6
    );
    println!(
        "Ratio B/A, pull to first line: median {:.2} (per round: {}); bytes from the registry: {:.3}.",
        median(ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        med(&b, bytes) / med(&a, bytes)
    );
    Ok(())
}
