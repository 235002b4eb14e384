//! `lazypull verify`: re-reads an image on disk completely and checks every
//! digest and chunk reference; exits non-zero, listing the problems, if
//! anything does not match. It reads through `lazypull-erofs` and
//! `lazypull-blob` (stored units are verified on the way); it changes nothing.

use std::collections::HashSet;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use lazypull_erofs::layout::FileType;
use lazypull_erofs::ChunkEntry;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::image_dir::{open, tags, BlobFile, ImageArgs};
use super::output::{human, progress_bar};

/// The sha256 and length of a blob's uncompressed bytes (a stored blob's units
/// are each verified against the chunk table on the way).
fn sha256_blob(blob: &BlobFile, pb: &ProgressBar) -> std::io::Result<(String, u64)> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = blob.read_at(&mut buf, n)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
        pb.inc(k as u64);
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Where chunk `i` (at block `blkaddr`) of a file of `file_size` bytes in
/// `chunk_size` byte chunks ends on its device, or None when that does not
/// fit in 64 bits or the chunk starts past the file (a corrupt chunk map).
fn chunk_end(chunk_size: u64, file_size: u64, i: usize, blkaddr: u64) -> Option<u64> {
    let start = (i as u64).checked_mul(chunk_size)?;
    let len = chunk_size.min(file_size.checked_sub(start)?);
    blkaddr.checked_mul(4096)?.checked_add(len)
}

#[derive(Serialize)]
struct Verification {
    ok: bool,
    meta: String,
    /// Whether the meta blob has a blob trailer (checked against the tables).
    trailer: bool,
    blobs_checked: usize,
    files_read: u64,
    bytes_read: u64,
    problems: Vec<String>,
}

/// Re-reads everything: the meta blob's digest, every data blob's digest and
/// size against the device table, every chunk reference's bounds, and every
/// file's bytes through the image's own chunk maps.
pub fn verify(args: ImageArgs) -> anyhow::Result<()> {
    let o = open(&args.image)?;
    let mut problems = Vec::new();
    let meta_name = o
        .meta_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if meta_name.len() == 64 && meta_name.bytes().all(|b| b.is_ascii_hexdigit()) {
        let got = hex::encode(Sha256::digest(&o.meta));
        if got != meta_name {
            problems.push(format!(
                "meta blob digest is {got}, its name says {meta_name}"
            ));
        }
    }
    let tags = tags(&o.image);
    // The blob trailer: each chunk table beside the meta blob must be the one
    // it vouches for (what a daemon serving the image from a URL checks).
    let trailer = match o.image.trailer() {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("meta blob trailer: {e}"));
            None
        }
    };
    for e in trailer.iter().flat_map(|t| &t.entries) {
        let name = e.name();
        let path = lazypull_blob::StoredPaths::in_dir(&o.blob_dir, &name).table;
        match (e.table, std::fs::read(&path)) {
            (Some(want), Ok(bytes)) => {
                let got: [u8; 32] = Sha256::digest(&bytes).into();
                if got != want.sha256 || bytes.len() as u64 != want.size {
                    problems.push(format!(
                        "data blob {name}: chunk table sha256:{} ({} bytes), the meta blob's \
                         trailer vouches for sha256:{} ({} bytes)",
                        hex::encode(got),
                        bytes.len(),
                        hex::encode(want.sha256),
                        want.size
                    ));
                }
            }
            (Some(_), Err(err)) if err.kind() != std::io::ErrorKind::NotFound => {
                problems.push(format!("data blob {name}: {}: {err}", path.display()));
            }
            (None, Ok(_)) => problems.push(format!(
                "data blob {name}: the meta blob's trailer says it is stored plain, but {} exists",
                path.display()
            )),
            _ => {}
        }
    }
    let total: u64 = o
        .image
        .devices()
        .iter()
        .map(|d| u64::from(d.blocks) * 4096)
        .sum();
    let pb = progress_bar(args.json);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    pb.set_length(total);
    pb.set_message("checking blob digests");
    let mut blob_files = Vec::new();
    let mut blob_sizes = Vec::new();
    for (tag, slot) in tags.iter().zip(o.image.devices()) {
        let want = u64::from(slot.blocks) * 4096;
        let blob = match BlobFile::open(&o.blob_dir, tag) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("data blob {tag}: {e:#}"));
                blob_sizes.push(0);
                blob_files.push(None);
                continue;
            }
        };
        match sha256_blob(&blob, &pb) {
            Ok((got, size)) => {
                if &got != tag {
                    problems.push(format!("data blob {tag}: content digest is {got}"));
                }
                if size != want {
                    problems.push(format!(
                        "data blob {tag}: {size} bytes, device table says {want}"
                    ));
                }
                blob_sizes.push(size);
            }
            Err(e) => {
                problems.push(format!("data blob {tag}: {e}"));
                blob_sizes.push(0);
            }
        }
        blob_files.push(Some(blob));
    }
    let walk = o.image.walk().context("walking the image")?;
    let files: Vec<_> = walk
        .iter()
        .filter(|e| e.inode.file_type == FileType::Regular)
        .collect();
    let (mut files_read, mut bytes_read) = (0u64, 0u64);
    if blob_files.iter().all(Option::is_some) {
        let blobs: Vec<BlobFile> = blob_files.into_iter().flatten().collect();
        // Saturating: a crafted image's sizes may add up past u64.
        pb.set_length(
            files
                .iter()
                .fold(0u64, |n, e| n.saturating_add(e.inode.size)),
        );
        pb.set_position(0);
        pb.set_message("reading every file");
        let mut seen = HashSet::new();
        let mut buf = vec![0u8; 1 << 20];
        for e in files {
            if !seen.insert(e.inode.nid) {
                continue;
            }
            let path = String::from_utf8_lossy(&e.path);
            if let Some(map) = &e.inode.chunks {
                for (i, c) in map.entries.iter().enumerate() {
                    if let ChunkEntry::Mapped { device_id, blkaddr } = c {
                        let Some(end) = chunk_end(map.chunk_size, e.inode.size, i, *blkaddr) else {
                            problems.push(format!(
                                "{path}: chunk {i} (block {blkaddr}, {} byte chunks, file size {}) \
                                 lies past what 64 bits can address",
                                map.chunk_size, e.inode.size
                            ));
                            continue;
                        };
                        match blob_sizes.get(usize::from(*device_id).wrapping_sub(1)) {
                            Some(&size) if end <= size => {}
                            Some(&size) => problems.push(format!(
                                "{path}: chunk {i} ends at {end}, past device {device_id}'s {size} bytes"
                            )),
                            None => problems.push(format!("{path}: chunk {i} on missing device {device_id}")),
                        }
                    }
                }
            }
            let mut pos = 0;
            while pos < e.inode.size {
                match o.image.read_file_at(&e.inode, &blobs, pos, &mut buf) {
                    Ok(0) => {
                        problems.push(format!("{path}: short at {pos} of {}", e.inode.size));
                        break;
                    }
                    Ok(n) => {
                        pos += n as u64;
                        pb.inc(n as u64);
                    }
                    Err(err) => {
                        problems.push(format!("{path}: {err}"));
                        break;
                    }
                }
            }
            files_read += 1;
            bytes_read = bytes_read.saturating_add(pos);
        }
    }
    pb.finish_and_clear();
    let report = Verification {
        ok: problems.is_empty(),
        meta: o.meta_path.display().to_string(),
        trailer: trailer.is_some(),
        blobs_checked: tags.len(),
        files_read,
        bytes_read,
        problems,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok {
        println!(
            "ok: meta blob, {} data blob(s) and {} files ({}) verified",
            report.blobs_checked,
            report.files_read,
            human(report.bytes_read)
        );
    } else {
        for p in report.problems.iter().take(50) {
            println!("problem: {p}");
        }
    }
    if !report.ok {
        bail!(
            "{} problem(s) found in {}",
            report.problems.len(),
            report.meta
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::chunk_end;

    /// Crafted sizes and addresses are problems to report, not overflows.
    #[test]
    fn chunk_ends_are_checked() {
        assert_eq!(
            chunk_end(4096, 10_000, 2, 5),
            Some(5 * 4096 + 10_000 - 8192)
        );
        assert_eq!(chunk_end(4096, 10_000, 0, 1), Some(8192));
        // Block address past 2^64 / 4096; end past 2^64; start past 2^64;
        // a chunk past the end of its file.
        assert_eq!(chunk_end(4096, 4096, 0, u64::MAX >> 11), None);
        assert_eq!(chunk_end(4096, 4096, 0, u64::MAX >> 12), None);
        assert_eq!(chunk_end(1 << 63, u64::MAX, 2, 0), None);
        assert_eq!(chunk_end(4096, 4096, 3, 0), None);
    }
}
