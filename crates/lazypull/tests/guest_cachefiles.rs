//! The cachefiles transport against a real Linux 6.12 kernel in a qemu guest.
//!
//! The host builds images with lazypull's own EROFS builder (a realistic tree from the
//! host's /usr plus a feature tree with xattrs, devices, hard links...), records what
//! every file must look like, then boots the guest kernel once per scenario
//! (`tests/guest/*.sh`) and checks what the scenario saw. These tests need root,
//! qemu and the guest kernel (`guest/build-kernel.sh`, cached); without them they
//! fail with the reason — they never skip.

#[path = "common/manifest.rs"]
mod manifest;
use manifest::is_root_line;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use lazypull_erofs::{build_from_layers, BuildOptions, BuiltImage};
use lazypull_guest::{Disk, GuestConfig, GuestRun};
use lazypull_testkit::maketree::write_random;

/// One guest at a time: each already uses both host cores under TCG.
static GUEST: Mutex<()> = Mutex::new(());

struct Fixture {
    data: PathBuf,
    /// Build output of image A, plain blobs (the guest's blob dir has some packed).
    out_a: PathBuf,
    a: BuiltImage,
    blobs: PathBuf,
    kernel: PathBuf,
    base_blob: String,
}

/// Runs `cmd`, panicking with its stderr unless it succeeds; returns its stdout.
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

/// Sibling binaries built by `cargo test --workspace` (the testkit is a dev tool of
/// another package, so cargo gives no CARGO_BIN_EXE_ for it).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built: run the tests with `cargo test --workspace` (or `cargo build -p lazypull-testkit`)",
        bin.display()
    );
    bin
}

fn testkit() -> PathBuf {
    workspace_bin("lazypull-testkit")
}

fn build(layers: &[&Path], out: &Path) -> BuiltImage {
    let layers: Vec<PathBuf> = layers.iter().map(|p| p.to_path_buf()).collect();
    build_from_layers(&layers, out, &BuildOptions::default())
        .unwrap_or_else(|e| panic!("building image from {layers:?}: {e}"))
}

/// Regular files under `dir` (relative paths), sorted.
fn regular_files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e
                .path()
                .strip_prefix(dir)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            (rel, e.metadata().unwrap().len())
        })
        .collect();
    files.sort();
    files
}

/// `sha256sum`-format lines for `paths` (relative to `dir`).
fn sums(dir: &Path, paths: &[String]) -> String {
    let mut out = String::new();
    for p in paths {
        let line = stdout(Command::new("sha256sum").arg(p).current_dir(dir));
        out.push_str(&line);
    }
    out
}

fn remove_dir(dir: &Path) {
    fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        lazypull_guest::require_root().expect("guest tests need root");
        let kernel = lazypull_guest::kernel().expect("guest kernel");
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-cachefiles");
        let _ = fs::remove_dir_all(&root);
        let layers = root.join("layers");
        let base = layers.join("base");
        // A realistic tree: thousands of files from the host's /usr, plus a large file.
        for src in ["/usr/lib/python3.11", "/usr/share/perl", "/usr/include"] {
            let dst = base.join(src.trim_start_matches('/'));
            fs::create_dir_all(dst.parent().unwrap()).unwrap();
            stdout(Command::new("cp").arg("-a").arg(src).arg(&dst));
        }
        write_random(&base.join("data/big.bin"), 64 << 20, 1);
        let features = layers.join("features");
        stdout(
            Command::new(testkit())
                .args(["make-tree"])
                .arg(&features)
                .args(["--seed", "7"]),
        );
        let extra = layers.join("extra");
        write_random(&extra.join("extra/only-in-b.bin"), 3 << 20, 2);
        fs::write(extra.join("extra/hello.txt"), "hello from image B\n").unwrap();
        let cdata = layers.join("cdata");
        write_random(&cdata.join("big.bin"), 8 << 20, 3);
        let ddata = layers.join("ddata");
        write_random(&ddata.join("file.bin"), 1 << 20, 4);
        let edata = layers.join("edata");
        write_random(&edata.join("file.bin"), 3 << 20, 5);

        let out = root.join("out");
        let a = build(&[&base, &features], &out.join("a"));
        let b = build(&[&base, &extra], &out.join("b"));
        let c = build(&[&cdata], &out.join("c"));
        let d = build(&[&ddata], &out.join("d"));
        let e = build(&[&edata], &out.join("e"));
        assert!(
            a.blobs.len() >= 2,
            "image A must have two data blobs: {:?}",
            a.blobs
        );
        assert_eq!(
            a.blobs[0].digest, b.blobs[0].digest,
            "A and B share the base blob"
        );

        // Three images of 12 MiB each for the cache limit (30 MiB).
        for (name, seed) in [("f", 21u64), ("g", 22), ("h", 23)] {
            let dir = layers.join(format!("{name}data"));
            write_random(&dir.join("file.bin"), 12 << 20, seed);
            let img = build(&[&dir], &out.join(name));
            let data = root.join("data");
            fs::create_dir_all(&data).unwrap();
            fs::write(data.join(format!("img-{name}")), &img.meta_digest).unwrap();
            fs::write(
                data.join(format!("{name}.sha256")),
                sums(&dir, &["file.bin".into()]),
            )
            .unwrap();
        }

        let blobs = root.join("blobs");
        fs::create_dir_all(&blobs).unwrap();
        for img in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            for e in fs::read_dir(out.join(img)).unwrap() {
                let e = e.unwrap();
                if e.file_name() != "manifest.json" {
                    fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
                }
            }
        }
        fs::remove_file(blobs.join(&d.blobs[0].digest)).unwrap();
        // Stored (zstd + chunk table) forms: the shared base blob, so the realistic
        // tree and the shared domain are served decompressed and verified unit by
        // unit; and E's blob with one byte of its stored data flipped.
        for digest in [&a.blobs[0].digest, &e.blobs[0].digest] {
            let plain = blobs.join(digest);
            lazypull_blob::pack(&plain, &blobs, &Default::default()).unwrap();
            fs::remove_file(&plain).unwrap();
        }
        let zst = blobs.join(format!("{}.zst", e.blobs[0].digest));
        let mut stored = fs::read(&zst).unwrap();
        let middle = stored.len() / 2;
        stored[middle] ^= 0x5a;
        fs::write(&zst, stored).unwrap();

        let data = root.join("data");
        fs::create_dir_all(&data).unwrap();
        fs::write(data.join("img-a"), &a.meta_digest).unwrap();
        fs::write(data.join("img-b"), &b.meta_digest).unwrap();
        fs::write(data.join("img-c"), &c.meta_digest).unwrap();
        fs::write(data.join("img-d"), &d.meta_digest).unwrap();
        fs::write(data.join("img-e"), &e.meta_digest).unwrap();
        fs::write(data.join("blob-base"), &a.blobs[0].digest).unwrap();
        fs::write(data.join("blob-c"), &c.blobs[0].digest).unwrap();

        // 32 different files of useful size for the concurrent readers.
        let base_files = regular_files(&base);
        let mid: Vec<String> = base_files
            .iter()
            .filter(|(_, len)| (64 << 10..8 << 20).contains(len))
            .map(|(p, _)| p.clone())
            .collect();
        assert!(
            mid.len() >= 32,
            "tree too small: {} mid-size files",
            mid.len()
        );
        let step = mid.len() / 32;
        let picked: Vec<String> = (0..32).map(|i| mid[i * step].clone()).collect();
        let mut concurrent: Vec<String> = sums(&base, &picked).lines().map(String::from).collect();
        concurrent.sort_by(|x, y| {
            x.split_once("  ")
                .unwrap()
                .1
                .cmp(y.split_once("  ").unwrap().1)
        });
        fs::write(data.join("concurrent.sha256"), concurrent.join("\n") + "\n").unwrap();

        // Samples for the multi-image scenarios: every 50th base file, all extra/feature files.
        let sample_base: Vec<String> = base_files
            .iter()
            .step_by(50)
            .map(|(p, _)| p.clone())
            .collect();
        let feature_files: Vec<String> = regular_files(&features)
            .into_iter()
            .filter(|(_, len)| *len < 64 << 20)
            .map(|(p, _)| p)
            .collect();
        let extra_files: Vec<String> = regular_files(&extra).into_iter().map(|(p, _)| p).collect();
        fs::write(
            data.join("sample-a.sha256"),
            sums(&base, &sample_base) + &sums(&features, &feature_files),
        )
        .unwrap();
        fs::write(
            data.join("sample-b.sha256"),
            sums(&base, &sample_base) + &sums(&extra, &extra_files),
        )
        .unwrap();

        // What the mounted image A must look like: the two layers' manifests, merged
        // (their paths are disjoint apart from the root directory, compared apart).
        let mut expected: Vec<String> = Vec::new();
        for layer in [&base, &features] {
            let m = stdout(Command::new(testkit()).arg("manifest").arg(layer));
            expected.extend(m.lines().filter(|l| !is_root_line(l)).map(String::from));
        }
        expected.sort();
        fs::write(data.join("manifest.expected"), expected.join("\n") + "\n").unwrap();
        // Only the guest's blob dir and image A's build output are read from here on:
        // the source trees and the other builds go, to keep the suite's disk use down.
        remove_dir(&layers);
        for img in ["b", "c", "d", "e", "f", "g", "h"] {
            remove_dir(&out.join(img));
        }

        Fixture {
            data,
            out_a: out.join("a"),
            a: a.clone(),
            blobs,
            kernel,
            base_blob: a.blobs[0].digest.clone(),
        }
    })
}

fn boot(scenario: &str) -> GuestRun {
    let fx = fixture();
    let _one = GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let scenarios = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let cfg = GuestConfig::new(&fx.kernel)
        .name(scenario)
        .timeout(Duration::from_secs(1200))
        .disk(Disk::Ext4From {
            dir: fx.blobs.clone(),
            extra_mib: 64,
        })
        .disk(Disk::EmptyExt4 { size_mib: 2048 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_TESTKIT", testkit().to_str().unwrap())
        .env("LP_DATA", fx.data.to_str().unwrap())
        .env("LP_SCENARIOS", scenarios.to_str().unwrap());
    let run = lazypull_guest::run(&scenarios.join(format!("{scenario}.sh")), &cfg)
        .unwrap_or_else(|e| panic!("guest run of {scenario}: {e:#}"));
    println!("--- {scenario}: guest log ---\n{}", run.log);
    if let Ok(log) = run.read_out("daemon.log") {
        let reads = log.lines().filter(|l| l.contains("READ msg_id")).count();
        println!("--- {scenario}: daemon answered {reads} READ requests; log tail ---");
        println!("{}", lazypull_guest::tail_lines(&log, 40));
    }
    assert_eq!(run.status, 0, "scenario {scenario} failed:\n{}", run.log);
    assert_eq!(
        run.read_out("daemon.exit").unwrap().trim(),
        "0",
        "daemon exit status"
    );
    run
}

fn kv(text: &str, key: &str) -> u64 {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= missing in {text:?}"))
        .parse()
        .unwrap()
}

#[test]
fn serves_a_realistic_tree_byte_exact_through_cachefiles() {
    let run = boot("full_tree");
    let fx = fixture();
    let expected = fs::read_to_string(fx.data.join("manifest.expected")).unwrap();
    for pass in ["manifest.first", "manifest.second"] {
        manifest::assert_same_manifest(&expected, &run.read_out(pass).unwrap(), pass);
    }
    assert!(
        expected.lines().count() > 5000,
        "tree should have thousands of entries"
    );

    let want_sums = fs::read_to_string(fx.data.join("concurrent.sha256")).unwrap();
    let got_sums = run.read_out("concurrent.got").unwrap();
    assert_eq!(got_sums.lines().count(), 32, "32 concurrent readers");
    assert_eq!(got_sums, want_sums, "concurrent readers read wrong data");

    let reads = run.read_out("reads").unwrap();
    let (first, second) = (kv(&reads, "reads_first"), kv(&reads, "reads_second"));
    assert!(first > 0, "the daemon must have served READs: {reads}");
    assert_eq!(
        first, second,
        "after drop_caches the kernel must not ask again"
    );

    // The meta blob, filled whole after its OPEN, is not asked for again.
    let meta = run.read_out("meta_reads").unwrap();
    assert_eq!(
        kv(&meta, "meta_reads_walk"),
        0,
        "a metadata walk after the up-front fill READs nothing of the meta blob: {meta}"
    );
    assert!(
        kv(&meta, "meta_reads_mount") <= 4,
        "the mount itself READs a few blocks at most (superblock, device table, root inode): {meta}"
    );

    let fds = run.read_out("fds").unwrap();
    assert!(
        kv(&fds, "anon_fds_mounted") >= 3,
        "meta + 2 data blobs open: {fds}"
    );
    assert_eq!(
        kv(&fds, "anon_fds_after_umount"),
        0,
        "CLOSE must release every fd"
    );
    let log = run.read_out("daemon.log").unwrap();
    assert!(
        log.contains("CLOSE: object released"),
        "CLOSE seen in the log"
    );
    println!("daemon peak RSS: {}", run.read_out("rss").unwrap().trim());
}

#[test]
fn two_images_at_once_and_a_shared_domain_blob() {
    let run = boot("two_images");
    let fx = fixture();
    let opens = run.read_out("domain-opens").unwrap();
    let base_opens = opens
        .lines()
        .filter(|l| l.contains(&format!("cookie={}", fx.base_blob)))
        .count();
    assert_eq!(
        base_opens, 1,
        "the shared base blob is one object in the domain:\n{opens}"
    );
    assert!(
        opens.lines().all(|l| l.contains("volume=erofs,shared")),
        "every OPEN of the domain mounts is in the domain's volume:\n{opens}"
    );
}

#[test]
fn missing_and_truncated_blobs_fail_cleanly_and_the_daemon_keeps_serving() {
    let run = boot("failures");
    let log = run.read_out("daemon.log").unwrap();
    assert!(
        log.contains("OPEN refused") && log.contains("\"no-such-image\" not found"),
        "the daemon names the missing meta blob"
    );
    let d_meta = fs::read_to_string(fixture().data.join("img-d")).unwrap();
    let missing = log
        .lines()
        .filter(|l| l.contains("OPEN refused") && l.contains("not found"))
        .count();
    assert!(
        missing >= 2,
        "both missing blobs logged (image {d_meta}):\n{log}"
    );
    // A missing data blob: the mount fails, or (Linux 6.12 does not fail a mount
    // whose device OPEN was refused) every read of that blob's data fails: the
    // kernel reports ENOBUFS (no cache object) or EIO, never data, never a hang.
    let missing = run.read_out("mount-missing-data.result").unwrap();
    if missing.trim() == "mounted" {
        let rc: i32 = run
            .read_out("read-missing-data.rc")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let err = run.read_out("read-missing-data.err").unwrap();
        assert!(
            rc != 0 && rc != 124,
            "read of a missing blob must fail, not hang: rc={rc}"
        );
        assert!(
            err.contains("Input/output error") || err.contains("No buffer space available"),
            "reader gets an I/O error: {err}"
        );
    } else {
        assert_eq!(missing.trim(), "refused");
    }
    let rc: i32 = run
        .read_out("read-truncated.rc")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let err = run.read_out("read-truncated.err").unwrap();
    assert_ne!(rc, 124, "reading a truncated blob must not hang");
    assert_ne!(rc, 0, "reading a truncated blob must fail");
    assert!(err.contains("Input/output error"), "reader gets EIO: {err}");
    assert!(
        log.contains("is truncated"),
        "the daemon logs the truncation"
    );
    // A stored blob whose bytes do not match its chunk table's digest: EIO, logged.
    let rc: i32 = run
        .read_out("read-corrupt.rc")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let err = run.read_out("read-corrupt.err").unwrap();
    assert!(
        rc != 0 && rc != 124,
        "read of a corrupt blob must fail, not hang: rc={rc}"
    );
    assert!(err.contains("Input/output error"), "reader gets EIO: {err}");
    assert!(
        log.contains("sha256 mismatch"),
        "the daemon logs the digest mismatch"
    );
}

#[test]
fn a_device_read_error_does_not_end_serving_and_a_second_daemon_is_refused() {
    let run = boot("device_errors");
    let log = run.read_out("daemon.log").unwrap();
    // At its fd limit the daemon's read of the device failed with EMFILE (the
    // kernel failed that OPEN, so the mount failed), and the daemon went on.
    assert!(
        log.contains("reading the cachefiles device failed") && log.contains("Too many open files"),
        "the EMFILE read was met and logged:\n{}",
        lazypull_guest::tail_lines(&log, 40)
    );
    assert_ne!(
        run.read_out("mount-at-limit.rc").unwrap().trim(),
        "0",
        "the OPEN the kernel could not give an fd fails its mount"
    );
    let status: serde_json::Value =
        serde_json::from_str(&run.read_out("status.json").unwrap()).unwrap();
    let errors = status["transport"]["counters"]["device_read_errors"]
        .as_u64()
        .unwrap_or_else(|| panic!("no device_read_errors counter: {status}"));
    assert!(errors >= 1, "counted: {errors}");
    for name in ["after-limit", "after-second"] {
        let rc = run.read_out(format!("read-{name}.rc")).unwrap();
        let err = run.read_out(format!("read-{name}.err")).unwrap();
        assert_eq!(rc.trim(), "0", "reading a new blob {name}: {err}");
    }
    // The second daemon refused, naming the reason, and did not serve FUSE.
    let second = run.read_out("second-daemon.log").unwrap();
    let rc = run.read_out("second-daemon.rc").unwrap();
    assert!(
        rc.trim() != "0" && rc.trim() != "124",
        "the second daemon exits at once with an error: rc={rc}\n{second}"
    );
    assert!(
        second.contains("another daemon holds /dev/cachefiles"),
        "{second}"
    );
}

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// The same image mounted by the host kernel (6.18) file-backed, no daemon: the
/// meta blob as the source and the plain data blobs as `device=` files, through
/// mount(2) (mount(8) would put a loop device under the file and EROFS then
/// refuses `device=` files). It must read back identical to the source tree.
#[test]
fn the_same_image_mounted_file_backed_on_the_host_is_identical() {
    let fx = fixture();
    let mnt = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("host-mount-a");
    fs::create_dir_all(&mnt).unwrap();
    let devices: Vec<String> =
        fx.a.blobs
            .iter()
            .map(|b| format!("device={}", fx.out_a.join(&b.digest).display()))
            .collect();
    let options = std::ffi::CString::new(devices.join(",")).unwrap();
    rustix::mount::mount(
        fx.out_a.join(&fx.a.meta_digest),
        &mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        Some(options.as_c_str()),
    )
    .unwrap_or_else(|e| panic!("file-backed mount of image A on the host: {e}"));
    let _mounted = Mounted(mnt.clone());
    let got = stdout(Command::new(testkit()).arg("manifest").arg(&mnt));
    let expected = fs::read_to_string(fx.data.join("manifest.expected")).unwrap();
    manifest::assert_same_manifest(&expected, &got, "the host's file-backed mount");
}

/// `cache_limit` on cachefiles (issue 17): 30 MiB over three images of 12 MiB.
/// Read one after another (each unmounted before the next), the cache stays
/// within its limit, sampled as often as `du` can, because the idle objects of the
/// image read longest ago are culled; the culled image reads right again.
/// Mounted all at once, every object is in use: the cache goes over its limit
/// (logged once), the reads stay right, and once they are unmounted the next
/// read brings it back within the limit.
#[test]
fn a_cache_limit_culls_idle_objects_least_recently_used_first() {
    let run = boot("cache_limit");
    let samples = run.read_out("du-samples").unwrap();
    let kib: Vec<u64> = samples
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(kib.len() > 20, "too few samples: {samples}");
    let limit_kib = 30 << 10;
    let peak = kib.iter().copied().max().unwrap();
    assert!(
        peak <= limit_kib,
        "the cache held {peak} KiB against its {limit_kib} KiB limit while images were read one at a time"
    );
    let status: serde_json::Value =
        serde_json::from_str(&run.read_out("status.json").unwrap()).unwrap();
    let cache = &status["cache"];
    assert_eq!(cache["limit_bytes"], 30u64 << 20, "{cache}");
    assert!(cache["removed_blobs"].as_u64().unwrap() >= 2, "{cache}");
    assert!(cache["used_bytes"].as_u64().unwrap() <= 30 << 20, "{cache}");
    let over: serde_json::Value =
        serde_json::from_str(&run.read_out("status-over.json").unwrap()).unwrap();
    assert!(
        over["cache"]["used_bytes"].as_u64().unwrap() > 30 << 20,
        "three mounted images must hold more than the limit: {}",
        over["cache"]
    );
    assert_eq!(over["cache"]["no_room"], 1, "{}", over["cache"]);
    let after = kv(&run.read_out("after-over").unwrap(), "kib");
    assert!(after <= limit_kib, "{after} KiB after the mounts went");
    println!("FIGURES cachefiles cache_limit: peak {peak} KiB of {limit_kib} KiB one image at a time; {}", over["cache"]);
}
