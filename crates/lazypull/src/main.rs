//! `lazypull`: the command line. Glue only: it parses the command line (clap),
//! sets up logging, calls the `lazypull` library's function for the
//! subcommand and turns its result into an exit status. Everything else —
//! config files, signals, the daemon, every command's work — lives in the
//! library (`src/lib.rs`) and the crates it wires.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use lazypull::{cli, config, daemon, fdstore, logging};

/// Lazily pulled container images: mount an EROFS image at once, fetch its data
/// only when something reads it.
///
/// The kernel's EROFS asks lazypull for the byte ranges a reader misses, through
/// /dev/cachefiles (on-demand mode, where the kernel has it) or through blob
/// files on a FUSE mount (every other kernel from 6.12 on); lazypull fetches them
/// from a registry, a web server or a directory, verifies them and caches them.
///
/// Try it: `lazypull demo` (as root). Then: `lazypull build`, `lazypull push`,
/// `lazypull daemon`, `lazypull mount`.
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
    /// Serve lazy images to the kernel: the daemon `lazypull mount` talks to.
    ///
    /// Picks a transport (--transport auto): cachefiles on-demand mode if the
    /// kernel has it (the kernel keeps the cache in --cache-dir), else blob files
    /// on a private FUSE mount (--fuse-dir) that EROFS mounts file-backed on
    /// Linux 6.12+ (lazypull keeps the cache in --cache-dir/blobs), else the
    /// same blob files behind read-only loop devices (--transport loop, for
    /// 5.16-6.11). Logs which and why. `--transport fanotify` (6.14+) has
    /// EROFS mount sparse cache files that the daemon fills when the kernel
    /// reports a read of a range not there yet.
    ///
    /// Images come from registries (`lazypull mount REF DIR`), or by their meta
    /// blob name from --blob-dir / --blob-url (`lazypull mount --fsid NAME DIR`).
    /// With cachefiles, a blob-dir image also mounts directly:
    ///
    ///     mount -t erofs none -o fsid=<name> /mnt/image
    ///
    /// The kernel connection is parked in an fd store (started on demand), so a
    /// crashed daemon's successor takes the mounts over; `--takeover` upgrades a
    /// running daemon in place. SIGTERM / SIGINT / `lazypull shutdown` stop for
    /// good. Status: `lazypull status`; metrics: --metrics-addr.
    #[command(verbatim_doc_comment)]
    Daemon(Box<config::DaemonArgs>),

    /// Show lazy pulling end to end, on this machine, with nothing to set up.
    ///
    /// Builds an image from a sample tree built into lazypull, serves it from a
    /// web server on 127.0.0.1, starts a daemon with the best transport this
    /// kernel has, mounts the image lazily, reads a few files, and prints what
    /// was fetched against the image's size. Cleans up after itself (also on
    /// Ctrl-C). Needs root (it mounts file systems).
    Demo(cli::DemoArgs),

    /// Stop the daemon for good: unbind the cache or unmount the blob files and
    /// release the fd store. Mounted images stop working.
    Shutdown(cli::ShutdownArgs),

    /// Stop the daemon but keep its mounts for the next daemon (restart, upgrade):
    /// the kernel connections stay in the fd store, reads wait until a new
    /// `lazypull daemon` takes them over. (`lazypull daemon --takeover` does
    /// both steps at once.)
    Handover(cli::HandoverArgs),

    /// Serve containerd's snapshots API: an overlayfs snapshotter for
    /// containerd, in its own process beside the daemon (each survives the
    /// other's restarts).
    ///
    /// containerd reaches it as a proxy plugin; in /etc/containerd/config.toml:
    ///
    ///     [proxy_plugins.lazypull]
    ///       type = "snapshot"
    ///       address = "/run/lazypull/snapshotter.sock"
    ///
    /// then `ctr run --snapshotter lazypull ...`, or in the CRI plugin:
    /// `[plugins."io.containerd.grpc.v1.cri".containerd] snapshotter = "lazypull"`.
    ///
    /// Lazy images (`lazypull pull`, or CRI with snapshot annotations): their
    /// layers are committed without fetching anything; a container's
    /// snapshot gets the image mounted through the daemon at
    /// --daemon-socket, once per image under <root>/lazy/<meta digest>, and
    /// unmounted when the image's last container snapshot is removed.
    ///
    /// Snapshots and their store live under --root (crash-safe: a killed
    /// snapshotter restarts consistent and removes half-made directories;
    /// lazy mounts still in use are kept, unused ones unmounted).
    /// The socket is 0600; a stale one is replaced, a live one refused.
    /// SIGTERM / SIGINT stop it gracefully. Log each call with --log-level debug.
    #[command(verbatim_doc_comment)]
    Snapshotter(cli::SnapshotterArgs),

    /// Stand between kubelet and containerd so that lazy images get kubelet's
    /// registry credentials.
    ///
    /// Kubelet sends the credentials of an image (pull secrets, credential
    /// provider plugins) with its CRI PullImage; containerd uses them for the
    /// pull but gives them to no snapshotter, so the lazypull daemon, which
    /// reads the image's data later, would have none. Point kubelet's image
    /// service at this proxy:
    ///
    ///     kubelet --image-service-endpoint=unix:///run/lazypull/cri.sock ...
    ///
    /// Every call goes on to --runtime unchanged; when a PullImage succeeds,
    /// its credentials go to the daemon at --daemon-socket before kubelet
    /// gets the answer. The daemon keeps them in memory only, for the
    /// registry host and repository of the image, as long as an image of
    /// that repository is registered (unused ones go after 10 minutes), and
    /// parks them in its fd store (a sealed memfd, never a file), so its
    /// mounts keep reading after the daemon restarts. The proxy holds no
    /// state: restarting it changes nothing for running containers.
    /// The socket is 0600. `lazypull status` lists the repositories held.
    #[command(verbatim_doc_comment)]
    CriProxy(cli::CriProxyArgs),

    /// The fd store process (started by the daemon; see `lazypull daemon --help`).
    #[command(hide = true)]
    Fdstore(FdstoreArgs),

    /// Build a lazy image: an EROFS meta blob plus chunked, deduplicated data blobs.
    ///
    /// SOURCE is a directory, a tar (plain or gzip), an OCI image layout directory
    /// or a `docker save` archive; image layers are applied in order with OCI
    /// whiteouts, one data blob per layer. Every file is named by its sha256, so
    /// images built from the same layers share blobs.
    Build(cli::BuildArgs),

    /// Describe an image: entries, chunks, blobs, deduplication, sizes.
    Inspect(cli::InspectArgs),

    /// Re-read an image completely and check every digest and chunk reference.
    ///
    /// Exits non-zero, listing the problems, if anything does not match.
    Verify(cli::ImageArgs),

    /// Upload a built image to an OCI registry as a lazy image.
    ///
    /// Pushes the meta blob, every data blob's chunk table and stored units, and
    /// a config tying them together, as an OCI manifest with lazypull media
    /// types (any OCI registry stores it). Blobs already there are skipped.
    ///
    ///     lazypull push ./out 127.0.0.1:5000/lazy/app:v1
    #[command(verbatim_doc_comment)]
    Push(cli::PushArgs),

    /// Pull an ordinary OCI/Docker image from a registry, build it into a lazy
    /// image and push that.
    ///
    ///     lazypull convert registry.example.com/app:v1 registry.example.com/app:v1-lazy
    #[command(verbatim_doc_comment)]
    Convert(cli::ConvertArgs),

    /// Record what a workload reads first from a lazy image, and push the image
    /// again with that order: the daemon then fetches it first at every mount.
    ///
    /// Mounts the image through the running daemon (whose cache must not hold
    /// its data yet), runs COMMAND once chrooted in it as root (on a writable
    /// overlay; /proc and /dev mounted where the image has them), records the
    /// data ranges its reads waited for, in order, as files and ranges within
    /// them, and pushes the same image plus that record (a small blob the
    /// manifest's annotations name) to --out.
    ///
    ///     lazypull optimize 127.0.0.1:5000/app:lazy --out 127.0.0.1:5000/app:lazy-opt \
    ///         -- /usr/bin/python3 -c 'import numpy'
    #[command(verbatim_doc_comment)]
    Optimize(cli::OptimizeArgs),

    /// Mount a lazy image from a registry through the running daemon.
    ///
    /// The daemon fetches the manifest, the meta blob and the chunk tables now
    /// (verified), and data only when something reads it. Credentials: --username
    /// with --password-stdin, LAZYPULL_REGISTRY_USER / LAZYPULL_REGISTRY_PASSWORD,
    /// or a docker config file.
    ///
    ///     lazypull mount 127.0.0.1:5000/lazy/app:v1 /mnt/app
    #[command(verbatim_doc_comment)]
    Mount(cli::MountArgs),

    /// Unmount an image mounted with `lazypull mount`.
    Umount(cli::UmountArgs),

    /// Pull a lazy image into containerd without fetching its layers.
    ///
    /// Fetches the image's manifest (the linux/<this host's architecture>
    /// one, from an index) and config from the registry, writes both to
    /// containerd's content store, and has containerd's snapshotter make
    /// every layer's snapshot remotely (containerd's snapshots service, with
    /// the layer's labels): `lazypull snapshotter` commits them on the spot,
    /// fetching nothing. Then containerd has the image, unpacked, under its
    /// name; the first container to start mounts it through `lazypull
    /// daemon`, which fetches data as the container reads it.
    ///
    /// Needs containerd with `lazypull snapshotter` as its proxy snapshotter
    /// (see `lazypull snapshotter --help`) and `lazypull daemon` running.
    /// containerd 1.6's own `ctr image pull` is not the lazy path: it fetches
    /// every layer first (and cannot unpack lazypull's layers).
    ///
    ///     lazypull pull registry.example.com/app:v1-lazy
    ///     ctr run --rm --snapshotter lazypull registry.example.com/app:v1-lazy c1
    ///
    /// Under a containerd lease while it works: if it fails, containerd
    /// collects what it wrote. Credentials as for `lazypull mount` (they are
    /// used here for the manifest and config only: the daemon's own
    /// registry settings fetch the data).
    #[command(verbatim_doc_comment)]
    Pull(cli::PullArgs),

    /// Show the running daemon's transport, counters, images and blobs.
    Status(cli::StatusArgs),
}

#[derive(Debug, clap::Args)]
struct FdstoreArgs {
    #[arg(long, value_name = "PATH", default_value = fdstore::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,
    /// Serve on the listening socket given as stdin (how the daemon starts
    /// the store: it binds the socket itself, so it need not wait for this
    /// process).
    #[arg(long)]
    inherit_listener: bool,
}

fn main() -> std::process::ExitCode {
    let started = std::time::Instant::now();
    let line = Cli::parse();
    if let Err(e) = logging::init(line.log_level.as_deref(), line.log_format) {
        eprintln!("lazypull: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match line.command {
        Command::Daemon(args) => daemon::run(*args, started),
        Command::Build(args) => cli::build(args),
        Command::Inspect(args) => cli::inspect(args),
        Command::Verify(args) => cli::verify(args),
        Command::Push(args) => cli::push(args),
        Command::Convert(args) => cli::convert(args),
        Command::Optimize(args) => cli::optimize(args),
        Command::Mount(args) => cli::mount(args),
        Command::Umount(args) => cli::umount(args),
        Command::Pull(args) => cli::pull(args),
        Command::Status(args) => cli::status(args),
        Command::Demo(args) => cli::demo(args),
        Command::Shutdown(args) => cli::shutdown(args),
        Command::Handover(args) => cli::handover(args),
        Command::Fdstore(args) if args.inherit_listener => fdstore::serve_inherited(&args.socket),
        Command::Fdstore(args) => fdstore::serve(&args.socket),
        Command::Snapshotter(args) => cli::snapshotter(args),
        Command::CriProxy(args) => cli::cri_proxy(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazypull: error: {}", cli::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
