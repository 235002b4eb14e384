//! A lazy image runs as a container in the Linux 6.12 test guest, its bytes served through
//! cachefiles on-demand (issue 12's second transport; the host's tests cover FUSE).
//!
//! On the host: Debian's `docker-registry` on 127.0.0.1, testkit's busybox image plus a third
//! layer holding 4 MiB of incompressible data (and busybox's `sha256sum`), whose program also
//! prints that file's checksum, pushed and turned into a lazy image by `lazypull convert`. In
//! the guest (`tests/guest/lazy_containers.sh`, the registry reached at 10.0.2.2):
//! `lazypull daemon --transport cachefiles` with its cache on an ext4 disk, `lazypull
//! snapshotter` (root on that disk) as containerd's proxy snapshotter `lazypull`, the host's
//! containerd 1.6 and runc over the 9p root with containerd's root on the disk, `lazypull pull`,
//! `ctr run --rm --snapshotter lazypull`, a view of the image, `ctr images rm --sync`.
//!
//! The host then checks that
//! - the container printed the image's output and the right checksum of the 4 MiB file
//!   (every layer stacked; the data read through the lazy mount);
//! - the registry saw only the manifest and the config until the container started (the
//!   access log is split by marker requests the guest makes), and Range reads (206) of data
//!   blobs while it ran;
//! - the daemon served the kernel through cachefiles: its status says transport
//!   `cachefiles`, the kernel asked it for reads and it wrote the file's bytes into the cache,
//!   and the image's mount (seen while a view held it) is EROFS over fscache (`fsid=<meta>`,
//!   under the snapshotter's `lazy/<meta hex>`);
//! - the container's lazy mount goes once containerd's garbage collector has removed its
//!   snapshot, and the file read again through the view's new mount comes from the kernel's
//!   cache (cachefiles' files on the ext4 disk): no READ for the daemon, no data fetched;
//! - after `ctr images rm --sync` no snapshot and no lazy mount is left.
//!
//! Needs root, qemu, the guest kernel, containerd, runc, docker-registry and busybox-static;
//! fails (never skips) without them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lazypull_guest::{Disk, GuestConfig};
use lazypull_testkit::containerd::chain_ids;
use lazypull_testkit::maketree::random_bytes;
use lazypull_testkit::oci_image::{busybox_image, Image, LayerBuilder, BUSYBOX_IMAGE_OUTPUT};
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

/// The big file of the third layer, and its size.
const BIG_FILE: &str = "data/big.bin";
const BIG_BYTES: usize = 4 << 20;

const ROLE: &str = "containerd.io/snapshot/lazypull.role";
const BLOB: &str = "containerd.io/snapshot/lazypull.blob";

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// testkit's busybox image with a third layer: `/data/big.bin` (incompressible) and a
/// `sha256sum` applet; its command prints [`BUSYBOX_IMAGE_OUTPUT`], then the file's
/// `sha256sum` line. Returns the image and that file's SHA-256 (hex).
fn image_with_big_file() -> (Image, String) {
    let busybox = busybox_image().expect("testkit's busybox image");
    let config: serde_json::Value = serde_json::from_slice(&busybox.config).unwrap();
    let mut runtime = config["config"].clone();
    let cmd = runtime["Cmd"][0]
        .as_str()
        .expect("the busybox image's Cmd is one shell command")
        .to_owned();
    runtime["Cmd"] = serde_json::json!([format!("{cmd}; sha256sum /{BIG_FILE}")]);
    let big = random_bytes(BIG_BYTES, 1212);
    let sum = hex::encode(Sha256::digest(&big));
    let three = LayerBuilder::new()
        .dir("bin", 0o755)
        .and_then(|l| l.symlink("bin/sha256sum", "busybox"))
        .and_then(|l| l.dir("data", 0o755))
        .and_then(|l| l.file(BIG_FILE, &big, 0o644))
        .and_then(|l| l.finish())
        .unwrap();
    let mut layers = busybox.layers;
    layers.push(three);
    (Image::new(layers, runtime).unwrap(), sum)
}

/// One request of the registry's access log.
#[derive(Debug, Clone)]
struct Access {
    method: String,
    path: String,
    status: u16,
}

/// The registry's access log (its standard output, beside its log) after byte `from`.
fn accesses(registry: &RegistryServer, from: usize) -> Vec<Access> {
    let text = fs::read_to_string(access_log(registry)).unwrap();
    text[from..]
        .lines()
        .filter_map(|l| {
            // 10.0.2.15 - - [date] "GET /v2/... HTTP/1.1" 206 123 "" "agent"
            let (_, rest) = l.split_once("] \"")?;
            let (request, rest) = rest.split_once('"')?;
            let mut parts = request.split(' ');
            let method = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            let status = rest.split_whitespace().next()?.parse().ok()?;
            Some(Access {
                method,
                path,
                status,
            })
        })
        .collect()
}

fn access_log(registry: &RegistryServer) -> PathBuf {
    registry
        .log_path()
        .parent()
        .unwrap()
        .join("registry.stdout")
}

/// `accesses` split at the guest's marker requests, in order: the parts before, between and
/// after them. Fails if a marker is missing.
fn split_at_markers(accesses: &[Access], markers: &[&str]) -> Vec<Vec<Access>> {
    let mut parts = vec![Vec::new()];
    let mut next = markers.iter();
    let mut want = next.next();
    for a in accesses {
        if let Some(name) = want {
            if a.path == format!("/v2/lazypull-marker/manifests/{name}") {
                parts.push(Vec::new());
                want = next.next();
                continue;
            }
        }
        parts.last_mut().unwrap().push(a.clone());
    }
    assert!(
        want.is_none(),
        "marker {want:?} missing in the registry's access log: {accesses:?}"
    );
    parts
}

/// The blob digests the accesses name (`/v2/<repo>/blobs/<digest>`).
fn blobs_read(accesses: &[Access]) -> BTreeSet<String> {
    accesses
        .iter()
        .filter_map(|a| a.path.split_once("/blobs/").map(|(_, d)| d.to_owned()))
        .collect()
}

#[test]
fn a_lazy_image_runs_in_the_guest_through_cachefiles() {
    lazy_container(
        lazypull_guest::KernelSeries::V6_12,
        "cachefiles",
        "cachefiles",
    );
}

/// The same on Linux 6.1, the kernel most nodes run: `--transport auto`
/// must serve through loop devices over the FUSE blob files, and containerd
/// stacks its overlay on the EROFS mounted from them.
#[test]
fn a_lazy_image_runs_in_the_6_1_guest_through_loop_devices() {
    lazy_container(lazypull_guest::KernelSeries::V6_1, "auto", "loop");
}

/// Runs `tests/guest/lazy_containers.sh` on `series` with the daemon's
/// `--transport transport`, expecting it to serve through `kind`.
fn lazy_container(series: lazypull_guest::KernelSeries, transport: &str, kind: &str) {
    let started = Instant::now();
    lazypull_guest::require_root().expect("guest tests need root");
    for (tool, package) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
    ] {
        lazypull_guest::find_tool(tool, package).expect("a tool the guest scenario runs");
    }
    let kernel = lazypull_guest::kernel_of(series).expect("guest kernel");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("guest-lazy-containers-{}", series.name()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();

    // The lazy image in the registry.
    let registry =
        RegistryServer::start(&root.join("registry"), None).expect("starting docker-registry");
    let (image, big_sum) = image_with_big_file();
    image
        .push(registry.addr(), "test/busybox-big", "v1")
        .expect("pushing the image");
    let source = format!("{}/test/busybox-big:v1", registry.addr());
    let target = format!("{}/test/busybox-big-lazy:v1", registry.addr());
    let converted: serde_json::Value = serde_json::from_str(&ok(
        Command::new(env!("CARGO_BIN_EXE_lazypull"))
            .args(["convert", &source, &target, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    ))
    .unwrap();
    let manifest_digest = converted["manifest_digest"].as_str().unwrap().to_owned();
    let hex = manifest_digest.strip_prefix("sha256:").unwrap();
    let stored = root.join(format!(
        "registry/data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(&stored)
            .unwrap_or_else(|e| panic!("reading the lazy manifest {}: {e}", stored.display())),
    )
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let digests = |role: &str| -> Vec<String> {
        layers
            .iter()
            .filter(|l| l["annotations"][ROLE] == role)
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    };
    let (meta, tables, data) = (digests("meta"), digests("table"), digests("data"));
    assert_eq!((meta.len(), tables.len(), data.len()), (1, 3, 3));
    let meta_hex = meta[0].strip_prefix("sha256:").unwrap().to_owned();
    let all: Vec<String> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    let top_chain = chain_ids(&all).pop().unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    // The blob (as the daemon's status names it) of the big file's layer: the last data layer.
    let big_blob = layers
        .iter()
        .rfind(|l| l["annotations"][ROLE] == "data")
        .and_then(|l| l["annotations"][BLOB].as_str())
        .expect("the data layers name their blob")
        .to_owned();

    let port = registry.addr().port();
    let guest_ref = format!("10.0.2.2:{port}/test/busybox-big-lazy:v1");
    let log_from = fs::read_to_string(access_log(&registry)).unwrap().len();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/lazy_containers.sh");
    let cfg = GuestConfig::new(&kernel)
        .name(format!(
            "lazy-containers-{}",
            series.name().replace('.', "-")
        ))
        .network()
        .timeout(Duration::from_secs(900))
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_REG", format!("10.0.2.2:{port}"))
        .env("LP_REG_PORT", port.to_string())
        .env("LP_REF", guest_ref.as_str())
        .env("LP_TOP_CHAIN", top_chain.as_str())
        .env("LP_META", meta_hex.as_str())
        .env("LP_BIG_FILE", BIG_FILE)
        .env("LP_TRANSPORT", transport);
    let prepared = started.elapsed();
    let run = lazypull_guest::run(&script, &cfg).expect("booting the guest");
    println!("{}", run.log);
    for log in ["snapshotter.log", "daemon.log"] {
        if let Ok(text) = run.read_out(log) {
            println!(
                "--- {log} (tail) ---\n{}",
                lazypull_guest::tail_lines(&text, 25)
            );
        }
    }
    println!(
        "host preparation {prepared:?}; guest run {:?} (boot {:?}); steps (s since the scenario started):\n{}",
        run.elapsed,
        run.boot_time,
        run.read_out("times").unwrap_or_default()
    );
    if let Err(e) = run.ensure_success() {
        panic!("lazy container scenario failed in the guest: {e:#}");
    }

    // What the container printed: every layer, and the big file read whole and right.
    assert_eq!(
        run.read_out("run.out").unwrap(),
        format!("{BUSYBOX_IMAGE_OUTPUT}\n{big_sum}  /{BIG_FILE}\n"),
        "the container's output"
    );
    let pulled: serde_json::Value =
        serde_json::from_str(&run.read_out("pull.json").unwrap()).unwrap();
    assert_eq!(
        pulled["manifest_digest"],
        manifest_digest.as_str(),
        "{pulled}"
    );
    assert_eq!(pulled["image"], "created", "{pulled}");

    // The registry: before the run (boot, pull) only the manifest and the config; while the
    // container ran, Range reads of data blobs, and only blobs of the image.
    let log = accesses(&registry, log_from);
    let parts = split_at_markers(
        &log,
        &["before-pull", "before-run", "after-run", "after-view"],
    );
    let (pull, run_part, view_part) = (&parts[1], &parts[2], &parts[3]);
    assert!(
        parts[0].iter().all(|a| !a.path.contains("/blobs/")),
        "blobs read before the pull: {:?}",
        parts[0]
    );
    assert!(
        pull.iter()
            .any(|a| a.method == "GET" && a.path.contains("/manifests/") && a.status == 200),
        "the pull fetched no manifest: {pull:?}"
    );
    assert_eq!(
        blobs_read(pull),
        BTreeSet::from([config_digest.clone()]),
        "the pull read blobs other than the config: {pull:?}"
    );
    let ranged: Vec<&Access> = run_part
        .iter()
        .filter(|a| a.status == 206 && data.iter().any(|d| a.path.ends_with(d.as_str())))
        .collect();
    assert!(
        !ranged.is_empty(),
        "no Range read (206) of a data blob while the container ran: {run_part:?}"
    );
    let allowed: BTreeSet<String> = meta.iter().chain(&tables).chain(&data).cloned().collect();
    let read = blobs_read(run_part);
    assert!(
        read.is_subset(&allowed),
        "the run read blobs that are not the image's layers: {run_part:?}"
    );
    for a in run_part {
        assert!(
            a.status == 200 || a.status == 206,
            "a failed registry request while the container ran: {a:?}"
        );
    }
    println!(
        "registry: the pull made {} requests, the run {} ({} Range reads of data blobs)",
        pull.len(),
        run_part.len(),
        ranged.len()
    );

    assert_eq!(
        run.read_out("lazy-mounts-after-run").unwrap().trim(),
        "",
        "the container's lazy mount outlived its snapshot (removed by containerd's GC)"
    );

    // The daemon served the kernel through the expected transport.
    let status: serde_json::Value =
        serde_json::from_str(&run.read_out("status.json").unwrap()).unwrap();
    assert_eq!(status["transport"]["kind"], kind, "{status}");
    let text = run.read_out("status.txt").unwrap();
    assert!(
        text.contains(&format!("transport: {kind}")),
        "`lazypull status` must name the transport: {text}"
    );
    let counters = &status["transport"]["counters"];
    assert!(
        counters["reads"].as_u64().unwrap() > 0,
        "the kernel asked for no reads: {status}"
    );
    assert_eq!(counters["read_failures"], 0, "{status}");
    assert!(
        counters["bytes_written"].as_u64().unwrap() >= BIG_BYTES as u64,
        "the big file's bytes were not written into the cache: {status}"
    );
    let blob = status["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["blob"] == big_blob.as_str())
        .unwrap_or_else(|| panic!("no blob {big_blob} in the status: {status}"));
    assert_eq!(
        blob["source"]["bytes"].as_u64(),
        Some(BIG_BYTES as u64),
        "the big file's blob was fetched once, whole: {blob}"
    );
    // The view's mount opened the object again: it starts with what the kernel's cache file
    // holds (the whole blob, filled for the container), not with nothing.
    println!("the big file's blob in the status while the view holds the image: {blob}");
    assert_eq!(
        blob["cached_bytes"], blob["size"],
        "the object opened again does not count what the kernel's cache holds: {blob}"
    );
    assert_eq!(status["fetch"]["verify_failures"], 0, "{status}");
    let images = status["images"].as_array().unwrap();
    assert!(
        images.iter().any(|i| i["fsid"] == meta_hex.as_str()
            && i["reference"].as_str().unwrap_or("").contains(hex)
            && i["mountpoints"].as_array().is_some_and(|m| m.len() == 1)),
        "the daemon does not have the image (pinned by manifest digest) mounted once: {status}"
    );
    // The view's mount: EROFS over fscache, named by the meta blob, where the snapshotter keeps it.
    let view = run.read_out("view-mount").unwrap();
    let lines: Vec<&str> = view.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one lazy mount while the view held it: {view}"
    );
    let (fields, after) = lines[0]
        .split_once(" - ")
        .unwrap_or_else(|| panic!("a mountinfo line: {view}"));
    assert!(
        fields
            .split_whitespace()
            .nth(4)
            .is_some_and(|m| m.ends_with(&format!("/lazy/{meta_hex}"))),
        "{view}"
    );
    let mut after = after.split_whitespace();
    assert_eq!(after.next(), Some("erofs"), "{view}");
    let source = after.next().unwrap_or("");
    let options = after.next().unwrap_or("");
    assert!(
        options.split(',').any(|o| o == "ro"),
        "the lazy mount is not read-only: {view}"
    );
    if kind == "cachefiles" {
        assert!(
            options.split(',').any(|o| o == format!("fsid={meta_hex}")),
            "the lazy mount is not an EROFS over fscache for the image: {view}"
        );
    } else {
        assert!(
            source.starts_with("/dev/loop"),
            "the lazy mount is not an EROFS on a loop device: {view}"
        );
    }

    // The big file read again through the view's mount (a new mount, new cachefiles objects):
    // right, from the kernel's cache on the ext4 disk, with no READ for the daemon and no data
    // fetched from the registry.
    assert_eq!(
        run.read_out("reread.sum").unwrap(),
        format!("{big_sum}  /mnt/lp-lazy/snapshotter/lazy/{meta_hex}/{BIG_FILE}\n"),
        "the big file read again through the view's mount"
    );
    let reread: serde_json::Value =
        serde_json::from_str(&run.read_out("status-reread.json").unwrap()).unwrap();
    if kind == "cachefiles" {
        assert_eq!(
            reread["transport"]["counters"]["reads"], counters["reads"],
            "reading a file the kernel has cached asked the daemon: before {status}\nafter {reread}"
        );
    }
    let data_reads: Vec<&Access> = view_part
        .iter()
        .filter(|a| data.iter().any(|d| a.path.ends_with(d.as_str())))
        .collect();
    assert!(
        data_reads.is_empty(),
        "data fetched again after the container ran: {data_reads:?}"
    );

    // Nothing left after the image is removed.
    assert_eq!(
        run.read_out("snapshots-after-rm").unwrap().trim(),
        "",
        "snapshots left after ctr images rm --sync"
    );
    assert_eq!(
        run.read_out("lazy-mounts-after-rm").unwrap().trim(),
        "",
        "lazy mounts left after ctr images rm --sync"
    );
    let snap_log = run.read_out("snapshotter.log").unwrap();
    assert!(
        snap_log.contains("lazy image mounted") && snap_log.contains("lazy image unmounted"),
        "the snapshotter did not mount and unmount the lazy image:\n{snap_log}"
    );
    println!("test took {:?} in all", started.elapsed());
}
