//! Failover of the cachefiles transport against a real Linux 6.12 kernel in a
//! qemu guest: the daemon is killed with SIGKILL while 8 readers stream large
//! files, a new daemon takes the cache over (the fd store kept the device fd;
//! `restore` re-queues what was in flight); then an upgrade through the control
//! API (`lazypull daemon --takeover`) under the same load. Every reader must
//! finish with the right bytes, and none may hang.
//!
//! Needs root, qemu and the guest kernel; fails (never skips) without them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use lazypull_erofs::{build_from_layers, BuildOptions};
use lazypull_guest::{Disk, GuestConfig};
use sha2::Digest;

#[path = "common/manifest.rs"]
mod manifest;

/// Big files, two sets of 8 readers.
const FILES: usize = 16;
const FILE_BYTES: usize = 24 << 20;

struct Fixture {
    data: PathBuf,
    blobs: PathBuf,
    kernel: PathBuf,
}

fn write_random(path: &Path, len: usize, seed: u64) -> String {
    let data = lazypull_testkit::maketree::random_bytes(len, seed);
    fs::write(path, &data).unwrap();
    hex::encode(sha2::Sha256::digest(&data))
}

fn remove_dir(dir: &Path) {
    fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        lazypull_guest::require_root().expect("guest tests need root");
        let kernel = lazypull_guest::kernel().expect("guest kernel");
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-failover");
        let _ = fs::remove_dir_all(&root);
        let (src, out, data, blobs) = (
            root.join("src"),
            root.join("out"),
            root.join("data"),
            root.join("blobs"),
        );
        for d in [&src, &data, &blobs] {
            fs::create_dir_all(d).unwrap();
        }
        let mut sums = String::new();
        for i in 0..FILES {
            let name = format!("big{i}.bin");
            let sum = write_random(&src.join(&name), FILE_BYTES, 100 + i as u64);
            sums.push_str(&format!("{sum}  big{i}.bin\n"));
        }
        fs::write(data.join("sums"), sums).unwrap();
        let img =
            build_from_layers(std::slice::from_ref(&src), &out, &BuildOptions::default()).unwrap();
        fs::write(data.join("img"), &img.meta_digest).unwrap();
        fs::copy(img.meta_path(&out), blobs.join(&img.meta_digest)).unwrap();
        // The stored form: zstd units + chunk table, verified as they are served.
        for b in &img.blobs {
            lazypull_blob::pack(&out.join(&b.digest), &blobs, &Default::default()).unwrap();
        }
        // The guest reads only the packed blobs: the sources and the plain build go,
        // to keep the suite's disk use down.
        remove_dir(&src);
        remove_dir(&out);
        Fixture {
            data,
            blobs,
            kernel,
        }
    })
}

#[test]
fn readers_survive_a_killed_daemon_and_an_upgrade() {
    let fx = fixture();
    let scenarios = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let cfg = GuestConfig::new(&fx.kernel)
        .name("failover")
        .timeout(Duration::from_secs(1200))
        .disk(Disk::Ext4From {
            dir: fx.blobs.clone(),
            extra_mib: 64,
        })
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_DATA", fx.data.to_str().unwrap())
        .env("LP_SCENARIOS", scenarios.to_str().unwrap());
    let run = lazypull_guest::run(&scenarios.join("failover.sh"), &cfg)
        .unwrap_or_else(|e| panic!("guest run of failover: {e:#}"));
    println!("--- failover: guest log ---\n{}", run.log);
    for n in 1..=3 {
        if let Ok(log) = run.read_out(format!("daemon-{n}.log")) {
            let reads = log.lines().filter(|l| l.contains("READ msg_id")).count();
            println!("--- daemon {n} answered {reads} READs; log tail ---");
            println!("{}", lazypull_guest::tail_lines(&log, 15));
        }
    }
    assert_eq!(run.status, 0, "failover scenario failed:\n{}", run.log);

    // The failures happened mid-stream, not after the readers were done.
    let alive_at_kill: u32 = run
        .read_out("alive-at-kill")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        alive_at_kill, 8,
        "all 8 readers were streaming at the SIGKILL"
    );
    let alive_dead: u32 = run
        .read_out("alive-while-dead")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        alive_dead > 0,
        "readers were still waiting while no daemon ran"
    );
    let alive_at_takeover: u32 = run
        .read_out("alive-at-takeover")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        alive_at_takeover, 8,
        "all 8 readers were streaming at the takeover"
    );
    assert_eq!(
        run.read_out("old-daemon.exit").unwrap().trim(),
        "0",
        "the old daemon handed over and exited cleanly"
    );
    assert_eq!(run.read_out("daemon.exit").unwrap().trim(), "0");

    // The upgraded daemon knows what the adopted objects' cache files hold
    // (SEEK_DATA on their anon fds): more than it wrote itself so far.
    let status = run.read_out("status-after-takeover.json").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status)
        .unwrap_or_else(|e| panic!("status after the takeover: {e}: {status}"));
    let cached: u64 = status["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["local_file"] == false)
        .map(|b| b["cached_bytes"].as_u64().unwrap())
        .sum();
    let written = status["transport"]["counters"]["bytes_written"]
        .as_u64()
        .unwrap();
    assert!(
        cached > written,
        "after the takeover, status counts {cached} bytes cached, only the {written} this \
         daemon wrote: {status}"
    );

    // Every reader: the right bytes, no error.
    let want = fs::read_to_string(fx.data.join("sums")).unwrap();
    for (i, line) in want.lines().enumerate() {
        let got = run.read_out(format!("sum-{i}.txt")).unwrap();
        let err = run.read_out(format!("sum-{i}.err")).unwrap_or_default();
        assert_eq!(got.trim(), line.trim(), "reader {i} (stderr: {err})");
        assert!(err.is_empty(), "reader {i} reported: {err}");
    }
    assert_eq!(
        run.read_out("again-0.txt")
            .unwrap()
            .split_whitespace()
            .next(),
        want.lines().next().unwrap().split_whitespace().next()
    );
    // The successor after the SIGKILL answered READs: the restored and re-opened ones.
    let second = run.read_out("daemon-2.log").unwrap();
    assert!(
        second.lines().filter(|l| l.contains("READ msg_id")).count() > 0,
        "the second daemon served no READ"
    );
    assert!(
        second.contains("re-queued requests in flight"),
        "restore was written"
    );
}

/// The host half of `tests/guest/loop_6_1.sh`: a realistic tree and 8 big
/// files, built into two images (their data blobs in the stored zstd form,
/// so every READ goes through the fetch engine), and what the tree must look
/// like (`lazypull-testkit manifest` of its source).
struct LoopFixture {
    data: PathBuf,
    blobs: PathBuf,
    kernel: PathBuf,
}

fn testkit() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .unwrap()
        .join("lazypull-testkit")
}

fn loop_fixture() -> LoopFixture {
    lazypull_guest::require_root().expect("guest tests need root");
    let kernel = lazypull_guest::kernel_of(lazypull_guest::KernelSeries::V6_1)
        .expect("the Linux 6.1 guest kernel");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-loop-6-1");
    let _ = fs::remove_dir_all(&root);
    let (tree, big, out, data, blobs) = (
        root.join("tree"),
        root.join("big"),
        root.join("out"),
        root.join("data"),
        root.join("blobs"),
    );
    for d in [&big, &data, &blobs] {
        fs::create_dir_all(d).unwrap();
    }
    lazypull_testkit::maketree::make_tree(
        &tree,
        &lazypull_testkit::maketree::TreeOptions {
            seed: 11,
            with_huge: false,
        },
    )
    .unwrap();
    for lib in ["/usr/lib/python3.11/email", "/usr/lib/python3.11/json"] {
        let dst = tree.join(lib.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(lib)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(st.success(), "copying {lib}");
    }
    let manifest = std::process::Command::new(testkit())
        .arg("manifest")
        .arg(&tree)
        .output()
        .expect("running lazypull-testkit manifest");
    assert!(manifest.status.success(), "lazypull-testkit manifest");
    fs::write(data.join("manifest.expected"), &manifest.stdout).unwrap();
    let mut sums = String::new();
    for i in 0..8 {
        let sum = write_random(&big.join(format!("big{i}.bin")), 32 << 20, 300 + i as u64);
        sums.push_str(&format!("{sum}  big{i}.bin\n"));
    }
    fs::write(data.join("sums"), sums).unwrap();
    for (name, src) in [("tree", &tree), ("big", &big)] {
        let dir = out.join(name);
        let img =
            build_from_layers(std::slice::from_ref(src), &dir, &BuildOptions::default()).unwrap();
        fs::write(data.join(format!("img-{name}")), &img.meta_digest).unwrap();
        fs::copy(img.meta_path(&dir), blobs.join(&img.meta_digest)).unwrap();
        for b in &img.blobs {
            lazypull_blob::pack(&dir.join(&b.digest), &blobs, &Default::default()).unwrap();
        }
    }
    for dir in [&tree, &big, &out] {
        remove_dir(dir);
    }
    LoopFixture {
        data,
        blobs,
        kernel,
    }
}

#[test]
fn on_linux_6_1_auto_serves_through_loop_devices_and_readers_survive_a_killed_daemon() {
    let fx = loop_fixture();
    let scenarios = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let cfg = GuestConfig::new(&fx.kernel)
        .name("loop-6-1")
        .timeout(Duration::from_secs(1500))
        .disk(Disk::Ext4From {
            dir: fx.blobs.clone(),
            extra_mib: 64,
        })
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_TESTKIT", testkit().to_str().unwrap())
        .env("LP_DATA", fx.data.to_str().unwrap())
        .env("LP_SCENARIOS", scenarios.to_str().unwrap());
    let run = lazypull_guest::run(&scenarios.join("loop_6_1.sh"), &cfg)
        .unwrap_or_else(|e| panic!("guest run of loop_6_1: {e:#}"));
    println!("--- loop_6_1: guest log ---\n{}", run.log);
    for name in ["daemon-1.log", "daemon-2.log"] {
        if let Ok(log) = run.read_out(name) {
            println!(
                "--- {name} (tail) ---\n{}",
                lazypull_guest::tail_lines(&log, 20)
            );
        }
    }
    assert_eq!(run.status, 0, "loop_6_1 scenario failed:\n{}", run.log);
    assert!(
        run.read_out("kernel").unwrap().starts_with("6.1."),
        "booted {}",
        run.read_out("kernel").unwrap()
    );

    // auto picked loop devices, saying why, and status shows it.
    let status: serde_json::Value =
        serde_json::from_str(&run.read_out("status.json").unwrap()).unwrap();
    assert_eq!(status["transport"]["kind"], "loop", "{status}");
    let first = run.read_out("daemon-1.log").unwrap();
    let chosen = first
        .lines()
        .find(|l| l.contains("transport chosen"))
        .unwrap_or_else(|| panic!("no transport choice logged:\n{first}"));
    assert!(
        chosen.contains("cachefiles on-demand mode is unusable")
            && chosen.contains("EROFS mounts files from Linux 6.12 on")
            && chosen.contains("using loop devices"),
        "{chosen}"
    );
    assert!(
        run.read_out("status.txt").unwrap().contains("loop"),
        "{}",
        run.read_out("status.txt").unwrap()
    );
    assert!(
        !run.read_out("loops-mounted").unwrap().trim().is_empty(),
        "the tree's mount holds loop devices over the blob files"
    );

    // The tree, identical: every entry's bytes and metadata.
    let expected = fs::read_to_string(fx.data.join("manifest.expected")).unwrap();
    let entries = manifest::assert_same_manifest(
        &expected,
        &run.read_out("manifest").unwrap(),
        "through loop devices on 6.1",
    );
    assert!(entries > 500, "a realistic tree: {entries} entries");

    // The SIGKILL landed mid-stream; the successor answered from the journal.
    assert_eq!(
        run.read_out("alive-at-kill").unwrap().trim(),
        "8",
        "all 8 readers were streaming at the SIGKILL"
    );
    assert_ne!(
        run.read_out("alive-while-dead").unwrap().trim(),
        "0",
        "readers waited while no daemon ran"
    );
    let second = run.read_out("daemon-2.log").unwrap();
    assert!(
        second.contains("took over the FUSE connection")
            && second.contains("serving through loop devices"),
        "{second}"
    );
    assert!(
        second.contains("answering what the previous daemon left from its journal")
            && second.contains("resend=false"),
        "6.1 cannot resend: the journal answers\n{second}"
    );
    // The READs the killed daemon had taken and not answered: without the
    // journal these readers would hang for ever on this kernel.
    let answered: u64 = second
        .lines()
        .find(|l| l.contains("answered what the previous daemon left"))
        .and_then(|l| l.split("answered=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no recovery summary:\n{second}"));
    println!("the successor answered {answered} READs the killed daemon had taken");
    assert!(
        answered > 0,
        "the kill landed with READs in flight (8 streaming readers): {second}"
    );
    let want_sums = fs::read_to_string(fx.data.join("sums")).unwrap();
    for (i, line) in want_sums.lines().enumerate() {
        let got = run.read_out(format!("sum-{i}.txt")).unwrap();
        let err = run.read_out(format!("sum-{i}.err")).unwrap_or_default();
        assert_eq!(got.trim(), line.trim(), "reader {i} (stderr: {err})");
        assert!(err.is_empty(), "reader {i} reported: {err}");
    }
    let after: serde_json::Value =
        serde_json::from_str(&run.read_out("status-after.json").unwrap()).unwrap();
    assert_eq!(after["transport"]["kind"], "loop", "{after}");
    assert_eq!(
        after["transport"]["counters"]["read_failures"], 0,
        "{after}"
    );

    assert_eq!(
        run.read_out("loops-after-umount").unwrap().trim(),
        "",
        "loop devices left after the unmounts"
    );
    assert_eq!(run.read_out("daemon.exit").unwrap().trim(), "0");
}
