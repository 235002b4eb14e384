//! Binary requests read from `/dev/cachefiles` in on-demand mode.
//!
//! Every request starts with `struct cachefiles_msg` (16 bytes, little-endian on
//! x86 like all native kernel structs here):
//!
//! ```text
//! u32 msg_id; u32 opcode; u32 len; u32 object_id; u8 data[];
//! ```
//!
//! `len` counts the whole message including this header. The payload is
//! `struct cachefiles_open` + keys for OPEN, nothing for CLOSE and
//! `struct cachefiles_read` for READ. Parsing is strict: trailing bytes, short
//! payloads, keys that overrun the message and unknown opcodes are all errors.

use std::fmt;

/// `CACHEFILES_MSG_MAX_SIZE`: the kernel never hands out a larger request, and
/// `read()` with a smaller buffer than the pending request fails with EMSGSIZE.
pub const MSG_MAX_SIZE: usize = 1024;
/// `sizeof(struct cachefiles_msg)`.
pub const MSG_HEADER_SIZE: usize = 16;
/// `sizeof(struct cachefiles_open)`.
pub const OPEN_HEADER_SIZE: usize = 16;
/// `sizeof(struct cachefiles_read)`.
pub const READ_BODY_SIZE: usize = 16;

pub const OP_OPEN: u32 = 0;
pub const OP_CLOSE: u32 = 1;
pub const OP_READ: u32 = 2;

/// A request from the kernel, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Open(OpenRequest),
    Close(CloseRequest),
    Read(ReadRequest),
}

impl Request {
    pub fn msg_id(&self) -> u32 {
        match self {
            Request::Open(r) => r.msg_id,
            Request::Close(r) => r.msg_id,
            Request::Read(r) => r.msg_id,
        }
    }

    pub fn object_id(&self) -> u32 {
        match self {
            Request::Open(r) => r.object_id,
            Request::Close(r) => r.object_id,
            Request::Read(r) => r.object_id,
        }
    }
}

/// OPEN: the kernel looked up a cache object and installed an anonymous fd for it
/// in the reader's fd table; the daemon must answer with `copen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    pub msg_id: u32,
    pub object_id: u32,
    /// Raw volume key as sent, its trailing NUL included (`erofs,<domain_id|fsid>\0`).
    pub volume_key: Vec<u8>,
    /// Raw cookie key as sent (the fsid, a `device=` name, or a 64-byte tag).
    pub cookie_key: Vec<u8>,
    /// The anonymous fd number, already open in this process.
    pub fd: u32,
    pub flags: u32,
}

impl OpenRequest {
    /// The volume key without its trailing NUL padding.
    pub fn volume(&self) -> &[u8] {
        trim_at_nul(&self.volume_key)
    }

    /// The cookie key up to its first NUL: EROFS device-table tags are a fixed
    /// 64 bytes, NUL-padded when shorter.
    pub fn cookie(&self) -> &[u8] {
        trim_at_nul(&self.cookie_key)
    }
}

/// CLOSE: the kernel is done with an object; the daemon must close its fd(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    pub msg_id: u32,
    pub object_id: u32,
}

/// READ: a reader missed the cache for `[off, off + len)` of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub msg_id: u32,
    pub object_id: u32,
    pub off: u64,
    pub len: u64,
}

impl ReadRequest {
    /// End of the requested range (parsing guarantees it does not overflow).
    pub fn end(&self) -> u64 {
        self.off + self.len
    }
}

/// Why a request could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message of {got} bytes is shorter than the {MSG_HEADER_SIZE}-byte header")]
    ShortHeader { got: usize },
    #[error("message header says len={declared} but {got} bytes were read")]
    LengthMismatch { declared: u32, got: usize },
    #[error("message len={0} exceeds the protocol maximum of {MSG_MAX_SIZE}")]
    TooLong(usize),
    #[error("unknown opcode {opcode} (msg_id {msg_id})")]
    UnknownOpcode { msg_id: u32, opcode: u32 },
    #[error("{op} payload is {got} bytes, expected {expected} (msg_id {msg_id})")]
    BadPayloadSize {
        op: &'static str,
        msg_id: u32,
        got: usize,
        expected: usize,
    },
    #[error("OPEN keys overrun the message: volume {volume} + cookie {cookie} bytes, {available} available (msg_id {msg_id})")]
    KeysOverrun {
        msg_id: u32,
        volume: u32,
        cookie: u32,
        available: usize,
    },
    #[error("READ range off={off} len={len} overflows (msg_id {msg_id})")]
    RangeOverflow { msg_id: u32, off: u64, len: u64 },
}

impl ParseError {
    /// The msg_id, when the header was readable: lets the caller refuse the request
    /// (e.g. `copen <id>,-EINVAL`) instead of leaving the kernel waiting.
    pub fn msg_id(&self) -> Option<u32> {
        match *self {
            ParseError::ShortHeader { .. }
            | ParseError::LengthMismatch { .. }
            | ParseError::TooLong(_) => None,
            ParseError::UnknownOpcode { msg_id, .. }
            | ParseError::BadPayloadSize { msg_id, .. }
            | ParseError::KeysOverrun { msg_id, .. }
            | ParseError::RangeOverflow { msg_id, .. } => Some(msg_id),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

fn trim_at_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

/// Parses one request exactly as returned by one `read()` of the device.
pub fn parse(buf: &[u8]) -> Result<Request, ParseError> {
    if buf.len() < MSG_HEADER_SIZE {
        return Err(ParseError::ShortHeader { got: buf.len() });
    }
    if buf.len() > MSG_MAX_SIZE {
        return Err(ParseError::TooLong(buf.len()));
    }
    let msg_id = u32_at(buf, 0);
    let opcode = u32_at(buf, 4);
    let len = u32_at(buf, 8);
    let object_id = u32_at(buf, 12);
    if len as usize != buf.len() {
        return Err(ParseError::LengthMismatch {
            declared: len,
            got: buf.len(),
        });
    }
    let body = &buf[MSG_HEADER_SIZE..];
    match opcode {
        OP_OPEN => {
            if body.len() < OPEN_HEADER_SIZE {
                return Err(ParseError::BadPayloadSize {
                    op: "OPEN",
                    msg_id,
                    got: body.len(),
                    expected: OPEN_HEADER_SIZE,
                });
            }
            let volume = u32_at(body, 0);
            let cookie = u32_at(body, 4);
            let fd = u32_at(body, 8);
            let flags = u32_at(body, 12);
            let keys = &body[OPEN_HEADER_SIZE..];
            let wanted = volume as u64 + cookie as u64;
            if wanted != keys.len() as u64 {
                return Err(ParseError::KeysOverrun {
                    msg_id,
                    volume,
                    cookie,
                    available: keys.len(),
                });
            }
            let (volume_key, cookie_key) = keys.split_at(volume as usize);
            Ok(Request::Open(OpenRequest {
                msg_id,
                object_id,
                volume_key: volume_key.to_vec(),
                cookie_key: cookie_key.to_vec(),
                fd,
                flags,
            }))
        }
        OP_CLOSE => {
            if !body.is_empty() {
                return Err(ParseError::BadPayloadSize {
                    op: "CLOSE",
                    msg_id,
                    got: body.len(),
                    expected: 0,
                });
            }
            Ok(Request::Close(CloseRequest { msg_id, object_id }))
        }
        OP_READ => {
            if body.len() != READ_BODY_SIZE {
                return Err(ParseError::BadPayloadSize {
                    op: "READ",
                    msg_id,
                    got: body.len(),
                    expected: READ_BODY_SIZE,
                });
            }
            let off = u64_at(body, 0);
            let len = u64_at(body, 8);
            if off.checked_add(len).is_none() {
                return Err(ParseError::RangeOverflow { msg_id, off, len });
            }
            Ok(Request::Read(ReadRequest {
                msg_id,
                object_id,
                off,
                len,
            }))
        }
        _ => Err(ParseError::UnknownOpcode { msg_id, opcode }),
    }
}

/// Encodes a request the way the kernel lays it out. The inverse of [`parse`], used
/// by tests and by in-process models of the kernel side.
pub fn encode(req: &Request) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let (msg_id, opcode, object_id) = match req {
        Request::Open(r) => (r.msg_id, OP_OPEN, r.object_id),
        Request::Close(r) => (r.msg_id, OP_CLOSE, r.object_id),
        Request::Read(r) => (r.msg_id, OP_READ, r.object_id),
    };
    out.extend_from_slice(&msg_id.to_le_bytes());
    out.extend_from_slice(&opcode.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // len, patched below
    out.extend_from_slice(&object_id.to_le_bytes());
    match req {
        Request::Open(r) => {
            out.extend_from_slice(&(r.volume_key.len() as u32).to_le_bytes());
            out.extend_from_slice(&(r.cookie_key.len() as u32).to_le_bytes());
            out.extend_from_slice(&r.fd.to_le_bytes());
            out.extend_from_slice(&r.flags.to_le_bytes());
            out.extend_from_slice(&r.volume_key);
            out.extend_from_slice(&r.cookie_key);
        }
        Request::Close(_) => {}
        Request::Read(r) => {
            out.extend_from_slice(&r.off.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
        }
    }
    let len = out.len() as u32;
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Open(r) => write!(
                f,
                "OPEN msg={} object={} volume={:?} cookie={:?} fd={} flags={:#x}",
                r.msg_id,
                r.object_id,
                String::from_utf8_lossy(r.volume()),
                String::from_utf8_lossy(r.cookie()),
                r.fd,
                r.flags
            ),
            Request::Close(r) => write!(f, "CLOSE msg={} object={}", r.msg_id, r.object_id),
            Request::Read(r) => write!(
                f,
                "READ msg={} object={} off={} len={}",
                r.msg_id, r.object_id, r.off, r.len
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn open(volume: &[u8], cookie: &[u8]) -> Request {
        Request::Open(OpenRequest {
            msg_id: 7,
            object_id: 3,
            volume_key: volume.to_vec(),
            cookie_key: cookie.to_vec(),
            fd: 12,
            flags: 0,
        })
    }

    #[test]
    fn open_round_trips_and_trims_keys() {
        let req = open(b"erofs,img\0", b"img");
        let bytes = encode(&req);
        assert_eq!(bytes.len(), 16 + 16 + 10 + 3);
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed, req);
        let Request::Open(o) = parsed else { panic!() };
        assert_eq!(o.volume(), b"erofs,img");
        assert_eq!(o.cookie(), b"img");
    }

    #[test]
    fn tag_cookie_is_trimmed_at_first_nul() {
        let mut tag = [0u8; 64];
        tag[..4].copy_from_slice(b"blob");
        let Request::Open(o) = parse(&encode(&open(b"erofs,d\0", &tag))).unwrap() else {
            panic!()
        };
        assert_eq!(o.cookie(), b"blob");
        // A full 64-byte tag has no NUL at all and is kept whole.
        let full = [b'a'; 64];
        let Request::Open(o) = parse(&encode(&open(b"erofs,d\0", &full))).unwrap() else {
            panic!()
        };
        assert_eq!(o.cookie(), &full[..]);
    }

    #[test]
    fn close_and_read_round_trip() {
        for req in [
            Request::Close(CloseRequest {
                msg_id: 1,
                object_id: 2,
            }),
            Request::Read(ReadRequest {
                msg_id: 9,
                object_id: 2,
                off: 1 << 40,
                len: 131072,
            }),
        ] {
            assert_eq!(parse(&encode(&req)).unwrap(), req);
        }
    }

    #[test]
    fn length_disagreement_is_an_error() {
        let mut b = encode(&open(b"erofs,x\0", b"x"));
        b.push(0);
        assert!(matches!(parse(&b), Err(ParseError::LengthMismatch { .. })));
        let b = encode(&open(b"erofs,x\0", b"x"));
        assert!(matches!(
            parse(&b[..b.len() - 1]),
            Err(ParseError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn keys_overrunning_the_message_are_an_error() {
        let mut b = encode(&open(b"erofs,x\0", b"x"));
        b[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // cookie_key_size
        let err = parse(&b).unwrap_err();
        assert!(matches!(err, ParseError::KeysOverrun { .. }), "{err}");
        assert_eq!(err.msg_id(), Some(7));
    }

    #[test]
    fn unknown_opcode_and_bad_sizes() {
        let mut b = encode(&Request::Close(CloseRequest {
            msg_id: 5,
            object_id: 1,
        }));
        b[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            parse(&b),
            Err(ParseError::UnknownOpcode {
                msg_id: 5,
                opcode: 3
            })
        );
        // READ with a CLOSE-sized body.
        b[4..8].copy_from_slice(&OP_READ.to_le_bytes());
        assert!(matches!(
            parse(&b),
            Err(ParseError::BadPayloadSize { op: "READ", .. })
        ));
        assert!(matches!(
            parse(&[0; 8]),
            Err(ParseError::ShortHeader { got: 8 })
        ));
    }

    #[test]
    fn read_range_overflow_is_an_error() {
        let b = encode(&Request::Read(ReadRequest {
            msg_id: 1,
            object_id: 1,
            off: u64::MAX - 10,
            len: 11,
        }));
        assert!(matches!(parse(&b), Err(ParseError::RangeOverflow { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_headers_with_consistent_len_never_panic(
            msg_id in any::<u32>(), opcode in 0u32..5, object_id in any::<u32>(),
            vol in any::<u32>(), cookie in any::<u32>(),
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut b = Vec::new();
            for v in [msg_id, opcode, 0, object_id, vol % 300, cookie] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&tail);
            let len = b.len() as u32;
            b[8..12].copy_from_slice(&len.to_le_bytes());
            if let Ok(req) = parse(&b) {
                // Whatever parses re-encodes to the same bytes.
                prop_assert_eq!(encode(&req), b);
            }
        }

        #[test]
        fn valid_opens_round_trip(
            vol in proptest::collection::vec(any::<u8>(), 0..400),
            cookie in proptest::collection::vec(any::<u8>(), 0..400),
            fd in any::<u32>(), flags in any::<u32>(),
        ) {
            let req = Request::Open(OpenRequest { msg_id: 1, object_id: 2, volume_key: vol, cookie_key: cookie, fd, flags });
            let b = encode(&req);
            if b.len() <= MSG_MAX_SIZE {
                prop_assert_eq!(parse(&b).unwrap(), req);
            } else {
                prop_assert!(matches!(parse(&b), Err(ParseError::TooLong(_))));
            }
        }
    }
}
