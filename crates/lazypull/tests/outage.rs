//! Long backend outages (issue 17) on this host's kernel, through the FUSE
//! transport: the daemon reads an image's blobs from a web server through the
//! testkit proxy, which then resets every request for longer than the
//! configured `outage_timeout_secs` (3 s here). Readers get EIO within that
//! time (never a hang), the requests reaching the backend while it is down
//! stay bounded by the circuit breaker's cool-downs, `lazypull status` shows
//! the breaker open, and when the backend returns the same daemon serves the
//! right bytes again and the breaker closes. With `outage_timeout_secs =
//! "wait"`, a reader blocks until the backend is back and then gets its bytes.
//! Without the breaker (`circuit_breaker = false`), the same outage is
//! measured for comparison.
//!
//! Needs root, /dev/fuse and EROFS file-backed mounts; fails (never skips)
//! without them.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lazypull::blob_server::BlobServer;
use lazypull_testkit::proxy::{self, FaultSource, Proxy};
use sha2::{Digest, Sha256};

#[path = "common/lazy_stack.rs"]
mod lazy_stack;
use lazy_stack::{lazypull, ok, require_host, Proc};

/// One test at a time: they time readers.
static SERIAL: Mutex<()> = Mutex::new(());

/// The `outage_timeout_secs` of these tests.
const LIMIT: Duration = Duration::from_secs(3);
/// Slack for a reader beyond it: the kernel's own requests, a loaded host.
const SLACK: Duration = Duration::from_secs(3);
/// The breaker's defaults (`lazypull_backend::BreakerPolicy`).
const THRESHOLD: usize = 5;
const MAX_COOLDOWN: Duration = Duration::from_secs(10);
/// Files `big<i>.bin` of the image, 2 MiB each.
const FILES: usize = 6;
const FILE_SIZE: usize = 2 << 20;

/// An image served over HTTP through a fault-injecting proxy, a daemon
/// serving it over FUSE and a mount of it.
struct Outage {
    dir: PathBuf,
    _server: BlobServer,
    /// In front of the server: a reverse proxy (the blob URL names it), or
    /// with [`Front::Forward`] the daemon's `proxy`. None once stopped.
    front: Option<Proxy>,
    daemon: Option<Proc>,
    want: Vec<[u8; 32]>,
}

/// How the testkit proxy stands in front of the blob server.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Front {
    /// The blob URL names the proxy (it stands for the backend).
    Reverse,
    /// The blob URL names the server, the daemon's `proxy` the proxy (which
    /// forwards the absolute-form requests it gets to the server).
    Forward,
    /// As `Forward`, but the daemon has no `proxy`: its environment's
    /// `HTTP_PROXY` names the proxy.
    Environment,
}

impl Outage {
    fn start(dir: &Path, config: &str) -> Outage {
        Outage::start_with(dir, config, Front::Reverse, None)
    }

    /// `no_proxy`: the daemon's `NO_PROXY` (else none).
    fn start_with(dir: &Path, config: &str, front: Front, no_proxy: Option<&str>) -> Outage {
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap();
        let want = (0..FILES)
            .map(|i| {
                let data = lazypull_testkit::maketree::random_bytes(FILE_SIZE, 1700 + i as u64);
                fs::write(src.join(format!("big{i}.bin")), &data).unwrap();
                Sha256::digest(&data).into()
            })
            .collect();
        let www = dir.join("www");
        let built = ok(
            lazypull()
                .arg("build")
                .arg(&src)
                .arg("-o")
                .arg(&www)
                .arg("--json")
                .output()
                .unwrap(),
            "lazypull build",
        );
        let built: serde_json::Value = serde_json::from_str(&built).unwrap();
        let meta = built["meta"]["digest"].as_str().unwrap().to_owned();
        let server = BlobServer::start(&www).unwrap();
        let faults = dir.join("faults");
        fs::write(&faults, "").unwrap();
        let proxy = Proxy::start(
            server.addr(),
            dir.join("proxy.log"),
            FaultSource::File(faults),
        )
        .unwrap();
        let config_path = dir.join("config.toml");
        // No read-ahead: the requests counted are the readers' own.
        let (blob_url, proxy_setting) = match front {
            Front::Reverse => (format!("http://{}/", proxy.addr()), String::new()),
            Front::Forward => (
                format!("http://{}/", server.addr()),
                format!("proxy = \"http://{}\"\n", proxy.addr()),
            ),
            Front::Environment => (format!("http://{}/", server.addr()), String::new()),
        };
        fs::write(
            &config_path,
            format!("readahead = 0\n{proxy_setting}{config}"),
        )
        .unwrap();
        let mut cmd = lazy_stack::daemon_in(dir, &config_path, "fuse");
        cmd.arg("--no-fd-store")
            .arg("--blob-url")
            .arg(blob_url)
            // Whatever this machine says, the test decides what is proxied.
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy");
        if let Some(hosts) = no_proxy {
            cmd.env("NO_PROXY", hosts);
        }
        if matches!(front, Front::Environment) {
            cmd.env("HTTP_PROXY", format!("http://{}", proxy.addr()));
        }
        let mut daemon = Proc::spawn("lazypull daemon", cmd, &dir.join("daemon.log"));
        daemon.wait_answering(&dir.join("run/ctl.sock"));
        let site = Outage {
            dir: dir.to_path_buf(),
            _server: server,
            front: Some(proxy),
            daemon: Some(daemon),
            want,
        };
        ok(
            lazypull()
                .args(["mount", "--fsid", &meta])
                .arg(site.mnt())
                .arg("--socket")
                .arg(site.socket())
                .output()
                .unwrap(),
            "lazypull mount --fsid",
        );
        site
    }

    fn proxy(&self) -> &Proxy {
        self.front.as_ref().expect("the proxy was stopped")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/ctl.sock")
    }

    fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    fn file(&self, i: usize) -> PathBuf {
        self.mnt().join(format!("big{i}.bin"))
    }

    fn status(&self) -> serde_json::Value {
        let out = ok(
            lazypull()
                .args(["status", "--json", "--socket"])
                .arg(self.socket())
                .output()
                .unwrap(),
            "lazypull status --json",
        );
        serde_json::from_str(&out).unwrap()
    }

    fn status_text(&self) -> String {
        ok(
            lazypull()
                .args(["status", "--socket"])
                .arg(self.socket())
                .output()
                .unwrap(),
            "lazypull status",
        )
    }

    /// The one backend's breaker in the status.
    fn breaker(&self) -> serde_json::Value {
        let s = self.status();
        let backends = s["backends"].as_array().expect("backends in the status");
        assert_eq!(backends.len(), 1, "{s}");
        assert_eq!(
            backends[0]["backend"],
            format!("http://{}", self.proxy().addr()),
            "{s}"
        );
        backends[0].clone()
    }

    /// Requests the proxy has answered (or reset) so far, once it is idle.
    fn requests(&self) -> usize {
        assert!(
            self.proxy().wait_idle(Duration::from_secs(60)),
            "proxy busy"
        );
        proxy::read_log(self.dir.join("proxy.log")).unwrap().len()
    }

    /// The backend goes down: every request is reset.
    fn down(&self) {
        self.proxy().set_faults("reset:1,only:/").unwrap();
    }

    fn up(&self) {
        self.proxy().set_faults("").unwrap();
    }

    fn log_tail(&self) -> String {
        lazy_stack::tail(&self.dir.join("daemon.log"), 30)
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.mnt(), rustix::mount::UnmountFlags::DETACH);
        // Stops the daemon (SIGTERM: it unmounts its blob files).
        drop(self.daemon.take());
        let _ = rustix::mount::unmount(self.dir.join("blobs"), rustix::mount::UnmountFlags::DETACH);
    }
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lpoutage")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn sha(path: &Path) -> std::io::Result<[u8; 32]> {
    Ok(Sha256::digest(fs::read(path)?).into())
}

/// Reads 64 KiB of each of `files` at `off` at once; each reader's result
/// and how long it took.
fn read_wave(
    site: &Outage,
    files: std::ops::Range<usize>,
    off: u64,
) -> Vec<(std::io::Result<usize>, Duration)> {
    let readers: Vec<_> = files
        .map(|i| {
            let path = site.file(i);
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = fs::File::open(&path).and_then(|f| {
                    let mut buf = vec![0u8; 64 << 10];
                    f.read_at(&mut buf, off)
                });
                (r, t.elapsed())
            })
        })
        .collect();
    // Never a hang: every reader is back within the limit and its slack
    // (plus the kernel's retry of the page, see the first wave).
    let deadline = Instant::now() + LIMIT * 3 + SLACK * 2;
    while readers.iter().any(|r| !r.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "a reader hung during the outage:\n{}",
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    readers.into_iter().map(|r| r.join().unwrap()).collect()
}

fn assert_all_eio(wave: &[(std::io::Result<usize>, Duration)], within: Duration, what: &str) {
    for (r, took) in wave {
        match r {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
            Ok(n) => panic!("{what}: a read of a backend that is down got {n} bytes"),
        }
        assert!(
            *took <= within,
            "{what}: a reader took {took:?} (limit {within:?})"
        );
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 100.0).round() / 100.0
}

fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from the metrics:\n{page}"))
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The outage the breaker tests and the comparison without it share: the
/// backend down for `OUTAGE`, two waves of 4 readers (at its start, and
/// once it is older than the limit). Returns the two waves and the requests
/// that reached the backend while it was down.
const OUTAGE: Duration = Duration::from_secs(8);

#[allow(clippy::type_complexity)]
fn outage(
    site: &Outage,
) -> (
    Vec<(std::io::Result<usize>, Duration)>,
    Vec<(std::io::Result<usize>, Duration)>,
    usize,
    Instant,
) {
    // Up: the first file reads right.
    assert_eq!(sha(&site.file(0)).unwrap(), site.want[0]);
    let before = site.requests();
    site.down();
    let t0 = Instant::now();
    // Files 2..6, away from file 0: the kernel's read-ahead of the blob file
    // while file 0 was read may have fetched the start of file 1 already.
    let first = read_wave(site, 2..6, 1 << 20);
    // Older than the limit now: a second wave, at other offsets.
    let second = read_wave(site, 2..6, 3 << 19);
    let rest = OUTAGE.saturating_sub(t0.elapsed());
    std::thread::sleep(rest);
    let during = site.requests() - before;
    (first, second, during, t0)
}

#[test]
fn readers_of_a_backend_down_get_eio_in_time_and_the_same_daemon_serves_again_when_it_returns() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = temp_dir();
    let port = free_port();
    let site = Outage::start(
        tmp.path(),
        &format!("outage_timeout_secs = 3\nmetrics_addr = \"127.0.0.1:{port}\"\n"),
    );
    assert_eq!(site.breaker()["state"], "closed");

    let (first, second, during, t0) = outage(&site);
    assert_all_eio(&first, LIMIT + SLACK, "first wave");
    // The second wave comes when the outage is older than the limit: it
    // fails fast, without waiting or retrying.
    assert_all_eio(&second, SLACK, "second wave");
    let slowest = |w: &[(std::io::Result<usize>, Duration)]| {
        w.iter().map(|(_, d)| *d).max().unwrap_or_default()
    };

    // While down: the breaker is open, with its cause, in the status and
    // the metrics.
    let b = site.breaker();
    assert!(
        b["state"] == "open" || b["state"] == "half-open",
        "{b}\n{}",
        site.log_tail()
    );
    assert!(b["down_secs"].as_f64().unwrap() >= 3.0, "{b}");
    assert!(b["down_since_unix"].as_u64().is_some(), "{b}");
    let cause = b["last_cause"].as_str().unwrap();
    assert!(cause.contains(&site.proxy().addr().to_string()), "{cause}");
    assert_eq!(b["opens"], 1, "{b}");
    let text = site.status_text();
    assert!(
        text.contains(&format!(
            "backend http://{}: DOWN (circuit",
            site.proxy().addr()
        )),
        "{text}"
    );
    let page = metrics(port);
    let label = format!("{{backend=\"http://{}\"}}", site.proxy().addr());
    assert_eq!(metric(&page, &format!("lazypull_backend_up{label}")), 0);
    assert_eq!(
        metric(
            &page,
            &format!("lazypull_backend_breaker_opens_total{label}")
        ),
        1
    );
    assert!(
        metric(
            &page,
            &format!("lazypull_backend_fast_failures_total{label}")
        ) >= 8
    );

    // Bounded: the failures that opened it (and those in flight then, one
    // per reader), then at most one probe per cool-down (1, 2, 4, 8 s: 3
    // fit in 8 s), however many reads the kernel sent.
    let probes = b["probes"].as_u64().unwrap() as usize;
    let bound = THRESHOLD + 4 + 3 + 1;
    assert!(
        during <= bound,
        "{during} requests reached the backend while it was down (bound {bound})"
    );
    assert!(probes <= 4, "{b}");

    // Back: without a restart, reads succeed again within the longest
    // cool-down, with the right bytes.
    site.up();
    let back = Instant::now();
    let recovered = loop {
        // A range that failed during the outage (nothing of it is cached).
        let r = fs::File::open(site.file(2)).and_then(|f| {
            let mut buf = vec![0u8; 64 << 10];
            f.read_at(&mut buf, 1 << 20)
        });
        if r.is_ok() {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < MAX_COOLDOWN + SLACK,
            "still failing {:?} after the backend returned: {r:?}\n{}",
            back.elapsed(),
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for i in 0..FILES {
        assert_eq!(sha(&site.file(i)).unwrap(), site.want[i], "big{i}.bin");
    }
    let b = site.breaker();
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["down_secs"], serde_json::Value::Null, "{b}");
    let page = metrics(port);
    assert_eq!(metric(&page, &format!("lazypull_backend_up{label}")), 1);
    assert!(site.status_text().contains("circuit closed"));
    eprintln!(
        "FIGURES with breaker: outage {:.1} s, first wave slowest reader {:.2} s, second wave \
         slowest {:.2} s, backend requests during the outage {during} ({probes} probes), read \
         again {:.2} s after the backend returned",
        secs(t0.elapsed() - back.elapsed()),
        secs(slowest(&first)),
        secs(slowest(&second)),
        secs(recovered)
    );
}

#[test]
fn with_outage_wait_a_reader_blocks_until_the_backend_is_back() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = temp_dir();
    let site = Outage::start(tmp.path(), "outage_timeout_secs = \"wait\"\n");
    assert_eq!(sha(&site.file(0)).unwrap(), site.want[0]);
    site.down();
    let path = site.file(5);
    let reader = std::thread::spawn(move || {
        let r = sha(&path);
        (r, Instant::now())
    });
    // Well past the 3 s of the other test and the first cool-downs.
    std::thread::sleep(Duration::from_secs(5));
    assert!(!reader.is_finished(), "the reader did not wait");
    let b = site.breaker();
    assert!(b["state"] == "open" || b["state"] == "half-open", "{b}");
    site.up();
    let back = Instant::now();
    let deadline = back + MAX_COOLDOWN + SLACK;
    while !reader.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the reader still waits after the backend returned:\n{}",
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (r, done) = reader.join().unwrap();
    assert_eq!(r.unwrap(), site.want[5], "the waiting reader's bytes");
    assert_eq!(site.breaker()["state"], "closed");
    eprintln!(
        "FIGURES wait mode: the reader got its file {:.2} s after the backend returned",
        secs(done - back)
    );
}

#[test]
fn without_the_breaker_every_read_runs_its_own_retries() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = temp_dir();
    let site = Outage::start(
        tmp.path(),
        "outage_timeout_secs = 3\ncircuit_breaker = false\n",
    );
    let (first, second, during, _) = outage(&site);
    // Each read fails once its own 5 tries are spent (about 1.5 s of
    // pauses), the kernel's retry of the page included.
    assert_all_eio(&first, LIMIT + SLACK, "first wave");
    assert_all_eio(&second, LIMIT + SLACK, "second wave");
    let b = site.breaker();
    assert_eq!(
        (b["state"].as_str(), b["opens"].as_u64()),
        (Some("closed"), Some(0))
    );
    assert!(
        during > THRESHOLD + 4 + 3 + 1,
        "{during} requests without a breaker"
    );
    site.up();
    assert_eq!(sha(&site.file(1)).unwrap(), site.want[1]);
    eprintln!(
        "FIGURES without breaker: backend requests during the outage {during}, first wave \
         slowest reader {:.2} s, second wave slowest {:.2} s",
        secs(first.iter().map(|(_, d)| *d).max().unwrap()),
        secs(second.iter().map(|(_, d)| *d).max().unwrap())
    );
}

/// `proxy` (issue 18): range reads go through the configured HTTP proxy
/// (its log shows them); stopped mid-read, the daemon goes directly to the
/// backend and the bytes stay right, with the fallbacks counted.
#[test]
fn range_reads_go_through_the_proxy_and_directly_when_it_is_gone() {
    proxied_then_direct(Front::Forward);
}

/// The same with the proxy named by the daemon's environment
/// (`HTTP_PROXY`, as `HTTPS_PROXY` for https URLs) rather than its config:
/// the same use, the same fallback.
#[test]
fn the_environments_proxy_is_used_and_bypassed_when_it_is_gone() {
    proxied_then_direct(Front::Environment);
}

fn proxied_then_direct(front: Front) {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = temp_dir();
    let port = free_port();
    let site = Outage::start_with(
        tmp.path(),
        &format!("metrics_addr = \"127.0.0.1:{port}\"\n"),
        front,
        None,
    );
    for i in 0..3 {
        assert_eq!(sha(&site.file(i)).unwrap(), site.want[i], "big{i}.bin");
    }
    let log = proxy::read_log(site.dir.join("proxy.log")).unwrap();
    let ranges = log.iter().filter(|e| e.range.is_some()).count();
    assert!(ranges >= 3, "the proxy saw {ranges} range reads: {log:?}");
    let server = site._server.addr().to_string();
    assert!(
        log.iter().all(|e| e.path.contains(&server)),
        "a proxy gets absolute URLs of the server: {log:?}"
    );
    // The proxy goes away: the rest is read directly, right.
    let mut site = site;
    drop(site.front.take());
    for i in 3..FILES {
        assert_eq!(
            sha(&site.file(i)).unwrap(),
            site.want[i],
            "big{i}.bin without the proxy"
        );
    }
    let page = metrics(port);
    let fallbacks = metric(&page, "lazypull_backend_proxy_fallbacks_total");
    assert!(fallbacks >= 1, "{page}");
    let text = site.status_text();
    assert!(text.contains("proxy fallbacks"), "{text}");
    let logged = fs::read_to_string(site.dir.join("daemon.log")).unwrap();
    let warned = logged.matches("the proxy took no connection").count();
    assert!(
        warned >= 1 && warned as u64 <= fallbacks,
        "{warned} warnings for {fallbacks} fallbacks"
    );
    eprintln!(
        "FIGURES proxy ({front:?}): {ranges} range reads through the proxy; after it stopped, {fallbacks} requests went directly ({warned} logged)"
    );
}

/// A host `NO_PROXY` names is read directly, the proxy configured or not.
#[test]
fn hosts_no_proxy_names_are_read_directly() {
    require_host();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = temp_dir();
    let site = Outage::start_with(tmp.path(), "", Front::Forward, Some("127.0.0.1"));
    assert_eq!(sha(&site.file(0)).unwrap(), site.want[0]);
    assert_eq!(
        site.requests(),
        0,
        "NO_PROXY=127.0.0.1, yet the proxy was asked"
    );
}
