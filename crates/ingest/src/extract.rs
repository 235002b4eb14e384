//! Streaming extraction of one tar layer (plain or gzip) into a private
//! directory, for the ordinary layer merge.
//!
//! Only names and file contents go to disk: regular files (streamed, never
//! buffered whole), directories, symlinks and hard links (as real hard
//! links). Every entry's metadata (mode, owner, mtime with PAX nanoseconds,
//! `SCHILY.xattr.*` xattrs, device numbers) is recorded in a [`LayerMeta`]
//! from its tar header instead of being applied to the files, so extraction
//! needs no privileges and loses nothing to the extracting filesystem
//! (ACL normalisation, missing xattr support, `nodev` mounts). Devices and
//! FIFOs are empty placeholder files on disk.
//!
//! Hostile archives are rejected, never followed: `..` leaving the root,
//! parents that are symlinks (or non-directories), hard links to missing or
//! outside entries, truncated archives and corrupt compression are errors.
//! No symlink is ever followed: parents are checked with `lstat`, files are
//! created with `O_EXCL`, and `link(2)` does not follow its target.

use std::cell::Cell;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use lazypull_erofs::{check_xattrs, EntryMeta, LayerMeta, Meta, Special};

use crate::{io_err, IngestError};

/// gzip magic bytes.
pub(crate) const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// zstd frame magic bytes.
pub(crate) const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// An extracted layer; the directory is removed on drop.
pub(crate) struct Extracted {
    pub dir: tempfile::TempDir,
    pub meta: LayerMeta,
}

/// Reader that remembers whether its source reported end of file.
struct EofTrack<R> {
    inner: R,
    eof: bool,
}

impl<R: Read> Read for EofTrack<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

/// Counts the bytes of a decompressed layer stream and fails once they pass
/// `limit` (what a gzip bomb is cut off by; the extractor turns the failure
/// into [`IngestError::TooLarge`] by looking at `count`).
struct Counted<'c, R> {
    inner: R,
    count: &'c Cell<u64>,
    limit: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get().saturating_add(n as u64));
        if self.count.get() > self.limit {
            return Err(io::Error::other("the layer expands past its limit"));
        }
        Ok(n)
    }
}

fn archive_err(layer: &str, reason: impl Into<String>) -> IngestError {
    IngestError::InvalidArchive {
        layer: layer.to_string(),
        reason: reason.into(),
    }
}

fn entry_err(layer: &str, entry: &[u8], reason: impl Into<String>) -> IngestError {
    IngestError::InvalidEntry {
        layer: layer.to_string(),
        entry: String::from_utf8_lossy(entry).into_owned(),
        reason: reason.into(),
    }
}

/// Lexically normalise an archive path: leading `/` and `.` components
/// dropped, `..` resolved; `None` if it would leave the root.
pub(crate) fn normalize(path: &[u8]) -> Option<PathBuf> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(
        &parts.join(&b'/'),
    )))
}

/// Extract the tar layer read from `raw` (plain or gzip, detected by magic
/// bytes) into a new private directory under `parent`. `layer` names the
/// layer in errors. Past `limit` bytes of decompressed stream, or of file
/// bytes declared by its entries (sparse files at full size), it stops with
/// [`IngestError::TooLarge`].
pub(crate) fn extract_layer<R: Read>(
    raw: R,
    layer: &str,
    parent: &Path,
    limit: u64,
) -> Result<Extracted, IngestError> {
    let mut buffered = BufReader::with_capacity(1 << 16, raw);
    let head = buffered
        .fill_buf()
        .map_err(|e| archive_err(layer, format!("reading: {e}")))?;
    if head.starts_with(&ZSTD_MAGIC) {
        return Err(archive_err(
            layer,
            "zstd-compressed layers are not supported",
        ));
    }
    let gzip = head.starts_with(&GZIP_MAGIC);
    let stream: Box<dyn Read + '_> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let expanded = Cell::new(0u64);
    let mut stream = EofTrack {
        inner: Counted {
            inner: stream,
            count: &expanded,
            limit,
        },
        eof: false,
    };
    let dir = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(parent)
        .map_err(io_err(parent))?;
    let mut ex = Extractor {
        layer,
        root: dir.path().to_path_buf(),
        meta: LayerMeta::default(),
        expanded: &expanded,
        declared: 0,
        limit,
    };
    {
        let mut archive = tar::Archive::new(&mut stream);
        let entries = archive
            .entries()
            .map_err(|e| ex.stream_err(gzip, "reading the archive", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ex.stream_err(gzip, "reading an entry header", e))?;
            ex.entry(entry, gzip)?;
        }
    }
    if stream.eof {
        return Err(archive_err(
            layer,
            "truncated tar: end of data before the end-of-archive marker",
        ));
    }
    // Consume the rest (padding after the end marker): this checks the gzip
    // trailer (CRC, length) and lets the caller hash the whole input.
    io::copy(&mut stream, &mut io::sink())
        .map_err(|e| ex.stream_err(gzip, "reading after the end-of-archive marker", e))?;
    Ok(Extracted { dir, meta: ex.meta })
}

struct Extractor<'a> {
    layer: &'a str,
    root: PathBuf,
    meta: LayerMeta,
    /// Bytes of decompressed stream read so far (by [`Counted`]).
    expanded: &'a Cell<u64>,
    /// File bytes the entries so far declared.
    declared: u64,
    limit: u64,
}

/// What is at a path, without following symlinks.
enum Existing {
    Missing,
    Dir,
    Other,
}

impl Extractor<'_> {
    fn stream_err(&self, gzip: bool, what: &str, e: io::Error) -> IngestError {
        if self.expanded.get() > self.limit {
            return IngestError::TooLarge {
                layer: self.layer.to_owned(),
                what: format!(
                    "its {} stream expands to more than {} bytes",
                    if gzip { "decompressed" } else { "tar" },
                    self.limit
                ),
                limit: self.limit,
            };
        }
        let kind = if gzip { "gzip tar" } else { "tar" };
        archive_err(
            self.layer,
            format!("corrupt or truncated {kind}: {what}: {e}"),
        )
    }

    fn existing(&self, rel: &Path) -> Result<Existing, IngestError> {
        let path = self.root.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => Ok(Existing::Dir),
            Ok(_) => Ok(Existing::Other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Existing::Missing),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Make sure every parent of `rel` is a real directory of this layer,
    /// creating missing ones (recorded as implicit) when `create`.
    fn parents(&mut self, entry: &[u8], rel: &Path, create: bool) -> Result<(), IngestError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut cur = PathBuf::new();
        for c in parent.components() {
            cur.push(c);
            let path = self.root.join(&cur);
            match fs::symlink_metadata(&path) {
                Ok(md) if md.is_dir() => {}
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(entry_err(
                        self.layer,
                        entry,
                        format!(
                            "parent {:?} is a symlink in this layer; refusing to write through it",
                            cur.display()
                        ),
                    ))
                }
                Ok(_) => {
                    return Err(entry_err(
                        self.layer,
                        entry,
                        format!("parent {:?} is not a directory", cur.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&path).map_err(io_err(&path))?;
                    self.meta.entries.insert(
                        cur.clone(),
                        EntryMeta {
                            meta: Meta {
                                perm: 0o755,
                                ..Meta::default()
                            },
                            special: None,
                            implicit: true,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(entry_err(
                        self.layer,
                        entry,
                        format!("parent {:?} does not exist", cur.display()),
                    ))
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(())
    }

    /// Remove whatever is at `rel` (a whole directory if `!keep_dir`).
    fn clear(&self, rel: &Path, keep_dir: bool) -> Result<Existing, IngestError> {
        let path = self.root.join(rel);
        let ex = self.existing(rel)?;
        match ex {
            Existing::Missing => {}
            Existing::Dir if keep_dir => {}
            // remove_dir_all does not follow symlinks.
            Existing::Dir => fs::remove_dir_all(&path).map_err(io_err(&path))?,
            Existing::Other => fs::remove_file(&path).map_err(io_err(&path))?,
        }
        Ok(ex)
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        gzip: bool,
    ) -> Result<(), IngestError> {
        let name = entry.path_bytes().into_owned();
        let et = entry.header().entry_type();
        if et.is_pax_global_extensions()
            || et.is_pax_local_extensions()
            || et.is_gnu_longname()
            || et.is_gnu_longlink()
        {
            // Global PAX headers carry nothing we use; the others are
            // consumed by the tar crate and never surface here.
            return Ok(());
        }
        let Some(rel) = normalize(&name) else {
            return Err(entry_err(
                self.layer,
                &name,
                "path leaves the layer root through \"..\"",
            ));
        };
        let mut meta = self.header_meta(&mut entry, &name)?;
        if rel.as_os_str().is_empty() {
            if !et.is_dir() {
                return Err(entry_err(
                    self.layer,
                    &name,
                    "the layer root is not a directory",
                ));
            }
            self.meta.entries.insert(
                rel,
                EntryMeta {
                    meta,
                    special: None,
                    implicit: false,
                },
            );
            return Ok(());
        }
        self.parents(&name, &rel, true)?;
        let path = self.root.join(&rel);
        let mut special = None;
        match et {
            tar::EntryType::Directory => {
                if let Existing::Missing | Existing::Other = self.clear(&rel, true)? {
                    fs::create_dir(&path).map_err(io_err(&path))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // Checked before a byte of it is written: for a GNU sparse
                // entry the size is the expanded one (the tar reader writes
                // its holes out as zeros), far more than the archive holds.
                let want = entry.size();
                self.declared = self.declared.saturating_add(want);
                if self.declared > self.limit {
                    return Err(IngestError::TooLarge {
                        layer: self.layer.to_owned(),
                        what: format!(
                            "entry {:?} ({want} bytes{}) takes its files to {} bytes",
                            String::from_utf8_lossy(&name),
                            if et.is_gnu_sparse() {
                                ", a sparse file at its full size"
                            } else {
                                ""
                            },
                            self.declared
                        ),
                        limit: self.limit,
                    });
                }
                self.clear(&rel, false)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let got = io::copy(&mut entry, &mut f).map_err(|e| {
                    let what = format!("reading the data of {:?}", String::from_utf8_lossy(&name));
                    self.stream_err(gzip, &what, e)
                })?;
                if got != want {
                    return Err(archive_err(
                        self.layer,
                        format!(
                            "truncated tar: {:?} has {got} of its {want} bytes",
                            String::from_utf8_lossy(&name)
                        ),
                    ));
                }
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned());
                let target = match target {
                    Some(t) if !t.is_empty() => t,
                    _ => return Err(entry_err(self.layer, &name, "symlink without a target")),
                };
                self.clear(&rel, false)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                    .map_err(io_err(&path))?;
                // Symlink permissions mean nothing on Linux; runtimes show 0777.
                meta.perm = 0o777;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned());
                let Some(target) = target.filter(|t| !t.is_empty()) else {
                    return Err(entry_err(self.layer, &name, "hard link without a target"));
                };
                let Some(trel) = normalize(&target).filter(|t| !t.as_os_str().is_empty()) else {
                    return Err(entry_err(
                        self.layer,
                        &name,
                        format!(
                            "hard link target {:?} is outside the layer",
                            String::from_utf8_lossy(&target)
                        ),
                    ));
                };
                if trel == rel {
                    return Ok(());
                }
                self.parents(&name, &trel, false)?;
                let recorded = match self.existing(&trel)? {
                    Existing::Other => self.meta.entries.get(&trel).cloned(),
                    Existing::Dir => {
                        return Err(entry_err(
                            self.layer,
                            &name,
                            format!("hard link target {:?} is a directory", trel.display()),
                        ))
                    }
                    Existing::Missing => None,
                };
                let Some(recorded) = recorded else {
                    return Err(entry_err(
                        self.layer,
                        &name,
                        format!(
                            "hard link target {:?} is not an earlier entry of this layer",
                            trel.display()
                        ),
                    ));
                };
                self.clear(&rel, false)?;
                let tpath = self.root.join(&trel);
                // link(2) (linkat without AT_SYMLINK_FOLLOW): a symlink
                // target is linked itself, never followed.
                fs::hard_link(&tpath, &path).map_err(io_err(&path))?;
                self.meta.entries.insert(rel, recorded);
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.clear(&rel, false)?;
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let h = entry.header();
                let num = |v: io::Result<Option<u32>>| -> Result<u32, IngestError> {
                    v.map(|v| v.unwrap_or(0))
                        .map_err(|e| entry_err(self.layer, &name, format!("device number: {e}")))
                };
                special = Some(match et {
                    tar::EntryType::Char => Special::CharDev {
                        major: num(h.device_major())?,
                        minor: num(h.device_minor())?,
                    },
                    tar::EntryType::Block => Special::BlockDev {
                        major: num(h.device_major())?,
                        minor: num(h.device_minor())?,
                    },
                    _ => Special::Fifo,
                });
                if let Some(
                    Special::CharDev { major, minor } | Special::BlockDev { major, minor },
                ) = special
                {
                    if major > 0xfff || minor > 0xfffff {
                        return Err(entry_err(
                            self.layer,
                            &name,
                            format!("device number {major}:{minor} too large"),
                        ));
                    }
                }
            }
            other => {
                return Err(entry_err(
                    self.layer,
                    &name,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ))
            }
        }
        self.meta.entries.insert(
            rel,
            EntryMeta {
                meta,
                special,
                implicit: false,
            },
        );
        Ok(())
    }

    /// Mode, owner, mtime (PAX nanoseconds) and xattrs of an entry.
    fn header_meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        name: &[u8],
    ) -> Result<Meta, IngestError> {
        let bad = |what: &str, e: io::Error| entry_err(self.layer, name, format!("{what}: {e}"));
        let h = entry.header();
        let mode = h.mode().map_err(|e| bad("mode", e))?;
        // PAX uid/gid are already applied to the header by the tar crate.
        let uid = h.uid().map_err(|e| bad("uid", e))?;
        let gid = h.gid().map_err(|e| bad("gid", e))?;
        let mut mtime = i64::try_from(h.mtime().map_err(|e| bad("mtime", e))?)
            .map_err(|_| entry_err(self.layer, name, "mtime out of range"))?;
        let mut mtime_nsec = 0;
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(|e| bad("PAX header", e))? {
            for ext in pax {
                let ext = ext.map_err(|e| bad("PAX header", e))?;
                let key = ext.key_bytes();
                if key == b"mtime" {
                    let v = String::from_utf8_lossy(ext.value_bytes()).into_owned();
                    (mtime, mtime_nsec) = parse_pax_time(&v).ok_or_else(|| {
                        entry_err(self.layer, name, format!("bad PAX mtime {v:?}"))
                    })?;
                } else if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((x.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        xattrs.sort();
        xattrs.dedup_by(|a, b| a.0 == b.0);
        let shown = PathBuf::from(std::ffi::OsStr::from_bytes(name));
        check_xattrs(&shown, &xattrs)?;
        Ok(Meta {
            perm: (mode & 0o7777) as u16,
            uid: u32::try_from(uid).map_err(|_| entry_err(self.layer, name, "uid too large"))?,
            gid: u32::try_from(gid).map_err(|_| entry_err(self.layer, name, "gid too large"))?,
            mtime,
            mtime_nsec,
            xattrs,
        })
    }
}

/// A PAX time (`[-]SECONDS[.FRACTION]`) as (seconds, nanoseconds), floored.
fn parse_pax_time(v: &str) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (sec, frac) = v.split_once('.').unwrap_or((v, ""));
    if sec.is_empty() || !sec.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = sec.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((sec, nsec));
    }
    if nsec == 0 {
        Some((-sec, 0))
    } else {
        Some((-sec - 1, 1_000_000_000 - nsec))
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("1.0000000019"), Some((1, 1)));
        assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time(""), None);
    }

    #[test]
    fn normalizing() {
        assert_eq!(normalize(b"/a/./b/"), Some(PathBuf::from("a/b")));
        assert_eq!(normalize(b"a/../b"), Some(PathBuf::from("b")));
        assert_eq!(normalize(b"./"), Some(PathBuf::new()));
        assert_eq!(normalize(b"a/../../b"), None);
        assert_eq!(normalize(b"/../etc"), None);
    }
}
