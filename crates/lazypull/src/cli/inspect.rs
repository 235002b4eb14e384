//! `lazypull inspect`: what an image on disk holds — entries, chunks, blobs,
//! deduplication, sizes — as text or JSON. It reads; it must not change
//! or verify anything (that is `verify`).

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use lazypull_erofs::layout::FileType;
use lazypull_erofs::ChunkEntry;
use serde::Serialize;

use super::build::{read_image_config, IMAGE_CONFIG_FILE};
use super::image_dir::{open, tags, BlobFile, ImageArgs};
use super::output::human;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    /// Also list every entry (path, type, size, chunks).
    #[arg(long)]
    pub(crate) files: bool,
}

#[derive(Serialize)]
struct BlobSummary {
    digest: String,
    size: u64,
    present: bool,
    chunks_referenced: u64,
    /// What the meta blob's trailer vouches for: `sha256:<hex>` of its chunk
    /// table, `plain`, or nothing (no trailer).
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<String>,
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
    /// Whether the meta blob carries a blob trailer (needed to serve the
    /// image from --blob-url).
    trailer: bool,
    data_bytes: u64,
    /// The lazypull image format `lazypull push` writes this image as.
    push_format: u32,
    /// The runtime config recorded by `build` (an image directory's
    /// `image-config.json`): architecture, os and the `config` object
    /// (Entrypoint, Cmd, Env, WorkingDir, User, ...). None: the source had
    /// none, and `push` writes a minimal one.
    runtime_config: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<FileLine>>,
}

/// The runtime config fields of an image directory's recorded config.
fn runtime_config(image: &std::path::Path) -> anyhow::Result<Option<serde_json::Value>> {
    let path = image.join(IMAGE_CONFIG_FILE);
    if !image.is_dir() || !path.exists() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&read_image_config(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut out = serde_json::Map::new();
    for key in [
        "architecture",
        "os",
        "variant",
        "created",
        "author",
        "config",
    ] {
        if let Some(x) = v.get(key) {
            out.insert(key.to_owned(), x.clone());
        }
    }
    Ok(Some(serde_json::Value::Object(out)))
}

pub(crate) fn kind(t: FileType) -> &'static str {
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
    let trailer = o
        .image
        .trailer()
        .context("reading the meta blob's trailer")?;
    let vouched = |digest: &str| {
        let e = trailer.as_ref()?.entry(digest)?;
        Some(match e.table {
            Some(t) => format!("sha256:{} ({} bytes)", hex::encode(t.sha256), t.size),
            None => "plain".to_owned(),
        })
    };
    let blobs: Vec<BlobSummary> = tags(&o.image)
        .into_iter()
        .zip(o.image.devices())
        .enumerate()
        .map(|(i, (digest, slot))| BlobSummary {
            present: BlobFile::present(&o.blob_dir, &digest),
            size: u64::from(slot.blocks) * 4096,
            chunks_referenced: per_device.get(&(i as u16 + 1)).copied().unwrap_or(0),
            table: vouched(&digest),
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
        trailer: trailer.is_some(),
        blobs,
        push_format: lazypull_oci::lazy::FORMAT_VERSION,
        runtime_config: runtime_config(&args.image.image)?,
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
    if report.trailer {
        println!("  blob trailer: the meta blob vouches for each data blob's chunk table");
    } else {
        println!(
            "  no blob trailer (built by an older lazypull): it cannot be served from --blob-url"
        );
    }
    match &report.runtime_config {
        Some(c) => {
            println!(
                "  runtime config ({}/{}), pushed as lazypull image format {}:",
                c["os"].as_str().unwrap_or("?"),
                c["architecture"].as_str().unwrap_or("?"),
                report.push_format
            );
            if let Some(fields) = c.get("config").and_then(|c| c.as_object()) {
                for (k, v) in fields {
                    println!("    {k}: {v}");
                }
            }
        }
        None => println!(
            "  no runtime config: pushed as lazypull image format {} with a minimal one",
            report.push_format
        ),
    }
    for (i, b) in report.blobs.iter().enumerate() {
        if let Some(t) = &b.table {
            println!("  device {}: chunk table {t}", i + 1);
        }
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
