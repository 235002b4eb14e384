//! Tar ingestion (`lazypull_ingest::build_source_image`): a plain or gzip
//! tar layer, or a `docker save` archive, extracted streaming into a
//! private tree (paths, links, whiteouts, PAX records, xattrs, sparse
//! files), merged and built into an EROFS image; the image then read back
//! with `lazypull_erofs::Image`.
//!
//! Input: the source file's bytes. A layer may expand to at most 8 MiB
//! (`IngestOptions::max_layer_size`), so a bomb is refused, not extracted.
//!
//! Properties: nothing panics, hangs or writes outside its scratch
//! directory; whatever is accepted builds an image that the reader opens
//! and walks, whose regular files number and weigh what the build
//! reported, and whose every file reads whole from the data blobs.
#![no_main]

use std::collections::HashSet;
use std::fs::File;

use lazypull_erofs::layout::FileType;
use lazypull_erofs::{BuildOptions, Image};
use lazypull_ingest::{build_source_image, IngestOptions};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 8 << 20;

fuzz_target!(|data: &[u8]| {
    let scratch = tempfile::Builder::new()
        .prefix("lazypull-fuzz-tar-")
        .tempdir()
        .expect("scratch directory");
    let source = scratch.path().join("source");
    std::fs::write(&source, data).expect("write source");
    let out = scratch.path().join("out");
    std::fs::create_dir(&out).expect("out dir");
    let opts = BuildOptions {
        chunk_size: 4096,
        build_time: Some(0),
        ..BuildOptions::default()
    };
    let limits = IngestOptions {
        max_layer_size: LIMIT,
    };
    let built = match build_source_image(&source, &out, &opts, &limits) {
        Ok(s) => s.image,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let meta = std::fs::read(built.meta_path(&out)).expect("the meta blob is there");
    assert_eq!(meta.len() as u64, built.meta_size);
    let img = Image::from_bytes(meta).expect("a built image opens");
    let walk = img.walk().expect("a built image walks");
    let blobs: Vec<File> = built
        .blob_paths(&out)
        .iter()
        .map(|p| File::open(p).expect("a data blob is there"))
        .collect();
    let mut seen = HashSet::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 64 << 10];
    for w in &walk {
        if w.inode.file_type != FileType::Regular || !seen.insert(w.inode.nid) {
            continue;
        }
        files += 1;
        bytes += w.inode.size;
        let mut pos = 0;
        while pos < w.inode.size {
            let n = img
                .read_file_at(&w.inode, &blobs, pos, &mut buf)
                .expect("a built file reads");
            assert!(n > 0, "short read at {pos} of {}", w.inode.size);
            pos += n as u64;
        }
    }
    assert_eq!(files, built.files);
    assert_eq!(bytes, built.bytes);
});
