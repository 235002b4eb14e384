//! `lazypull build`, `inspect` and `verify`: front ends over `lazypull-erofs`.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use lazypull_erofs::layout::FileType;
use lazypull_erofs::{BuildOptions, BuildProgress, ChunkEntry, Image, Manifest, Progress, Stage};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::parse_size;

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// What to build from: a directory, a tar (plain or gzip), an OCI image layout
    /// directory, or a `docker save` archive. Image layers are applied in order
    /// with OCI whiteouts.
    pub source: PathBuf,
    /// Output directory: receives the meta blob and data blobs (files named by
    /// their sha256) and manifest.json. A failed build leaves it as it was.
    #[arg(short, long, value_name = "OUTDIR")]
    pub output: PathBuf,
    /// Chunk size (power of two, 4KiB or more): the unit of deduplication and of
    /// lazy fetching.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// How data blobs are stored: `zstd` packs each into 1 MiB zstd units with a
    /// chunk table (`<digest>.zst` + `<digest>.table`, served decompressed and
    /// verified by the daemon); `none` keeps the plain blob files, which the
    /// kernel can also mount file-backed without a daemon.
    #[arg(long, value_enum, default_value_t = Compress::Zstd)]
    pub compression: Compress,
    /// zstd level (1-19).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    Zstd,
    None,
}

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// An image: a build output directory (with manifest.json), or a meta blob
    /// whose data blobs sit beside it.
    pub image: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Also list every entry (path, type, size, chunks).
    #[arg(long)]
    pub files: bool,
}

/// Draws build progress: a spinner while unpacking layers, then a byte bar.
struct Bar(ProgressBar);

impl BuildProgress for Bar {
    fn stage(&self, stage: Stage) {
        match stage {
            Stage::Extracting {
                index,
                count,
                label,
            } => {
                self.0.set_style(
                    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").unwrap(),
                );
                self.0
                    .set_message(format!("unpacking layer {}/{count}: {label}", index + 1));
            }
            Stage::Chunking { files, bytes } => {
                self.0.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap()
                    .progress_chars("=> "),
                );
                self.0.set_length(bytes);
                self.0.set_position(0);
                self.0.set_message(format!("chunking {files} files"));
            }
            Stage::Meta => self.0.set_message("writing meta blob"),
        }
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

fn bar(hidden: bool) -> ProgressBar {
    if hidden {
        ProgressBar::hidden()
    } else {
        // Draws on stderr only when it is a terminal.
        let pb = ProgressBar::new_spinner();
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    }
}

pub fn build(args: BuildArgs) -> anyhow::Result<()> {
    let chunk_size = u32::try_from(args.chunk_size)
        .ok()
        .filter(|c| c.is_power_of_two() && *c >= 4096)
        .with_context(|| {
            format!(
                "--chunk-size must be a power of two from 4KiB to 2GiB, got {}",
                args.chunk_size
            )
        })?;
    let started = std::time::Instant::now();
    let zstd = (args.compression == Compress::Zstd).then_some(args.zstd_level);
    let (img, stored_total) = build_image(&args.source, &args.output, chunk_size, zstd, args.json)?;
    let data: u64 = img.blobs.iter().map(|b| b.size).sum();
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let out = serde_json::json!({
            "output": args.output,
            "meta": {"digest": img.meta_digest, "size": img.meta_size},
            "blobs": img.blobs,
            "compression": format!("{:?}", args.compression).to_lowercase(),
            "stored_bytes": stored_total,
            "chunk_size": img.chunk_size,
            "inodes": img.inodes,
            "files": img.files,
            "file_bytes": img.bytes,
            "chunks_stored": img.chunks_stored,
            "chunks_deduplicated": img.chunks_deduplicated,
            "chunks_holes": img.chunks_holes,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "built {} in {secs:.1}s: {} inodes, {} files, {} of file data",
        args.output.display(),
        img.inodes,
        img.files,
        human(img.bytes)
    );
    println!("  meta blob  {}  {}", img.meta_digest, human(img.meta_size));
    for b in &img.blobs {
        println!(
            "  data blob  {}  {} ({} chunks)",
            b.digest,
            human(b.size),
            b.chunks
        );
    }
    println!(
        "  chunks: {} stored, {} deduplicated; data blobs {} in all",
        img.chunks_stored,
        img.chunks_deduplicated,
        human(data)
    );
    println!(
        "serve it: lazypull daemon --blob-dir {} ...; mount -t erofs none -o fsid={} MOUNTPOINT",
        args.output.display(),
        img.meta_digest
    );
    Ok(())
}

/// Builds an image from `source` into `output` and, with `zstd` (a level),
/// packs each data blob into zstd units with its chunk table. Returns the
/// image and its stored size (meta blob excluded). Progress bars unless `quiet`.
pub fn build_image(
    source: &Path,
    output: &Path,
    chunk_size: u32,
    zstd: Option<i32>,
    quiet: bool,
) -> anyhow::Result<(lazypull_erofs::BuiltImage, u64)> {
    let pb = bar(quiet);
    let opts = BuildOptions {
        chunk_size,
        progress: Progress::new(Arc::new(Bar(pb.clone()))),
        ..BuildOptions::default()
    };
    let result = lazypull_erofs::build_from_source(source, output, &opts);
    pb.finish_and_clear();
    let img = result.with_context(|| format!("building {}", source.display()))?;
    let Some(level) = zstd else {
        let stored = img.blobs.iter().map(|b| b.size).sum();
        return Ok((img, stored));
    };
    let pb = bar(quiet);
    let opts = lazypull_blob::PackOptions {
        compression: lazypull_blob::Compression::Zstd { level },
        ..lazypull_blob::PackOptions::default()
    };
    let mut stored = 0;
    for (i, b) in img.blobs.iter().enumerate() {
        pb.set_message(format!(
            "compressing data blob {}/{}",
            i + 1,
            img.blobs.len()
        ));
        let plain = output.join(&b.digest);
        let packed = lazypull_blob::pack(&plain, output, &opts)
            .with_context(|| format!("compressing {}", plain.display()))?;
        std::fs::remove_file(&plain).with_context(|| format!("removing {}", plain.display()))?;
        stored += packed.stored_size + packed.table_size;
    }
    pb.finish_and_clear();
    Ok((img, stored))
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// An image on disk: its meta blob, parsed, and where its data blobs are.
struct Opened {
    meta_path: PathBuf,
    meta: Vec<u8>,
    image: Image,
    blob_dir: PathBuf,
}

fn open(path: &Path) -> anyhow::Result<Opened> {
    let (meta_path, blob_dir) = if path.is_dir() {
        let manifest_path = path.join(lazypull_erofs::MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", manifest_path.display()))?;
        (path.join(&manifest.meta), path.to_path_buf())
    } else {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        (path.to_path_buf(), dir)
    };
    let meta =
        std::fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
    let image = Image::from_bytes(meta.clone())
        .with_context(|| format!("{} is not a valid EROFS meta blob", meta_path.display()))?;
    Ok(Opened {
        meta_path,
        meta,
        image,
        blob_dir,
    })
}

/// A data blob of an image on disk: the plain file, or its stored form.
enum BlobFile {
    Plain(File),
    Stored(lazypull_blob::StoredBlob<File>),
}

impl BlobFile {
    fn open(dir: &Path, digest: &str) -> anyhow::Result<BlobFile> {
        if let Some(stored) = lazypull_blob::open_local(dir, digest)? {
            return Ok(BlobFile::Stored(stored));
        }
        let path = dir.join(digest);
        Ok(BlobFile::Plain(File::open(&path).with_context(|| {
            format!("data blob {}", path.display())
        })?))
    }

    fn present(dir: &Path, digest: &str) -> bool {
        dir.join(digest).is_file() || dir.join(format!("{digest}.table")).is_file()
    }
}

/// Lets the image reader read file data through either form.
impl std::os::unix::fs::FileExt for BlobFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            BlobFile::Plain(f) => f.read_at(buf, offset),
            BlobFile::Stored(s) => lazypull_backend::BlobSource::read_at(s, buf, offset),
        }
    }

    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

fn tags(image: &Image) -> Vec<String> {
    image
        .devices()
        .iter()
        .map(|d| String::from_utf8_lossy(d.tag_bytes()).into_owned())
        .collect()
}

#[derive(Serialize)]
struct BlobSummary {
    digest: String,
    size: u64,
    present: bool,
    chunks_referenced: u64,
}

#[derive(Serialize)]
struct FileLine {
    path: String,
    kind: String,
    size: u64,
    chunks: usize,
}

#[derive(Serialize)]
struct Inspection {
    meta: String,
    meta_size: u64,
    inodes: u64,
    entries_by_type: BTreeMap<String, u64>,
    hard_links: u64,
    file_bytes: u64,
    chunk_size: Option<u64>,
    chunk_refs: u64,
    unique_chunks: u64,
    dedup_ratio: f64,
    blobs: Vec<BlobSummary>,
    data_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<FileLine>>,
}

fn kind(t: FileType) -> &'static str {
    match t {
        FileType::Regular => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::CharDevice => "chardev",
        FileType::BlockDevice => "blockdev",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::Unknown => "unknown",
    }
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let o = open(&args.image.image)?;
    let walk = o.image.walk().context("walking the image")?;
    let mut by_type = BTreeMap::new();
    let mut seen = HashSet::new();
    let (mut hard_links, mut file_bytes, mut refs) = (0, 0, 0u64);
    let mut unique = HashSet::new();
    let mut per_device: BTreeMap<u16, u64> = BTreeMap::new();
    let mut chunk_size = None;
    let mut files = Vec::new();
    for e in &walk {
        let path = String::from_utf8_lossy(&e.path).into_owned();
        let n_chunks = e.inode.chunks.as_ref().map_or(0, |m| m.entries.len());
        if args.files {
            files.push(FileLine {
                path: if path.is_empty() { "/".into() } else { path },
                kind: kind(e.inode.file_type).into(),
                size: e.inode.size,
                chunks: n_chunks,
            });
        }
        if !seen.insert(e.inode.nid) {
            hard_links += 1;
            continue;
        }
        *by_type
            .entry(kind(e.inode.file_type).to_string())
            .or_insert(0u64) += 1;
        if e.inode.file_type == FileType::Regular {
            file_bytes += e.inode.size;
        }
        if let Some(map) = &e.inode.chunks {
            chunk_size = Some(map.chunk_size);
            for c in &map.entries {
                refs += 1;
                if let ChunkEntry::Mapped { device_id, blkaddr } = c {
                    unique.insert((*device_id, *blkaddr));
                    *per_device.entry(*device_id).or_insert(0) += 1;
                }
            }
        }
    }
    let blobs: Vec<BlobSummary> = tags(&o.image)
        .into_iter()
        .zip(o.image.devices())
        .enumerate()
        .map(|(i, (digest, slot))| BlobSummary {
            present: BlobFile::present(&o.blob_dir, &digest),
            size: u64::from(slot.blocks) * 4096,
            chunks_referenced: per_device.get(&(i as u16 + 1)).copied().unwrap_or(0),
            digest,
        })
        .collect();
    let report = Inspection {
        meta: o.meta_path.display().to_string(),
        meta_size: o.meta.len() as u64,
        inodes: seen.len() as u64,
        entries_by_type: by_type,
        hard_links,
        file_bytes,
        chunk_size,
        chunk_refs: refs,
        unique_chunks: unique.len() as u64,
        dedup_ratio: if unique.is_empty() {
            1.0
        } else {
            refs as f64 / unique.len() as f64
        },
        data_bytes: blobs.iter().map(|b| b.size).sum(),
        blobs,
        files: args.files.then_some(files),
    };
    if args.image.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "image {} ({} meta blob)",
        report.meta,
        human(report.meta_size)
    );
    let types: Vec<String> = report
        .entries_by_type
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    println!(
        "  {} inodes: {}; {} extra hard links",
        report.inodes,
        types.join(", "),
        report.hard_links
    );
    println!(
        "  {} of file data in {} chunk references to {} stored chunks{} (dedup ratio {:.2})",
        human(report.file_bytes),
        report.chunk_refs,
        report.unique_chunks,
        report
            .chunk_size
            .map(|c| format!(" of {}", human(c)))
            .unwrap_or_default(),
        report.dedup_ratio
    );
    for (i, b) in report.blobs.iter().enumerate() {
        println!(
            "  device {}: {} {} {} chunks referenced{}",
            i + 1,
            b.digest,
            human(b.size),
            b.chunks_referenced,
            if b.present {
                ""
            } else {
                "  (MISSING beside the meta blob)"
            }
        );
    }
    if let Some(files) = &report.files {
        for f in files {
            println!("{:8} {:>12} {:>6}  {}", f.kind, f.size, f.chunks, f.path);
        }
    }
    Ok(())
}

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

#[derive(Serialize)]
struct Verification {
    ok: bool,
    meta: String,
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
    let total: u64 = o
        .image
        .devices()
        .iter()
        .map(|d| u64::from(d.blocks) * 4096)
        .sum();
    let pb = bar(args.json);
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
        pb.set_length(files.iter().map(|e| e.inode.size).sum());
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
                        let len = map.chunk_size.min(e.inode.size - i as u64 * map.chunk_size);
                        let end = blkaddr * 4096 + len;
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
            bytes_read += pos;
        }
    }
    pb.finish_and_clear();
    let report = Verification {
        ok: problems.is_empty(),
        meta: o.meta_path.display().to_string(),
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
