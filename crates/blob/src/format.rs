//! The stored-blob format, version 1.
//!
//! A data blob is a byte string of `uncompressed_size` bytes named by the
//! lowercase hex SHA-256 of those bytes (`<digest>`). Its stored form is two
//! files:
//!
//! * `<digest>.zst` — the *stored data*: the blob cut into fixed-size **units**,
//!   each unit stored either as one zstd frame or raw (verbatim), concatenated in
//!   unit order with no padding and nothing else. The name says `.zst` even when
//!   some or all units are raw.
//! * `<digest>.table` — the *chunk table* described below.
//!
//! # Units
//!
//! The unit size `U` is a power of two in `[64 KiB, 64 MiB]` (default 1 MiB,
//! the daemon's fill window). Unit `i` covers the uncompressed range
//! `[i * U, min((i + 1) * U, uncompressed_size))`; only the last unit may be
//! short, and an empty blob has no units. The unit holding offset `off` is
//! `off / U`: lookup needs no search, so uncompressed offsets and lengths are
//! implied by the index and not stored.
//!
//! A unit is stored zstd-compressed only when that makes it strictly smaller than
//! the unit itself; otherwise it is stored raw. A zstd unit must decompress to
//! exactly its unit's length; a reader treats more (or fewer) bytes as corruption.
//!
//! # Chunk table
//!
//! All integers little-endian. Offsets are from the start of the table file.
//!
//! ```text
//! header (72 bytes)
//!    0  magic              8   b"LZPBLOB\0"
//!    8  version            u32 1
//!   12  unit_size          u32 power of two, 65536 ..= 67108864
//!   16  unit_count         u64 ceil(uncompressed_size / unit_size)
//!   24  uncompressed_size  u64
//!   32  stored_size        u64 length of `<digest>.zst` = sum of stored_len
//!   40  digest             32  SHA-256 of the whole uncompressed blob
//! unit entries (48 bytes each, unit_count of them, in unit order)
//!   +0  stored_offset      u64 = sum of the stored_len of all earlier units
//!   +8  stored_len         u32 raw: = unit length; zstd: 1 ..= unit length - 1
//!  +12  kind               u8  0 = raw, 1 = zstd
//!  +13  reserved           3   zero
//!  +16  sha256             32  SHA-256 of the unit's *uncompressed* bytes
//! trailer (32 bytes)
//!       checksum           32  SHA-256 of every preceding byte of the table
//! ```
//!
//! The table length is therefore exactly `72 + 48 * unit_count + 32`. A decoder
//! checks the length, magic and version, then the checksum (so any flipped byte
//! is detected), then every field rule above; a table that passes describes a
//! gap-free, overlap-free layout of the stored data.
//!
//! # Why the per-unit digest is SHA-256
//!
//! BLAKE3 was measured as the per-unit digest (issues 11 and 13) with
//! `lazypull-bench digest` (BENCHMARKS.md, "Per-unit digest"). It would have
//! replaced SHA-256 only if it were at least 1.5× faster at 1 MiB units both
//! natively and under qemu TCG, where the test guest's daemon runs. Natively
//! (SHA-NI, AVX-512) it is 4.4× faster. Under `qemu-x86_64 -cpu max` (qemu 7.2,
//! the guest's CPU model) it is 0.5×, i.e. twice *slower*: qemu emulates the AVX2
//! that BLAKE3 picks, slowly, and has no SHA-NI, so SHA-256 falls back to plain
//! scalar code, which qemu translates well. No BLAKE3 build gets there either:
//! SSE4.1 0.7×, SSE2 1.2×, portable 1.0×. So SHA-256 stays, and the format stays
//! at version 1. The hash is a large share of a unit's decode-and-verify time
//! either way (about 55% natively, 62% under TCG), so the way to cut it is to
//! verify units in parallel with fetching and decoding them, not to change the
//! algorithm.

use std::fmt;
use std::ops::Range;

use sha2::{Digest, Sha256};

/// First bytes of every chunk table.
pub const MAGIC: [u8; 8] = *b"LZPBLOB\0";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Smallest allowed unit size.
pub const MIN_UNIT_SIZE: u32 = 64 << 10;
/// Largest allowed unit size (bounds a reader's memory per unit).
pub const MAX_UNIT_SIZE: u32 = 64 << 20;
/// Default unit size: the daemon's fill window.
pub const DEFAULT_UNIT_SIZE: u32 = 1 << 20;

/// Header length in bytes.
pub const HEADER_LEN: usize = 72;
/// Length of one unit entry in bytes.
pub const ENTRY_LEN: usize = 48;
/// Trailer (checksum) length in bytes.
pub const TRAILER_LEN: usize = 32;

/// The longest chunk table a reader fetches, 64 MiB: the table of a 1 TiB
/// blob at the default 1 MiB units is 48 MiB (2^20 entries of 48 bytes).
/// Tables are fetched whole and kept in memory, so a server must not be able
/// to name a bigger one; blobs beyond that need bigger units.
pub const MAX_TABLE_LEN: u64 = 64 << 20;

/// The longest chunk table a blob of `uncompressed_size` bytes can have: its
/// unit count at the smallest unit size, capped at [`MAX_TABLE_LEN`]. What a
/// reader may fetch for the table of a blob whose size it was told.
pub fn max_table_len(uncompressed_size: u64) -> u64 {
    let units = uncompressed_size.div_ceil(u64::from(MIN_UNIT_SIZE));
    units
        .saturating_mul(ENTRY_LEN as u64)
        .saturating_add((HEADER_LEN + TRAILER_LEN) as u64)
        .min(MAX_TABLE_LEN)
}

/// How one unit is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// The unit's bytes verbatim.
    Raw,
    /// One zstd frame that decompresses to the unit's bytes.
    Zstd,
}

impl UnitKind {
    fn code(self) -> u8 {
        match self {
            UnitKind::Raw => 0,
            UnitKind::Zstd => 1,
        }
    }
}

/// One unit of a blob: where its bytes are, uncompressed and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitEntry {
    /// Offset of the unit in the uncompressed blob (`index * unit_size`).
    pub offset: u64,
    /// Length of the unit in the uncompressed blob.
    pub len: u32,
    /// Offset of the unit's stored bytes in the stored data.
    pub stored_offset: u64,
    /// Length of the unit's stored bytes.
    pub stored_len: u32,
    pub kind: UnitKind,
    /// SHA-256 of the unit's uncompressed bytes.
    pub sha256: [u8; 32],
}

impl UnitEntry {
    /// The unit's uncompressed byte range.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }

    /// The unit's stored byte range.
    pub fn stored_range(&self) -> Range<u64> {
        self.stored_offset..self.stored_offset + u64::from(self.stored_len)
    }
}

/// Why a chunk table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("chunk table is {len} bytes, {why}")]
    Length { len: usize, why: &'static str },
    #[error("not a chunk table (bad magic)")]
    Magic,
    #[error("unsupported chunk table version {0} (this reader knows {VERSION})")]
    Version(u32),
    #[error("chunk table checksum mismatch (table corrupt)")]
    Checksum,
    #[error("invalid unit size {0}: must be a power of two in [{MIN_UNIT_SIZE}, {MAX_UNIT_SIZE}]")]
    UnitSize(u32),
    #[error("unit count {count} does not match uncompressed size {size} at unit size {unit_size}")]
    UnitCount {
        count: u64,
        size: u64,
        unit_size: u32,
    },
    #[error("unit {index}: {why}")]
    Entry { index: u64, why: String },
    #[error("stored size {declared} does not match the sum of unit stored lengths {actual}")]
    StoredSize { declared: u64, actual: u64 },
}

/// The chunk table of one stored blob; see the module documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkTable {
    unit_size: u32,
    uncompressed_size: u64,
    stored_size: u64,
    digest: [u8; 32],
    units: Vec<UnitEntry>,
}

impl fmt::Debug for ChunkTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkTable")
            .field("digest", &self.digest())
            .field("unit_size", &self.unit_size)
            .field("units", &self.units.len())
            .field("uncompressed_size", &self.uncompressed_size)
            .field("stored_size", &self.stored_size)
            .finish()
    }
}

/// Checks a unit size against the format's rules.
pub fn check_unit_size(unit_size: u32) -> Result<(), FormatError> {
    if unit_size.is_power_of_two() && (MIN_UNIT_SIZE..=MAX_UNIT_SIZE).contains(&unit_size) {
        Ok(())
    } else {
        Err(FormatError::UnitSize(unit_size))
    }
}

/// How one unit was stored, as a writer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredUnit {
    pub stored_len: u32,
    pub kind: UnitKind,
    pub sha256: [u8; 32],
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl ChunkTable {
    /// Builds a table from the units of a blob of `uncompressed_size` bytes, in
    /// order, applying every rule `decode` applies.
    pub(crate) fn from_units(
        unit_size: u32,
        uncompressed_size: u64,
        digest: [u8; 32],
        units: &[StoredUnit],
    ) -> Result<Self, FormatError> {
        check_unit_size(unit_size)?;
        let count = units.len() as u64;
        if count != uncompressed_size.div_ceil(u64::from(unit_size)) {
            return Err(FormatError::UnitCount {
                count,
                size: uncompressed_size,
                unit_size,
            });
        }
        let mut entries = Vec::with_capacity(units.len());
        let mut stored_offset = 0u64;
        for (i, u) in units.iter().enumerate() {
            let index = i as u64;
            let offset = index * u64::from(unit_size);
            let len = (uncompressed_size - offset).min(u64::from(unit_size)) as u32;
            let bad = |why: String| FormatError::Entry { index, why };
            match u.kind {
                UnitKind::Raw if u.stored_len != len => {
                    return Err(bad(format!(
                        "raw unit of {len} bytes has stored length {}",
                        u.stored_len
                    )))
                }
                UnitKind::Zstd if u.stored_len == 0 || u.stored_len >= len => {
                    return Err(bad(format!(
                        "zstd unit of {len} bytes has stored length {} (must be 1..{len})",
                        u.stored_len
                    )))
                }
                _ => {}
            }
            entries.push(UnitEntry {
                offset,
                len,
                stored_offset,
                stored_len: u.stored_len,
                kind: u.kind,
                sha256: u.sha256,
            });
            stored_offset += u64::from(u.stored_len);
        }
        Ok(ChunkTable {
            unit_size,
            uncompressed_size,
            stored_size: stored_offset,
            digest,
            units: entries,
        })
    }

    /// Parses and fully validates a table.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let len = bytes.len();
        if len < HEADER_LEN + TRAILER_LEN {
            return Err(FormatError::Length {
                len,
                why: "shorter than header and trailer",
            });
        }
        if bytes[..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let count = u64_at(bytes, 16);
        // Checked before anything is allocated from `count`.
        let expected = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(ENTRY_LEN))
            .and_then(|n| n.checked_add(HEADER_LEN + TRAILER_LEN));
        if expected != Some(len) {
            return Err(FormatError::Length {
                len,
                why: "not the length its unit count implies",
            });
        }
        let (body, checksum) = bytes.split_at(len - TRAILER_LEN);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(FormatError::Checksum);
        }
        let unit_size = u32_at(bytes, 12);
        let uncompressed_size = u64_at(bytes, 24);
        let stored_size = u64_at(bytes, 32);
        let digest: [u8; 32] = bytes[40..72].try_into().expect("32 bytes");
        check_unit_size(unit_size)?;
        if count != uncompressed_size.div_ceil(u64::from(unit_size)) {
            return Err(FormatError::UnitCount {
                count,
                size: uncompressed_size,
                unit_size,
            });
        }
        let mut units = Vec::with_capacity(count as usize);
        let mut expected_offset = 0u64;
        for (i, e) in body[HEADER_LEN..].chunks_exact(ENTRY_LEN).enumerate() {
            let index = i as u64;
            let bad = |why: String| FormatError::Entry { index, why };
            let stored_offset = u64_at(e, 0);
            let stored_len = u32_at(e, 8);
            let kind = match e[12] {
                0 => UnitKind::Raw,
                1 => UnitKind::Zstd,
                k => return Err(bad(format!("unknown kind {k}"))),
            };
            if e[13..16] != [0, 0, 0] {
                return Err(bad("reserved bytes are not zero".into()));
            }
            if stored_offset != expected_offset {
                return Err(bad(format!(
                    "stored offset {stored_offset}, expected {expected_offset}"
                )));
            }
            units.push(StoredUnit {
                stored_len,
                kind,
                sha256: e[16..48].try_into().expect("32 bytes"),
            });
            expected_offset += u64::from(stored_len);
        }
        let table = Self::from_units(unit_size, uncompressed_size, digest, &units)?;
        if table.stored_size != stored_size {
            return Err(FormatError::StoredSize {
                declared: stored_size,
                actual: table.stored_size,
            });
        }
        Ok(table)
    }

    /// The table's bytes; `decode(&t.encode()) == Ok(t)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.units.len() + TRAILER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.unit_size.to_le_bytes());
        out.extend_from_slice(&(self.units.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&self.stored_size.to_le_bytes());
        out.extend_from_slice(&self.digest);
        for u in &self.units {
            out.extend_from_slice(&u.stored_offset.to_le_bytes());
            out.extend_from_slice(&u.stored_len.to_le_bytes());
            out.push(u.kind.code());
            out.extend_from_slice(&[0, 0, 0]);
            out.extend_from_slice(&u.sha256);
        }
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        out
    }

    /// SHA-256 of the table's bytes ([`encode`](Self::encode); decoding is
    /// strict, so that is also the SHA-256 of any bytes it decoded from): what
    /// an image's config or meta blob trailer names the table by.
    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }

    /// The blob's name: lowercase hex SHA-256 of its uncompressed bytes.
    pub fn digest(&self) -> String {
        hex::encode(self.digest)
    }

    pub fn digest_bytes(&self) -> &[u8; 32] {
        &self.digest
    }

    pub fn unit_size(&self) -> u32 {
        self.unit_size
    }

    pub fn unit_count(&self) -> u64 {
        self.units.len() as u64
    }

    pub fn uncompressed_size(&self) -> u64 {
        self.uncompressed_size
    }

    /// Length of the stored data file.
    pub fn stored_size(&self) -> u64 {
        self.stored_size
    }

    pub fn units(&self) -> &[UnitEntry] {
        &self.units
    }

    pub fn unit(&self, index: u64) -> Option<&UnitEntry> {
        usize::try_from(index).ok().and_then(|i| self.units.get(i))
    }

    /// Indexes of the units holding any byte of `[off, off + len)`, clamped to
    /// the blob; empty when `len == 0` or `off` is at or past the end.
    pub fn units_for(&self, off: u64, len: u64) -> Range<u64> {
        let end = off.saturating_add(len).min(self.uncompressed_size);
        if off >= end {
            return 0..0;
        }
        let us = u64::from(self.unit_size);
        off / us..(end - 1) / us + 1
    }
}
