//! Chunk tables, the stored form of data blobs (`lazypull_blob::format`),
//! and reading a blob through one (`lazypull_blob::StoredBlob`).
//!
//! Input: one mode byte, then a chunk table, then the stored data (whatever
//! follows the length the table's unit count implies). Mode bit 0 clear:
//! the table's SHA-256 checksum is recomputed first, so that mutations reach
//! the field rules behind it; set: the bytes are decoded as they are.
//!
//! Properties: decoding never panics and allocates nothing from a count
//! before the bytes are there; an accepted table encodes back to exactly
//! its bytes (the format is strict) and decodes again to itself; its units
//! tile the blob and the stored data without gaps or overlaps; reads
//! through it never panic, never hand out more than asked and only bytes
//! of units that verified.
#![no_main]

use std::io;

use lazypull_blob::format::{ChunkTable, ENTRY_LEN, HEADER_LEN, TRAILER_LEN};
use lazypull_blob::{names, StoredBlob, UnitDecoder};
use lazypull_source::{BlobSource, RangeRead};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

#[derive(Debug)]
struct Mem(Vec<u8>);

impl RangeRead for Mem {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let start = usize::try_from(off).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = self.0.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The table's length as its unit count implies, if the input holds it.
fn table_len(b: &[u8]) -> Option<usize> {
    let count = u64::from_le_bytes(b.get(16..24)?.try_into().ok()?);
    let len = usize::try_from(count)
        .ok()?
        .checked_mul(ENTRY_LEN)?
        .checked_add(HEADER_LEN + TRAILER_LEN)?;
    (len <= b.len()).then_some(len)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    let split = table_len(&bytes).unwrap_or(bytes.len());
    if mode & 1 == 0 && split >= HEADER_LEN + TRAILER_LEN {
        let sum = Sha256::digest(&bytes[..split - TRAILER_LEN]);
        bytes[split - TRAILER_LEN..split].copy_from_slice(&sum);
    }
    let (table_bytes, stored) = bytes.split_at(split);
    let table = match ChunkTable::decode(table_bytes) {
        Ok(t) => t,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(table.encode(), table_bytes, "encode(decode(x)) != x");
    assert_eq!(ChunkTable::decode(table_bytes).as_ref(), Ok(&table));
    assert_eq!(
        table.sha256(),
        <[u8; 32]>::from(Sha256::digest(table_bytes))
    );
    let us = u64::from(table.unit_size());
    let (mut off, mut soff) = (0u64, 0u64);
    for (i, u) in table.units().iter().enumerate() {
        assert_eq!(u.offset, off);
        assert_eq!(u.stored_offset, soff);
        assert!(u.len > 0 && u64::from(u.len) <= us);
        assert_eq!(table.unit(i as u64), Some(u));
        assert_eq!(table.units_for(u.offset, 1), i as u64..i as u64 + 1);
        off += u64::from(u.len);
        soff += u64::from(u.stored_len);
    }
    assert_eq!(off, table.uncompressed_size());
    assert_eq!(soff, table.stored_size());
    assert!(
        lazypull_blob::format::max_table_len(table.uncompressed_size()) >= table_bytes.len() as u64
            || table_bytes.len() as u64 > lazypull_blob::format::MAX_TABLE_LEN
    );
    let _ = names::check_table_is_for(&table, &table.digest());
    let _ = names::check_stored_len(&table, stored.len() as u64);

    // Decode the first units straight from the stored data.
    let mut dec = UnitDecoder::new();
    for (i, u) in table.units().iter().enumerate().take(2) {
        let Some(src) = usize::try_from(u.stored_offset)
            .ok()
            .and_then(|s| stored.get(s..s.checked_add(u.stored_len as usize)?))
        else {
            break;
        };
        let mut dst = vec![0u8; u.len as usize];
        if dec.decode("fuzz", i as u64, u, src, &mut dst).is_err() {
            assert!(
                dst.iter().all(|&b| b == 0),
                "a failed unit left bytes behind"
            );
        }
    }

    // And through the BlobSource a daemon serves.
    let size = table.uncompressed_size();
    let blob = StoredBlob::new("fuzz".into(), table, Mem(stored.to_vec()));
    let mut buf = vec![0u8; 4096];
    for off in [0, size / 2, size.saturating_sub(10), size] {
        match blob.read_at(&mut buf, off) {
            Ok(n) => {
                assert!(n <= buf.len());
                assert!(off + n as u64 <= size);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
