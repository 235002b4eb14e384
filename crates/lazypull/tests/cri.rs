//! Kubernetes' path into containerd: the CRI API (`runtime.v1`) of Debian's
//! containerd 1.6 with `snapshotter = "lazypull"` and snapshot annotations
//! on, driven by testkit's CRI client the way kubelet drives it (there is no
//! kubelet or crictl in Debian bookworm). Pods use the host's network (no
//! CNI) and a sandbox image the test builds from busybox and pushes to the
//! loopback registry, reached over plain HTTP through a `hosts.toml`.
//!
//! - `cri_runs_an_ordinary_image_under_lazypull_snapshotter`: CRI PullImage
//!   unpacks an ordinary image into `lazypull snapshotter`, a host-network
//!   pod runs it, its CRI log holds the image's output, ImageFsInfo sums the
//!   snapshotter's usage, and RemoveImage lets containerd's GC remove its
//!   snapshots.
//! - `cri_pulls_a_lazy_image_lazily_and_runs_it`: the same with the image
//!   converted by `lazypull convert`, `lazypull daemon` (FUSE) serving it
//!   and the snapshotter pointed at the daemon: the pull moves no data blob
//!   (the registry's access log), the committed snapshots carry the CRI
//!   plugin's `containerd.io/snapshot/cri.image-ref`, and a pod runs it.
//! - `cri_runs_the_python_image_lazily`: issue 12's real program, testkit's
//!   python image (Debian's python3.11 with its libraries and standard
//!   library), converted, pulled lazily by PullImage (no data blob moves)
//!   and run in a pod with the image config's entrypoint, command,
//!   environment and working directory: its CRI log is the line the
//!   program prints.
//!
//! Needs root (containerd mounts, runc; FUSE for the daemon). A missing
//! containerd, runc, docker-registry, busybox-static or python3.11 fails the
//! test naming the package.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazypull_testkit::containerd::chain_ids;
use lazypull_testkit::containerd::{self, Containerd, ContainerdOptions, CriSettings};
use lazypull_testkit::cri::{self, Cri};
use lazypull_testkit::oci_image::{busybox_image, BUSYBOX_IMAGE_OUTPUT};
use lazypull_testkit::python_image::{python_image, PYTHON_OUTPUT};
use lazypull_testkit::registry::RegistryServer;

/// containerd's namespace for everything the CRI plugin makes.
const K8S_NAMESPACE: &str = "k8s.io";

fn temp_dir() -> tempfile::TempDir {
    // Short: the containerd and snapshotter sockets live in it.
    tempfile::Builder::new()
        .prefix("lpcri")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until something listens on unix socket `socket`, or panics
/// naming `what` and its log, also if `child` exits first.
fn wait_listening(child: &mut Child, socket: &Path, what: &str, log: &Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{what} exited with {status} during start; its log ends:\n{}",
                tail(log, 20)
            );
        }
        if UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{what} did not listen on {} within 20 s; its log ends:\n{}",
        socket.display(),
        tail(log, 20)
    );
}

/// A `lazypull` process (snapshotter or daemon); killed, reaped and the
/// mounts under `mounts` undone when dropped.
struct Process {
    child: Child,
    what: &'static str,
    log: PathBuf,
    /// Undone when dropped; None once [`Process::kill`] let it die as a
    /// crash would.
    mounts: Option<PathBuf>,
}

impl Process {
    fn start(
        what: &'static str,
        mut cmd: Command,
        socket: &Path,
        log: &Path,
        mounts: &Path,
    ) -> Self {
        let logfile = std::fs::File::create(log).expect("log file");
        let mut child = cmd
            .env(
                "LAZYPULL_LOG",
                "info,lazypull=debug,lazypull_snapshotter=debug",
            )
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        wait_listening(&mut child, socket, what, log);
        Process {
            child,
            what,
            log: log.to_path_buf(),
            mounts: Some(mounts.to_path_buf()),
        }
    }

    /// SIGKILL, as a crash: its mounts are left as they are (for a
    /// successor to take over).
    fn kill(mut self) {
        self.mounts = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}'s log ({}) ends:\n{}",
                self.what,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(m) = &self.mounts {
            containerd::unmount_under(m);
        }
    }
}

fn lazypull() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
}

/// `lazypull snapshotter` on `root`, listening on `socket`, with the daemon's
/// control socket if given.
fn snapshotter(root: &Path, socket: &Path, log: &Path, daemon: Option<&Path>) -> Process {
    let mut cmd = lazypull();
    cmd.arg("snapshotter")
        .arg("--root")
        .arg(root)
        .arg("--address")
        .arg(socket);
    if let Some(d) = daemon {
        cmd.arg("--daemon-socket").arg(d);
    }
    Process::start("lazypull snapshotter", cmd, socket, log, root)
}

/// `lazypull daemon` over FUSE with everything under `dir`; its control
/// socket is `dir/run/ctl.sock`.
fn daemon(dir: &Path) -> Process {
    daemon_logged(dir, "daemon.log")
}

/// [`daemon`], logging to `dir/<log>`.
fn daemon_logged(dir: &Path, log: &str) -> Process {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(&config, "retries = 1\n").unwrap();
    let mut cmd = lazypull();
    // No credentials but those the test gives: not the host's docker config.
    let docker_config = dir.join("docker");
    std::fs::create_dir_all(&docker_config).unwrap();
    cmd.env("DOCKER_CONFIG", &docker_config);
    cmd.arg("daemon")
        .arg("--config")
        .arg(&config)
        .args(["--transport", "fuse"])
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
        .arg("--fd-store")
        .arg(dir.join("run/fdstore.sock"));
    Process::start(
        "lazypull daemon",
        cmd,
        &dir.join("run/ctl.sock"),
        &dir.join(log),
        dir,
    )
}

/// The pods' parent cgroup (cgroupfs syntax) and, when dropped, the removal
/// of its (by then empty) directories in every cgroup hierarchy.
struct CgroupParent(String);

impl CgroupParent {
    fn new(test: &str) -> CgroupParent {
        CgroupParent(format!("/lazypull-{test}-{}", std::process::id()))
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let rel = self.0.trim_start_matches('/');
        let mut dirs = vec![PathBuf::from("/sys/fs/cgroup").join(rel)];
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            dirs.extend(entries.flatten().map(|e| e.path().join(rel)));
        }
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The committed snapshots (names) of the CRI namespace in `lazypull`.
fn committed_snapshots(ctr: &Containerd) -> Vec<String> {
    let text = ctr
        .ctr_stdout(&[
            "-n",
            K8S_NAMESPACE,
            "snapshots",
            "--snapshotter",
            "lazypull",
            "ls",
        ])
        .unwrap();
    text.lines()
        .skip(1)
        .filter(|l| l.trim_end().ends_with("Committed"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Polls until `cond` holds, up to `limit`; false if it never did.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The CRI settings of these tests: `sandbox` as the sandbox image, the
/// registry over plain HTTP, lazypull with annotations.
fn cri_options(registry: &RegistryServer, sandbox: &str, socket: &Path) -> ContainerdOptions {
    ContainerdOptions {
        proxy_snapshotters: vec![("lazypull".into(), socket.to_path_buf())],
        cri_settings: Some(CriSettings {
            sandbox_image: Some(sandbox.into()),
            plain_http_registries: vec![registry.addr().to_string()],
            snapshotter: Some("lazypull".into()),
            snapshot_annotations: true,
            // Root here lacks CAP_SYS_RESOURCE: runc could not give the
            // sandbox the oom_score_adj of -998 CRI asks for.
            restrict_oom_score_adj: true,
        }),
        ..ContainerdOptions::default()
    }
}

/// Pushes the sandbox image: its reference.
fn push_sandbox(registry: &RegistryServer) -> String {
    cri::sandbox_image()
        .unwrap()
        .push(registry.addr(), "test/pause", "v1")
        .unwrap();
    format!("{}/test/pause:v1", registry.addr())
}

/// Runs `image` (its own entrypoint, command, environment and working
/// directory: no override) as container `main` in a new host-network pod
/// (name, log directory, parent cgroup), waits for its exit, checks it
/// exited 0 and its CRI log holds exactly the one stdout line `output`,
/// then stops and removes the pod.
fn run_in_pod(
    cri: &mut Cri,
    ctr: &Containerd,
    image: &str,
    (pod, logs, cgroup): (&str, &Path, &CgroupParent),
    output: &str,
) {
    let pod_config = cri::host_network_pod(pod, logs, &cgroup.0);
    let pod_id = cri
        .run_pod(&pod_config)
        .unwrap_or_else(|e| panic!("{e}\ncontainerd's log ends:\n{}", ctr.log_tail(30)));
    let status = cri.pod_status(&pod_id).unwrap();
    assert_eq!(
        status.state,
        cri::proto::PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    let config = cri::container_config("main", image, &[], "main.log");
    let id = cri
        .create_and_start(&pod_id, &config, &pod_config)
        .unwrap_or_else(|e| panic!("{e}\ncontainerd's log ends:\n{}", ctr.log_tail(30)));
    let code = cri.wait_exit(&id, Duration::from_secs(60)).unwrap();
    let status = cri.container_status(&id).unwrap();
    let log = cri::read_log(&logs.join("main.log")).unwrap();
    assert_eq!(code, 0, "container {id} failed: {status:?}\nlog: {log:?}");
    assert_eq!(status.log_path, logs.join("main.log").to_str().unwrap());
    let lines: Vec<(&str, &str)> = log
        .iter()
        .map(|l| (l.stream.as_str(), l.text.as_str()))
        .collect();
    assert_eq!(lines, [("stdout", output)], "{log:?}");

    let listed = cri.list_containers(Some(&pod_id)).unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    cri.remove_container(&id).unwrap();
    cri.stop_pod(&pod_id).unwrap();
    cri.remove_pod(&pod_id).unwrap();
    assert!(cri.list_containers(Some(&pod_id)).unwrap().is_empty());
}

/// ImageFsInfo answers one image file system, with the snapshotter's usage
/// summed in (containerd refreshes it every 10 s) and at least `min` bytes.
fn check_image_fs(cri: &mut Cri, ctr: &Containerd, min: u64) {
    let mut last = Vec::new();
    let ok = eventually(Duration::from_secs(25), || {
        last = cri.image_fs_info().unwrap();
        last.len() == 1 && last[0].used_bytes.as_ref().is_some_and(|u| u.value >= min)
    });
    assert!(ok, "ImageFsInfo: {last:?}");
    let fs = &last[0];
    let mountpoint = fs.fs_id.as_ref().map(|f| f.mountpoint.clone());
    eprintln!("ImageFsInfo: {fs:?}");
    assert_eq!(
        mountpoint.as_deref().map(Path::new),
        Some(
            ctr.config_path()
                .parent()
                .unwrap()
                .join("root/io.containerd.snapshotter.v1.lazypull")
                .as_path()
        ),
        "{fs:?}"
    );
    assert!(fs.timestamp > 0, "{fs:?}");
}

#[test]
fn cri_runs_an_ordinary_image_under_lazypull_snapshotter() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let image = busybox_image().unwrap();
    image.push(registry.addr(), "test/busybox", "v1").unwrap();
    let reference = format!("{}/test/busybox:v1", registry.addr());
    let sandbox = push_sandbox(&registry);

    let cgroup = CgroupParent::new("cri-ordinary");
    let socket = dir.join("snap.sock");
    let _snap = snapshotter(&dir.join("snap"), &socket, &dir.join("snap.log"), None);
    let ctr =
        Containerd::start(&dir.join("c"), &cri_options(&registry, &sandbox, &socket)).unwrap();
    let mut cri = Cri::connect(ctr.address()).unwrap();
    let version = cri.version().unwrap();
    assert_eq!(version.runtime_name, "containerd", "{version:?}");
    assert_eq!(version.runtime_api_version, "v1", "{version:?}");

    // PullImage: containerd's image id is the config digest; the image is
    // unpacked into lazypull, one committed snapshot per layer.
    assert!(cri.image_status(&reference).unwrap().is_none());
    let id = cri
        .pull_image(&reference)
        .unwrap_or_else(|e| panic!("{e}\ncontainerd's log ends:\n{}", ctr.log_tail(30)));
    assert_eq!(id, image.config_digest());
    let status = cri.image_status(&reference).unwrap().expect("pulled image");
    assert_eq!(status.id, id);
    assert!(status.repo_tags.contains(&reference), "{status:?}");
    assert!(status.size > 0, "{status:?}");
    let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain = chain_ids(&diff_ids);
    let committed = committed_snapshots(&ctr);
    for c in &chain {
        assert!(
            committed.contains(c),
            "{c} not committed in lazypull: {committed:?}"
        );
    }
    // containerd read the registry's hosts.toml (plain HTTP by config, not
    // by its loopback default).
    let hosts_dir = dir.join("c/certs.d").join(registry.addr().to_string());
    let log = std::fs::read_to_string(ctr.log_path()).unwrap();
    assert!(
        log.lines().any(
            |l| l.contains("loading host directory") && l.contains(hosts_dir.to_str().unwrap())
        ),
        "containerd did not load {}",
        hosts_dir.display()
    );

    let logs = dir.join("pods/busybox");
    run_in_pod(
        &mut cri,
        &ctr,
        &reference,
        ("busybox", &logs, &cgroup),
        BUSYBOX_IMAGE_OUTPUT,
    );
    // The sandbox image, pulled by RunPodSandbox, is unpacked into lazypull too.
    assert!(cri.image_status(&sandbox).unwrap().is_some());

    // The busybox binary alone is over 1 MB of the snapshots' usage.
    check_image_fs(&mut cri, &ctr, 1 << 20);

    // RemoveImage: containerd's GC removes the image's snapshots from
    // lazypull.
    cri.remove_image(&reference).unwrap();
    assert!(cri.image_status(&reference).unwrap().is_none());
    let top = chain.last().unwrap().clone();
    let mut left = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            left = committed_snapshots(&ctr);
            !left.contains(&top)
        }),
        "the removed image's top snapshot {top} is still in lazypull: {left:?}"
    );
}

/// A blob's bytes in the registry's storage (docker-registry's filesystem
/// driver layout).
fn registry_blob(registry_dir: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let path = registry_dir.join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The manifest tagged `tag` in `repository`, from the registry's storage.
fn registry_manifest(registry_dir: &Path, repository: &str, tag: &str) -> serde_json::Value {
    let link = registry_dir.join(format!(
        "data/docker/registry/v2/repositories/{repository}/_manifests/tags/{tag}/current/link"
    ));
    let digest = std::fs::read_to_string(&link).unwrap();
    serde_json::from_slice(&registry_blob(registry_dir, digest.trim())).unwrap()
}

/// The registry's access log: its standard output, which testkit keeps
/// beside its log.
fn access_log(registry: &RegistryServer) -> PathBuf {
    registry.log_path().with_file_name("registry.stdout")
}

/// The registry access log's request lines from byte `from` on that name
/// `repository`'s blobs: (method, digest).
fn blob_requests(
    registry: &RegistryServer,
    from: usize,
    repository: &str,
) -> Vec<(String, String)> {
    let text = std::fs::read(access_log(registry)).unwrap();
    let text = String::from_utf8_lossy(&text[from.min(text.len())..]).into_owned();
    let prefix = format!("/v2/{repository}/blobs/");
    let mut out = Vec::new();
    for line in text.lines() {
        // Access lines: ... "GET /v2/REPO/blobs/sha256:... HTTP/1.1" 200 ...
        let Some(start) = line.find('"') else {
            continue;
        };
        let mut words = line[start + 1..].split_whitespace();
        let (Some(method), Some(path)) = (words.next(), words.next()) else {
            continue;
        };
        if let Some(digest) = path.strip_prefix(&prefix) {
            out.push((method.to_string(), digest.to_string()));
        }
    }
    out
}

/// An image converted by `lazypull convert` and pushed: what the tests
/// check it against, read from the registry's storage.
struct LazyImage {
    /// Its reference.
    reference: String,
    /// Its repository in the registry.
    repository: String,
    /// Its config's digest: containerd's image id.
    config_digest: String,
    /// The digests of its data layers (the file contents).
    data_blobs: Vec<String>,
    /// The chain ids of its layers: the committed snapshots' names.
    chain: Vec<String>,
}

/// Converts `source` (pushed to `registry`) with `lazypull convert` into
/// `lazy_repo:v1` and reads the result back from the registry's storage.
fn convert(registry: &RegistryServer, source: &str, lazy_repo: &str) -> LazyImage {
    let registry_dir = registry_dir(registry);
    let reference = format!("{}/{lazy_repo}:v1", registry.addr());
    let out = lazypull()
        .args(["convert", source, &reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lazypull convert {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = registry_manifest(&registry_dir, lazy_repo, "v1");
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let config: serde_json::Value =
        serde_json::from_slice(&registry_blob(&registry_dir, &config_digest)).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let role = |l: &serde_json::Value| {
        l["annotations"]["containerd.io/snapshot/lazypull.role"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let data_blobs: Vec<String> = layers
        .iter()
        .filter(|l| role(l) == "data")
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(!data_blobs.is_empty(), "no data layer in {manifest}");
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    LazyImage {
        reference,
        repository: lazy_repo.to_owned(),
        config_digest,
        data_blobs,
        chain: chain_ids(&diff_ids),
    }
}

/// The registry's directory (the one it was started on), where testkit
/// keeps its log.
fn registry_dir(registry: &RegistryServer) -> PathBuf {
    registry.log_path().parent().unwrap().to_path_buf()
}

/// Fails unless `lazypull snapshotter` can serve remote snapshots.
fn require_remote_snapshots() {
    let help = lazypull().args(["snapshotter", "--help"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--daemon-socket"),
        "`lazypull snapshotter` has no --daemon-socket: remote snapshots are not built yet"
    );
}

/// `lazypull daemon`, `lazypull snapshotter` pointed at it and containerd's
/// CRI over them, all under `dir`; dropped in reverse order (containerd
/// first).
struct LazyStack {
    ctr: Containerd,
    _snap: Process,
    _daemon: Process,
}

impl LazyStack {
    fn start(dir: &Path, registry: &RegistryServer, sandbox: &str) -> LazyStack {
        let daemon_dir = dir.join("d");
        let daemon = daemon(&daemon_dir);
        let socket = dir.join("snap.sock");
        let snap = snapshotter(
            &dir.join("snap"),
            &socket,
            &dir.join("snap.log"),
            Some(&daemon_dir.join("run/ctl.sock")),
        );
        let ctr =
            Containerd::start(&dir.join("c"), &cri_options(registry, sandbox, &socket)).unwrap();
        LazyStack {
            ctr,
            _snap: snap,
            _daemon: daemon,
        }
    }
}

/// CRI PullImage of `image`: lazy (the registry's access log shows no data
/// blob request, but the config's), its chain committed in lazypull.
/// Returns the access log's length before the pull.
fn pull_lazily(
    cri: &mut Cri,
    ctr: &Containerd,
    registry: &RegistryServer,
    image: &LazyImage,
) -> usize {
    let before = std::fs::metadata(access_log(registry)).unwrap().len() as usize;
    let id = cri
        .pull_image(&image.reference)
        .unwrap_or_else(|e| panic!("{e}\ncontainerd's log ends:\n{}", ctr.log_tail(30)));
    assert_eq!(id, image.config_digest);
    let requests = blob_requests(registry, before, &image.repository);
    eprintln!(
        "blob requests of the CRI pull of {}: {requests:?}",
        image.reference
    );
    for (method, digest) in &requests {
        assert!(
            !image.data_blobs.contains(digest),
            "the CRI pull fetched data blob {digest} ({method}): {requests:?}"
        );
    }
    assert!(
        requests.iter().any(|(_, d)| *d == image.config_digest),
        "the CRI pull did not fetch the config: {requests:?}"
    );
    let committed = committed_snapshots(ctr);
    for c in &image.chain {
        assert!(
            committed.contains(c),
            "{c} not committed in lazypull: {committed:?}"
        );
    }
    before
}

/// The container's reads went through lazypull's daemon to the registry:
/// some data blob of `image` was requested after byte `before` of the
/// access log.
fn assert_data_read(registry: &RegistryServer, before: usize, image: &LazyImage) {
    let after = blob_requests(registry, before, &image.repository);
    eprintln!("blob requests after the run: {after:?}");
    assert!(
        after.iter().any(|(_, d)| image.data_blobs.contains(d)),
        "the container ran but no data blob was read: {after:?}"
    );
}

#[test]
fn cri_pulls_a_lazy_image_lazily_and_runs_it() {
    require_remote_snapshots();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    busybox_image()
        .unwrap()
        .push(registry.addr(), "test/busybox", "v1")
        .unwrap();
    let source = format!("{}/test/busybox:v1", registry.addr());
    let lazy = convert(&registry, &source, "test/busybox-lazy");
    let sandbox = push_sandbox(&registry);

    let cgroup = CgroupParent::new("cri-lazy");
    let stack = LazyStack::start(dir, &registry, &sandbox);
    let ctr = &stack.ctr;
    let mut cri = Cri::connect(ctr.address()).unwrap();

    // PullImage of the lazy image: lazy, no data blob moves.
    let before = pull_lazily(&mut cri, ctr, &registry, &lazy);
    // The committed snapshots are lazypull's remote ones, labelled by CRI
    // with the image reference.
    let info = ctr
        .ctr_stdout(&[
            "-n",
            K8S_NAMESPACE,
            "snapshots",
            "--snapshotter",
            "lazypull",
            "info",
            lazy.chain.last().unwrap(),
        ])
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["Labels"]["containerd.io/snapshot/cri.image-ref"].as_str(),
        Some(lazy.reference.as_str()),
        "{info}"
    );
    assert!(
        info["Labels"]["containerd.io/snapshot/lazypull.role"].is_string(),
        "{info}"
    );

    // A pod runs it, with the right output.
    let logs = dir.join("pods/lazy");
    run_in_pod(
        &mut cri,
        ctr,
        &lazy.reference,
        ("lazy", &logs, &cgroup),
        BUSYBOX_IMAGE_OUTPUT,
    );
    assert_data_read(&registry, before, &lazy);
    // The lazy snapshots' usage is the bytes the daemon has cached for
    // them, and ImageFsInfo sums it in (with the sandbox image's ordinary
    // snapshots).
    let cached = usage(ctr, &lazy.chain);
    eprintln!("usage of the lazy snapshots after the run: {cached} bytes");
    assert!(
        cached > 0,
        "the lazy snapshots report no usage after the run"
    );
    check_image_fs(&mut cri, ctr, cached);
}

/// Issue 12's real program through CRI: testkit's python image (Debian's
/// python3.11, its shared libraries and standard library, three layers),
/// converted, pulled lazily by CRI PullImage (no data blob moves) and run in
/// a host-network pod with no command override: its one line of output,
/// the one `lazypull pull` + `ctr run` gives, shows the image config's
/// entrypoint, command, environment and working directory honoured, read
/// through lazypull's daemon.
#[test]
fn cri_runs_the_python_image_lazily() {
    require_remote_snapshots();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    python_image()
        .unwrap()
        .push(registry.addr(), "test/python", "v1")
        .unwrap();
    let source = format!("{}/test/python:v1", registry.addr());
    let lazy = convert(&registry, &source, "test/python-lazy");
    let sandbox = push_sandbox(&registry);

    let cgroup = CgroupParent::new("cri-python");
    let stack = LazyStack::start(dir, &registry, &sandbox);
    let ctr = &stack.ctr;
    let mut cri = Cri::connect(ctr.address()).unwrap();

    let before = pull_lazily(&mut cri, ctr, &registry, &lazy);
    let logs = dir.join("pods/python");
    run_in_pod(
        &mut cri,
        ctr,
        &lazy.reference,
        ("python", &logs, &cgroup),
        PYTHON_OUTPUT,
    );
    assert_data_read(&registry, before, &lazy);
}

/// The summed `ctr snapshots usage` (bytes) of snapshots `keys` in the CRI
/// namespace's lazypull.
fn usage(ctr: &Containerd, keys: &[String]) -> u64 {
    let mut args = vec![
        "-n",
        K8S_NAMESPACE,
        "snapshots",
        "--snapshotter",
        "lazypull",
        "usage",
        "-b",
    ];
    args.extend(keys.iter().map(String::as_str));
    let text = ctr.ctr_stdout(&args).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected `ctr snapshots usage` row {l:?}:\n{text}"))
        })
        .sum()
}

/// `lazypull cri-proxy` on `socket` in front of containerd at `runtime`,
/// handing credentials to the daemon at `daemon`.
fn cri_proxy(socket: &Path, runtime: &Path, daemon: &Path, log: &Path) -> Process {
    let mut cmd = lazypull();
    cmd.arg("cri-proxy")
        .arg("--listen")
        .arg(socket)
        .arg("--runtime")
        .arg(runtime)
        .arg("--daemon-socket")
        .arg(daemon);
    Process::start(
        "lazypull cri-proxy",
        cmd,
        socket,
        log,
        Path::new("/nonexistent"),
    )
}

/// Every regular file under `dir` holding `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if !e.file_type().is_file() {
            continue;
        }
        if let Ok(bytes) = std::fs::read(e.path()) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                out.push(e.path().to_path_buf());
            }
        }
    }
    out
}

/// Issue 18's Kubernetes credentials: a private lazy image (its registry
/// needs a password for every request) pulled by CRI PullImage with the
/// credentials kubelet would send.
/// - Straight to containerd, the pull works (containerd uses the
///   credentials) but the container cannot start: the daemon, which reads
///   the image, never got them (containerd hands them to no snapshotter).
/// - Through `lazypull cri-proxy`, the proxy hands them to the daemon after
///   the pull; the container starts and reads its image lazily.
/// - The daemon is killed (SIGKILL) and the proxy restarted; a new daemon
///   takes the mounts over from the fd store, with the credentials (a
///   sealed memfd there): the running container reads a layer it never read
///   before, right, from the private registry.
/// - Not one file under the test's directory (daemon cache, work and run
///   dirs, snapshotter, containerd's root, state and logs) holds the
///   password.
#[test]
fn cri_credentials_reach_the_daemon_through_the_cri_proxy_and_outlive_its_restart() {
    require_remote_snapshots();
    const USER: &str = "kubelet-user";
    const PASSWORD: &str = "pw-9f2c4e7a1b-never-on-disk";
    let tmp = temp_dir();
    let dir = tmp.path();
    // The private registry holds the lazy image; the open one the sandbox
    // image and the ordinary source (containerd pulls the sandbox with no
    // credentials).
    let private = RegistryServer::start(&dir.join("private"), Some((USER, PASSWORD))).unwrap();
    let open = RegistryServer::start(&dir.join("open"), None).unwrap();
    let before_bytes = lazypull_testkit::maketree::random_bytes(256 << 10, 1);
    let after_bytes = lazypull_testkit::maketree::random_bytes(768 << 10, 2);
    let mut layers = busybox_image().unwrap().layers;
    layers.push(
        lazypull_testkit::oci_image::LayerBuilder::new()
            .dir("data", 0o755)
            .unwrap()
            .file("data/before", &before_bytes, 0o644)
            .unwrap()
            .finish()
            .unwrap(),
    );
    layers.push(
        lazypull_testkit::oci_image::LayerBuilder::new()
            .dir("data", 0o755)
            .unwrap()
            .file("data/after", &after_bytes, 0o644)
            .unwrap()
            .finish()
            .unwrap(),
    );
    let image = lazypull_testkit::oci_image::Image::new(
        layers,
        serde_json::json!({
            "Env": ["PATH=/bin"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo started; exec sleep 3600"],
        }),
    )
    .unwrap();
    image.push(open.addr(), "test/app", "v1").unwrap();
    let source = format!("{}/test/app:v1", open.addr());
    let reference = format!("{}/team/private:v1", private.addr());
    let out = lazypull()
        .args(["convert", &source, &reference])
        .env("LAZYPULL_REGISTRY_USER", USER)
        .env("LAZYPULL_REGISTRY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lazypull convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = registry_manifest(&dir.join("private"), "team/private", "v1");
    let data_layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == "data")
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(data_layers.len(), 4, "{manifest}");
    let sandbox = push_sandbox(&open);

    let cgroup = CgroupParent::new("cri-auth");
    let daemon_dir = dir.join("d");
    let ctl = daemon_dir.join("run/ctl.sock");
    let daemon1 = daemon(&daemon_dir);
    let snap_socket = dir.join("snap.sock");
    let _snap = snapshotter(
        &dir.join("snap"),
        &snap_socket,
        &dir.join("snap.log"),
        Some(&ctl),
    );
    let options = ContainerdOptions {
        proxy_snapshotters: vec![("lazypull".into(), snap_socket.clone())],
        cri_settings: Some(CriSettings {
            sandbox_image: Some(sandbox.clone()),
            plain_http_registries: vec![open.addr().to_string(), private.addr().to_string()],
            snapshotter: Some("lazypull".into()),
            snapshot_annotations: true,
            restrict_oom_score_adj: true,
        }),
        ..ContainerdOptions::default()
    };
    let ctr = Containerd::start(&dir.join("c"), &options).unwrap();
    let mut direct = Cri::connect(ctr.address()).unwrap();
    let pod_config = cri::host_network_pod("private", &dir.join("pods/private"), &cgroup.0);
    let pod = direct
        .run_pod(&pod_config)
        .unwrap_or_else(|e| panic!("{e}\ncontainerd's log ends:\n{}", ctr.log_tail(30)));
    let config = cri::container_config("main", &reference, &[], "main.log");

    // Without the proxy: containerd pulls, the daemon cannot read.
    assert!(
        direct.pull_image(&reference).is_err(),
        "an anonymous pull of the private image succeeded: the registry is not private"
    );
    direct
        .pull_image_with_auth(&reference, USER, PASSWORD)
        .unwrap_or_else(|e| panic!("{e}\ncontainerd's log ends:\n{}", ctr.log_tail(30)));
    let refused = direct.create_and_start(&pod, &config, &pod_config);
    let err = refused.expect_err("the container started though the daemon has no credentials");
    eprintln!("without the proxy: {err}");
    assert!(
        err.to_string().contains("requires authentication")
            && err.to_string().contains("lazypull cri-proxy")
            && err.to_string().contains("pull it again"),
        "not refused for want of credentials, or not saying how they come back: {err}"
    );

    // Through the proxy: the credentials reach the daemon.
    let proxy_socket = dir.join("cri.sock");
    let proxy1 = cri_proxy(&proxy_socket, ctr.address(), &ctl, &dir.join("proxy1.log"));
    let mut kubelet = Cri::connect(&proxy_socket).unwrap();
    kubelet
        .pull_image_with_auth(&reference, USER, PASSWORD)
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nthe proxy's log ends:\n{}",
                tail(&dir.join("proxy1.log"), 20)
            )
        });
    let status: serde_json::Value = {
        let out = lazypull()
            .args(["status", "--json", "--socket"])
            .arg(&ctl)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lazypull status --json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    assert_eq!(
        status["kubelet_credentials"],
        serde_json::json!([format!("{}/team/private", private.addr())]),
        "{status}"
    );
    // A container on a fresh pod (the first pod's container name is taken
    // by the failed attempt).
    let pod_config2 = cri::host_network_pod("private2", &dir.join("pods/private2"), &cgroup.0);
    let pod2 = kubelet.run_pod(&pod_config2).unwrap();
    let id = kubelet
        .create_and_start(&pod2, &config, &pod_config2)
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nthe daemon's log ends:\n{}",
                tail(&daemon_dir.join("daemon.log"), 30)
            )
        });
    let log = dir.join("pods/private2/main.log");
    assert!(
        eventually(Duration::from_secs(30), || cri::read_log(&log)
            .map(|l| l.iter().any(|l| l.text == "started"))
            .unwrap_or(false)),
        "the container did not start: {:?}",
        std::fs::read_to_string(&log)
    );
    let (code, stdout, stderr) = kubelet
        .exec_sync(&id, &["cat", "/data/before"], 60)
        .unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&stderr));
    assert!(stdout == before_bytes, "/data/before read wrong");

    // Both restart: the daemon killed as in a crash, the proxy stopped.
    let log_before_restart = std::fs::metadata(access_log(&private)).unwrap().len() as usize;
    daemon1.kill();
    proxy1.kill();
    let _daemon2 = daemon_logged(&daemon_dir, "daemon2.log");
    let _proxy2 = cri_proxy(&proxy_socket, ctr.address(), &ctl, &dir.join("proxy2.log"));
    let daemon2_log = std::fs::read_to_string(daemon_dir.join("daemon2.log")).unwrap();
    assert!(
        daemon2_log.contains("took back the credentials kubelet sent"),
        "the new daemon did not take the credentials back:\n{}",
        tail(&daemon_dir.join("daemon2.log"), 30)
    );
    // The running container reads a layer nobody read before.
    let mut kubelet = Cri::connect(&proxy_socket).unwrap();
    let (code, stdout, stderr) = kubelet.exec_sync(&id, &["cat", "/data/after"], 60).unwrap();
    assert_eq!(
        code,
        0,
        "{}\nthe new daemon's log ends:\n{}",
        String::from_utf8_lossy(&stderr),
        tail(&daemon_dir.join("daemon2.log"), 30)
    );
    assert!(
        stdout == after_bytes,
        "/data/after read wrong after the restart"
    );
    let after_layer = data_layers.last().unwrap();
    let requests = blob_requests(&private, log_before_restart, "team/private");
    assert!(
        requests.iter().any(|(_, d)| d == after_layer),
        "the last layer was not read from the private registry after the restart: {requests:?}"
    );

    kubelet.stop_container(&id, 5).unwrap();
    kubelet.remove_container(&id).unwrap();
    drop(kubelet);
    drop(direct);
    drop(ctr);
    let holding = files_holding(dir, PASSWORD.as_bytes());
    assert!(holding.is_empty(), "the password is on disk in {holding:?}");
}
