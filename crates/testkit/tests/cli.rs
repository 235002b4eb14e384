//! The library and the `lazypull-testkit` binary on real trees.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use lazypull_testkit::manifest::{hash_file, render, render_line};
use lazypull_testkit::{
    compare_dirs, compare_entries, make_tree, merge_layers, scan, Difference, Kind, TreeOptions,
};
use sha2::{Digest, Sha256};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazypull-testkit"))
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "make-tree needs root: run these tests as root"
    );
}

#[test]
fn scan_describes_entries() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    fs::write(r.join("abc"), b"abc").unwrap();
    fs::hard_link(r.join("abc"), r.join("zlink")).unwrap();
    std::os::unix::fs::symlink("abc", r.join("sym")).unwrap();
    fs::create_dir(r.join("sub")).unwrap();
    fs::write(r.join("sub/x y"), b"").unwrap();
    rustix::fs::lsetxattr(
        r.join("abc"),
        "user.b",
        b"\x01\x02",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        r.join("abc"),
        "user.a",
        b"",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let e = scan(r).unwrap();
    let paths: Vec<&[u8]> = e.iter().map(|e| e.path.as_slice()).collect();
    assert_eq!(
        paths,
        [&b"."[..], b"abc", b"sub", b"sub/x y", b"sym", b"zlink"]
    );
    let abc = &e[1];
    assert_eq!(abc.kind, Kind::File);
    assert_eq!(abc.size, Some(3));
    assert_eq!(
        hex::encode(abc.sha256.unwrap()),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        abc.xattrs,
        vec![
            (b"user.a".to_vec(), vec![]),
            (b"user.b".to_vec(), vec![1, 2])
        ]
    );
    assert_eq!(e[5].link.as_deref(), Some(&b"abc"[..]), "hard link group");
    assert_eq!(e[4].target.as_deref(), Some(&b"abc"[..]));
    assert_eq!(e[4].link.as_deref(), Some(&b"sym"[..]));
    assert!(
        e[0].link.is_none() && e[0].size.is_none(),
        "directories: no link, no size"
    );
    let line = render_line(abc);
    assert!(line.starts_with("abc\tfile\tmode=0644\tuid="), "{line}");
    assert!(line.contains("\txattrs=user.a=,user.b=0102\t"), "{line}");
    assert!(line.ends_with("\tlink=abc"), "{line}");
    assert!(render_line(&e[3]).starts_with("sub/x\\x20y\tfile"));
    assert_eq!(render(&e).lines().count(), 6);
}

#[test]
fn hashing_skips_holes_but_hashes_them_as_zeros() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sparse");
    let f = File::create(&p).unwrap();
    f.set_len(5 << 20).unwrap();
    f.write_all_at(b"data", 3 << 20).unwrap();
    drop(f);
    let mut want = vec![0u8; 5 << 20];
    want[3 << 20..(3 << 20) + 4].copy_from_slice(b"data");
    let h: [u8; 32] = Sha256::digest(&want).into();
    assert_eq!(hash_file(&p, 5 << 20).unwrap(), h);
    // A file shorter than its claimed size is an error, not a silent pass.
    assert!(hash_file(&p, 6 << 20).is_err());
}

#[test]
fn compare_detects_every_kind_of_difference() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [a.path(), b.path()] {
        fs::write(d.join("same"), b"same").unwrap();
        fs::write(d.join("content"), b"one").unwrap();
        fs::write(d.join("h1"), b"h").unwrap();
        fs::write(d.join("h2"), b"h").unwrap();
    }
    fs::write(b.path().join("content"), b"two").unwrap();
    fs::remove_file(b.path().join("h2")).unwrap();
    fs::hard_link(b.path().join("h1"), b.path().join("h2")).unwrap();
    fs::write(a.path().join("only-a"), b"").unwrap();
    fs::create_dir(b.path().join("only-b")).unwrap();
    // Same mtime everywhere so only the intended differences remain.
    for d in [a.path(), b.path()] {
        for n in ["", "same", "content", "h1", "h2", "only-a", "only-b"] {
            let p = d.join(n);
            if p.exists() {
                let f = File::open(&p).unwrap();
                f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
                    .unwrap();
            }
        }
    }
    let diffs = compare_dirs(a.path(), b.path()).unwrap();
    let text: Vec<String> = diffs.iter().map(|d| d.to_string()).collect();
    assert_eq!(diffs.len(), 4, "{text:#?}");
    assert!(matches!(&diffs[0], Difference::Differs { path, .. } if path == "content"));
    assert!(matches!(&diffs[1], Difference::Differs { path, .. } if path == "h2"));
    assert!(matches!(&diffs[2], Difference::OnlyInA(l) if l.starts_with("only-a\t")));
    assert!(matches!(&diffs[3], Difference::OnlyInB(l) if l.starts_with("only-b\t")));
    assert!(compare_dirs(a.path(), a.path()).unwrap().is_empty());

    let out = bin()
        .args(["compare"])
        .arg(a.path())
        .arg(b.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("differs: content"), "{stdout}");
    let out = bin()
        .arg("compare")
        .arg(a.path())
        .arg(a.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    let out = bin().arg("manifest").arg(a.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 6);
    let out = bin().arg("compare").arg(a.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn entries(list: &[(&str, Kind, u64)]) -> Vec<lazypull_testkit::Entry> {
    list.iter()
        .map(|&(p, kind, ino)| lazypull_testkit::Entry {
            path: p.as_bytes().to_vec(),
            kind,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: (kind == Kind::File).then_some(ino),
            mtime: 0,
            mtime_nsec: 0,
            rdev: None,
            target: None,
            xattrs: vec![],
            sha256: None,
            link: None,
            inode: (0, 1, ino),
        })
        .collect()
}

#[test]
fn merge_layers_semantics() {
    let l1 = entries(&[
        (".", Kind::Dir, 1),
        ("d", Kind::Dir, 2),
        ("d/x", Kind::File, 3),
        ("f", Kind::File, 4),
        ("g", Kind::Dir, 5),
        ("g/z", Kind::File, 6),
        ("h1", Kind::File, 7),
        ("h2", Kind::File, 7),
    ]);
    let mut l2 = entries(&[
        (".", Kind::Dir, 1),
        ("d", Kind::Dir, 2),
        ("d/y", Kind::File, 3),
        ("f", Kind::Dir, 4),
        ("g", Kind::File, 5),
        ("h2", Kind::File, 7),
    ]);
    l2[1].perm = 0o700;
    let m = merge_layers(&[l1, l2]);
    let paths: Vec<&str> = m
        .iter()
        .map(|e| std::str::from_utf8(&e.path).unwrap())
        .collect();
    assert_eq!(paths, [".", "d", "d/x", "d/y", "f", "g", "h1", "h2"]);
    assert_eq!(m[1].perm, 0o700);
    assert_eq!(m[4].kind, Kind::Dir);
    assert_eq!(m[5].kind, Kind::File);
    // Same (dev, ino) in different layers is not a hard link.
    assert_eq!(m[6].link.as_deref(), Some(&b"h1"[..]));
    assert_eq!(m[7].link.as_deref(), Some(&b"h2"[..]));
    assert_eq!(m[2].link.as_deref(), Some(&b"d/x"[..]));
    assert_eq!(m[3].link.as_deref(), Some(&b"d/y"[..]));
    assert!(compare_entries(&m, &m).is_empty());
}

fn tree_manifest(dir: &Path) -> String {
    render(&scan(dir).unwrap())
}

#[test]
fn make_tree_is_deterministic() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let r1 = make_tree(
        &d.path().join("a"),
        &TreeOptions {
            seed: 4,
            with_huge: false,
        },
    )
    .unwrap();
    make_tree(
        &d.path().join("b"),
        &TreeOptions {
            seed: 4,
            with_huge: false,
        },
    )
    .unwrap();
    make_tree(
        &d.path().join("c"),
        &TreeOptions {
            seed: 5,
            with_huge: false,
        },
    )
    .unwrap();
    assert!(r1.entries > 400, "{}", r1.entries);
    let (a, b, c) = (
        tree_manifest(&d.path().join("a")),
        tree_manifest(&d.path().join("b")),
        tree_manifest(&d.path().join("c")),
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    for needle in [
        "\tchardev\t",
        "\tblockdev\t",
        "\tfifo\t",
        "\tsocket\t",
        "\tsymlink\t",
        "mode=4755",
        "mode=1777",
        "mode=0000",
        "uid=4000000000",
        "mtime=-34560000.000000123",
        "security.capability=",
        "trusted.big=",
        "user.k29=",
        "link=hard-elsewhere",
        "system.posix_acl_access=",
        "system.posix_acl_default=",
    ] {
        assert!(a.contains(needle), "tree lacks {needle:?}");
    }
    // The CLI makes the same tree.
    let st = bin()
        .args(["make-tree"])
        .arg(d.path().join("cli"))
        .args(["--seed", "4"])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(tree_manifest(&d.path().join("cli")), a);
}
