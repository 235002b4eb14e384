//! `lazypull optimize` on this host, every part real: Debian's
//! `docker-registry` on 127.0.0.1 behind the test kit's logging proxy (which
//! records each request's `Range`), `lazypull daemon` over FUSE, EROFS and
//! overlayfs mounts, the workload run chrooted by `chroot(8)`.
//!
//! The image holds three 2 MiB files of pseudo-random bytes (`/1-first`,
//! `/2-second`, `/3-third`, laid out in that order in the data blob) and a
//! static busybox; the workload reads them in the order 3, 1, 2.
//!
//! - `the_record_is_what_the_workload_read_and_the_daemon_fetches_it_first`:
//!   the published record names busybox first (the kernel reads it to exec
//!   it), then the three files in the order they were read, each whole; the
//!   image with the record mounts (on a daemon with an empty cache) and
//!   serves the same bytes as the source tree; its data requests in the
//!   registry's log (the prefetch, before any reader) go busybox, 3, 1, 2;
//!   the image without a record mounts and prefetches nothing.
//! - `a_record_naming_what_the_image_lacks_is_refused_at_register`: records
//!   naming a file the image lacks, a range past a file's end, a directory,
//!   or a blob that is no record are refused by `lazypull mount`, naming
//!   why, and nothing is mounted.
//!
//! Needs root, /dev/fuse, EROFS file-backed mounts and overlayfs; fails
//! (never skips) without them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazypull_backend::registry::{ClientOptions, Registry};
use lazypull_oci::lazy::{self, BlobRef, LazyImage};
use lazypull_oci::prefetch::{Entry, Record};
use lazypull_testkit::proxy::{read_log, FaultSource, LogEntry, Proxy};
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

#[path = "common/lazy_stack.rs"]
mod lazy_stack;
use lazy_stack::{lazypull, ok, Proc};

const FILE_SIZE: usize = 2 << 20;
const FILES: [&str; 3] = ["/1-first", "/2-second", "/3-third"];
/// The order the workload reads them in.
const READ_ORDER: [&str; 3] = ["/3-third", "/1-first", "/2-second"];

fn require_host() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts FUSE, EROFS and overlayfs: run it as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "this test needs /dev/fuse");
}

/// Pseudo-random bytes (xorshift), different per seed: nothing dedups or
/// compresses.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The source tree: the three files and a static busybox.
fn source_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    for (i, f) in FILES.iter().enumerate() {
        fs::write(src.join(&f[1..]), noise(i as u64 + 1, FILE_SIZE)).unwrap();
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "this test needs a static /bin/busybox (Debian's busybox-static)"
    );
    fs::copy(busybox, src.join("bin/busybox")).unwrap();
    src
}

/// `lazypull daemon` over FUSE with every directory under `dir`, stopped
/// (SIGTERM, then SIGKILL) and its mounts undone when dropped.
struct Daemon {
    dir: PathBuf,
    _process: Proc,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        fs::create_dir_all(dir).unwrap();
        let mut cmd = lazypull();
        cmd.arg("daemon")
            .args(["--config", "/dev/null", "--transport", "fuse"])
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
            .arg(dir.join("run/fdstore.sock"))
            .args(["--log-level", "debug"]);
        let mut process = Proc::spawn("lazypull daemon", cmd, &dir.join("daemon.log"));
        process.unmount_under_when_gone(dir);
        process.wait_listening(&dir.join("run/ctl.sock"));
        Daemon {
            dir: dir.to_owned(),
            _process: process,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/ctl.sock")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        let out = lazypull()
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .output()
            .unwrap();
        serde_json::from_str(&ok(out, "lazypull status")).unwrap()
    }

    /// Waits until no prefetch runs.
    fn wait_prefetched(&self) {
        let start = Instant::now();
        while !self.status()["prefetching"]
            .as_array()
            .is_some_and(|a| a.is_empty())
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the prefetch did not end:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A registry behind a logging proxy, and the source image pushed to it.
struct Site {
    _registry: RegistryServer,
    proxy: Proxy,
    proxy_log: PathBuf,
    /// `<proxy>/test/opt`
    repo: String,
    src: PathBuf,
}

impl Site {
    fn new(dir: &Path) -> Site {
        let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
        let proxy_log = dir.join("proxy.log");
        let proxy = Proxy::start(
            registry.addr(),
            proxy_log.clone(),
            FaultSource::Fixed(String::new()),
        )
        .unwrap();
        let src = source_tree(dir);
        let out = dir.join("built");
        ok(
            lazypull()
                .arg("build")
                .arg(&src)
                .arg("-o")
                .arg(&out)
                .output()
                .unwrap(),
            "lazypull build",
        );
        let repo = format!("{}/test/opt", proxy.addr());
        ok(
            lazypull()
                .arg("push")
                .arg(&out)
                .arg(format!("{repo}:v1"))
                .output()
                .unwrap(),
            "lazypull push",
        );
        Site {
            _registry: registry,
            proxy,
            proxy_log,
            repo,
            src,
        }
    }

    fn client(&self) -> Registry {
        Registry::new(
            &self.proxy.addr().to_string(),
            "test/opt",
            None,
            &ClientOptions::default(),
        )
        .unwrap()
    }

    fn log_len(&self) -> usize {
        self.log().len()
    }

    /// The proxy's log once every request it has read is answered and
    /// logged: it writes an entry after the answer, so a client that has
    /// its answer can otherwise read a log without it (seen in CI: the
    /// test's own chunk table fetch counted as a read after the prefetch).
    fn log(&self) -> Vec<LogEntry> {
        assert!(
            self.proxy.wait_idle(std::time::Duration::from_secs(60)),
            "the proxy is still busy after 60 s"
        );
        read_log(&self.proxy_log).unwrap()
    }
}

/// The manifest, image and meta blob of `tag`.
fn image_of(
    reg: &Registry,
    tag: &str,
) -> (
    lazypull_oci::ImageManifest,
    LazyImage,
    lazypull_erofs::Image,
) {
    let (m, image) = LazyImage::parse_manifest(&reg.get_manifest(tag).unwrap().bytes).unwrap();
    let meta = reg
        .get_blob_sized(&image.meta.digest, image.meta.size, &|_| {})
        .unwrap();
    (m, image, lazypull_erofs::Image::from_bytes(meta).unwrap())
}

/// The data blob byte range (uncompressed) holding file `path`, which the
/// test's files fill contiguously.
fn blob_range(meta: &lazypull_erofs::Image, path: &str) -> std::ops::Range<u64> {
    let inode = meta.lookup(path.as_bytes()).unwrap();
    let extents = inode.chunks.as_ref().unwrap().extents(inode.size).unwrap();
    assert_eq!(extents.len(), 1, "{path}: {extents:?}");
    assert_eq!(extents[0].device_id, 1, "{path}");
    extents[0].offset..extents[0].offset + extents[0].len
}

#[test]
fn the_record_is_what_the_workload_read_and_the_daemon_fetches_it_first() {
    require_host();
    let tmp = tempfile::Builder::new()
        .prefix("lpopt")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let site = Site::new(dir);
    let reg = site.client();
    let (_, _, meta) = image_of(&reg, "v1");
    // The premise: the blob holds the files in name order (1, 2, 3), so the
    // read order (3, 1, 2) is not the blob's.
    let ranges: Vec<_> = FILES.iter().map(|f| blob_range(&meta, f)).collect();
    assert!(
        ranges[0].end <= ranges[1].start && ranges[1].end <= ranges[2].start,
        "{ranges:?}"
    );

    // Record.
    let recorded = {
        let daemon = Daemon::start(&dir.join("d1"));
        let mut args = vec!["/bin/busybox".to_owned(), "md5sum".to_owned()];
        args.extend(READ_ORDER.iter().map(|s| s.to_string()));
        let out = ok(
            lazypull()
                .arg("optimize")
                .arg(format!("{}:v1", site.repo))
                .arg("--out")
                .arg(format!("{}:rec", site.repo))
                .arg("--socket")
                .arg(daemon.socket())
                .arg("--json")
                .arg("--")
                .args(&args)
                .output()
                .unwrap(),
            "lazypull optimize",
        );
        let out: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out["workload_exit"], 0, "{out}");
        assert_eq!(out["truncated"], false, "{out}");
        // Nothing of the workload's mounts is left.
        assert!(
            daemon.status()["images"][0]["mountpoints"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{}",
            daemon.status()
        );
        out
    };
    let (m, _, _) = image_of(&reg, "rec");
    let (m1, img1, _) = image_of(&reg, "v1");
    // The same image (layers, config), plus the record.
    assert_eq!(m.layers, m1.layers);
    assert_eq!(m.config, m1.config);
    let rec_ref = lazy::prefetch_record(&m).unwrap().expect("a record");
    assert_eq!(lazy::prefetch_record(&m1).unwrap(), None);
    assert_eq!(recorded["record_digest"], rec_ref.digest.as_str());
    let record = Record::parse(
        &reg.get_blob_sized(&rec_ref.digest, rec_ref.size, &|_| {})
            .unwrap(),
    )
    .unwrap();

    // The record's order of first appearance: busybox (exec), then the
    // files as read.
    let mut order: Vec<&str> = Vec::new();
    for e in &record.entries {
        if !order.contains(&e.path.as_str()) {
            order.push(&e.path);
        }
    }
    assert_eq!(
        order,
        ["/bin/busybox", READ_ORDER[0], READ_ORDER[1], READ_ORDER[2]],
        "{record:?}"
    );
    for f in FILES {
        let mut covered: Vec<(u64, u64)> = record
            .entries
            .iter()
            .filter(|e| e.path == f)
            .map(|e| (e.offset, e.offset + e.length))
            .collect();
        covered.sort();
        let mut end = 0;
        for (s, t) in covered {
            assert!(s <= end, "{f}: a hole before {s} in the record");
            end = end.max(t);
        }
        assert_eq!(
            end, FILE_SIZE as u64,
            "{f}: the record does not cover the whole file"
        );
    }

    // Mount the recorded image on a daemon with an empty cache: it
    // prefetches the record, in order, before anyone reads.
    let daemon = Daemon::start(&dir.join("d2"));
    let before = site.log_len();
    let mnt = dir.join("mnt");
    let out = ok(
        lazypull()
            .arg("mount")
            .arg(format!("{}:rec", site.repo))
            .arg(&mnt)
            .arg("--socket")
            .arg(daemon.socket())
            .arg("--json")
            .output()
            .unwrap(),
        "lazypull mount (recorded)",
    );
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["prefetch"]["prefetch"], true, "{out}");
    assert!(
        out["prefetch"]["recorded_bytes"].as_u64().unwrap() >= 3 * FILE_SIZE as u64,
        "{out}"
    );
    daemon.wait_prefetched();
    // Which file each data request of the prefetch was for, in log order.
    let data = &img1.blobs[0];
    let table = lazypull_blob::ChunkTable::decode(
        &reg.get_blob_sized(&data.table.digest, data.table.size, &|_| {})
            .unwrap(),
    )
    .unwrap();
    let busybox = blob_range(&meta, "/bin/busybox");
    let named = |off: u64| -> &str {
        let r = [
            ("/bin/busybox", &busybox),
            (FILES[0], &ranges[0]),
            (FILES[1], &ranges[1]),
            (FILES[2], &ranges[2]),
        ];
        r.iter()
            .find(|(_, r)| r.contains(&off))
            .map(|(n, _)| *n)
            .unwrap_or("(another file)")
    };
    // In the order the requests arrived (`n`), not the order they were
    // answered (the log's): the units of one prefetch piece are fetched
    // concurrently, so their answers can come back in any order.
    let mut entries = site.log().split_off(before);
    entries.sort_by_key(|e| e.n);
    let mut fetched: Vec<&str> = Vec::new();
    for e in &entries {
        if !e.path.ends_with(&data.data.digest) || e.method != "GET" {
            continue;
        }
        let (start, end) = e.range_bounds().expect("a range request");
        let end = end.unwrap_or(data.data.size - 1);
        // Each stored unit the request covers, by the file its bytes are of.
        for u in table.units() {
            if u.stored_offset >= start && u.stored_offset <= end {
                let f = named(u.offset);
                if fetched.last() != Some(&f) {
                    fetched.push(f);
                }
            }
        }
    }
    // Each file by its first request: a piece spanning two files can have
    // the second's request arrive before the last of the first's.
    let mut files_fetched: Vec<&str> = Vec::new();
    for f in fetched.iter().copied() {
        if f != "(another file)" && !files_fetched.contains(&f) {
            files_fetched.push(f);
        }
    }
    assert_eq!(
        files_fetched,
        ["/bin/busybox", READ_ORDER[0], READ_ORDER[1], READ_ORDER[2]],
        "the prefetch's requests, in the registry's log order: {fetched:?}"
    );
    // Served bytes are the source's (now from the cache the prefetch filled).
    let before_reads = site.log_len();
    for f in FILES.iter().chain(&["/bin/busybox"]) {
        let got = fs::read(mnt.join(&f[1..])).unwrap();
        let want = fs::read(site.src.join(&f[1..])).unwrap();
        assert!(got == want, "{f}: the mounted image serves other bytes");
    }
    let later: Vec<_> = site.log()[before_reads..]
        .iter()
        .filter(|e| e.path.contains("/blobs/"))
        .cloned()
        .collect();
    assert!(
        later.is_empty(),
        "reads after the prefetch fetched again: {later:?}"
    );
    ok(
        lazypull()
            .arg("umount")
            .arg(&mnt)
            .arg("--socket")
            .arg(daemon.socket())
            .output()
            .unwrap(),
        "lazypull umount",
    );

    // The image without a record mounts as before and prefetches nothing.
    let out = ok(
        lazypull()
            .arg("mount")
            .arg(format!("{}:v1", site.repo))
            .arg(&mnt)
            .arg("--socket")
            .arg(daemon.socket())
            .arg("--json")
            .output()
            .unwrap(),
        "lazypull mount (no record)",
    );
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["prefetch"]["prefetch"], false, "{out}");
    let got = fs::read(mnt.join("2-second")).unwrap();
    assert!(got == fs::read(site.src.join("2-second")).unwrap());
    ok(
        lazypull()
            .arg("umount")
            .arg(&mnt)
            .arg("--socket")
            .arg(daemon.socket())
            .output()
            .unwrap(),
        "lazypull umount",
    );
}

/// Pushes `record_bytes` as the record of a copy of `v1`, tagged `tag`.
fn push_with_record(reg: &Registry, tag: &str, record_bytes: &[u8]) {
    let (m, _, _) = image_of(reg, "v1");
    let r = BlobRef {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(record_bytes))),
        size: record_bytes.len() as u64,
    };
    let bytes = record_bytes.to_vec();
    let open = move || -> std::io::Result<Box<dyn std::io::Read + Send>> {
        Ok(Box::new(std::io::Cursor::new(bytes.clone())))
    };
    reg.push_blob(&r.digest, r.size, &open, &|_| {}).unwrap();
    let m = lazy::with_prefetch_record(m, &r);
    reg.put_manifest(
        tag,
        lazy::MANIFEST_MEDIA_TYPE,
        &serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_record_naming_what_the_image_lacks_is_refused_at_register() {
    require_host();
    let tmp = tempfile::Builder::new()
        .prefix("lpopt")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let site = Site::new(dir);
    let reg = site.client();
    let entry = |path: &str, offset: u64, length: u64| Entry {
        path: path.into(),
        offset,
        length,
    };
    let hostile: [(&str, Vec<u8>, &[&str]); 4] = [
        (
            "missing",
            Record::new(vec![entry("/1-first", 0, 10), entry("/etc/shadow", 0, 10)]).to_bytes(),
            &["entry 1", "/etc/shadow", "not in the image"],
        ),
        (
            "past-end",
            Record::new(vec![entry("/2-second", FILE_SIZE as u64 - 10, 11)]).to_bytes(),
            &["entry 0", "/2-second", "the file has 2097152 bytes"],
        ),
        (
            "directory",
            Record::new(vec![entry("/bin", 0, 1)]).to_bytes(),
            &["entry 0", "/bin", "not a regular file"],
        ),
        (
            "garbage",
            br#"{"version":1,"entries":[{"path":"../x","offset":0,"length":1}]}"#.to_vec(),
            &["prefetch record", "normalised"],
        ),
    ];
    let daemon = Daemon::start(&dir.join("d"));
    let mnt = dir.join("mnt");
    for (tag, bytes, parts) in hostile {
        push_with_record(&reg, tag, &bytes);
        let out = lazypull()
            .arg("mount")
            .arg(format!("{}:{tag}", site.repo))
            .arg(&mnt)
            .arg("--socket")
            .arg(daemon.socket())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tag}: mounted");
        for p in parts {
            assert!(err.contains(p), "{tag}: {p:?} not in: {err}");
        }
        assert!(
            daemon.status()["images"].as_array().unwrap().is_empty(),
            "{tag}: registered anyway"
        );
        assert!(
            fs::read_dir(&mnt).map_or(true, |mut d| d.next().is_none()),
            "{tag}: something is mounted"
        );
    }
}
