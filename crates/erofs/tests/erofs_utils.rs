//! Cross-check of the reader against images made by erofs-utils'
//! `mkfs.erofs` (an independent implementation). erofs-utils is used here
//! only to cross-check, never by the product; without it the test FAILS
//! (scripts/setup.sh installs it).
//!
//! Needs root (the test tree has device nodes and foreign owners).

mod common;

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;

use lazypull_erofs::Image;
use lazypull_testkit::maketree::{self, TreeOptions};
use lazypull_testkit::{compare_entries, format_differences, scan};

fn mkfs(args: &[&str], image: &Path, src: &Path) {
    match Command::new("mkfs.erofs")
        .args(args)
        .arg(image)
        .arg(src)
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "mkfs.erofs failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "mkfs.erofs not found: this cross-check needs it; install the Debian package \
             erofs-utils (scripts/setup.sh does)"
        ),
        Err(e) => panic!("running mkfs.erofs: {e}"),
    }
}

#[test]
fn reader_reads_erofs_utils_images() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test creates device nodes and must run as root"
    );
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    maketree::make_tree(
        &src,
        &TreeOptions {
            seed: 2,
            with_huge: false,
        },
    )
    .unwrap();
    // erofs-utils 1.5 fails on names near 255 bytes (a path buffer limit
    // of its own): drop those from the cross-check tree.
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let is_dir = e.file_type().unwrap().is_dir();
            if e.file_name().len() > 200 {
                if is_dir {
                    fs::remove_dir_all(&p).unwrap();
                } else {
                    fs::remove_file(&p).unwrap();
                }
            } else if is_dir {
                stack.push(p);
            }
        }
    }
    let expected = scan(&src).unwrap();

    // Flat (non-chunked) image.
    let flat = tmp.path().join("flat.img");
    mkfs(&["--quiet"], &flat, &src);
    let img = Image::from_reader(File::open(&flat).unwrap()).unwrap();
    let got = common::image_manifest(&img, &[] as &[File]);
    let diffs = compare_entries(&expected, &got);
    assert!(
        diffs.is_empty(),
        "flat image:\n{}",
        format_differences(&diffs, 50)
    );

    // Chunked image with its data on an extra device.
    let meta = tmp.path().join("chunked.img");
    let blob = tmp.path().join("blob");
    let blob_arg = format!("--blobdev={}", blob.display());
    mkfs(&["--quiet", "--chunksize=65536", &blob_arg], &meta, &src);
    let img = Image::from_reader(File::open(&meta).unwrap()).unwrap();
    assert_eq!(img.devices().len(), 1);
    let got = common::image_manifest(&img, &[File::open(&blob).unwrap()]);
    let diffs = compare_entries(&expected, &got);
    assert!(
        diffs.is_empty(),
        "chunked image:\n{}",
        format_differences(&diffs, 50)
    );
}
