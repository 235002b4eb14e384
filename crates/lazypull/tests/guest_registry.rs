//! Lazy pulling from a real OCI registry, against a real Linux 6.12 kernel.
//!
//! The host starts Debian's `docker-registry` twice on 127.0.0.1 (open, and with
//! htpasswd auth), pushes images with `lazypull push`, and puts lazypull's
//! logging, fault-injecting proxy (`lazypull-testkit`'s `Proxy`) in front of the
//! open one; the guest reaches them at 10.0.2.2 through qemu's user network,
//! runs the daemon, mounts by reference and reads (`tests/guest/registry*.sh`).
//! The proxy's access log is the record of what crossed the network.
//!
//! These tests need root, qemu, the guest kernel and docker-registry; without
//! them they fail with the reason — they never skip.

#[path = "common/manifest.rs"]
mod manifest;
use manifest::is_root_line;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use lazypull_guest::{Disk, GuestConfig, GuestRun};
use lazypull_testkit::maketree::write_random;
use lazypull_testkit::proxy::{read_log, Fault, FaultSource, LogEntry, Proxy};
use lazypull_testkit::registry::RegistryServer;

static GUEST: Mutex<()> = Mutex::new(());

const BIG_BYTES: usize = 300 << 20;

/// Tries per request the `registry_faults` scenario gives the daemon
/// (`retries` in its config: it counts tries).
const ATTEMPTS: usize = 3;

/// The `faulty` proxy's schedule for the `faults` image's data (see
/// `lazypull_testkit::proxy`): scripted per byte range, so what each range
/// gets does not depend on how concurrent fetches interleave. The first range
/// fetched comes back corrupted once; every other new range fails its first
/// `ATTEMPTS - 1` tries, in turn with each transient fault (`slow` outlasts
/// the scenario's request timeout), so the retry policy must get it on its
/// last try; ranges overlapping ones fetched before (refetches) are clean.
const FAULTS: &str =
    "first_range:corrupt,ranges:5xx+reset/truncate+5xx/reset+truncate/slow+5xx,slow_ms:8000";

/// The transient scripts of [`FAULTS`], as the access log names the faults.
const TRANSIENT_SCRIPTS: [[Fault; ATTEMPTS - 1]; 4] = [
    [Fault::ServerError, Fault::Reset],
    [Fault::Truncate, Fault::ServerError],
    [Fault::Reset, Fault::Truncate],
    [Fault::Slow, Fault::ServerError],
];

struct Fixture {
    root: PathBuf,
    data: PathBuf,
    kernel: PathBuf,
    _open: RegistryServer,
    _auth: RegistryServer,
    auth_port: u16,
    proxy: Proxy,
    proxy_log: PathBuf,
    /// Injects [`FAULTS`] into the data fetches of the `faults` image.
    faulty: Proxy,
    faulty_log: PathBuf,
    /// Stored digest of the `faults` image's data blob.
    fault_data: String,
    /// Corrupts every data fetch of the `doomed` image.
    broken: Proxy,
    /// Digest of the `doomed` image's data blob.
    doomed_blob: String,
    /// Serves `www/blobs` (a build output) over plain HTTP.
    web: lazypull::blob_server::BlobServer,
    /// Data blob digest → (image, stored size), for reading the proxy logs.
    data_blobs: Vec<(String, String, u64)>,
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn testkit() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("lazypull-testkit");
    assert!(
        bin.exists(),
        "{} not built: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

fn lazypull() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
}

/// Builds `src` with `lazypull build` (zstd) into `out` and pushes it as
/// `addr/lp/NAME:v1`; returns the data blobs' (digest, stored digest, stored size).
fn build_and_push(
    src: &Path,
    out: &Path,
    addr: &str,
    name: &str,
    creds: Option<(&str, &str)>,
) -> Vec<(String, String, u64)> {
    stdout(
        lazypull()
            .arg("build")
            .arg(src)
            .arg("-o")
            .arg(out)
            .arg("--json"),
    );
    let mut push = lazypull();
    push.arg("push")
        .arg(out)
        .arg(format!("{addr}/lp/{name}:v1"))
        .arg("--json");
    if let Some((u, p)) = creds {
        push.env("LAZYPULL_REGISTRY_USER", u)
            .env("LAZYPULL_REGISTRY_PASSWORD", p);
    }
    stdout(&mut push);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    manifest["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let d = d.as_str().unwrap().to_owned();
            let data = out.join(format!("{d}.zst"));
            let bytes = fs::read(&data).unwrap();
            use sha2::Digest;
            let stored = hex::encode(sha2::Sha256::digest(&bytes));
            (d, stored, bytes.len() as u64)
        })
        .collect()
}

fn sums(dir: &Path, paths: &[String]) -> String {
    let mut out = String::new();
    for p in paths {
        out.push_str(&stdout(Command::new("sha256sum").arg(p).current_dir(dir)));
    }
    out
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        lazypull_guest::require_root().expect("guest tests need root");
        let kernel = lazypull_guest::kernel().expect("guest kernel");
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-registry");
        let _ = fs::remove_dir_all(&root);
        let open = RegistryServer::start(&root.join("registry-open"), None)
            .expect("starting docker-registry");
        let auth = RegistryServer::start(&root.join("registry-auth"), Some(("alice", "secret")))
            .expect("starting docker-registry with htpasswd auth");
        let reg = open.addr().to_string();
        let data = root.join("data");
        fs::create_dir_all(&data).unwrap();
        let src = root.join("src");
        let out = root.join("out");
        let mut data_blobs = Vec::new();

        // A realistic tree: the host's Perl library plus every EROFS feature.
        let tree = src.join("tree");
        stdout(Command::new("mkdir").arg("-p").arg(tree.join("usr/share")));
        stdout(
            Command::new("cp")
                .args(["-a", "/usr/share/perl"])
                .arg(tree.join("usr/share/perl")),
        );
        stdout(
            Command::new(testkit())
                .arg("make-tree")
                .arg(tree.join("features"))
                .args(["--seed", "11"]),
        );
        for (d, s, n) in build_and_push(&tree, &out.join("tree"), &reg, "tree", None) {
            data_blobs.push((d, format!("tree:{s}"), n));
        }
        let private = src.join("private");
        write_random(&private.join("secret.bin"), 1_500_000, 77);
        fs::write(
            data.join("auth.sum"),
            sums(&private, &["secret.bin".into()]),
        )
        .unwrap();
        build_and_push(
            &private,
            &out.join("private"),
            &auth.addr().to_string(),
            "private",
            Some(("alice", "secret")),
        );
        let manifest = stdout(Command::new(testkit()).arg("manifest").arg(&tree));
        let mut expected: Vec<&str> = manifest.lines().filter(|l| !is_root_line(l)).collect();
        expected.sort_unstable();
        fs::write(data.join("manifest.tree"), expected.join("\n") + "\n").unwrap();
        let first = "usr/share/perl/5.36.0/strict.pm";
        assert!(tree.join(first).is_file(), "{first} missing on the host");
        fs::write(data.join("first-byte-file"), first).unwrap();
        fs::write(data.join("first.sum"), sums(&tree, &[first.to_owned()])).unwrap();

        // 300 MB of incompressible data and one small file.
        let big = src.join("big");
        for i in 0..3 {
            // Odd seeds: the generator ORs in the low bit, so 100 and 101 would repeat.
            write_random(
                &big.join(format!("data/part{i}.bin")),
                BIG_BYTES / 3,
                1001 + 2 * i,
            );
        }
        fs::create_dir_all(big.join("etc")).unwrap();
        fs::write(big.join("etc/small.txt"), "a small file in a big image\n").unwrap();
        fs::write(data.join("big.sum"), sums(&big, &["etc/small.txt".into()])).unwrap();
        for (d, s, n) in build_and_push(&big, &out.join("big"), &reg, "big", None) {
            data_blobs.push((d, format!("big:{s}"), n));
        }

        // Two files for 64 concurrent readers.
        let conc = src.join("conc");
        write_random(&conc.join("shared.bin"), 6 << 20, 7);
        write_random(&conc.join("other.bin"), 2 << 20, 8);
        fs::write(
            data.join("conc.sums"),
            sums(&conc, &["shared.bin".into(), "other.bin".into()]),
        )
        .unwrap();
        for (d, s, n) in build_and_push(&conc, &out.join("conc"), &reg, "conc", None) {
            data_blobs.push((d, format!("conc:{s}"), n));
        }

        // A blob directory on a plain web server.
        let web = src.join("web");
        let mut web_files = Vec::new();
        for i in 0..6u64 {
            let name = format!("w{i}.bin");
            write_random(&web.join(&name), 300_000 * (i as usize + 1), 901 + 2 * i);
            web_files.push(name);
        }
        fs::write(data.join("web.sums"), sums(&web, &web_files)).unwrap();
        let web_out = root.join("www/blobs");
        stdout(
            lazypull()
                .arg("build")
                .arg(&web)
                .arg("-o")
                .arg(&web_out)
                .arg("--json"),
        );
        let web_manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(web_out.join("manifest.json")).unwrap()).unwrap();
        fs::write(
            data.join("web-meta"),
            web_manifest["meta"].as_str().unwrap(),
        )
        .unwrap();
        let web_server = lazypull::blob_server::BlobServer::start(&root.join("www")).unwrap();

        // Prefetch: a whole image, and one file of another by list.
        for name in ["pall", "plist"] {
            let dir = src.join(name);
            write_random(&dir.join("a.bin"), 2 << 20, 501 + 2 * name.len() as u64);
            write_random(
                &dir.join("b.bin"),
                (2 << 20) + 777,
                601 + 2 * name.len() as u64,
            );
            fs::write(
                data.join(format!("{name}.sums")),
                sums(&dir, &["a.bin".into(), "b.bin".into()]),
            )
            .unwrap();
            build_and_push(&dir, &out.join(name), &reg, name, None);
        }
        fs::write(
            data.join("plist.txt"),
            "# most wanted first\n/b.bin\n/nonexistent\n",
        )
        .unwrap();

        // Files of many sizes for the fault scenario.
        let faults = src.join("faults");
        let mut names = Vec::new();
        for i in 0..24u64 {
            let len = [3000, 70_000, 900_000, 1 << 20, 1_700_000, 3 << 20][(i % 6) as usize];
            let name = format!("f{i:02}.bin");
            write_random(&faults.join(&name), len, 1000 + i);
            names.push(name);
        }
        fs::write(data.join("faults.sha256"), sums(&faults, &names)).unwrap();
        let fault_blobs = build_and_push(&faults, &out.join("faults"), &reg, "faults", None);
        let fault_data = fault_blobs[0].1.clone();
        for (d, s, n) in fault_blobs {
            data_blobs.push((d, format!("faults:{s}"), n));
        }

        // An image whose every data fetch comes back corrupted: reads must fail.
        let doomed = src.join("doomed");
        write_random(&doomed.join("file.bin"), 2 << 20, 4242);
        let doomed_blobs = build_and_push(&doomed, &out.join("doomed"), &reg, "doomed", None);
        let doomed_data = doomed_blobs[0].1.clone();
        let doomed_blob = doomed_blobs[0].0.clone();

        let proxy_log = root.join("proxy.log");
        let proxy = Proxy::start(
            open.addr(),
            proxy_log.clone(),
            FaultSource::Fixed(String::new()),
        )
        .expect("starting the proxy");
        let faulty_log = root.join("faulty.log");
        let faulty = Proxy::start(
            open.addr(),
            faulty_log.clone(),
            FaultSource::Fixed(format!("{FAULTS},only:{fault_data}")),
        )
        .expect("starting the faulty proxy");
        let broken = Proxy::start(
            open.addr(),
            root.join("broken.log"),
            FaultSource::Fixed(format!("corrupt:1,only:{doomed_data}")),
        )
        .expect("starting the corrupting proxy");
        // Everything is in the registry now: the sources and build outputs go, to keep
        // the suite's disk use down.
        for dir in [&src, &out] {
            fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
        }
        Fixture {
            web: web_server,
            broken,
            root,
            data,
            kernel,
            auth_port: auth.addr().port(),
            _open: open,
            _auth: auth,
            proxy,
            proxy_log,
            faulty,
            faulty_log,
            fault_data,
            doomed_blob,
            data_blobs,
        }
    })
}

/// Boots `scenario`; returns the run and the proxy log entries it caused.
fn boot(scenario: &str) -> (GuestRun, Vec<LogEntry>) {
    let fx = fixture();
    let _one = GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let before = read_log(&fx.proxy_log).map(|l| l.len()).unwrap_or(0);
    let scenarios = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let empty = fx.root.join("empty");
    fs::create_dir_all(&empty).unwrap();
    let cfg = GuestConfig::new(&fx.kernel)
        .name(scenario)
        .network()
        .timeout(Duration::from_secs(1500))
        .disk(Disk::Ext4From {
            dir: empty,
            extra_mib: 16,
        })
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_TESTKIT", testkit().to_str().unwrap())
        .env("LP_DATA", fx.data.to_str().unwrap())
        .env("LP_SCENARIOS", scenarios.to_str().unwrap())
        .env("LP_PROXY_PORT", fx.proxy.addr().port().to_string())
        .env("LP_FAULT_PORT", fx.faulty.addr().port().to_string())
        .env("LP_BROKEN_PORT", fx.broken.addr().port().to_string())
        .env("LP_HTTP_PORT", fx.web.addr().port().to_string())
        .env("LP_AUTH_PORT", fx.auth_port.to_string())
        .env("LP_LOG_LEVEL", "info");
    let run = lazypull_guest::run(&scenarios.join(format!("{scenario}.sh")), &cfg)
        .unwrap_or_else(|e| panic!("guest run of {scenario}: {e:#}"));
    println!("--- {scenario}: guest log ---\n{}", run.log);
    if let Ok(log) = run.read_out("daemon.log") {
        println!("--- {scenario}: daemon log tail ---");
        println!("{}", lazypull_guest::tail_lines(&log, 40));
    }
    assert_eq!(run.status, 0, "scenario {scenario} failed:\n{}", run.log);
    assert_eq!(
        run.read_out("daemon.exit").unwrap().trim(),
        "0",
        "daemon exit status"
    );
    let log = read_log(&fx.proxy_log).unwrap_or_default();
    (run, log.into_iter().skip(before).collect())
}

/// Proxy log entries for the stored data of the image tagged `image`.
fn data_requests<'a>(fx: &Fixture, log: &'a [LogEntry], image: &str) -> (Vec<&'a LogEntry>, u64) {
    let (_, tagged, stored) = fx
        .data_blobs
        .iter()
        .find(|(_, s, _)| s.starts_with(&format!("{image}:")))
        .unwrap_or_else(|| panic!("no data blob for {image}"));
    let digest = tagged.split_once(':').unwrap().1;
    let entries = log.iter().filter(|e| e.path.contains(digest)).collect();
    (entries, *stored)
}

#[test]
fn mounts_by_reference_and_fetches_only_what_is_read() {
    let (run, log) = boot("registry");
    let fx = fixture();

    // The realistic tree, byte-exact.
    let want = fs::read_to_string(fx.data.join("manifest.tree")).unwrap();
    let entries = manifest::assert_same_manifest(
        &want,
        &run.read_out("manifest.tree").unwrap(),
        "through the registry",
    );
    assert!(entries > 1000, "a realistic tree has thousands of entries");

    // Data blobs are only ever fetched by Range, and nothing is fetched twice.
    for image in ["tree", "big", "conc"] {
        let (reqs, stored) = data_requests(fx, &log, image);
        assert!(!reqs.is_empty(), "{image}: no data requests at all");
        let mut ranges = Vec::new();
        for e in &reqs {
            assert_eq!(e.method, "GET", "{image}: {e:?}");
            assert!(
                e.range.is_some(),
                "{image}: a data request without Range: {e:?}"
            );
            assert_eq!(e.status, 206, "{image}: {e:?}");
            ranges.push(e.range.clone().unwrap());
        }
        let n = ranges.len();
        ranges.sort();
        ranges.dedup();
        assert_eq!(ranges.len(), n, "{image}: a range was fetched twice");
        let moved: u64 = reqs.iter().map(|e| e.bytes).sum();
        println!(
            "{image}: {n} range requests moved {moved} of {stored} stored bytes ({:.2}%)",
            moved as f64 * 100.0 / stored as f64
        );
        assert!(moved <= stored, "{image}: more bytes moved than stored");
        if image == "big" {
            assert!(
                stored >= BIG_BYTES as u64,
                "the big image stores {stored} bytes"
            );
            assert!(
                moved * 100 < stored,
                "reading one small file of a 300 MB image moved {moved} bytes (over 1%)"
            );
            assert_eq!(
                run.read_out("big.sum").unwrap(),
                fs::read_to_string(fx.data.join("big.sum")).unwrap()
            );
        }
        if image == "conc" {
            // Every unit of the two files read by 64 readers came over once.
            assert_eq!(
                moved, stored,
                "conc: the whole image is read, each byte once"
            );
        }
    }
    // Mount fetched the meta blob and tables once per image: no whole-blob GET
    // repeats.
    let mut whole: Vec<&str> = log
        .iter()
        .filter(|e| e.range.is_none() && e.path.contains("/blobs/"))
        .map(|e| e.path.as_str())
        .collect();
    let n = whole.len();
    whole.sort_unstable();
    whole.dedup();
    assert_eq!(whole.len(), n, "a whole blob was fetched twice");

    let want_conc = fs::read_to_string(fx.data.join("conc.sums")).unwrap();
    let got_conc = run.read_out("conc.sums").unwrap();
    let mut want_lines: Vec<String> = want_conc
        .lines()
        .map(|line| {
            let name = line.split_once("  ").unwrap().1;
            let count = if name == "shared.bin" { 48 } else { 16 };
            format!("{count} {line}")
        })
        .collect();
    want_lines.sort_unstable();
    let mut got_lines: Vec<&str> = got_conc.lines().collect();
    got_lines.sort_unstable();
    assert_eq!(
        got_lines, want_lines,
        "64 concurrent readers: every one of them read the right bytes"
    );

    // The web-served blob dir.
    assert_eq!(
        run.read_out("web.sums").unwrap(),
        fs::read_to_string(fx.data.join("web.sums")).unwrap(),
        "files read through the HTTP backend"
    );
    assert!(
        fx.web.requests() > 3,
        "the web server saw {} requests",
        fx.web.requests()
    );

    // Prefetch: after it finished, reading what it fetched costs no request.
    let requests = |name: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&run.read_out(name).unwrap()).unwrap();
        v["fetch"]["range_requests"].as_u64().unwrap()
    };
    assert_eq!(
        run.read_out("pall.sums").unwrap(),
        fs::read_to_string(fx.data.join("pall.sums")).unwrap()
    );
    assert_eq!(
        requests("pall-0.json"),
        requests("pall-1.json"),
        "reading a fully prefetched image fetched more"
    );
    let want = fs::read_to_string(fx.data.join("plist.sums")).unwrap();
    let mut want: Vec<&str> = want.lines().collect();
    want.reverse();
    assert_eq!(run.read_out("plist.sums").unwrap(), want.join("\n") + "\n");
    assert_eq!(
        requests("plist-0.json"),
        requests("plist-1.json"),
        "the listed file was not prefetched"
    );
    assert!(
        requests("plist-2.json") > requests("plist-1.json"),
        "the unlisted file must not have been prefetched"
    );
    let p: serde_json::Value =
        serde_json::from_str(&run.read_out("plist-0.json").unwrap()).unwrap();
    assert!(
        p["transport"]["counters"]["prefetched_bytes"]
            .as_u64()
            .unwrap()
            >= 4 << 20,
        "{p}"
    );
    assert!(p["fetch"]["background_units"].as_u64().unwrap() > 0, "{p}");

    // Authentication.
    let noauth = run.read_out("mount-noauth.err").unwrap();
    assert!(
        noauth.contains("requires authentication") || noauth.contains("credentials"),
        "no credentials must be a clear error: {noauth}"
    );
    let badauth = run.read_out("mount-badauth.err").unwrap();
    assert!(
        badauth.to_lowercase().contains("rejected") || badauth.contains("credentials"),
        "a wrong password must be a clear error: {badauth}"
    );
    assert_eq!(
        run.read_out("auth.sum").unwrap(),
        fs::read_to_string(fx.data.join("auth.sum")).unwrap()
    );

    let mount: serde_json::Value =
        serde_json::from_str(&run.read_out("mount-big.json").unwrap()).unwrap();
    println!(
        "big image mount: fetched {} bytes to mount {} bytes of data, {:.0} ms",
        mount["fetched_bytes"], mount["data_bytes"], mount["mount_ms"]
    );
    assert!(mount["fetched_bytes"].as_u64().unwrap() < 1 << 20);
    println!("{}", run.read_out("first-byte").unwrap().trim());
    let status: serde_json::Value =
        serde_json::from_str(&run.read_out("status.json").unwrap()).unwrap();
    assert_eq!(status["fetch"]["verify_failures"], 0, "{status}");
    assert_eq!(
        status["transport"]["counters"]["read_failures"], 0,
        "{status}"
    );
    assert!(
        status["fetch"]["dedup_waits"].as_u64().unwrap() > 0
            || status["transport"]["counters"]["windows_overlapped"]
                .as_u64()
                .unwrap()
                > 0,
        "64 readers of the same chunks must have met in flight: {status}"
    );
}

/// The status entry of the data blob `digest`.
fn blob_status<'a>(status: &'a serde_json::Value, digest: &str) -> &'a serde_json::Value {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    status["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["blob"].as_str().unwrap().contains(hex))
        .unwrap_or_else(|| panic!("no blob {digest} in the status: {status}"))
}

#[test]
fn faults_give_right_bytes_or_eio_never_wrong_bytes() {
    let (run, _) = boot("registry_faults");
    let fx = fixture();
    let want = fs::read_to_string(fx.data.join("faults.sha256")).unwrap();
    let want: Vec<(&str, &str)> = want.lines().map(|l| l.split_once("  ").unwrap()).collect();

    // The proxy's record first: what each range of the data blob got. The
    // slow faults' threads may still be asleep: wait until all are logged.
    assert!(
        fx.faulty.wait_idle(Duration::from_secs(300)),
        "the faulty proxy is still busy"
    );
    let mut log: Vec<LogEntry> = read_log(&fx.faulty_log)
        .unwrap()
        .into_iter()
        .filter(|e| e.path.contains(&fx.fault_data))
        .collect();
    log.sort_by_key(|e| e.n);
    let mut groups: Vec<(Option<String>, Vec<&LogEntry>)> = Vec::new();
    for e in &log {
        match groups.iter_mut().find(|(r, _)| *r == e.range) {
            Some((_, g)) => g.push(e),
            None => groups.push((e.range.clone(), vec![e])),
        }
    }
    let span = |e: &LogEntry| -> (u64, u64) {
        let (first, last) = e
            .range_bounds()
            .unwrap_or_else(|| panic!("a data fetch without a plain Range: {e:?}"));
        let last = last.unwrap_or_else(|| panic!("an open-ended data fetch: {e:?}"));
        (first, last + 1)
    };
    let clean = |e: &LogEntry| {
        let (first, end) = span(e);
        e.fault == Fault::None && e.status == 206 && e.bytes == end - first
    };
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let (mut fresh, mut refetches, mut transient) = (0, 0, 0);
    let mut kinds = std::collections::BTreeMap::new();
    for (k, (_, tries)) in groups.iter().enumerate() {
        let (first, end) = span(tries[0]);
        let refetch = spans.iter().any(|&(s, e)| s < end && first < e);
        spans.push((first, end));
        let faults: Vec<Fault> = tries.iter().map(|e| e.fault).collect();
        for f in &faults {
            *kinds.entry(f.as_str()).or_insert(0) += 1;
        }
        if refetch {
            // Overlaps bytes fetched before: clean, and fetched once.
            refetches += 1;
            assert!(
                tries.len() == 1 && clean(tries[0]),
                "refetch {k}: {tries:?}"
            );
        } else if k == 0 {
            // The first range: corrupted once (a whole 206), then at most one
            // clean fetch of the same range (after the failed verification).
            fresh += 1;
            assert!(
                faults[0] == Fault::Corrupt
                    && tries[0].status == 206
                    && tries[0].bytes == end - first
                    && tries.len() <= 2
                    && tries[1..].iter().all(|e| clean(e)),
                "first range: {tries:?}"
            );
        } else {
            // Every other new range: ATTEMPTS - 1 transient faults in one of
            // the scripted orders, then the last try, clean; once.
            fresh += 1;
            transient += ATTEMPTS - 1;
            assert!(
                tries.len() == ATTEMPTS
                    && TRANSIENT_SCRIPTS
                        .iter()
                        .any(|s| s[..] == faults[..ATTEMPTS - 1])
                    && clean(tries[ATTEMPTS - 1]),
                "range {k}: want {} scripted faults then one clean try, got {tries:?}",
                ATTEMPTS - 1
            );
        }
    }
    println!(
        "fault scenario: {fresh} new ranges, {refetches} refetches, {} requests; faults: {kinds:?}",
        log.len()
    );
    for kind in ["5xx", "reset", "truncate", "slow", "corrupt"] {
        assert!(
            kinds.contains_key(kind),
            "fault {kind} never injected: {kinds:?}"
        );
    }
    assert_eq!(kinds["corrupt"], 1, "{kinds:?}");

    // So every read gets the right bytes, except that the read which met the
    // corrupted fetch (the first file's) may fail with EIO: whether the kernel
    // tries that read again (and then gets the refetch) is its business. In
    // the second pass everything is right.
    let ok = |path: &str, sum: &str| format!("{path} rc=0 got={sum} err=");
    let eio =
        |path: &str| format!("{path} rc=1 got= err=sha256sum: /mnt/f/{path}: Input/output error ");
    let mut eio_reads = 0;
    for pass in ["faults.results", "faults.results2"] {
        let got = run.read_out(pass).unwrap();
        let got: Vec<&str> = got.lines().collect();
        assert_eq!(got.len(), want.len(), "{pass}: every file tried");
        for (i, (&(sum, path), g)) in want.iter().zip(&got).enumerate() {
            if pass == "faults.results" && i == 0 && *g == eio(path) {
                eio_reads += 1;
                continue;
            }
            assert_eq!(*g, ok(path, sum), "{pass}: {path} must read right");
        }
    }
    println!(
        "fault scenario: the first read failed with EIO: {}",
        eio_reads == 1
    );

    let status: serde_json::Value =
        serde_json::from_str(&run.read_out("status.json").unwrap()).unwrap();
    println!("status after faults: {}", status["fetch"]);
    // Concurrent faulty ranges may open the breaker (5 consecutive failures):
    // its tries are retries all the same, counted below.
    println!("backends after faults: {}", status["backends"]);
    // The daemon's counters agree: one retry per transient fault, and the
    // retries hid them all; one verification failure for the corrupted
    // fetch (nothing of it kept), one fetch per range fetched.
    let faults_blob = &fx
        .data_blobs
        .iter()
        .find(|(_, s, _)| s.starts_with("faults:"))
        .unwrap()
        .0;
    let faults_source = &blob_status(&status, faults_blob)["source"];
    assert_eq!(
        faults_source["errors"], 1,
        "faults blob: one verification failure: {status}"
    );
    assert_eq!(
        faults_source["requests"].as_u64().unwrap(),
        (log.len() - transient) as u64,
        "faults blob: one fetch per range fetched, its retries not counted: {status}"
    );
    assert_eq!(
        status["backend_http"]["retries"].as_u64().unwrap(),
        transient as u64,
        "one retry per transient fault, and no other: {status}"
    );
    assert_eq!(status["fetch"]["fetch_failures"], 0, "{status}");

    // Every fetch of the doomed image is corrupted: its read fails with EIO,
    // and every fetch of it fails verification.
    let doomed = run.read_out("doomed.result").unwrap();
    assert_eq!(
        doomed.trim_end(),
        "rc=1 err=cat: /mnt/d/file.bin: Input/output error",
        "a blob whose every fetch is corrupt must read as EIO"
    );
    let doomed_source = &blob_status(&status, &fx.doomed_blob)["source"];
    let doomed_fetches = doomed_source["requests"].as_u64().unwrap();
    assert!(doomed_fetches > 0, "{status}");
    assert_eq!(
        doomed_source["errors"].as_u64().unwrap(),
        doomed_fetches,
        "every doomed fetch fails verification: {status}"
    );
    assert_eq!(
        status["fetch"]["verify_failures"].as_u64().unwrap(),
        1 + doomed_fetches,
        "verification failures: the faults blob's one and the doomed blob's: {status}"
    );

    // The daemon kept serving a healthy image.
    let healthy = run.read_out("healthy.sum").unwrap();
    let want_conc = fs::read_to_string(fx.data.join("conc.sums")).unwrap();
    let want_shared = want_conc
        .lines()
        .find(|l| l.ends_with("  shared.bin"))
        .unwrap();
    assert_eq!(
        healthy.trim_end(),
        want_shared,
        "the healthy image read wrong"
    );
}
