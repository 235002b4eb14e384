//! Corruption cases that need hand-built tables (crate-private constructors).

use std::io;

use lazypull_source::BlobSource;
use sha2::{Digest, Sha256};

use crate::format::{ChunkTable, StoredUnit, UnitKind, MIN_UNIT_SIZE};
use crate::{StoredBlob, StoredRead};

/// Stored bytes in memory.
#[derive(Debug)]
struct Mem(Vec<u8>);

impl StoredRead for Mem {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let start = usize::try_from(off).unwrap();
        match self.0.get(start..start + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// A blob of one full raw unit then a 100-byte tail whose stored zstd frame is
/// `frame` while the table declares the tail to be `tail`.
fn blob_with_tail(tail: &[u8], frame: Vec<u8>) -> (Vec<u8>, StoredBlob<Mem>) {
    assert_eq!(tail.len(), 100);
    let unit = MIN_UNIT_SIZE as usize;
    let head: Vec<u8> = (0..unit).map(|i| (i * 7 % 251) as u8).collect();
    let mut whole = head.clone();
    whole.extend_from_slice(tail);
    let units = [
        StoredUnit {
            stored_len: unit as u32,
            kind: UnitKind::Raw,
            sha256: sha(&head),
        },
        StoredUnit {
            stored_len: frame.len() as u32,
            kind: UnitKind::Zstd,
            sha256: sha(tail),
        },
    ];
    let table =
        ChunkTable::from_units(MIN_UNIT_SIZE, whole.len() as u64, sha(&whole), &units).unwrap();
    let mut stored = head;
    stored.extend_from_slice(&frame);
    assert_eq!(stored.len() as u64, table.stored_size());
    // The table survives its own encoding.
    assert_eq!(ChunkTable::decode(&table.encode()).unwrap(), table);
    (whole, StoredBlob::new("b".into(), table, Mem(stored)))
}

fn expect_invalid(err: io::Error, unit: u64, cause: &str) {
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("unit {unit}:")), "{msg}");
    assert!(msg.contains("blob b"), "{msg}");
    assert!(msg.contains(cause), "{msg}");
}

#[test]
fn honest_hand_built_blob_reads_back() {
    let tail = [9u8; 100];
    let (whole, blob) = blob_with_tail(&tail, zstd::bulk::compress(&tail, 3).unwrap());
    let mut buf = vec![0u8; whole.len() + 50];
    assert_eq!(blob.read_at(&mut buf, 0).unwrap(), whole.len());
    assert_eq!(&buf[..whole.len()], &whole[..]);
}

#[test]
fn unit_decompressing_to_more_than_declared_is_refused() {
    let tail = [0u8; 100];
    // A frame of 200 zeros whose first 100 bytes even match the declared hash.
    let frame = zstd::bulk::compress(&[0u8; 200], 3).unwrap();
    assert!(frame.len() < 100);
    let (whole, blob) = blob_with_tail(&tail, frame);
    let unit = MIN_UNIT_SIZE as u64;
    // Whole tail unit (direct path) and a part of it (scratch path).
    for (off, len) in [(unit, 100), (unit + 10, 20), (unit - 5, 50)] {
        let mut buf = vec![0xAAu8; len];
        let err = blob.read_at(&mut buf, off).unwrap_err();
        expect_invalid(err, 1, "decompression failed");
        // Nothing unverified is left behind: unit 0's verified bytes may have
        // been copied, unit 1's range holds no decompressed byte.
        for (i, &b) in buf.iter().enumerate() {
            let p = off + i as u64;
            let ok = b == 0xAA
                || if p < unit {
                    b == whole[p as usize]
                } else {
                    b == 0
                };
            assert!(ok, "stale byte {b:#x} at {p}");
        }
    }
    // The other unit is untouched.
    let mut buf = vec![0u8; 1000];
    assert_eq!(blob.read_at(&mut buf, 5).unwrap(), 1000);
    assert_eq!(buf, whole[5..1005]);
}

#[test]
fn unit_decompressing_to_less_than_declared_is_refused() {
    let frame = zstd::bulk::compress(&[0u8; 50], 3).unwrap();
    let (_, blob) = blob_with_tail(&[0u8; 100], frame);
    let mut buf = vec![0u8; 100];
    let err = blob.read_at(&mut buf, MIN_UNIT_SIZE as u64).unwrap_err();
    expect_invalid(err, 1, "decompressed to 50 bytes");
}

#[test]
fn valid_frame_with_wrong_content_fails_the_hash_and_leaves_no_bytes() {
    let frame = zstd::bulk::compress(&[1u8; 100], 3).unwrap();
    let (_, blob) = blob_with_tail(&[0u8; 100], frame);
    let unit = MIN_UNIT_SIZE as u64;
    // Direct path: the unit was decompressed into buf, then scrubbed.
    let mut buf = vec![0xAAu8; 100];
    let err = blob.read_at(&mut buf, unit).unwrap_err();
    expect_invalid(err, 1, "sha256 mismatch");
    assert!(buf.iter().all(|&b| b == 0), "unverified bytes left in buf");
    // Scratch path: buf is never written.
    let mut buf = vec![0xAAu8; 10];
    let err = blob.read_at(&mut buf, unit + 3).unwrap_err();
    expect_invalid(err, 1, "sha256 mismatch");
    assert!(buf.iter().all(|&b| b == 0xAA));
}

#[test]
fn garbage_frame_is_a_decompression_error() {
    let (_, blob) = blob_with_tail(&[0u8; 100], vec![0x5A; 40]);
    let mut buf = vec![0u8; 100];
    let err = blob.read_at(&mut buf, MIN_UNIT_SIZE as u64).unwrap_err();
    expect_invalid(err, 1, "decompression failed");
}

#[test]
fn from_units_applies_the_format_rules() {
    let s = |stored_len, kind| StoredUnit {
        stored_len,
        kind,
        sha256: [0; 32],
    };
    let u = MIN_UNIT_SIZE;
    // Raw unit must be its full length; zstd must shrink; count must match.
    assert!(ChunkTable::from_units(u, 10, [0; 32], &[s(9, UnitKind::Raw)]).is_err());
    assert!(ChunkTable::from_units(u, 10, [0; 32], &[s(10, UnitKind::Zstd)]).is_err());
    assert!(ChunkTable::from_units(u, 10, [0; 32], &[s(0, UnitKind::Zstd)]).is_err());
    assert!(ChunkTable::from_units(u, 10, [0; 32], &[]).is_err());
    assert!(ChunkTable::from_units(4096, 10, [0; 32], &[s(10, UnitKind::Raw)]).is_err());
    let t = ChunkTable::from_units(u, 10, [0; 32], &[s(4, UnitKind::Zstd)]).unwrap();
    assert_eq!(t.stored_size(), 4);
    let empty = ChunkTable::from_units(u, 0, sha(b""), &[]).unwrap();
    assert_eq!(ChunkTable::decode(&empty.encode()).unwrap(), empty);
}

#[test]
fn max_table_len_covers_every_unit_size_and_is_capped() {
    use crate::format::{max_table_len, MAX_TABLE_LEN};
    let unit = u64::from(MIN_UNIT_SIZE);
    for size in [0, 1, unit, unit + 1, 100 * unit + 7] {
        let units: Vec<StoredUnit> = (0..size.div_ceil(unit))
            .map(|i| StoredUnit {
                stored_len: if (i + 1) * unit <= size {
                    MIN_UNIT_SIZE
                } else {
                    (size % unit) as u32
                },
                kind: UnitKind::Raw,
                sha256: [0; 32],
            })
            .collect();
        let table = ChunkTable::from_units(MIN_UNIT_SIZE, size, [0; 32], &units).unwrap();
        // At the smallest unit size the bound is exact.
        assert_eq!(table.encode().len() as u64, max_table_len(size), "{size}");
    }
    assert_eq!(max_table_len(u64::MAX), MAX_TABLE_LEN);
    assert_eq!(max_table_len(1 << 50), MAX_TABLE_LEN);
}

#[test]
fn a_tables_sha256_is_that_of_the_bytes_it_decoded_from() {
    let (_, blob) = blob_with_tail(&[7; 100], zstd::bulk::compress(&[7; 100], 3).unwrap());
    let bytes = blob.table().encode();
    let table = ChunkTable::decode(&bytes).unwrap();
    assert_eq!(table.sha256(), sha(&bytes));
    // Another unit size: the same blob, another table, another sha256.
    let other = ChunkTable::from_units(
        MIN_UNIT_SIZE * 2,
        table.uncompressed_size(),
        *table.digest_bytes(),
        &[StoredUnit {
            stored_len: table.uncompressed_size() as u32,
            kind: UnitKind::Raw,
            sha256: [1; 32],
        }],
    )
    .unwrap();
    assert_ne!(other.sha256(), table.sha256());
}
