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
        let img = build_from_layers(&[src], &out, &BuildOptions::default()).unwrap();
        fs::write(data.join("img"), &img.meta_digest).unwrap();
        fs::copy(img.meta_path(&out), blobs.join(&img.meta_digest)).unwrap();
        // The stored form: zstd units + chunk table, verified as they are served.
        for b in &img.blobs {
            lazypull_blob::pack(&out.join(&b.digest), &blobs, &Default::default()).unwrap();
        }
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
