//! The daemon on this host's kernel (no cachefiles): `lazypull demo`, the FUSE
//! transport end to end (build → web server → daemon → `lazypull mount`), the
//! daemon's local cache after `drop_caches`, status and metrics against the
//! web server's own request count, and failover of the FUSE connection
//! (SIGKILL, then `--takeover`) under streaming readers; and the loop
//! transport (the same FUSE files behind read-only loop devices): a realistic
//! tree identical through it, its loop devices released at unmount, readers
//! right across a SIGKILL and a successor.
//!
//! Needs root, /dev/fuse and EROFS file-backed mounts (the loop tests also
//! /dev/loop-control); fails (never skips) without them.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lazypull::blob_server::BlobServer;
use lazypull_testkit::maketree::{self, TreeOptions};
use lazypull_testkit::proxy::{FaultSource, Proxy};
use lazypull_testkit::{compare_entries, format_differences, scan};
use sha2::{Digest, Sha256};

#[path = "common/lazy_stack.rs"]
mod lazy_stack;

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
    /// `--transport` of its daemons: fuse or loop.
    transport: &'static str,
    /// `--config` of its daemons (default /dev/null: the built-in defaults).
    config: PathBuf,
}

/// `lazypull daemon` over FUSE with every directory, the control socket
/// (`<dir>/run/ctl.sock`) and the fd store under `dir`, logging at info.
fn daemon_command(dir: &Path, config: &Path) -> Command {
    daemon_command_with(dir, config, "fuse")
}

/// [`daemon_command`] with `--transport transport`.
fn daemon_command_with(dir: &Path, config: &Path, transport: &str) -> Command {
    let mut cmd = lazy_stack::daemon_in(dir, config, transport);
    cmd.arg("--fd-store").arg(dir.join("run/fdstore.sock"));
    cmd
}

impl Site {
    fn new(dir: &Path, src: &Path) -> Site {
        Site::with_transport(dir, src, "fuse")
    }

    fn with_transport(dir: &Path, src: &Path, transport: &'static str) -> Site {
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
            transport,
            config: PathBuf::from("/dev/null"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/ctl.sock")
    }

    fn daemon(&self, extra: &[&str], log: &str) -> Child {
        let log = fs::File::create(self.dir.join(log)).unwrap();
        let child = daemon_command_with(&self.dir, &self.config, self.transport)
            .arg("--blob-url")
            .arg(format!("http://{}/", self.proxy.addr()))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
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
        self.mount_with(mnt, &[]);
    }

    fn mount_with(&self, mnt: &Path, extra: &[&str]) {
        ok(
            lazypull()
                .args(["mount", "--fsid", &self.meta])
                .arg(mnt)
                .arg("--socket")
                .arg(self.socket())
                .args(extra)
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

/// After the kernel's caches are dropped, the mounted tree still equals
/// `expected` and the web server sees no request beyond its `served`.
fn assert_warm_read_fetches_nothing(
    site: &Site,
    mnt: &Path,
    expected: &[lazypull_testkit::Entry],
    served: u64,
) {
    drop_caches();
    assert!(compare_entries(expected, &scan(mnt).unwrap()).is_empty());
    assert_eq!(
        site.server.requests(),
        served,
        "the second read reached the backend"
    );
}

/// `n` files `big<i>.bin` of 16 MiB of seeded random bytes in `src`; their
/// sha256 in order.
fn big_files(src: &Path, n: u64, seed: u64) -> Vec<[u8; 32]> {
    fs::create_dir_all(src).unwrap();
    (0..n)
        .map(|i| {
            let data = lazypull_testkit::maketree::random_bytes(16 << 20, seed + i);
            fs::write(src.join(format!("big{i}.bin")), &data).unwrap();
            Sha256::digest(&data).into()
        })
        .collect()
}

/// A site serving `n` big files (at `<dir>/src`) through `transport`, its
/// daemons started with `config` as their config file's text. Returns the
/// files' SHA-256s too.
fn big_site(
    dir: &Path,
    transport: &'static str,
    n: u64,
    seed: u64,
    config: &str,
) -> (Site, Vec<[u8; 32]>) {
    let src = dir.join("src");
    let want = big_files(&src, n, seed);
    let mut site = Site::with_transport(dir, &src, transport);
    site.config = dir.join("config.toml");
    fs::write(&site.config, config).unwrap();
    (site, want)
}

/// A realistic tree at `<dir>/src`: testkit's generated tree plus two copied
/// Python library directories.
fn realistic_src(dir: &Path) -> PathBuf {
    let src = dir.join("src");
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
    src
}

#[test]
fn fuse_serves_a_realistic_image_and_its_cache_answers_after_drop_caches() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = realistic_src(tmp.path());
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
    assert_warm_read_fetches_nothing(&site, &mnt, &expected, served);
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
    let want = big_files(&src, 16, 500);
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

/// Runs `args` as uid 1000, gid 1000, no supplementary groups (util-linux
/// `setpriv`): an unprivileged local user.
fn as_user(args: &[&std::ffi::OsStr]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("these tests run commands as uid 1000 with setpriv (util-linux): install it")
}

/// `what` run as uid 1000 fails with EACCES.
fn denied_to_user(args: &[&std::ffi::OsStr], what: &str) {
    let out = as_user(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Permission denied"),
        "uid 1000 could {what} ({}): {}{err}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
            .chars()
            .take(200)
            .collect::<String>()
    );
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The per-mount options (`ro,nosuid,...`) of the topmost mount at `path`.
fn mount_options(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (Path::new(f[4]) == path).then(|| f[5].to_owned())
        })
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()))
}

/// A temporary directory under /var/tmp that uid 1000 may traverse (the
/// default is 0700), so that what decides its access is lazypull's own modes.
fn traversable_tmp() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

#[test]
fn unprivileged_users_read_the_image_but_not_its_blobs_caches_or_state() {
    use std::os::unix::fs::PermissionsExt;
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = traversable_tmp();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let public = lazypull_testkit::maketree::random_bytes(3 << 20, 77);
    fs::write(src.join("public.bin"), &public).unwrap();
    fs::set_permissions(src.join("public.bin"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(src.join("secret"), b"root only\n").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    // Directories left behind with loose modes (an older daemon, an admin's
    // mkdir) are tightened, not trusted.
    for d in ["cache", "cache/blobs", "work", "work/meta", "run"] {
        fs::create_dir_all(tmp.path().join(d)).unwrap();
        fs::set_permissions(tmp.path().join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let site = Site::new(tmp.path(), &src);
    let daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());

    // Through EROFS, uid 1000 reads what the image lets it read, and only that.
    let out = as_user(&["cat".as_ref(), mnt.join("public.bin").as_os_str()]);
    assert!(
        out.status.success(),
        "uid 1000 cannot read a 0644 file of the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == public, "uid 1000 read wrong bytes");
    denied_to_user(
        &["cat".as_ref(), mnt.join("secret").as_os_str()],
        "read a 0600 file of the image",
    );

    // Not the raw bytes, though: blob files, the cache, the meta copies, the state.
    let blobs = tmp.path().join("blobs");
    denied_to_user(
        &["cat".as_ref(), blobs.join(&site.meta).as_os_str()],
        "read the meta blob's FUSE file",
    );
    let cached: Vec<PathBuf> = fs::read_dir(tmp.path().join("cache/blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let data = cached
        .iter()
        .find(|p| p.extension().is_some_and(|x| x == "data"))
        .unwrap_or_else(|| panic!("no cache .data file after a read: {cached:?}"));
    let data_blob = data.file_stem().unwrap().to_str().unwrap();
    denied_to_user(
        &["cat".as_ref(), blobs.join(data_blob).as_os_str()],
        "read a data blob's FUSE file",
    );
    denied_to_user(
        &["cat".as_ref(), data.as_os_str()],
        "read a cache .data file",
    );
    let meta_copy = tmp.path().join("work/meta").join(&site.meta);
    denied_to_user(
        &["cat".as_ref(), meta_copy.as_os_str()],
        "read a meta blob copy",
    );
    let run = tmp.path().join("run");
    denied_to_user(&["ls".as_ref(), run.as_os_str()], "list the run dir");
    denied_to_user(
        &["cat".as_ref(), run.join("images.json").as_os_str()],
        "read the state file",
    );

    // What root sees: 0700 directories, 0600 files, blob files 0400.
    for d in ["run", "cache", "cache/blobs", "work", "work/meta"] {
        assert_eq!(mode_of(&tmp.path().join(d)), 0o700, "{d}");
    }
    // Wait for a map to be written (the daemon flushes maps every second).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.with_extension("map").exists() {
        assert!(Instant::now() < deadline, "no cache map written");
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in [
        data.clone(),
        data.with_extension("map"),
        meta_copy,
        run.join("images.json"),
    ] {
        assert_eq!(mode_of(&f), 0o600, "{}", f.display());
    }
    assert_eq!(mode_of(&blobs.join(&site.meta)), 0o400);
    assert!(
        !mount_options(&blobs).contains("allow_other"),
        "{}",
        mount_options(&blobs)
    );
    let log = fs::read_to_string(tmp.path().join("daemon.log")).unwrap();
    assert!(
        log.contains(&format!("{}: tightened", run.display())),
        "the daemon logs the directories it tightened:\n{log}"
    );
    site.umount(&mnt);
    site.shutdown(daemon);
}

#[test]
fn image_mounts_are_nosuid_and_nodev_unless_asked() {
    use std::os::unix::fs::PermissionsExt;
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = traversable_tmp();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    // A hostile image: a setuid-root `id` and a 0666 device node (/dev/null's).
    fs::copy("/usr/bin/id", src.join("suid-id")).unwrap();
    fs::set_permissions(src.join("suid-id"), fs::Permissions::from_mode(0o4755)).unwrap();
    ok(
        Command::new("mknod")
            .args(["-m", "0666"])
            .arg(src.join("null"))
            .args(["c", "1", "3"])
            .output()
            .unwrap(),
        "mknod",
    );
    let site = Site::new(tmp.path(), &src);
    let daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    let _guard = Unmount(mnt.clone());
    let euid_of_suid_id = |dir: &Path| -> String {
        let out = as_user(&[dir.join("suid-id").as_os_str(), "-u".as_ref()]);
        ok(out, "running the image's setuid id as uid 1000")
            .trim()
            .to_owned()
    };

    // By default: no setuid, no devices.
    site.mount(&mnt);
    let opts = mount_options(&mnt);
    assert!(
        opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"),
        "the image is mounted {opts}"
    );
    assert_eq!(
        mode_of(&mnt.join("suid-id")),
        0o4755,
        "the image keeps the bit"
    );
    assert_eq!(
        euid_of_suid_id(&mnt),
        "1000",
        "a setuid binary of the image gave root"
    );
    let err = fs::File::open(mnt.join("null")).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EACCES),
        "opening the device: {err}"
    );

    // A container root file system stacked on it (overlayfs, as containerd's
    // snapshotter does) keeps setuid and devices: the lower mount's flags do
    // not apply to the overlay's files.
    let ovl = tmp.path().join("ovl");
    fs::create_dir_all(&ovl).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &ovl,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    let _ovl_guard = Unmount(ovl.clone());
    for d in ["upper", "work", "root"] {
        fs::create_dir(ovl.join(d)).unwrap();
    }
    fs::set_permissions(&ovl, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(ovl.join("root"), fs::Permissions::from_mode(0o755)).unwrap();
    let data = std::ffi::CString::new(format!(
        "lowerdir={},upperdir={},workdir={}",
        mnt.display(),
        ovl.join("upper").display(),
        ovl.join("work").display()
    ))
    .unwrap();
    rustix::mount::mount(
        "overlay",
        ovl.join("root"),
        "overlay",
        rustix::mount::MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .expect("mounting an overlay on the image");
    let root_guard = Unmount(ovl.join("root"));
    assert_eq!(
        euid_of_suid_id(&ovl.join("root")),
        "0",
        "setuid through the overlay"
    );
    fs::File::open(ovl.join("root/null")).expect("the device through the overlay");
    drop(root_guard);
    drop(_ovl_guard);

    // Asked for: both kept.
    site.umount(&mnt);
    site.mount_with(&mnt, &["--suid", "--dev"]);
    let opts = mount_options(&mnt);
    assert!(
        !opts.contains("nosuid") && !opts.contains("nodev"),
        "mounted with --suid --dev: {opts}"
    );
    assert_eq!(euid_of_suid_id(&mnt), "0", "--suid keeps setuid");
    fs::File::open(mnt.join("null")).expect("--dev keeps devices");
    site.umount(&mnt);
    site.shutdown(daemon);
}

#[test]
fn a_lookup_of_an_unregistered_name_reaches_no_backend() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"some bytes\n").unwrap();
    let site = Site::new(tmp.path(), &src);
    let daemon = site.daemon(&[], "daemon.log");
    let blobs = tmp.path().join("blobs");
    let before = site.server.requests();
    // The web server holds this meta blob, but no image with it is registered;
    // the other name is nowhere.
    for name in [site.meta.as_str(), &"0".repeat(64)] {
        let err = fs::metadata(blobs.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{name}: {err}");
    }
    assert_eq!(
        site.server.requests(),
        before,
        "a lookup of an unregistered name reached the web server"
    );
    // Registered, it is there.
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"some bytes\n");
    fs::metadata(blobs.join(&site.meta)).expect("a registered meta blob's file");
    site.umount(&mnt);
    site.shutdown(daemon);
}

/// A registry on 127.0.0.1 serving one manifest (`v1`), and for every blob
/// an endless body: 200 without `Content-Length`, `STREAMED` bytes until the
/// client hangs up. Nothing is stored: the bytes are made as they are sent.
struct EndlessRegistry {
    addr: std::net::SocketAddr,
    blob_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: Option<std::thread::JoinHandle<Vec<std::thread::JoinHandle<()>>>>,
}

impl EndlessRegistry {
    /// What a blob body would run to: 4 GiB.
    const STREAMED: u64 = 4 << 30;

    /// Serving a lazypull (format 2) manifest whose meta blob declares
    /// `meta_size` bytes, with no data blobs.
    fn with_meta(meta_size: u64) -> EndlessRegistry {
        let image = lazypull_oci::lazy::LazyImage {
            meta: lazypull_oci::lazy::BlobRef {
                digest: format!("sha256:{}", "a".repeat(64)),
                size: meta_size,
            },
            chunk_size: 1 << 20,
            blobs: vec![],
        };
        let config =
            serde_json::to_vec(&image.config(&lazypull_oci::lazy::minimal_config()).unwrap())
                .unwrap();
        Self::serving(serde_json::to_value(image.manifest(&config)).unwrap())
    }

    fn serving(manifest: serde_json::Value) -> EndlessRegistry {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let blob_requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let manifest = manifest.to_string();
        let (requests, stop2) = (blob_requests.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let (manifest, requests) = (manifest.clone(), requests.clone());
                conns.push(std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    let _ = r.read_line(&mut line);
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    if path.ends_with("/manifests/v1") {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{manifest}",
                            manifest.len()
                        );
                    } else if path.contains("/blobs/") {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                        let chunk = vec![b'x'; 64 << 10];
                        let mut sent = 0u64;
                        // Ends when the client hangs up (the write fails).
                        while sent < Self::STREAMED && conn.write_all(&chunk).is_ok() {
                            sent += chunk.len() as u64;
                        }
                    } else {
                        let _ = conn.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                }));
            }
            conns
        });
        EndlessRegistry {
            addr,
            blob_requests,
            stop,
            accept: Some(accept),
        }
    }

    fn blob_requests(&self) -> u64 {
        self.blob_requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for EndlessRegistry {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            for c in t.join().unwrap() {
                let _ = c.join();
            }
        }
    }
}

/// Peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM in /proc/PID/status")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// The issue-10 probe: a registry that streams 4 GiB for an image's meta
/// blob. The daemon reads no more than the manifest declares (and a meta blob
/// declared past the limit is refused before any download): its peak RSS
/// stays under 64 MiB and `lazypull mount` fails saying why. The config is
/// the container runtime's: it is never fetched, whatever it declares.
/// Manifests of other formats, or of ordinary images, fail naming that,
/// before any blob is fetched.
#[test]
fn a_registry_streaming_4_gib_for_a_meta_blob_is_cut_off_within_the_memory_bound() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"some bytes\n").unwrap();
    let site = Site::new(tmp.path(), &src);
    let daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mount = |reg: &EndlessRegistry| {
        let out = lazypull()
            .arg("mount")
            .arg(format!("{}/evil/img:v1", reg.addr))
            .arg(&mnt)
            .arg("--socket")
            .arg(site.socket())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the mount of a hostile image succeeded"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // A meta blob declared past the limit (1 GiB by default): refused
    // before the download.
    let reg = EndlessRegistry::with_meta(2 << 30);
    let err = mount(&reg);
    eprintln!("{err}");
    assert!(
        err.contains("meta blob") && err.contains(&(2u64 << 30).to_string()),
        "unclear error: {err}"
    );
    assert_eq!(reg.blob_requests(), 0, "{err}");
    drop(reg);
    // Small, while its body runs on for 4 GiB: cut off at the declared size.
    let reg = EndlessRegistry::with_meta(5000);
    let err = mount(&reg);
    eprintln!("{err}");
    assert!(
        err.contains("meta blob") && err.contains("5000 bytes"),
        "unclear error: {err}"
    );
    assert_eq!(reg.blob_requests(), 1, "{err}");
    drop(reg);

    // Format 1 (its config a lazypull document, declared 4 GiB), a format
    // this lazypull does not know, an ordinary image: each named, no blob
    // fetched.
    let v1 = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": lazypull_oci::lazy::FORMAT1_CONFIG_MEDIA_TYPE,
            "digest": format!("sha256:{}", "c".repeat(64)),
            "size": EndlessRegistry::STREAMED,
        },
        "layers": [],
    });
    let mut v3 = v1.clone();
    v3["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    v3["annotations"] = serde_json::json!({(lazypull_oci::lazy::FORMAT_ANNOTATION): "3"});
    let mut ordinary = v1.clone();
    ordinary["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    ordinary["layers"] = serde_json::json!([{
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": format!("sha256:{}", "d".repeat(64)),
        "size": 100,
    }]);
    for (manifest, want) in [
        (v1, "lazypull image format 1"),
        (v3, "lazypull image format \"3\""),
        (ordinary, "not a lazypull image"),
    ] {
        let reg = EndlessRegistry::serving(manifest);
        let err = mount(&reg);
        eprintln!("{err}");
        assert!(err.contains(want), "want {want:?} in: {err}");
        assert_eq!(reg.blob_requests(), 0, "{err}");
        drop(reg);
    }

    let peak = peak_rss(daemon.id());
    eprintln!("daemon peak RSS: {} KiB", peak >> 10);
    assert!(
        peak < 64 << 20,
        "the daemon's peak RSS reached {} MiB",
        peak >> 20
    );
    assert!(site.status().is_some(), "the daemon stopped serving");
    site.shutdown(daemon);
}

/// Data requests (`.zst`) the proxy has answered so far, once it is idle.
fn data_requests(site: &Site) -> usize {
    assert!(site.proxy.wait_idle(Duration::from_secs(60)), "proxy busy");
    lazypull_testkit::proxy::read_log(site.dir.join("proxy.log"))
        .unwrap()
        .iter()
        .filter(|e| e.path.contains(".zst"))
        .count()
}

/// Prefetch threads have an owner: unmounting the image stops and joins its
/// prefetch (status lists none, and the backend gets no request after the
/// unmount returned), and so does shutting the daemon down. A slow backend
/// (500 ms per data request, 64 MiB of incompressible data in 4 MiB pieces:
/// 8 s at least) keeps the prefetch running meanwhile.
#[test]
fn prefetch_threads_stop_at_unmount_and_at_shutdown() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        let data = lazypull_testkit::maketree::random_bytes(16 << 20, 900 + i);
        fs::write(src.join(format!("big{i}.bin")), data).unwrap();
    }
    let site = Site::new(tmp.path(), &src);
    fs::write(tmp.path().join("faults"), "slow:1,slow_ms:500,only:.zst").unwrap();
    let daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    site.mount_with(&mnt, &["--prefetch-all"]);
    let guard = Unmount(mnt.clone());
    let s = site.status().unwrap();
    assert_eq!(
        s["prefetching"],
        serde_json::json!([site.meta]),
        "no prefetch listed: {s}"
    );

    site.umount(&mnt);
    drop(guard);
    let s = site.status().unwrap();
    assert_eq!(s["prefetching"], serde_json::json!([]), "{s}");
    let log = fs::read_to_string(tmp.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("prefetch stopped") && !log.contains("prefetch finished"),
        "the prefetch was not stopped at the unmount:\n{log}"
    );
    let after_stop = data_requests(&site);
    // A prefetch still running would have sent two more by now; none did.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        data_requests(&site),
        after_stop,
        "the backend got requests after the prefetch was stopped"
    );

    // Shutdown stops (and joins) a prefetch still running too.
    site.mount_with(&mnt, &["--prefetch-all"]);
    let guard = Unmount(mnt.clone());
    let s = site.status().unwrap();
    assert_eq!(s["prefetching"], serde_json::json!([site.meta]), "{s}");
    drop(guard);
    site.shutdown(daemon);
    let log = fs::read_to_string(tmp.path().join("daemon.log")).unwrap();
    assert_eq!(
        log.matches("prefetch stopped").count(),
        2,
        "the prefetch was not stopped at shutdown:\n{log}"
    );
    let after_exit = data_requests(&site);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(data_requests(&site), after_exit);
}

/// The data blob names of the build output in `out`.
fn data_blobs(out: &Path) -> Vec<String> {
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    m["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the daemon saved a FUSE session naming every one of `blobs`:
/// it saves it every 200 ms, and a successor after a kill knows only the
/// nodes saved.
fn wait_session_names(run_dir: &Path, blobs: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(run_dir.join("transport.json"))
        .is_ok_and(|t| blobs.iter().all(|b| t.contains(b.as_str())))
    {
        assert!(Instant::now() < deadline, "the FUSE session is never saved");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (inode, bytes) of a state file, to tell whether anyone replaced it.
fn state_file(path: &Path) -> (u64, Vec<u8>) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.ino(), fs::read(path).unwrap())
}

#[test]
fn a_second_daemon_beside_a_running_one_changes_nothing_and_says_why() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let data = lazypull_testkit::maketree::random_bytes(6 << 20, 77);
    let want: [u8; 32] = Sha256::digest(&data).into();
    fs::write(src.join("big.bin"), &data).unwrap();
    let site = Site::new(tmp.path(), &src);
    let first = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    assert_eq!(sha(&mnt.join("big.bin")).unwrap(), want);
    let images = tmp.path().join("run/images.json");
    let before = state_file(&images);

    // The same command line as the first daemon's.
    let out = daemon_command(tmp.path(), Path::new("/dev/null"))
        .arg("--blob-url")
        .arg(format!("http://{}/", site.proxy.addr()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon ran: {err}");
    let why = format!(
        "another lazypull daemon (pid {}) is serving at {}; use --takeover to replace it",
        first.id(),
        site.socket().display()
    );
    assert!(err.contains(&why), "expected {why:?} in:\n{err}");
    assert_eq!(
        state_file(&images),
        before,
        "the second daemon rewrote images.json"
    );

    // The first one serves on, unchanged.
    let s = site.status().unwrap();
    assert_eq!(s["pid"].as_u64(), Some(first.id().into()));
    drop_caches();
    assert_eq!(sha(&mnt.join("big.bin")).unwrap(), want);
    // And its fd store still holds the FUSE connection: a successor after a
    // crash takes it over, and the mount reads on.
    wait_session_names(
        &tmp.path().join("run"),
        &data_blobs(&tmp.path().join("www")),
    );
    let mut first = first;
    first.kill().unwrap();
    first.wait().unwrap();
    let third = site.daemon(&[], "daemon-3.log");
    let log = fs::read_to_string(tmp.path().join("daemon-3.log")).unwrap();
    assert!(log.contains("took over the FUSE connection"), "{log}");
    drop_caches();
    assert_eq!(sha(&mnt.join("big.bin")).unwrap(), want);
    site.umount(&mnt);
    site.shutdown(third);
}

/// `lazypull mount REF MNT --insecure` through `site`'s daemon.
fn mount_reference(site: &Site, reference: &str, mnt: &Path) -> Output {
    lazypull()
        .args(["mount", reference])
        .arg(mnt)
        .arg("--insecure")
        .arg("--socket")
        .arg(site.socket())
        .output()
        .unwrap()
}

/// Makes `out` (a build output) lie about data blob `name`: its stored form
/// becomes that of `liar` (another blob of the same size, in `liar_dir`) under
/// a chunk table that declares `name` (checksum fixed, so it decodes), and the
/// meta blob's trailer vouches for that table. A chain as consistent as an
/// honest one: only the whole blob's digest, which nothing reads lazily, would
/// tell. Returns the new meta digest.
fn forge_blob(out: &Path, name: &str, liar_dir: &Path, liar: &str) -> String {
    let mut table = fs::read(liar_dir.join(format!("{liar}.table"))).unwrap();
    table[40..72].copy_from_slice(&hex::decode(name).unwrap());
    let n = table.len();
    let sum = Sha256::digest(&table[..n - 32]);
    table[n - 32..].copy_from_slice(&sum);
    fs::write(out.join(format!("{name}.table")), &table).unwrap();
    fs::copy(
        liar_dir.join(format!("{liar}.zst")),
        out.join(format!("{name}.zst")),
    )
    .unwrap();
    let manifest_path = out.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    let old = manifest["meta"].as_str().unwrap().to_owned();
    let bytes = fs::read(out.join(&old)).unwrap();
    let image = lazypull_erofs::Image::from_bytes(bytes.clone()).unwrap();
    let mut trailer = image.trailer().unwrap().expect("built with a trailer");
    for e in &mut trailer.entries {
        let t = fs::read(out.join(format!("{}.table", e.name()))).unwrap();
        e.table = Some(lazypull_erofs::TableRef {
            sha256: Sha256::digest(&t).into(),
            size: t.len() as u64,
        });
    }
    let sealed =
        lazypull_erofs::append_trailer(bytes[..image.image_len() as usize].to_vec(), &trailer);
    let meta = hex::encode(Sha256::digest(&sealed));
    fs::write(out.join(&meta), sealed).unwrap();
    fs::remove_file(out.join(&old)).unwrap();
    manifest["meta"] = meta.clone().into();
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    meta
}

fn build_json(src: &Path, out: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(
        lazypull()
            .arg("build")
            .arg(src)
            .arg("-o")
            .arg(out)
            .arg("--json")
            .output()
            .unwrap(),
        "lazypull build",
    ))
    .unwrap()
}

/// The issue's probe: a trusted image served from a web server (by fsid) and a
/// hostile image from a registry that declares the trusted image's data blob
/// name with another chunk table and other bytes. In either order, and across
/// daemons sharing one cache, the trusted image's files read back byte-exact:
/// the hostile registration is refused (naming both images), or, when the
/// hostile image came first, the trusted one is refused rather than served the
/// hostile bytes, and a later daemon discards the cache the hostile image
/// filled under its own table.
#[test]
fn an_image_whose_blob_names_collide_cannot_change_a_byte_a_trusted_image_serves() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (src, liar_src) = (tmp.path().join("src"), tmp.path().join("liar-src"));
    let big = lazypull_testkit::maketree::random_bytes(3 << 20, 41);
    let evil = lazypull_testkit::maketree::random_bytes(3 << 20, 42);
    for (dir, data, text) in [(&src, &big, "trusted\n"), (&liar_src, &evil, "hostile\n")] {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("big.bin"), data).unwrap();
        fs::write(dir.join("hello.txt"), text).unwrap();
    }
    let site = Site::new(tmp.path(), &src);
    let trusted: serde_json::Value =
        serde_json::from_slice(&fs::read(tmp.path().join("www/manifest.json")).unwrap()).unwrap();
    let name = trusted["blobs"][0].as_str().unwrap().to_owned();

    // The hostile image: the same tree plus an empty file (another meta blob,
    // the same data blob name), its blob's stored form swapped for the liar's.
    let hostile_src = tmp.path().join("hostile-src");
    fs::create_dir_all(&hostile_src).unwrap();
    fs::write(hostile_src.join("big.bin"), &big).unwrap();
    fs::write(hostile_src.join("hello.txt"), "trusted\n").unwrap();
    fs::write(hostile_src.join("marker"), "").unwrap();
    let hostile_out = tmp.path().join("hostile");
    let hostile = build_json(&hostile_src, &hostile_out);
    assert_eq!(
        hostile["blobs"][0]["digest"],
        name.as_str(),
        "the same data blob"
    );
    let liar_out = tmp.path().join("liar");
    let liar = build_json(&liar_src, &liar_out);
    assert_eq!(liar["blobs"][0]["size"], hostile["blobs"][0]["size"]);
    forge_blob(
        &hostile_out,
        &name,
        &liar_out,
        liar["blobs"][0]["digest"].as_str().unwrap(),
    );
    let registry =
        lazypull_testkit::registry::RegistryServer::start(&tmp.path().join("reg"), None).unwrap();
    let hostile_ref = format!("{}/evil/app:v1", registry.addr());
    ok(
        lazypull()
            .arg("push")
            .arg(&hostile_out)
            .arg(&hostile_ref)
            .output()
            .unwrap(),
        "lazypull push",
    );

    let mnt = tmp.path().join("mnt");
    let mnt2 = tmp.path().join("mnt2");
    let _guard = Unmount(mnt.clone());
    let _guard2 = Unmount(mnt2.clone());
    let check_trusted = |what: &str| {
        let got = fs::read(mnt.join("big.bin")).unwrap();
        assert!(got == big, "{what}: the trusted image served other bytes");
        assert_eq!(
            fs::read_to_string(mnt.join("hello.txt")).unwrap(),
            "trusted\n",
            "{what}"
        );
    };
    let refused = |out: Output, image: &str, first: &str| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "the colliding image {image} was mounted"
        );
        for want in ["refusing image", image, first, name.as_str()] {
            assert!(err.contains(want), "want {want:?} in: {err}");
        }
    };

    // 1. The trusted image first: the hostile one is refused.
    let daemon = site.daemon(&[], "daemon.log");
    site.mount(&mnt);
    check_trusted("mounted alone");
    refused(
        mount_reference(&site, &hostile_ref, &mnt2),
        &hostile_ref,
        &site.meta,
    );
    drop_caches();
    check_trusted("after the hostile image was refused");
    site.umount(&mnt);
    site.shutdown(daemon);

    // 2. The hostile image first (a new daemon, the same cache): it is served
    // its own bytes, and the trusted image is refused rather than served them.
    let daemon = site.daemon(&[], "daemon-2.log");
    let out = mount_reference(&site, &hostile_ref, &mnt2);
    assert!(
        out.status.success(),
        "the hostile image alone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(mnt2.join("big.bin")).unwrap() == evil,
        "the forged chain serves the liar's bytes (and fills the cache with them)"
    );
    refused(
        lazypull()
            .args(["mount", "--fsid", &site.meta])
            .arg(&mnt)
            .arg("--socket")
            .arg(site.socket())
            .output()
            .unwrap(),
        &site.meta,
        &hostile_ref,
    );
    site.umount(&mnt2);
    site.shutdown(daemon);

    // 3. A later daemon, the cache the hostile image filled: discarded, the
    // trusted image fetches its own bytes again.
    let daemon = site.daemon(&[], "daemon-3.log");
    let before = site.server.requests();
    site.mount(&mnt);
    check_trusted("over a cache the hostile image filled");
    assert!(
        site.server.requests() > before,
        "the trusted image's data came from its web server"
    );
    site.umount(&mnt);
    site.shutdown(daemon);
}

/// Polls `lazypull status` on `socket` until `done` holds for it.
fn wait_status(
    socket: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = lazypull()
            .args(["status", "--json", "--socket"])
            .arg(socket)
            .output()
            .unwrap();
        if out.status.success() {
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: never; last status {s}");
        } else {
            assert!(
                Instant::now() < deadline,
                "{what}: the daemon does not answer"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_restart_during_a_registry_outage_keeps_the_image_and_brings_it_back() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = tmp.path();
    let registry =
        lazypull_testkit::registry::RegistryServer::start(&dir.join("registry"), None).unwrap();
    // Two images: `up` stays reachable through the outage, `down` does not.
    let names = ["up", "down"];
    let mut want = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let src = dir.join("src").join(name);
        fs::create_dir_all(&src).unwrap();
        let data = lazypull_testkit::maketree::random_bytes(3 << 20, 91 + i as u64);
        want.push(<[u8; 32]>::from(Sha256::digest(&data)));
        fs::write(src.join("big.bin"), &data).unwrap();
        let img = dir.join("img").join(name);
        ok(
            lazypull()
                .arg("build")
                .arg(&src)
                .arg("-o")
                .arg(&img)
                .output()
                .unwrap(),
            "lazypull build",
        );
        ok(
            lazypull()
                .arg("push")
                .arg(&img)
                .arg(format!("{}/lp/{name}:v1", registry.addr()))
                .output()
                .unwrap(),
            "lazypull push",
        );
    }
    // The daemon reaches the registry through a proxy that can answer 503.
    let proxy = Proxy::start(
        registry.addr(),
        dir.join("proxy.log"),
        FaultSource::Fixed(String::new()),
    )
    .unwrap();
    // One attempt per request: the outage shows at once.
    fs::write(dir.join("config.toml"), "retries = 1\n").unwrap();
    let socket = dir.join("run/ctl.sock");
    let start = |log: &str| -> Child {
        let child = daemon_command(dir, &dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join(log)).unwrap())
            .spawn()
            .unwrap();
        let pid = u64::from(child.id());
        wait_status(&socket, "daemon up", |s| s["pid"].as_u64() == Some(pid));
        child
    };
    let mut first = start("daemon.log");
    let _blobs = Unmount(dir.join("blobs"));
    let mut guards = Vec::new();
    let mnts: Vec<PathBuf> = names.iter().map(|n| dir.join(format!("mnt-{n}"))).collect();
    for (name, mnt) in names.iter().zip(&mnts) {
        ok(
            lazypull()
                .arg("mount")
                .arg(format!("{}/lp/{name}:v1", proxy.addr()))
                .arg(mnt)
                .arg("--socket")
                .arg(&socket)
                .output()
                .unwrap(),
            "lazypull mount",
        );
        guards.push(Unmount(mnt.clone()));
    }
    for (mnt, want) in mnts.iter().zip(&want) {
        assert_eq!(&sha(&mnt.join("big.bin")).unwrap(), want);
    }
    let images = dir.join("run/images.json");
    // The saved images, by repository.
    let saved = |why: &str| -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&images).unwrap()).unwrap();
        let mut list = v["images"].as_array().cloned().unwrap_or_default();
        list.sort_by_key(|i| i["request"]["reference"].as_str().map(str::to_owned));
        let refs: Vec<_> = list
            .iter()
            .map(|i| i["request"]["reference"].clone())
            .collect();
        assert!(
            refs.len() == 2
                && refs[0].as_str().unwrap().contains("/lp/down@")
                && refs[1].as_str().unwrap().contains("/lp/up@"),
            "{why}: {v}"
        );
        list
    };
    let before = saved("after the mounts");
    // The daemon saves the FUSE session (which node is which blob) every
    // 200 ms: let it name both images' data blobs before it is killed.
    let blobs: Vec<String> = names
        .iter()
        .flat_map(|n| data_blobs(&dir.join("img").join(n)))
        .collect();
    wait_session_names(&dir.join("run"), &blobs);

    // The registry of `down` goes away; the daemon dies and a new one starts.
    proxy.set_faults("5xx:1,only:/lp/down/").unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    let second = start("daemon-2.log");
    let s = wait_status(&socket, "the image reported as not restored", |s| {
        s["restoring"].as_array().is_some_and(|r| r.len() == 1)
    });
    let r = &s["restoring"][0];
    assert!(
        r["reference"].as_str().unwrap().contains("/lp/down@"),
        "{s}"
    );
    assert_eq!(r["state"], "failed", "{s}");
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("503")),
        "{s}"
    );
    assert_eq!(s["images"].as_array().unwrap().len(), 1, "{s}");
    let during = saved("during the outage (up was registered again)");
    for (d, b) in during.iter().zip(&before) {
        assert_eq!(d["request"], b["request"]);
        assert_eq!(d["mountpoints"], b["mountpoints"]);
    }

    // The registry is back: the daemon registers the image again by itself,
    // and the mount reads on.
    proxy.set_faults("").unwrap();
    let s = wait_status(&socket, "the image back", |s| {
        s["images"].as_array().is_some_and(|i| i.len() == 2)
            && s["restoring"].as_array().is_some_and(Vec::is_empty)
    });
    let mounted: Vec<_> = s["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["mountpoints"][0].as_str().unwrap().to_owned())
        .collect();
    for mnt in &mnts {
        assert!(mounted.contains(&mnt.to_str().unwrap().to_owned()), "{s}");
    }
    drop_caches();
    for (mnt, want) in mnts.iter().zip(&want) {
        let got = sha(&mnt.join("big.bin")).unwrap_or_else(|e| {
            let log = fs::read_to_string(dir.join("daemon-2.log")).unwrap_or_default();
            panic!(
                "reading {} once its image is back: {e}\n{log}",
                mnt.display()
            )
        });
        assert_eq!(&got, want);
    }
    let after = saved("after the outage");
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a["request"], b["request"]);
    }
    for mnt in &mnts {
        ok(
            lazypull()
                .arg("umount")
                .arg(mnt)
                .arg("--socket")
                .arg(&socket)
                .output()
                .unwrap(),
            "lazypull umount",
        );
    }
    ok(
        lazypull()
            .arg("shutdown")
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap(),
        "lazypull shutdown",
    );
    let mut second = second;
    assert!(second.wait().unwrap().success());
}

/// containerd's `hosts.toml` on the daemon's read path: a second
/// docker-registry, a pull-through cache (`proxy: remoteurl:`) of the
/// first, declared as its mirror; a lazy image mounts and its data is read
/// by range through the mirror (the mirror's log shows the 206s, the
/// upstream's none); the mirror stops in the middle of the reads and they
/// go on from the upstream, with the right bytes, each fallback counted.
#[test]
fn a_lazy_image_reads_through_a_pull_through_mirror_and_from_the_upstream_when_it_stops() {
    use lazypull_testkit::registry::{RegistryOptions, RegistryServer};
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = tmp.path();
    let upstream = RegistryServer::start(&dir.join("upstream"), None).unwrap();
    let remote = format!("http://{}", upstream.host());
    let mut mirror = RegistryServer::start_with(
        &dir.join("mirror"),
        &RegistryOptions {
            proxy_remote: Some(&remote),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    let first = lazypull_testkit::maketree::random_bytes(6 << 20, 5);
    let second = lazypull_testkit::maketree::random_bytes(6 << 20, 6);
    fs::write(src.join("first.bin"), &first).unwrap();
    fs::write(src.join("second.bin"), &second).unwrap();
    let img = dir.join("img");
    ok(
        lazypull()
            .arg("build")
            .arg(&src)
            .arg("-o")
            .arg(&img)
            .output()
            .unwrap(),
        "lazypull build",
    );
    let reference = format!("{}/lp/mirrored:v1", upstream.host());
    ok(
        lazypull()
            .arg("push")
            .arg(&img)
            .arg(&reference)
            .output()
            .unwrap(),
        "lazypull push",
    );
    // Another node pulled the image through the mirror already: it holds
    // every blob (a pull-through cache answers a Range only from what it
    // holds; the first request of a blob it streams whole from upstream).
    let via_mirror = lazypull_backend::Registry::new(
        &mirror.host(),
        "lp/mirrored",
        None,
        &lazypull_backend::ClientOptions::default(),
    )
    .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&via_mirror.get_manifest("v1").unwrap().bytes).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        let size = layer["size"].as_u64().unwrap();
        via_mirror.get_blob_sized(d, size, &|_| {}).unwrap();
        let stored = dir.join(format!(
            "mirror/data/docker/registry/v2/blobs/sha256/{}/{}/data",
            &d[7..9],
            &d[7..]
        ));
        let t0 = Instant::now();
        while fs::metadata(&stored).map(|m| m.len()).unwrap_or(0) != size {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the mirror never stored {d}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let ranges_logged = |reg: &RegistryServer| {
        reg.access_log()
            .iter()
            .filter(|(m, p, s)| m == "GET" && p.contains("/blobs/") && *s == 206)
            .count()
    };
    let upstream_before = ranges_logged(&upstream);

    let certs = dir.join("certs.d");
    fs::create_dir_all(certs.join(upstream.host())).unwrap();
    fs::write(
        certs.join(upstream.host()).join("hosts.toml"),
        lazypull_testkit::containerd::mirror_hosts_toml(&upstream.host(), &mirror.host()),
    )
    .unwrap();
    // No read-ahead: what is read is what is fetched, so the second file's
    // bytes are still to fetch when the mirror stops.
    fs::write(
        dir.join("config.toml"),
        format!(
            "retries = 2\nreadahead = 0\nhosts_dir = \"{}\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let socket = dir.join("run/ctl.sock");
    let mut daemon = daemon_command(dir, &dir.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = u64::from(daemon.id());
    wait_status(&socket, "daemon up", |s| s["pid"].as_u64() == Some(pid));
    let _blobs = Unmount(dir.join("blobs"));
    let mnt = dir.join("mnt");
    ok(
        lazypull()
            .arg("mount")
            .arg(&reference)
            .arg(&mnt)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap(),
        "lazypull mount",
    );
    let _mnt = Unmount(mnt.clone());
    let digest = |b: &[u8]| <[u8; 32]>::from(Sha256::digest(b));
    assert_eq!(sha(&mnt.join("first.bin")).unwrap(), digest(&first));
    let through_mirror = ranges_logged(&mirror);
    assert!(
        through_mirror >= 2,
        "the mirror served {through_mirror} range reads"
    );
    assert_eq!(
        ranges_logged(&upstream),
        upstream_before,
        "the upstream served range reads while the mirror was up"
    );

    mirror.stop();
    assert_eq!(sha(&mnt.join("second.bin")).unwrap(), digest(&second));
    assert!(ranges_logged(&upstream) > upstream_before);
    let s = wait_status(&socket, "mirror fallbacks counted", |s| {
        s["backend_http"]["mirror_fallbacks"].as_u64() > Some(0)
    });
    assert_eq!(s["backend_http"]["failures"], 0, "{s}");
    let log = fs::read_to_string(dir.join("daemon.log")).unwrap();
    assert!(
        log.contains(&format!("mirror http://{} failed", mirror.host())),
        "{log}"
    );
    drop(_mnt);
    let _ = lazypull()
        .arg("shutdown")
        .arg("--socket")
        .arg(&socket)
        .arg("--fd-store")
        .arg(dir.join("run/fdstore.sock"))
        .output();
    let _ = daemon.wait();
}

/// The loop devices bound now whose backing files lie under `dir`.
fn loops_under(dir: &Path) -> Vec<lazypull_transport::loopdev::Attached> {
    lazypull_transport::loopdev::attached_under(dir).expect("listing /sys/block/loop*")
}

/// Waits (up to 10 s) until no loop device is backed by a file under `dir`.
fn assert_loops_released(dir: &Path, site: &Site) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !loops_under(dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "loop devices still bound after the unmount: {:?}\n{}",
            loops_under(dir),
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn require_loop() {
    require_host();
    assert!(
        Path::new("/dev/loop-control").exists(),
        "the loop transport tests need /dev/loop-control (CONFIG_BLK_DEV_LOOP, `modprobe loop`)"
    );
}

/// What the kernel mounted at `mnt`: (source, fstype, options) from /proc/self/mounts.
fn mounted_at(mnt: &Path) -> (String, String, String) {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let mnt = fs::canonicalize(mnt).unwrap();
    mounts
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(1) == Some(&mnt.to_str().unwrap()))
                .then(|| (f[0].to_owned(), f[2].to_owned(), f[3].to_owned()))
        })
        .unwrap_or_else(|| panic!("nothing mounted at {}", mnt.display()))
}

#[test]
fn loop_serves_a_realistic_image_identical_and_its_unmount_releases_the_loop_devices() {
    require_loop();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = realistic_src(tmp.path());
    let site = Site::with_transport(tmp.path(), &src, "loop");
    let daemon = site.daemon(&[], "daemon.log");
    let s = site.status().unwrap();
    assert_eq!(s["transport"]["kind"], "loop", "{s}");
    assert!(
        s["transport"]["reason"]
            .as_str()
            .unwrap()
            .contains("--transport loop"),
        "{s}"
    );
    assert!(
        loops_under(tmp.path()).is_empty(),
        "no loop device before a mount"
    );
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());

    // EROFS mounted a loop device, with one loop device per data blob, each
    // read-only and autoclear over a blob file of this site.
    let (source, fstype, options) = mounted_at(&mnt);
    assert_eq!(fstype, "erofs");
    assert!(source.starts_with("/dev/loop"), "mounted from {source}");
    let loops = loops_under(tmp.path());
    let data = data_blobs(&tmp.path().join("www"));
    assert_eq!(
        loops.len(),
        1 + data.len(),
        "one loop device for the meta blob and one per data blob: {loops:?}"
    );
    assert!(
        loops.iter().any(|l| l.device == Path::new(&source)),
        "{source} is one of them: {loops:?}"
    );
    for l in &loops {
        assert!(l.read_only && l.autoclear, "{l:?}");
        assert!(options.split(',').any(|o| o == "ro"), "{options}");
    }
    for blob in &data {
        assert!(
            loops
                .iter()
                .any(|l| l.backing_file == tmp.path().join("blobs").join(blob)),
            "data blob {blob} is read through its FUSE file: {loops:?}"
        );
    }

    let expected = scan(&src).unwrap();
    let diffs = compare_entries(&expected, &scan(&mnt).unwrap());
    assert!(
        diffs.is_empty(),
        "mounted through loop devices, the image differs from its source:\n{}",
        format_differences(&diffs, 30)
    );
    let served = site.server.requests();
    assert!(served > 2, "the data came from the web server: {served}");
    // Again with the kernel's caches (EROFS's, the loop devices', the FUSE
    // files') dropped: the daemon's cache answers, the server sees nothing.
    assert_warm_read_fetches_nothing(&site, &mnt, &expected, served);

    site.umount(&mnt);
    assert_loops_released(tmp.path(), &site);
    site.shutdown(daemon);
}

/// `loop_direct_io = true` reaches the loop devices `lazypull mount` makes
/// (the kernel turns direct I/O on for loop devices over FUSE files), and
/// the bytes read through them are right, cold and after drop_caches.
#[test]
fn loop_direct_io_from_the_config_reaches_the_loop_devices() {
    require_loop();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (site, want) = big_site(tmp.path(), "loop", 2, 900, "loop_direct_io = true\n");
    let daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    let loops = loops_under(tmp.path());
    assert!(!loops.is_empty());
    assert!(
        loops.iter().all(|l| l.direct_io),
        "direct I/O asked for, the kernel reports: {loops:?}"
    );
    for pass in 0..2 {
        for (i, w) in want.iter().enumerate() {
            assert_eq!(
                &sha(&mnt.join(format!("big{i}.bin"))).unwrap(),
                w,
                "pass {pass}"
            );
        }
        drop_caches();
    }
    site.umount(&mnt);
    assert_loops_released(tmp.path(), &site);
    site.shutdown(daemon);
}

#[test]
fn loop_mounts_give_readers_the_right_bytes_across_a_killed_daemon() {
    loop_failover(&[], None);
}

/// What kernels before 6.9 (no `FUSE_NOTIFY_RESEND`) get, on this one: the
/// successor answers the READs the killed daemon had taken from its request
/// journal, and resends nothing.
#[test]
fn loop_mounts_recover_a_killed_daemons_reads_from_its_request_journal() {
    let log2 = loop_failover(&["--fuse-recovery", "journal"], None);
    assert!(
        log2.contains("answering what the previous daemon left from its journal"),
        "{log2}"
    );
    let answered: u64 = log2
        .lines()
        .find(|l| l.contains("answered what the previous daemon left"))
        .and_then(|l| l.split("answered=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no recovery summary in the successor's log:\n{log2}"));
    assert!(
        answered > 0,
        "the killed daemon had READs in flight (150 ms each): {log2}"
    );
    assert!(
        log2.contains("FUSE connection adopted") && log2.contains("resend=false"),
        "the successor asked for no resend: {log2}"
    );
}

/// A daemon killed between reading a request and recording it: the
/// successor finds the request by probing the uniques near the journal's
/// high-water mark and answers it EIO, as it cannot know what it asked. Made
/// here by marking every recorded request answered before the successor
/// starts. Readers get the right bytes or EIO, never zeros, and none hangs.
#[test]
fn loop_mounts_answer_eio_to_reads_a_killed_daemon_took_unrecorded() {
    fn forget_what_was_in_flight(journal: &Path) {
        let mut bytes = fs::read(journal).expect("the killed daemon's request journal");
        for slot in bytes.chunks_mut(lazypull_transport::fuse_journal::SLOT) {
            if slot[0..4] == 1u32.to_le_bytes() {
                slot[0..4].copy_from_slice(&2u32.to_le_bytes());
            }
        }
        fs::write(journal, bytes).unwrap();
    }
    let log2 = loop_failover(
        &["--fuse-recovery", "journal"],
        Some(forget_what_was_in_flight),
    );
    let orphans: u64 = log2
        .lines()
        .find(|l| l.contains("answered what the previous daemon left"))
        .and_then(|l| l.split("orphans=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no recovery summary in the successor's log:\n{log2}"));
    assert!(orphans > 0, "the unrecorded READs were found: {log2}");
}

/// Like [`finish`], but a reader may fail with EIO (never with wrong bytes).
fn finish_right_or_eio(
    handles: Vec<std::thread::JoinHandle<std::io::Result<[u8; 32]>>>,
    want: &[[u8; 32]],
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
        match h.join().unwrap() {
            Ok(got) => assert_eq!(got, want[k], "reader {k} read wrong bytes"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "reader {k}: {e}"),
        }
    }
}

/// Kills a loop-transport daemon under 8 streaming readers and starts a
/// successor with `successor_flags`; every reader must get the right bytes.
/// Returns the successor's log.
fn loop_failover(successor_flags: &[&str], tamper: Option<fn(&Path)>) -> String {
    require_loop();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    let want = big_files(&src, 8, 700);
    let mut site = Site::with_transport(tmp.path(), &src, "loop");
    fs::write(tmp.path().join("faults"), "slow:1,slow_ms:150,only:.zst").unwrap();
    let mut first = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    let before = loops_under(tmp.path());
    assert!(!before.is_empty());

    let handles = readers(&mnt, 0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        handles.iter().filter(|h| !h.is_finished()).count(),
        8,
        "all readers still streaming at the kill"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        handles.iter().any(|h| !h.is_finished()),
        "readers wait while no daemon runs"
    );
    assert_eq!(
        loops_under(tmp.path()),
        before,
        "the mount keeps its loop devices while no daemon runs"
    );
    if let Some(tamper) = tamper {
        tamper(&tmp.path().join("cache/blobs/requests.journal"));
    }
    // The successor is started with auto: it finds the loop devices by
    // their backing files and keeps serving through them.
    site.transport = "auto";
    let second = site.daemon(successor_flags, "daemon-2.log");
    let log2 = fs::read_to_string(tmp.path().join("daemon-2.log")).unwrap();
    assert!(
        log2.contains("took over the FUSE connection")
            && log2.contains("serving through loop devices")
            && log2.contains(&format!(
                "{} loop devices of its mounts found",
                loops_under(&tmp.path().join("blobs")).len()
            )),
        "the new daemon did not take the loop devices over:\n{log2}"
    );
    // Readers get every byte right (FUSE_NOTIFY_RESEND re-queues the READs
    // the killed daemon had taken), none hangs, none sees zeros.
    if tamper.is_some() {
        finish_right_or_eio(handles, &want, &site);
    } else {
        finish(handles, &want, 0, &site);
    }
    let s = site.status().unwrap();
    assert_eq!(s["transport"]["kind"], "loop", "{s}");
    // A second mount through the successor gets loop devices too.
    let mnt2 = tmp.path().join("mnt2");
    site.mount(&mnt2);
    let _guard2 = Unmount(mnt2.clone());
    assert!(mounted_at(&mnt2).0.starts_with("/dev/loop"));
    assert_eq!(sha(&mnt2.join("big3.bin")).unwrap(), want[3]);
    site.umount(&mnt2);
    site.umount(&mnt);
    assert_loops_released(tmp.path(), &site);
    site.shutdown(second);
    fs::read_to_string(tmp.path().join("daemon-2.log")).unwrap()
}

/// fanotify pre-content events need an ext4/xfs/btrfs cache (the tests' tmp
/// dirs are under /var/tmp) and a kernel of 6.14+ (this host's is 6.18).
fn require_fanotify() {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release.trim().split(|c: char| !c.is_ascii_digit());
    let (major, minor): (u32, u32) = (
        v.next().unwrap().parse().unwrap(),
        v.next().unwrap().parse().unwrap(),
    );
    assert!(
        (major, minor) >= (6, 14),
        "the fanotify transport tests need Linux 6.14+ (pre-content events); this is {release}"
    );
}

#[test]
fn fanotify_serves_a_realistic_image_identical_and_warm_reads_fetch_nothing() {
    require_fanotify();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = realistic_src(tmp.path());
    let site = Site::with_transport(tmp.path(), &src, "fanotify");
    // Unlimited: under a cache limit complete blobs keep their marks (their
    // windows may be evicted); this test is about the unmarking.
    let daemon = site.daemon(&["--cache-limit", "unlimited"], "daemon.log");
    let s = site.status().unwrap();
    assert_eq!(s["transport"]["kind"], "fanotify", "{s}");
    assert!(s["cache"].is_null(), "no budget: {s}");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    // EROFS mounted the meta blob file-backed, its data blobs being the
    // daemon's sparse cache files.
    let (source, fstype, _) = mounted_at(&mnt);
    assert_eq!(fstype, "erofs");
    assert!(
        !source.starts_with("/dev/"),
        "file-backed, not from a device: {source}"
    );
    let expected = scan(&src).unwrap();
    let diffs = compare_entries(&expected, &scan(&mnt).unwrap());
    assert!(
        diffs.is_empty(),
        "mounted through fanotify, the image differs from its source:\n{}",
        format_differences(&diffs, 30)
    );
    let s = site.status().unwrap();
    let events = s["transport"]["counters"]["events"].as_u64().unwrap();
    assert!(events > 0, "the reads raised pre-content events: {s}");
    assert_eq!(s["transport"]["counters"]["denied"], 0, "{s}");
    let served = site.server.requests();
    assert!(served > 2, "the data came from the web server: {served}");
    assert_warm_read_fetches_nothing(&site, &mnt, &expected, served);
    site.umount(&mnt);

    // Mounted again with --prefetch-all: once a blob is complete its mark
    // goes, and reads of it raise no event any more.
    site.mount_with(&mnt, &["--prefetch-all"]);
    let blobs = data_blobs(&tmp.path().join("www")).len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let events = loop {
        let s = site.status().unwrap();
        let c = &s["transport"]["counters"];
        if c["unmarked_blobs"].as_u64() == Some(blobs) {
            break c["events"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "blobs never unmarked: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop_caches();
    let diffs = compare_entries(&expected, &scan(&mnt).unwrap());
    assert!(diffs.is_empty(), "{}", format_differences(&diffs, 30));
    let s = site.status().unwrap();
    assert_eq!(
        s["transport"]["counters"]["events"].as_u64(),
        Some(events),
        "complete, unmarked blobs raised events: {s}"
    );
    site.umount(&mnt);
    site.shutdown(daemon);
}

/// A small xorshift generator: the kill test's moments and reads, from a seed
/// it prints (to replay a failure).
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// SIGKILL of the daemon mid-read under 8 readers, 100 times at random
/// moments, each time a successor taking the parked connection (FUSE,
/// loop) or group (fanotify) over; the image comes from Debian's
/// docker-registry through a proxy slowing its blob reads, so kills land
/// mid-fill (issue 17). Every read (random ranges of 8 files) is compared
/// byte for byte with the source: on FUSE and loop every one is right (the
/// kernel resends what the killed daemon had taken); on fanotify each is
/// right or EIO (events nobody recorded are denied), never a hole's zeros;
/// none hangs.
fn readers_survive_100_killed_daemons(transport: &'static str) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const FILES: u64 = 8;
    const FILE_BYTES: u64 = 16 << 20;
    const KILLS: usize = 100;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("{transport}: seed {seed}");
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    // Small windows: many fills, so a kill finds one under way.
    let (site, _) = big_site(
        tmp.path(),
        transport,
        FILES,
        4000,
        "fill_window = \"64KiB\"\nreadahead = 0\n",
    );
    let registry =
        lazypull_testkit::registry::RegistryServer::start(&tmp.path().join("registry"), None)
            .unwrap();
    ok(
        lazypull()
            .arg("push")
            .arg(tmp.path().join("www"))
            .arg(format!("{}/lp/big:v1", registry.addr()))
            .output()
            .unwrap(),
        "lazypull push",
    );
    let faults = tmp.path().join("registry-faults");
    fs::write(&faults, "slow:1,slow_ms:15,only:/blobs/").unwrap();
    let proxy = Proxy::start(
        registry.addr(),
        tmp.path().join("registry-proxy.log"),
        FaultSource::File(faults),
    )
    .unwrap();
    let mut daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    ok(
        mount_reference(&site, &format!("{}/lp/big:v1", proxy.addr()), &mnt),
        "lazypull mount (registry)",
    );
    let _guard = Unmount(mnt.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, eio) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..8u64)
        .map(|r| {
            let (stop, ok, eio) = (stop.clone(), ok.clone(), eio.clone());
            let (mnt, src) = (mnt.clone(), src.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut rng = Xorshift(seed ^ (r + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut got = vec![0u8; 256 << 10];
                let mut want = vec![0u8; 256 << 10];
                while !stop.load(Ordering::Acquire) {
                    let f = rng.below(FILES);
                    let len = 4096 + rng.below((256 << 10) - 4096) as usize;
                    let off = rng.below(FILE_BYTES - len as u64);
                    let name = format!("big{f}.bin");
                    let image = fs::File::open(mnt.join(&name)).map_err(|e| format!("open: {e}"))?;
                    match image.read_exact_at(&mut got[..len], off) {
                        Ok(()) => {
                            fs::File::open(src.join(&name))
                                .and_then(|s| s.read_exact_at(&mut want[..len], off))
                                .map_err(|e| format!("reading the source: {e}"))?;
                            if got[..len] != want[..len] {
                                let at = (0..len).find(|&i| got[i] != want[i]).unwrap();
                                return Err(format!(
                                    "reader {r}: WRONG BYTES in {name} at {} (got {:#04x}, want {:#04x}; {len} bytes from {off})",
                                    off + at as u64,
                                    got[at],
                                    want[at]
                                ));
                            }
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                            eio.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => return Err(format!("reader {r}: {name} at {off}: {e}")),
                    }
                }
                Ok(())
            })
        })
        .collect();

    let mut rng = Xorshift(seed);
    let mut took_over = 0;
    let mut in_flight = 0u64;
    for i in 0..KILLS {
        std::thread::sleep(Duration::from_millis(20 + rng.below(150)));
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(30)));
        let log = format!("daemon-{}.log", i + 2);
        daemon = site.daemon(&[], &log);
        let text = fs::read_to_string(tmp.path().join(&log)).unwrap();
        let takeover = if transport == "fanotify" {
            "took over the fanotify group"
        } else {
            "took over the FUSE connection"
        };
        if text.contains(takeover) {
            took_over += 1;
        }
        // Events the killed daemon had taken, filled and allowed by this one.
        in_flight += text
            .split("Recovered { allowed: ")
            .nth(1)
            .and_then(|t| t.split(',').next())
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if readers.iter().any(|h| h.is_finished()) {
            // A reader failed: its error is reported below.
            println!("a reader stopped after kill {i}");
            break;
        }
    }
    // Every reader finishes its read under the last successor: none hangs.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(60);
    while readers.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "{transport}: a reader hangs after the last takeover:\n{}",
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for h in readers {
        h.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    let (ok, eio) = (ok.load(Ordering::Relaxed), eio.load(Ordering::Relaxed));
    let blob_gets = fs::read_to_string(tmp.path().join("registry-proxy.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("/blobs/"))
        .count();
    println!(
        "{transport}, {KILLS} kills: {ok} reads right, {eio} EIO, {took_over} successors took over, \
         {in_flight} fanotify events the killed daemons had taken were filled and allowed by their successors, \
         {blob_gets} blob requests to the registry"
    );
    if transport == "fanotify" {
        assert!(
            in_flight > 0,
            "no kill landed while events were in flight: the test proves nothing"
        );
    } else {
        assert_eq!(
            eio,
            0,
            "the kernel resends every READ a killed daemon had taken:\n{}",
            site.log_tail()
        );
    }
    assert_eq!(
        took_over, KILLS,
        "every successor took the parked transport over"
    );
    assert!(blob_gets > KILLS, "the reads came from the registry");
    assert!(ok > 0, "reads went through");
    // After it all, the whole image reads right.
    for f in 0..FILES {
        let name = format!("big{f}.bin");
        assert_eq!(
            sha(&mnt.join(&name)).unwrap(),
            sha(&src.join(&name)).unwrap(),
            "{name} after the kills"
        );
    }
    site.umount(&mnt);
    site.shutdown(daemon);
}

/// `lazypull shutdown` while an image is mounted from blobs not complete:
/// releasing the fanotify group would let readers read the holes as zeros,
/// so the daemon hands over instead (the group and the cache files stay in
/// the fd store) and says so; a successor serves the rest right.
#[test]
fn fanotify_readers_get_right_bytes_or_eio_across_100_killed_daemons() {
    require_fanotify();
    readers_survive_100_killed_daemons("fanotify");
}

#[test]
fn fuse_readers_get_right_bytes_across_100_killed_daemons() {
    require_host();
    readers_survive_100_killed_daemons("fuse");
}

#[test]
fn loop_readers_get_right_bytes_across_100_killed_daemons() {
    require_loop();
    readers_survive_100_killed_daemons("loop");
}

#[test]
fn fanotify_shutdown_with_incomplete_mounted_blobs_hands_over_instead_of_failing_open() {
    require_fanotify();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (site, want) = big_site(tmp.path(), "fanotify", 2, 5000, "readahead = 0\n");
    let daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    // A little of one file: the blob is far from complete.
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(
        &mut fs::File::open(mnt.join("big0.bin")).unwrap(),
        &mut head,
    )
    .unwrap();
    site.shutdown(daemon);
    let log = fs::read_to_string(tmp.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("the fanotify group stays in the fd store for a successor"),
        "{log}"
    );
    let second = site.daemon(&[], "daemon-2.log");
    let log2 = fs::read_to_string(tmp.path().join("daemon-2.log")).unwrap();
    assert!(log2.contains("took over the fanotify group"), "{log2}");
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            &sha(&mnt.join(format!("big{i}.bin"))).unwrap(),
            w,
            "big{i}.bin"
        );
    }
    site.umount(&mnt);
    site.shutdown(second);
}

/// The daemon's open fds and resident memory (VmRSS, KiB). The fds are the
/// fewest seen over half a second: a control connection still closing right
/// after a `umount` reply is not a leak, and a leak shows in every sample.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
        })
        .min()
        .unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (fds, rss)
}

/// 300 mount/umount cycles with a content check each time: after 50
/// warm-up cycles the daemon holds as many fds at cycle 300 as at cycle 50,
/// and its resident memory is within 2 MiB of it (issue 17's leak check).
fn mount_cycles_leak_nothing(transport: &'static str) {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    let want = big_files(&src, 2, 7000);
    let site = Site::with_transport(tmp.path(), &src, transport);
    let daemon = site.daemon(&[], "daemon.log");
    let mnt = tmp.path().join("mnt");
    let mut at_50 = None;
    for cycle in 1..=300 {
        site.mount(&mnt);
        let f = cycle % want.len();
        assert_eq!(
            sha(&mnt.join(format!("big{f}.bin"))).unwrap(),
            want[f],
            "cycle {cycle}"
        );
        site.umount(&mnt);
        if cycle == 50 {
            at_50 = Some(fds_and_rss(daemon.id()));
        }
    }
    let (fds_50, rss_50) = at_50.unwrap();
    let (fds_300, rss_300) = fds_and_rss(daemon.id());
    println!("{transport}: fds {fds_50} -> {fds_300}, RSS {rss_50} -> {rss_300} KiB");
    assert_eq!(fds_300, fds_50, "open fds at cycle 300 against cycle 50");
    assert!(
        rss_300 <= rss_50 + 2048,
        "RSS grew from {rss_50} KiB to {rss_300} KiB over 250 cycles"
    );
    site.shutdown(daemon);
}

#[test]
fn fuse_mount_cycles_leak_no_fd_and_no_memory() {
    require_host();
    mount_cycles_leak_nothing("fuse");
}

#[test]
fn fanotify_mount_cycles_leak_no_fd_and_no_memory() {
    require_fanotify();
    mount_cycles_leak_nothing("fanotify");
}

#[test]
fn loop_mount_cycles_leak_no_fd_and_no_memory() {
    require_loop();
    mount_cycles_leak_nothing("loop");
}

/// Bytes the `.data` cache files under `dir` hold on disk (their blocks:
/// they are sparse).
fn allocated_data_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "data"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// With `--cache-limit` a quarter of an image's size, the whole image read
/// twice (the page cache dropped between) comes back identical, and the
/// cache never holds more than its limit: sampled on disk every 20 ms
/// while the reads run, and in `status` (issue 17).
fn a_quarter_limit_holds(transport: &'static str, cache_subdir: &str) {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    let want = big_files(&src, 4, 9100);
    let site = Site::with_transport(tmp.path(), &src, transport);
    // The data blobs hold the files' bytes (random: nothing dedups).
    let image = want.len() as u64 * (16 << 20);
    let limit = image / 4;
    let daemon = site.daemon(&["--cache-limit", &limit.to_string()], "daemon.log");
    let s = site.status().unwrap();
    assert_eq!(s["cache"]["limit_bytes"].as_u64(), Some(limit), "{s}");
    let mnt = tmp.path().join("mnt");
    site.mount(&mnt);
    let _guard = Unmount(mnt.clone());
    let cache = tmp.path().join("cache").join(cache_subdir);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, cache) = (done.clone(), cache.clone());
        std::thread::spawn(move || {
            let (mut peak, mut samples) = (0, 0u64);
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                peak = peak.max(allocated_data_bytes(&cache));
                samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (peak, samples)
        })
    };
    let mut peak_used = 0;
    for pass in 1..=2 {
        drop_caches();
        for (i, want) in want.iter().enumerate() {
            assert_eq!(
                &sha(&mnt.join(format!("big{i}.bin"))).unwrap(),
                want,
                "{transport}: pass {pass}, file {i}"
            );
            let s = site.status().unwrap();
            let used = s["cache"]["used_bytes"].as_u64().unwrap();
            assert!(
                used <= limit,
                "{transport}: status says {used} held, limit {limit}: {s}"
            );
            peak_used = peak_used.max(used);
        }
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let (peak_disk, samples) = sampler.join().unwrap();
    let s = site.status().unwrap();
    let c = &s["cache"];
    println!(
        "{transport}: image {image}, limit {limit}: peak on disk {peak_disk} ({samples} samples), peak in status {peak_used}, {c}"
    );
    assert!(samples > 10, "sampled while reading");
    assert!(
        peak_disk <= limit,
        "{transport}: the cache files held {peak_disk} bytes on disk, limit {limit}"
    );
    assert!(
        c["evicted_bytes"].as_u64().unwrap() >= image - limit,
        "{transport}: reading {image} bytes under a limit of {limit} evicted: {c}"
    );
    assert_eq!(
        s["transport"]["counters"]["read_failures"]
            .as_u64()
            .unwrap_or(0),
        0,
        "{s}"
    );
    assert_eq!(
        s["transport"]["counters"]["denied"].as_u64().unwrap_or(0),
        0,
        "{s}"
    );
    let page = site.metrics();
    assert_eq!(metric(&page, "lazypull_cache_limit_bytes"), limit);
    assert!(metric(&page, "lazypull_cache_evicted_bytes_total") > 0);
    site.umount(&mnt);
    site.shutdown(daemon);
}

#[test]
fn fuse_cache_limit_of_a_quarter_image_holds_over_two_whole_reads() {
    require_host();
    a_quarter_limit_holds("fuse", "blobs");
}

#[test]
fn loop_cache_limit_of_a_quarter_image_holds_over_two_whole_reads() {
    require_loop();
    a_quarter_limit_holds("loop", "blobs");
}

#[test]
fn fanotify_cache_limit_of_a_quarter_image_holds_over_two_whole_reads() {
    require_fanotify();
    a_quarter_limit_holds("fanotify", "sparse");
}

/// A small ext4 file system on a loop device, mounted at `at` (the cache
/// directory of a daemon under test); unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(image: &Path, at: &Path, mib: u64) -> SmallFs {
        fs::File::create(image).unwrap().set_len(mib << 20).unwrap();
        ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(image)
                .output()
                .expect("mkfs.ext4 (Debian's e2fsprogs) runs"),
            "mkfs.ext4",
        );
        fs::create_dir_all(at).unwrap();
        ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(at)
                .output()
                .unwrap(),
            "mounting a small ext4",
        );
        SmallFs(at.to_path_buf())
    }

    fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.0).unwrap();
        st.f_bavail * st.f_frsize
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Builds `src` into the site's web directory beside its first image;
/// returns the new image's meta digest (its fsid).
fn build_another(site: &Site, src: &Path) -> String {
    let out = ok(
        lazypull()
            .arg("build")
            .arg(src)
            .arg("-o")
            .arg(site.dir.join("www"))
            .arg("--json")
            .output()
            .unwrap(),
        "lazypull build",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["meta"]["digest"].as_str().unwrap().to_owned()
}

/// A daemon whose cache is a 64 MiB ext4 (`SmallFs`), serving a big image
/// (3 × 16 MiB, at `mnt`) and a small one (4 × 1 MiB, at `mnt2`): the
/// scene of the full-disk tests.
/// Fields drop in this order: the site (its daemon shut down, its mounts
/// gone), then the small file system, then the directory.
struct FullDisk {
    mnt: PathBuf,
    mnt2: PathBuf,
    want: Vec<[u8; 32]>,
    small_want: Vec<[u8; 32]>,
    site: Site,
    daemon: Option<Child>,
    disk: SmallFs,
    tmp: tempfile::TempDir,
}

impl FullDisk {
    fn start(transport: &'static str, cache_limit: &str, seed: u64) -> FullDisk {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let src = tmp.path().join("src");
        let want = big_files(&src, 3, seed);
        let small = tmp.path().join("src-small");
        fs::create_dir_all(&small).unwrap();
        let small_want = (0..4)
            .map(|i| {
                let data = maketree::random_bytes(1 << 20, seed + 77 + i);
                fs::write(small.join(format!("s{i}.bin")), &data).unwrap();
                Sha256::digest(&data).into()
            })
            .collect();
        let disk = SmallFs::new(
            &tmp.path().join("cache.ext4"),
            &tmp.path().join("cache"),
            64,
        );
        let site = Site::with_transport(tmp.path(), &src, transport);
        let other = build_another(&site, &small);
        let daemon = site.daemon(&["--cache-limit", cache_limit], "daemon.log");
        let (mnt, mnt2) = (tmp.path().join("mnt"), tmp.path().join("mnt2"));
        site.mount(&mnt);
        ok(
            lazypull()
                .args(["mount", "--fsid", &other])
                .arg(&mnt2)
                .arg("--socket")
                .arg(site.socket())
                .output()
                .unwrap(),
            "mounting the second image",
        );
        FullDisk {
            mnt,
            mnt2,
            want,
            small_want,
            site,
            daemon: Some(daemon),
            disk,
            tmp,
        }
    }

    fn filler(&self) -> PathBuf {
        self.tmp.path().join("cache/filler")
    }

    /// Fills the cache's file system but for 6 MiB: the big image's 48 MiB
    /// cannot all be cached.
    fn fill_up(&self) {
        let fill = self.disk.free().saturating_sub(6 << 20);
        ok(
            Command::new("fallocate")
                .args(["-l", &fill.to_string()])
                .arg(self.filler())
                .output()
                .unwrap(),
            "filling the small file system",
        );
    }

    /// Reads the big image whole (3 readers) while reading the small one
    /// over and over: returns the big readers' EIOs, and the small reads
    /// and their EIOs. Every read that succeeds has the right bytes.
    fn read_while_full(&self) -> (usize, usize, usize) {
        let readers: Vec<_> = (0..self.want.len())
            .map(|i| {
                let path = self.mnt.join(format!("big{i}.bin"));
                std::thread::spawn(move || sha(&path))
            })
            .collect();
        let (mut other_reads, mut other_eio) = (0, 0);
        while !readers.iter().all(|r| r.is_finished()) || other_reads < 8 {
            let i = other_reads % self.small_want.len();
            drop_caches();
            match sha(&self.mnt2.join(format!("s{i}.bin"))) {
                Ok(got) => assert_eq!(
                    got, self.small_want[i],
                    "the second image, read {other_reads}"
                ),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => other_eio += 1,
                Err(e) => panic!("the second image: {e}"),
            }
            other_reads += 1;
        }
        let mut eio = 0;
        for (i, r) in readers.into_iter().enumerate() {
            match r.join().unwrap() {
                Ok(got) => assert_eq!(got, self.want[i], "big{i}.bin: wrong bytes"),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => eio += 1,
                Err(e) => panic!("big{i}.bin: {e}"),
            }
        }
        (eio, other_reads, other_eio)
    }

    /// Frees the space again; after the 2 s a full-disk episode needs to
    /// end (a disk at the edge of full takes some writes and refuses
    /// others), reads the big image whole: right bytes.
    fn free_and_read_again(&self) {
        fs::remove_file(self.filler()).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        drop_caches();
        for (i, w) in self.want.iter().enumerate() {
            assert_eq!(
                &sha(&self.mnt.join(format!("big{i}.bin"))).unwrap(),
                w,
                "after: big{i}.bin"
            );
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("daemon.log")).unwrap()
    }

    fn finish(mut self) {
        self.site.umount(&self.mnt);
        self.site.umount(&self.mnt2);
        let daemon = self.daemon.take().unwrap();
        self.site.shutdown(daemon);
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        for m in [&self.mnt, &self.mnt2] {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// The cache on a 64 MiB ext4 that fills up mid-read (issue 17): every
/// read of the big image returns the right bytes (served from the source,
/// uncached) or EIO, a second image is served meanwhile, the full disk is
/// logged once, and once space is freed reads are cached again.
#[test]
fn fuse_reads_stay_right_on_a_full_cache_disk_and_are_cached_again_once_space_returns() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let scene = FullDisk::start("fuse", "unlimited", 4400);
    scene.fill_up();
    let (eio, _, other_eio) = scene.read_while_full();
    assert_eq!(other_eio, 0, "FUSE serves the second image uncached");
    let s = scene.site.status().unwrap();
    let c = &s["transport"]["counters"];
    println!("full disk: {eio} EIO of {} readers; {c}", scene.want.len());
    assert!(c["uncached_reads"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(c["cache_full_episodes"], 1, "{s}");
    assert_eq!(
        scene.log().matches("the cache refuses writes").count(),
        1,
        "the full disk is logged once, not per read:\n{}",
        scene.site.log_tail()
    );
    let written = c["bytes_written"].as_u64().unwrap();
    scene.free_and_read_again();
    let s = scene.site.status().unwrap();
    let c = &s["transport"]["counters"];
    assert!(
        c["bytes_written"].as_u64().unwrap() > written,
        "cached again: {s}"
    );
    assert_eq!(c["cache_full_now"], false, "{s}");
    assert!(
        scene.log().contains("the cache takes writes again"),
        "{}",
        scene.site.log_tail()
    );
    scene.finish();
}

/// fanotify's data must land in the cache file: on a full cache disk
/// (a 64 MiB ext4 filled mid-read) the daemon evicts least recently used
/// windows and retries (its limit, 1 GiB, is far above the disk's size),
/// else the reader gets EIO: never wrong bytes; a second image is served
/// meanwhile, and once space returns reads fill the cache again.
#[test]
fn fanotify_on_a_full_cache_disk_evicts_and_retries_or_answers_eio_never_wrong_bytes() {
    require_fanotify();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let scene = FullDisk::start("fanotify", "1GiB", 4500);
    scene.fill_up();
    let (eio, other_reads, other_eio) = scene.read_while_full();
    let s = scene.site.status().unwrap();
    println!(
        "fanotify full disk: {eio} of {} big readers and {other_eio} of {other_reads} small reads got EIO; cache {}; counters {}",
        scene.want.len(),
        s["cache"],
        s["transport"]["counters"]
    );
    assert!(
        other_reads - other_eio > 0,
        "the second image was served meanwhile\n{}",
        scene.site.log_tail()
    );
    assert!(
        s["cache"]["evicted_bytes"].as_u64().unwrap() > 0,
        "the full disk made the daemon evict: {s}\n{}",
        scene.site.log_tail()
    );
    scene.free_and_read_again();
    scene.finish();
}
