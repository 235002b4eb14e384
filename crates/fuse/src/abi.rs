//! FUSE wire format: requests read from `/dev/fuse`, replies written back.
//!
//! Every request starts with `struct fuse_in_header` (40 bytes, native
//! little-endian):
//!
//! ```text
//! u32 len; u32 opcode; u64 unique; u64 nodeid; u32 uid; u32 gid; u32 pid;
//! u16 total_extlen; u16 padding;
//! ```
//!
//! followed by an opcode-specific body. A reply is `struct fuse_out_header`
//! (`u32 len; i32 error; u64 unique`) plus a body; a notification is the same
//! header with `unique` 0 and the notify code in `error`.
//!
//! Parsing is strict: a length that disagrees with what was read, or a body
//! shorter than its opcode needs, is an error. Opcodes a read-only server does
//! not implement parse as [`Operation::Other`] and get `ENOSYS`.

use std::fmt;
use std::time::Duration;

/// The protocol major version spoken.
pub const KERNEL_VERSION: u32 = 7;
/// The newest minor version understood (7.40 added passthrough and resend).
pub const KERNEL_MINOR_VERSION: u32 = 41;
/// The oldest minor version accepted: 7.31 (Linux 5.4), whose init and attr
/// layouts are the ones encoded here.
pub const MIN_MINOR_VERSION: u32 = 31;
/// The root directory's node id.
pub const ROOT_ID: u64 = 1;
/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_SIZE: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_SIZE: usize = 16;
/// The kernel refuses reads from `/dev/fuse` into smaller buffers.
pub const MIN_READ_BUFFER: usize = 8192;
/// Resent requests carry this bit in `unique` (`FUSE_UNIQUE_RESEND`).
pub const UNIQUE_RESEND: u64 = 1 << 63;

/// Request opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

/// `fuse_init_in.flags` / `fuse_init_out.flags` bits (the upper 32 live in `flags2`).
pub mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u64 = 1 << 24;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const HAS_RESEND: u64 = 1 << 39;
}

/// `fuse_open_out.open_flags` bits.
pub mod open_flags {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// `enum fuse_notify_code`: the kernel re-queues every request it handed out
/// and has not had an answer to (Linux 6.9+, protocol 7.40).
pub const NOTIFY_RESEND: i32 = 7;

/// `DT_*` values for directory entries.
pub const DT_DIR: u32 = 4;
pub const DT_REG: u32 = 8;

/// `struct fuse_in_header`, minus padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// `struct fuse_init_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32` (flags2 only when the kernel set `INIT_EXT`).
    pub flags: u64,
}

/// `struct fuse_read_in` (READ and READDIR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub flags: u32,
}

/// One parsed request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation<'a> {
    Init(InitIn),
    Destroy,
    /// The name, without its terminating NUL.
    Lookup {
        name: &'a [u8],
    },
    /// No reply is sent to a forget.
    Forget {
        nlookup: u64,
    },
    /// `(nodeid, nlookup)` pairs; no reply is sent.
    BatchForget {
        forgets: Vec<(u64, u64)>,
    },
    GetAttr,
    Open {
        flags: u32,
    },
    Read(ReadIn),
    Release {
        fh: u64,
    },
    Flush,
    OpenDir,
    ReadDir(ReadIn),
    ReleaseDir,
    StatFs,
    Access {
        mask: u32,
    },
    /// No reply is required; the interrupted request is answered normally.
    Interrupt {
        unique: u64,
    },
    /// An opcode this crate does not model: answer `ENOSYS` (or `EROFS`).
    Other {
        opcode: u32,
    },
}

/// A request read from `/dev/fuse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Operation<'a>,
}

impl Request<'_> {
    /// Whether the kernel expects a reply (forgets and interrupts get none).
    pub fn wants_reply(&self) -> bool {
        wants_reply(self.header.opcode)
    }
}

/// Whether the kernel expects a reply to a request of `opcode` (forgets and
/// interrupts get none).
pub fn wants_reply(opcode: u32) -> bool {
    !matches!(
        opcode,
        opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT
    )
}

/// The header of a request, without parsing its body: `None` if `buf` is
/// shorter than a header.
pub fn header(buf: &[u8]) -> Option<InHeader> {
    (buf.len() >= IN_HEADER_SIZE).then(|| InHeader {
        len: u32_at(buf, 0),
        opcode: u32_at(buf, 4),
        unique: u64_at(buf, 8),
        nodeid: u64_at(buf, 16),
        uid: u32_at(buf, 24),
        gid: u32_at(buf, 28),
        pid: u32_at(buf, 32),
    })
}

/// Why a request could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("request of {got} bytes is shorter than the {IN_HEADER_SIZE}-byte header")]
    ShortHeader { got: usize },
    #[error("request header says {header} bytes but {got} were read")]
    LengthMismatch {
        unique: u64,
        header: u32,
        got: usize,
    },
    #[error("opcode {opcode} needs a body of {need} bytes, got {got}")]
    ShortBody {
        unique: u64,
        opcode: u32,
        need: usize,
        got: usize,
    },
    #[error("lookup name is not NUL-terminated")]
    UnterminatedName { unique: u64 },
    #[error("batch forget lists {count} entries but carries {got} bytes")]
    BadForgetCount { unique: u64, count: u32, got: usize },
}

impl ParseError {
    /// The request's `unique` when the header was readable: it can still be
    /// answered (with `EIO`) so the caller in the kernel does not wait forever.
    pub fn unique(&self) -> Option<u64> {
        match self {
            ParseError::ShortHeader { .. } => None,
            ParseError::LengthMismatch { unique, .. }
            | ParseError::ShortBody { unique, .. }
            | ParseError::UnterminatedName { unique }
            | ParseError::BadForgetCount { unique, .. } => Some(*unique),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses one request as read from `/dev/fuse` (exactly the bytes `read` returned).
pub fn parse(buf: &[u8]) -> Result<Request<'_>, ParseError> {
    let header = header(buf).ok_or(ParseError::ShortHeader { got: buf.len() })?;
    let _total_extlen = u16_at(buf, 36);
    if header.len as usize != buf.len() {
        return Err(ParseError::LengthMismatch {
            unique: header.unique,
            header: header.len,
            got: buf.len(),
        });
    }
    let body = &buf[IN_HEADER_SIZE..];
    let need = |n: usize| -> Result<(), ParseError> {
        if body.len() < n {
            Err(ParseError::ShortBody {
                unique: header.unique,
                opcode: header.opcode,
                need: n,
                got: body.len(),
            })
        } else {
            Ok(())
        }
    };
    let read_in = |body: &[u8]| ReadIn {
        fh: u64_at(body, 0),
        offset: u64_at(body, 8),
        size: u32_at(body, 16),
        flags: u32_at(body, 20),
    };
    let op = match header.opcode {
        opcode::INIT => {
            need(16)?;
            let mut flags = u64::from(u32_at(body, 12));
            if flags & init_flags::INIT_EXT != 0 && body.len() >= 20 {
                flags |= u64::from(u32_at(body, 16)) << 32;
            }
            Operation::Init(InitIn {
                major: u32_at(body, 0),
                minor: u32_at(body, 4),
                max_readahead: u32_at(body, 8),
                flags,
            })
        }
        opcode::DESTROY => Operation::Destroy,
        opcode::LOOKUP => {
            let nul = body
                .iter()
                .position(|&b| b == 0)
                .ok_or(ParseError::UnterminatedName {
                    unique: header.unique,
                })?;
            Operation::Lookup { name: &body[..nul] }
        }
        opcode::FORGET => {
            need(8)?;
            Operation::Forget {
                nlookup: u64_at(body, 0),
            }
        }
        opcode::BATCH_FORGET => {
            need(8)?;
            let count = u32_at(body, 0);
            let entries = &body[8..];
            if entries.len() / 16 < count as usize {
                return Err(ParseError::BadForgetCount {
                    unique: header.unique,
                    count,
                    got: entries.len(),
                });
            }
            let forgets = entries
                .chunks_exact(16)
                .take(count as usize)
                .map(|e| (u64_at(e, 0), u64_at(e, 8)))
                .collect();
            Operation::BatchForget { forgets }
        }
        opcode::GETATTR => Operation::GetAttr,
        opcode::OPEN => {
            need(8)?;
            Operation::Open {
                flags: u32_at(body, 0),
            }
        }
        opcode::READ => {
            need(40)?;
            Operation::Read(read_in(body))
        }
        opcode::READDIR => {
            need(40)?;
            Operation::ReadDir(read_in(body))
        }
        opcode::RELEASE => {
            need(24)?;
            Operation::Release {
                fh: u64_at(body, 0),
            }
        }
        opcode::RELEASEDIR => Operation::ReleaseDir,
        opcode::FLUSH => Operation::Flush,
        opcode::OPENDIR => Operation::OpenDir,
        opcode::STATFS => Operation::StatFs,
        opcode::ACCESS => {
            need(8)?;
            Operation::Access {
                mask: u32_at(body, 0),
            }
        }
        opcode::INTERRUPT => {
            need(8)?;
            Operation::Interrupt {
                unique: u64_at(body, 0),
            }
        }
        other => Operation::Other { opcode: other },
    };
    Ok(Request { header, op })
}

/// `struct fuse_out_header` for a reply of `body_len` bytes.
pub fn out_header(unique: u64, error: i32, body_len: usize) -> [u8; OUT_HEADER_SIZE] {
    let mut h = [0u8; OUT_HEADER_SIZE];
    h[0..4].copy_from_slice(&((OUT_HEADER_SIZE + body_len) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// An error reply: `errno` is positive (`libc::ENOENT`); the wire carries it negated.
pub fn error_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER_SIZE] {
    out_header(unique, -errno.abs(), 0)
}

/// A notification with no body (`unique` 0, the code in `error`).
pub fn notification(code: i32) -> [u8; OUT_HEADER_SIZE] {
    out_header(0, code, 0)
}

/// `struct fuse_attr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileAttr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// `sizeof(struct fuse_attr)`.
pub const ATTR_SIZE: usize = 88;

impl FileAttr {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        for v in [
            self.ino,
            self.size,
            self.blocks,
            self.mtime,
            self.mtime,
            self.mtime,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            self.mtime_nsec,
            self.mtime_nsec,
            self.mtime_nsec,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            0, // rdev
            self.blksize,
            0, // flags
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        debug_assert_eq!(out.len() - start, ATTR_SIZE);
    }
}

fn split(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_nanos())
}

/// `struct fuse_entry_out` (LOOKUP).
pub fn entry_out(nodeid: u64, generation: u64, valid: Duration, attr: &FileAttr) -> Vec<u8> {
    let (secs, nsec) = split(valid);
    let mut out = Vec::with_capacity(40 + ATTR_SIZE);
    for v in [nodeid, generation, secs, secs] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&nsec.to_le_bytes());
    out.extend_from_slice(&nsec.to_le_bytes());
    attr.encode(&mut out);
    out
}

/// `struct fuse_attr_out` (GETATTR).
pub fn attr_out(valid: Duration, attr: &FileAttr) -> Vec<u8> {
    let (secs, nsec) = split(valid);
    let mut out = Vec::with_capacity(16 + ATTR_SIZE);
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&nsec.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    attr.encode(&mut out);
    out
}

/// `struct fuse_open_out` (OPEN, OPENDIR).
pub fn open_out(fh: u64, open_flags: u32, backing_id: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..8].copy_from_slice(&fh.to_le_bytes());
    out[8..12].copy_from_slice(&open_flags.to_le_bytes());
    out[12..16].copy_from_slice(&backing_id.to_le_bytes());
    out
}

/// `struct fuse_init_out`: what the server agrees to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32`.
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub max_pages: u16,
    pub max_stack_depth: u32,
}

impl InitOut {
    /// The 64-byte body.
    pub fn encode(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[0..4].copy_from_slice(&KERNEL_VERSION.to_le_bytes());
        out[4..8].copy_from_slice(&self.minor.to_le_bytes());
        out[8..12].copy_from_slice(&self.max_readahead.to_le_bytes());
        out[12..16].copy_from_slice(&(self.flags as u32).to_le_bytes());
        out[16..18].copy_from_slice(&self.max_background.to_le_bytes());
        out[18..20].copy_from_slice(&self.congestion_threshold.to_le_bytes());
        out[20..24].copy_from_slice(&self.max_write.to_le_bytes());
        out[24..28].copy_from_slice(&1u32.to_le_bytes()); // time_gran: 1 ns
        out[28..30].copy_from_slice(&self.max_pages.to_le_bytes());
        out[32..36].copy_from_slice(&((self.flags >> 32) as u32).to_le_bytes());
        out[36..40].copy_from_slice(&self.max_stack_depth.to_le_bytes());
        out
    }
}

/// `struct fuse_statfs_out` for a read-only file system of `files` files
/// totalling `bytes`.
pub fn statfs_out(bytes: u64, files: u64) -> [u8; 80] {
    let bsize = 4096u64;
    let mut out = [0u8; 80];
    let blocks = bytes.div_ceil(bsize);
    for (i, v) in [blocks, 0, 0, files, 0].into_iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    out[40..44].copy_from_slice(&(bsize as u32).to_le_bytes());
    out[44..48].copy_from_slice(&255u32.to_le_bytes()); // namelen
    out[48..52].copy_from_slice(&(bsize as u32).to_le_bytes()); // frsize
    out
}

/// Directory entries (`struct fuse_dirent`, each padded to 8 bytes) for a
/// READDIR reply of at most `max` bytes.
#[derive(Debug)]
pub struct DirentBuf {
    buf: Vec<u8>,
    max: usize,
}

impl DirentBuf {
    pub fn new(max: usize) -> Self {
        DirentBuf {
            buf: Vec::new(),
            max,
        }
    }

    /// Adds an entry; `next_offset` is the READDIR offset that resumes after
    /// it. Returns false (adding nothing) when the reply would outgrow `max`.
    pub fn push(&mut self, ino: u64, next_offset: u64, kind: u32, name: &[u8]) -> bool {
        let len = (24 + name.len()).next_multiple_of(8);
        if self.buf.len() + len > self.max {
            return false;
        }
        self.buf.extend_from_slice(&ino.to_le_bytes());
        self.buf.extend_from_slice(&next_offset.to_le_bytes());
        self.buf
            .extend_from_slice(&(name.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&kind.to_le_bytes());
        self.buf.extend_from_slice(name);
        self.buf.resize(self.buf.len() + len - 24 - name.len(), 0);
        true
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

impl fmt::Display for InHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "opcode {} unique {} node {} pid {}",
            self.opcode, self.unique, self.nodeid, self.pid
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((IN_HEADER_SIZE + body.len()) as u32).to_le_bytes());
        v.extend_from_slice(&opcode.to_le_bytes());
        v.extend_from_slice(&unique.to_le_bytes());
        v.extend_from_slice(&nodeid.to_le_bytes());
        v.extend_from_slice(&[0u8; 16]);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_the_requests_a_blob_server_answers() {
        let mut init = Vec::new();
        for v in [
            7u32,
            41,
            131072,
            (init_flags::INIT_EXT | init_flags::ASYNC_READ) as u32,
            0x80,
        ] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        init.resize(64, 0);
        let raw = request(opcode::INIT, 1, 0, &init);
        let r = parse(&raw).unwrap();
        assert_eq!(
            r.op,
            Operation::Init(InitIn {
                major: 7,
                minor: 41,
                max_readahead: 131072,
                flags: init_flags::INIT_EXT | init_flags::ASYNC_READ | init_flags::HAS_RESEND,
            })
        );

        let raw = request(opcode::LOOKUP, 2, ROOT_ID, b"abc\0");
        assert_eq!(parse(&raw).unwrap().op, Operation::Lookup { name: b"abc" });

        let mut read = Vec::new();
        read.extend_from_slice(&9u64.to_le_bytes());
        read.extend_from_slice(&4096u64.to_le_bytes());
        read.extend_from_slice(&65536u32.to_le_bytes());
        read.resize(40, 0);
        let raw = request(opcode::READ, 3, 77, &read);
        let r = parse(&raw).unwrap();
        assert_eq!(r.header.nodeid, 77);
        assert_eq!(
            r.op,
            Operation::Read(ReadIn {
                fh: 9,
                offset: 4096,
                size: 65536,
                flags: 0
            })
        );

        let mut forget = Vec::new();
        forget.extend_from_slice(&2u32.to_le_bytes());
        forget.extend_from_slice(&0u32.to_le_bytes());
        for v in [5u64, 1, 6, 2] {
            forget.extend_from_slice(&v.to_le_bytes());
        }
        let raw = request(opcode::BATCH_FORGET, 4, 0, &forget);
        let r = parse(&raw).unwrap();
        assert!(!r.wants_reply());
        assert_eq!(
            r.op,
            Operation::BatchForget {
                forgets: vec![(5, 1), (6, 2)]
            }
        );
        let raw = request(9999, 5, 1, b"");
        assert_eq!(parse(&raw).unwrap().op, Operation::Other { opcode: 9999 });
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        assert_eq!(parse(&[0u8; 10]), Err(ParseError::ShortHeader { got: 10 }));
        let mut raw = request(opcode::READ, 7, 1, &[0u8; 12]);
        assert!(matches!(
            parse(&raw),
            Err(ParseError::ShortBody {
                unique: 7,
                need: 40,
                got: 12,
                ..
            })
        ));
        raw[0] = 200;
        assert!(matches!(
            parse(&raw),
            Err(ParseError::LengthMismatch { unique: 7, .. })
        ));
        let raw = request(opcode::LOOKUP, 8, 1, b"abc");
        assert_eq!(
            parse(&raw).unwrap_err(),
            ParseError::UnterminatedName { unique: 8 }
        );
        let mut forget = 5u32.to_le_bytes().to_vec();
        forget.extend_from_slice(&[0u8; 20]);
        let raw = request(opcode::BATCH_FORGET, 9, 0, &forget);
        assert!(matches!(
            parse(&raw),
            Err(ParseError::BadForgetCount { count: 5, .. })
        ));
    }

    #[test]
    fn replies_have_the_kernel_layouts() {
        let attr = FileAttr {
            ino: 5,
            size: 100,
            mode: 0o100444,
            nlink: 1,
            blksize: 4096,
            ..FileAttr::default()
        };
        let e = entry_out(5, 0, Duration::from_secs(3600), &attr);
        assert_eq!(e.len(), 128);
        assert_eq!(u64_at(&e, 0), 5);
        assert_eq!(u64_at(&e, 16), 3600);
        assert_eq!(u64_at(&e, 40 + 8), 100, "attr.size");
        assert_eq!(u32_at(&e, 40 + 48 + 12), 0o100444, "attr.mode");
        assert_eq!(attr_out(Duration::from_secs(1), &attr).len(), 104);
        let h = error_reply(42, libc::ENOENT);
        assert_eq!(u32_at(&h, 0), 16);
        assert_eq!(u32_at(&h, 4) as i32, -libc::ENOENT);
        assert_eq!(u64_at(&h, 8), 42);
        let init = InitOut {
            minor: 41,
            max_readahead: 1 << 17,
            flags: init_flags::ASYNC_READ | init_flags::INIT_EXT | init_flags::PASSTHROUGH,
            max_background: 16,
            congestion_threshold: 12,
            max_write: 4096,
            max_pages: 256,
            max_stack_depth: 1,
        }
        .encode();
        assert_eq!(
            u32_at(&init, 12),
            (init_flags::ASYNC_READ | init_flags::INIT_EXT) as u32
        );
        assert_eq!(u32_at(&init, 32), 1 << 5, "flags2 carries PASSTHROUGH");
        assert_eq!(u32_at(&init, 36), 1);
        let mut d = DirentBuf::new(64);
        assert!(d.push(7, 1, DT_REG, b"abcdefghi"));
        assert!(
            !d.push(8, 2, DT_REG, b"0123456789abcdef0123456789"),
            "would exceed 64"
        );
        let d = d.into_bytes();
        assert_eq!(d.len(), 40);
        assert_eq!(u32_at(&d, 16), 9);
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_bodies_under_a_valid_header_never_panic(
            opcode in 0u32..60, body in proptest::collection::vec(proptest::num::u8::ANY, 0..120)
        ) {
            let raw = request(opcode, 1, 1, &body);
            let _ = parse(&raw);
        }
    }
}
