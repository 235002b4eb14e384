//! The meta blob's *blob trailer*: what the meta blob (and so its fsid, the
//! sha256 of the whole meta blob) vouches for about each data blob's stored
//! form, so an image served from a plain web server chains every byte to the
//! fsid: fsid → meta blob → trailer → chunk table (sha256, size) → unit
//! digests → bytes.
//!
//! # Where it lives
//!
//! Right after the EROFS image, at byte `superblock.blocks * 4096`, to the end
//! of the meta blob. The kernel never reads it: EROFS reads the superblock and
//! then only the blocks its metadata addresses (inodes, directories, chunk
//! indexes, the device table), all below `blocks`; it does not compare the
//! backing file's size with `blocks` (checked on Linux 6.18 with file-backed
//! mounts, and it is the same for the fscache/cachefiles path, which reads the
//! meta blob by block address). `fsck.erofs` (erofs-utils 1.5) accepts the
//! image with the trailer and extracts the same tree. A meta blob without a
//! trailer (built by an older lazypull, or by this crate's
//! [`build_from_layers`](crate::build_from_layers) alone) ends at `blocks`.
//!
//! # Layout (version 1; integers little-endian)
//!
//! ```text
//!    0  magic          8   b"LZPTRLR\0"
//!    8  version        u32 1
//!   12  count          u32 number of entries = the image's extra devices
//!   16  entries        count × 72 bytes, in device table order:
//!         +0  blob         32  SHA-256 of the data blob's uncompressed bytes
//!                              (its name and device tag, as raw bytes)
//!         +32 table_sha256 32  SHA-256 of its chunk table file (`<blob>.table`);
//!                              all zero when the blob is stored plain
//!         +64 table_size   u64 length of that chunk table file; 0 when plain
//!       checksum       32  SHA-256 of every preceding trailer byte
//!       padding            zeros up to the next multiple of 4096 bytes
//! ```
//!
//! The trailer is therefore exactly `16 + 72 * count + 32` bytes rounded up to
//! whole 4 KiB blocks, so a sealed meta blob stays a whole number of blocks,
//! as EROFS images are: the cachefiles transport writes an object's bytes into
//! the kernel's cache file with direct I/O, whole blocks only (a meta blob of
//! 4096 + 120 bytes had its last write refused with EINVAL). A reader refuses
//! any other length, padding that is not zero, a bad magic, an unknown
//! version, a checksum mismatch, an entry that is half plain, and (see
//! [`Image::trailer`]) entries that do not name the device table's blobs in
//! order.
//!
//! [`Image::trailer`]: crate::Image::trailer

use sha2::{Digest, Sha256};

/// First bytes of a blob trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"LZPTRLR\0";
/// The trailer version this crate writes and reads.
pub const TRAILER_VERSION: u32 = 1;
const HEADER: usize = 16;
const ENTRY: usize = 72;
const CHECKSUM: usize = 32;
/// The trailer is padded to whole blocks of this size.
const BLOCK: usize = 4096;

/// What the meta blob says about one data blob's stored form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrailerEntry {
    /// SHA-256 of the blob's uncompressed bytes (its name).
    pub blob: [u8; 32],
    /// The chunk table's SHA-256 and size, or `None` for a blob stored plain
    /// (no chunk table: nothing to verify it by but its whole digest).
    pub table: Option<TableRef>,
}

/// A chunk table file, by digest and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRef {
    /// SHA-256 of the whole table file.
    pub sha256: [u8; 32],
    /// Its length in bytes.
    pub size: u64,
}

impl TrailerEntry {
    /// The blob's name: lowercase hex of [`blob`](Self::blob).
    pub fn name(&self) -> String {
        hex::encode(self.blob)
    }
}

/// The blob trailer of a meta blob.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trailer {
    /// One entry per data blob, in device table order.
    pub entries: Vec<TrailerEntry>,
}

/// Why a blob trailer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrailerError {
    /// Too short, or not the length its count implies.
    #[error("blob trailer is {len} bytes, {why}")]
    Length {
        /// Trailer length.
        len: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The bytes after the EROFS image are not a blob trailer.
    #[error("the {0} bytes after the EROFS image are not a lazypull blob trailer (bad magic)")]
    Magic(usize),
    /// A version this reader does not know.
    #[error("unsupported blob trailer version {0} (this lazypull reads {TRAILER_VERSION})")]
    Version(u32),
    /// The checksum does not match.
    #[error("blob trailer checksum mismatch (trailer corrupt)")]
    Checksum,
    /// An entry with a zero table digest but a size, or the other way round.
    #[error("blob trailer entry {0}: a table digest without a size, or a size without a digest")]
    HalfPlain(usize),
}

impl Trailer {
    /// The trailer's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.entries.len() + CHECKSUM);
        out.extend_from_slice(&TRAILER_MAGIC);
        out.extend_from_slice(&TRAILER_VERSION.to_le_bytes());
        let count = u32::try_from(self.entries.len()).expect("at most 65535 devices");
        out.extend_from_slice(&count.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.blob);
            match e.table {
                Some(t) => {
                    out.extend_from_slice(&t.sha256);
                    out.extend_from_slice(&t.size.to_le_bytes());
                }
                None => out.extend_from_slice(&[0u8; 40]),
            }
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out.resize(out.len().next_multiple_of(BLOCK), 0);
        out
    }

    /// Parses trailer bytes (everything after the EROFS image).
    pub fn decode(bytes: &[u8]) -> Result<Trailer, TrailerError> {
        let len = bytes.len();
        if len < HEADER + CHECKSUM {
            return Err(TrailerError::Length {
                len,
                why: "shorter than its header and checksum",
            });
        }
        if bytes[..8] != TRAILER_MAGIC {
            return Err(TrailerError::Magic(len));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != TRAILER_VERSION {
            return Err(TrailerError::Version(version));
        }
        let count = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        // Checked before anything is allocated from `count`.
        let end = count
            .checked_mul(ENTRY)
            .map(|n| n + HEADER + CHECKSUM)
            .filter(|&end| end.next_multiple_of(BLOCK) == len)
            .ok_or(TrailerError::Length {
                len,
                why: "not the length its entry count implies (rounded up to 4 KiB blocks)",
            })?;
        if bytes[end..].iter().any(|&b| b != 0) {
            return Err(TrailerError::Length {
                len,
                why: "its padding after the checksum is not zero",
            });
        }
        let (body, sum) = bytes[..end].split_at(end - CHECKSUM);
        if Sha256::digest(body).as_slice() != sum {
            return Err(TrailerError::Checksum);
        }
        let mut entries = Vec::with_capacity(count);
        for (i, e) in body[HEADER..].chunks_exact(ENTRY).enumerate() {
            let blob: [u8; 32] = e[..32].try_into().expect("32 bytes");
            let sha256: [u8; 32] = e[32..64].try_into().expect("32 bytes");
            let size = u64::from_le_bytes(e[64..72].try_into().expect("8 bytes"));
            let table = match (sha256 == [0; 32], size == 0) {
                (true, true) => None,
                (false, false) => Some(TableRef { sha256, size }),
                _ => return Err(TrailerError::HalfPlain(i)),
            };
            entries.push(TrailerEntry { blob, table });
        }
        Ok(Trailer { entries })
    }

    /// The entry for data blob `name` (hex), if the trailer lists it.
    pub fn entry(&self, name: &str) -> Option<&TrailerEntry> {
        self.entries.iter().find(|e| e.name() == name)
    }
}

/// `meta` (an EROFS image without a trailer) with `trailer` appended.
pub fn append_trailer(mut meta: Vec<u8>, trailer: &Trailer) -> Vec<u8> {
    meta.extend_from_slice(&trailer.encode());
    meta
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seed: u8, plain: bool) -> TrailerEntry {
        TrailerEntry {
            blob: [seed; 32],
            table: (!plain).then_some(TableRef {
                sha256: [seed | 0x80; 32],
                size: 104 + 48 * u64::from(seed),
            }),
        }
    }

    #[test]
    fn round_trips_and_knows_its_length() {
        let t = Trailer {
            entries: vec![entry(1, false), entry(2, true), entry(3, false)],
        };
        let bytes = t.encode();
        assert_eq!(
            bytes.len(),
            4096,
            "16 + 72 * 3 + 32 bytes, padded to a block"
        );
        assert!(bytes[16 + 72 * 3 + 32..].iter().all(|&b| b == 0));
        assert_eq!(&bytes[..8], b"LZPTRLR\0");
        let many = Trailer {
            entries: (0..60).map(|i| entry(i, i % 3 == 0)).collect(),
        };
        assert_eq!(many.encode().len(), 8192);
        assert_eq!(Trailer::decode(&many.encode()).unwrap(), many);
        assert_eq!(Trailer::decode(&bytes).unwrap(), t);
        assert_eq!(t.entry(&hex::encode([2u8; 32])).unwrap().table, None);
        assert!(t.entry(&hex::encode([9u8; 32])).is_none());
        assert_eq!(
            Trailer::decode(&Trailer::default().encode())
                .unwrap()
                .entries,
            vec![]
        );
    }

    #[test]
    fn refuses_what_it_did_not_write() {
        let bytes = Trailer {
            entries: vec![entry(1, false)],
        }
        .encode();
        assert_eq!(
            Trailer::decode(&bytes[..bytes.len() - 1]),
            Err(TrailerError::Length {
                len: bytes.len() - 1,
                why: "not the length its entry count implies (rounded up to 4 KiB blocks)"
            })
        );
        let mut bad = bytes.clone();
        bad[4000] = 1;
        assert_eq!(
            Trailer::decode(&bad),
            Err(TrailerError::Length {
                len: 4096,
                why: "its padding after the checksum is not zero"
            })
        );
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(Trailer::decode(&bad), Err(TrailerError::Magic(bad.len())));
        let mut bad = bytes.clone();
        bad[8] = 2;
        assert_eq!(Trailer::decode(&bad), Err(TrailerError::Version(2)));
        // A half-plain entry, with a checksum that matches.
        let mut bad = bytes[..16 + 72].to_vec();
        bad[16 + 64..16 + 72].copy_from_slice(&0u64.to_le_bytes());
        let sum = Sha256::digest(&bad);
        bad.extend_from_slice(&sum);
        bad.resize(4096, 0);
        assert_eq!(Trailer::decode(&bad), Err(TrailerError::HalfPlain(0)));
    }

    proptest! {
        #[test]
        fn any_flipped_byte_is_refused_and_any_trailer_round_trips(
            seeds in proptest::collection::vec((any::<u8>(), any::<bool>()), 0..8),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let t = Trailer { entries: seeds.iter().map(|&(s, p)| entry(s, p)).collect() };
            let bytes = t.encode();
            prop_assert_eq!(Trailer::decode(&bytes), Ok(t));
            let mut bad = bytes.clone();
            bad[flip.index(bytes.len())] ^= 1 << bit;
            prop_assert!(Trailer::decode(&bad).is_err());
        }
    }
}
