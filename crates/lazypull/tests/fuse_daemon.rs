//! The daemon on this host's kernel (no cachefiles): `lazypull demo`, the FUSE
//! transport end to end (build → web server → daemon → `lazypull mount`), the
//! daemon's local cache after `drop_caches`, status and metrics against the
//! web server's own request count, and failover of the FUSE connection
//! (SIGKILL, then `--takeover`) under streaming readers.
//!
//! Needs root, /dev/fuse and EROFS file-backed mounts; fails (never skips)
//! without them.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lazypull_testkit::maketree::{self, TreeOptions};
use lazypull_testkit::proxy::{FaultSource, Proxy};
use lazypull::blob_server::BlobServer;
use lazypull_testkit::{compare_entries, format_differences, scan};
use sha2::{Digest, Sha256};

/// One test at a time: they drop the kernel's caches and time readers.
static SERIAL: Mutex<()> = Mutex::new(());

fn lazypull() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn require_host() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests mount FUSE and EROFS: run them as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "these tests need /dev/fuse"
    );
}

fn drop_caches() {
    rustix::fs::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A work dir with a built image served over HTTP (through a proxy that can slow
/// data requests down), and the daemon's directories.
struct Site {
    dir: PathBuf,
    meta: String,
    server: BlobServer,
    proxy: Proxy,
    metrics_port: u16,
}

impl Site {
    fn new(dir: &Path, src: &Path) -> Site {
        let www = dir.join("www");
        let built = ok(
            lazypull()
                .arg("build")
                .arg(src)
                .arg("-o")
                .arg(&www)
                .arg("--json")
                .output()
                .unwrap(),
            "lazypull build",
        );
        let built: serde_json::Value = serde_json::from_str(&built).unwrap();
        let server = BlobServer::start(&www).unwrap();
        let faults = dir.join("faults");
        fs::write(&faults, "").unwrap();
        let proxy = Proxy::start(
            server.addr(),
            dir.join("proxy.log"),
            FaultSource::File(faults),
        )
        .unwrap();
        Site {
            dir: dir.to_path_buf(),
            meta: built["meta"]["digest"].as_str().unwrap().to_owned(),
            server,
            proxy,
            metrics_port: free_port(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/ctl.sock")
    }

    fn daemon(&self, extra: &[&str], log: &str) -> Child {
        let log = fs::File::create(self.dir.join(log)).unwrap();
        let child = lazypull()
            .arg("daemon")
            .args(["--config", "/dev/null", "--transport", "fuse"])
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .arg("--work-dir")
            .arg(self.dir.join("work"))
            .arg("--run-dir")
            .arg(self.dir.join("run"))
            .arg("--fuse-dir")
            .arg(self.dir.join("blobs"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--fd-store")
            .arg(self.dir.join("run/fdstore.sock"))
            .arg("--blob-url")
            .arg(format!("http://{}/", self.proxy.addr()))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(["--log-level", "info"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Up when it answers itself (with --takeover, the old one answers first).
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.status().map(|s| s["pid"].as_u64()) != Some(Some(child.id().into())) {
            assert!(
                Instant::now() < deadline,
                "daemon not up: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for name in ["daemon.log", "daemon-2.log", "daemon-3.log"] {
            if let Ok(t) = fs::read_to_string(self.dir.join(name)) {
                let lines: Vec<&str> = t.lines().collect();
                s += &format!(
                    "--- {name}\n{}\n",
                    lines[lines.len().saturating_sub(20)..].join("\n")
                );
            }
        }
        s
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = lazypull()
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn mount(&self, mnt: &Path) {
        ok(
            lazypull()
                .args(["mount", "--fsid", &self.meta])
                .arg(mnt)
                .arg("--socket")
                .arg(self.socket())
                .output()
                .unwrap(),
            "lazypull mount --fsid",
        );
    }

    fn umount(&self, mnt: &Path) {
        ok(
            lazypull()
                .arg("umount")
                .arg(mnt)
                .arg("--socket")
                .arg(self.socket())
                .output()
                .unwrap(),
            "lazypull umount",
        );
    }

    fn metrics(&self) -> String {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    fn shutdown(&self, mut daemon: Child) {
        ok(
            lazypull()
                .arg("shutdown")
                .arg("--socket")
                .arg(self.socket())
                .output()
                .unwrap(),
            "lazypull shutdown",
        );
        let status = daemon.wait().unwrap();
        assert!(
            status.success(),
            "daemon exit {status}: {}",
            self.log_tail()
        );
    }
}

impl Drop for Site {
    /// Whatever happened, nothing is left mounted or running: a dead FUSE
    /// mount under the temporary directory would hang its removal.
    fn drop(&mut self) {
        for m in ["mnt", "blobs"] {
            let _ = rustix::mount::unmount(self.dir.join(m), rustix::mount::UnmountFlags::DETACH);
        }
        let _ = lazypull()
            .arg("shutdown")
            .arg("--socket")
            .arg(self.socket())
            .arg("--fd-store")
            .arg(self.dir.join("run/fdstore.sock"))
            .output();
    }
}

fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from the metrics"))
        .trim()
        .parse()
        .unwrap()
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

#[test]
fn demo_runs_green() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = ok(
        lazypull().args(["demo", "--json"]).output().unwrap(),
        "lazypull demo",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["transport"], "fuse", "this host kernel has no cachefiles");
    for r in v["reads"].as_array().unwrap() {
        assert_eq!(r["ok"], true, "{r}");
    }
    let (fetched, size) = (
        v["fetched_bytes"].as_u64().unwrap(),
        v["image_bytes"].as_u64().unwrap(),
    );
    assert!(
        fetched > 8 << 20,
        "the 8 MiB library was fetched: {fetched}"
    );
    assert!(fetched < size / 4, "lazily: {fetched} of {size}");
    assert_eq!(v["refetched_after_drop_caches_bytes"], 0);
}

#[test]
fn fuse_serves_a_realistic_image_and_its_cache_answers_after_drop_caches() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    maketree::make_tree(
        &src,
        &TreeOptions {
            seed: 11,
            with_huge: false,
        },
    )
    .unwrap();
    for lib in ["/usr/lib/python3.11/email", "/usr/lib/python3.11/json"] {
        let dst = src.join(lib.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        ok(
            Command::new("cp")
                .arg("-a")
                .arg(lib)
                .arg(&dst)
                .output()
                .unwrap(),
            "copying a tree",
        );
    }
    let site = Site::new(tmp.path(), &src);
    let daemon = site.daemon(&[], "daemon.log");
    let s = site.status().unwrap();
    assert_eq!(s["transport"]["kind"], "fuse");
    assert!(
        s["transport"]["reason"]
            .as_str()
            .unwrap()
            .contains("--transport fuse"),
        "{s}"
    );
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    let expected = scan(&src).unwrap();
    let diffs = compare_entries(&expected, &scan(&mnt).unwrap());
    assert!(
        diffs.is_empty(),
        "mounted through FUSE, the image differs from its source:\n{}",
        format_differences(&diffs, 30)
    );

    // The web server's own count, the daemon's status and its metrics agree.
    let served = site.server.requests();
    let s = site.status().unwrap();
    let page = site.metrics();
    assert!(served > 2, "{served}");
    assert_eq!(
        s["backend_http"]["requests"], served,
        "status vs the server's count"
    );
    assert_eq!(
        metric(&page, "lazypull_backend_http_requests_total"),
        served,
        "metrics vs the server's count"
    );
    let per_blob: u64 = s["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["source"]["requests"].as_u64().unwrap())
        .sum();
    assert!(
        per_blob <= served,
        "blob reads {per_blob} <= HTTP requests {served}"
    );
    assert!(
        page.contains(&format!(
            "lazypull_blob_cached_bytes{{blob=\"{}\"}}",
            site.meta
        )),
        "{page}"
    );

    // A second full read after dropping the kernel's caches is served by the
    // daemon's cache: the web server sees nothing.
    drop_caches();
    assert!(compare_entries(&expected, &scan(&mnt).unwrap()).is_empty());
    assert_eq!(
        site.server.requests(),
        served,
        "the second read reached the backend"
    );
    site.umount(&mnt);
    site.shutdown(daemon);
    assert!(
        !fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(tmp.path().join("blobs").to_str().unwrap()),
        "shutdown unmounts the blob files"
    );
    assert!(
        !tmp.path().join("run/fdstore.sock").exists(),
        "and ends the fd store"
    );
}

fn sha(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// Starts 8 readers of `big{first}..big{first+7}`; each returns its file's sha256.
fn readers(mnt: &Path, first: usize) -> Vec<std::thread::JoinHandle<std::io::Result<[u8; 32]>>> {
    (first..first + 8)
        .map(|i| {
            let p = mnt.join(format!("big{i}.bin"));
            std::thread::spawn(move || sha(&p))
        })
        .collect()
}

fn finish(
    handles: Vec<std::thread::JoinHandle<std::io::Result<[u8; 32]>>>,
    want: &[[u8; 32]],
    first: usize,
    site: &Site,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while handles.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "readers hung after failover:\n{}",
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (k, h) in handles.into_iter().enumerate() {
        let got = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("reader {} failed: {e}\n{}", first + k, site.log_tail()));
        assert_eq!(
            got,
            want[first + k],
            "reader {} read wrong bytes",
            first + k
        );
    }
}

#[test]
fn fuse_mounts_survive_a_killed_daemon_and_an_upgrade() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut want = Vec::new();
    for i in 0..16 {
        let data = lazypull_testkit::maketree::random_bytes(16 << 20, 500 + i);
        want.push(Sha256::digest(&data).into());
        fs::write(src.join(format!("big{i}.bin")), data).unwrap();
    }
    let site = Site::new(tmp.path(), &src);
    // Slow data requests keep the readers streaming for a while.
    fs::write(tmp.path().join("faults"), "slow:1,slow_ms:150,only:.zst").unwrap();
    let mut first = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());

    // 1. SIGKILL mid-stream; a new daemon takes the FUSE connection over.
    let handles = readers(&mnt, 0);
    std::thread::sleep(Duration::from_millis(1500));
    let running = handles.iter().filter(|h| !h.is_finished()).count();
    assert_eq!(running, 8, "all readers still streaming at the kill");
    first.kill().unwrap();
    first.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        handles.iter().any(|h| !h.is_finished()),
        "readers wait while no daemon runs"
    );
    let second = site.daemon(&[], "daemon-2.log");
    let log2 = fs::read_to_string(tmp.path().join("daemon-2.log")).unwrap();
    assert!(
        log2.contains("took over the FUSE connection"),
        "the new daemon did not take over:\n{log2}"
    );
    finish(handles, &want, 0, &site);

    // 2. Upgrade in place through the control API.
    let handles = readers(&mnt, 8);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(handles.iter().filter(|h| !h.is_finished()).count(), 8);
    let mut second = second;
    let third = site.daemon(&["--takeover"], "daemon-3.log");
    let old = second.wait().unwrap();
    assert!(
        old.success(),
        "the old daemon handed over and exited 0: {old}"
    );
    let log3 = fs::read_to_string(tmp.path().join("daemon-3.log")).unwrap();
    assert!(log3.contains("took over the FUSE connection"), "{log3}");
    finish(handles, &want, 8, &site);

    // The images the first daemon registered are still known to the third.
    let s = site.status().unwrap();
    assert_eq!(s["images"][0]["fsid"], site.meta.as_str(), "{s}");
    site.umount(&mnt);
    site.shutdown(third);
}
