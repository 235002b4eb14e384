//! Packing real files and reading them back through the public API.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::OnceLock;

use lazypull_blob::{
    open_local, pack, ChunkTable, Compression, OpenStoredError, PackError, PackOptions, StoredBlob,
    UnitKind,
};
use lazypull_source::BlobSource;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const UNIT: usize = 64 << 10;

/// Deterministic bytes: even units are compressible text, odd units are
/// xorshift noise (incompressible), so both zstd and raw units occur.
fn mixed(size: usize, unit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() < size {
        let index = out.len() / unit;
        let want = (size - out.len()).min(unit);
        if index.is_multiple_of(2) {
            let mut line = 0;
            while out.len() < size && out.len() / unit == index {
                let text = format!("unit {index} line {line}: the quick brown fox\n");
                let take = text
                    .len()
                    .min((index + 1) * unit - out.len())
                    .min(size - out.len());
                out.extend_from_slice(&text.as_bytes()[..take]);
                line += 1;
            }
        } else {
            for _ in 0..want {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.push((x >> 32) as u8);
            }
        }
    }
    out
}

fn digest(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

struct Fixture {
    data: Vec<u8>,
    blob: StoredBlob<fs::File>,
    _dir: tempfile::TempDir,
}

/// Writes `data` as `<digest>` into a fresh directory and packs it there.
fn pack_in_dir(data: &[u8], opts: &PackOptions) -> (tempfile::TempDir, lazypull_blob::Packed) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join(digest(data));
    fs::write(&src, data).unwrap();
    let packed = pack(&src, dir.path(), opts).unwrap();
    assert_eq!(packed.digest, digest(data));
    assert_eq!(packed.uncompressed_size, data.len() as u64);
    (dir, packed)
}

fn small_opts() -> PackOptions {
    PackOptions {
        unit_size: UNIT as u32,
        compression: Compression::Zstd { level: 3 },
    }
}

fn fixture(size: usize) -> Fixture {
    let data = mixed(size, UNIT);
    let (dir, packed) = pack_in_dir(&data, &small_opts());
    let blob = open_local(dir.path(), &packed.digest).unwrap().unwrap();
    assert_eq!(blob.size(), size as u64);
    Fixture {
        data,
        blob,
        _dir: dir,
    }
}

const SIZES: [usize; 6] = [0, 1, UNIT - 1, UNIT, UNIT + 1, UNIT * 11 / 2];

fn fixtures() -> &'static [Fixture] {
    static F: OnceLock<Vec<Fixture>> = OnceLock::new();
    F.get_or_init(|| SIZES.iter().map(|&s| fixture(s)).collect())
}

/// What a correct read of `len` bytes at `off` returns.
fn expected(data: &[u8], off: u64, len: usize) -> &[u8] {
    let start = (off as usize).min(data.len());
    &data[start..(start + len).min(data.len())]
}

fn check_read(f: &Fixture, off: u64, len: usize) {
    let mut buf = vec![0xEEu8; len];
    let n = f.blob.read_at(&mut buf, off).unwrap();
    let want = expected(&f.data, off, len);
    assert_eq!(n, want.len(), "off {off} len {len}");
    assert!(buf[..n] == *want, "wrong bytes at off {off} len {len}");
}

#[test]
fn fixtures_mix_raw_and_zstd_units() {
    let big = &fixtures()[5];
    let kinds: Vec<_> = big.blob.table().units().iter().map(|u| u.kind).collect();
    assert_eq!(kinds.len(), 6);
    assert!(
        kinds.contains(&UnitKind::Raw) && kinds.contains(&UnitKind::Zstd),
        "{kinds:?}"
    );
}

#[test]
fn edge_reads() {
    for f in fixtures() {
        let size = f.data.len() as u64;
        for off in [0, 1, size.saturating_sub(1), size, size + 1, u64::MAX - 3] {
            for len in [0, 1, 4096, UNIT - 1, UNIT, UNIT + 1, 3 * UNIT] {
                check_read(f, off, len);
            }
        }
    }
}

#[test]
fn engine_style_aligned_reads() {
    // Fill windows read in io_size pieces into a 4096-aligned buffer.
    for f in fixtures() {
        let size = f.data.len();
        for io_size in [4096, 16384, UNIT, 4 * UNIT] {
            let mut v = vec![0u8; io_size + 4096];
            let start = v.as_ptr().align_offset(4096);
            let buf = &mut v[start..start + io_size];
            let mut pos = 0;
            while pos < size {
                let n = f.blob.read_at(buf, pos as u64).unwrap();
                assert_eq!(n, io_size.min(size - pos));
                assert!(
                    buf[..n] == f.data[pos..pos + n],
                    "io_size {io_size} pos {pos}"
                );
                pos += n;
            }
        }
    }
}

#[test]
fn default_unit_size_with_engine_defaults() {
    let size = (7 << 20) / 2; // 3.5 MiB at 1 MiB units
    let data = mixed(size, 1 << 20);
    let (dir, packed) = pack_in_dir(&data, &PackOptions::default());
    assert_eq!(packed.units, 4);
    assert!(packed.raw_units >= 1 && packed.raw_units < 4, "{packed:?}");
    let blob = open_local(dir.path(), &packed.digest).unwrap().unwrap();
    for io_size in [256 << 10, 1 << 20] {
        let mut v = vec![0u8; io_size + 4096];
        let start = v.as_ptr().align_offset(4096);
        let buf = &mut v[start..start + io_size];
        let mut pos = 0;
        while pos < size {
            let n = blob.read_at(buf, pos as u64).unwrap();
            assert_eq!(n, io_size.min(size - pos));
            assert!(buf[..n] == data[pos..pos + n]);
            pos += n;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_reads_return_the_original_bytes(
        which in 0..SIZES.len(),
        off_frac in 0.0f64..1.02,
        len in 0usize..3 * UNIT,
    ) {
        let f = &fixtures()[which];
        let off = (f.data.len() as f64 * off_frac) as u64;
        check_read(f, off, len);
    }
}

// ---- chunk table ----

fn sample_table() -> ChunkTable {
    fixtures()[5].blob.table().clone()
}

#[test]
fn table_round_trips() {
    for f in fixtures() {
        let t = f.blob.table();
        let bytes = t.encode();
        assert_eq!(bytes.len(), 72 + 48 * t.unit_count() as usize + 32);
        assert_eq!(&ChunkTable::decode(&bytes).unwrap(), t);
        assert_eq!(t.digest(), digest(&f.data));
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    let bytes = sample_table().encode();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            assert!(
                ChunkTable::decode(&b).is_err(),
                "flip {mask:#x} at {i} accepted"
            );
        }
    }
    assert!(ChunkTable::decode(&bytes[..bytes.len() - 1]).is_err());
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(ChunkTable::decode(&longer).is_err());
}

#[test]
fn units_for_is_exact() {
    let t = sample_table();
    let u = UNIT as u64;
    let size = t.uncompressed_size();
    assert_eq!(t.units_for(0, 0), 0..0);
    assert_eq!(t.units_for(0, 1), 0..1);
    assert_eq!(t.units_for(u - 1, 2), 0..2);
    assert_eq!(t.units_for(u, u), 1..2);
    assert_eq!(t.units_for(0, u64::MAX), 0..6);
    assert_eq!(t.units_for(size, 10), 0..0);
    assert_eq!(t.units_for(size - 1, 10), 5..6);
    let last = t.unit(5).unwrap();
    assert_eq!(last.range(), 5 * u..size);
    assert!(t.unit(6).is_none());
}

proptest! {
    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = ChunkTable::decode(&bytes);
    }

    #[test]
    fn decoding_mutated_tables_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        fix_checksum in any::<bool>(),
        cut in 0usize..40,
    ) {
        let mut bytes = sample_table().encode();
        for (at, v) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *v;
        }
        if fix_checksum {
            // Re-seal so the field checks behind the checksum get exercised.
            let n = bytes.len() - 32;
            let sum = Sha256::digest(&bytes[..n]);
            bytes[n..].copy_from_slice(&sum);
        }
        bytes.truncate(bytes.len() - cut);
        if let Ok(t) = ChunkTable::decode(&bytes) {
            // Anything accepted is canonical.
            prop_assert_eq!(t.encode(), bytes);
        }
    }
}

// ---- corruption ----

/// A packed copy of the 5.5-unit fixture whose stored data can be damaged.
fn damaged(edit: impl FnOnce(&mut Vec<u8>, &ChunkTable)) -> (Vec<u8>, tempfile::TempDir, String) {
    let data = mixed(UNIT * 11 / 2, UNIT);
    let (dir, packed) = pack_in_dir(&data, &small_opts());
    let table = ChunkTable::decode(&fs::read(&packed.table_path).unwrap()).unwrap();
    let mut stored = fs::read(&packed.data_path).unwrap();
    edit(&mut stored, &table);
    fs::write(&packed.data_path, &stored).unwrap();
    (data, dir, packed.digest)
}

fn assert_unit_error(err: io::Error, unit: u64) {
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("unit {unit}:")), "{msg}");
}

#[test]
fn flipped_stored_byte_fails_only_its_unit() {
    for kind in [UnitKind::Zstd, UnitKind::Raw] {
        let mut bad = 0;
        let (data, dir, name) = damaged(|stored, t| {
            let e = t.units().iter().find(|u| u.kind == kind).unwrap();
            bad = e.offset / UNIT as u64;
            stored[(e.stored_offset + u64::from(e.stored_len) / 2) as usize] ^= 0x10;
        });
        let blob = open_local(dir.path(), &name).unwrap().unwrap();
        let size = data.len() as u64;
        let u = UNIT as u64;
        for unit in 0..6u64 {
            let start = unit * u;
            let end = (start + u).min(size);
            for (off, len) in [(start, end - start), (start + 7, 100), (end - 1, 1)] {
                let mut buf = vec![0u8; len as usize];
                match blob.read_at(&mut buf, off) {
                    Ok(n) => {
                        assert_ne!(unit, bad, "{kind:?}: damaged unit read fine");
                        assert!(buf[..n] == data[off as usize..off as usize + n]);
                    }
                    Err(e) => {
                        assert_eq!(unit, bad, "{kind:?}: healthy unit {unit} failed: {e}");
                        assert_unit_error(e, bad);
                    }
                }
            }
        }
        // A read spanning the damaged unit fails as a whole.
        let mut buf = vec![0u8; 3 * UNIT];
        let off = (bad * u).saturating_sub(u / 2);
        assert_unit_error(blob.read_at(&mut buf, off).unwrap_err(), bad);
    }
}

#[test]
fn truncated_stored_data_is_an_error() {
    let (data, dir, name) = damaged(|stored, _| {
        stored.truncate(stored.len() - 10);
    });
    // open_local notices the length.
    let err = open_local(dir.path(), &name).unwrap_err();
    assert!(matches!(err, OpenStoredError::DataSize { .. }), "{err}");
    // A reader that skips that check still never returns wrong bytes.
    let table =
        ChunkTable::decode(&fs::read(dir.path().join(format!("{name}.table"))).unwrap()).unwrap();
    let file = fs::File::open(dir.path().join(format!("{name}.zst"))).unwrap();
    let blob = StoredBlob::new(name, table, file);
    let mut buf = vec![0u8; UNIT];
    assert_unit_error(blob.read_at(&mut buf, 5 * UNIT as u64).unwrap_err(), 5);
    assert_eq!(blob.read_at(&mut buf, 0).unwrap(), UNIT);
    assert!(buf == data[..UNIT]);
}

#[test]
fn open_local_cases() {
    let data = mixed(UNIT * 2, UNIT);
    let (dir, packed) = pack_in_dir(&data, &small_opts());
    let d = dir.path();
    // No table: fall back.
    assert!(open_local(d, &"0".repeat(64)).unwrap().is_none());
    // Names that could escape are refused.
    assert!(matches!(
        open_local(d, "../x"),
        Err(OpenStoredError::Name(_))
    ));
    // Corrupt table.
    let mut t = fs::read(&packed.table_path).unwrap();
    t[40] ^= 1;
    fs::write(&packed.table_path, &t).unwrap();
    let err = open_local(d, &packed.digest).unwrap_err();
    assert!(matches!(err, OpenStoredError::Table { .. }), "{err}");
    t[40] ^= 1;
    fs::write(&packed.table_path, &t).unwrap();
    // A valid table under another blob's name.
    let other = "ab".repeat(32);
    fs::copy(&packed.table_path, d.join(format!("{other}.table"))).unwrap();
    let err = open_local(d, &other).unwrap_err();
    assert!(matches!(err, OpenStoredError::WrongBlob { .. }), "{err}");
    // Missing data.
    fs::remove_file(&packed.data_path).unwrap();
    let err = open_local(d, &packed.digest).unwrap_err();
    assert!(matches!(err, OpenStoredError::MissingData { .. }), "{err}");
    assert_eq!(err.errno(), libc::ENOENT);
}

// ---- pack ----

fn only_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn pack_refuses_content_that_does_not_match_its_name() {
    let src_dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let data = mixed(3 * UNIT, UNIT);
    let wrong = digest(b"something else");
    let src = src_dir.path().join(&wrong);
    fs::write(&src, &data).unwrap();
    let err = pack(&src, out.path(), &small_opts()).unwrap_err();
    match &err {
        PackError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &digest(&data));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        only_entries(out.path()).is_empty(),
        "{:?}",
        only_entries(out.path())
    );
    // Uppercase hex is the same name.
    let upper = src_dir.path().join(digest(&data).to_ascii_uppercase());
    fs::write(&upper, &data).unwrap();
    pack(&upper, out.path(), &small_opts()).unwrap();
    // A name that is not a digest is not checked.
    let plain = src_dir.path().join("layer.bin");
    fs::write(&plain, &data).unwrap();
    let p = pack(&plain, out.path(), &small_opts()).unwrap();
    assert_eq!(p.digest, digest(&data));
    let d = digest(&data);
    assert_eq!(
        only_entries(out.path()),
        vec![format!("{d}.table"), format!("{d}.zst")]
    );
}

#[test]
fn pack_refuses_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("x");
    fs::write(&src, b"abc").unwrap();
    for opts in [
        PackOptions {
            unit_size: 4096,
            ..PackOptions::default()
        },
        PackOptions {
            unit_size: (1 << 20) + 4096,
            ..PackOptions::default()
        },
        PackOptions {
            compression: Compression::Zstd { level: 1000 },
            ..PackOptions::default()
        },
    ] {
        assert!(matches!(
            pack(&src, dir.path(), &opts),
            Err(PackError::Options(_))
        ));
    }
    assert_eq!(only_entries(dir.path()), vec!["x".to_string()]);
}

#[test]
fn compressible_blob_shrinks_and_incompressible_is_raw() {
    let size = 4 << 20;
    let text: Vec<u8> = (0..size).map(|i| b"abcdefgh\n"[i % 9]).collect();
    let (_d, p) = pack_in_dir(&text, &PackOptions::default());
    assert_eq!((p.units, p.raw_units), (4, 0));
    assert!(p.stored_size < (size as u64) / 50, "{p:?}");

    let noise = mixed(2 * size, size / 4); // odd units are noise...
    let noise: Vec<u8> = noise
        .chunks(size / 4)
        .skip(1)
        .step_by(2)
        .flatten()
        .copied()
        .collect(); // ...keep only those: 4 MiB of noise
    assert_eq!(noise.len(), size);
    let (d, p) = pack_in_dir(&noise, &PackOptions::default());
    assert_eq!((p.units, p.raw_units), (4, 4));
    assert_eq!(p.stored_size, size as u64);
    assert_eq!(p.table_size, 72 + 4 * 48 + 32);
    let blob = open_local(d.path(), &p.digest).unwrap().unwrap();
    let mut buf = vec![0u8; size];
    assert_eq!(blob.read_at(&mut buf, 0).unwrap(), size);
    assert!(buf == noise);

    // Compression::None stores everything raw.
    let opts = PackOptions {
        compression: Compression::None,
        ..PackOptions::default()
    };
    let (_d, p) = pack_in_dir(&text, &opts);
    assert_eq!((p.raw_units, p.stored_size), (4, size as u64));
}

#[test]
fn empty_blob_packs_to_an_empty_data_file() {
    let (d, p) = pack_in_dir(b"", &PackOptions::default());
    assert_eq!((p.units, p.stored_size, p.table_size), (0, 0, 104));
    let blob = open_local(d.path(), &p.digest).unwrap().unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(blob.read_at(&mut buf, 0).unwrap(), 0);
}
