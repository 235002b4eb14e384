//! `lazypull pull` end to end on this host, every part real: Debian's
//! `docker-registry` on 127.0.0.1, the ordinary busybox image converted with
//! `lazypull convert`, `lazypull daemon` (FUSE transport), `lazypull
//! snapshotter` as containerd's proxy snapshotter `lazypull`, containerd 1.6
//! and runc.
//!
//! - `lazy_pull_commits_the_chain_and_the_container_reads_lazily`: `lazypull
//!   pull` leaves containerd an image record naming the manifest, the
//!   manifest and config in its content store with the garbage collection
//!   labels containerd's own pull sets, and the committed snapshot chain,
//!   having fetched only the manifest and the config; `ctr run --snapshotter
//!   lazypull` then runs the image (entrypoint, command, environment, working
//!   directory and both layers honoured), and only then does the registry
//!   see data blob reads. Pulling again changes nothing but says so;
//!   `ctr images rm --sync` lets containerd's garbage collector remove every
//!   snapshot and the image's lazy mount.
//! - `python_runs_from_a_lazily_pulled_image`: Debian's python3.11 with its
//!   shared libraries and standard library, in three layers, converted,
//!   pulled lazily and run: the program's output shows its entrypoint,
//!   command, environment and working directory honoured; the registry saw
//!   manifest and config only until the container started.
//! - `eager_pull_prefetches_the_whole_image`: a file no container reads is
//!   fetched only when the image was pulled with `--eager`.
//! - `pull_refuses_what_it_cannot_do_lazily`: an ordinary image, a
//!   snapshotter that is not lazypull's (containerd's overlayfs), and an
//!   unreachable containerd are refused with errors naming the cause, and
//!   leave no image record or snapshot behind.
//!
//! Needs root (mounts, runc) and /dev/fuse. A missing containerd, runc,
//! docker-registry, busybox-static or python3.11 fails the test naming the
//! package.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lazypull_testkit::containerd::{self, Containerd, ContainerdOptions};
use lazypull_testkit::oci_image::{busybox_image, BUSYBOX_IMAGE_OUTPUT};
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

fn lazypull() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn require_host() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts FUSE, EROFS and overlayfs and runs runc: run it as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "this test needs /dev/fuse");
}

fn temp_dir() -> tempfile::TempDir {
    // Short: containerd's, the snapshotter's and the daemon's sockets live in it.
    tempfile::Builder::new()
        .prefix("lppull")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process (the daemon, the snapshotter) killed and reaped when
/// dropped, its log printed if the test is failing.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    /// Undone after the process is gone.
    mounts_under: Vec<PathBuf>,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Proc {
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
    fn wait_listening(&mut self, socket: &Path) {
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

/// The chain ids of a layer stack (OCI image spec): containerd's names for
/// the committed snapshots.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {d}").as_bytes()))
            ),
        };
        out.push(id);
    }
    out
}

/// `ctr snapshots ls` rows: (key, parent, kind), sorted.
fn snapshot_rows(ctr: &Containerd, snapshotter: &str) -> Vec<(String, String, String)> {
    let text = ctr
        .ctr_stdout(&["snapshots", "--snapshotter", snapshotter, "ls"])
        .unwrap();
    let mut rows: Vec<(String, String, String)> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.as_slice() {
                [key, kind] => (key.to_string(), String::new(), kind.to_string()),
                [key, parent, kind] => (key.to_string(), parent.to_string(), kind.to_string()),
                _ => panic!("unexpected `ctr snapshots ls` row {l:?} in:\n{text}"),
            }
        })
        .collect();
    rows.sort();
    rows
}

fn committed_rows(chain: &[String]) -> Vec<(String, String, String)> {
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
fn content_labels(ctr: &Containerd, digest: &str) -> Option<HashMap<String, String>> {
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
fn image_digest(ctr: &Containerd, reference: &str) -> Option<String> {
    let listed = ctr.ctr_stdout(&["images", "ls"]).unwrap();
    listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .map(str::to_owned)
}

/// One request of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    method: String,
    path: String,
    status: u16,
    /// Body bytes sent.
    bytes: u64,
}

/// The registry's access log: its standard output, which testkit keeps
/// beside its log.
fn access_log(registry: &RegistryServer) -> PathBuf {
    registry_dir(registry).join("registry.stdout")
}

/// The access log lines of the registry written after byte `from`.
fn accesses(registry: &RegistryServer, from: usize) -> Vec<Access> {
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

fn log_len(registry: &RegistryServer) -> usize {
    std::fs::read_to_string(access_log(registry)).unwrap().len()
}

/// The blob digests the accesses name (`/v2/<repo>/blobs/<digest>`).
fn blobs_read(accesses: &[Access]) -> BTreeSet<String> {
    accesses
        .iter()
        .filter_map(|a| a.path.split_once("/blobs/").map(|(_, d)| d.to_owned()))
        .collect()
}

/// The lazy image in the registry: its manifest (as JSON) and digest.
struct LazyImage {
    reference: String,
    manifest_digest: String,
    manifest: serde_json::Value,
}

impl LazyImage {
    fn layer_digests(&self, role: &str) -> Vec<String> {
        self.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == role)
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    }

    fn all_layers(&self) -> Vec<String> {
        self.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    }

    fn config_digest(&self) -> String {
        self.manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// Pushes the busybox image and converts it into a lazy image.
fn lazy_busybox(registry: &RegistryServer) -> (String, LazyImage) {
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
fn registry_dir(registry: &RegistryServer) -> PathBuf {
    registry.log_path().parent().unwrap().to_path_buf()
}

/// `lazypull pull` against containerd at `ctr`: its output.
fn pull(ctr: &Containerd, args: &[&str]) -> Output {
    lazypull()
        .arg("pull")
        .arg("--address")
        .arg(ctr.address())
        .args(args)
        .output()
        .unwrap()
}

/// `lazypull daemon` (FUSE), `lazypull snapshotter --daemon-socket` on its
/// control socket, and containerd with that snapshotter as `lazypull`, all
/// under `dir`. Fields drop in order: containerd first (it removes its
/// containers' snapshots through the snapshotter), the daemon last.
struct Stack {
    ctr: Containerd,
    snap_root: PathBuf,
    _snap: Proc,
    _daemon: Proc,
}

impl Stack {
    fn start(dir: &Path) -> Stack {
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
        let mut daemon = Proc::spawn("lazypull daemon", daemon_cmd, &dir.join("daemon.log"));
        daemon.mounts_under.push(d.clone());
        daemon.wait_listening(&control);

        let snap_root = dir.join("snap");
        let snap_socket = dir.join("snap.sock");
        let mut snap_cmd = lazypull();
        snap_cmd
            .arg("snapshotter")
            .arg("--root")
            .arg(&snap_root)
            .arg("--address")
            .arg(&snap_socket)
            .arg("--daemon-socket")
            .arg(&control)
            .env("LAZYPULL_LOG", "debug");
        let mut snap = Proc::spawn(
            "lazypull snapshotter",
            snap_cmd,
            &dir.join("snapshotter.log"),
        );
        snap.mounts_under.push(snap_root.clone());
        snap.wait_listening(&snap_socket);

        let ctr = Containerd::start(
            &dir.join("c"),
            &ContainerdOptions {
                proxy_snapshotters: vec![("lazypull".into(), snap_socket.clone())],
                ..ContainerdOptions::default()
            },
        )
        .unwrap();
        Stack {
            ctr,
            snap_root,
            _snap: snap,
            _daemon: daemon,
        }
    }
}

#[test]
fn lazy_pull_commits_the_chain_and_the_container_reads_lazily() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let (_, lazy) = lazy_busybox(&registry);
    let meta = lazy.layer_digests("meta");
    let tables = lazy.layer_digests("table");
    let data = lazy.layer_digests("data");
    assert_eq!((meta.len(), tables.len(), data.len()), (1, 2, 2));

    let stack = Stack::start(dir);
    let ctr = &stack.ctr;

    // The pull.
    let before_pull = log_len(&registry);
    let out = pull(ctr, &["--json", &lazy.reference]);
    let stdout = ok(out.clone(), "lazypull pull");
    eprintln!(
        "lazypull pull said:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["manifest_digest"], lazy.manifest_digest.as_str());
    assert_eq!(report["image"], "created");
    assert_eq!(report["manifest"], "committed");

    // The image record names the manifest.
    assert_eq!(
        image_digest(ctr, &lazy.reference).as_deref(),
        Some(lazy.manifest_digest.as_str()),
        "{}",
        ctr.ctr_stdout(&["images", "ls"]).unwrap()
    );
    // The chain, committed, named by chain ids computed here from the
    // manifest's layers (diff id == digest in a lazy image).
    let chain = chain_ids(&lazy.all_layers());
    assert_eq!(chain[0], meta[0], "the meta layer's chain id is its digest");
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));
    // Manifest and config in the content store, with containerd's GC labels.
    let manifest_labels =
        content_labels(ctr, &lazy.manifest_digest).expect("the manifest is in the content store");
    let mut wanted = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        lazy.config_digest(),
    )]);
    for (i, l) in lazy.all_layers().iter().enumerate() {
        wanted.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.clone());
    }
    assert_eq!(manifest_labels, wanted);
    let config_labels =
        content_labels(ctr, &lazy.config_digest()).expect("the config is in the content store");
    assert_eq!(
        config_labels,
        HashMap::from([(
            "containerd.io/gc.ref.snapshot.lazypull".to_owned(),
            chain.last().unwrap().clone()
        )])
    );
    // No layer is in the content store: nothing was fetched.
    for l in lazy.all_layers() {
        assert_eq!(content_labels(ctr, &l), None, "layer {l} was fetched");
    }
    // The lease is gone.
    let leases = ctr.ctr_stdout(&["leases", "ls", "-q"]).unwrap();
    assert_eq!(leases.trim(), "", "leases left: {leases}");
    // The registry saw manifest and config requests only.
    let pulled = accesses(&registry, before_pull);
    assert!(
        pulled
            .iter()
            .any(|a| a.method == "GET" && a.path.contains("/manifests/") && a.status == 200),
        "no manifest request: {pulled:?}"
    );
    assert_eq!(
        blobs_read(&pulled),
        BTreeSet::from([lazy.config_digest()]),
        "the pull read blobs other than the config: {pulled:?}"
    );

    // Pulling again: nothing new, the record updated.
    let again: serde_json::Value =
        serde_json::from_str(&ok(pull(ctr, &["--json", &lazy.reference]), "second pull")).unwrap();
    assert_eq!(again["image"], "updated");
    assert_eq!(again["manifest"], "existed");
    assert_eq!(again["config"], "existed");
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));

    // The container: the daemon mounts the image now, and reads data.
    let before_run = log_len(&registry);
    let out = ctr
        .ctr(&[
            "--timeout",
            "60s",
            "run",
            "--rm",
            "--snapshotter",
            "lazypull",
            &lazy.reference,
            "c1",
        ])
        .unwrap_or_else(|e| panic!("ctr run: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{BUSYBOX_IMAGE_OUTPUT}\n")
    );
    let ran = accesses(&registry, before_run);
    let read = blobs_read(&ran);
    eprintln!("the container's start read from the registry: {ran:?}");
    assert!(
        data.iter().any(|d| read.contains(d)),
        "no data blob read while the container ran: {ran:?}"
    );
    let allowed: BTreeSet<String> = meta.iter().chain(&tables).chain(&data).cloned().collect();
    assert!(read.is_subset(&allowed), "unexpected blobs read: {ran:?}");
    for a in &ran {
        assert!(
            a.status == 200 || a.status == 206,
            "a failed registry request: {a:?}"
        );
    }
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));

    // Deleting the image: containerd's GC removes the chain (the config's
    // label held it), and with it the lazy mount goes.
    ctr.ctr(&["images", "rm", "--sync", &lazy.reference])
        .unwrap();
    let start = Instant::now();
    while !snapshot_rows(ctr, "lazypull").is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(snapshot_rows(ctr, "lazypull"), Vec::new());
    assert_eq!(content_labels(ctr, &lazy.manifest_digest), None);
    assert_eq!(content_labels(ctr, &lazy.config_digest()), None);
    let lazy_mounts = containerd::mounts_under(&stack.snap_root.join("lazy"));
    assert!(
        lazy_mounts.is_empty(),
        "lazy mounts left after the image was removed: {lazy_mounts:?}"
    );
}

#[test]
fn pull_refuses_what_it_cannot_do_lazily() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let (ordinary, lazy) = lazy_busybox(&registry);
    let containerd = Containerd::start(&dir.join("c"), &ContainerdOptions::default()).unwrap();
    let ctr = &containerd;
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // An ordinary image.
    let out = pull(ctr, &[&ordinary]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot be pulled lazily")
            && err.contains("not a lazypull image")
            && err.contains("lazypull convert"),
        "{err}"
    );

    // A snapshotter that is not lazypull's: its Prepare succeeds.
    let out = pull(ctr, &["--snapshotter", "overlayfs", &lazy.reference]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("snapshotter \"overlayfs\" is not lazypull's")
            && err.contains("Prepare of layer 0"),
        "{err}"
    );
    assert_eq!(snapshot_rows(ctr, "overlayfs"), Vec::new());
    assert_eq!(image_digest(ctr, &lazy.reference), None);

    // A snapshotter containerd does not have.
    let out = pull(ctr, &["--snapshotter", "nosuch", &lazy.reference]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("containerd has no snapshotter \"nosuch\"")
            && err.contains("snapshotter not loaded: nosuch"),
        "{err}"
    );
    assert_eq!(image_digest(ctr, &lazy.reference), None);

    // No containerd.
    let missing = dir.join("nothing.sock");
    let out = lazypull()
        .arg("pull")
        .arg("--address")
        .arg(&missing)
        .arg(&lazy.reference)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("containerd unreachable at {}", missing.display())),
        "{err}"
    );
    // Nothing of the failed pulls stays under a lease.
    let leases = ctr.ctr_stdout(&["leases", "ls", "-q"]).unwrap();
    assert_eq!(leases.trim(), "", "leases left: {leases}");
}

/// Debian's python3.11 interpreter.
const PYTHON: &str = "/usr/bin/python3.11";
/// Its standard library.
const PYTHON_LIB: &str = "/usr/lib/python3.11";

/// The shared libraries `binary` loads, as `ldd` resolves them (the loader
/// included): absolute paths.
fn shared_libraries(binary: &str) -> Vec<String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("running ldd (apt-get install libc-bin): {e}"));
    assert!(out.status.success(), "ldd {binary}: {:?}", out);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
            let l = l.trim();
            let path = match l.split_once("=> ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// Adds `path` (absolute, on the host) as a regular file with the host
/// file's bytes (symlinks followed) and parents `dirs` not yet added.
fn add_host_file(
    mut layer: lazypull_testkit::oci_image::LayerBuilder,
    dirs: &mut BTreeSet<String>,
    path: &str,
    mode: u32,
) -> lazypull_testkit::oci_image::LayerBuilder {
    let rel = path.trim_start_matches('/');
    let mut parent = String::new();
    for part in rel.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(part);
        if dirs.insert(parent.clone()) {
            layer = layer.dir(&parent, 0o755).unwrap();
        }
    }
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    layer.file(rel, &data, mode).unwrap()
}

/// What [`python_image`]'s container prints.
const PYTHON_OUTPUT: &str = "hello-python from /srv as 0; argv ['from-cmd']; \
    json {\"layers\": [1, 2, 3]}; crc 630555178; stdlib os.py found; python 3.11";

/// An image around Debian's real python3.11 (issue 12's ask), three layers:
/// the interpreter and the shared libraries it links (as `ldd` names them);
/// the standard library (`/usr/lib/python3.11` without `test` and the static
/// `config-*` directory; symlinks pointing out of it dropped), some 30 MB;
/// and the program `/srv/app.py`. Config: `Entrypoint ["/usr/bin/python3",
/// "/srv/app.py"]`, `Cmd ["from-cmd"]`, `Env` with `GREETING`,
/// `WorkingDir "/srv"`. It prints [`PYTHON_OUTPUT`].
fn python_image() -> lazypull_testkit::oci_image::Image {
    use lazypull_testkit::oci_image::{Image, LayerBuilder};
    assert!(
        Path::new(PYTHON).is_file() && Path::new(PYTHON_LIB).is_dir(),
        "{PYTHON} and {PYTHON_LIB} are needed (apt-get install python3.11)"
    );
    let mut dirs = BTreeSet::new();
    let mut runtime = add_host_file(LayerBuilder::new(), &mut dirs, PYTHON, 0o755);
    runtime = runtime.symlink("usr/bin/python3", "python3.11").unwrap();
    for lib in shared_libraries(PYTHON) {
        runtime = add_host_file(runtime, &mut dirs, &lib, 0o755);
    }
    let runtime = runtime.dir("tmp", 0o1777).unwrap().finish().unwrap();

    let mut stdlib = LayerBuilder::new()
        .dir("usr", 0o755)
        .unwrap()
        .dir("usr/lib", 0o755)
        .unwrap();
    let root = Path::new(PYTHON_LIB);
    let walk = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            !(e.depth() == 1 && (name == "test" || name.starts_with("config-")))
        });
    for entry in walk {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix("/").unwrap().to_str().unwrap();
        let kind = entry.file_type();
        if kind.is_dir() {
            stdlib = stdlib.dir(rel, 0o755).unwrap();
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path()).unwrap();
            let target = target.to_str().unwrap();
            if !target.starts_with('/') && !target.contains("..") {
                stdlib = stdlib.symlink(rel, target).unwrap();
            }
        } else if kind.is_file() {
            let data = std::fs::read(entry.path()).unwrap();
            stdlib = stdlib.file(rel, &data, 0o644).unwrap();
        }
    }
    let stdlib = stdlib.finish().unwrap();

    let app = concat!(
        "import json, os, sys, zlib\n",
        "print(f\"{os.environ['GREETING']} from {os.getcwd()} as {os.getuid()}; \"\n",
        "      f\"argv {sys.argv[1:]}; json {json.dumps({'layers': [1, 2, 3]})}; \"\n",
        "      f\"crc {zlib.crc32(b'lazypull')}; \"\n",
        "      f\"stdlib {os.path.basename(os.__file__)} found; \"\n",
        "      f\"python {sys.version_info[0]}.{sys.version_info[1]}\")\n",
    );
    let app = LayerBuilder::new()
        .dir("srv", 0o755)
        .unwrap()
        .file("srv/app.py", app.as_bytes(), 0o644)
        .unwrap()
        .finish()
        .unwrap();
    Image::new(
        vec![runtime, stdlib, app],
        serde_json::json!({
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello-python", "PYTHONDONTWRITEBYTECODE=1"],
            "Entrypoint": ["/usr/bin/python3", "/srv/app.py"],
            "Cmd": ["from-cmd"],
            "WorkingDir": "/srv",
        }),
    )
    .unwrap()
}

/// The python image, converted and pulled lazily, runs under containerd:
/// its output shows the entrypoint, command, environment and working
/// directory honoured, and the interpreter, its libraries and the stdlib
/// modules it imports read from the lazy image; the registry saw only the
/// manifest and config at pull time, data reads only once the container
/// started (their share of the data is printed).
#[test]
fn python_runs_from_a_lazily_pulled_image() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let image = python_image();
    image.push(registry.addr(), "test/python", "v1").unwrap();
    let source = format!("{}/test/python:v1", registry.addr());
    let reference = format!("{}/test/python-lazy:v1", registry.addr());
    let converted: serde_json::Value = serde_json::from_str(&ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    ))
    .unwrap();
    let manifest_digest = converted["manifest_digest"].as_str().unwrap().to_owned();

    let stack = Stack::start(dir);
    let ctr = &stack.ctr;
    let before_pull = log_len(&registry);
    ok(pull(ctr, &[&reference]), "lazypull pull");
    assert_eq!(
        image_digest(ctr, &reference).as_deref(),
        Some(manifest_digest.as_str())
    );
    let pulled = accesses(&registry, before_pull);
    assert_eq!(
        blobs_read(&pulled).len(),
        1,
        "the pull read more than the config: {pulled:?}"
    );

    let before_run = log_len(&registry);
    let out = ctr
        .ctr(&[
            "--timeout",
            "120s",
            "run",
            "--rm",
            "--snapshotter",
            "lazypull",
            &reference,
            "py1",
        ])
        .unwrap_or_else(|e| panic!("ctr run: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{PYTHON_OUTPUT}\n")
    );
    // The data layers' sizes, from the lazy manifest the registry stored.
    let hex = manifest_digest.strip_prefix("sha256:").unwrap();
    let stored = registry_dir(&registry).join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    let data: HashMap<String, u64> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == "data")
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let total: u64 = data.values().sum();
    let ran = accesses(&registry, before_run);
    let read: u64 = ran
        .iter()
        .filter(|a| {
            a.path
                .split_once("/blobs/")
                .is_some_and(|(_, d)| data.contains_key(d))
        })
        .map(|a| a.bytes)
        .sum();
    eprintln!(
        "python's start read {read} of {total} data bytes ({:.1}%) in {} registry requests",
        read as f64 * 100.0 / total as f64,
        ran.len()
    );
    // Only now, and only what the image holds. (How much of the data a
    // start reads is the daemon's readahead's business, not asserted.)
    assert!(read > 0, "no data read: {ran:?}");
    let allowed: BTreeSet<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        blobs_read(&ran).is_subset(&allowed),
        "unexpected blobs read: {ran:?}"
    );
}

/// Bytes the accesses sent of blob `digest`.
fn bytes_of(accesses: &[Access], digest: &str) -> u64 {
    accesses
        .iter()
        .filter(|a| a.path.ends_with(&format!("/blobs/{digest}")))
        .map(|a| a.bytes)
        .sum()
}

/// `--eager`: busybox plus a layer holding an 8 MiB file that no container
/// reads. Pulled without `--eager`, a container's start leaves that file's
/// data blob (nearly) unread; pulled again with `--eager` (after `ctr
/// images rm --sync` removed the chain), the next container's start has the
/// daemon fetch all of it in the background while the container sleeps.
#[test]
fn eager_pull_prefetches_the_whole_image() {
    use lazypull_testkit::oci_image::{Image, LayerBuilder};
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    // Incompressible, deterministic.
    let mut big = Vec::with_capacity(8 << 20);
    let mut block = Sha256::digest(b"lazypull eager").to_vec();
    while big.len() < 8 << 20 {
        block = Sha256::digest(&block).to_vec();
        big.extend_from_slice(&block);
    }
    let mut layers = busybox_image().unwrap().layers;
    layers.push(
        LayerBuilder::new()
            .dir("data", 0o755)
            .unwrap()
            .file("data/unread", &big, 0o644)
            .unwrap()
            .finish()
            .unwrap(),
    );
    let image = Image::new(
        layers,
        serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}),
    )
    .unwrap();
    image.push(registry.addr(), "test/eager", "v1").unwrap();
    let source = format!("{}/test/eager:v1", registry.addr());
    let reference = format!("{}/test/eager-lazy:v1", registry.addr());
    ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    );
    let stack = Stack::start(dir);
    let ctr = &stack.ctr;

    // Without --eager.
    let start = log_len(&registry);
    ok(pull(ctr, &[&reference]), "lazypull pull");
    let manifest_digest = image_digest(ctr, &reference).unwrap();
    let hex = manifest_digest.strip_prefix("sha256:").unwrap();
    let stored = registry_dir(&registry).join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    // The big file's data blob: the largest data layer.
    let (unread, size) = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == "data")
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .max_by_key(|(_, size)| *size)
        .unwrap();
    assert!(size >= 8 << 20, "{unread} is {size} bytes");
    let run = |id: &str, args: &[&str]| {
        let mut all = vec![
            "--timeout",
            "60s",
            "run",
            "--snapshotter",
            "lazypull",
            &reference,
            id,
        ];
        all.splice(3..3, args.iter().copied());
        ctr.ctr(&all)
            .unwrap_or_else(|e| panic!("ctr run {id}: {e}"));
    };
    run("c1", &["--rm"]);
    let lazily = bytes_of(&accesses(&registry, start), &unread);
    eprintln!("without --eager: {lazily} of {size} bytes of the unread file's blob fetched");
    assert!(
        lazily < size / 2,
        "without --eager, {lazily} of the {size} bytes of the unread file's blob were fetched"
    );

    // With --eager, afresh.
    ctr.ctr(&["images", "rm", "--sync", &reference]).unwrap();
    assert_eq!(snapshot_rows(ctr, "lazypull"), Vec::new());
    ok(pull(ctr, &["--eager", &reference]), "lazypull pull --eager");
    run("c2", &["-d"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fetched = bytes_of(&accesses(&registry, start), &unread);
        if fetched >= size {
            eprintln!("with --eager: {fetched} of {size} bytes fetched");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with --eager, only {fetched} of the {size} bytes of the unread file's blob were fetched after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
