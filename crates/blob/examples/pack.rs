//! Packs one blob and reads it all back through `StoredBlob`, reporting sizes
//! and timings: `cargo run --release -p lazypull-blob --example pack -- BLOB OUT_DIR [UNIT_SIZE] [LEVEL]`.

use std::path::PathBuf;
use std::time::Instant;

use lazypull_blob::{open_local, pack, Compression, PackOptions};
use lazypull_source::BlobSource;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: pack BLOB OUT_DIR [UNIT_SIZE] [LEVEL]";
    let blob = PathBuf::from(args.next().ok_or(usage)?);
    let out = PathBuf::from(args.next().ok_or(usage)?);
    let mut opts = PackOptions::default();
    if let Some(u) = args.next() {
        opts.unit_size = u.parse()?;
    }
    if let Some(l) = args.next() {
        opts.compression = match l.parse()? {
            0 => Compression::None,
            level => Compression::Zstd { level },
        };
    }
    let t = Instant::now();
    let p = pack(&blob, &out, &opts)?;
    let pack_time = t.elapsed();
    println!("{p:#?}");
    println!(
        "ratio {:.3}, pack {:.2?} ({:.0} MiB/s)",
        p.stored_size as f64 / p.uncompressed_size.max(1) as f64,
        pack_time,
        p.uncompressed_size as f64 / (1 << 20) as f64 / pack_time.as_secs_f64()
    );
    let stored = open_local(&out, &p.digest)?.ok_or("table vanished")?;
    let original = std::fs::read(&blob)?;
    let mut buf = vec![0u8; opts.unit_size as usize];
    let t = Instant::now();
    let mut pos = 0u64;
    loop {
        let n = stored.read_at(&mut buf, pos)?;
        if n == 0 {
            break;
        }
        assert!(buf[..n] == original[pos as usize..pos as usize + n]);
        pos += n as u64;
    }
    let read_time = t.elapsed();
    println!(
        "read back {pos} bytes in {read_time:.2?} ({:.0} MiB/s), identical",
        pos as f64 / (1 << 20) as f64 / read_time.as_secs_f64()
    );
    Ok(())
}
