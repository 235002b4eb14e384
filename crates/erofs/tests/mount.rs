//! Kernel round trip: build images with `lazypull-erofs`, mount them with
//! the host kernel's EROFS (file-backed, data blobs as extra devices) and
//! compare the mounted tree with the expected one using `lazypull-testkit`.
//!
//! Needs root and a kernel with EROFS file-backed mounts. Without either
//! the tests FAIL with the reason; they never skip silently.
//!
//! The mount is done with mount(2) directly: util-linux `mount` (2.38) turns
//! a regular-file source into a loop device, after which EROFS expects every
//! `device=` to be a block device too, and refuses the blob files. The
//! options are exactly those of
//! `mount -t erofs -o ro,device=BLOB1,device=BLOB2 META MNT`.

mod common;

use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use lazypull_erofs::{build_from_layers, BuildOptions, BuiltImage, ChunkEntry, Image};
use lazypull_testkit::maketree::{self, TreeOptions};
use lazypull_testkit::{
    compare_entries, format_differences, merge_layers, scan, scan_with, ScanOptions,
};

/// Unmounts on drop (also when the test panics).
struct Mounted {
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::empty()).is_err() {
            let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts EROFS images and must run as root \
         (e.g. `sudo -E cargo test -p lazypull-erofs --test mount`)"
    );
}

fn kernel_log_tail() -> String {
    Command::new("dmesg")
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(8)..].join("\n")
        })
        .unwrap_or_default()
}

/// `mount -t erofs -o ro,device=... META MNT`, as mount(2).
fn mount(img: &BuiltImage, out: &Path, mnt: &Path) -> Mounted {
    fs::create_dir_all(mnt).unwrap();
    let devices: Vec<String> = img
        .blob_paths(out)
        .iter()
        .map(|p| format!("device={}", p.display()))
        .collect();
    let data = std::ffi::CString::new(devices.join(",")).unwrap();
    let meta = img.meta_path(out);
    if let Err(e) = rustix::mount::mount(
        &meta,
        mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        data.as_c_str(),
    ) {
        panic!(
            "mount -t erofs -o ro,{} {} {} failed: {e}\nkernel log:\n{}",
            data.to_string_lossy(),
            meta.display(),
            mnt.display(),
            kernel_log_tail()
        );
    }
    Mounted {
        dir: mnt.to_path_buf(),
    }
}

/// `fsck.erofs` (erofs-utils 1.5 handles chunk indexes and extra devices)
/// on the meta blob with its blobs, decoding every file.
fn fsck(img: &BuiltImage, out: &Path) {
    let mut cmd = Command::new("fsck.erofs");
    for p in img.blob_paths(out) {
        cmd.arg(format!("--device={}", p.display()));
    }
    cmd.arg("--extract").arg(img.meta_path(out));
    match cmd.output() {
        Ok(o) => assert!(
            o.status.success(),
            "fsck.erofs failed: {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "fsck.erofs not found: this cross-check needs it; install the Debian package \
             erofs-utils (scripts/setup.sh does)"
        ),
        Err(e) => panic!("running fsck.erofs: {e}"),
    }
}

fn write(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

/// Every directory's link count is 2 + its subdirectories.
fn check_dir_nlinks(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut subdirs = 0;
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                subdirs += 1;
                stack.push(e.path());
            }
        }
        let nlink = fs::symlink_metadata(&d).unwrap().nlink();
        assert_eq!(nlink, 2 + subdirs, "{}: nlink", d.display());
    }
}

/// The second layer: overrides of every kind plus a file sharing a chunk
/// with layer 1.
fn make_layer2(l1: &Path, l2: &Path) {
    let chunky = fs::read(l1.join("chunky")).unwrap();
    let mut shared = chunky[..1 << 20].to_vec(); // chunk "A" of layer 1
    shared.extend((0..(1u32 << 20) + 10).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    write(&l2.join("chunky-l2"), &shared);
    write(&l2.join("mid/b4096"), b"replaced by layer 2");
    write(&l2.join("links"), b"a file where layer 1 has a directory");
    write(&l2.join("empty-file/now-a-dir"), b"layer 2");
    write(&l2.join("hard/h2"), b"breaks the hard link group");
    write(
        &l2.join("deep/d01/new-in-deep"),
        b"merged into a deep directory",
    );
    fs::create_dir_all(l2.join("xattrs/dir")).unwrap();
    fs::set_permissions(
        l2.join("xattrs/dir"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        l2.join("xattrs/dir"),
        "user.dir2",
        b"layer2",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::create_dir_all(l2.join("special")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        l2.join("special/newfifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // Give layer 2 deterministic, older times (layer 1's BASE_TIME stays the
    // newest).
    let mut stack = vec![l2.to_path_buf()];
    let mut all = Vec::new();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            all.push(e.path());
        }
    }
    all.push(l2.to_path_buf());
    for p in all {
        common::set_mtime(&p, 1_700_000_000, 777);
    }
}

#[test]
fn two_layer_image_mounts_and_matches_merged_tree() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (l1, l2, out) = (
        tmp.path().join("l1"),
        tmp.path().join("l2"),
        tmp.path().join("out"),
    );
    maketree::make_tree(
        &l1,
        &TreeOptions {
            seed: 1,
            with_huge: false,
        },
    )
    .unwrap();
    fs::create_dir(&l2).unwrap();
    make_layer2(&l1, &l2);

    let img = build_from_layers(&[l1.clone(), l2.clone()], &out, &BuildOptions::default()).unwrap();
    assert_eq!(img.blobs.len(), 2, "{img:#?}");

    // The new file in layer 2 reuses layer 1's copy of chunk "A".
    let meta = Image::from_bytes(fs::read(img.meta_path(&out)).unwrap()).unwrap();
    let a1 = meta.lookup(b"chunky").unwrap().chunks.unwrap().entries;
    let a2 = meta.lookup(b"chunky-l2").unwrap().chunks.unwrap().entries;
    assert!(matches!(a1[0], ChunkEntry::Mapped { device_id: 1, .. }));
    assert_eq!(a2[0], a1[0], "chunk shared across layers");
    assert!(matches!(a2[1], ChunkEntry::Mapped { device_id: 2, .. }));
    fsck(&img, &out);

    let expected = merge_layers(&[scan(&l1).unwrap(), scan(&l2).unwrap()]);
    // The image's own view agrees on the set of paths.
    assert_eq!(meta.walk().unwrap().len(), expected.len());
    // This crate's reader sees exactly the merged tree...
    let blobs: Vec<File> = img
        .blob_paths(&out)
        .iter()
        .map(|p| File::open(p).unwrap())
        .collect();
    let read_back = common::image_manifest(&meta, &blobs);
    let diffs = compare_entries(&expected, &read_back);
    assert!(
        diffs.is_empty(),
        "image read back by lazypull-erofs differs from the merged layers:\n{}",
        format_differences(&diffs, 50)
    );

    // ... and so does the kernel.
    let mnt = tmp.path().join("mnt");
    let guard = mount(&img, &out, &mnt);
    let got = scan(&mnt).unwrap();
    let diffs = compare_entries(&expected, &got);
    assert!(
        diffs.is_empty(),
        "mounted image differs from the merged layers (A = expected, B = mounted):\n{}",
        format_differences(&diffs, 50)
    );
    check_dir_nlinks(&mnt);

    // The comparison is not vacuous: layer 1 alone differs from the mount,
    // exactly at the overridden paths.
    let only_l1 = compare_entries(&scan(&l1).unwrap(), &got);
    let changed: Vec<String> = only_l1
        .iter()
        .map(|d| match d {
            lazypull_testkit::Difference::OnlyInA(l) | lazypull_testkit::Difference::OnlyInB(l) => {
                l.split('\t').next().unwrap().to_string()
            }
            lazypull_testkit::Difference::Differs { path, .. } => path.clone(),
        })
        .collect();
    for p in [
        ".",
        "chunky-l2",
        "mid/b4096",
        "links",
        "links/rel",
        "empty-file",
        "hard/h2",
        "xattrs/dir",
    ] {
        assert!(
            changed.iter().any(|c| c == p),
            "{p} should differ: {changed:?}"
        );
    }
    drop(guard);
}

#[test]
fn huge_sparse_file_round_trip() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (l1, out) = (tmp.path().join("l1"), tmp.path().join("out"));
    let seed = 7;
    maketree::make_tree(
        &l1,
        &TreeOptions {
            seed,
            with_huge: true,
        },
    )
    .unwrap();
    let img = build_from_layers(std::slice::from_ref(&l1), &out, &BuildOptions::default()).unwrap();
    // Only the written 1 MiB chunks are stored: the image is small.
    let blob_bytes: u64 = img.blobs.iter().map(|b| b.size).sum();
    assert!(blob_bytes < 64 << 20, "blobs hold {blob_bytes} bytes");

    let mnt = tmp.path().join("mnt");
    let guard = mount(&img, &out, &mnt);
    let huge = mnt.join(maketree::HUGE_PATH);
    assert_eq!(fs::metadata(&huge).unwrap().len(), maketree::HUGE_SIZE);
    let f = File::open(&huge).unwrap();
    let read = |off: u64, len: usize| {
        let mut buf = vec![0xAAu8; len];
        f.read_exact_at(&mut buf, off).unwrap();
        buf
    };
    for (off, len) in maketree::HUGE_RANGES {
        let want = maketree::huge_range_data(seed, off, len);
        assert_eq!(read(off, len as usize), want, "data at {off}");
        // With the surrounding hole bytes.
        let around = read(off.saturating_sub(10), len as usize + 10);
        assert!(around[..(off.min(10)) as usize].iter().all(|&b| b == 0));
    }
    for off in [1u64 << 20, 2 << 30, (4 << 30) + (1 << 20), (5 << 30) - 8192] {
        assert!(read(off, 8192).iter().all(|&b| b == 0), "hole at {off}");
    }
    // Reads across the 4 GiB boundary and up to EOF.
    let cross = read((4 << 30) - 60, 120);
    assert!(cross[..10].iter().all(|&b| b == 0));
    assert_eq!(
        &cross[10..110],
        &maketree::huge_range_data(seed, (4 << 30) - 50, 100)[..]
    );
    assert!(cross[110..].iter().all(|&b| b == 0));
    let mut tail = vec![0u8; 10_000];
    let n = f.read_at(&mut tail, maketree::HUGE_SIZE - 100).unwrap();
    assert_eq!(n, 100);

    // Everything else in the tree, without hashing the 5 GiB file: compare
    // with hashing off, then hash all other regular files.
    let quick = ScanOptions {
        hash: false,
        threads: 0,
    };
    let diffs = compare_entries(
        &scan_with(&l1, &quick).unwrap(),
        &scan_with(&mnt, &quick).unwrap(),
    );
    assert!(diffs.is_empty(), "{}", format_differences(&diffs, 50));
    for e in scan_with(&l1, &quick).unwrap() {
        if e.kind == lazypull_testkit::Kind::File && e.path != maketree::HUGE_PATH.as_bytes() {
            let rel = std::ffi::OsStr::from_bytes(&e.path);
            let size = e.size.unwrap();
            let a = lazypull_testkit::manifest::hash_file(&l1.join(rel), size).unwrap();
            let b = lazypull_testkit::manifest::hash_file(&mnt.join(rel), size).unwrap();
            assert_eq!(a, b, "{}", String::from_utf8_lossy(&e.path));
        }
    }
    drop(guard);
}

/// A meta blob with lazypull's blob trailer after the EROFS image (see
/// `lazypull_erofs::trailer`): the kernel reads only blocks the image addresses
/// and fsck.erofs accepts the trailing bytes, so both see exactly the tree of
/// the image without it; this crate's reader finds the trailer again.
#[test]
fn a_blob_trailer_is_invisible_to_the_kernel_and_to_fsck() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    maketree::make_tree(
        &src,
        &TreeOptions {
            seed: 3,
            with_huge: false,
        },
    )
    .unwrap();
    let img =
        build_from_layers(std::slice::from_ref(&src), &out, &BuildOptions::default()).unwrap();
    let entries = img
        .blobs
        .iter()
        .enumerate()
        .map(|(i, b)| lazypull_erofs::TrailerEntry {
            blob: hex::decode(&b.digest).unwrap().try_into().unwrap(),
            table: (i % 2 == 0).then_some(lazypull_erofs::TableRef {
                sha256: [7 + i as u8; 32],
                size: 1000 + i as u64,
            }),
        })
        .collect();
    let trailer = lazypull_erofs::Trailer { entries };
    let sealed = lazypull_erofs::seal_output(&out, &img, &trailer).unwrap();
    assert_ne!(sealed.meta_digest, img.meta_digest);
    assert!(
        !img.meta_path(&out).exists(),
        "the unsealed meta blob is gone"
    );
    let bytes = fs::read(sealed.meta_path(&out)).unwrap();
    assert_eq!(bytes.len() as u64, sealed.meta_size);
    assert_eq!(
        sealed.meta_size % 4096,
        0,
        "still whole blocks (cachefiles writes them)"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["meta"], sealed.meta_digest.as_str());
    let meta = Image::from_bytes(bytes).unwrap();
    assert!(meta.image_len() < sealed.meta_size);
    assert_eq!(meta.trailer().unwrap(), Some(trailer.clone()));
    assert!(
        lazypull_erofs::seal_output(&out, &sealed, &trailer).is_err(),
        "a meta blob is sealed once"
    );

    fsck(&sealed, &out);
    let mnt = tmp.path().join("mnt");
    let _guard = mount(&sealed, &out, &mnt);
    let diffs = compare_entries(&scan(&src).unwrap(), &scan(&mnt).unwrap());
    assert!(
        diffs.is_empty(),
        "the mounted image with a trailer differs from its source:\n{}",
        format_differences(&diffs, 50)
    );
}
