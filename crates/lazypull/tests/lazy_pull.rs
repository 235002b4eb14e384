//! `lazypull pull` end to end on this host, every part real: Debian's
//! `docker-registry` on 127.0.0.1, the ordinary busybox image converted with
//! `lazypull convert`, `lazypull daemon` (FUSE transport), `lazypull
//! snapshotter` as containerd's proxy snapshotter `lazypull`, containerd 1.6
//! and runc.
//!
//! - `lazy_pull_commits_the_chain_and_the_container_reads_lazily`: `lazypull
//!   pull` leaves containerd an image record naming the manifest, the
//!   manifest and config in its content store with the garbage collection
//!   labels containerd's own pull sets, and the committed snapshot chain,
//!   having fetched only the manifest and the config; `ctr run --snapshotter
//!   lazypull` then runs the image (entrypoint, command, environment, working
//!   directory and both layers honoured), and only then does the registry
//!   see data blob reads. Pulling again changes nothing but says so;
//!   `ctr images rm --sync` lets containerd's garbage collector remove every
//!   snapshot and the image's lazy mount.
//! - `python_runs_from_a_lazily_pulled_image`: Debian's python3.11 with its
//!   shared libraries and standard library, in three layers, converted,
//!   pulled lazily and run: the program's output shows its entrypoint,
//!   command, environment and working directory honoured; the registry saw
//!   manifest and config only until the container started.
//! - `eager_pull_prefetches_the_whole_image`: a file no container reads is
//!   fetched only when the image was pulled with `--eager`.
//! - `pull_refuses_what_it_cannot_do_lazily`: an ordinary image, a
//!   snapshotter that is not lazypull's (containerd's overlayfs), and an
//!   unreachable containerd are refused with errors naming the cause, and
//!   leave no image record or snapshot behind.
//!
//! Needs root (mounts, runc) and /dev/fuse. A missing containerd, runc,
//! docker-registry, busybox-static or python3.11 fails the test naming the
//! package.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;
use std::time::{Duration, Instant};

use lazypull_testkit::containerd::{self, Containerd, ContainerdOptions};
use lazypull_testkit::oci_image::{busybox_image, BUSYBOX_IMAGE_OUTPUT};
use lazypull_testkit::python_image::{python_image, PYTHON_OUTPUT};
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

#[path = "common/lazy_stack.rs"]
mod lazy_stack;
use lazy_stack::*;

#[test]
fn lazy_pull_commits_the_chain_and_the_container_reads_lazily() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let (_, lazy) = lazy_busybox(&registry);
    let meta = lazy.layer_digests("meta");
    let tables = lazy.layer_digests("table");
    let data = lazy.layer_digests("data");
    assert_eq!((meta.len(), tables.len(), data.len()), (1, 2, 2));

    let stack = Stack::start(dir);
    let ctr = &stack.ctr;

    // The pull.
    let before_pull = log_len(&registry);
    let out = pull(ctr, &["--json", &lazy.reference]);
    let stdout = ok(out.clone(), "lazypull pull");
    eprintln!(
        "lazypull pull said:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["manifest_digest"], lazy.manifest_digest.as_str());
    assert_eq!(report["image"], "created");
    assert_eq!(report["manifest"], "committed");

    // The image record names the manifest.
    assert_eq!(
        image_digest(ctr, &lazy.reference).as_deref(),
        Some(lazy.manifest_digest.as_str()),
        "{}",
        ctr.ctr_stdout(&["images", "ls"]).unwrap()
    );
    // The chain, committed, named by chain ids computed here from the
    // manifest's layers (diff id == digest in a lazy image).
    let chain = chain_ids(&lazy.all_layers());
    assert_eq!(chain[0], meta[0], "the meta layer's chain id is its digest");
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));
    // Manifest and config in the content store, with containerd's GC labels.
    let manifest_labels =
        content_labels(ctr, &lazy.manifest_digest).expect("the manifest is in the content store");
    let mut wanted = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        lazy.config_digest(),
    )]);
    for (i, l) in lazy.all_layers().iter().enumerate() {
        wanted.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.clone());
    }
    assert_eq!(manifest_labels, wanted);
    let config_labels =
        content_labels(ctr, &lazy.config_digest()).expect("the config is in the content store");
    assert_eq!(
        config_labels,
        HashMap::from([(
            "containerd.io/gc.ref.snapshot.lazypull".to_owned(),
            chain.last().unwrap().clone()
        )])
    );
    // No layer is in the content store: nothing was fetched.
    for l in lazy.all_layers() {
        assert_eq!(content_labels(ctr, &l), None, "layer {l} was fetched");
    }
    // The lease is gone.
    let leases = ctr.ctr_stdout(&["leases", "ls", "-q"]).unwrap();
    assert_eq!(leases.trim(), "", "leases left: {leases}");
    // The registry saw manifest and config requests only.
    let pulled = accesses(&registry, before_pull);
    assert!(
        pulled
            .iter()
            .any(|a| a.method == "GET" && a.path.contains("/manifests/") && a.status == 200),
        "no manifest request: {pulled:?}"
    );
    assert_eq!(
        blobs_read(&pulled),
        BTreeSet::from([lazy.config_digest()]),
        "the pull read blobs other than the config: {pulled:?}"
    );

    // Pulling again: nothing new, the record updated.
    let again: serde_json::Value =
        serde_json::from_str(&ok(pull(ctr, &["--json", &lazy.reference]), "second pull")).unwrap();
    assert_eq!(again["image"], "updated");
    assert_eq!(again["manifest"], "existed");
    assert_eq!(again["config"], "existed");
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));

    // The container: the daemon mounts the image now, and reads data.
    let before_run = log_len(&registry);
    let out = ctr
        .ctr(&[
            "--timeout",
            "60s",
            "run",
            "--rm",
            "--snapshotter",
            "lazypull",
            &lazy.reference,
            "c1",
        ])
        .unwrap_or_else(|e| panic!("ctr run: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{BUSYBOX_IMAGE_OUTPUT}\n")
    );
    let ran = accesses(&registry, before_run);
    let read = blobs_read(&ran);
    eprintln!("the container's start read from the registry: {ran:?}");
    assert!(
        data.iter().any(|d| read.contains(d)),
        "no data blob read while the container ran: {ran:?}"
    );
    let allowed: BTreeSet<String> = meta.iter().chain(&tables).chain(&data).cloned().collect();
    assert!(read.is_subset(&allowed), "unexpected blobs read: {ran:?}");
    for a in &ran {
        assert!(
            a.status == 200 || a.status == 206,
            "a failed registry request: {a:?}"
        );
    }
    assert_eq!(snapshot_rows(ctr, "lazypull"), committed_rows(&chain));

    // Deleting the image: containerd's GC removes the chain (the config's
    // label held it), and with it the lazy mount goes.
    ctr.ctr(&["images", "rm", "--sync", &lazy.reference])
        .unwrap();
    let start = Instant::now();
    while !snapshot_rows(ctr, "lazypull").is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(snapshot_rows(ctr, "lazypull"), Vec::new());
    assert_eq!(content_labels(ctr, &lazy.manifest_digest), None);
    assert_eq!(content_labels(ctr, &lazy.config_digest()), None);
    let lazy_mounts = containerd::mounts_under(&stack.snap_root.join("lazy"));
    assert!(
        lazy_mounts.is_empty(),
        "lazy mounts left after the image was removed: {lazy_mounts:?}"
    );
}

#[test]
fn pull_refuses_what_it_cannot_do_lazily() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let (ordinary, lazy) = lazy_busybox(&registry);
    let containerd = Containerd::start(&dir.join("c"), &ContainerdOptions::default()).unwrap();
    let ctr = &containerd;
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // An ordinary image.
    let out = pull(ctr, &[&ordinary]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot be pulled lazily")
            && err.contains("not a lazypull image")
            && err.contains("lazypull convert"),
        "{err}"
    );

    // A snapshotter that is not lazypull's: its Prepare succeeds.
    let out = pull(ctr, &["--snapshotter", "overlayfs", &lazy.reference]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("snapshotter \"overlayfs\" is not lazypull's")
            && err.contains("Prepare of layer 0"),
        "{err}"
    );
    assert_eq!(snapshot_rows(ctr, "overlayfs"), Vec::new());
    assert_eq!(image_digest(ctr, &lazy.reference), None);

    // A snapshotter containerd does not have.
    let out = pull(ctr, &["--snapshotter", "nosuch", &lazy.reference]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("containerd has no snapshotter \"nosuch\"")
            && err.contains("snapshotter not loaded: nosuch"),
        "{err}"
    );
    assert_eq!(image_digest(ctr, &lazy.reference), None);

    // No containerd.
    let missing = dir.join("nothing.sock");
    let out = lazypull()
        .arg("pull")
        .arg("--address")
        .arg(&missing)
        .arg(&lazy.reference)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("containerd unreachable at {}", missing.display())),
        "{err}"
    );
    // Nothing of the failed pulls stays under a lease.
    let leases = ctr.ctr_stdout(&["leases", "ls", "-q"]).unwrap();
    assert_eq!(leases.trim(), "", "leases left: {leases}");
}

/// The python image, converted and pulled lazily, runs under containerd:
/// its output shows the entrypoint, command, environment and working
/// directory honoured, and the interpreter, its libraries and the stdlib
/// modules it imports read from the lazy image; the registry saw only the
/// manifest and config at pull time, data reads only once the container
/// started (their share of the data is printed).
#[test]
fn python_runs_from_a_lazily_pulled_image() {
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let image = python_image().unwrap();
    image.push(registry.addr(), "test/python", "v1").unwrap();
    let source = format!("{}/test/python:v1", registry.addr());
    let reference = format!("{}/test/python-lazy:v1", registry.addr());
    let converted: serde_json::Value = serde_json::from_str(&ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    ))
    .unwrap();
    let manifest_digest = converted["manifest_digest"].as_str().unwrap().to_owned();

    let stack = Stack::start(dir);
    let ctr = &stack.ctr;
    let before_pull = log_len(&registry);
    ok(pull(ctr, &[&reference]), "lazypull pull");
    assert_eq!(
        image_digest(ctr, &reference).as_deref(),
        Some(manifest_digest.as_str())
    );
    let pulled = accesses(&registry, before_pull);
    assert_eq!(
        blobs_read(&pulled).len(),
        1,
        "the pull read more than the config: {pulled:?}"
    );

    let before_run = log_len(&registry);
    let out = ctr
        .ctr(&[
            "--timeout",
            "120s",
            "run",
            "--rm",
            "--snapshotter",
            "lazypull",
            &reference,
            "py1",
        ])
        .unwrap_or_else(|e| panic!("ctr run: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{PYTHON_OUTPUT}\n")
    );
    // The data layers' sizes, from the lazy manifest the registry stored.
    let hex = manifest_digest.strip_prefix("sha256:").unwrap();
    let stored = registry_dir(&registry).join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    let data: HashMap<String, u64> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == "data")
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let total: u64 = data.values().sum();
    let ran = accesses(&registry, before_run);
    let read: u64 = ran
        .iter()
        .filter(|a| {
            a.path
                .split_once("/blobs/")
                .is_some_and(|(_, d)| data.contains_key(d))
        })
        .map(|a| a.bytes)
        .sum();
    eprintln!(
        "python's start read {read} of {total} data bytes ({:.1}%) in {} registry requests",
        read as f64 * 100.0 / total as f64,
        ran.len()
    );
    // Only now, and only what the image holds. (How much of the data a
    // start reads is the daemon's readahead's business, not asserted.)
    assert!(read > 0, "no data read: {ran:?}");
    let allowed: BTreeSet<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        blobs_read(&ran).is_subset(&allowed),
        "unexpected blobs read: {ran:?}"
    );
}

/// Bytes the accesses sent of blob `digest`.
fn bytes_of(accesses: &[Access], digest: &str) -> u64 {
    accesses
        .iter()
        .filter(|a| a.path.ends_with(&format!("/blobs/{digest}")))
        .map(|a| a.bytes)
        .sum()
}

/// `--eager`: busybox plus a layer holding an 8 MiB file that no container
/// reads. Pulled without `--eager`, a container's start leaves that file's
/// data blob (nearly) unread; pulled again with `--eager` (after `ctr
/// images rm --sync` removed the chain), the next container's start has the
/// daemon fetch all of it in the background while the container sleeps.
#[test]
fn eager_pull_prefetches_the_whole_image() {
    use lazypull_testkit::oci_image::{Image, LayerBuilder};
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    // Incompressible, deterministic.
    let mut big = Vec::with_capacity(8 << 20);
    let mut block = Sha256::digest(b"lazypull eager").to_vec();
    while big.len() < 8 << 20 {
        block = Sha256::digest(&block).to_vec();
        big.extend_from_slice(&block);
    }
    let mut layers = busybox_image().unwrap().layers;
    layers.push(
        LayerBuilder::new()
            .dir("data", 0o755)
            .unwrap()
            .file("data/unread", &big, 0o644)
            .unwrap()
            .finish()
            .unwrap(),
    );
    let image = Image::new(
        layers,
        serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}),
    )
    .unwrap();
    image.push(registry.addr(), "test/eager", "v1").unwrap();
    let source = format!("{}/test/eager:v1", registry.addr());
    let reference = format!("{}/test/eager-lazy:v1", registry.addr());
    ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    );
    let stack = Stack::start(dir);
    let ctr = &stack.ctr;

    // Without --eager.
    let start = log_len(&registry);
    ok(pull(ctr, &[&reference]), "lazypull pull");
    let manifest_digest = image_digest(ctr, &reference).unwrap();
    let hex = manifest_digest.strip_prefix("sha256:").unwrap();
    let stored = registry_dir(&registry).join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    // The big file's data blob: the largest data layer.
    let (unread, size) = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"]["containerd.io/snapshot/lazypull.role"] == "data")
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .max_by_key(|(_, size)| *size)
        .unwrap();
    assert!(size >= 8 << 20, "{unread} is {size} bytes");
    let run = |id: &str, args: &[&str]| {
        let mut all = vec![
            "--timeout",
            "60s",
            "run",
            "--snapshotter",
            "lazypull",
            &reference,
            id,
        ];
        all.splice(3..3, args.iter().copied());
        ctr.ctr(&all)
            .unwrap_or_else(|e| panic!("ctr run {id}: {e}"));
    };
    run("c1", &["--rm"]);
    let lazily = bytes_of(&accesses(&registry, start), &unread);
    eprintln!("without --eager: {lazily} of {size} bytes of the unread file's blob fetched");
    assert!(
        lazily < size / 2,
        "without --eager, {lazily} of the {size} bytes of the unread file's blob were fetched"
    );

    // With --eager, afresh.
    ctr.ctr(&["images", "rm", "--sync", &reference]).unwrap();
    assert_eq!(snapshot_rows(ctr, "lazypull"), Vec::new());
    ok(pull(ctr, &["--eager", &reference]), "lazypull pull --eager");
    run("c2", &["-d"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fetched = bytes_of(&accesses(&registry, start), &unread);
        if fetched >= size {
            eprintln!("with --eager: {fetched} of {size} bytes fetched");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with --eager, only {fetched} of the {size} bytes of the unread file's blob were fetched after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `lazypull status` while a container runs: the snapshotter's lazy image
/// lists the container (containerd's key `default/<n>/c1`) under the
/// image's one mount `<snapshotter root>/lazy/<meta hex>`, with the daemon's
/// bytes fetched for the image below its size (busybox plus an 8 MiB file
/// nobody reads); with no snapshotter at the socket, the status says so and
/// does not fail.
#[test]
fn status_shows_the_containers_on_each_lazy_mount() {
    use lazypull_testkit::oci_image::{Image, LayerBuilder};
    require_host();
    let tmp = temp_dir();
    let dir = tmp.path();
    let registry = RegistryServer::start(&dir.join("registry"), None).unwrap();
    let mut big = Vec::with_capacity(8 << 20);
    let mut block = Sha256::digest(b"lazypull status").to_vec();
    while big.len() < 8 << 20 {
        block = Sha256::digest(&block).to_vec();
        big.extend_from_slice(&block);
    }
    let mut layers = busybox_image().unwrap().layers;
    layers.push(
        LayerBuilder::new()
            .dir("data", 0o755)
            .unwrap()
            .file("data/unread", &big, 0o644)
            .unwrap()
            .finish()
            .unwrap(),
    );
    let image = Image::new(
        layers,
        serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}),
    )
    .unwrap();
    image.push(registry.addr(), "test/status", "v1").unwrap();
    let source = format!("{}/test/status:v1", registry.addr());
    let reference = format!("{}/test/status-lazy:v1", registry.addr());
    ok(
        lazypull()
            .args(["convert", &source, &reference, "--json"])
            .output()
            .unwrap(),
        "lazypull convert",
    );
    let stack = Stack::start(dir);
    let ctr = &stack.ctr;
    ok(pull(ctr, &[&reference]), "lazypull pull");
    ctr.ctr(&[
        "--timeout",
        "60s",
        "run",
        "-d",
        "--snapshotter",
        "lazypull",
        &reference,
        "c1",
        "/bin/sh",
        "-c",
        "echo started; sleep 120",
    ])
    .unwrap_or_else(|e| panic!("ctr run -d: {e}"));

    let control = stack.control_socket();
    let snap_socket = dir.join("snap.sock");
    let status = |snapshotter: &std::path::Path, json: bool| {
        let mut cmd = lazypull();
        cmd.arg("status")
            .arg("--socket")
            .arg(&control)
            .arg("--snapshotter-socket")
            .arg(snapshotter);
        if json {
            cmd.arg("--json");
        }
        ok(cmd.output().unwrap(), "lazypull status")
    };
    // `ctr run -d` returns once the task started; the daemon's figures
    // follow the shell's first reads: poll until they show.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let v: serde_json::Value = serde_json::from_str(&status(&snap_socket, true)).unwrap();
        if v["snapshotter"]["lazy_images"][0]["fetched_bytes"].as_u64() > Some(0) {
            break v;
        }
        assert!(Instant::now() < deadline, "no fetched bytes in: {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let snap = &report["snapshotter"];
    assert_eq!(snap["running"], true, "{snap:#}");
    let images = snap["lazy_images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{snap:#}");
    let lazy_image = &images[0];
    let manifest_digest = image_digest(ctr, &reference).unwrap();
    assert!(
        lazy_image["image_ref"]
            .as_str()
            .unwrap()
            .ends_with(&format!("@{manifest_digest}")),
        "{lazy_image:#}"
    );
    let meta = lazy_image["meta"].as_str().unwrap();
    assert_eq!(
        lazy_image["mountpoints"],
        serde_json::json!([stack.snap_root.join("lazy").join(meta)]),
        "{lazy_image:#}"
    );
    let users = lazy_image["containers"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{lazy_image:#}");
    assert_eq!(users[0]["namespace"], ctr.namespace());
    assert_eq!(users[0]["key"], "c1");
    assert_eq!(users[0]["kind"], "active");
    let fetched = lazy_image["fetched_bytes"].as_u64().unwrap();
    let size = lazy_image["size_bytes"].as_u64().unwrap();
    eprintln!("lazy image {meta}: {fetched} of {size} bytes fetched");
    assert!(
        fetched < size && size >= 8 << 20,
        "fetched {fetched} of {size}: {lazy_image:#}"
    );
    // The daemon's own status is still there.
    assert!(report["images"].as_array().is_some_and(|i| i.len() == 1));

    // The table.
    let text = status(&snap_socket, false);
    eprintln!("{text}");
    let user = format!("{}/c1", ctr.namespace());
    let row = text
        .lines()
        .find(|l| l.contains(&meta[..12]) && l.contains(&user))
        .unwrap_or_else(|| panic!("no row with the image and {user} in:\n{text}"));
    assert!(row.contains("/test/status-lazy@sha256:"), "{row}");

    // No snapshotter there: said, not an error.
    let none = dir.join("no-snapshotter.sock");
    let v: serde_json::Value = serde_json::from_str(&status(&none, true)).unwrap();
    assert_eq!(v["snapshotter"]["running"], false);
    let text = status(&none, false);
    assert!(
        text.contains(&format!("snapshotter: not running at {}", none.display())),
        "{text}"
    );
}
