//! Manual testing aid:
//!
//! ```text
//! cargo run -p lazypull-erofs --example erofs-tool -- build OUT_DIR [--chunk-size N] LAYER...
//! cargo run -p lazypull-erofs --example erofs-tool -- inspect META_BLOB
//! ```

use std::path::PathBuf;

use lazypull_erofs::{build_from_layers, BuildOptions, Image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("build") if args.len() >= 3 => {
            let out = PathBuf::from(&args[1]);
            let mut opts = BuildOptions::default();
            let mut layers = Vec::new();
            let mut it = args[2..].iter();
            while let Some(a) = it.next() {
                if a == "--chunk-size" {
                    opts.chunk_size = it.next().ok_or("--chunk-size needs a value")?.parse()?;
                } else {
                    layers.push(PathBuf::from(a));
                }
            }
            let img = build_from_layers(&layers, &out, &opts)?;
            println!("{img:#?}");
        }
        Some("inspect") if args.len() == 2 => {
            let img = Image::from_reader(std::fs::File::open(&args[1])?)?;
            println!("{:#?}", img.superblock());
            for d in img.devices() {
                println!(
                    "device {} blocks {}",
                    String::from_utf8_lossy(d.tag_bytes()),
                    d.blocks
                );
            }
            for e in img.walk()? {
                let i = &e.inode;
                let chunks = i.chunks.as_ref().map(|c| c.entries.len()).unwrap_or(0);
                println!(
                    "{:>8} {:?}/{:?} {:o} {}:{} n={} size={} mtime={}.{:09} xattrs={} chunks={} /{}",
                    i.nid,
                    i.version,
                    i.layout,
                    i.mode,
                    i.uid,
                    i.gid,
                    i.nlink,
                    i.size,
                    i.mtime,
                    i.mtime_nsec,
                    i.xattrs.len(),
                    chunks,
                    String::from_utf8_lossy(&e.path)
                );
            }
        }
        _ => {
            eprintln!("usage: erofs-tool build OUT_DIR [--chunk-size N] LAYER... | inspect META");
            std::process::exit(2);
        }
    }
    Ok(())
}
