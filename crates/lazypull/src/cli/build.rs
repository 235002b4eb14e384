//! `lazypull build`: an image from a directory, a tar, an OCI image layout or
//! a `docker save` archive, through `lazypull-ingest` and `lazypull-erofs`,
//! with its data blobs packed by `lazypull-blob`; and the progress it shows.
//! It must not build or pack anything itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lazypull_erofs::{BuildOptions, BuildProgress, Progress, Stage};
use sha2::{Digest, Sha256};

use super::output::{human, progress_bar};
use crate::config::parse_size;

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// What to build from: a directory, a tar (plain or gzip), an OCI image layout
    /// directory, or a `docker save` archive. Image layers are applied in order
    /// with OCI whiteouts.
    pub(crate) source: PathBuf,
    /// Output directory: receives the meta blob and data blobs (files named by
    /// their sha256) and manifest.json. A failed build leaves it as it was.
    #[arg(short, long, value_name = "OUTDIR")]
    pub(crate) output: PathBuf,
    /// Chunk size (power of two, 4KiB or more): the unit of deduplication and of
    /// lazy fetching.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub(crate) chunk_size: u64,
    /// How data blobs are stored: `zstd` packs each into 1 MiB zstd units with a
    /// chunk table (`<digest>.zst` + `<digest>.table`, served decompressed and
    /// verified by the daemon); `none` keeps the plain blob files, which the
    /// kernel can also mount file-backed without a daemon.
    #[arg(long, value_enum, default_value_t = Compress::Zstd)]
    pub(crate) compression: Compress,
    /// zstd level (1-19).
    #[arg(long, default_value_t = 3)]
    pub(crate) zstd_level: i32,
    /// Most bytes one tar layer may expand to (its decompressed stream, and
    /// its files, sparse ones at full size): a bigger layer, or a
    /// decompression bomb, is refused. Suffixes K, M, G.
    #[arg(long, value_name = "SIZE", default_value = "32GiB", value_parser = parse_size)]
    pub(crate) max_layer_size: u64,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Compress {
    Zstd,
    None,
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
    let limits = lazypull_ingest::IngestOptions {
        max_layer_size: args.max_layer_size,
    };
    let (img, stored_total) = build_image(
        &args.source,
        &args.output,
        chunk_size,
        zstd,
        &limits,
        args.json,
    )?;
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
pub(crate) fn build_image(
    source: &Path,
    output: &Path,
    chunk_size: u32,
    zstd: Option<i32>,
    limits: &lazypull_ingest::IngestOptions,
    quiet: bool,
) -> anyhow::Result<(lazypull_erofs::BuiltImage, u64)> {
    let pb = progress_bar(quiet);
    let opts = BuildOptions {
        chunk_size,
        progress: Progress::new(Arc::new(Bar(pb.clone()))),
        ..BuildOptions::default()
    };
    let result = lazypull_ingest::build_from_source_with(source, output, &opts, limits);
    pb.finish_and_clear();
    let img = result.with_context(|| format!("building {}", source.display()))?;
    let Some(level) = zstd else {
        let stored = img.blobs.iter().map(|b| b.size).sum();
        let img = seal(output, &img, vec![None; img.blobs.len()])?;
        return Ok((img, stored));
    };
    let pb = progress_bar(quiet);
    let opts = lazypull_blob::PackOptions {
        compression: lazypull_blob::Compression::Zstd { level },
        ..lazypull_blob::PackOptions::default()
    };
    let mut stored = 0;
    let mut tables = Vec::new();
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
        let table = std::fs::read(&packed.table_path)
            .with_context(|| format!("reading {}", packed.table_path.display()))?;
        tables.push(Some(lazypull_erofs::TableRef {
            sha256: Sha256::digest(&table).into(),
            size: table.len() as u64,
        }));
    }
    pb.finish_and_clear();
    let img = seal(output, &img, tables)?;
    Ok((img, stored))
}

/// Appends the blob trailer to the meta blob: per data blob its chunk table's
/// sha256 and size (`None`: stored plain), so the fsid vouches for the tables
/// and a daemon serving the image from a web server can verify every byte.
fn seal(
    output: &Path,
    img: &lazypull_erofs::BuiltImage,
    tables: Vec<Option<lazypull_erofs::TableRef>>,
) -> anyhow::Result<lazypull_erofs::BuiltImage> {
    let mut entries = Vec::with_capacity(tables.len());
    for (b, table) in img.blobs.iter().zip(tables) {
        let mut blob = [0u8; 32];
        hex::decode_to_slice(&b.digest, &mut blob)
            .with_context(|| format!("data blob name {} is not a sha256", b.digest))?;
        entries.push(lazypull_erofs::TrailerEntry { blob, table });
    }
    lazypull_erofs::seal_output(output, img, &lazypull_erofs::Trailer { entries })
        .with_context(|| format!("writing the blob trailer into {}", output.display()))
}
