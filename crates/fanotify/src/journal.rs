//! Failing closed across a daemon's death: the journal of events being
//! served, and the successor's answer to every event it inherits.
//!
//! A pre-content event is answered by the number of the fd the kernel
//! opened for it in the reader's group; an event read but not answered stays
//! pending in the group for as long as the group lives (the fd store keeps
//! it), and its reader waits. So a daemon records each event ([`Record`]:
//! fd number, which file, the range) before it starts filling, and marks it
//! done once answered. Its successor, before it reads any new event (a new
//! event's fd could reuse the number of an inherited one), calls
//! [`recover`]: recorded events are filled and allowed; every other number
//! up to the predecessor's fd limit is denied with `FAN_DENY_ERRNO(EIO)`
//! (numbers with no pending event answer ENOENT and are skipped), so a reader
//! whose event was never recorded gets EIO, never a hole's zeros.
//!
//! Format: one line per step, appended with a single write: `B <fd> <offset>
//! <count> <key>` when an event is taken on, `E <fd>` when it was answered.
//! A line cut short by a crash is ignored (its event is then unknown, and
//! denied). The journal lives in a file of the daemon's run directory; it
//! survives the process, not the machine, which is all the group survives.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use crate::{Group, Response};

/// One event taken on: what a successor needs to finish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The event's fd number (its id in the group).
    pub fd: i32,
    pub offset: u64,
    pub count: u64,
    /// Which file (opaque to this crate; no newline).
    pub key: String,
}

/// The journal file of one daemon.
#[derive(Debug)]
pub struct Journal {
    file: File,
    /// Events begun and not ended by this process: when none is left, the
    /// file is emptied, so it stays as small as what is in flight.
    open: std::collections::BTreeSet<i32>,
}

impl Journal {
    /// Opens (creating, mode 0600) the journal at `path` and returns the
    /// events it holds that were begun and never ended: the predecessor's.
    pub fn open(path: &Path) -> io::Result<(Journal, Vec<Record>)> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
        let inherited = open_records(&text);
        Ok((
            Journal {
                file,
                open: inherited.iter().map(|r| r.fd).collect(),
            },
            inherited,
        ))
    }

    /// Records that the event `r` is being served (before filling it).
    pub fn begin(&mut self, r: &Record) -> io::Result<()> {
        if r.key.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a journal key with a newline",
            ));
        }
        self.append(&format!("B {} {} {} {}\n", r.fd, r.offset, r.count, r.key))?;
        self.open.insert(r.fd);
        Ok(())
    }

    /// Records that the event with fd number `fd` was answered.
    pub fn end(&mut self, fd: i32) -> io::Result<()> {
        if !self.open.remove(&fd) {
            return Ok(());
        }
        if self.open.is_empty() {
            return self.file.set_len(0);
        }
        self.append(&format!("E {fd}\n"))
    }

    /// Empties the journal (after [`recover`] answered what it held).
    pub fn clear(&mut self) -> io::Result<()> {
        self.open.clear();
        self.file.set_len(0)
    }

    fn append(&mut self, line: &str) -> io::Result<()> {
        // One write per line on an O_APPEND file: a crash leaves a whole line
        // or a cut one, never two interleaved.
        self.file.write_all(line.as_bytes())
    }
}

/// The events begun and not ended in `text`, in order. Cut or malformed
/// lines are skipped.
fn open_records(text: &str) -> Vec<Record> {
    let mut open: BTreeMap<i32, (usize, Record)> = BTreeMap::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let Some(line) = line.strip_suffix('\n') else {
            continue; // cut short by a crash
        };
        let mut parts = line.splitn(5, ' ');
        match (
            parts.next(),
            parts.next().and_then(|f| f.parse::<i32>().ok()),
        ) {
            (Some("B"), Some(fd)) => {
                let offset = parts.next().and_then(|v| v.parse().ok());
                let count = parts.next().and_then(|v| v.parse().ok());
                if let (Some(offset), Some(count), Some(key)) = (offset, count, parts.next()) {
                    let r = Record {
                        fd,
                        offset,
                        count,
                        key: key.to_owned(),
                    };
                    open.insert(fd, (n, r));
                }
            }
            (Some("E"), Some(fd)) => {
                open.remove(&fd);
            }
            _ => {}
        }
    }
    let mut v: Vec<_> = open.into_values().collect();
    v.sort_by_key(|(n, _)| *n);
    v.into_iter().map(|(_, r)| r).collect()
}

/// What [`recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Recorded events filled and allowed.
    pub allowed: u64,
    /// Recorded events whose fill failed: denied with EIO.
    pub failed: u64,
    /// Recorded events that were no longer pending (answered before the
    /// predecessor died).
    pub gone: u64,
    /// Unrecorded pending events found by number and denied with EIO.
    pub denied_unknown: u64,
}

/// Answers every event a predecessor left pending in `group`: each of
/// `inherited` is filled with `fill` and allowed (denied with EIO if the fill
/// fails), then every other fd number below `fd_limit` is denied with EIO.
/// Call it before reading any new event from the group.
pub fn recover(
    group: &Group,
    inherited: &[Record],
    fd_limit: i32,
    mut fill: impl FnMut(&Record) -> io::Result<()>,
) -> io::Result<Recovered> {
    let mut done = Recovered::default();
    let mut answered = std::collections::BTreeSet::new();
    for r in inherited {
        answered.insert(r.fd);
        let response = match fill(r) {
            Ok(()) => Response::Allow,
            Err(_) => Response::DenyErrno(libc::EIO),
        };
        match group.respond(r.fd, response) {
            Ok(()) if response == Response::Allow => done.allowed += 1,
            Ok(()) => done.failed += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done.gone += 1,
            Err(e) => return Err(e),
        }
    }
    for fd in 0..fd_limit {
        if answered.contains(&fd) {
            continue;
        }
        match group.respond(fd, Response::DenyErrno(libc::EIO)) {
            Ok(()) => done.denied_unknown += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begun_and_not_ended_events_are_the_open_ones_and_cut_lines_are_ignored() {
        let text =
            "B 7 0 4096 blob-a\nB 8 4096 8192 blob b with spaces\nE 7\nB 9 1 2 c\nE 9\nB 10 5 6 d";
        assert_eq!(
            open_records(text),
            vec![Record {
                fd: 8,
                offset: 4096,
                count: 8192,
                key: "blob b with spaces".into()
            }]
        );
        assert!(open_records("garbage\nB x 1 2 k\nB 1 y 2 k\n").is_empty());
    }

    #[test]
    fn the_journal_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, open) = Journal::open(&path).unwrap();
        assert!(open.is_empty());
        let r = Record {
            fd: 12,
            offset: 1 << 20,
            count: 1 << 16,
            key: "k".into(),
        };
        j.begin(&r).unwrap();
        j.begin(&Record {
            fd: 13,
            ..r.clone()
        })
        .unwrap();
        j.end(13).unwrap();
        assert!(j
            .begin(&Record {
                key: "a\nb".into(),
                ..r.clone()
            })
            .is_err());
        drop(j);
        let (mut j, open) = Journal::open(&path).unwrap();
        assert_eq!(open, vec![r]);
        // The last open event ended: the file is emptied.
        j.end(12).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        j.begin(&Record {
            fd: 14,
            ..open[0].clone()
        })
        .unwrap();
        j.clear().unwrap();
        drop(j);
        assert!(Journal::open(&path).unwrap().1.is_empty());
    }
}
