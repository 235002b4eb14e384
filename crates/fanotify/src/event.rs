//! Events as `read(2)` on a fanotify group returns them, and responses.
//!
//! Layout (`include/uapi/linux/fanotify.h`): each event is a
//! `struct fanotify_event_metadata` (24 bytes: `event_len` u32, `vers` u8,
//! `reserved` u8, `metadata_len` u16, `mask` u64, `fd` i32, `pid` i32)
//! followed, up to `event_len`, by info records, each starting with a
//! `struct fanotify_event_info_header` (`info_type` u8, `pad` u8, `len` u16).
//! A pre-content event carries `FAN_EVENT_INFO_TYPE_RANGE` (6):
//! `struct fanotify_event_info_range` (header, `pad` u32, `offset` u64,
//! `count` u64; 24 bytes).

/// `FANOTIFY_METADATA_VERSION`.
pub const METADATA_VERSION: u8 = 3;
/// `sizeof(struct fanotify_event_metadata)`.
pub const METADATA_LEN: usize = 24;
/// `FAN_PRE_ACCESS`: a read is about to happen; answer before it does.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_Q_OVERFLOW`: the queue overflowed and events were lost.
pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
/// `FAN_EVENT_INFO_TYPE_RANGE`.
pub const INFO_TYPE_RANGE: u8 = 6;
/// `sizeof(struct fanotify_event_info_range)`.
pub const RANGE_INFO_LEN: usize = 24;
/// `FAN_ALLOW`.
pub const FAN_ALLOW: u32 = 0x01;
/// `FAN_DENY`.
pub const FAN_DENY: u32 = 0x02;
/// `FAN_NOFD`: the event has no fd (an overflow).
pub const FAN_NOFD: i32 = -1;

/// One event, its fd still a number: [`crate::Group::read_events`] turns it
/// into an owned fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub mask: u64,
    /// The fd the kernel opened on the file for this event (it is also the
    /// event's id in the response), or [`FAN_NOFD`].
    pub fd: i32,
    pub pid: i32,
    /// The range the access covers (`offset`, `count`), for pre-content events.
    pub range: Option<(u64, u64)>,
}

impl Event {
    pub fn is_pre_access(&self) -> bool {
        self.mask & FAN_PRE_ACCESS != 0
    }

    pub fn is_overflow(&self) -> bool {
        self.mask & FAN_Q_OVERFLOW != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("event at byte {at}: {have} bytes left, a metadata header needs 24")]
    Short { at: usize, have: usize },
    #[error("event at byte {at}: metadata version {version}, this reader knows version 3")]
    Version { at: usize, version: u8 },
    #[error("event at byte {at}: event_len {event_len} / metadata_len {metadata_len} do not fit the {have} bytes read")]
    Length {
        at: usize,
        event_len: u32,
        metadata_len: u16,
        have: usize,
    },
    #[error("event at byte {at}: info record at +{offset}: length {len} overruns the event or is too short")]
    Info { at: usize, offset: usize, len: u16 },
    #[error("event at byte {at}: two range records")]
    TwoRanges { at: usize },
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Parses the events in `buf` (what one `read(2)` returned). Unknown info
/// records are skipped (by their length); every length is checked first.
pub fn parse(buf: &[u8]) -> Result<Vec<Event>, ParseError> {
    let mut events = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        if rest.len() < METADATA_LEN {
            return Err(ParseError::Short {
                at,
                have: rest.len(),
            });
        }
        let event_len = u32_at(rest, 0);
        let version = rest[4];
        let metadata_len = u16_at(rest, 6);
        if version != METADATA_VERSION {
            return Err(ParseError::Version { at, version });
        }
        let len = event_len as usize;
        if len < METADATA_LEN
            || len > rest.len()
            || (metadata_len as usize) < METADATA_LEN
            || metadata_len as usize > len
        {
            return Err(ParseError::Length {
                at,
                event_len,
                metadata_len,
                have: rest.len(),
            });
        }
        let mask = u64_at(rest, 8);
        let fd = u32_at(rest, 16) as i32;
        let pid = u32_at(rest, 20) as i32;
        let mut range = None;
        let mut off = metadata_len as usize;
        while off < len {
            if len - off < 4 {
                return Err(ParseError::Info {
                    at,
                    offset: off,
                    len: 0,
                });
            }
            let info_type = rest[off];
            let info_len = u16_at(rest, off + 2);
            let l = info_len as usize;
            if l < 4 || l > len - off {
                return Err(ParseError::Info {
                    at,
                    offset: off,
                    len: info_len,
                });
            }
            if info_type == INFO_TYPE_RANGE {
                if l < RANGE_INFO_LEN {
                    return Err(ParseError::Info {
                        at,
                        offset: off,
                        len: info_len,
                    });
                }
                if range.is_some() {
                    return Err(ParseError::TwoRanges { at });
                }
                range = Some((u64_at(rest, off + 8), u64_at(rest, off + 16)));
            }
            off += l;
        }
        events.push(Event {
            mask,
            fd,
            pid,
            range,
        });
        at += len;
    }
    Ok(events)
}

/// An answer to a permission (or pre-content) event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Allow,
    /// `FAN_DENY_ERRNO(errno)`: the reader's call fails with `errno` (the
    /// kernel accepts EIO, EPERM, EBUSY, ETXTBSY, EAGAIN, ENOSPC, EDQUOT for
    /// pre-content groups). A plain `FAN_DENY` would give the reader EPERM.
    DenyErrno(i32),
}

impl Response {
    /// The `response` field of `struct fanotify_response`.
    pub fn bits(self) -> u32 {
        match self {
            Response::Allow => FAN_ALLOW,
            // FAN_ERRNO_BITS 8 at FAN_ERRNO_SHIFT 24.
            Response::DenyErrno(e) => FAN_DENY | (((e as u32) & 0xff) << 24),
        }
    }

    /// `struct fanotify_response { __s32 fd; __u32 response; }` for the event
    /// whose fd is `fd`.
    pub fn encode(self, fd: i32) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&fd.to_ne_bytes());
        out[4..].copy_from_slice(&self.bits().to_ne_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(mask: u64, fd: i32, pid: i32, range: Option<(u64, u64)>) -> Vec<u8> {
        let len = METADATA_LEN + if range.is_some() { RANGE_INFO_LEN } else { 0 };
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.push(METADATA_VERSION);
        b.push(0);
        b.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        if let Some((o, c)) = range {
            b.push(INFO_TYPE_RANGE);
            b.push(0);
            b.extend_from_slice(&(RANGE_INFO_LEN as u16).to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&o.to_ne_bytes());
            b.extend_from_slice(&c.to_ne_bytes());
        }
        b
    }

    #[test]
    fn events_with_and_without_a_range_parse() {
        let mut buf = event(FAN_PRE_ACCESS, 7, 42, Some((4096, 8192)));
        buf.extend(event(FAN_Q_OVERFLOW, FAN_NOFD, 0, None));
        let ev = parse(&buf).unwrap();
        assert_eq!(ev.len(), 2);
        assert!(ev[0].is_pre_access());
        assert_eq!(
            (ev[0].fd, ev[0].pid, ev[0].range),
            (7, 42, Some((4096, 8192)))
        );
        assert!(ev[1].is_overflow());
        assert_eq!(ev[1].range, None);
    }

    #[test]
    fn lengths_that_do_not_fit_are_errors() {
        let good = event(FAN_PRE_ACCESS, 7, 42, Some((0, 1)));
        assert!(matches!(parse(&good[..10]), Err(ParseError::Short { .. })));
        let mut long = good.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(parse(&long), Err(ParseError::Length { .. })));
        let mut bad_info = good.clone();
        bad_info[METADATA_LEN + 2..METADATA_LEN + 4].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(parse(&bad_info), Err(ParseError::Info { .. })));
        let mut short_range = good.clone();
        short_range[METADATA_LEN + 2..METADATA_LEN + 4].copy_from_slice(&8u16.to_ne_bytes());
        assert!(matches!(parse(&short_range), Err(ParseError::Info { .. })));
        let mut v = good.clone();
        v[4] = 2;
        assert!(matches!(parse(&v), Err(ParseError::Version { .. })));
    }

    #[test]
    fn responses_encode_as_the_kernel_reads_them() {
        assert_eq!(Response::Allow.bits(), 1);
        // FAN_DENY_ERRNO(EIO) = FAN_DENY | (5 << 24).
        assert_eq!(Response::DenyErrno(libc::EIO).bits(), 0x0500_0002);
        let r = Response::DenyErrno(libc::EIO).encode(9);
        assert_eq!(&r[..4], &9i32.to_ne_bytes());
        assert_eq!(&r[4..], &0x0500_0002u32.to_ne_bytes());
    }

    proptest! {
        /// Arbitrary bytes never panic the parser; what parses re-encodes to
        /// a sequence of events of the lengths it consumed.
        #[test]
        fn arbitrary_bytes_are_an_error_or_events(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&buf);
        }

        #[test]
        fn well_formed_events_round_trip(
            evs in proptest::collection::vec((any::<u64>(), any::<i32>(), any::<i32>(), proptest::option::of((any::<u64>(), any::<u64>()))), 0..8)
        ) {
            let mut buf = Vec::new();
            for (m, fd, pid, r) in &evs {
                buf.extend(event(*m, *fd, *pid, *r));
            }
            let got = parse(&buf).unwrap();
            prop_assert_eq!(got.len(), evs.len());
            for (g, (m, fd, pid, r)) in got.iter().zip(&evs) {
                prop_assert_eq!((g.mask, g.fd, g.pid, g.range), (*m, *fd, *pid, *r));
            }
        }
    }
}
