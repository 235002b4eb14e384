//! Containers from lazy images under containerd on this host, every part
//! real (Debian's `docker-registry` on 127.0.0.1, `lazypull daemon` over
//! FUSE, `lazypull snapshotter`, containerd 1.6, runc): what removal,
//! restarts and setuid programs do to them (issue 12, items 2 and 5).
//!
//! - `gc_keeps_what_the_image_needs_and_removal_leaves_nothing`: a
//!   container's removal followed by a garbage collection pass of
//!   containerd (a synchronous one, checked in containerd's debug log to
//!   have collected the lazypull snapshotter) while the image is still
//!   there keeps the committed chain; a second container then starts
//!   without the registry seeing a single data blob request (the daemon's
//!   cache serves what the first read). Removing the image with `--sync`
//!   leaves no lazy mount, no snapshot directory, and no mount in the
//!   daemon's status.
//! - `a_streaming_container_survives_sigkill_of_the_snapshotter_and_the_daemon`:
//!   a container reads a 64 MiB file of pseudo-random bytes slowly through
//!   `sha256sum`; while it reads, the snapshotter is SIGKILLed and
//!   restarted (the lazy mount is kept, not made again) and then the daemon
//!   is SIGKILLed and a successor takes the FUSE connection over from the fd
//!   store. The container ends with exit 0 and the right checksum, and the
//!   successor served reads; removal afterwards unmounts through the
//!   restarted pair.
//! - `setuid_programs_run_as_under_the_overlayfs_snapshotter`: a static C
//!   program owned by root with mode 4755, run as uid 1000 (the image
//!   config's `User`): under the lazypull snapshotter it has euid 0 with
//!   `--allow-new-privs` (Docker's and Kubernetes' default) and euid 1000
//!   without (containerd's default spec sets NoNewPrivileges), and `stat`
//!   shows mode 4755 owner 0:0, exactly as under containerd's overlayfs
//!   snapshotter running the ordinary image (the reference, run in the
//!   same test).
//!
//! Needs root (mounts, runc) and /dev/fuse. A missing containerd, runc,
//! docker-registry, busybox-static or gcc (with the static libc,
//! libc6-dev) fails the test naming it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lazypull_testkit::containerd::{self, Containerd};
use lazypull_testkit::oci_image::{busybox_image, Image, LayerBuilder, BUSYBOX_IMAGE_OUTPUT};
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

#[path = "common/lazy_stack.rs"]
mod lazy_stack;
use lazy_stack::*;

/// Lines of containerd's debug log containing `needle`.
fn log_lines(ctr: &Containerd, needle: &str) -> usize {
    std::fs::read_to_string(ctr.log_path())
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// The lazy mounts of the snapshotter (under `<root>/lazy`).
fn lazy_mounts(stack: &Stack) -> Vec<std::path::PathBuf> {
    containerd::mounts_under(&stack.snap_root.join("lazy"))
}

/// The mount points the daemon's status lists for the image `fsid`.
fn daemon_mountpoints(stack: &Stack, fsid: &str) -> Vec<String> {
    let status = stack.daemon_status();
    status["images"]
        .as_array()
        .map(|images| {
            images
                .iter()
                .filter(|i| i["fsid"] == fsid)
                .flat_map(|i| {
                    i["mountpoints"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|m| m.as_str().unwrap_or_default().to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The entries of the snapshotter's `<root>/snapshots` directory.
fn snapshot_dirs(stack: &Stack) -> Vec<String> {
    let dir = stack.snap_root.join("snapshots");
    match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", dir.display()),
    }
}

/// Runs `ctr run --rm --snapshotter lazypull REF ID`: its standard output.
fn run_lazy(ctr: &Containerd, reference: &str, id: &str) -> String {
    let out = ctr
        .ctr(&[
            "--timeout",
            "60s",
            "run",
            "--rm",
            "--snapshotter",
            "lazypull",
            reference,
            id,
        ])
        .unwrap_or_else(|e| panic!("ctr run {id}: {e}"));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn gc_keeps_what_the_image_needs_and_removal_leaves_nothing() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let (_, lazy) = lazy_busybox(&registry);
    let meta_hex = lazy.layer_digests("meta")[0]
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    let data: BTreeSet<String> = lazy.layer_digests("data").into_iter().collect();
    let stack = Stack::start(dir);
    let ctr = &stack.ctr;
    ok(pull(ctr, &[&lazy.reference]), "lazypull pull");
    let chain = chain_ids(&lazy.all_layers());
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));

    // Collections of the lazypull snapshotter so far.
    let lazypull_collections = |ctr: &Containerd| {
        std::fs::read_to_string(ctr.log_path())
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains("msg=\"snapshot garbage collected\"")
                    && l.contains("snapshotter=lazypull")
            })
            .count()
    };
    let collected_before = lazypull_collections(ctr);

    // c1 reads the image's files.
    let before_c1 = log_len(&registry);
    assert_eq!(
        run_lazy(ctr, &lazy.reference, "c1"),
        format!("{BUSYBOX_IMAGE_OUTPUT}\n")
    );
    let c1_read: BTreeSet<String> = blobs_read(&accesses(&registry, before_c1))
        .intersection(&data)
        .cloned()
        .collect();
    assert!(!c1_read.is_empty(), "c1 read no data blob");

    // Garbage collection with the image present. c1's removal made the
    // lazypull snapshotter dirty: containerd removes a container's snapshot
    // from the snapshotter only when it collects (by itself soon after, or
    // now: removing a second name of the image runs the collector
    // synchronously).
    let passes = log_lines(ctr, "msg=\"garbage collected\"");
    let alias = format!("{}-alias", lazy.reference);
    ctr.ctr(&["images", "tag", &lazy.reference, &alias])
        .unwrap();
    ctr.ctr(&["images", "rm", "--sync", &alias]).unwrap();
    assert!(
        log_lines(ctr, "msg=\"garbage collected\"") > passes,
        "no garbage collection pass in containerd's log after `ctr images rm --sync`:\n{}",
        ctr.log_tail(30)
    );
    assert!(
        lazypull_collections(ctr) > collected_before,
        "containerd's collector did not collect the lazypull snapshotter since c1 ran:\n{}",
        ctr.log_tail(30)
    );
    // Nothing the image needs went; c1's snapshot did, and with it the
    // image's lazy mount (no container uses it).
    assert_eq!(
        image_digest(ctr, &lazy.reference).as_deref(),
        Some(lazy.manifest_digest.as_str())
    );
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));
    assert!(content_labels(ctr, &lazy.manifest_digest).is_some());
    assert!(content_labels(ctr, &lazy.config_digest()).is_some());
    assert_eq!(lazy_mounts(&stack), Vec::<std::path::PathBuf>::new());
    assert_eq!(daemon_mountpoints(&stack, &meta_hex), Vec::<String>::new());

    // c2: the image mounted again, the daemon's cache serves what c1 read.
    let before_c2 = log_len(&registry);
    assert_eq!(
        run_lazy(ctr, &lazy.reference, "c2"),
        format!("{BUSYBOX_IMAGE_OUTPUT}\n")
    );
    let c2_accesses = accesses(&registry, before_c2);
    eprintln!("c2's start asked the registry: {c2_accesses:?}");
    let c2_data: BTreeSet<String> = blobs_read(&c2_accesses)
        .intersection(&data)
        .cloned()
        .collect();
    assert_eq!(
        c2_data,
        BTreeSet::new(),
        "c2 fetched data blobs again after the garbage collection: {c2_accesses:?}"
    );

    // A running container and the image, removed: nothing stays.
    ctr.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "lazypull",
        &lazy.reference,
        "c3",
        "sleep",
        "600",
    ])
    .unwrap();
    assert_eq!(lazy_mounts(&stack).len(), 1);
    assert_eq!(daemon_mountpoints(&stack, &meta_hex).len(), 1);
    ctr.ctr(&["tasks", "kill", "-s", "SIGKILL", "c3"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctr.ctr(&["containers", "rm", "c3"]).is_err() {
        assert!(Instant::now() < deadline, "c3 could not be removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    ctr.ctr(&["images", "rm", "--sync", &lazy.reference])
        .unwrap();
    assert_eq!(snapshot_rows(ctr, "lazypull"), Vec::new());
    assert_eq!(lazy_mounts(&stack), Vec::<std::path::PathBuf>::new());
    assert_eq!(
        snapshot_dirs(&stack),
        Vec::<String>::new(),
        "snapshot directories left"
    );
    let left: Vec<String> = std::fs::read_dir(stack.snap_root.join("lazy"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, Vec::<String>::new(), "lazy mount directories left");
    assert_eq!(daemon_mountpoints(&stack, &meta_hex), Vec::<String>::new());
}

/// Size of the big file the streaming container reads.
const BIG: usize = 64 << 20;

/// The fields named `name` anywhere in `v`, as numbers.
fn numbers_named(v: &serde_json::Value, name: &str, out: &mut Vec<(String, u64)>, at: &str) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                let here = format!("{at}.{k}");
                if k == name {
                    if let Some(n) = x.as_u64() {
                        out.push((here.clone(), n));
                    }
                }
                numbers_named(x, name, out, &here);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                numbers_named(x, name, out, &format!("{at}[{i}]"));
            }
        }
        _ => {}
    }
}

#[test]
fn a_streaming_container_survives_sigkill_of_the_snapshotter_and_the_daemon() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let big = lazypull_testkit::maketree::random_bytes(BIG, 12);
    let want = hex::encode(Sha256::digest(&big));
    let mut layers = busybox_image().unwrap().layers;
    let mut extra = LayerBuilder::new().dir("bin", 0o755).unwrap();
    for applet in ["dd", "sha256sum"] {
        extra = extra.symlink(&format!("bin/{applet}"), "busybox").unwrap();
    }
    layers.push(
        extra
            .dir("data", 0o755)
            .unwrap()
            .file("data/big", &big, 0o644)
            .unwrap()
            .finish()
            .unwrap(),
    );
    drop(big);
    // 128 reads of 512 KiB with a pause after each: at least 6.4 s.
    let script = "set -o pipefail; \
        i=0; while [ $i -lt 128 ]; do \
          dd if=/data/big bs=512k skip=$i count=1 2>/tmp/dd.err || { echo \"dd failed at $i: $(cat /tmp/dd.err)\" >&2; exit 1; }; \
          i=$((i+1)); sleep 0.05; \
        done | sha256sum";
    let image = Image::new(
        layers,
        serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": [script]}),
    )
    .unwrap();
    image.push(registry.addr(), "test/big", "v1").unwrap();
    let source = format!("{}/test/big:v1", registry.addr());
    let reference = format!("{}/test/big-lazy:v1", registry.addr());
    ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    );
    let mut stack = Stack::start(dir);
    ok(pull(&stack.ctr, &[&reference]), "lazypull pull");

    // The streaming container, in the background.
    let out_path = dir.join("big1.stdout");
    let err_path = dir.join("big1.stderr");
    let started = Instant::now();
    let mut run = stack
        .ctr
        .ctr_unstarted(&[
            "run",
            "--rm",
            "--snapshotter",
            "lazypull",
            &reference,
            "big1",
        ])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("running ctr");
    let still_running = |run: &mut std::process::Child, when: &str| {
        if let Some(status) = run.try_wait().unwrap() {
            panic!(
                "the container ended ({status}) {when}, after {:?}: it did not stream long enough\nstdout: {}\nstderr: {}",
                started.elapsed(),
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
    };
    // Streaming: the image is mounted and the daemon's FUSE serves reads.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lazy_mounts(&stack).is_empty() {
        still_running(&mut run, "before its image was mounted");
        assert!(
            Instant::now() < deadline,
            "the image was not mounted within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mounted = lazy_mounts(&stack);
    std::thread::sleep(Duration::from_millis(1000));

    // 1. The snapshotter, SIGKILLed and restarted: the mount is kept.
    still_running(&mut run, "before the snapshotter was killed");
    let n = stack.kill_and_restart_snapshotter();
    eprintln!(
        "snapshotter killed and restarted at {:?}",
        started.elapsed()
    );
    assert_eq!(
        lazy_mounts(&stack),
        mounted,
        "the lazy mount changed across the snapshotter's restart"
    );
    // containerd reaches it again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stack
        .ctr
        .ctr(&["snapshots", "--snapshotter", "lazypull", "ls"])
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "containerd does not reach the restarted snapshotter"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_log = std::fs::read_to_string(stack.snapshotter_log(1)).unwrap();
    assert!(
        first_log.contains("mounting lazy image"),
        "the first snapshotter's log does not say it mounted the image"
    );
    let snap_log = std::fs::read_to_string(stack.snapshotter_log(n)).unwrap();
    assert!(
        !snap_log.contains("mounting lazy image"),
        "the restarted snapshotter mounted the image again:\n{snap_log}"
    );

    // 2. The daemon, SIGKILLed while the container reads; a successor takes
    // the FUSE connection over from the fd store.
    std::thread::sleep(Duration::from_millis(500));
    still_running(&mut run, "before the daemon was killed");
    let n = stack.kill_and_restart_daemon();
    eprintln!("daemon killed and succeeded at {:?}", started.elapsed());
    let daemon_log = std::fs::read_to_string(stack.daemon_log(n)).unwrap();
    assert!(
        daemon_log.contains("took over the FUSE connection"),
        "the successor did not take the FUSE connection over:\n{daemon_log}"
    );
    still_running(&mut run, "before the successor served it");
    let successor_started = Instant::now();

    // The container finishes with the right checksum.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the container did not finish within 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    eprintln!(
        "the container finished after {:?} ({:?} after the successor started): {status}",
        started.elapsed(),
        successor_started.elapsed()
    );
    assert!(
        status.success() && stdout == format!("{want}  -\n"),
        "the container ended {status}; stdout {stdout:?} (want {want}); stderr:\n{stderr}\nthe successor's log ends:\n{}",
        tail(&stack.daemon_log(n), 30)
    );
    assert!(!stderr.contains("I/O error"), "{stderr}");
    // The successor served the rest of the stream.
    let status = stack.daemon_status();
    let mut reads = Vec::new();
    numbers_named(&status, "reads", &mut reads, "");
    let mut failures = Vec::new();
    numbers_named(&status, "read_failures", &mut failures, "");
    eprintln!("the successor's counters: reads {reads:?}, failures {failures:?}");
    assert!(
        reads.iter().any(|(_, n)| *n > 0),
        "the successor served no read: {status}"
    );
    assert!(
        failures.iter().all(|(_, n)| *n == 0),
        "failed reads: {status}"
    );

    // Removal through the restarted snapshotter and daemon.
    stack
        .ctr
        .ctr(&["images", "rm", "--sync", &reference])
        .unwrap();
    assert_eq!(snapshot_rows(&stack.ctr, "lazypull"), Vec::new());
    assert_eq!(lazy_mounts(&stack), Vec::<std::path::PathBuf>::new());
    assert_eq!(snapshot_dirs(&stack), Vec::<String>::new());
    let status = stack.daemon_status();
    let images = status["images"].as_array().cloned().unwrap_or_default();
    assert!(
        images
            .iter()
            .all(|i| i["mountpoints"].as_array().is_none_or(|m| m.is_empty())),
        "the successor still lists mounts after the removal: {status}"
    );
}

/// A static C program printing its real and effective uid.
fn ids_program(dir: &Path) -> Vec<u8> {
    let src = dir.join("ids.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include <unistd.h>\n\
         int main(void) { printf(\"ruid=%d euid=%d\\n\", (int)getuid(), (int)geteuid()); return 0; }\n",
    )
    .unwrap();
    let bin = dir.join("ids");
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("running gcc (apt-get install gcc libc6-dev): {e}"));
    assert!(
        out.status.success(),
        "gcc -static failed (apt-get install gcc libc6-dev): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(bin).unwrap()
}

#[test]
fn setuid_programs_run_as_under_the_overlayfs_snapshotter() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let ids = ids_program(dir);
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let mut layers = busybox_image().unwrap().layers;
    layers.push(
        LayerBuilder::new()
            .dir("bin", 0o755)
            .unwrap()
            .file("bin/ids", &ids, 0o4755)
            .unwrap()
            .finish()
            .unwrap(),
    );
    let image = Image::new(
        layers,
        serde_json::json!({"Env": ["PATH=/bin"], "User": "1000:1000", "Entrypoint": ["/bin/ids"]}),
    )
    .unwrap();
    image.push(registry.addr(), "test/setuid", "v1").unwrap();
    let source = format!("{}/test/setuid:v1", registry.addr());
    let reference = format!("{}/test/setuid-lazy:v1", registry.addr());
    ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    );
    let stack = Stack::start(dir);
    let ctr = &stack.ctr;

    // The reference: the ordinary image under containerd's overlayfs.
    ctr.ctr(&["images", "pull", "--plain-http", &source])
        .unwrap();
    // `--allow-new-privs`: NoNewPrivileges off, as Docker and Kubernetes
    // (allowPrivilegeEscalation) have it by default; containerd's default
    // spec turns it on, and then no snapshotter's setuid bit counts.
    let run = |snapshotter: &str, image: &str, id: &str, flags: &[&str], cmd: &[&str]| {
        let mut args = vec![
            "--timeout",
            "60s",
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
        ];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[image, id]);
        args.extend_from_slice(cmd);
        let out = ctr
            .ctr(&args)
            .unwrap_or_else(|e| panic!("ctr run {id}: {e}"));
        String::from_utf8(out.stdout).unwrap()
    };
    let stat = ["/bin/stat", "-c", "%a %u %g", "/bin/ids"];
    let allow = ["--allow-new-privs"];
    let outputs = |snapshotter: &str, image: &str| {
        [
            run(snapshotter, image, "s1", &allow, &[]),
            run(snapshotter, image, "s2", &[], &[]),
            run(snapshotter, image, "s3", &[], &stat),
        ]
    };
    let overlay = outputs("overlayfs", &source);
    assert_eq!(
        overlay,
        [
            "ruid=1000 euid=0\n".to_owned(),
            "ruid=1000 euid=1000\n".to_owned(),
            "4755 0 0\n".to_owned()
        ],
        "the reference: the ordinary image under containerd's overlayfs snapshotter"
    );

    ok(pull(ctr, &[&reference]), "lazypull pull");
    let lazy = outputs("lazypull", &reference);
    assert_eq!(
        lazy, overlay,
        "the lazy image's setuid program differs from the overlayfs reference (setuid allowed, setuid with NoNewPrivileges, stat)"
    );
}
