//! A recorded prefetch order (`lazypull optimize`): which byte ranges of
//! which files a workload read first, in the order it first read them.
//!
//! The record is a small JSON blob in the image's repository
//! ([`RECORD_MEDIA_TYPE`]), named from the manifest by two manifest
//! annotations ([`ANNOTATION_DIGEST`], [`ANNOTATION_SIZE`]; see
//! [`crate::lazy::prefetch_record`]). It is not a layer: containerd hands
//! every layer to the snapshotter as a Prepare, and an image with a record
//! must pull and run exactly as the same image without one.
//!
//! ```json
//! {"version":1,"entries":[{"path":"/usr/bin/python3","offset":0,"length":1048576}, ...]}
//! ```
//!
//! Entries name files (absolute, normalised paths) and ranges within them,
//! not blob offsets: the record reads as what the workload did, and whoever
//! applies it maps it through the image's own meta blob (and refuses a record
//! naming a file the image lacks, or a range past a file's end).
//!
//! Only the form and its validation live here: no I/O.

use serde::{Deserialize, Serialize};

/// The media type of a record blob.
pub const RECORD_MEDIA_TYPE: &str = "application/vnd.lazypull.prefetch.v1+json";
/// Manifest annotation: the record blob's digest (`sha256:<hex>`).
pub const ANNOTATION_DIGEST: &str = "org.lazypull.prefetch.digest";
/// Manifest annotation: the record blob's size in bytes (decimal).
pub const ANNOTATION_SIZE: &str = "org.lazypull.prefetch.size";
/// The record version this build reads and writes.
pub const RECORD_VERSION: u32 = 1;
/// Largest record blob accepted (bytes): a record is a few bytes per range
/// read, so this is about a hundred thousand ranges.
pub const MAX_RECORD_SIZE: u64 = 16 << 20;
/// Most entries a record may hold.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Longest path an entry may name (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;

/// One range of one file, read by the recorded workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Absolute path inside the image.
    pub path: String,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes (never 0).
    pub length: u64,
}

impl Entry {
    /// The end of the range (checked not to overflow by [`Record::validate`]).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// A recorded prefetch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    /// In the order the workload first read them.
    pub entries: Vec<Entry>,
}

/// Why a record is refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("malformed prefetch record: {0}")]
    Malformed(String),
    #[error("prefetch record version {0}; this lazypull reads version {RECORD_VERSION}")]
    Version(u32),
    #[error("prefetch record entry {index} ({path:?}): {problem}")]
    Entry {
        index: usize,
        path: String,
        problem: String,
    },
}

/// Whether `p` is an absolute path without empty, `.` or `..` components,
/// NUL bytes or a trailing `/` (and not `/` itself: a record names files).
fn normalised(p: &str) -> bool {
    p.len() > 1
        && p.len() <= MAX_PATH
        && p.starts_with('/')
        && !p.contains('\0')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

impl Record {
    /// A record of `entries`, merged ([`Record::merged`]).
    pub fn new(entries: Vec<Entry>) -> Record {
        Record {
            version: RECORD_VERSION,
            entries,
        }
        .merged()
    }

    /// Parses and validates a record blob.
    pub fn parse(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() as u64 > MAX_RECORD_SIZE {
            return Err(RecordError::Malformed(format!(
                "{} bytes, more than the limit of {MAX_RECORD_SIZE}",
                bytes.len()
            )));
        }
        let r: Record =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        r.validate()?;
        Ok(r)
    }

    /// Checks the version, the number of entries and each entry on its own
    /// (whether the image has the files is the caller's to check).
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.version != RECORD_VERSION {
            return Err(RecordError::Version(self.version));
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err(RecordError::Malformed(format!(
                "{} entries, more than the limit of {MAX_ENTRIES}",
                self.entries.len()
            )));
        }
        for (index, e) in self.entries.iter().enumerate() {
            let bad = |problem: &str| RecordError::Entry {
                index,
                path: e.path.chars().take(200).collect(),
                problem: problem.to_owned(),
            };
            if !normalised(&e.path) {
                return Err(bad(
                    "not a normalised absolute file path (no empty, . or .. components)",
                ));
            }
            if e.length == 0 {
                return Err(bad("length 0"));
            }
            if e.offset.checked_add(e.length).is_none() {
                return Err(bad("offset + length overflows 64 bits"));
            }
        }
        Ok(())
    }

    /// The same order with each entry that continues (or overlaps) the one
    /// before it in the same file merged into it, and entries wholly inside
    /// an earlier entry of the same file dropped: what is read once need not
    /// be fetched twice.
    pub fn merged(mut self) -> Record {
        let mut out: Vec<Entry> = Vec::with_capacity(self.entries.len());
        // Per file, the ranges kept so far (for the "inside an earlier one" test).
        let mut seen: std::collections::HashMap<String, Vec<(u64, u64)>> =
            std::collections::HashMap::new();
        for e in self.entries.drain(..) {
            let (start, end) = (e.offset, e.end());
            if seen
                .get(&e.path)
                .is_some_and(|rs| rs.iter().any(|&(s, t)| s <= start && end <= t))
            {
                continue;
            }
            match out.last_mut() {
                Some(last)
                    if last.path == e.path && start >= last.offset && start <= last.end() =>
                {
                    let new_end = end.max(last.end());
                    if let Some(r) = seen.get_mut(&e.path).and_then(|rs| rs.last_mut()) {
                        r.1 = new_end;
                    }
                    last.length = new_end - last.offset;
                }
                _ => {
                    seen.entry(e.path.clone()).or_default().push((start, end));
                    out.push(e);
                }
            }
        }
        self.entries = out;
        self
    }

    /// Total bytes named.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.length).sum()
    }

    /// The blob's bytes (compact JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, offset: u64, length: u64) -> Entry {
        Entry {
            path: path.into(),
            offset,
            length,
        }
    }

    #[test]
    fn round_trips_and_keeps_the_order() {
        let r = Record::new(vec![e("/c", 0, 10), e("/a", 5, 5), e("/b", 0, 1)]);
        let back = Record::parse(&r.to_bytes()).unwrap();
        assert_eq!(back, r);
        let paths: Vec<_> = back.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/c", "/a", "/b"]);
        assert_eq!(back.bytes(), 16);
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(
            text.starts_with(r#"{"version":1,"entries":[{"path":"/c","offset":0,"length":10}"#),
            "{text}"
        );
    }

    #[test]
    fn merging_joins_what_continues_and_drops_what_was_read() {
        let r = Record::new(vec![
            e("/a", 0, 4096),
            e("/a", 4096, 4096), // continues: joined
            e("/a", 6000, 4000), // overlaps the end: joined
            e("/b", 0, 100),
            e("/a", 0, 8192),   // inside what /a read already: dropped
            e("/a", 20000, 10), // a new range of /a: kept, in its place
            e("/b", 50, 100),   // not right after /b's entry: kept (order matters)
        ]);
        assert_eq!(
            r.entries,
            vec![
                e("/a", 0, 10000),
                e("/b", 0, 100),
                e("/a", 20000, 10),
                e("/b", 50, 100),
            ]
        );
        // Merging is idempotent.
        assert_eq!(r.clone().merged(), r);
    }

    #[test]
    fn hostile_records_are_refused_naming_the_problem() {
        let refused = |json: &str| Record::parse(json.as_bytes()).unwrap_err().to_string();
        let has = |err: String, part: &str| assert!(err.contains(part), "{part:?} not in {err}");
        has(refused(r#"{"version":2,"entries":[]}"#), "version 2");
        has(refused(r#"{"version":1}"#), "malformed");
        has(
            refused(r#"{"version":1,"entries":[],"x":1}"#),
            "unknown field",
        );
        has(
            refused(r#"{"version":1,"entries":[{"path":"/a","offset":0,"length":1,"blob":"x"}]}"#),
            "unknown field",
        );
        for bad in ["a", "/", "/a/../b", "/a//b", "/a/", "/./a", "", "/a\u{0}b"] {
            let json =
                serde_json::json!({"version":1,"entries":[{"path":bad,"offset":0,"length":1}]});
            has(refused(&json.to_string()), "entry 0");
        }
        has(
            refused(r#"{"version":1,"entries":[{"path":"/a","offset":0,"length":0}]}"#),
            "length 0",
        );
        has(
            refused(
                r#"{"version":1,"entries":[{"path":"/a","offset":18446744073709551615,"length":2}]}"#,
            ),
            "overflows",
        );
        has(
            refused(r#"{"version":1,"entries":[{"path":"/a","offset":-1,"length":2}]}"#),
            "malformed",
        );
        let huge = vec![b' '; MAX_RECORD_SIZE as usize + 1];
        has(Record::parse(&huge).unwrap_err().to_string(), "limit");
        let many = Record {
            version: 1,
            entries: vec![e("/a", 0, 1); MAX_ENTRIES + 1],
        };
        has(many.validate().unwrap_err().to_string(), "entries");
        Record::parse(br#"{"version":1,"entries":[]}"#).unwrap();
    }
}
