//! `lazypull`: the command-line front end. Glue only: it parses flags and config,
//! sets up logging and signals, and wires a backend to a transport. Format, fetch
//! and protocol logic live in the library crates.

mod config;
mod daemon;
mod image;
mod logging;

use clap::{Parser, Subcommand};

/// Lazily pulled container images: mount an EROFS image at once, fetch its data
/// only when something reads it.
///
/// lazypull is the user-space half of the Linux cachefiles on-demand read mode:
/// the kernel's EROFS asks, through /dev/cachefiles, for the byte ranges a reader
/// misses; lazypull reads them from a blob store and writes them into the kernel's
/// cache, after which the kernel serves them itself.
#[derive(Debug, Parser)]
#[command(name = "lazypull", version, propagate_version = true)]
struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing filter such as
    /// `lazypull_transport=debug`. Overrides LAZYPULL_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve EROFS images to the kernel through /dev/cachefiles (on-demand mode).
    ///
    /// Binds the cachefiles device in on-demand mode with DIR as the cache, then
    /// answers the kernel: an OPEN names a blob (the image's fsid, or a data
    /// device's tag), which is looked up by file name in the blob dir; a READ is
    /// filled from that blob. Runs until SIGTERM or SIGINT.
    ///
    /// Then mount an image whose meta blob is BLOB_DIR/<name>:
    ///
    ///     mount -t erofs none -o fsid=<name> /mnt/image
    ///
    /// Images sharing data blobs can share their cache with `-o fsid=<name>,domain_id=<domain>`.
    #[command(verbatim_doc_comment)]
    Daemon(config::DaemonArgs),

    /// Build a lazy image: an EROFS meta blob plus chunked, deduplicated data blobs.
    ///
    /// SOURCE is a directory, a tar (plain or gzip), an OCI image layout directory
    /// or a `docker save` archive; image layers are applied in order with OCI
    /// whiteouts, one data blob per layer. Every file is named by its sha256, so
    /// images built from the same layers share blobs.
    Build(image::BuildArgs),

    /// Describe an image: entries, chunks, blobs, deduplication, sizes.
    Inspect(image::InspectArgs),

    /// Re-read an image completely and check every digest and chunk reference.
    ///
    /// Exits non-zero, listing the problems, if anything does not match.
    Verify(image::ImageArgs),
}

fn main() -> std::process::ExitCode {
    let started = std::time::Instant::now();
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_level.as_deref(), cli.log_format) {
        eprintln!("lazypull: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Daemon(args) => daemon::run(args, started),
        Command::Build(args) => image::build(args),
        Command::Inspect(args) => image::inspect(args),
        Command::Verify(args) => image::verify(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazypull: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
