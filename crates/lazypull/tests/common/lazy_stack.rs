//! What the host tests of lazy images under containerd share
//! (`lazy_pull.rs`, `lazy_containers.rs`, `optimize.rs`, included with `#[path]`): a
//! registry access log reader, `ctr` listings, the lazy busybox image, and
//! [`Stack`]: `lazypull daemon` (FUSE), `lazypull snapshotter` and
//! containerd, each in its own directory under one test directory, with
//! the daemon and the snapshotter killable and restartable.
//!
//! Each test file uses a part of it.
#![allow(dead_code, unused_imports)]

use std::collections::{BTreeSet, HashMap};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lazypull_testkit::containerd::{self, Containerd, ContainerdOptions};
pub use lazypull_testkit::containerd::{chain_ids, snapshot_rows};
use lazypull_testkit::oci_image::busybox_image;
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

pub fn lazypull() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
}

/// `lazypull daemon` with `config`, `transport` and every directory under
/// `dir` (`cache`, `work`, `run`, the FUSE dir `blobs`, the control socket
/// `run/ctl.sock`), logging at info; add the fd store flags.
pub fn daemon_in(dir: &Path, config: &Path, transport: &str) -> Command {
    let mut cmd = lazypull();
    cmd.arg("daemon")
        .arg("--config")
        .arg(config)
        .args(["--transport", transport])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--fuse-dir")
        .arg(dir.join("blobs"))
        .arg("--socket")
        .arg(dir.join("run/ctl.sock"))
        .args(["--log-level", "info"]);
    cmd
}

pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn require_host() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts FUSE, EROFS and overlayfs and runs runc: run it as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "this test needs /dev/fuse");
}

pub fn temp_dir() -> tempfile::TempDir {
    // Short: containerd's, the snapshotter's and the daemon's sockets live in it.
    tempfile::Builder::new()
        .prefix("lppull")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process (the daemon, the snapshotter) killed and reaped when
/// dropped, its log printed if the test is failing.
pub struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    /// Undone after the process is gone.
    mounts_under: Vec<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Proc {
        let logfile = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name,
            child: Some(child),
            log: log.to_path_buf(),
            mounts_under: Vec::new(),
        }
    }

    /// Waits until `socket` accepts connections.
    pub fn wait_listening(&mut self, socket: &Path) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{} exited with {status} during start; its log ends:\n{}",
                    self.name,
                    tail(&self.log, 30)
                );
            }
            if UnixStream::connect(socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not listen on {}; its log ends:\n{}",
            self.name,
            socket.display(),
            tail(&self.log, 30)
        );
    }
}

impl Proc {
    /// Undoes the mounts under `dir` once the process is gone (when dropped).
    pub fn unmount_under_when_gone(&mut self, dir: &Path) {
        self.mounts_under.push(dir.to_path_buf());
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the process runs").id()
    }

    /// SIGKILL, reaped; what it mounted is left as it is.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the process runs");
        child.kill().unwrap();
        child.wait().unwrap();
        self.mounts_under.clear();
    }

    /// Waits until `lazypull status --socket socket` answers with this
    /// process's pid (a successor whose predecessor left its socket file).
    pub fn wait_answering(&mut self, socket: &Path) {
        let pid = u64::from(self.pid());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{} exited with {status} during start; its log ends:\n{}",
                    self.name,
                    tail(&self.log, 30)
                );
            }
            let out = lazypull()
                .args(["status", "--json", "--socket"])
                .arg(socket)
                .output()
                .unwrap();
            if out.status.success() {
                let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if s["pid"].as_u64() == Some(pid) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not answer on {}; its log ends:\n{}",
            self.name,
            socket.display(),
            tail(&self.log, 30)
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}'s log ({}) ends:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: the daemon unmounts its FUSE blob files.
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
        for dir in &self.mounts_under {
            containerd::unmount_under(dir);
        }
    }
}

pub fn committed_rows(chain: &[String]) -> Vec<(String, String, String)> {
    let mut rows: Vec<_> = chain
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let parent = if i == 0 {
                String::new()
            } else {
                chain[i - 1].clone()
            };
            (id.clone(), parent, "Committed".to_string())
        })
        .collect();
    rows.sort();
    rows
}

/// The labels `ctr content ls` shows for `digest`, or None if it is not
/// in the content store.
pub fn content_labels(ctr: &Containerd, digest: &str) -> Option<HashMap<String, String>> {
    let text = ctr.ctr_stdout(&["content", "ls"]).unwrap();
    // tabwriter pads with tabs; the age has spaces ("2 seconds"), the
    // labels (k=v,k=v) none.
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(digest))?;
    let labels = line.split_whitespace().last().unwrap();
    if labels == "-" {
        return Some(HashMap::new());
    }
    Some(
        labels
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect(),
    )
}

/// The manifest digest `ctr images ls` records for `reference`, or None.
pub fn image_digest(ctr: &Containerd, reference: &str) -> Option<String> {
    let listed = ctr.ctr_stdout(&["images", "ls"]).unwrap();
    listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .map(str::to_owned)
}

/// One request of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
}

/// The registry's access log: its standard output, which testkit keeps
/// beside its log.
pub fn access_log(registry: &RegistryServer) -> PathBuf {
    registry_dir(registry).join("registry.stdout")
}

/// The access log lines of the registry written after byte `from`.
pub fn accesses(registry: &RegistryServer, from: usize) -> Vec<Access> {
    let text = std::fs::read_to_string(access_log(registry)).unwrap();
    text[from..]
        .lines()
        .filter_map(|l| {
            // 127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 123 "" "agent"
            let (_, rest) = l.split_once("] \"")?;
            let (request, rest) = rest.split_once('"')?;
            let mut parts = request.split(' ');
            let method = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            let mut fields = rest.split_whitespace();
            let status = fields.next()?.parse().ok()?;
            let bytes = fields.next()?.parse().unwrap_or(0);
            Some(Access {
                method,
                path,
                status,
                bytes,
            })
        })
        .collect()
}

pub fn log_len(registry: &RegistryServer) -> usize {
    std::fs::read_to_string(access_log(registry)).unwrap().len()
}

/// The blob digests the accesses name (`/v2/<repo>/blobs/<digest>`).
pub fn blobs_read(accesses: &[Access]) -> BTreeSet<String> {
    accesses
        .iter()
        .filter_map(|a| a.path.split_once("/blobs/").map(|(_, d)| d.to_owned()))
        .collect()
}

/// The lazy image in the registry: its manifest (as JSON) and digest.
pub struct LazyImage {
    pub reference: String,
    pub manifest_digest: String,
    pub manifest: serde_json::Value,
}

impl LazyImage {
    pub fn layer_digests(&self, role: &str) -> Vec<String> {
        self.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == role)
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn all_layers(&self) -> Vec<String> {
        self.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn config_digest(&self) -> String {
        self.manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// Pushes the busybox image and converts it into a lazy image.
pub fn lazy_busybox(registry: &RegistryServer) -> (String, LazyImage) {
    let image = busybox_image().unwrap();
    image.push(registry.addr(), "test/busybox", "v1").unwrap();
    let source = format!("{}/test/busybox:v1", registry.addr());
    let reference = format!("{}/test/busybox-lazy:v1", registry.addr());
    let out = ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    );
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let manifest_digest = pushed["manifest_digest"].as_str().unwrap().to_owned();
    // The manifest as the registry stored it.
    let hex = manifest_digest.strip_prefix("sha256:").unwrap();
    let stored = registry_dir(registry).join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let bytes = std::fs::read(&stored)
        .unwrap_or_else(|e| panic!("reading the lazy manifest at {}: {e}", stored.display()));
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
        manifest_digest
    );
    let manifest = serde_json::from_slice(&bytes).unwrap();
    (
        source,
        LazyImage {
            reference,
            manifest_digest,
            manifest,
        },
    )
}

/// The directory the registry was started in (its log lives there).
pub fn registry_dir(registry: &RegistryServer) -> PathBuf {
    registry.log_path().parent().unwrap().to_path_buf()
}

/// `lazypull pull` against containerd at `ctr`: its output.
pub fn pull(ctr: &Containerd, args: &[&str]) -> Output {
    lazypull()
        .arg("pull")
        .arg("--address")
        .arg(ctr.address())
        .arg("--namespace")
        .arg(ctr.namespace())
        .args(args)
        .output()
        .unwrap()
}

/// `lazypull daemon` (FUSE), `lazypull snapshotter --daemon-socket` on its
/// control socket, and containerd with that snapshotter as `lazypull`, all
/// under `dir`: the daemon's directories under `dir/d`, the snapshotter's
/// root `dir/snap`, containerd's `dir/c`. Fields drop in order: containerd
/// first (it removes its containers' snapshots through the snapshotter),
/// the daemon last.
pub struct Stack {
    pub ctr: Containerd,
    pub snap_root: PathBuf,
    pub snap: Proc,
    pub daemon: Proc,
    dir: PathBuf,
    /// Daemons and snapshotters started so far (names their logs).
    daemons: usize,
    snapshotters: usize,
}

impl Stack {
    pub fn start(dir: &Path) -> Stack {
        let daemon = Self::spawn_daemon(dir, 1);
        let snap = Self::spawn_snapshotter(dir, 1);
        let ctr = Containerd::start(
            &dir.join("c"),
            &ContainerdOptions {
                proxy_snapshotters: vec![("lazypull".into(), Self::snap_socket_in(dir))],
                ..ContainerdOptions::default()
            },
        )
        .unwrap();
        Stack {
            ctr,
            snap_root: dir.join("snap"),
            snap,
            daemon,
            dir: dir.to_path_buf(),
            daemons: 1,
            snapshotters: 1,
        }
    }

    /// The daemon's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("d/run/ctl.sock")
    }

    fn snap_socket_in(dir: &Path) -> PathBuf {
        dir.join("snap.sock")
    }

    /// The log of the `n`-th daemon (1: `daemon.log`, then `daemon-2.log`...).
    pub fn daemon_log(&self, n: usize) -> PathBuf {
        Self::numbered(&self.dir, "daemon", n)
    }

    /// The log of the `n`-th snapshotter.
    pub fn snapshotter_log(&self, n: usize) -> PathBuf {
        Self::numbered(&self.dir, "snapshotter", n)
    }

    fn numbered(dir: &Path, name: &str, n: usize) -> PathBuf {
        match n {
            1 => dir.join(format!("{name}.log")),
            n => dir.join(format!("{name}-{n}.log")),
        }
    }

    fn spawn_daemon(dir: &Path, n: usize) -> Proc {
        let d = dir.join("d");
        let control = d.join("run/ctl.sock");
        let mut daemon_cmd = lazypull();
        daemon_cmd
            .arg("daemon")
            .args(["--config", "/dev/null", "--transport", "fuse"])
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
            .args(["--log-level", "debug"]);
        let mut daemon = Proc::spawn(
            "lazypull daemon",
            daemon_cmd,
            &Self::numbered(dir, "daemon", n),
        );
        daemon.unmount_under_when_gone(&d);
        if n == 1 {
            daemon.wait_listening(&control);
        } else {
            // A successor: the dead daemon's socket file is still there.
            daemon.wait_answering(&control);
        }
        daemon
    }

    fn spawn_snapshotter(dir: &Path, n: usize) -> Proc {
        let snap_root = dir.join("snap");
        let snap_socket = Self::snap_socket_in(dir);
        let mut snap_cmd = lazypull();
        snap_cmd
            .arg("snapshotter")
            .arg("--root")
            .arg(&snap_root)
            .arg("--address")
            .arg(&snap_socket)
            .arg("--daemon-socket")
            .arg(dir.join("d/run/ctl.sock"))
            .env("LAZYPULL_LOG", "debug");
        let mut snap = Proc::spawn(
            "lazypull snapshotter",
            snap_cmd,
            &Self::numbered(dir, "snapshotter", n),
        );
        snap.unmount_under_when_gone(&snap_root);
        snap.wait_listening(&snap_socket);
        snap
    }

    /// SIGKILLs the daemon (its FUSE connection stays in the fd store) and
    /// starts a successor on the same directories; returns the successor's
    /// number (its log: [`Stack::daemon_log`]) once it answers `status`.
    pub fn kill_and_restart_daemon(&mut self) -> usize {
        self.daemon.kill9();
        self.daemons += 1;
        self.daemon = Self::spawn_daemon(&self.dir, self.daemons);
        self.daemons
    }

    /// SIGKILLs the snapshotter and starts it again on the same root (its
    /// mounts stay); returns the new one's number once it listens.
    pub fn kill_and_restart_snapshotter(&mut self) -> usize {
        self.snap.kill9();
        self.snapshotters += 1;
        self.snap = Self::spawn_snapshotter(&self.dir, self.snapshotters);
        self.snapshotters
    }

    /// The daemon's `lazypull status --json`.
    pub fn daemon_status(&self) -> serde_json::Value {
        let out = lazypull()
            .args(["status", "--json", "--socket"])
            .arg(self.control_socket())
            .output()
            .unwrap();
        serde_json::from_str(&ok(out, "lazypull status")).unwrap()
    }
}
