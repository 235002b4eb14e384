//! Lazy snapshots end to end on this host, driven over gRPC as containerd's
//! unpacker and runtime would drive `lazypull snapshotter`: a real
//! `docker-registry` on 127.0.0.1, testkit's busybox image converted with
//! `lazypull convert`, `lazypull daemon` over FUSE, `lazypull snapshotter
//! --daemon-socket`.
//!
//! - every layer's `Prepare` (the manifest's annotations as labels, plus
//!   `containerd.io/snapshot.ref` and `containerd.io/snapshot/lazypull.image-ref`)
//!   answers AlreadyExists and leaves a committed snapshot named by the chain
//!   id, with its parent and labels, having fetched nothing;
//! - a container `Prepare` on the top chain id mounts the image through the
//!   daemon once (under `<root>/lazy/<meta hex>`) and answers an overlay on
//!   it; mounted by the test, it reads back the image's files (busybox's
//!   bytes, the upper layer's override and whiteout), and the registry's log
//!   shows no data blob fetched before that read (and some after);
//! - a SIGKILL of the snapshotter while the container snapshot is mounted:
//!   the restarted one keeps the same lazy mount (same mount id) and hands
//!   out the same mounts;
//! - `Remove` of the container snapshot unmounts the lazy image, and the
//!   daemon no longer lists the mount point.
//!
//! Needs root, /dev/fuse, EROFS file-backed mounts, overlayfs,
//! docker-registry and busybox-static; fails (never skips) without them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazypull_containerd_api::unix::UnixConnector;
use lazypull_snapshotter::proto::containerd::services::snapshots::v1 as api;
use lazypull_snapshotter::proto::containerd::types::Mount;
use lazypull_testkit::containerd;
use lazypull_testkit::containerd::chain_ids;
use lazypull_testkit::oci_image::busybox_image;
use lazypull_testkit::registry::RegistryServer;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

type Client = api::snapshots_client::SnapshotsClient<Channel>;

fn lazypull() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
}

fn require_host() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts FUSE, EROFS and overlayfs: run it as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "this test needs /dev/fuse");
}

/// A child process killed and reaped when dropped; its log shown if the
/// test fails.
struct Proc {
    what: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(what: &'static str, mut cmd: Command, log: &Path) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc {
            what,
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits for `socket` to accept, failing if the process exits.
    fn wait_socket(&mut self, socket: &Path) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{} exited with {status} during start; its log ends:\n{}",
                    self.what,
                    self.log_tail()
                );
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not listen on {} in 30 s; its log ends:\n{}",
            self.what,
            socket.display(),
            self.log_tail()
        );
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}'s log ({}) ends:\n{}",
                self.what,
                self.log.display(),
                self.log_tail()
            );
        }
        self.kill9();
    }
}

/// Unmounts everything under the test's directory (deepest first) when
/// dropped, after the processes are gone.
struct Unmounter(PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        containerd::unmount_under(&self.0);
    }
}

async fn connect(socket: &Path) -> Client {
    // The server wants an `:authority` of localhost, as containerd sends.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(UnixConnector::new(socket))
        .await
        .expect("connecting to the snapshotter");
    Client::new(channel)
}

/// GET over HTTP/1.0 from the registry: (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&all[..split]);
    let status = head[9..12].parse().unwrap();
    (status, all[split + 4..].to_vec())
}

/// (mount id, mount point) of the mounts at `dir` in this namespace.
fn mount_ids_at(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_string_lossy().into_owned();
    text.lines()
        .filter(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// The data blob digests of the registry log's blob GETs.
fn blob_gets(log: &Path, digests: &[String]) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    digests
        .iter()
        .filter(|d| {
            text.lines()
                .any(|l| l.contains("GET") && l.contains(&format!("/blobs/{d}")))
        })
        .cloned()
        .collect()
}

fn mount_overlay(m: &Mount, target: &Path) {
    assert_eq!(m.r#type, "overlay", "{m:?}");
    std::fs::create_dir_all(target).unwrap();
    let data = std::ffi::CString::new(m.options.join(",")).unwrap();
    rustix::mount::mount(
        m.source.as_str(),
        target,
        "overlay",
        rustix::mount::MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .unwrap_or_else(|e| panic!("mounting the container's overlay {m:?}: {e}"));
}

/// A tmpfs at `dir` (created).
fn tmpfs_at(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    rustix::mount::mount(
        "tmpfs",
        dir,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap_or_else(|e| panic!("mounting a tmpfs at {}: {e}", dir.display()));
    assert_eq!(mount_ids_at(dir).len(), 1);
}

fn daemon_status(socket: &Path) -> serde_json::Value {
    let out = lazypull()
        .arg("status")
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lazypull status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn daemon_mountpoints(socket: &Path) -> Vec<String> {
    let s = daemon_status(socket);
    s["images"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["mountpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m.as_str().map(str::to_string))
        .collect()
}

fn start_snapshotter(root: &Path, socket: &Path, daemon: &Path, log: &Path) -> Proc {
    let mut cmd = lazypull();
    cmd.arg("snapshotter")
        .arg("--root")
        .arg(root)
        .arg("--address")
        .arg(socket)
        .arg("--daemon-socket")
        .arg(daemon)
        .env("LAZYPULL_LOG", "debug");
    let mut p = Proc::spawn("lazypull snapshotter", cmd, log);
    p.wait_socket(socket);
    p
}

/// One of these tests at a time: each runs a daemon, a snapshotter and mounts.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn lazy_image_layers_and_containers_over_the_snapshots_api() {
    lazy_snapshots_through("fuse");
}

/// The same through the loop transport (issue 15): the snapshotter's mounts
/// are EROFS over read-only loop devices backed by the daemon's FUSE files.
#[test]
fn lazy_image_layers_and_containers_over_the_snapshots_api_through_loop_devices() {
    assert!(
        Path::new("/dev/loop-control").exists(),
        "this test needs /dev/loop-control (CONFIG_BLK_DEV_LOOP, `modprobe loop`)"
    );
    lazy_snapshots_through("loop");
}

/// The same through the fanotify transport (issue 16): the snapshotter's
/// mounts are EROFS over the daemon's sparse cache files, filled on
/// pre-content events (/tmp is ext4 here: such events need a local file
/// system with them, not tmpfs).
#[test]
fn lazy_image_layers_and_containers_over_the_snapshots_api_through_fanotify() {
    lazy_snapshots_through("fanotify");
}

fn lazy_snapshots_through(transport: &str) {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::Builder::new()
        .prefix("lplazy")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let _unmount = Unmounter(dir.clone());

    // The image: busybox, converted, in a registry.
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let image = busybox_image().unwrap();
    image.push(registry.addr(), "test/busybox", "v1").unwrap();
    let source = format!("{}/test/busybox:v1", registry.addr());
    let lazy = format!("{}/test/busybox-lazy:v1", registry.addr());
    let out = lazypull()
        .args(["convert", &source, &lazy, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lazypull convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest_digest = pushed["manifest_digest"].as_str().unwrap().to_string();
    let meta_hex = pushed["meta"].as_str().unwrap().to_string();
    let (status, body) = http_get(
        registry.addr(),
        &format!("/v2/test/busybox-lazy/manifests/{manifest_digest}"),
        "application/vnd.oci.image.manifest.v1+json",
    );
    assert_eq!(status, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let layers = manifest["layers"].as_array().unwrap().clone();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let chain = chain_ids(&diff_ids);
    assert_eq!(chain[0], format!("sha256:{meta_hex}"));
    let data_digests: Vec<String> = layers
        .iter()
        .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == "data")
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert!(!data_digests.is_empty(), "{manifest}");
    let pinned = format!("{}/test/busybox-lazy@{manifest_digest}", registry.addr());

    // The daemon (FUSE) and the snapshotter.
    let ddir = dir.join("d");
    std::fs::create_dir_all(&ddir).unwrap();
    std::fs::write(ddir.join("config.toml"), "retries = 1\n").unwrap();
    let control = ddir.join("run/ctl.sock");
    let mut dcmd = lazypull();
    dcmd.arg("daemon")
        .arg("--config")
        .arg(ddir.join("config.toml"))
        .args(["--transport", transport])
        .arg("--cache-dir")
        .arg(ddir.join("cache"))
        .arg("--work-dir")
        .arg(ddir.join("work"))
        .arg("--run-dir")
        .arg(ddir.join("run"))
        .arg("--fuse-dir")
        .arg(ddir.join("blobs"))
        .arg("--socket")
        .arg(&control)
        .arg("--fd-store")
        .arg(ddir.join("run/fdstore.sock"))
        .args(["--log-level", "info"]);
    let mut daemon = Proc::spawn("lazypull daemon", dcmd, &dir.join("daemon.log"));
    daemon.wait_socket(&control);
    let root = dir.join("snap");
    let socket = dir.join("snap.sock");
    let slog = dir.join("snapshotter.log");
    let mut snap = start_snapshotter(&root, &socket, &control, &slog);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt.block_on(connect(&socket));

    // The unpacker: each layer prepared with its annotations as labels.
    for (i, layer) in layers.iter().enumerate() {
        let mut labels: HashMap<String, String> = layer["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        labels.insert("containerd.io/snapshot.ref".into(), chain[i].clone());
        labels.insert(
            "containerd.io/snapshot/lazypull.image-ref".into(),
            pinned.clone(),
        );
        let parent = if i == 0 {
            String::new()
        } else {
            chain[i - 1].clone()
        };
        let e = rt
            .block_on(c.prepare(api::PrepareSnapshotRequest {
                snapshotter: "lazypull".into(),
                key: format!("extract-{i}-{}", chain[i]),
                parent: parent.clone(),
                labels: labels.clone(),
            }))
            .expect_err("a lazy layer's Prepare answers AlreadyExists");
        assert_eq!(e.code(), Code::AlreadyExists, "layer {i}: {e:?}");
        let info = rt
            .block_on(c.stat(api::StatSnapshotRequest {
                snapshotter: "lazypull".into(),
                key: chain[i].clone(),
            }))
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.kind, api::Kind::Committed as i32, "layer {i}");
        assert_eq!(info.parent, parent, "layer {i}");
        assert_eq!(info.labels, labels, "layer {i}");
    }
    assert_eq!(
        blob_gets(registry.log_path(), &data_digests),
        Vec::<String>::new(),
        "a data blob was fetched to pull"
    );
    assert!(daemon_mountpoints(&control).is_empty());

    // The runtime: a container snapshot on the top layer.
    let top = chain.last().unwrap().clone();
    let mounts = rt
        .block_on(c.prepare(api::PrepareSnapshotRequest {
            snapshotter: "lazypull".into(),
            key: "c1".into(),
            parent: top.clone(),
            labels: HashMap::new(),
        }))
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(
        daemon_status(&control)["transport"]["kind"],
        transport,
        "the daemon serves through --transport {transport}"
    );
    if transport == "loop" {
        let loops = lazypull_transport::loopdev::attached_under(tmp.path()).unwrap();
        assert!(
            !loops.is_empty() && loops.iter().all(|l| l.read_only && l.autoclear),
            "the snapshotter's lazy mount is over read-only loop devices: {loops:?}"
        );
    }
    let image_dir = std::fs::canonicalize(&root)
        .unwrap()
        .join("lazy")
        .join(&meta_hex);
    assert!(
        mounts[0]
            .options
            .contains(&format!("lowerdir={}", image_dir.display())),
        "{mounts:?}"
    );
    let lazy_mount = mount_ids_at(&image_dir);
    assert_eq!(
        lazy_mount.len(),
        1,
        "the image is mounted once at {}",
        image_dir.display()
    );
    assert_eq!(
        daemon_mountpoints(&control),
        vec![image_dir.display().to_string()],
        "the daemon knows the mount"
    );
    assert_eq!(
        blob_gets(registry.log_path(), &data_digests),
        Vec::<String>::new(),
        "a data blob was fetched before any read"
    );
    let rootfs = dir.join("rootfs");
    mount_overlay(&mounts[0], &rootfs);
    // What the image's layers hold.
    let busybox = std::fs::read("/bin/busybox").unwrap();
    assert!(
        std::fs::read(rootfs.join("bin/busybox")).unwrap() == busybox,
        "bin/busybox differs"
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("bin/sh")).unwrap(),
        PathBuf::from("busybox")
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/layer")).unwrap(),
        "two\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/added")).unwrap(),
        "added by layer two\n"
    );
    assert!(
        !rootfs.join("etc/removed").exists(),
        "the whiteout is honoured"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap(),
        "root:x:0:0:root:/work:/bin/sh\n"
    );
    assert!(rootfs.join("work").is_dir() && rootfs.join("tmp").is_dir());
    // Writable: into the container's own upper dir.
    std::fs::write(rootfs.join("work/out"), "written").unwrap();
    assert!(
        !blob_gets(registry.log_path(), &data_digests).is_empty(),
        "reading busybox fetched no data blob: is the registry log ({}) the right one?",
        registry.log_path().display()
    );

    // SIGKILL the snapshotter with the container mounted; the restarted
    // one keeps the very same lazy mount, and unmounts one no snapshot
    // uses (as a crash between mount and record would leave).
    snap.kill9();
    let orphan = image_dir.with_file_name("ee".repeat(32));
    tmpfs_at(&orphan);
    snap = start_snapshotter(&root, &socket, &control, &slog);
    let mut c = rt.block_on(connect(&socket));
    assert_eq!(
        mount_ids_at(&orphan),
        Vec::<String>::new(),
        "an unused mount survived the start"
    );
    assert!(!orphan.exists());
    // And Cleanup does the same.
    tmpfs_at(&orphan);
    rt.block_on(c.cleanup(api::CleanupRequest {
        snapshotter: "lazypull".into(),
    }))
    .unwrap();
    assert_eq!(
        mount_ids_at(&orphan),
        Vec::<String>::new(),
        "Cleanup left an unused mount"
    );
    assert_eq!(
        mount_ids_at(&image_dir),
        lazy_mount,
        "the lazy mount was not kept as it was"
    );
    let again = rt
        .block_on(c.mounts(api::MountsRequest {
            snapshotter: "lazypull".into(),
            key: "c1".into(),
        }))
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, mounts);
    assert_eq!(mount_ids_at(&image_dir), lazy_mount);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("work/out")).unwrap(),
        "written"
    );

    // The container goes: its snapshot's Remove unmounts the image.
    rustix::mount::unmount(&rootfs, rustix::mount::UnmountFlags::empty()).unwrap();
    rt.block_on(c.remove(api::RemoveSnapshotRequest {
        snapshotter: "lazypull".into(),
        key: "c1".into(),
    }))
    .unwrap();
    assert_eq!(
        mount_ids_at(&image_dir),
        Vec::<String>::new(),
        "the lazy image is still mounted"
    );
    assert!(!image_dir.exists());
    assert_eq!(
        daemon_mountpoints(&control),
        Vec::<String>::new(),
        "the daemon was not told"
    );
    // The layers stay (containerd's GC removes them), usage is the cache's.
    let usage = rt
        .block_on(c.usage(api::UsageRequest {
            snapshotter: "lazypull".into(),
            key: top.clone(),
        }))
        .unwrap()
        .into_inner();
    assert!(
        usage.size > 0,
        "the top (data) layer's blob was read, so cached: {usage:?}"
    );
    drop(c);
    drop(snap);
    let _ = lazypull()
        .arg("shutdown")
        .arg("--socket")
        .arg(&control)
        .arg("--fd-store")
        .arg(ddir.join("run/fdstore.sock"))
        .output();
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.child.as_mut().unwrap().try_wait().unwrap().is_none() && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(daemon);
}
