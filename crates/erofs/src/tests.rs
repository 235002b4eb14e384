//! Builder + reader tests (no root or kernel needed; see `tests/mount.rs`
//! for the kernel round trip).

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::layout::{self, DataLayout, FileType, InodeVersion};
use crate::tree::{Meta, Node, NodeKind, Tree};
use crate::{
    build_from_layers, BuildError, BuildOptions, BuiltImage, ChunkEntry, Image, Inode, Manifest,
    ReadError,
};

fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    fs::write(path, data).unwrap();
}

fn set_mtime(path: &Path, sec: i64, nsec: u32) {
    let ts = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: i64::from(nsec),
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn pseudo(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Built {
    out: TempDir,
    info: BuiltImage,
    img: Image,
}

impl Built {
    fn blobs(&self) -> Vec<File> {
        self.info
            .blob_paths(self.out.path())
            .iter()
            .map(|p| File::open(p).unwrap())
            .collect()
    }

    fn entries(&self) -> HashMap<String, Arc<Inode>> {
        self.img
            .walk()
            .unwrap()
            .into_iter()
            .map(|e| (String::from_utf8(e.path).unwrap(), e.inode))
            .collect()
    }

    fn content(&self, inode: &Inode) -> Vec<u8> {
        let blobs = self.blobs();
        let mut buf = vec![0u8; inode.size as usize];
        let n = self.img.read_file_at(inode, &blobs, 0, &mut buf).unwrap();
        assert_eq!(n as u64, inode.size);
        buf
    }
}

fn build(layers: &[&Path], opts: &BuildOptions) -> Built {
    let out = tempfile::tempdir().unwrap();
    let layers: Vec<PathBuf> = layers.iter().map(|p| p.to_path_buf()).collect();
    let info = build_from_layers(&layers, out.path(), opts).unwrap();
    let meta = fs::read(info.meta_path(out.path())).unwrap();
    let img = Image::from_bytes(meta).unwrap();
    Built { out, info, img }
}

/// 4 KiB chunks, zero chunks as holes (the tests below check hole handling;
/// `zero_chunks_point_at_one_stored_chunk_by_default` checks the default).
fn small_chunks() -> BuildOptions {
    BuildOptions {
        chunk_size: 4096,
        build_time: None,
        sparse_holes: true,
        ..BuildOptions::default()
    }
}

#[test]
fn single_layer_reads_back() {
    let l = tempfile::tempdir().unwrap();
    let r = l.path();
    write(&r.join("a.txt"), b"hello");
    let big = pseudo(1, 10_000);
    write(&r.join("sub/b"), &big);
    fs::hard_link(r.join("sub/b"), r.join("c")).unwrap();
    std::os::unix::fs::symlink("a.txt", r.join("link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        r.join("sub/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    fs::create_dir(r.join("empty")).unwrap();
    write(&r.join("empty-file"), b"");
    rustix::fs::lsetxattr(
        r.join("a.txt"),
        "user.test",
        b"value",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::set_permissions(r.join("a.txt"), fs::Permissions::from_mode(0o4711)).unwrap();
    for p in [
        "a.txt",
        "sub/b",
        "link",
        "sub/fifo",
        "empty",
        "empty-file",
        "sub",
        "",
    ] {
        set_mtime(&r.join(p), 1_600_000_000, 0);
    }
    set_mtime(&r.join("a.txt"), 1_500_000_000, 42);

    let b = build(&[r], &small_chunks());
    let e = b.entries();
    let mut names: Vec<&str> = e.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "",
            "a.txt",
            "c",
            "empty",
            "empty-file",
            "link",
            "sub",
            "sub/b",
            "sub/fifo"
        ]
    );
    assert_eq!(b.info.inodes, 8);
    assert_eq!(b.info.files, 3);
    assert_eq!(b.info.bytes, 10_005);
    assert_eq!(b.info.build_time, (1_600_000_000, 0));

    let a = &e["a.txt"];
    assert_eq!(a.file_type, FileType::Regular);
    assert_eq!(a.mode, 0o104711);
    assert_eq!((a.mtime, a.mtime_nsec), (1_500_000_000, 42));
    assert_eq!(
        a.version,
        InodeVersion::Extended,
        "mtime differs from build time"
    );
    assert_eq!(a.xattrs.len(), 1);
    assert_eq!(a.xattrs[0].name, b"user.test");
    assert_eq!(a.xattrs[0].value, b"value");
    assert_eq!(b.content(a), b"hello");

    let sb = &e["sub/b"];
    assert_eq!(sb.nid, e["c"].nid, "hard links share an inode");
    assert_eq!(sb.nlink, 2);
    assert_eq!(sb.version, InodeVersion::Compact);
    assert_eq!(sb.layout, DataLayout::ChunkBased);
    assert_eq!(sb.chunks.as_ref().unwrap().entries.len(), 3);
    assert_eq!(b.content(sb), big);
    let mut part = [0u8; 100];
    assert_eq!(
        b.img.read_file_at(sb, &b.blobs(), 4090, &mut part).unwrap(),
        100
    );
    assert_eq!(&part[..], &big[4090..4190]);
    assert_eq!(
        b.img
            .read_file_at(sb, &b.blobs(), 9_990, &mut part)
            .unwrap(),
        10
    );

    let link = &e["link"];
    assert_eq!(link.file_type, FileType::Symlink);
    assert_eq!(link.symlink_target.as_deref(), Some(&b"a.txt"[..]));
    assert_eq!(link.size, 5);
    assert_eq!(e["sub/fifo"].file_type, FileType::Fifo);
    assert_eq!(e["sub/fifo"].mode, 0o10640);
    let ef = &e["empty-file"];
    assert_eq!((ef.size, ef.layout), (0, DataLayout::FlatPlain));
    assert!(ef.chunks.is_none());
    assert_eq!(e[""].nlink, 4, "root: 2 + sub + empty");
    assert_eq!(e["sub"].nlink, 2);
    let root_md = fs::metadata(r).unwrap();
    assert_eq!(e[""].mode & 0o7777, root_md.mode() & 0o7777);

    let sbk = b.img.superblock();
    assert_eq!(sbk.feature_compat, layout::FEATURE_COMPAT_SB_CHKSUM);
    assert_eq!(
        sbk.feature_incompat,
        layout::FEATURE_INCOMPAT_CHUNKED_FILE | layout::FEATURE_INCOMPAT_DEVICE_TABLE
    );
    assert_eq!(b.img.devices().len(), 1);
    assert_eq!(
        b.img.devices()[0].tag_bytes(),
        b.info.blobs[0].digest.as_bytes()
    );
    assert_eq!(
        u64::from(b.img.devices()[0].blocks) * 4096,
        b.info.blobs[0].size
    );
    assert_eq!(b.img.lookup(b"sub/b").unwrap().nid, sb.nid);
    assert!(matches!(
        b.img.lookup(b"sub/nope"),
        Err(ReadError::NotFound(_))
    ));
}

#[test]
fn layers_merge() {
    let l1 = tempfile::tempdir().unwrap();
    let l2 = tempfile::tempdir().unwrap();
    let (a, b) = (l1.path(), l2.path());
    write(&a.join("d/x"), b"x1");
    write(&a.join("d/y"), b"y1");
    fs::set_permissions(a.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
    write(&a.join("f"), b"file in l1");
    write(&a.join("g/z"), b"z1");
    write(&a.join("h1"), b"linked");
    fs::hard_link(a.join("h1"), a.join("h2")).unwrap();
    write(&a.join("keep"), b"keep");

    write(&b.join("d/y"), b"y2");
    write(&b.join("d/w"), b"w2");
    fs::set_permissions(b.join("d"), fs::Permissions::from_mode(0o751)).unwrap();
    write(&b.join("f/inner"), b"now a dir");
    write(&b.join("g"), b"now a file");
    write(&b.join("h2"), b"replaced");

    let bi = build(&[a, b], &small_chunks());
    let e = bi.entries();
    let mut names: Vec<&str> = e.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        ["", "d", "d/w", "d/x", "d/y", "f", "f/inner", "g", "h1", "h2", "keep"]
    );
    assert_eq!(
        e["d"].mode & 0o7777,
        0o751,
        "later directory's attributes win"
    );
    assert_eq!(bi.content(&e["d/x"]), b"x1");
    assert_eq!(bi.content(&e["d/y"]), b"y2");
    assert_eq!(e["f"].file_type, FileType::Directory);
    assert_eq!(bi.content(&e["g"]), b"now a file");
    assert_eq!(e["h1"].nlink, 1, "the other link was replaced");
    assert_ne!(e["h1"].nid, e["h2"].nid);
    assert_eq!(bi.content(&e["h2"]), b"replaced");
    assert_eq!(bi.content(&e["keep"]), b"keep");
    // Both layers stored chunks (layer blobs include every file of the
    // layer, even ones hidden later: "f" and "g/z" of layer 1).
    assert_eq!(bi.info.blobs.len(), 2);
    assert_eq!(bi.info.blobs[0].chunks, 6);
}

#[test]
fn dedup_holes_and_blob_per_layer() {
    let c1 = pseudo(11, 4096);
    let c2 = pseudo(12, 4096);
    let l1 = tempfile::tempdir().unwrap();
    write(
        &l1.path().join("abc"),
        &[&c1[..], &c2[..], &c1[..], b"tail"].concat(),
    );
    write(&l1.path().join("zeros"), &vec![0u8; 3 * 4096 + 5]);
    let f = File::create(l1.path().join("sparse")).unwrap();
    f.set_len(10 * 4096).unwrap();
    f.write_all_at(&c2, 5 * 4096).unwrap();
    drop(f);
    // Layer 2: only duplicates -> no blob.
    let l2 = tempfile::tempdir().unwrap();
    write(&l2.path().join("dup"), &c2);
    // Layer 3: no regular-file data at all -> no blob.
    let l3 = tempfile::tempdir().unwrap();
    fs::create_dir(l3.path().join("dir")).unwrap();
    std::os::unix::fs::symlink("x", l3.path().join("sym")).unwrap();
    write(&l3.path().join("empty"), b"");
    // Layer 4: one new chunk and one duplicate of layer 1.
    let l4 = tempfile::tempdir().unwrap();
    write(&l4.path().join("new"), &[&c1[..], b"new!"].concat());

    let b = build(
        &[l1.path(), l2.path(), l3.path(), l4.path()],
        &small_chunks(),
    );
    assert_eq!(b.info.blobs.len(), 2);
    assert_eq!(
        b.info.blobs[0].chunks, 3,
        "c1, c2, 'tail' (zeros are holes)"
    );
    assert_eq!(b.info.blobs[0].size, 3 * 4096);
    assert_eq!(b.info.blobs[1].chunks, 1);
    assert_eq!(b.info.blobs[1].size, 4096);
    assert_eq!(b.info.chunks_stored, 4);
    assert_eq!(b.info.chunks_deduplicated, 4);
    assert_eq!(b.info.chunks_holes, 4 + 9);
    for blob in &b.info.blobs {
        let data = fs::read(b.out.path().join(&blob.digest)).unwrap();
        assert_eq!(data.len() as u64, blob.size);
        assert_eq!(hex::encode(Sha256::digest(&data)), blob.digest);
    }
    let e = b.entries();
    let abc = e["abc"].chunks.clone().unwrap().entries;
    assert_eq!(abc.len(), 4);
    assert_eq!(
        abc[0],
        ChunkEntry::Mapped {
            device_id: 1,
            blkaddr: 0
        }
    );
    assert_eq!(
        abc[1],
        ChunkEntry::Mapped {
            device_id: 1,
            blkaddr: 1
        }
    );
    assert_eq!(abc[2], abc[0]);
    assert_eq!(
        abc[3],
        ChunkEntry::Mapped {
            device_id: 1,
            blkaddr: 2
        }
    );
    let zeros = e["zeros"].chunks.clone().unwrap().entries;
    assert_eq!(
        zeros,
        [ChunkEntry::Hole; 4],
        "a short all-zero tail is a hole too"
    );
    let sparse = e["sparse"].chunks.clone().unwrap().entries;
    assert_eq!(sparse.iter().filter(|c| **c == ChunkEntry::Hole).count(), 9);
    assert_eq!(sparse[5], abc[1]);
    assert_eq!(e["dup"].chunks.clone().unwrap().entries, vec![abc[1]]);
    let new = e["new"].chunks.clone().unwrap().entries;
    assert_eq!(
        new,
        vec![
            abc[0],
            ChunkEntry::Mapped {
                device_id: 2,
                blkaddr: 0
            }
        ]
    );
    assert_eq!(b.content(&e["new"]), [&c1[..], b"new!"].concat());
    assert_eq!(b.content(&e["zeros"]), vec![0u8; 3 * 4096 + 5]);
    let mut want = vec![0u8; 10 * 4096];
    want[5 * 4096..6 * 4096].copy_from_slice(&c2);
    assert_eq!(b.content(&e["sparse"]), want);
}

#[test]
fn deterministic_and_first_layer_blob_shared() {
    let l1 = tempfile::tempdir().unwrap();
    let l2 = tempfile::tempdir().unwrap();
    let l3 = tempfile::tempdir().unwrap();
    write(&l1.path().join("base/lib"), &pseudo(1, 50_000));
    write(&l1.path().join("base/etc"), b"config");
    write(&l2.path().join("app"), &pseudo(2, 9000));
    write(&l3.path().join("other"), &pseudo(3, 7000));
    let x = build(&[l1.path(), l2.path()], &small_chunks());
    let y = build(&[l1.path(), l2.path()], &small_chunks());
    let z = build(&[l1.path(), l3.path()], &small_chunks());
    assert_eq!(x.info.meta_digest, y.info.meta_digest);
    assert_eq!(x.img.data(), y.img.data());
    assert_eq!(x.info.blobs, y.info.blobs);
    for blob in &x.info.blobs {
        assert_eq!(
            fs::read(x.out.path().join(&blob.digest)).unwrap(),
            fs::read(y.out.path().join(&blob.digest)).unwrap()
        );
    }
    assert_eq!(x.info.blobs[0], z.info.blobs[0], "shared first layer blob");
    assert_ne!(x.info.blobs[1], z.info.blobs[1]);
    assert_ne!(x.info.meta_digest, z.info.meta_digest);
    assert_ne!(x.img.superblock().uuid, z.img.superblock().uuid);

    // manifest.json, and nothing else but the blobs.
    let m: Manifest = serde_json::from_slice(&fs::read(&x.info.manifest_path).unwrap()).unwrap();
    assert_eq!(m.meta, x.info.meta_digest);
    assert_eq!(m.chunk_size, 4096);
    assert_eq!(
        m.blobs,
        x.info
            .blobs
            .iter()
            .map(|b| b.digest.clone())
            .collect::<Vec<_>>()
    );
    let mut files: Vec<String> = fs::read_dir(x.out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut want = vec![x.info.meta_digest.clone(), "manifest.json".to_string()];
    want.extend(m.blobs.iter().cloned());
    want.sort();
    assert_eq!(files, want);
    for f in files.iter().filter(|f| f.len() == 64) {
        let data = fs::read(x.out.path().join(f)).unwrap();
        assert_eq!(&hex::encode(Sha256::digest(&data)), f);
    }
}

#[test]
fn chunks_larger_than_the_read_buffer() {
    // 4 MiB chunks take the streaming path (speculative write + rollback).
    let x = pseudo(5, 4 << 20);
    let l = tempfile::tempdir().unwrap();
    let content = [&x[..], &x[..], &vec![0u8; 4 << 20][..], b"tail"].concat();
    write(&l.path().join("big"), &content);
    write(&l.path().join("copy"), &x);
    let b = build(
        &[l.path()],
        &BuildOptions {
            chunk_size: 4 << 20,
            build_time: Some(7),
            sparse_holes: true,
            ..BuildOptions::default()
        },
    );
    assert_eq!(b.info.blobs.len(), 1);
    assert_eq!(b.info.blobs[0].chunks, 2);
    assert_eq!(b.info.blobs[0].size, (4 << 20) + 4096);
    assert_eq!(b.info.build_time, (7, 0));
    let e = b.entries();
    let map = e["big"].chunks.clone().unwrap();
    assert_eq!(map.chunk_size, 4 << 20);
    assert_eq!(map.entries[0], map.entries[1]);
    assert_eq!(map.entries[2], ChunkEntry::Hole);
    assert_eq!(
        e["copy"].chunks.clone().unwrap().entries,
        vec![map.entries[0]]
    );
    assert_eq!(b.content(&e["big"]), content);
    let blob = fs::read(b.out.path().join(&b.info.blobs[0].digest)).unwrap();
    assert_eq!(&blob[..4 << 20], &x[..]);
    assert_eq!(&blob[4 << 20..(4 << 20) + 4], b"tail");
    assert!(blob[(4 << 20) + 4..].iter().all(|&c| c == 0));
}

#[test]
fn inode_forms_and_huge_sparse_file() {
    let l = tempfile::tempdir().unwrap();
    let r = l.path();
    write(&r.join("plain"), b"p");
    let f = File::create(r.join("huge")).unwrap();
    f.set_len((5 << 30) + 3).unwrap();
    f.write_all_at(b"end", 5 << 30).unwrap();
    f.write_all_at(b"mid", (4 << 30) - 1).unwrap();
    drop(f);
    write(&r.join("owned"), b"o");
    std::os::unix::fs::chown(r.join("owned"), Some(70_000), Some(1)).unwrap_or(());
    for p in ["plain", "huge", "owned", ""] {
        set_mtime(&r.join(p), 1000, 5);
    }
    let b = build(
        &[r],
        &BuildOptions {
            sparse_holes: true,
            ..BuildOptions::default()
        },
    );
    let e = b.entries();
    assert_eq!(e["plain"].version, InodeVersion::Compact);
    assert_eq!((e["plain"].mtime, e["plain"].mtime_nsec), (1000, 5));
    let h = &e["huge"];
    assert_eq!(h.version, InodeVersion::Extended, "size >= 4 GiB");
    assert_eq!(h.size, (5 << 30) + 3);
    let map = h.chunks.clone().unwrap();
    assert_eq!(map.entries.len(), 5121);
    let mapped: Vec<usize> = map
        .entries
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != ChunkEntry::Hole)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(mapped, vec![4095, 4096, 5120]);
    let blobs = b.blobs();
    let mut buf = [0u8; 8];
    assert_eq!(
        b.img
            .read_file_at(h, &blobs, (4 << 30) - 3, &mut buf)
            .unwrap(),
        8
    );
    assert_eq!(&buf, b"\0\0mid\0\0\0");
    assert_eq!(
        b.img
            .read_file_at(h, &blobs, (5 << 30) - 2, &mut buf)
            .unwrap(),
        5
    );
    assert_eq!(&buf[..5], b"\0\0end");
    // Two full 1 MiB chunks around 4 GiB, plus "end", "p" and "o" padded.
    assert_eq!(b.info.blobs[0].size, (2 << 20) + 3 * 4096);
    if fs::metadata(r.join("owned")).unwrap().uid() == 70_000 {
        assert_eq!(e["owned"].version, InodeVersion::Extended);
        assert_eq!(e["owned"].uid, 70_000);
    }
}

#[test]
fn directory_layouts() {
    let l = tempfile::tempdir().unwrap();
    let r = l.path();
    // Exactly one full block of dirents: must be FLAT_PLAIN.
    for i in 0..15u8 {
        let name = format!("{}{}", (b'a' + i) as char, "x".repeat(254));
        write(&r.join("full").join(name), b"");
    }
    write(&r.join("full").join(format!("z{}", "y".repeat(51))), b"");
    // Several blocks with a small tail: FLAT_INLINE.
    for i in 0..200 {
        write(
            &r.join("many")
                .join(format!("entry-{i:04}-{}", "n".repeat(i % 90))),
            b"",
        );
    }
    // Names sorting before and after "." and "..".
    for n in ["!", "-", ".-", "..a", "0", "~"] {
        write(&r.join("dots").join(n), n.as_bytes());
    }
    let b = build(&[r], &small_chunks());
    let full = b.img.lookup(b"full").unwrap();
    assert_eq!(full.size, 4096);
    assert_eq!(full.layout, DataLayout::FlatPlain);
    assert_eq!(b.img.read_dir(&full).unwrap().len(), 18);
    let many = b.img.lookup(b"many").unwrap();
    assert!(many.size > 3 * 4096);
    assert_eq!(many.layout, DataLayout::FlatInline);
    let names: Vec<Vec<u8>> = b
        .img
        .read_dir(&many)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 202);
    assert!(names.windows(2).all(|w| w[0] < w[1]));
    let dots = b.img.lookup(b"dots").unwrap();
    let names: Vec<String> = b
        .img
        .read_dir(&dots)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect();
    assert_eq!(names, ["!", "-", ".", ".-", "..", "..a", "0", "~"]);
    assert_eq!(b.content(&b.img.lookup(b"dots/..a").unwrap()), b"..a");
}

#[test]
fn option_and_input_errors() {
    let l = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let layers = vec![l.path().to_path_buf()];
    for cs in [0u32, 1000, 2048, 3 * 4096, 1 << 31 | 1] {
        let r = build_from_layers(
            &layers,
            out.path(),
            &BuildOptions {
                chunk_size: cs,
                ..BuildOptions::default()
            },
        );
        assert!(matches!(r, Err(BuildError::InvalidChunkSize(_))), "{cs}");
    }
    assert!(matches!(
        build_from_layers(&[], out.path(), &BuildOptions::default()),
        Err(BuildError::NoLayers)
    ));
    write(&l.path().join("file"), b"x");
    assert!(matches!(
        build_from_layers(
            &[l.path().join("file")],
            out.path(),
            &BuildOptions::default()
        ),
        Err(BuildError::NotADirectory(_))
    ));
    assert!(matches!(
        build_from_layers(
            &[l.path().join("missing")],
            out.path(),
            &BuildOptions::default()
        ),
        Err(BuildError::Io { .. })
    ));
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn unindexable_xattr_is_an_error_naming_the_file() {
    let mut tree = Tree::new();
    let id = tree.nodes.len();
    tree.nodes.push(Node {
        meta: Meta {
            perm: 0o644,
            xattrs: vec![(b"system.nfs4_acl".to_vec(), b"x".to_vec())],
            ..Meta::default()
        },
        kind: NodeKind::Fifo,
        source: PathBuf::from("/layer/some/fifo"),
    });
    if let NodeKind::Dir { children } = &mut tree.nodes[0].kind {
        children.insert(b"fifo".to_vec(), id);
    }
    let err = crate::meta::build_meta(&tree, &[], &[], 4096, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BuildError::UnsupportedXattr { .. }));
    assert!(
        msg.contains("/layer/some/fifo") && msg.contains("system.nfs4_acl"),
        "{msg}"
    );
}

fn fixture() -> &'static Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| {
        let l = tempfile::tempdir().unwrap();
        let r = l.path();
        write(&r.join("a/b/c"), &pseudo(9, 5000));
        write(&r.join("a/d"), b"dd");
        std::os::unix::fs::symlink("a/d", r.join("s")).unwrap();
        fs::hard_link(r.join("a/d"), r.join("e")).unwrap();
        rustix::fs::lsetxattr(
            r.join("a/d"),
            "user.k",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        for i in 0..40 {
            write(
                &r.join("m").join(format!("n{i:03}-{}", "q".repeat(i * 3))),
                b"",
            );
        }
        build(&[r], &small_chunks()).img.data().to_vec()
    })
}

fn fix_checksum(data: &mut [u8]) {
    if data.len() >= 4096 {
        let c = layout::superblock_checksum(data, 12).unwrap();
        data[1028..1032].copy_from_slice(&c.to_le_bytes());
    }
}

/// Exercise everything the reader offers; errors are fine, panics are not.
fn exercise(data: Vec<u8>) {
    let Ok(img) = Image::from_bytes(data) else {
        return;
    };
    let no_blobs: [File; 0] = [];
    if let Ok(entries) = img.walk() {
        for e in entries {
            let mut buf = [0u8; 64];
            let _ = img.read_file_at(&e.inode, &no_blobs, 0, &mut buf);
            let _ = img.read_file_at(
                &e.inode,
                &no_blobs,
                e.inode.size.saturating_sub(3),
                &mut buf,
            );
            if let Some(m) = &e.inode.chunks {
                let _ = m.locate(u64::MAX);
            }
        }
    }
    let _ = img.lookup(b"a/b/c");
    for nid in 0..64 {
        if let Ok(i) = img.inode(nid) {
            let _ = img.read_dir(&i);
            let _ = img.flat_data(&i);
        }
    }
}

#[test]
fn reader_rejects_malformed_superblocks() {
    let good = fixture().clone();
    exercise(good.clone());
    assert!(
        Image::from_bytes(good.clone())
            .unwrap()
            .walk()
            .unwrap()
            .len()
            > 40
    );

    assert!(matches!(
        Image::from_bytes(good[..4095].to_vec()),
        Err(ReadError::TooSmall(4095))
    ));
    let mut d = good.clone();
    d[1024] ^= 1;
    assert!(matches!(Image::from_bytes(d), Err(ReadError::BadMagic(_))));
    let mut d = good.clone();
    d[3000] ^= 0x40;
    assert!(matches!(
        Image::from_bytes(d),
        Err(ReadError::BadChecksum { .. })
    ));
    let mut d = good.clone();
    d[1024 + 12] = 9;
    fix_checksum(&mut d);
    assert!(matches!(
        Image::from_bytes(d),
        Err(ReadError::UnsupportedBlockSize(9))
    ));
    let mut d = good.clone();
    d[1024 + 80] |= 0x10; // ZTAILPACKING
    fix_checksum(&mut d);
    assert!(matches!(
        Image::from_bytes(d),
        Err(ReadError::UnsupportedFeatures(0x10))
    ));
    let mut d = good.clone();
    d[1024 + 36..1024 + 40].copy_from_slice(&1000u32.to_le_bytes());
    fix_checksum(&mut d);
    assert!(matches!(Image::from_bytes(d), Err(ReadError::Corrupt(_))));
    let mut d = good.clone();
    d[1024 + 14..1024 + 16].copy_from_slice(&0xFFFFu16.to_le_bytes());
    fix_checksum(&mut d);
    assert!(Image::from_bytes(d).is_err());
    // Shuffled dirent order is caught.
    let img = Image::from_bytes(good.clone()).unwrap();
    let m = img.lookup(b"m").unwrap();
    let mut d = good.clone();
    let dir_off = if m.layout == DataLayout::FlatPlain || m.size > 4096 {
        m.raw_blkaddr as usize * 4096
    } else {
        m.inline_offset as usize
    };
    // Swap the nids of "." and the first file: names stay sorted, but the
    // walk must notice "." pointing elsewhere.
    let (x, y) = (dir_off, dir_off + 2 * 12);
    let tmp: Vec<u8> = d[x..x + 8].to_vec();
    d.copy_within(y..y + 8, x);
    d[y..y + 8].copy_from_slice(&tmp);
    fix_checksum(&mut d);
    if let Ok(img) = Image::from_bytes(d) {
        assert!(img.walk().is_err(), "swapped . / .. nids must be detected");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn reader_never_panics_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..20_000)) {
        exercise(data.clone());
        // Same bytes with a valid magic and checksum, to get further in.
        let mut d = data;
        if d.len() >= 4096 {
            d[1024..1028].copy_from_slice(&layout::SUPER_MAGIC.to_le_bytes());
            d[1024 + 12] = 12;
            fix_checksum(&mut d);
            exercise(d);
        }
    }

    #[test]
    fn reader_never_panics_on_mutated_images(
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..24),
        truncate in proptest::option::of(any::<proptest::sample::Index>()),
    ) {
        let mut d = fixture().clone();
        for (idx, byte) in edits {
            let i = idx.index(d.len());
            d[i] = byte;
        }
        if let Some(t) = truncate {
            let n = t.index(d.len());
            d.truncate(n.max(4096));
        }
        fix_checksum(&mut d);
        exercise(d);
    }
}

#[test]
fn zero_chunks_point_at_one_stored_chunk_by_default() {
    // Linux 6.12's fscache path zero-fills the rest of a read after a hole chunk,
    // so by default no chunk index may be a hole.
    let l = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let content = [&data[..], &[0u8; 8192][..], &data[..], &[0u8; 100][..]].concat();
    write(&l.path().join("mixed"), &content);
    let f = File::create(l.path().join("sparse")).unwrap();
    f.set_len(5 * 4096).unwrap();
    drop(f);
    let opts = BuildOptions {
        chunk_size: 4096,
        ..BuildOptions::default()
    };
    let b = build(&[l.path()], &opts);
    assert_eq!(b.info.chunks_holes, 0);
    let e = b.entries();
    let mixed = e["mixed"].chunks.clone().unwrap().entries;
    let sparse = e["sparse"].chunks.clone().unwrap().entries;
    assert!(mixed.iter().chain(&sparse).all(|c| *c != ChunkEntry::Hole));
    let zero = mixed[1];
    assert_eq!([mixed[2], mixed[4]], [zero, zero], "short zero tail too");
    assert!(sparse.iter().all(|c| *c == zero));
    assert_eq!(mixed[3], mixed[0], "data deduplicated");
    // One data chunk + one zero chunk stored.
    assert_eq!(b.info.blobs[0].chunks, 2);
    assert_eq!(b.content(&e["mixed"]), content);
    assert_eq!(b.content(&e["sparse"]), vec![0u8; 5 * 4096]);
}

#[test]
fn progress_reports_every_byte_of_file_data() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Seen {
        stages: Mutex<Vec<crate::Stage>>,
        bytes: AtomicU64,
    }
    impl crate::BuildProgress for Seen {
        fn stage(&self, stage: crate::Stage) {
            self.stages.lock().unwrap().push(stage);
        }
        fn advance(&self, bytes: u64) {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
    let l = tempfile::tempdir().unwrap();
    write(&l.path().join("a"), &[1u8; 10_000]);
    write(&l.path().join("b"), b"bb");
    let seen = Arc::new(Seen::default());
    let opts = BuildOptions {
        progress: crate::Progress::new(seen.clone()),
        ..BuildOptions::default()
    };
    build(&[l.path()], &opts);
    assert_eq!(seen.bytes.load(Ordering::Relaxed), 10_002);
    assert_eq!(
        *seen.stages.lock().unwrap(),
        [
            crate::Stage::Chunking {
                files: 2,
                bytes: 10_002
            },
            crate::Stage::Meta
        ]
    );
}

#[test]
fn extents_cover_exactly_the_stored_bytes_of_a_file() {
    let src = tempfile::tempdir().unwrap();
    let mut data = pseudo(7, 5 * 4096 + 100);
    data[4096..8192].fill(0); // a hole with sparse_holes
    write(&src.path().join("f"), &data);
    write(&src.path().join("g"), &pseudo(8, 3 * 4096));
    let b = build(&[src.path()], &small_chunks());
    let entries = b.entries();
    let blobs = b.blobs();
    for name in ["f", "g"] {
        let inode = &entries[name];
        let map = inode.chunks.as_ref().expect("chunk-based");
        let extents = map.extents(inode.size).unwrap();
        let mut rebuilt = vec![0u8; inode.size as usize];
        let mut pos = 0u64;
        for (i, e) in map.entries.iter().enumerate() {
            let start = i as u64 * map.chunk_size;
            if let ChunkEntry::Mapped { .. } = e {
                let (dev, off) = map.locate(start).unwrap();
                let len = map.chunk_size.min(inode.size - start);
                // Each mapped chunk lies inside one extent of its device.
                assert!(extents.iter().any(|x| x.device_id == dev
                    && x.offset <= off
                    && off + len <= x.offset + x.len));
                blobs[usize::from(dev) - 1]
                    .read_exact_at(&mut rebuilt[start as usize..(start + len) as usize], off)
                    .unwrap();
            }
            pos = start;
        }
        assert!(pos < inode.size);
        assert_eq!(rebuilt, b.content(inode), "{name}");
        let total: u64 = extents.iter().map(|x| x.len).sum();
        let holes = map
            .entries
            .iter()
            .filter(|e| **e == ChunkEntry::Hole)
            .count() as u64;
        assert_eq!(total, inode.size - holes * 4096, "{name}: {extents:?}");
    }
}

/// A chunk map whose addresses or sizes overflow u64 (only a crafted meta
/// blob, or a caller, can make one) is an error, not a panic or a wrapped
/// extent.
#[test]
fn extents_of_overflowing_chunk_maps_are_errors() {
    use crate::ChunkMap;
    let last_block = u64::MAX >> 12; // its byte offset is 2^64 - 4096
    let cases = [
        // The first chunk ends at 2^64 (merging the next one overflows).
        (
            ChunkMap {
                chunk_size: 4096,
                indexes: true,
                entries: vec![
                    ChunkEntry::Mapped {
                        device_id: 1,
                        blkaddr: last_block,
                    },
                    ChunkEntry::Mapped {
                        device_id: 1,
                        blkaddr: 0,
                    },
                ],
            },
            8192,
        ),
        // A block address whose byte offset is past 2^64 (was skipped).
        (
            ChunkMap {
                chunk_size: 4096,
                indexes: true,
                entries: vec![ChunkEntry::Mapped {
                    device_id: 1,
                    blkaddr: last_block + 1,
                }],
            },
            4096,
        ),
        // The third chunk starts at 2 * 2^63.
        (
            ChunkMap {
                chunk_size: 1 << 63,
                indexes: true,
                entries: vec![
                    ChunkEntry::Hole,
                    ChunkEntry::Hole,
                    ChunkEntry::Mapped {
                        device_id: 1,
                        blkaddr: 0,
                    },
                ],
            },
            u64::MAX,
        ),
    ];
    for (i, (map, size)) in cases.into_iter().enumerate() {
        let err = map.extents(size).unwrap_err();
        assert!(
            matches!(err, ReadError::Corrupt(_)) && err.to_string().contains("overflows 64 bits"),
            "case {i}: {err}"
        );
    }
}
