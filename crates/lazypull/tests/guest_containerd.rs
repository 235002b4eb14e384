//! containerd and runc run containers in the Linux 6.12 test guest (the base the cachefiles
//! half of issue 12 builds on).
//!
//! The host builds a tiny OCI image (an OCI layout tar: busybox-static's `/bin/busybox` with
//! the applets its program uses, a program `/check.sh`, a config with `Env` and `Cmd`). One
//! guest (`tests/guest/containerd.sh`) starts the host's containerd 1.6 over the 9p root with
//! its root on an ext4 disk and its state on tmpfs (no CRI plugin), imports the image with
//! `ctr images import` (unpacked by the overlayfs snapshotter) and runs it with
//! `ctr run --rm` (runc 1.1 through containerd-shim-runc-v2). The host then checks what the
//! container printed, which proves:
//! - the guest kernel and `guest/init.sh` give runc what it needs: the namespaces of
//!   containerd's default spec (the program is PID 1 of its own PID namespace), cgroup v2
//!   (it runs in containerd's cgroup `/default/c1`), device control through an eBPF program
//!   on that cgroup (`mknod` of the guest's disk succeeds, opening it is refused), overlayfs
//!   (the container's root is an overlay), mqueue and devpts (mounted by runc per the spec);
//! - the image's `Env` and `Cmd` are honoured (the program is the `Cmd`, its greeting
//!   comes from the `Env`), and `ctr run --env` adds to the environment;
//! - containerd's snapshots live on the ext4 disk, not on 9p.
//!
//! If anything is missing (in the kernel, in init, on the host), the test fails quoting ctr's
//! error (which carries runc's), containerd's log and the console tail.
//!
//! Needs root, qemu, the guest kernel, containerd, runc and busybox-static; fails (never
//! skips) without them.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazypull_guest::{Disk, GuestConfig};
use serde_json::json;
use sha2::{Digest, Sha256};

const IMAGE: &str = "docker.io/lazypull/guest-busybox:1";
const GREETING: &str = "hello from a container in the 6.12 guest";
const BUSYBOX: &str = "/bin/busybox";

/// The image's program (its `Cmd`).
const CHECK_SH: &str = r#"echo "$LP_GREETING"
echo "pid: $$"
echo "cgroup: $(cat /proc/self/cgroup)"
echo "root fs: $(awk '$2 == "/" { print $3 }' /proc/mounts)"
echo "mqueue: $(awk '$2 == "/dev/mqueue" { print $3 }' /proc/mounts)"
echo "devpts: $(awk '$2 == "/dev/pts" { print $3 }' /proc/mounts)"
if mknod /dev/lp-blk b "${LP_BLOCK%%:*}" "${LP_BLOCK##*:}" 2>/tmp/err; then
	if head -c 1 /dev/lp-blk >/dev/null 2>/tmp/err; then
		echo "block device: readable"
	else
		echo "block device: $(cat /tmp/err)"
	fi
else
	echo "mknod: $(cat /tmp/err)"
fi
"#;

/// Applets of busybox the program uses, as symlinks in `/bin`.
const APPLETS: &[&str] = &["sh", "cat", "awk", "head", "mknod"];

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// The image's only layer, an uncompressed tar.
fn layer() -> Vec<u8> {
    let busybox = fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("reading {BUSYBOX}: {e} (the image needs busybox-static: apt-get install busybox-static)")
    });
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in [("bin/", 0o755), ("tmp/", 0o1777)] {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, dir, std::io::empty()).unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o644, CHECK_SH.len() as u64);
    b.append_data(&mut h, "check.sh", CHECK_SH.as_bytes())
        .unwrap();
    b.into_inner().unwrap()
}

/// Writes an OCI image layout tar holding [`IMAGE`] (named by containerd's
/// `io.containerd.image.name` annotation, which `ctr images import` uses as is).
fn write_oci_archive(path: &Path) {
    let layer = layer();
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", format!("LP_GREETING={GREETING}")],
            "Cmd": ["/bin/sh", "/check.sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&config)),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "1",
            },
        }],
    }))
    .unwrap();
    let mut b = tar::Builder::new(File::create(path).unwrap());
    let oci_layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let mut files: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), oci_layout),
        ("index.json".into(), index.as_slice()),
    ];
    for blob in [&layer, &config, &manifest] {
        files.push((
            format!("blobs/sha256/{}", sha256_hex(blob)),
            blob.as_slice(),
        ));
    }
    for (name, data) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }
    b.into_inner().unwrap().sync_all().unwrap();
}

#[test]
fn containerd_runs_a_container_in_the_guest() {
    lazypull_guest::require_root().expect("guest tests need root");
    for (tool, package) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
    ] {
        lazypull_guest::find_tool(tool, package).expect("a tool the guest scenario runs");
    }
    let kernel = lazypull_guest::kernel().expect("guest kernel");
    let dir = tempfile::tempdir().unwrap();
    let archive: PathBuf = dir.path().join("image.tar");
    write_oci_archive(&archive);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/containerd.sh");
    let cfg = GuestConfig::new(&kernel)
        .name("containerd")
        .timeout(Duration::from_secs(900))
        .disk(Disk::EmptyExt4 { size_mib: 512 })
        .env("LP_IMAGE_TAR", archive.to_str().unwrap())
        .env("LP_IMAGE", IMAGE);
    let started = Instant::now();
    let run = lazypull_guest::run(&script, &cfg).expect("booting the guest");
    println!("{}", run.log);
    println!(
        "guest run: {:?} in all (boot {:?}); test {:?}",
        run.elapsed,
        run.boot_time,
        started.elapsed()
    );
    if let Err(e) = run.ensure_success() {
        panic!("containerd scenario failed in the guest: {e:#}");
    }

    let out = run.read_out("run.out").unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let expect = [
        GREETING,
        "pid: 1",
        "cgroup: 0::/default/c1",
        "root fs: overlay",
        "mqueue: mqueue",
        "devpts: devpts",
    ];
    assert_eq!(
        lines.get(..expect.len()),
        Some(&expect[..]),
        "the container's output:\n{out}"
    );
    // The device filter refuses the open (EPERM); busybox words it "head: FILE: MESSAGE".
    assert_eq!(
        lines.get(expect.len()..),
        Some(&["block device: head: /dev/lp-blk: Operation not permitted"][..]),
        "runc's device filter denies the guest's disk; the container's output:\n{out}"
    );
    assert_eq!(
        run.read_out("root-fstype").unwrap().trim(),
        "ext2/ext3",
        "containerd's snapshots are on the ext4 disk"
    );
}
