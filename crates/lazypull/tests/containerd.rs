//! Ordinary OCI images under a real containerd (Debian's 1.6) and runc, pulled
//! from a real `docker-registry` on 127.0.0.1:
//!
//! - `ordinary_image_runs_under_lazypull_snapshotter`: `lazypull snapshotter`
//!   as containerd's proxy snapshotter `lazypull`; `ctr image pull` unpacks
//!   into it, `ctr run` runs the image (its entrypoint, command, environment,
//!   working directory and stacked layers honoured), and after a SIGKILL of
//!   the snapshotter and a restart on the same root the committed snapshots
//!   still start a second container.
//! - `ordinary_image_runs_under_builtin_overlayfs`: the same run with
//!   containerd's own overlayfs snapshotter, the reference that shows what
//!   the image gives and that the harness itself works.
//! - `dist_containerd_snippet_is_accepted`: `dist/containerd-lazypull.toml`
//!   parses, and containerd 1.6 (CRI plugin on) makes of it a proxy
//!   snapshotter `lazypull` and CRI's `snapshotter = "lazypull"` with
//!   snapshot annotations on.
//!
//! - `a_lazy_image_is_fetched_whole_and_refused_by_name_without_lazypull`:
//!   what a runtime without lazypull makes of a lazy image: it fetches it, and
//!   refuses to unpack it, naming the layer media type.
//!
//! Needs root (containerd mounts, runc). A missing containerd, runc,
//! docker-registry or busybox-static fails the test naming the package.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazypull_testkit::containerd::{self, Containerd, ContainerdOptions};
use lazypull_testkit::containerd::{chain_ids, snapshot_rows};
use lazypull_testkit::oci_image::{busybox_image, BUSYBOX_IMAGE_OUTPUT};
use lazypull_testkit::registry::RegistryServer;

const REPOSITORY: &str = "test/busybox";
const TAG: &str = "v1";

fn temp_dir() -> tempfile::TempDir {
    // Short: the containerd and snapshotter sockets live in it.
    tempfile::Builder::new()
        .prefix("lpctrd")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// A `lazypull snapshotter` process; killed, reaped and its mounts undone
/// when dropped.
struct Snapshotter {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Snapshotter {
    fn start(root: &Path, socket: &Path, log: &Path) -> Snapshotter {
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("snapshotter log");
        let child = Command::new(env!("CARGO_BIN_EXE_lazypull"))
            .arg("snapshotter")
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(socket)
            .env("LAZYPULL_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .expect("starting lazypull snapshotter");
        let mut s = Snapshotter {
            child: Some(child),
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        s.wait_ready(Duration::from_secs(20));
        s
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "lazypull snapshotter exited with {status} during start; its log ends:\n{}",
                    self.log_tail()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "lazypull snapshotter did not listen on {} within {limit:?}; its log ends:\n{}",
            self.socket.display(),
            self.log_tail()
        );
    }

    /// Panics if the snapshotter has exited.
    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("snapshotter started");
        if let Some(status) = child.try_wait().unwrap() {
            self.child = None;
            panic!(
                "lazypull snapshotter exited with {status}; its log ends:\n{}",
                self.log_tail()
            );
        }
    }

    /// SIGKILL, reaped.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL the snapshotter");
            child.wait().expect("reaping the snapshotter");
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lazypull snapshotter's log ({}) ends:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        self.kill9();
        containerd::unmount_under(&self.root);
    }
}

/// Waits until containerd reaches a restarted proxy snapshotter again: its
/// gRPC connection fails fast ("unavailable") while it waits to redial
/// (containerd 1.6 backs off up to 3 s between tries).
fn reconnected(ctr: &Containerd, snapshotter: &str) {
    let start = Instant::now();
    loop {
        let out = ctr
            .ctr_raw(&["snapshots", "--snapshotter", snapshotter, "ls"])
            .unwrap();
        if out.status.success() {
            eprintln!(
                "containerd reached the restarted snapshotter {snapshotter} after {:?}",
                start.elapsed()
            );
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unavailable") && start.elapsed() < Duration::from_secs(15),
            "containerd did not reach the restarted snapshotter {snapshotter} within {:?}: {err}\ncontainerd's log ends:\n{}",
            start.elapsed(),
            ctr.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `ctr snapshots ls` rows of a committed chain (sorted).
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

/// Runs the image as container `id` (`ctr run --rm`) and returns its output.
fn run(ctr: &Containerd, snapshotter: &str, image: &str, id: &str) -> String {
    let out = ctr
        .ctr(&[
            "--timeout",
            "60s",
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            image,
            id,
        ])
        .unwrap_or_else(|e| panic!("container {id}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pushes the busybox image, pulls it into `snapshotter`, runs it, checks the
/// committed chain; `between` runs between the first and the second
/// container (the lazypull variant kills and restarts its snapshotter there).
fn pull_and_run(
    ctr: &Containerd,
    registry: &RegistryServer,
    snapshotter: &str,
    between: &mut dyn FnMut(),
) -> (String, Vec<String>) {
    let image = busybox_image().unwrap();
    image.push(registry.addr(), REPOSITORY, TAG).unwrap();
    let reference = format!("{}/{REPOSITORY}:{TAG}", registry.addr());
    ctr.ctr(&[
        "--timeout",
        "60s",
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        snapshotter,
        &reference,
    ])
    .unwrap();
    let listed = ctr.ctr_stdout(&["images", "ls", "-q"]).unwrap();
    assert!(
        listed.lines().any(|l| l.trim() == reference),
        "{reference} not in `ctr images ls`:\n{listed}"
    );

    let expected = format!("{BUSYBOX_IMAGE_OUTPUT}\n");
    assert_eq!(run(ctr, snapshotter, &reference, "c1"), expected);

    // The committed chain, one snapshot per layer, named by chain id; the
    // container's active snapshot is gone with --rm.
    let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain = chain_ids(&diff_ids);
    let committed = |ctr: &Containerd| {
        assert_eq!(snapshot_rows(ctr, snapshotter), committed_rows(&chain));
    };
    committed(ctr);

    between();

    committed(ctr);
    assert_eq!(run(ctr, snapshotter, &reference, "c2"), expected);
    committed(ctr);
    (reference, chain)
}

#[test]
fn ordinary_image_runs_under_builtin_overlayfs() {
    let tmp = temp_dir();
    let registry = RegistryServer::start(&tmp.path().join("registry"), None).unwrap();
    let ctr = Containerd::start(&tmp.path().join("c"), &ContainerdOptions::default()).unwrap();
    pull_and_run(&ctr, &registry, "overlayfs", &mut || {});
}

#[test]
fn ordinary_image_runs_under_lazypull_snapshotter() {
    let tmp = temp_dir();
    let registry = RegistryServer::start(&tmp.path().join("registry"), None).unwrap();
    let root = tmp.path().join("snap");
    let socket = tmp.path().join("snap.sock");
    let log = tmp.path().join("snapshotter.log");
    // Declared before containerd: dropped after it (containerd removes its
    // containers' snapshots through the snapshotter).
    let mut snap = Snapshotter::start(&root, &socket, &log);
    // Least privilege: state root-only, the socket for root (and perhaps a
    // group), never for everyone.
    for (path, forbidden) in [(&root, 0o077), (&socket, 0o007)] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & forbidden, 0, "{} is mode {mode:o}", path.display());
    }
    let ctr = Containerd::start(
        &tmp.path().join("c"),
        &ContainerdOptions {
            proxy_snapshotters: vec![("lazypull".into(), socket.clone())],
            ..ContainerdOptions::default()
        },
    )
    .unwrap();
    let (reference, chain) = pull_and_run(&ctr, &registry, "lazypull", &mut || {
        snap.kill9();
        snap = Snapshotter::start(&root, &socket, &log);
        reconnected(&ctr, "lazypull");
    });

    // An active snapshot across a SIGKILL: a running container keeps running
    // (its overlay is the kernel's), and after the restart its snapshot is
    // still listed and removed when the container is.
    ctr.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "lazypull",
        &reference,
        "c3",
        "/bin/sleep",
        "1000",
    ])
    .unwrap();
    snap.kill9();
    snap = Snapshotter::start(&root, &socket, &log);
    reconnected(&ctr, "lazypull");
    let rows = snapshot_rows(&ctr, "lazypull");
    assert!(
        rows.contains(&("c3".to_string(), chain[1].clone(), "Active".to_string())),
        "c3's active snapshot is not listed after the restart: {rows:?}"
    );
    let tasks = ctr.ctr_stdout(&["tasks", "ls"]).unwrap();
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("c3 ") && l.contains("RUNNING")),
        "c3 stopped running across the snapshotter's restart:\n{tasks}"
    );
    ctr.ctr(&["tasks", "kill", "-s", "SIGKILL", "c3"]).unwrap();
    ctr.ctr(&["--timeout", "20s", "tasks", "delete", "-f", "c3"])
        .unwrap();
    ctr.ctr(&["containers", "delete", "c3"]).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(snapshot_rows(&ctr, "lazypull"), committed_rows(&chain));
    snap.assert_running();
    // Everything went to the lazypull snapshotter, nothing to overlayfs.
    assert_eq!(snapshot_rows(&ctr, "overlayfs"), Vec::new());
}

/// The harness's own teardown: dropping [`Containerd`] with a container still
/// running kills the container and its shim, undoes the container's rootfs
/// and the snapshot mounts, and removes containerd's root and state.
#[test]
fn containerd_teardown_kills_running_containers_and_unmounts() {
    let tmp = temp_dir();
    let registry = RegistryServer::start(&tmp.path().join("registry"), None).unwrap();
    let image = busybox_image().unwrap();
    image.push(registry.addr(), REPOSITORY, TAG).unwrap();
    let reference = format!("{}/{REPOSITORY}:{TAG}", registry.addr());
    let dir = tmp.path().join("c");
    let ctr = Containerd::start(&dir, &ContainerdOptions::default()).unwrap();
    ctr.ctr(&["images", "pull", "--plain-http", &reference])
        .unwrap();
    ctr.ctr(&["run", "-d", &reference, "sleeper", "/bin/sleep", "1000"])
        .unwrap();
    let tasks = ctr.ctr_stdout(&["tasks", "ls"]).unwrap();
    let pid: i32 = tasks
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&"sleeper") && cols.get(2) == Some(&"RUNNING"))
                .then(|| cols[1].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("sleeper not running:\n{tasks}"));
    assert!(!containerd::process_gone(pid));
    let address = ctr.address().to_string_lossy().into_owned();
    assert!(
        !containerd::processes_mentioning(&address).is_empty(),
        "no shim found for {address}"
    );
    assert!(
        !containerd::mounts_under(&dir).is_empty(),
        "the running container's rootfs is not mounted under {}",
        dir.display()
    );
    drop(ctr);
    assert!(
        containerd::process_gone(pid),
        "container process {pid} survived"
    );
    assert_eq!(
        containerd::processes_mentioning(&address),
        Vec::<i32>::new()
    );
    assert_eq!(containerd::mounts_under(&dir), Vec::<PathBuf>::new());
    assert!(!dir.join("root").exists() && !dir.join("state").exists());
}

fn dist_snippet() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/containerd-lazypull.toml")
}

/// `table.a.b.c` of a TOML document.
fn toml_at<'a>(doc: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
    path.iter().try_fold(doc, |v, k| v.get(k))
}

fn check_lazypull_settings(doc: &toml::Value, what: &str) {
    let proxy = ["proxy_plugins", "lazypull"];
    let cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
    let get = |path: &[&str]| {
        toml_at(doc, path).unwrap_or_else(|| panic!("{what}: no {} in:\n{doc}", path.join(".")))
    };
    assert_eq!(
        get(&[&proxy[..], &["type"]].concat()).as_str(),
        Some("snapshot"),
        "{what}"
    );
    assert_eq!(
        get(&[&proxy[..], &["address"]].concat()).as_str(),
        Some("/run/lazypull/snapshotter.sock"),
        "{what}"
    );
    assert_eq!(
        get(&[&cri[..], &["snapshotter"]].concat()).as_str(),
        Some("lazypull"),
        "{what}"
    );
    assert_eq!(
        get(&[&cri[..], &["disable_snapshot_annotations"]].concat()).as_bool(),
        Some(false),
        "{what}"
    );
}

#[test]
fn dist_containerd_snippet_is_accepted() {
    let snippet = dist_snippet();
    let text = std::fs::read_to_string(&snippet).unwrap();
    let doc: toml::Value = toml::from_str(&text).expect("dist/containerd-lazypull.toml is TOML");
    check_lazypull_settings(&doc, "the snippet");

    let tmp = temp_dir();
    let opts = ContainerdOptions {
        cri: true,
        imports: vec![snippet.canonicalize().unwrap()],
        ..ContainerdOptions::default()
    };
    // What containerd makes of the generated config with the snippet
    // imported: a misspelt key would leave the default there.
    let dump = containerd::config_dump(&tmp.path().join("dump"), &opts).unwrap();
    let merged: toml::Value = toml::from_str(&dump).expect("containerd's config dump is TOML");
    check_lazypull_settings(&merged, "containerd's config dump");

    // And a daemon with it: the proxy plugin is loaded, and the CRI plugin
    // (which reads the CRI settings) starts.
    let ctr = Containerd::start(&tmp.path().join("c"), &opts).unwrap();
    let plugins = ctr.ctr_stdout(&["plugins", "ls"]).unwrap();
    let row = |kind: &str, id: &str| {
        plugins
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.len() >= 4 && cols[0] == kind && cols[1] == id)
            .map(|cols| cols[3].to_string())
    };
    assert_eq!(
        row("io.containerd.snapshotter.v1", "lazypull").as_deref(),
        Some("ok"),
        "proxy snapshotter lazypull not loaded:\n{plugins}"
    );
    assert_eq!(
        row("io.containerd.grpc.v1", "cri").as_deref(),
        Some("ok"),
        "CRI plugin not running with the snippet:\n{plugins}\ncontainerd's log ends:\n{}",
        ctr.log_tail(30)
    );
}

/// A lazy image made by `lazypull convert` from the ordinary busybox image,
/// in front of containerd without lazypull's remote snapshots: containerd's
/// content handling takes it whole (`ctr content fetch`: manifest, config,
/// every layer, each checked against its digest), and unpacking it fails,
/// naming lazypull's layer media type, rather than unpacking anything: the
/// layers' media types carry the OCI layer prefix (so containerd treats them
/// as layers and hands their annotations to a snapshotter) but no base type
/// containerd can decompress. No snapshot is left behind.
#[test]
fn a_lazy_image_is_fetched_whole_and_refused_by_name_without_lazypull() {
    let tmp = temp_dir();
    let registry = RegistryServer::start(&tmp.path().join("registry"), None).unwrap();
    let image = busybox_image().unwrap();
    image.push(registry.addr(), REPOSITORY, TAG).unwrap();
    let source = format!("{}/{REPOSITORY}:{TAG}", registry.addr());
    let lazy = format!("{}/test/busybox-lazy:{TAG}", registry.addr());
    let out = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(["convert", &source, &lazy, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lazypull convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ctr = Containerd::start(&tmp.path().join("c"), &ContainerdOptions::default()).unwrap();
    ctr.ctr(&[
        "--timeout",
        "60s",
        "content",
        "fetch",
        "--plain-http",
        &lazy,
    ])
    .unwrap();
    // Everything the manifest names is now in containerd's content store.
    let content = ctr.ctr_stdout(&["content", "ls", "-q"]).unwrap();
    let out = ctr
        .ctr_raw(&["--timeout", "60s", "images", "pull", "--plain-http", &lazy])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "containerd unpacked a lazy image with its overlayfs snapshotter:\n{stderr}"
    );
    assert!(
        stderr.contains("application/vnd.oci.image.layer.lazypull.meta.v2")
            && stderr.contains("no processor for media-type"),
        "containerd's refusal does not name lazypull's media type:\n{stderr}"
    );
    eprintln!("containerd without lazypull says: {}", stderr.trim());
    assert_eq!(
        snapshot_rows(&ctr, "overlayfs")
            .into_iter()
            .filter(|(_, _, kind)| kind == "Committed")
            .count(),
        0,
        "a lazy layer was committed as an ordinary snapshot"
    );
    // Every layer and the config were fetched into the content store.
    let manifest: serde_json::Value = serde_json::from_slice(
        &ctr.ctr(&["content", "get", &manifest_digest(&ctr, &lazy)])
            .unwrap()
            .stdout,
    )
    .unwrap();
    let mut wanted = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in manifest["layers"].as_array().unwrap() {
        assert!(
            layer["mediaType"]
                .as_str()
                .unwrap()
                .starts_with("application/vnd.oci.image.layer."),
            "{layer}"
        );
        wanted.push(layer["digest"].as_str().unwrap().to_owned());
    }
    for digest in wanted {
        assert!(
            content.lines().any(|l| l.trim() == digest),
            "{digest} is not in containerd's content store:\n{content}"
        );
    }
}

/// The manifest digest `ctr images ls` records for `reference`.
fn manifest_digest(ctr: &Containerd, reference: &str) -> String {
    let listed = ctr.ctr_stdout(&["images", "ls"]).unwrap();
    listed
        .lines()
        .find(|l| l.starts_with(&format!("{reference} ")))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{listed}"))
        .to_owned()
}
