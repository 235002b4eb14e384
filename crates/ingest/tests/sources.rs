//! `build_from_source`: OCI image layouts, `docker save` archives, plain and
//! gzip tar layers and hostile input, all generated here with the `tar`
//! crate. The OCI image is mounted with the host kernel (file-backed, blobs
//! as devices) and compared with an expected tree written by hand.
//!
//! Needs root (mounting; the expected trees hold devices, owners, trusted.*
//! xattrs and ACLs). Without root the tests FAIL; they never skip.

// The erofs crate's test helpers (the reader's view of an image as a testkit
// manifest): shared by path, since lazypull-testkit does not depend on the
// format crate and a dev-dependency on it would make a cycle.
#[path = "../../erofs/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use lazypull_erofs::{build_from_layers, BuildOptions, Image};
use lazypull_ingest::{build_from_source, build_source_image, IngestError, IngestOptions};
use lazypull_testkit::maketree::acl_xattr;
use lazypull_testkit::{compare_entries, format_differences, scan};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------
// Entry specs: written both as tar entries and as real files.

#[derive(Clone)]
enum K {
    Dir,
    File(Vec<u8>),
    Symlink(&'static str),
    Hard(String),
    Fifo,
    Char(u32, u32),
    Block(u32, u32),
}

#[derive(Clone)]
struct Spec {
    path: String,
    kind: K,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: Vec<(&'static str, Vec<u8>)>,
}

fn sp(path: &str, kind: K, mode: u32) -> Spec {
    Spec {
        path: path.to_string(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: (1_600_000_000, 0),
        xattrs: Vec::new(),
    }
}

impl Spec {
    fn owner(mut self, uid: u32, gid: u32) -> Self {
        (self.uid, self.gid) = (uid, gid);
        self
    }
    fn time(mut self, sec: i64, nsec: u32) -> Self {
        self.mtime = (sec, nsec);
        self
    }
    fn xattr(mut self, name: &'static str, value: &[u8]) -> Self {
        self.xattrs.push((name, value.to_vec()));
        self
    }
}

fn append(b: &mut tar::Builder<Vec<u8>>, s: &Spec) {
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    if s.mtime.1 != 0 {
        pax.push((
            "mtime".into(),
            format!("{}.{:09}", s.mtime.0, s.mtime.1).into_bytes(),
        ));
    }
    for (n, v) in &s.xattrs {
        pax.push((format!("SCHILY.xattr.{n}"), v.clone()));
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(s.mode);
    h.set_uid(u64::from(s.uid));
    h.set_gid(u64::from(s.gid));
    h.set_mtime(s.mtime.0 as u64);
    h.set_size(0);
    let path = s.path.as_str();
    match &s.kind {
        K::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, path, &[][..]).unwrap();
        }
        K::File(data) => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
        K::Symlink(t) => {
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, path, t).unwrap();
        }
        K::Hard(t) => {
            h.set_entry_type(tar::EntryType::Link);
            b.append_link(&mut h, path, t).unwrap();
        }
        K::Fifo => {
            h.set_entry_type(tar::EntryType::Fifo);
            b.append_data(&mut h, path, &[][..]).unwrap();
        }
        K::Char(ma, mi) | K::Block(ma, mi) => {
            h.set_entry_type(if matches!(s.kind, K::Char(..)) {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            h.set_device_major(*ma).unwrap();
            h.set_device_minor(*mi).unwrap();
            b.append_data(&mut h, path, &[][..]).unwrap();
        }
    }
}

fn tar_of(specs: &[Spec]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for s in specs {
        append(&mut b, s);
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Write `specs` as real files under `root` (which gets the `.` spec's
/// metadata if there is one). Parents must be listed before children.
fn materialize(root: &Path, specs: &[Spec]) {
    fs::create_dir_all(root).unwrap();
    let p = |s: &Spec| {
        let rel = s.path.trim_start_matches("./").trim_end_matches('/');
        if rel.is_empty() || rel == "." {
            root.to_path_buf()
        } else {
            root.join(rel)
        }
    };
    for s in specs {
        let path = p(s);
        match &s.kind {
            K::Dir => {
                if path != root {
                    fs::create_dir(&path).unwrap()
                }
            }
            K::File(d) => fs::write(&path, d).unwrap(),
            K::Symlink(t) => std::os::unix::fs::symlink(t, &path).unwrap(),
            K::Hard(t) => fs::hard_link(root.join(t), &path).unwrap(),
            K::Fifo | K::Char(..) | K::Block(..) => {
                let (ft, dev) = match s.kind {
                    K::Fifo => (rustix::fs::FileType::Fifo, 0),
                    K::Char(a, b) => (rustix::fs::FileType::CharacterDevice, makedev(a, b)),
                    K::Block(a, b) => (rustix::fs::FileType::BlockDevice, makedev(a, b)),
                    _ => unreachable!(),
                };
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &path,
                    ft,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    dev,
                )
                .unwrap();
            }
        }
        if matches!(s.kind, K::Hard(_)) {
            continue;
        }
        rustix::fs::chownat(
            rustix::fs::CWD,
            &path,
            Some(rustix::fs::Uid::from_raw(s.uid)),
            Some(rustix::fs::Gid::from_raw(s.gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        if !matches!(s.kind, K::Symlink(_)) {
            rustix::fs::chmod(&path, rustix::fs::Mode::from_raw_mode(s.mode)).unwrap();
        }
        for (n, v) in &s.xattrs {
            rustix::fs::lsetxattr(&path, *n, v, rustix::fs::XattrFlags::empty())
                .unwrap_or_else(|e| panic!("{}: setxattr {n}: {e}", path.display()));
        }
    }
    // Times last, children before parents.
    for s in specs.iter().rev() {
        if !matches!(s.kind, K::Hard(_)) {
            common::set_mtime(&p(s), s.mtime.0, s.mtime.1);
        }
    }
}

fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (u64::from(major), u64::from(minor));
    ((ma & 0xfff) << 8) | ((ma & !0xfff) << 32) | (mi & 0xff) | ((mi & !0xff) << 12)
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests build device nodes, owners and trusted.* xattrs and mount \
         EROFS: run as root (`sudo -E cargo test -p lazypull-ingest --test sources`)"
    );
}

// ---------------------------------------------------------------------
// The two-layer test image.

const T1: i64 = 1_650_000_000;
const T2: i64 = 1_700_000_000;

fn long_name() -> String {
    "n".repeat(255)
}

fn big_data() -> Vec<u8> {
    (0..(5u32 << 19) + 123)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

fn cap_value() -> Vec<u8> {
    // vfs_cap_data revision 2, cap_net_bind_service permitted+effective.
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    for w in [1u32 << 10, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn acl() -> Vec<u8> {
    // user::rw- user:1000:r-- group::r-- mask::r-- other::r--  (mode 0644)
    acl_xattr(&[
        (0x01, 6, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ])
}

fn layer1() -> Vec<Spec> {
    let long = long_name();
    vec![
        sp("./", K::Dir, 0o755).time(T1, 0),
        sp("etc/", K::Dir, 0o755).time(T1, 1),
        sp(
            "etc/passwd",
            K::File(b"root:x:0:0::/root:/bin/sh\n".to_vec()),
            0o644,
        )
        .time(T1, 2),
        sp("bin/", K::Dir, 0o755).time(T1, 3),
        sp(
            "bin/tool",
            K::File(b"#!/bin/sh\necho tool\n".to_vec()),
            0o4755,
        )
        .owner(0, 50)
        .time(T1, 4)
        .xattr("security.capability", &cap_value()),
        sp("bin/tool-link", K::Hard("bin/tool".into()), 0o4755),
        sp(
            "gone.txt",
            K::File(b"whited out by layer 2".to_vec()),
            0o644,
        ),
        sp("subtree/", K::Dir, 0o755),
        sp("subtree/a/", K::Dir, 0o750),
        sp(
            "subtree/a/c.txt",
            K::File(b"whole subtree removed".to_vec()),
            0o644,
        ),
        sp("opaque/", K::Dir, 0o755),
        sp(
            "opaque/old1",
            K::File(b"hidden by the opaque marker".to_vec()),
            0o644,
        ),
        sp("opaque/olddir/", K::Dir, 0o755),
        sp("opaque/olddir/x", K::File(b"also hidden".to_vec()), 0o644),
        sp("keep/", K::Dir, 0o711).owner(7, 8).time(T1, 5),
        sp("keep/k1", K::File(b"k1".to_vec()), 0o600).owner(7, 8),
        sp("data/", K::Dir, 0o755),
        sp("data/big.bin", K::File(big_data()), 0o644).time(T1, 999_999_999),
        sp("dev/", K::Dir, 0o755),
        sp("dev/null", K::Char(1, 3), 0o666),
        sp("dev/loop0", K::Block(7, 0), 0o660).owner(0, 6),
        sp("dev/fifo", K::Fifo, 0o620),
        sp("link-abs", K::Symlink("/etc/passwd"), 0o777),
        sp("link-rel", K::Symlink("etc/passwd"), 0o777),
        sp("empty", K::File(Vec::new()), 0o400).owner(1000, 1000),
        sp("long/", K::Dir, 0o755),
        sp(
            &format!("long/{long}"),
            K::File(b"a 255-byte name".to_vec()),
            0o644,
        ),
        sp("x/", K::Dir, 0o755),
        sp("x/file", K::File(b"with xattrs".to_vec()), 0o644)
            .xattr("user.foo", b"bar")
            .xattr("trusted.t", b"tv")
            .xattr("system.posix_acl_access", &acl()),
    ]
}

fn layer2() -> Vec<Spec> {
    vec![
        sp("./", K::Dir, 0o755).time(T2, 0),
        sp(".wh.gone.txt", K::File(Vec::new()), 0o644),
        sp(".wh.subtree", K::File(Vec::new()), 0o644),
        sp("opaque/", K::Dir, 0o700).time(T2, 10),
        sp("opaque/.wh..wh..opq", K::File(Vec::new()), 0o644),
        sp(
            "opaque/new1",
            K::File(b"only this survives".to_vec()),
            0o644,
        ),
        // keep/ is not listed: implicitly created, keeps layer 1's metadata.
        sp("keep/k2", K::File(b"k2".to_vec()), 0o640).time(T2, 11),
        sp(
            "etc/passwd",
            K::File(b"root:x:0:0::/root:/bin/bash\n".to_vec()),
            0o644,
        )
        .time(T2, 12),
        sp("h/", K::Dir, 0o755),
        sp("h/one", K::File(b"hard-linked in layer 2".to_vec()), 0o640).owner(3, 4),
        sp("h/two", K::Hard("h/one".into()), 0o640),
        sp("h/sub/", K::Dir, 0o755),
        sp("h/sub/three", K::Hard("./h/one".into()), 0o640),
    ]
}

/// The merged view, written out by hand.
fn expected() -> Vec<Spec> {
    let long = long_name();
    vec![
        sp("./", K::Dir, 0o755).time(T2, 0),
        sp("etc/", K::Dir, 0o755).time(T1, 1),
        sp(
            "etc/passwd",
            K::File(b"root:x:0:0::/root:/bin/bash\n".to_vec()),
            0o644,
        )
        .time(T2, 12),
        sp("bin/", K::Dir, 0o755).time(T1, 3),
        sp(
            "bin/tool",
            K::File(b"#!/bin/sh\necho tool\n".to_vec()),
            0o4755,
        )
        .owner(0, 50)
        .time(T1, 4)
        .xattr("security.capability", &cap_value()),
        sp("bin/tool-link", K::Hard("bin/tool".into()), 0o4755),
        sp("opaque/", K::Dir, 0o700).time(T2, 10),
        sp(
            "opaque/new1",
            K::File(b"only this survives".to_vec()),
            0o644,
        ),
        sp("keep/", K::Dir, 0o711).owner(7, 8).time(T1, 5),
        sp("keep/k1", K::File(b"k1".to_vec()), 0o600).owner(7, 8),
        sp("keep/k2", K::File(b"k2".to_vec()), 0o640).time(T2, 11),
        sp("data/", K::Dir, 0o755),
        sp("data/big.bin", K::File(big_data()), 0o644).time(T1, 999_999_999),
        sp("dev/", K::Dir, 0o755),
        sp("dev/null", K::Char(1, 3), 0o666),
        sp("dev/loop0", K::Block(7, 0), 0o660).owner(0, 6),
        sp("dev/fifo", K::Fifo, 0o620),
        sp("link-abs", K::Symlink("/etc/passwd"), 0o777),
        sp("link-rel", K::Symlink("etc/passwd"), 0o777),
        sp("empty", K::File(Vec::new()), 0o400).owner(1000, 1000),
        sp("long/", K::Dir, 0o755),
        sp(
            &format!("long/{long}"),
            K::File(b"a 255-byte name".to_vec()),
            0o644,
        ),
        sp("x/", K::Dir, 0o755),
        sp("x/file", K::File(b"with xattrs".to_vec()), 0o644)
            .xattr("user.foo", b"bar")
            .xattr("trusted.t", b"tv")
            .xattr("system.posix_acl_access", &acl()),
        sp("h/", K::Dir, 0o755),
        sp("h/one", K::File(b"hard-linked in layer 2".to_vec()), 0o640).owner(3, 4),
        sp("h/two", K::Hard("h/one".into()), 0o640),
        sp("h/sub/", K::Dir, 0o755),
        sp("h/sub/three", K::Hard("h/one".into()), 0o640),
    ]
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&hex), data).unwrap();
    hex
}

/// An OCI image layout with the given (already compressed) layer blobs.
/// Returns the layer digests (hex).
fn make_oci(layout: &Path, layers: &[Vec<u8>]) -> Vec<String> {
    make_oci_with(
        layout,
        layers,
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    )
}

/// [`make_oci`] with `config` as the image config.
fn make_oci_with(layout: &Path, layers: &[Vec<u8>], config: &[u8]) -> Vec<String> {
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let config_hex = write_blob(layout, config);
    let mut hexes = Vec::new();
    let mut descs = Vec::new();
    for l in layers {
        let hex = write_blob(layout, l);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{hex}"),
            "size": l.len(),
        }));
        hexes.push(hex);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_hex}"),
            "size": config.len(),
        },
        "layers": descs,
    }))
    .unwrap();
    let manifest_hex = write_blob(layout, &manifest);
    // A multi-platform index: linux/amd64 is picked.
    let other = write_blob(layout, br#"{"schemaVersion":2,"layers":[]}"#);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{other}"),
                "size": 31,
                "platform": {"architecture": "arm64", "os": "linux"},
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_hex}"),
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
            },
        ],
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    hexes
}

/// A `docker save` archive: uncompressed layers, the second stored once
/// under blobs/ and reached through a symlink, manifest.json last.
fn make_docker_save(path: &Path, l1: &[u8], l2: &[u8]) {
    make_docker_save_with(path, l1, l2, "cfg.json", "cfg.json", br#"{"os":"linux"}"#)
}

/// [`make_docker_save`] with `config` stored as the member `stored`, and
/// `manifest.json` naming `listed` as the config.
fn make_docker_save_with(
    path: &Path,
    l1: &[u8],
    l2: &[u8],
    listed: &str,
    stored: &str,
    config: &[u8],
) {
    let mut b = tar::Builder::new(Vec::new());
    let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    let l2hex = sha256_hex(l2);
    file(&mut b, "aaa/VERSION", b"1.0");
    file(&mut b, "aaa/layer.tar", l1);
    file(&mut b, &format!("blobs/sha256/{l2hex}"), l2);
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o777);
    h.set_size(0);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Symlink);
    b.append_link(&mut h, "bbb/layer.tar", format!("../blobs/sha256/{l2hex}"))
        .unwrap();
    file(&mut b, stored, config);
    let manifest = serde_json::json!([{
        "Config": listed,
        "RepoTags": ["example:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar"],
    }]);
    file(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::empty()).is_err() {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn mount(img: &lazypull_erofs::BuiltImage, out: &Path, mnt: &Path) -> Mounted {
    fs::create_dir_all(mnt).unwrap();
    let devices: Vec<String> = img
        .blob_paths(out)
        .iter()
        .map(|p| format!("device={}", p.display()))
        .collect();
    let data = std::ffi::CString::new(devices.join(",")).unwrap();
    rustix::mount::mount(
        img.meta_path(out),
        mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        data.as_c_str(),
    )
    .unwrap_or_else(|e| panic!("mount -t erofs -o ro,{data:?}: {e}"));
    Mounted(mnt.to_path_buf())
}

#[test]
fn oci_layout_and_docker_save_build_the_expected_tree() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tar_of(&layer1()), tar_of(&layer2()));
    let layout = tmp.path().join("oci");
    make_oci(&layout, &[gzip(&t1), gzip(&t2)]);
    let out = tmp.path().join("out");
    let img = build_from_source(&layout, &out, &BuildOptions::default()).unwrap();
    assert_eq!(img.blobs.len(), 2, "{img:#?}");

    // Only the final image files are left: no extraction directories.
    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want = vec![img.meta_digest.clone(), "manifest.json".to_string()];
    want.extend(img.blobs.iter().map(|b| b.digest.clone()));
    want.sort();
    assert_eq!(names, want);

    let exp_dir = tmp.path().join("expected");
    materialize(&exp_dir, &expected());
    let expected = scan(&exp_dir).unwrap();

    // The crate's reader...
    let meta = Image::from_bytes(fs::read(img.meta_path(&out)).unwrap()).unwrap();
    let blobs: Vec<File> = img
        .blob_paths(&out)
        .iter()
        .map(|p| File::open(p).unwrap())
        .collect();
    let diffs = compare_entries(&expected, &common::image_manifest(&meta, &blobs));
    assert!(
        diffs.is_empty(),
        "image (crate reader) differs from the expected tree:\n{}",
        format_differences(&diffs, 50)
    );
    // ... and the kernel agree with the expected tree.
    let mnt = tmp.path().join("mnt");
    let guard = mount(&img, &out, &mnt);
    let got = scan(&mnt).unwrap();
    let diffs = compare_entries(&expected, &got);
    assert!(
        diffs.is_empty(),
        "mounted image differs from the expected tree (A = expected, B = mounted):\n{}",
        format_differences(&diffs, 50)
    );
    // Not vacuous: the whited-out paths were really in layer 1.
    assert!(got.iter().all(|e| !e.path.starts_with(b"subtree")));
    assert!(got.iter().all(|e| !e.path.windows(4).any(|w| w == b".wh.")));
    drop(guard);

    // (b) the same layers as a docker save archive: the same image.
    let save = tmp.path().join("image-save.bin");
    make_docker_save(&save, &t1, &t2);
    let out2 = tmp.path().join("out2");
    let img2 = build_from_source(&save, &out2, &BuildOptions::default()).unwrap();
    assert_eq!(img2.meta_digest, img.meta_digest);
    assert_eq!(img2.blobs, img.blobs);
}

// ---------------------------------------------------------------------
// (c) single tar layers equal the equivalent directory.

fn dir_layer_specs() -> Vec<Spec> {
    vec![
        sp("./", K::Dir, 0o751).owner(1, 2).time(T1, 0),
        sp("a/", K::Dir, 0o755).time(T1, 0),
        sp("a/f", K::File(big_data()), 0o644)
            .owner(5, 6)
            .time(T1, 0),
        sp("a/g", K::Hard("a/f".into()), 0o644),
        sp("a/s", K::Symlink("f"), 0o777).time(T1, 0),
        sp("p", K::Fifo, 0o600).time(T1, 0),
        sp("c", K::Char(10, 200), 0o600).time(T1, 0),
        sp("u", K::File(b"xattr".to_vec()), 0o640)
            .time(T1, 0)
            .xattr("user.k", b"v"),
    ]
}

#[test]
fn tar_and_gzip_layers_equal_the_directory() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dir");
    materialize(&dir, &dir_layer_specs());
    let reference = build_from_layers(
        std::slice::from_ref(&dir),
        &tmp.path().join("o-ref"),
        &BuildOptions::default(),
    )
    .unwrap();
    let via_source =
        build_from_source(&dir, &tmp.path().join("o-dir"), &BuildOptions::default()).unwrap();
    assert_eq!(via_source.meta_digest, reference.meta_digest);

    let t = tar_of(&dir_layer_specs());
    let plain = tmp.path().join("layer.data");
    fs::write(&plain, &t).unwrap();
    let gz = tmp.path().join("layer2.data");
    fs::write(&gz, gzip(&t)).unwrap();
    for src in [&plain, &gz] {
        let out = tmp
            .path()
            .join(format!("o-{}", src.file_name().unwrap().to_string_lossy()));
        let img = build_from_source(src, &out, &BuildOptions::default()).unwrap();
        assert_eq!(img.meta_digest, reference.meta_digest, "{}", src.display());
        assert_eq!(img.blobs, reference.blobs);
    }
    // Not vacuous: a different mode gives a different image.
    let mut changed = dir_layer_specs();
    changed[2].mode = 0o600;
    fs::write(&plain, tar_of(&changed)).unwrap();
    let img = build_from_source(&plain, &tmp.path().join("o-x"), &BuildOptions::default()).unwrap();
    assert_ne!(img.meta_digest, reference.meta_digest);
}

// ---------------------------------------------------------------------
// (d) hostile and broken input.

/// Names and contents of every file in `dir` (recursively).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, b"<dir>".to_vec());
                stack.push(p);
            } else {
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Raw entry: name, type, link name, data.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

/// A tar with a raw header name (bypassing the tar crate's path checks).
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, et, link, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(*et);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_and_broken_sources_are_clear_errors_and_leave_no_image() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let good_src = tmp.path().join("good.tar");
    fs::write(&good_src, tar_of(&dir_layer_specs())).unwrap();
    let good = build_from_source(&good_src, &out, &BuildOptions::default()).unwrap();
    let before = snapshot(&out);
    assert!(before.contains_key(Path::new(&good.meta_digest)));

    // A directory outside that a symlink entry points at.
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();

    let reg = tar::EntryType::Regular;
    let content_tar = tar_of(&layer1());
    let content_gz = gzip(&content_tar);
    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();
    let mut add_file = |name: &'static str, data: Vec<u8>, needle: &'static str| {
        // Neutral file names: the needles must come from the reason.
        let p = tmp.path().join(format!("case-{}.src", cases.len()));
        fs::write(&p, data).unwrap();
        cases.push((name, p, needle));
    };
    add_file(
        "traversal",
        raw_tar(&[
            (b"ok", reg, b"", b"x"),
            (b"a/../../escaped", reg, b"", b"x"),
        ]),
        "a/../../escaped",
    );
    add_file(
        "absolute-traversal",
        raw_tar(&[(b"/../../etc/escaped", reg, b"", b"x")]),
        "leaves the layer root",
    );
    let outside_str = outside.to_str().unwrap().as_bytes().to_vec();
    let outside_link: &'static [u8] = Box::leak(outside_str.into_boxed_slice());
    add_file(
        "through-symlink",
        raw_tar(&[
            (b"evil", tar::EntryType::Symlink, outside_link, b""),
            (b"evil/pwned", reg, b"", b"x"),
        ]),
        "is a symlink in this layer",
    );
    add_file(
        "hardlink-outside",
        raw_tar(&[(b"h", tar::EntryType::Link, b"../../etc/passwd", b"")]),
        "outside the layer",
    );
    add_file(
        "hardlink-missing",
        raw_tar(&[(b"h", tar::EntryType::Link, b"nothing-here", b"")]),
        "not an earlier entry",
    );
    add_file(
        "hardlink-via-symlink",
        raw_tar(&[
            (b"evil", tar::EntryType::Symlink, outside_link, b""),
            (b"h", tar::EntryType::Link, b"evil/target", b""),
        ]),
        "is a symlink in this layer",
    );
    // Cut inside a file's data, and exactly at a header boundary.
    add_file(
        "truncated-data",
        content_tar[..content_tar.len() / 2].to_vec(),
        "truncated",
    );
    let boundary = {
        let t = raw_tar(&[(b"one", reg, b"", &[7u8; 600]), (b"two", reg, b"", b"2")]);
        t[..512 + 1024].to_vec()
    };
    add_file("truncated-at-header", boundary, "truncated");
    let mut bad_gz = content_gz.clone();
    let mid = bad_gz.len() / 2;
    for b in &mut bad_gz[mid..mid + 64] {
        *b ^= 0x5a;
    }
    add_file("bad-gzip", bad_gz, "gzip");
    add_file(
        "truncated-gzip",
        content_gz[..content_gz.len() - 9].to_vec(),
        "gzip",
    );
    add_file(
        "not-an-archive",
        b"hello world, not a tar".repeat(40),
        "not a directory, tar",
    );

    // OCI layouts.
    let l1 = gzip(&tar_of(&layer1()));
    let l2 = gzip(&tar_of(&layer2()));
    let oci = |name: &str| {
        let p = tmp.path().join(name);
        let hexes = make_oci(&p, &[l1.clone(), l2.clone()]);
        (p, hexes)
    };
    let (p, _) = oci("bad-index");
    fs::write(p.join("index.json"), b"{\"manifests\": [ {\"digest\": ").unwrap();
    cases.push(("bad-index", p, "index.json: malformed JSON"));
    let (p, hexes) = oci("digest-mismatch");
    // Valid gzip tar, wrong content for its name.
    fs::write(
        p.join("blobs/sha256").join(&hexes[1]),
        gzip(&tar_of(&dir_layer_specs())),
    )
    .unwrap();
    cases.push(("digest-mismatch", p, "does not match"));
    let (p, hexes) = oci("corrupt-blob");
    let blob = p.join("blobs/sha256").join(&hexes[0]);
    let mut bytes = fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    fs::write(&blob, bytes).unwrap();
    cases.push(("corrupt-blob", p, "does not match"));
    let (p, hexes) = oci("missing-blob");
    fs::remove_file(p.join("blobs/sha256").join(&hexes[1])).unwrap();
    cases.push(("missing-blob", p, "blob missing"));

    for (name, src, needle) in &cases {
        let err = match build_from_source(src, &out, &BuildOptions::default()) {
            Ok(img) => panic!("{name}: built {img:#?}"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(
            msg.contains(needle),
            "{name}: error {msg:?} should mention {needle:?}"
        );
        match (*name, &err) {
            (
                "traversal" | "absolute-traversal" | "through-symlink",
                IngestError::InvalidEntry { .. },
            )
            | ("hardlink-outside" | "hardlink-missing", IngestError::InvalidEntry { .. })
            | ("hardlink-via-symlink", IngestError::InvalidEntry { .. })
            | ("truncated-data" | "truncated-at-header", IngestError::InvalidArchive { .. })
            | ("bad-gzip" | "truncated-gzip", IngestError::InvalidArchive { .. })
            | (
                "not-an-archive" | "bad-index" | "missing-blob",
                IngestError::InvalidSource { .. },
            )
            | ("digest-mismatch" | "corrupt-blob", IngestError::DigestMismatch { .. }) => {}
            _ => panic!("{name}: unexpected error variant {err:?}"),
        }
        assert_eq!(
            snapshot(&out),
            before,
            "{name}: out_dir changed (leftovers or damage) after {msg}"
        );
        assert!(
            fs::read_dir(&outside).unwrap().next().is_none(),
            "{name}: something was written outside"
        );
    }
    // The earlier image is intact and still the same build.
    let again = build_from_source(&good_src, &out, &BuildOptions::default()).unwrap();
    assert_eq!(again, good);
    assert_eq!(snapshot(&out), before);
    let meta = fs::read(good.meta_path(&out)).unwrap();
    assert_eq!(sha256_hex(&meta), good.meta_digest);
}

#[test]
fn whole_image_archives_given_as_one_layer_are_refused() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (l1, l2) = (tar_of(&layer1()), tar_of(&layer2()));
    let out = work.path().join("out");
    // `docker save ... | gzip`: not a layer.
    let save = work.path().join("save.tar");
    make_docker_save(&save, &l1, &l2);
    let gz = work.path().join("save.tar.gz");
    fs::write(&gz, gzip(&fs::read(&save).unwrap())).unwrap();
    let err = build_from_source(&gz, &out, &BuildOptions::default()).unwrap_err();
    assert!(
        matches!(err, IngestError::InvalidSource { .. }) && err.to_string().contains("docker save"),
        "{err}"
    );
    // An OCI layout packed in a tar (oci-archive).
    let layout = work.path().join("layout");
    make_oci(&layout, &[gzip(&l1), gzip(&l2)]);
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &layout).unwrap();
    let archive = work.path().join("oci.tar");
    fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let err = build_from_source(&archive, &out, &BuildOptions::default()).unwrap_err();
    assert!(
        matches!(err, IngestError::InvalidSource { .. })
            && err.to_string().contains("OCI image layout"),
        "{err}"
    );
    // Nothing was written, and the plain forms still build.
    assert!(fs::read_dir(&out).map_or(true, |mut d| d.next().is_none()));
    build_from_source(&save, &out, &BuildOptions::default()).unwrap();
    build_from_source(&layout, &out, &BuildOptions::default()).unwrap();
}

/// A tar holding one GNU sparse file of `real` bytes, of which only the last
/// 512 are stored in the archive.
fn sparse_tar(real: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path("sparse").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(512);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.set_real_size(real);
    gnu.sparse[0].set_offset(real - 512);
    gnu.sparse[0].set_length(512);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&[7u8; 512]);
    out.extend_from_slice(&[0u8; 1024]); // end-of-archive marker
    out
}

/// What one layer may expand to is bounded (declared sizes, sparse files at
/// their full size, and the decompressed stream): past the limit, a clear
/// error before the bytes are written, and no image; within it, the build
/// works as before.
#[test]
fn layers_past_the_expansion_limit_are_refused() {
    use lazypull_ingest::build_from_source_with;
    let tmp = tempfile::tempdir().unwrap();
    let limit = 16u64 << 20;
    let opts = IngestOptions {
        max_layer_size: limit,
    };
    let big = 64usize << 20;
    // A 64 MiB file of zeros gzips to some 64 KiB.
    let bomb = gzip(&tar_of(&[sp("zeros", K::File(vec![0u8; big]), 0o644)]));
    assert!(bomb.len() < 1 << 20);
    // A tiny tar, then 64 MiB of zeros after its end marker: no entry is
    // big, the decompressed stream is.
    let mut tail = tar_of(&[sp("f", K::File(b"x".to_vec()), 0o644)]);
    tail.resize(big, 0);
    let tail_bomb = gzip(&tail);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("sparse.tar", sparse_tar(big as u64), "sparse"),
        ("bomb.tar.gz", bomb, "zeros"),
        ("tail.tar.gz", tail_bomb, "expands to more than"),
    ];
    for (name, bytes, want) in cases {
        let src = tmp.path().join(name);
        fs::write(&src, &bytes).unwrap();
        let out = tmp.path().join(format!("out-{name}"));
        let err = match build_from_source_with(&src, &out, &BuildOptions::default(), &opts) {
            Ok(_) => panic!("{name}: a layer past the limit was built"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(want) && err.contains(&limit.to_string()) && err.contains("limit"),
            "{name}: {err}"
        );
        let left: Vec<_> = fs::read_dir(&out)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{name}: left {left:?}");
        // Within the limit (the default), the same layer builds.
        build_from_source(
            &src,
            &tmp.path().join(format!("ok-{name}")),
            &BuildOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert_eq!(
        IngestOptions::default().max_layer_size,
        lazypull_ingest::DEFAULT_MAX_LAYER_SIZE
    );
}

/// A config with every runtime field, as `docker inspect` shows them.
const RICH_CONFIG: &[u8] = br#"{"architecture":"arm64","os":"linux","variant":"v8","created":"2024-05-06T07:08:09.123456789Z","author":"me","config":{"Entrypoint":["/bin/app","-x"],"Cmd":["serve"],"Env":["PATH=/usr/bin","LANG=C.UTF-8"],"WorkingDir":"/srv","User":"1000:1000","ExposedPorts":{"8080/tcp":{}},"Volumes":{"/data":{}},"Labels":{"org.example":"yes"},"StopSignal":"SIGINT"},"history":[{"created_by":"COPY . /srv"}],"rootfs":{"type":"layers","diff_ids":["sha256:00"]},"x-extra":[1,2]}"#;

#[test]
fn the_source_config_comes_through_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let l1 = tar_of(&[sp("a", K::File(b"one".to_vec()), 0o644)]);
    let l2 = tar_of(&[sp("b", K::File(b"two".to_vec()), 0o644)]);
    let opts = BuildOptions::default();
    let limits = IngestOptions::default();

    // An OCI layout: the config blob, byte for byte, with its media type.
    let layout = tmp.path().join("oci");
    make_oci_with(&layout, &[gzip(&l1), gzip(&l2)], RICH_CONFIG);
    let built = build_source_image(&layout, &tmp.path().join("o1"), &opts, &limits).unwrap();
    let config = built.config.expect("the OCI layout's config");
    assert_eq!(config.bytes, RICH_CONFIG);
    assert_eq!(
        config.media_type,
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(config.digest, format!("sha256:{}", sha256_hex(RICH_CONFIG)));
    assert_eq!(built.image.blobs.len(), 2);
    // A config blob that does not match its descriptor is refused.
    let config_blob = layout.join("blobs/sha256").join(sha256_hex(RICH_CONFIG));
    let mut tampered = RICH_CONFIG.to_vec();
    tampered[20] = b'X';
    fs::write(&config_blob, &tampered).unwrap();
    let err = build_source_image(&layout, &tmp.path().join("o2"), &opts, &limits).unwrap_err();
    assert!(matches!(err, IngestError::DigestMismatch { .. }), "{err:?}");
    // A missing one too, naming it.
    fs::remove_file(&config_blob).unwrap();
    let err = build_source_image(&layout, &tmp.path().join("o3"), &opts, &limits).unwrap_err();
    assert!(
        err.to_string().contains(&sha256_hex(RICH_CONFIG)) && err.to_string().contains("missing"),
        "{err}"
    );

    // docker save, config named by its digest (as docker names it): verified.
    let name = format!("{}.json", sha256_hex(RICH_CONFIG));
    let save = tmp.path().join("save.tar");
    make_docker_save_with(&save, &l1, &l2, &name, &name, RICH_CONFIG);
    let built = build_source_image(&save, &tmp.path().join("o4"), &opts, &limits).unwrap();
    let config = built.config.expect("the docker save archive's config");
    assert_eq!(config.bytes, RICH_CONFIG);
    assert_eq!(
        config.media_type,
        "application/vnd.docker.container.image.v1+json"
    );
    // ... and the OCI-style name of newer docker versions.
    let name = format!("blobs/sha256/{}", sha256_hex(RICH_CONFIG));
    make_docker_save_with(&save, &l1, &l2, &name, &name, RICH_CONFIG);
    let built = build_source_image(&save, &tmp.path().join("o5"), &opts, &limits).unwrap();
    assert_eq!(built.config.unwrap().bytes, RICH_CONFIG);
    // A config that is not what its name says is refused.
    let name = format!("{}.json", "0".repeat(64));
    make_docker_save_with(&save, &l1, &l2, &name, &name, RICH_CONFIG);
    let err = build_source_image(&save, &tmp.path().join("o6"), &opts, &limits).unwrap_err();
    assert!(
        matches!(err, IngestError::DigestMismatch { .. }) && err.to_string().contains("config"),
        "{err:?}"
    );
    // Not JSON, or not an object: refused.
    for bad in [&b"{"[..], b"[1]"] {
        make_docker_save_with(&save, &l1, &l2, "c.json", "c.json", bad);
        let err = build_source_image(&save, &tmp.path().join("o7"), &opts, &limits).unwrap_err();
        assert!(err.to_string().contains("c.json"), "{err}");
    }
    // A config member that is missing.
    make_docker_save_with(&save, &l1, &l2, "c.json", "d.json", b"{}");
    let err = build_source_image(&save, &tmp.path().join("o8"), &opts, &limits).unwrap_err();
    assert!(
        err.to_string().contains("config (c.json)") && err.to_string().contains("missing"),
        "{err}"
    );

    // Sources without a config: none.
    let dir = tmp.path().join("dir");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("f"), "x").unwrap();
    let built = build_source_image(&dir, &tmp.path().join("o9"), &opts, &limits).unwrap();
    assert!(built.config.is_none());
    let tar = tmp.path().join("layer.tar");
    fs::write(&tar, &l1).unwrap();
    let built = build_source_image(&tar, &tmp.path().join("o10"), &opts, &limits).unwrap();
    assert!(built.config.is_none());
}
