//! `lazypull`: the command-line front end. Glue only: it parses flags and config,
//! sets up logging and signals, and wires a backend to a transport. Format, fetch
//! and protocol logic live in the library crates.

mod catalog;
mod config;
mod control;
mod daemon;
mod image;
mod logging;
mod mount;
mod prefetch;
mod publish;

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

    /// Upload a built image to an OCI registry as a lazy image.
    ///
    /// Pushes the meta blob, every data blob's chunk table and stored units, and
    /// a config tying them together, as an OCI manifest with lazypull media
    /// types (any OCI registry stores it). Blobs already there are skipped.
    ///
    ///     lazypull push ./out 127.0.0.1:5000/lazy/app:v1
    #[command(verbatim_doc_comment)]
    Push(publish::PushArgs),

    /// Pull an ordinary OCI/Docker image from a registry, build it into a lazy
    /// image and push that.
    ///
    ///     lazypull convert registry.example.com/app:v1 registry.example.com/app:v1-lazy
    #[command(verbatim_doc_comment)]
    Convert(publish::ConvertArgs),

    /// Mount a lazy image from a registry through the running daemon.
    ///
    /// The daemon fetches the manifest, the meta blob and the chunk tables now
    /// (verified), and data only when something reads it. Credentials: --username
    /// with --password-stdin, LAZYPULL_REGISTRY_USER / LAZYPULL_REGISTRY_PASSWORD,
    /// or a docker config file.
    ///
    ///     lazypull mount 127.0.0.1:5000/lazy/app:v1 /mnt/app
    #[command(verbatim_doc_comment)]
    Mount(mount::MountArgs),

    /// Unmount an image mounted with `lazypull mount`.
    Umount(mount::UmountArgs),

    /// Show the running daemon's counters, images and open cache objects.
    Status(mount::StatusArgs),
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
        Command::Push(args) => publish::push(args),
        Command::Convert(args) => publish::convert(args),
        Command::Mount(args) => mount::mount(args),
        Command::Umount(args) => mount::umount(args),
        Command::Status(args) => mount::status(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazypull: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
