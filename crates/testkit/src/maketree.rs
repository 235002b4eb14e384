//! A deterministic test tree exercising every feature the image builder
//! supports. Needs root (ownership, device nodes, `trusted.*` xattrs).
//!
//! The structure is fixed; the seed varies file contents, small file sizes
//! and the names in `many/`. Most entries get the same mtime
//! ([`BASE_TIME`], which is also the newest), a few get odd ones.

use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, Timespec, Timestamps, CWD};

/// The mtime most entries get, and the newest one in the tree
/// (year 2128: past 2^32 seconds on purpose).
pub const BASE_TIME: (i64, u32) = (5_000_000_000, 123_456_789);

/// Options for [`make_tree`].
#[derive(Debug, Clone, Default)]
pub struct TreeOptions {
    /// Seed for contents and sizes.
    pub seed: u64,
    /// Also create `huge`, a sparse file larger than 4 GiB.
    pub with_huge: bool,
}

/// What [`make_tree`] did.
#[derive(Debug, Clone, Default)]
pub struct TreeReport {
    /// Paths created (hard links not counted).
    pub entries: usize,
}

/// Path of the huge sparse file within the tree, and its written ranges
/// `(offset, len)`; everything else in it is a hole.
pub const HUGE_PATH: &str = "huge";
/// Size of [`HUGE_PATH`].
pub const HUGE_SIZE: u64 = (5 << 30) + 4097;
/// Data ranges of [`HUGE_PATH`] (offset, length).
pub const HUGE_RANGES: [(u64, u64); 3] = [(0, 100), ((4 << 30) - 50, 100), (5 << 30, 4097)];

/// Bytes written at `offset` in the huge file for `seed` (deterministic).
pub fn huge_range_data(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut r = Rng(seed ^ offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x4855_4745);
    r.bytes(len as usize)
}

/// `len` deterministic, incompressible bytes for `seed` (for test files).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    Rng(seed ^ 0x5241_4e44).bytes(len)
}

/// Writes [`random_bytes`] to `path`, creating its directory; panics on error
/// (a test helper).
pub fn write_random(path: &Path, len: usize, seed: u64) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    }
    fs::write(path, random_bytes(len, seed))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

struct Maker {
    root: PathBuf,
    rng: Rng,
    times: Vec<(PathBuf, (i64, u32))>,
    report: TreeReport,
}

fn ctx(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn errno(path: &Path, e: rustix::io::Errno) -> io::Error {
    ctx(path)(e.into())
}

/// Build a POSIX ACL xattr value (`posix_acl_xattr_header` version 2 and
/// entries of tag, perm, id).
pub fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_UNDEFINED_ID: u32 = u32::MAX;

impl Maker {
    fn p(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    fn owner_mode(&mut self, path: &Path, uid: u32, gid: u32, perm: Option<u32>) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(ctx(path))?;
        if let Some(perm) = perm {
            fs::set_permissions(path, fs::Permissions::from_mode(perm)).map_err(ctx(path))?;
        }
        Ok(())
    }

    fn dir(&mut self, rel: &[u8], perm: u32, uid: u32, gid: u32) -> io::Result<PathBuf> {
        let path = self.p(rel);
        if !rel.is_empty() {
            fs::create_dir(&path).map_err(ctx(&path))?;
        }
        self.owner_mode(&path, uid, gid, Some(perm))?;
        self.times.push((path.clone(), BASE_TIME));
        self.report.entries += 1;
        Ok(path)
    }

    fn file_owned(
        &mut self,
        rel: &[u8],
        data: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> io::Result<PathBuf> {
        let path = self.p(rel);
        fs::write(&path, data).map_err(ctx(&path))?;
        self.owner_mode(&path, uid, gid, Some(perm))?;
        self.times.push((path.clone(), BASE_TIME));
        self.report.entries += 1;
        Ok(path)
    }

    fn file(&mut self, rel: &[u8], data: &[u8]) -> io::Result<PathBuf> {
        self.file_owned(rel, data, 0o644, 0, 0)
    }

    fn random_file(&mut self, rel: &[u8], len: usize) -> io::Result<PathBuf> {
        let data = self.rng.bytes(len);
        self.file(rel, &data)
    }

    fn sparse(&mut self, rel: &[u8], size: u64, ranges: &[(u64, Vec<u8>)]) -> io::Result<PathBuf> {
        let path = self.p(rel);
        let f = File::create(&path).map_err(ctx(&path))?;
        f.set_len(size).map_err(ctx(&path))?;
        for (off, data) in ranges {
            f.write_all_at(data, *off).map_err(ctx(&path))?;
        }
        drop(f);
        self.owner_mode(&path, 0, 0, Some(0o644))?;
        self.times.push((path.clone(), BASE_TIME));
        self.report.entries += 1;
        Ok(path)
    }

    fn symlink(&mut self, rel: &[u8], target: &[u8]) -> io::Result<PathBuf> {
        let path = self.p(rel);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path)
            .map_err(ctx(&path))?;
        self.owner_mode(&path, 0, 0, None)?;
        self.times.push((path.clone(), BASE_TIME));
        self.report.entries += 1;
        Ok(path)
    }

    fn node(
        &mut self,
        rel: &[u8],
        ft: FileType,
        perm: u32,
        dev: (u32, u32),
    ) -> io::Result<PathBuf> {
        let path = self.p(rel);
        rustix::fs::mknodat(
            CWD,
            &path,
            ft,
            Mode::from_raw_mode(perm),
            rustix::fs::makedev(dev.0, dev.1),
        )
        .map_err(|e| errno(&path, e))?;
        self.owner_mode(&path, 0, 0, Some(perm))?;
        self.times.push((path.clone(), BASE_TIME));
        self.report.entries += 1;
        Ok(path)
    }

    fn link(&mut self, existing: &[u8], new: &[u8]) -> io::Result<()> {
        let (a, b) = (self.p(existing), self.p(new));
        fs::hard_link(&a, &b).map_err(ctx(&b))
    }

    /// Set an xattr. A file system refusing the namespace (e.g. POSIX ACLs
    /// on a tmpfs without ACL support) is an error naming what is missing:
    /// the tree is complete or not made at all, so no test loses its xattr
    /// or ACL checks silently.
    fn xattr(&mut self, path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        match rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: the file system does not support xattr {name} (EOPNOTSUPP): the test \
                     tree needs user., trusted., security. xattrs and POSIX ACLs; make it on a \
                     file system that has them (ext4, xfs, btrfs; tmpfs needs \
                     CONFIG_TMPFS_POSIX_ACL and CONFIG_TMPFS_XATTR), e.g. by pointing TMPDIR there",
                    path.display()
                ),
            )),
            Err(e) => Err(errno(path, e)),
        }
    }

    fn set_time(&mut self, path: &Path, t: (i64, u32)) {
        for entry in self.times.iter_mut().rev() {
            if entry.0 == path {
                entry.1 = t;
                return;
            }
        }
        self.times.push((path.to_path_buf(), t));
    }
}

/// Create the test tree in `dir` (created if missing; should be empty).
pub fn make_tree(dir: &Path, opts: &TreeOptions) -> io::Result<TreeReport> {
    if !rustix::process::geteuid().is_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "make-tree needs root (ownership, device nodes, trusted.* xattrs)",
        ));
    }
    fs::create_dir_all(dir).map_err(ctx(dir))?;
    let mut m = Maker {
        root: dir.to_path_buf(),
        rng: Rng(opts.seed ^ 0x6C61_7A79_7075_6C6C),
        times: Vec::new(),
        report: TreeReport::default(),
    };
    m.dir(b"", 0o755, 0, 0)?;

    // Names that sort around "." and "..", odd bytes, the longest name.
    m.random_file(b"!", 10)?;
    m.random_file(b"-", 20)?;
    m.random_file(b".hidden", 5)?;
    m.file(b"..dots", b"")?;
    m.random_file(b"a b", 7)?;
    m.file(b"tab\tname", b"")?;
    m.file(b"newline\nname", b"")?;
    m.random_file("ünïcödé".as_bytes(), 9)?;
    m.random_file(&[b'L'; 255], 100)?;
    let long_dir = [b'D'; 255];
    m.dir(&long_dir, 0o755, 0, 0)?;
    let mut inner = long_dir.to_vec();
    inner.extend_from_slice(b"/inner");
    m.random_file(&inner, 3)?;
    m.random_file(b"~tilde", 1)?;

    // Empty things and small files.
    m.dir(b"empty", 0o755, 0, 0)?;
    m.file(b"empty-file", b"")?;
    m.dir(b"small", 0o755, 0, 0)?;
    for i in 0..40 {
        let len = m.rng.below(301) as usize;
        m.random_file(format!("small/f{i:03}").as_bytes(), len)?;
    }
    // Enough entries to need several directory blocks.
    m.dir(b"many", 0o755, 0, 0)?;
    for i in 0..300 {
        let pad = 20 + m.rng.below(100) as usize;
        let name = format!("many/entry-{i:04}-{}", "x".repeat(pad));
        m.file(name.as_bytes(), b"")?;
    }

    // A directory whose dirents fill exactly one 4096-byte block
    // (".", ".." = 27 bytes, 15 x (12 + 255), 1 x (12 + 52)).
    m.dir(b"full-dir", 0o755, 0, 0)?;
    for i in 0..15u8 {
        let mut name = b"full-dir/".to_vec();
        name.push(b'a' + i);
        name.extend_from_slice(&[b'x'; 254]);
        m.file(&name, b"")?;
    }
    m.file(format!("full-dir/z{}", "y".repeat(51)).as_bytes(), b"")?;

    // Mid-size files around block boundaries.
    m.dir(b"mid", 0o755, 0, 0)?;
    for len in [4095usize, 4096, 4097, 65_549, 300_000] {
        m.random_file(format!("mid/b{len}").as_bytes(), len)?;
    }

    // Several 1 MiB chunks with a repeat (A B A tail), and a full copy.
    let a = m.rng.bytes(1 << 20);
    let b = m.rng.bytes(1 << 20);
    let tail = m.rng.bytes(777);
    let chunky: Vec<u8> = [&a[..], &b[..], &a[..], &tail[..]].concat();
    m.file(b"chunky", &chunky)?;
    m.file(b"chunky-copy", &chunky)?;
    drop((a, b, tail, chunky));
    // Written zeros (not sparse) and sparse files.
    m.file(b"zeros", &vec![0u8; (2 << 20) + 100])?;
    let r1 = m.rng.bytes(5000);
    let r2 = m.rng.bytes(10);
    let r3 = m.rng.bytes(8);
    m.sparse(
        b"sparse",
        (8 << 20) + 5,
        &[(0, r1), (3 << 20, r2), ((8 << 20) - 3, r3)],
    )?;
    m.sparse(b"sparse-empty", 5 << 20, &[])?;
    if opts.with_huge {
        let ranges: Vec<(u64, Vec<u8>)> = HUGE_RANGES
            .iter()
            .map(|&(off, len)| (off, huge_range_data(opts.seed, off, len)))
            .collect();
        m.sparse(HUGE_PATH.as_bytes(), HUGE_SIZE, &ranges)?;
    }

    // Deep nesting.
    let mut deep = String::from("deep");
    m.dir(deep.as_bytes(), 0o755, 0, 0)?;
    for i in 1..=20 {
        deep.push_str(&format!("/d{i:02}"));
        m.dir(deep.as_bytes(), 0o755, 0, 0)?;
    }
    m.random_file(format!("{deep}/leaf").as_bytes(), 33)?;

    // Symlinks.
    m.dir(b"links", 0o755, 0, 0)?;
    m.symlink(b"links/rel", b"../mid/b4096")?;
    m.symlink(b"links/abs", b"/etc/passwd")?;
    m.symlink(b"links/dangling", b"does/not/exist")?;
    m.symlink(b"links/dirlink", b"../deep")?;
    m.symlink(b"links/long", "seg/".repeat(250).as_bytes())?;
    // 4095 bytes (PATH_MAX - 1): too long to sit inline next to an inode.
    m.symlink(b"links/verylong", "abcdefgh/".repeat(455).as_bytes())?;

    // Hard links: a file linked within and across directories, a
    // hard-linked symlink and a hard-linked fifo.
    m.dir(b"hard", 0o755, 0, 0)?;
    m.random_file(b"hard/h1", 1000)?;
    m.link(b"hard/h1", b"hard/h2")?;
    m.link(b"hard/h1", b"hard-elsewhere")?;
    m.symlink(b"hard/sym1", b"h1")?;
    m.link(b"hard/sym1", b"hard/sym2")?;
    m.node(b"hard/fifo-a", FileType::Fifo, 0o644, (0, 0))?;
    m.link(b"hard/fifo-a", b"hard/fifo-b")?;

    // Special files.
    m.dir(b"special", 0o755, 0, 0)?;
    m.node(b"special/fifo", FileType::Fifo, 0o644, (0, 0))?;
    m.node(b"special/chr", FileType::CharacterDevice, 0o666, (1, 3))?;
    m.node(
        b"special/chr-big",
        FileType::CharacterDevice,
        0o600,
        (259, 131_071),
    )?;
    m.node(b"special/blk", FileType::BlockDevice, 0o660, (8, 1))?;
    m.node(b"special/sock", FileType::Socket, 0o755, (0, 0))?;

    // Xattrs.
    m.dir(b"xattrs", 0o755, 0, 0)?;
    let p = m.file(b"xattrs/user", b"u")?;
    m.xattr(&p, "user.a", b"1")?;
    m.xattr(&p, "user.empty", b"")?;
    let bin = m.rng.bytes(100);
    m.xattr(&p, "user.bin", &bin)?;
    let p = m.file(b"xattrs/trusted", b"t")?;
    m.xattr(&p, "trusted.overlay.opaque", b"y")?;
    let big = m.rng.bytes(3000);
    m.xattr(&p, "trusted.big", &big)?;
    let p = m.file_owned(b"xattrs/cap", b"#!/bin/true\n", 0o755, 0, 0)?;
    // VFS_CAP_REVISION_2 | EFFECTIVE, permitted = CAP_NET_BIND_SERVICE.
    let mut cap = 0x0200_0001u32.to_le_bytes().to_vec();
    for w in [1u32 << 10, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    m.xattr(&p, "security.capability", &cap)?;
    let p = m.file_owned(b"xattrs/acl", b"acl", 0o640, 0, 0)?;
    let access = acl_xattr(&[
        (ACL_USER_OBJ, 6, ACL_UNDEFINED_ID),
        (ACL_USER, 4, 1000),
        (ACL_GROUP_OBJ, 4, ACL_UNDEFINED_ID),
        (ACL_GROUP, 2, 2000),
        (ACL_MASK, 6, ACL_UNDEFINED_ID),
        (ACL_OTHER, 0, ACL_UNDEFINED_ID),
    ]);
    m.xattr(&p, "system.posix_acl_access", &access)?;
    let p = m.dir(b"xattrs/acl-dir", 0o750, 0, 0)?;
    m.xattr(&p, "system.posix_acl_access", &access)?;
    let default = acl_xattr(&[
        (ACL_USER_OBJ, 7, ACL_UNDEFINED_ID),
        (ACL_USER, 5, 1001),
        (ACL_GROUP_OBJ, 5, ACL_UNDEFINED_ID),
        (ACL_MASK, 5, ACL_UNDEFINED_ID),
        (ACL_OTHER, 1, ACL_UNDEFINED_ID),
    ]);
    m.xattr(&p, "system.posix_acl_default", &default)?;
    let p = m.file(b"xattrs/many", b"m")?;
    for i in 0..30 {
        let v = m.rng.bytes(i * 3);
        m.xattr(&p, &format!("user.k{i:02}"), &v)?;
    }
    let p = m.symlink(b"xattrs/sym", b"user")?;
    m.xattr(&p, "trusted.sym", b"s")?;
    m.xattr(&p, "security.sym", b"S")?;
    let p = m.dir(b"xattrs/dir", 0o755, 0, 0)?;
    m.xattr(&p, "user.dir", b"d")?;

    // Odd modes.
    m.dir(b"modes", 0o755, 0, 0)?;
    m.file_owned(b"modes/setuid", b"s", 0o4755, 0, 0)?;
    m.file_owned(b"modes/setgid", b"g", 0o2755, 0, 0)?;
    m.file_owned(b"modes/all", b"a", 0o7777, 0, 0)?;
    m.file_owned(b"modes/zero", b"z", 0o000, 0, 0)?;
    m.file_owned(b"modes/odd", b"o", 0o517, 0, 0)?;
    m.dir(b"modes/setgid-dir", 0o2775, 0, 0)?;
    m.dir(b"modes/sticky", 0o1777, 0, 0)?;
    m.dir(b"modes/zero-dir", 0o755, 0, 0)?;
    m.file(b"modes/zero-dir/inside", b"i")?;
    let zd = m.p(b"modes/zero-dir");
    fs::set_permissions(&zd, fs::Permissions::from_mode(0o000)).map_err(ctx(&zd))?;

    // Owners, including ones that need extended inodes.
    m.dir(b"owners", 0o755, 1234, 5678)?;
    for (name, uid, gid) in [
        ("root", 0u32, 0u32),
        ("u1000", 1000, 1000),
        ("nobody", 65534, 65534),
        ("u65535", 65535, 65535),
        ("u65536", 65536, 65536),
        ("big", 100_000, 200_000),
        ("huge-ids", 4_000_000_000, 4_000_000_001),
    ] {
        m.file_owned(
            format!("owners/{name}").as_bytes(),
            name.as_bytes(),
            0o644,
            uid,
            gid,
        )?;
    }
    let p = m.symlink(b"owners/sym", b"root")?;
    std::os::unix::fs::lchown(&p, Some(70_000), Some(3)).map_err(ctx(&p))?;

    // Times.
    m.dir(b"times", 0o755, 0, 0)?;
    for (name, t) in [
        ("epoch", (0i64, 0u32)),
        ("pre-epoch", (-34_560_000, 123)),
        ("y2038", ((1i64 << 31) + 5, 1)),
        ("nsec", (4_000_000_000, 999_999_999)),
        ("base-sec-other-nsec", (BASE_TIME.0, 1)),
    ] {
        let p = m.file(format!("times/{name}").as_bytes(), name.as_bytes())?;
        m.set_time(&p, t);
    }
    let p = m.dir(b"times/old-dir", 0o755, 0, 0)?;
    m.set_time(&p, (1_000_000_000, 5));
    let p = m.symlink(b"times/old-sym", b"epoch")?;
    m.set_time(&p, (1_234_567_890, 42));

    // Times last: creating entries changes directory mtimes.
    for (path, (sec, nsec)) in &m.times {
        let ts = Timespec {
            tv_sec: *sec,
            tv_nsec: i64::from(*nsec),
        };
        rustix::fs::utimensat(
            CWD,
            path,
            &Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| errno(path, e))?;
    }
    Ok(m.report)
}
