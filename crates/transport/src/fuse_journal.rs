//! The FUSE request journal: what each serving thread has read from the
//! connection and not answered yet, in a file that outlives the daemon.
//!
//! Why: a FUSE request a daemon has read sits on the connection's
//! *processing* list until someone writes its reply (fs/fuse/dev.c,
//! `fuse_dev_do_read` moves it there; `fuse_dev_do_write` finds it by
//! `unique`). When the daemon dies while an fd store keeps a dup of the same
//! `/dev/fuse` file open, those requests stay there: from Linux 6.9 on,
//! `FUSE_NOTIFY_RESEND` puts them back on the pending list for a successor;
//! before it (Debian 12's and Amazon Linux 2023's 6.1, Ubuntu's 6.5–6.8)
//! nothing does, and their readers would wait forever. The journal lets a
//! successor holding the same file answer each of them by its `unique`.
//!
//! Layout: one [`SLOT`]-byte slot per serving thread, each written with one
//! `pwrite` into one page of the page cache, so a SIGKILL leaves a slot
//! either as it was or as written (a killed process's completed writes stay
//! in the page cache; the journal need not survive a machine crash, which
//! takes the FUSE connection with it). A slot holds a header — state, length,
//! `unique` — and the request's bytes:
//! - `IN_FLIGHT`: read, not yet answered. A successor answers it by handling
//!   the recorded bytes again (a request too large for the slot keeps its
//!   `unique` only, and is answered EIO).
//! - `DONE`: answered; its `unique` stays as a high-water mark (see
//!   [`Pending::high_water`]).
//!
//! The kernel hands out uniques in increasing order and never reuses one
//! within a connection, so replying to a request that was answered after all
//! (the daemon died between its reply and the `DONE` write) is refused with
//! ENOENT and harms nothing.
//!
//! It owns the file's format only; serving and answering are the FUSE
//! transport's.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes per slot: a READ is 80 bytes, a LOOKUP 40 plus the name (blob
/// names are well under 255 bytes), INIT 104 (never journalled).
pub const SLOT: usize = 512;
const HEADER: usize = 16;
const FREE: u32 = 0;
const IN_FLIGHT: u32 = 1;
const DONE: u32 = 2;

/// The journal of a running server: slot `i` is serving thread `i`'s.
#[derive(Debug)]
pub struct RequestJournal {
    file: File,
    path: PathBuf,
    slots: usize,
}

/// A request a previous daemon had read and not answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub unique: u64,
    /// The request as the kernel sent it; `None` if it did not fit its slot.
    pub raw: Option<Vec<u8>>,
}

/// What a previous daemon's journal holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    pub unanswered: Vec<Unanswered>,
    /// The largest `unique` recorded (answered or not): requests the previous
    /// daemon read but was killed before journalling were handed out near it.
    pub high_water: u64,
    /// Slots whose header made no sense (ignored).
    pub damaged: usize,
}

impl RequestJournal {
    /// Starts an empty journal of `slots` slots at `path` (root's only),
    /// replacing what was there: read it first with [`read_pending`].
    pub fn create(path: &Path, slots: usize) -> io::Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| with_path(e, "creating the FUSE request journal", path))?;
        file.set_len((slots * SLOT) as u64)
            .map_err(|e| with_path(e, "sizing the FUSE request journal", path))?;
        Ok(RequestJournal {
            file,
            path: path.to_path_buf(),
            slots,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Records that thread `slot` read `raw` (whose unique is `unique`) and
    /// is about to answer it.
    pub fn begin(&self, slot: usize, unique: u64, raw: &[u8]) -> io::Result<()> {
        let mut buf = [0u8; SLOT];
        let fits = raw.len() <= SLOT - HEADER;
        let len = if fits { raw.len() } else { 0 };
        buf[0..4].copy_from_slice(&IN_FLIGHT.to_le_bytes());
        buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        buf[8..16].copy_from_slice(&unique.to_le_bytes());
        buf[HEADER..HEADER + len].copy_from_slice(&raw[..len]);
        self.write_slot(slot, &buf[..HEADER + len])
    }

    /// Records that thread `slot` answered the request `unique`.
    pub fn end(&self, slot: usize, unique: u64) -> io::Result<()> {
        let mut buf = [0u8; HEADER];
        buf[0..4].copy_from_slice(&DONE.to_le_bytes());
        buf[8..16].copy_from_slice(&unique.to_le_bytes());
        self.write_slot(slot, &buf)
    }

    fn write_slot(&self, slot: usize, bytes: &[u8]) -> io::Result<()> {
        if slot >= self.slots {
            return Err(io::Error::other(format!(
                "FUSE request journal slot {slot} of {}",
                self.slots
            )));
        }
        self.file.write_all_at(bytes, (slot * SLOT) as u64)
    }
}

/// Reads the journal a previous daemon left at `path`; `None` if it left
/// none (nothing is known of what it had taken).
pub fn read_pending(path: &Path) -> io::Result<Option<Pending>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(parse(&bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(with_path(e, "reading the FUSE request journal", path)),
    }
}

/// The slots of a journal file's contents.
pub fn parse(bytes: &[u8]) -> Pending {
    let mut pending = Pending::default();
    for slot in bytes.chunks(SLOT) {
        if slot.len() < HEADER {
            pending.damaged += 1;
            continue;
        }
        let word = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().unwrap());
        let state = word(0);
        let len = word(4) as usize;
        let unique = u64::from_le_bytes(slot[8..16].try_into().unwrap());
        match state {
            FREE if unique == 0 => {}
            DONE if unique != 0 => pending.high_water = pending.high_water.max(unique),
            IN_FLIGHT if unique != 0 && HEADER + len <= slot.len() => {
                pending.high_water = pending.high_water.max(unique);
                pending.unanswered.push(Unanswered {
                    unique,
                    raw: (len > 0).then(|| slot[HEADER..HEADER + len].to_vec()),
                });
            }
            _ => pending.damaged += 1,
        }
    }
    pending.unanswered.sort_by_key(|u| u.unique);
    pending
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_request_read_and_not_answered_is_pending_and_an_answered_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        assert_eq!(read_pending(&path).unwrap(), None);
        let j = RequestJournal::create(&path, 4).unwrap();
        j.begin(0, 10, b"read ten").unwrap();
        j.begin(1, 12, b"read twelve").unwrap();
        j.end(1, 12).unwrap();
        j.begin(3, 14, &[7u8; SLOT]).unwrap(); // too large: unique only
        let p = read_pending(&path).unwrap().unwrap();
        assert_eq!(
            p.unanswered,
            vec![
                Unanswered {
                    unique: 10,
                    raw: Some(b"read ten".to_vec())
                },
                Unanswered {
                    unique: 14,
                    raw: None
                },
            ]
        );
        assert_eq!((p.high_water, p.damaged), (14, 0));
        // A new journal starts empty.
        drop(j);
        RequestJournal::create(&path, 2).unwrap();
        assert_eq!(read_pending(&path).unwrap(), Some(Pending::default()));
        assert!(j_slot_error());
    }

    fn j_slot_error() -> bool {
        let dir = tempfile::tempdir().unwrap();
        let j = RequestJournal::create(&dir.path().join("j"), 1).unwrap();
        j.begin(1, 2, b"x").is_err()
    }

    #[test]
    fn the_journal_is_roots_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        RequestJournal::create(&path, 1).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    proptest! {
        /// Whatever a journal file holds (damaged, truncated, hostile), reading
        /// it never panics, and what it reports as unanswered fits its slot.
        #[test]
        fn any_journal_file_parses_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let p = parse(&bytes);
            for u in &p.unanswered {
                prop_assert!(u.unique != 0);
                prop_assert!(u.raw.as_ref().is_none_or(|r| r.len() <= SLOT - HEADER));
                prop_assert!(u.unique <= p.high_water);
            }
        }

        /// The last write of each slot is what a reader finds.
        #[test]
        fn the_last_write_of_each_slot_wins(ops in proptest::collection::vec((0usize..4, 1u64..1000, any::<bool>(), proptest::collection::vec(any::<u8>(), 0..600)), 0..40)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("j");
            let j = RequestJournal::create(&path, 4).unwrap();
            let mut model: [Option<(u64, bool, Vec<u8>)>; 4] = Default::default();
            for (slot, unique, done, raw) in ops {
                if done { j.end(slot, unique).unwrap() } else { j.begin(slot, unique, &raw).unwrap() }
                model[slot] = Some((unique, done, raw));
            }
            let p = read_pending(&path).unwrap().unwrap();
            let mut expect: Vec<Unanswered> = model.iter().flatten().filter(|m| !m.1).map(|(u, _, raw)| Unanswered {
                unique: *u,
                raw: (raw.len() <= SLOT - HEADER && !raw.is_empty()).then(|| raw.clone()),
            }).collect();
            expect.sort_by_key(|u| u.unique);
            prop_assert_eq!(p.unanswered, expect);
            prop_assert_eq!(p.high_water, model.iter().flatten().map(|m| m.0).max().unwrap_or(0));
            prop_assert_eq!(p.damaged, 0);
        }
    }
}
