//! `lazypull build`: an image from a directory, a tar, an OCI image layout or
//! a `docker save` archive, through `lazypull-ingest` and `lazypull-erofs`,
//! with its data blobs packed by `lazypull-blob`; and the progress it shows.
//! The source image's runtime config (OCI layouts and `docker save` archives
//! carry one; `--config FILE` gives one) is kept beside the manifest as
//! [`IMAGE_CONFIG_FILE`], for `lazypull push`. It must not build or pack
//! anything itself.

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
    /// The image's runtime config: an OCI image config JSON file
    /// (architecture, os, `config.Entrypoint`, `Env`, ...), kept as it is but
    /// for `rootfs`, which `push` writes. Default: the source image's config
    /// (OCI layout, `docker save`), else a minimal one (the host's
    /// architecture, linux, no entrypoint).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The file of a built image directory that holds the source image's
/// runtime config (its JSON as the source had it), if it had one.
pub(crate) const IMAGE_CONFIG_FILE: &str = "image-config.json";

/// Largest runtime config read (`--config`, an image directory's).
pub(crate) const MAX_IMAGE_CONFIG: u64 = 16 << 20;

/// Reads a runtime config file: a JSON object within [`MAX_IMAGE_CONFIG`].
pub(crate) fn read_image_config(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_IMAGE_CONFIG + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > MAX_IMAGE_CONFIG {
        anyhow::bail!(
            "{}: larger than {MAX_IMAGE_CONFIG} bytes, too large for an image config",
            path.display()
        );
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an image config: malformed JSON", path.display()))?;
    if !value.is_object() {
        anyhow::bail!(
            "{} is not an image config: not a JSON object",
            path.display()
        );
    }
    Ok(bytes)
}

/// Records `config` (or that there is none) as `output`'s
/// [`IMAGE_CONFIG_FILE`], replacing what an earlier build left.
pub(crate) fn record_image_config(output: &Path, config: Option<&[u8]>) -> anyhow::Result<()> {
    let path = output.join(IMAGE_CONFIG_FILE);
    match config {
        Some(bytes) => crate::files::write_atomically(&path, bytes, 0o644)
            .with_context(|| format!("writing {}", path.display())),
        None => match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        },
    }
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
    // Read before building, so a bad file leaves the output as it was.
    let config = args.config.as_deref().map(read_image_config).transpose()?;
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
    if let Some(config) = &config {
        record_image_config(&args.output, Some(config))?;
    }
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
            "runtime_config": args.output.join(IMAGE_CONFIG_FILE).is_file(),
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
/// packs each data blob into zstd units with its chunk table; records the
/// source's runtime config ([`IMAGE_CONFIG_FILE`], removed if the source has
/// none). Returns the image and its stored size (meta blob excluded).
/// Progress bars unless `quiet`.
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
    let result = lazypull_ingest::build_source_image(source, output, &opts, limits);
    pb.finish_and_clear();
    let built = result.with_context(|| format!("building {}", source.display()))?;
    record_image_config(output, built.config.as_ref().map(|c| &c.bytes[..]))?;
    let img = built.image;
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
