//! Canonical tree manifests: one line per entry, sorted by path.
//!
//! A line holds the relative path (`.` for the root), the file type, the
//! permission and special bits, uid, gid, size (regular files and symlinks),
//! mtime (`sec.nsec`), rdev (devices), symlink target, all xattrs sorted
//! (`name=hexvalue`), the SHA-256 of regular file contents, and for every
//! non-directory a hard-link group id: the path of the first entry (in path
//! order) sharing its inode. Directory sizes and link counts are left out:
//! they are filesystem-specific.
//!
//! Bytes outside `!`..`~` and the backslash are escaped as `\xHH`, so every
//! entry is exactly one line whatever its name.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

const BUF_SIZE: usize = 1 << 20;

/// File type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// FIFO.
    Fifo,
    /// Socket.
    Socket,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::CharDev => "chardev",
            Kind::BlockDev => "blockdev",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the scanned root, `/`-separated; `.` for the root.
    pub path: Vec<u8>,
    /// File type.
    pub kind: Kind,
    /// Permission and special bits (`mode & 0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size for regular files and symlinks.
    pub size: Option<u64>,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// `(major, minor)` of devices.
    pub rdev: Option<(u32, u32)>,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// All xattrs, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// SHA-256 of a regular file's content (None if hashing was disabled).
    pub sha256: Option<[u8; 32]>,
    /// Hard-link group (first path sharing the inode), non-directories only.
    pub link: Option<Vec<u8>>,
    /// Inode identity `(domain, st_dev, st_ino)`; not rendered. The domain
    /// separates layers in [`merge_layers`].
    pub inode: (u64, u64, u64),
}

/// Options for [`scan_with`].
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Hash regular file contents.
    pub hash: bool,
    /// Worker threads for hashing (0 = available parallelism, at most 4).
    pub threads: usize,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            hash: true,
            threads: 0,
        }
    }
}

/// Escape bytes for a manifest line.
pub fn escape(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if (0x21..=0x7e).contains(&c) && c != b'\\' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    s
}

/// glibc's `major()`/`minor()`.
fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn errno_io(path: &Path, e: rustix::io::Errno) -> io::Error {
    let e: io::Error = e.into();
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn with_path(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// All xattrs of `path` (not following symlinks), sorted by name.
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut list = Vec::new();
    loop {
        let n = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(errno_io(path, e)),
        };
        if n == 0 {
            return Ok(Vec::new());
        }
        list.resize(n, 0);
        match rustix::fs::llistxattr(path, &mut list[..]) {
            Ok(got) => {
                list.truncate(got);
                break;
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(errno_io(path, e)),
        }
    }
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let os = std::ffi::OsStr::from_bytes(name);
        let mut value = Vec::new();
        loop {
            let n = rustix::fs::lgetxattr_query(path, os).map_err(|e| errno_io(path, e))?;
            value.resize(n, 0);
            if n == 0 {
                break;
            }
            match rustix::fs::lgetxattr(path, os, &mut value[..]) {
                Ok(got) => {
                    value.truncate(got);
                    break;
                }
                Err(rustix::io::Errno::RANGE) => continue,
                Err(e) => return Err(errno_io(path, e)),
            }
        }
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// SHA-256 of a file's first `size` bytes, streamed with a 1 MiB buffer.
/// Holes (found with `SEEK_DATA`/`SEEK_HOLE` where supported) are hashed as
/// zeros without being read. Fails if the file's size is not `size`.
pub fn hash_file(path: &Path, size: u64) -> io::Result<[u8; 32]> {
    let f = File::open(path).map_err(with_path(path))?;
    let actual = f.metadata().map_err(with_path(path))?.len();
    if actual != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{}: size is {actual}, expected {size}", path.display()),
        ));
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let zeros = vec![0u8; BUF_SIZE];
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(_) => pos,
        };
        while pos < data {
            let n = (data - pos).min(BUF_SIZE as u64) as usize;
            h.update(&zeros[..n]);
            pos += n as u64;
        }
        if pos >= size {
            break;
        }
        let hole = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(pos)) {
            Ok(x) if x > pos => x.min(size),
            _ => size,
        };
        while pos < hole {
            let n = (hole - pos).min(BUF_SIZE as u64) as usize;
            f.read_exact_at(&mut buf[..n], pos)
                .map_err(with_path(path))?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(h.finalize().into())
}

fn entry_for(root: &Path, rel: &[u8]) -> io::Result<(Entry, PathBuf)> {
    let full = if rel == b"." {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel))
    };
    let md = fs::symlink_metadata(&full).map_err(with_path(&full))?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let target = if kind == Kind::Symlink {
        Some(
            fs::read_link(&full)
                .map_err(with_path(&full))?
                .into_os_string()
                .into_vec(),
        )
    } else {
        None
    };
    let e = Entry {
        path: rel.to_vec(),
        kind,
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: matches!(kind, Kind::File | Kind::Symlink).then(|| md.len()),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| split_dev(md.rdev())),
        target,
        xattrs: read_xattrs(&full)?,
        sha256: None,
        link: None,
        inode: (0, md.dev(), md.ino()),
    };
    Ok((e, full))
}

/// Set `link` of every non-directory to the first path (in the slice's
/// order, which must be sorted by path) sharing its inode.
pub fn assign_links(entries: &mut [Entry]) {
    let mut first: HashMap<(u64, u64, u64), Vec<u8>> = HashMap::new();
    for e in entries.iter_mut() {
        if e.kind == Kind::Dir {
            e.link = None;
            continue;
        }
        let g = first.entry(e.inode).or_insert_with(|| e.path.clone());
        e.link = Some(g.clone());
    }
}

/// Scan `root` with default options.
pub fn scan(root: &Path) -> io::Result<Vec<Entry>> {
    scan_with(root, &ScanOptions::default())
}

/// Scan `root`: every entry below it (not following symlinks, not crossing
/// into other filesystems' semantics in any special way), sorted by path,
/// with hard-link groups assigned and (optionally) contents hashed.
pub fn scan_with(root: &Path, opts: &ScanOptions) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut files: Vec<(usize, PathBuf, u64)> = Vec::new();
    let mut stack: Vec<Vec<u8>> = vec![b".".to_vec()];
    while let Some(rel) = stack.pop() {
        let (e, full) = entry_for(root, &rel)?;
        if e.kind == Kind::Dir {
            for d in fs::read_dir(&full).map_err(with_path(&full))? {
                let d = d.map_err(with_path(&full))?;
                let name = d.file_name().into_vec();
                let child = if rel == b"." {
                    name
                } else {
                    let mut c = rel.clone();
                    c.push(b'/');
                    c.extend_from_slice(&name);
                    c
                };
                stack.push(child);
            }
        }
        if e.kind == Kind::File && opts.hash {
            files.push((entries.len(), full, e.size.unwrap_or(0)));
        }
        entries.push(e);
    }

    if !files.is_empty() {
        // Largest first, so the long ones do not end up last on one thread.
        files.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4)
        } else {
            opts.threads
        }
        .min(files.len());
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<(usize, io::Result<[u8; 32]>)>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((idx, path, size)) = files.get(i) else {
                        break;
                    };
                    let r = hash_file(path, *size);
                    let failed = r.is_err();
                    results
                        .lock()
                        .expect("no panics while locked")
                        .push((*idx, r));
                    if failed {
                        // Let the others drain quickly.
                        next.store(files.len(), Ordering::Relaxed);
                    }
                });
            }
        });
        for (idx, r) in results.into_inner().expect("threads joined") {
            entries[idx].sha256 = Some(r?);
        }
    }

    entries.sort_by(|a, b| a.path.cmp(&b.path));
    assign_links(&mut entries);
    Ok(entries)
}

/// Render one entry as its canonical line (without newline).
pub fn render_line(e: &Entry) -> String {
    let mut s = format!(
        "{}\t{}\tmode={:04o}\tuid={}\tgid={}",
        escape(&e.path),
        e.kind.name(),
        e.perm,
        e.uid,
        e.gid
    );
    if let Some(size) = e.size {
        s.push_str(&format!("\tsize={size}"));
    }
    s.push_str(&format!("\tmtime={}.{:09}", e.mtime, e.mtime_nsec));
    if let Some((ma, mi)) = e.rdev {
        s.push_str(&format!("\trdev={ma}:{mi}"));
    }
    if let Some(t) = &e.target {
        s.push_str(&format!("\ttarget={}", escape(t)));
    }
    if !e.xattrs.is_empty() {
        let x: Vec<String> = e
            .xattrs
            .iter()
            .map(|(n, v)| format!("{}={}", escape(n), hex::encode(v)))
            .collect();
        s.push_str(&format!("\txattrs={}", x.join(",")));
    }
    if let Some(h) = &e.sha256 {
        s.push_str(&format!("\tsha256={}", hex::encode(h)));
    }
    if let Some(l) = &e.link {
        s.push_str(&format!("\tlink={}", escape(l)));
    }
    s
}

/// Render a whole manifest (one line per entry, each ending in `\n`).
pub fn render(entries: &[Entry]) -> String {
    let mut s = String::new();
    for e in entries {
        s.push_str(&render_line(e));
        s.push('\n');
    }
    s
}

/// The manifest a stack of layers should produce once merged: a later
/// layer's entry replaces an earlier one at the same path, directories merge
/// (the later directory's own attributes win), a later non-directory removes
/// an earlier directory's whole subtree. Inodes of different layers are never
/// the same inode. Link groups are recomputed.
pub fn merge_layers(layers: &[Vec<Entry>]) -> Vec<Entry> {
    let mut map: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    for (li, layer) in layers.iter().enumerate() {
        let mut sorted: Vec<&Entry> = layer.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        for e in sorted {
            let mut e = e.clone();
            e.inode.0 = li as u64;
            let replaces_dir = matches!(map.get(&e.path), Some(old) if old.kind == Kind::Dir)
                && e.kind != Kind::Dir;
            if replaces_dir && e.path != b"." {
                let mut prefix = e.path.clone();
                prefix.push(b'/');
                let doomed: Vec<Vec<u8>> = map
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    map.remove(&k);
                }
            }
            map.insert(e.path.clone(), e);
        }
    }
    let mut out: Vec<Entry> = map.into_values().collect();
    assign_links(&mut out);
    out
}
