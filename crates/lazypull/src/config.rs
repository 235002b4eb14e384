//! Daemon configuration: a TOML file, overridden by command-line flags, merged
//! and validated into one `DaemonConfig`. It owns the flags, the keys and
//! their defaults; it must not act on them (the daemon does).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Default location of the config file, read if present when `--config` is not given.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/lazypull/config.toml";
/// containerd's registry host directory, read by default (`hosts_dir`).
pub(crate) const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// Which kernel interface serves the images.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TransportKind {
    /// The first the kernel offers of cachefiles on-demand, FUSE
    /// (file-backed EROFS) and loop (see `daemon::transport`).
    #[default]
    Auto,
    /// /dev/cachefiles in on-demand mode; the kernel keeps the cache.
    Cachefiles,
    /// Blob files on a private FUSE mount, mounted file-backed by EROFS;
    /// lazypull keeps the cache.
    Fuse,
    /// The same FUSE blob files, each behind a read-only loop device that
    /// EROFS mounts (kernels without file-backed EROFS, 5.16–6.11).
    Loop,
    /// Sparse cache files on the cache directory's file system, mounted
    /// file-backed by EROFS and filled when the kernel reports a read of a
    /// range not there yet (fanotify pre-content events, Linux 6.14+).
    Fanotify,
}

/// `--fuse-recovery`: see `lazypull_transport::fuse::Recovery`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FuseRecovery {
    #[default]
    Auto,
    Journal,
}

impl TransportKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Cachefiles => "cachefiles",
            TransportKind::Fuse => "fuse",
            TransportKind::Loop => "loop",
            TransportKind::Fanotify => "fanotify",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Cache directory (default /var/cache/lazypull). With cachefiles it must
    /// be on ext4, xfs or similar, not tmpfs; with FUSE lazypull keeps its own
    /// cache in DIR/blobs.
    #[arg(long, value_name = "DIR")]
    pub(crate) cache_dir: Option<PathBuf>,

    /// Kernel interface: auto (cachefiles when the kernel has on-demand mode,
    /// else FUSE when EROFS mounts files (6.12+), else loop devices over the
    /// FUSE files (5.16+)), cachefiles, fuse, loop or fanotify (sparse cache
    /// files filled on pre-content events, 6.14+; never picked by auto yet).
    #[arg(long, value_enum, value_name = "KIND")]
    pub(crate) transport: Option<TransportKind>,

    /// After a crash, how a successor answers the FUSE requests the killed
    /// daemon had read: auto (the kernel resends them, 6.9+, else from the
    /// request journal every FUSE daemon keeps in CACHE_DIR/blobs) or
    /// journal (always from the journal: how kernels before 6.9 recover).
    #[arg(long, value_enum, value_name = "HOW")]
    pub(crate) fuse_recovery: Option<FuseRecovery>,

    /// Most the daemon's own cache (FUSE, loop, fanotify) holds on disk: a
    /// size (10GiB, 500MB), a percentage of the cache's file system (20%,
    /// the default) or `unlimited`. Least recently used windows are evicted
    /// and fetched again when read; caches of images no longer registered
    /// go first. Under a limit, complete cache files are read through the
    /// daemon, never directly (so it can evict them safely).
    #[arg(long, value_name = "LIMIT", value_parser = parse_cache_limit)]
    pub(crate) cache_limit: Option<lazypull_engine::CacheLimit>,

    /// With FUSE: where the blob files appear (default /run/lazypull/blobs).
    #[arg(long, value_name = "DIR")]
    pub(crate) fuse_dir: Option<PathBuf>,

    /// Where the daemon records what a successor needs to take over its mounts
    /// (default /run/lazypull).
    #[arg(long, value_name = "DIR")]
    pub(crate) run_dir: Option<PathBuf>,

    /// The fd store that keeps the kernel connections open across daemon
    /// restarts and crashes (started if none runs). Default
    /// /run/lazypull/fdstore.sock.
    #[arg(long, value_name = "PATH")]
    pub(crate) fd_store: Option<PathBuf>,

    /// Run without an fd store: mounts die with the daemon.
    #[arg(long)]
    pub(crate) no_fd_store: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,

    /// Upgrade in place: ask the daemon running on --socket to hand its mounts
    /// over, wait for it to exit, then serve them.
    #[arg(long)]
    pub(crate) takeover: bool,

    /// Local directory of blobs named by their key (fsid or device tag), for
    /// images not mounted by reference. Optional. Trusted as it is (plain
    /// blobs, images without a blob trailer).
    #[arg(long, value_name = "DIR")]
    pub(crate) blob_dir: Option<PathBuf>,

    /// Base URL of a blob directory served over HTTP(S) with Range support (the
    /// same layout as --blob-dir), for images not mounted by reference. Tried
    /// before --blob-dir. Served only for images registered by fsid (`lazypull
    /// mount --fsid`), verified against the meta blob's blob trailer: zstd
    /// builds of this lazypull; plain blobs are refused.
    #[arg(long, value_name = "URL")]
    pub(crate) blob_url: Option<String>,

    /// Where the daemon keeps what it fetched at mount (meta blobs).
    /// Default /var/lib/lazypull.
    #[arg(long, value_name = "DIR")]
    pub(crate) work_dir: Option<PathBuf>,

    /// Control socket for `lazypull mount`, `umount` and `status`.
    /// Default /run/lazypull/lazypull.sock.
    #[arg(long, value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,

    /// Config file (TOML). Default: /etc/lazypull/config.toml if it exists.
    /// Keys: cache_dir, cache_limit, transport, fuse_dir, fuse_threads,
    /// fuse_recovery, loop_direct_io, run_dir, fd_store,
    /// metrics_addr, blob_dir, blob_url, work_dir, socket, tag, device,
    /// max_in_flight, fill_window, io_size, max_connections, max_merge,
    /// unit_cache, readahead, insecure_registries, ca_files, docker_config,
    /// hosts_dir,
    /// request_timeout_secs, range_deadline_secs, min_throughput, retries,
    /// outage_timeout_secs, circuit_breaker, proxy, max_meta_size.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// A registry (host[:port]) to reach over plain HTTP; repeatable. Loopback
    /// registries always are.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub(crate) insecure_registries: Vec<String>,

    /// Extra trusted root certificates (PEM) for registries; repeatable.
    #[arg(long = "ca-file", value_name = "FILE")]
    pub(crate) ca_files: Vec<PathBuf>,

    /// Docker-style config file with registry credentials (`docker login`
    /// writes one). Default: $DOCKER_CONFIG/config.json, ~/.docker/config.json.
    #[arg(long, value_name = "FILE")]
    pub(crate) docker_config: Option<PathBuf>,

    /// containerd's registry host directory: `<DIR>/<host>/hosts.toml`
    /// (else `<DIR>/_default/hosts.toml`) declares mirrors, TLS (ca,
    /// client, skip_verify) and headers per registry, read as containerd
    /// reads it. Default /etc/containerd/certs.d; "" reads none.
    #[arg(long, value_name = "DIR", value_parser = path_or_empty)]
    pub(crate) hosts_dir: Option<PathBuf>,

    /// Most requests in flight to one host (registry or web server), shared by
    /// every image and blob on it.
    #[arg(long, value_name = "N")]
    pub(crate) max_connections: Option<usize>,

    /// Cachefiles cache tag.
    #[arg(long)]
    pub(crate) tag: Option<String>,

    /// The cachefiles device node.
    #[arg(long, value_name = "PATH")]
    pub(crate) device: Option<PathBuf>,

    /// Most READs filled at once.
    #[arg(long, value_name = "N")]
    pub(crate) max_in_flight: Option<usize>,

    /// How long a read waits for a backend that is down (its circuit breaker
    /// open: refused or reset connections, timeouts, 5xx, short bodies, 5
    /// in a row) to come back before it fails with EIO, in seconds from the
    /// start of its request; "wait" waits until the backend is back (a probe
    /// succeeds); 0 fails at once. Default 30.
    #[arg(long, value_name = "SECS|wait", value_parser = parse_outage)]
    pub(crate) outage_timeout_secs: Option<Outage>,

    /// An HTTP proxy for every backend request, range reads included
    /// (`http://127.0.0.1:65001`, Dragonfly's daemon say), but for hosts
    /// NO_PROXY names; a request the proxy takes no connection for goes
    /// directly. Default: the environment's (HTTPS_PROXY for https URLs,
    /// HTTP_PROXY for http ones, redirects included, else ALL_PROXY), with
    /// the same fallback.
    #[arg(long, value_name = "URL")]
    pub(crate) proxy: Option<String>,

    /// Bytes filled per kernel miss: the READ is widened to whole windows of this
    /// size (power of two ≥ 4KiB; suffixes K, M, KiB, MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) fill_window: Option<u64>,
}

/// The config file's schema. Every key is optional; flags win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) cache_dir: Option<PathBuf>,
    /// "20%" (the default), a size ("10GiB", or bytes) or "unlimited".
    pub(crate) cache_limit: Option<NumberOrText>,
    pub(crate) transport: Option<TransportKind>,
    pub(crate) fuse_dir: Option<PathBuf>,
    pub(crate) fuse_threads: Option<usize>,
    pub(crate) fuse_recovery: Option<FuseRecovery>,
    /// The loop transport: loop devices read their FUSE blob files with
    /// direct I/O (default false; see BENCHMARKS.md).
    pub(crate) loop_direct_io: Option<bool>,
    pub(crate) run_dir: Option<PathBuf>,
    /// Path of the fd store socket, or "" for none.
    pub(crate) fd_store: Option<PathBuf>,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    pub(crate) blob_dir: Option<PathBuf>,
    pub(crate) tag: Option<String>,
    pub(crate) device: Option<PathBuf>,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) fill_window: Option<SizeValue>,
    pub(crate) io_size: Option<SizeValue>,
    pub(crate) blob_url: Option<String>,
    pub(crate) work_dir: Option<PathBuf>,
    pub(crate) socket: Option<PathBuf>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) max_merge: Option<SizeValue>,
    pub(crate) unit_cache: Option<SizeValue>,
    /// How far ahead of a sequential reader of a blob its cache (the
    /// kernel's cachefiles object, or the FUSE cache file) is filled, e.g.
    /// "8MiB" (the default); 0 turns read-ahead off.
    pub(crate) readahead: Option<SizeValue>,
    #[serde(default)]
    pub(crate) insecure_registries: Vec<String>,
    #[serde(default)]
    pub(crate) ca_files: Vec<PathBuf>,
    pub(crate) docker_config: Option<PathBuf>,
    /// containerd's certs.d directory ("" for none).
    pub(crate) hosts_dir: Option<PathBuf>,
    pub(crate) request_timeout_secs: Option<u64>,
    /// Fixed part of a Range request's deadline (default 30).
    pub(crate) range_deadline_secs: Option<u64>,
    /// Slowest transfer a Range request may take beyond that, per second
    /// (default "64KiB"): a request of N bytes must be answered whole within
    /// range_deadline_secs + N / min_throughput.
    pub(crate) min_throughput: Option<SizeValue>,
    pub(crate) retries: Option<u32>,
    /// Seconds a read waits for a backend that is down, or "wait" (default
    /// 30; see `--outage-timeout-secs`).
    pub(crate) outage_timeout_secs: Option<NumberOrText>,
    /// An HTTP proxy for backend requests, with direct fallback (see
    /// `--proxy`).
    pub(crate) proxy: Option<String>,
    /// One circuit breaker per backend (default true): false lets every
    /// request go out and retry on its own while a backend is down.
    pub(crate) circuit_breaker: Option<bool>,
    /// Largest meta blob the daemon fetches (a size, e.g. "256MiB").
    pub(crate) max_meta_size: Option<SizeValue>,
}

/// A value given as a number or as text (a cache limit: bytes or "20%"; an outage
/// timeout: seconds or "wait").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum NumberOrText {
    Number(u64),
    Text(String),
}

fn parse_cache_limit(s: &str) -> Result<lazypull_engine::CacheLimit, String> {
    s.parse()
}

/// The default `cache_limit`: a fifth of the cache's file system. kubelet's
/// image garbage collection starts at 85% of the disk by default; a lazy
/// cache bounded well below leaves it room, and lazypull's status, metrics
/// and the snapshotter's Usage show what the cache holds.
pub(crate) const DEFAULT_CACHE_LIMIT: lazypull_engine::CacheLimit =
    lazypull_engine::CacheLimit::Percent(20);

/// A path flag that may be given empty (clap's own path parser refuses ""),
/// where "" means none: `--hosts-dir ""`.
pub(crate) fn path_or_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// A proxy URL: `http://` or `https://`, with a host.
fn check_proxy_url(s: &str) -> anyhow::Result<String> {
    let t = s.trim();
    let (scheme, rest) = t
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("proxy {t:?} is not a URL (want http://HOST:PORT)"))?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.starts_with('/') {
        anyhow::bail!("proxy {t:?}: want http://HOST:PORT or https://HOST:PORT");
    }
    Ok(t.to_string())
}

/// `outage_timeout_secs`: how long a read waits for a backend that is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outage {
    /// Fail with EIO after this many seconds (0: at once).
    Secs(u64),
    /// Wait until the backend is back.
    Wait,
}

impl Outage {
    /// The backend's [`ClientOptions::outage_timeout`](lazypull_backend::ClientOptions::outage_timeout).
    pub(crate) fn timeout(self) -> Option<std::time::Duration> {
        match self {
            Outage::Secs(n) => Some(std::time::Duration::from_secs(n)),
            Outage::Wait => None,
        }
    }
}

/// Parses `--outage-timeout-secs`: a number of seconds or "wait".
pub(crate) fn parse_outage(s: &str) -> Result<Outage, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("wait") {
        return Ok(Outage::Wait);
    }
    t.parse().map(Outage::Secs).map_err(|_| {
        format!("invalid outage timeout {s:?}: expected a number of seconds or \"wait\"")
    })
}

/// A size given as a number of bytes or a string such as "1MiB".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> anyhow::Result<u64> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s).map_err(anyhow::Error::msg),
        }
    }
}

/// Parses "4096", "512K", "512KiB", "1M", "1MiB", "1G".
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K/M/G suffix")
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// The resolved daemon settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DaemonConfig {
    pub(crate) cache_dir: PathBuf,
    pub(crate) cache_limit: lazypull_engine::CacheLimit,
    pub(crate) transport: TransportKind,
    pub(crate) fuse_dir: PathBuf,
    pub(crate) fuse_threads: usize,
    pub(crate) fuse_recovery: FuseRecovery,
    pub(crate) loop_direct_io: bool,
    pub(crate) run_dir: PathBuf,
    pub(crate) fd_store: Option<PathBuf>,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    pub(crate) blob_dir: Option<PathBuf>,
    pub(crate) blob_url: Option<String>,
    pub(crate) work_dir: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) max_connections: usize,
    pub(crate) max_merge: u64,
    pub(crate) unit_cache: usize,
    pub(crate) readahead: u64,
    pub(crate) insecure_registries: Vec<String>,
    pub(crate) ca_files: Vec<PathBuf>,
    pub(crate) docker_config: Option<PathBuf>,
    /// containerd's certs.d directory, None for none.
    pub(crate) hosts_dir: Option<PathBuf>,
    pub(crate) request_timeout_secs: u64,
    pub(crate) range_deadline_secs: u64,
    pub(crate) min_throughput: u64,
    pub(crate) retries: u32,
    /// How long a read waits for a backend that is down.
    pub(crate) outage: Outage,
    pub(crate) circuit_breaker: bool,
    pub(crate) proxy: Option<String>,
    /// Largest meta blob fetched or read (default 1 GiB).
    pub(crate) max_meta_size: u64,
    pub(crate) tag: String,
    pub(crate) device: PathBuf,
    pub(crate) max_in_flight: usize,
    pub(crate) fill_window: u64,
    pub(crate) io_size: usize,
}

impl DaemonArgs {
    /// Merges flags over the config file over defaults and validates the result.
    pub(crate) fn resolve(&self) -> anyhow::Result<DaemonConfig> {
        let file = match &self.config {
            Some(path) => load(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => load(Path::new(DEFAULT_CONFIG))?,
            None => FileConfig::default(),
        };
        let cache_dir = self
            .cache_dir
            .clone()
            .or(file.cache_dir)
            .unwrap_or_else(|| "/var/cache/lazypull".into());
        let fd_store = if self.no_fd_store {
            None
        } else {
            match self.fd_store.clone().or(file.fd_store) {
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) => Some(p),
                None => Some(crate::fdstore::DEFAULT_SOCKET.into()),
            }
        };
        let blob_dir = self.blob_dir.clone().or(file.blob_dir);
        let fetch = lazypull_engine::FetchOptions::default();
        let max_merge = match &file.max_merge {
            Some(v) => v.bytes().context("config key max_merge")?,
            None => fetch.max_merge,
        };
        let unit_cache = match &file.unit_cache {
            Some(v) => v.bytes().context("config key unit_cache")? as usize,
            None => fetch.cache_bytes,
        };
        let readahead = match &file.readahead {
            Some(v) => v.bytes().context("config key readahead")?,
            // On by default: see lazypull_engine::readahead.
            None => lazypull_engine::DEFAULT_READAHEAD,
        };
        let mut insecure_registries = file.insecure_registries;
        insecure_registries.extend(self.insecure_registries.iter().cloned());
        let mut ca_files = file.ca_files;
        ca_files.extend(self.ca_files.iter().cloned());
        let fill_window = match (self.fill_window, &file.fill_window) {
            (Some(n), _) => n,
            (None, Some(v)) => v.bytes().context("config key fill_window")?,
            (None, None) => lazypull_engine::FillPolicy::default().window,
        };
        let io_size = match &file.io_size {
            Some(v) => v.bytes().context("config key io_size")? as usize,
            None => lazypull_engine::FillPolicy::default().io_size,
        };
        let cache_limit = match (self.cache_limit, &file.cache_limit) {
            (Some(l), _) => l,
            (None, Some(NumberOrText::Number(0))) => {
                bail!("config key cache_limit: 0 leaves no room for any read; say \"unlimited\" for no limit")
            }
            (None, Some(NumberOrText::Number(n))) => lazypull_engine::CacheLimit::Bytes(*n),
            (None, Some(NumberOrText::Text(t))) => t
                .parse()
                .map_err(|e: String| anyhow::anyhow!("config key cache_limit: {e}"))?,
            (None, None) => DEFAULT_CACHE_LIMIT,
        };
        let cfg = DaemonConfig {
            cache_dir,
            cache_limit,
            transport: self.transport.or(file.transport).unwrap_or_default(),
            fuse_dir: self
                .fuse_dir
                .clone()
                .or(file.fuse_dir)
                .unwrap_or_else(|| "/run/lazypull/blobs".into()),
            fuse_threads: file
                .fuse_threads
                .unwrap_or_else(lazypull_transport::fuse::default_threads),
            fuse_recovery: self
                .fuse_recovery
                .or(file.fuse_recovery)
                .unwrap_or_default(),
            loop_direct_io: file.loop_direct_io.unwrap_or(false),
            run_dir: self
                .run_dir
                .clone()
                .or(file.run_dir)
                .unwrap_or_else(|| "/run/lazypull".into()),
            fd_store,
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            blob_dir,
            blob_url: self.blob_url.clone().or(file.blob_url),
            work_dir: self
                .work_dir
                .clone()
                .or(file.work_dir)
                .unwrap_or_else(|| "/var/lib/lazypull".into()),
            socket: self
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(|| crate::control::DEFAULT_SOCKET.into()),
            max_connections: self.max_connections.or(file.max_connections).unwrap_or(8),
            max_merge,
            unit_cache,
            readahead,
            insecure_registries,
            ca_files,
            docker_config: self.docker_config.clone().or(file.docker_config),
            hosts_dir: match self.hosts_dir.clone().or(file.hosts_dir) {
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) => Some(p),
                None => Some(DEFAULT_HOSTS_DIR.into()),
            },
            request_timeout_secs: file.request_timeout_secs.unwrap_or(30),
            range_deadline_secs: file.range_deadline_secs.unwrap_or(30),
            min_throughput: match &file.min_throughput {
                Some(v) => v.bytes().context("config key min_throughput")?,
                None => 64 << 10,
            },
            retries: file.retries.unwrap_or(5),
            outage: match (self.outage_timeout_secs, &file.outage_timeout_secs) {
                (Some(o), _) => o,
                (None, Some(NumberOrText::Number(n))) => Outage::Secs(*n),
                (None, Some(NumberOrText::Text(t))) => parse_outage(t)
                    .map_err(anyhow::Error::msg)
                    .context("config key outage_timeout_secs")?,
                (None, None) => Outage::Secs(30),
            },
            circuit_breaker: file.circuit_breaker.unwrap_or(true),
            proxy: match self.proxy.clone().or(file.proxy.clone()) {
                Some(p) if p.trim().is_empty() => None,
                Some(p) => {
                    let url = check_proxy_url(&p).context("config key proxy")?;
                    Some(url)
                }
                None => None,
            },
            max_meta_size: match &file.max_meta_size {
                Some(v) => v.bytes().context("config key max_meta_size")?,
                None => crate::catalog::DEFAULT_MAX_META_SIZE,
            },
            tag: self
                .tag
                .clone()
                .or(file.tag)
                .unwrap_or_else(|| "lazypull".into()),
            device: self
                .device
                .clone()
                .or(file.device)
                .unwrap_or_else(|| "/dev/cachefiles".into()),
            max_in_flight: self.max_in_flight.or(file.max_in_flight).unwrap_or(8),
            fill_window,
            io_size,
        };
        if cfg.max_in_flight == 0 {
            bail!("max_in_flight must be at least 1");
        }
        if cfg.fuse_threads == 0 {
            bail!("fuse_threads must be at least 1");
        }
        if cfg.max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        if cfg.retries == 0 {
            bail!("retries counts attempts and must be at least 1");
        }
        if cfg.min_throughput == 0 {
            bail!("min_throughput must be at least 1 byte per second");
        }
        lazypull_engine::FillPolicy {
            window: cfg.fill_window,
            io_size: cfg.io_size,
        }
        .validate()
        .map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }
}

fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> DaemonArgs {
        DaemonArgs {
            cache_dir: None,
            transport: None,
            fuse_recovery: None,
            cache_limit: None,
            fuse_dir: None,
            run_dir: None,
            fd_store: None,
            no_fd_store: false,
            metrics_addr: None,
            takeover: false,
            blob_dir: None,
            blob_url: None,
            work_dir: None,
            socket: None,
            insecure_registries: vec![],
            ca_files: vec![],
            docker_config: None,
            hosts_dir: None,
            max_connections: None,
            config: None,
            tag: None,
            device: None,
            max_in_flight: None,
            fill_window: None,
            outage_timeout_secs: None,
            proxy: None,
        }
    }

    #[test]
    fn outage_timeout_defaults_to_30_s_takes_wait_and_the_flag_wins() {
        let c = args().resolve().unwrap();
        assert_eq!((c.outage, c.circuit_breaker), (Outage::Secs(30), true));
        assert_eq!(c.outage.timeout(), Some(std::time::Duration::from_secs(30)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let mut a = args();
        a.config = Some(path.clone());
        std::fs::write(
            &path,
            "outage_timeout_secs = \"wait\"\ncircuit_breaker = false\n",
        )
        .unwrap();
        let c = a.resolve().unwrap();
        assert_eq!((c.outage, c.circuit_breaker), (Outage::Wait, false));
        assert_eq!(c.outage.timeout(), None);
        std::fs::write(&path, "outage_timeout_secs = 3\n").unwrap();
        assert_eq!(a.resolve().unwrap().outage, Outage::Secs(3));
        a.outage_timeout_secs = Some(parse_outage("wait").unwrap());
        assert_eq!(a.resolve().unwrap().outage, Outage::Wait);
        a.outage_timeout_secs = None;
        std::fs::write(&path, "outage_timeout_secs = \"soon\"\n").unwrap();
        let err = format!("{:#}", a.resolve().unwrap_err());
        assert!(
            err.contains("outage_timeout_secs") && err.contains("wait"),
            "{err}"
        );
        assert_eq!(parse_outage("0"), Ok(Outage::Secs(0)));
        std::fs::write(&path, "proxy = \"http://127.0.0.1:65001\"\n").unwrap();
        assert_eq!(
            a.resolve().unwrap().proxy.as_deref(),
            Some("http://127.0.0.1:65001")
        );
        std::fs::write(&path, "proxy = \"127.0.0.1:65001\"\n").unwrap();
        let err = format!("{:#}", a.resolve().unwrap_err());
        assert!(err.contains("proxy") && err.contains("http://"), "{err}");
        assert!(parse_outage("-1").is_err());
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let mut a = args();
        a.config = Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../dist/config.toml"
        )));
        let c = a.resolve().unwrap();
        assert_eq!(c.transport, TransportKind::Auto);
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.fill_window, 1 << 20);
        assert_eq!(c.fuse_recovery, FuseRecovery::Auto);
    }

    #[test]
    fn cache_limit_defaults_to_a_fifth_is_read_from_the_file_and_the_flag_wins() {
        use lazypull_engine::CacheLimit;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let mut a = args();
        a.config = Some(path.clone());
        std::fs::write(&path, "").unwrap();
        assert_eq!(a.resolve().unwrap().cache_limit, CacheLimit::Percent(20));
        for (text, want) in [
            ("cache_limit = \"2GiB\"\n", CacheLimit::Bytes(2 << 30)),
            ("cache_limit = 1048576\n", CacheLimit::Bytes(1 << 20)),
            ("cache_limit = \"unlimited\"\n", CacheLimit::Unlimited),
            ("cache_limit = \"35%\"\n", CacheLimit::Percent(35)),
        ] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(a.resolve().unwrap().cache_limit, want, "{text}");
        }
        a.cache_limit = Some(CacheLimit::Bytes(4096));
        assert_eq!(a.resolve().unwrap().cache_limit, CacheLimit::Bytes(4096));
        a.cache_limit = None;
        for bad in [
            "cache_limit = 0\n",
            "cache_limit = \"lots\"\n",
            "cache_limit = \"150%\"\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = format!("{:#}", a.resolve().unwrap_err());
            assert!(e.contains("cache_limit"), "{bad}: {e}");
        }
    }

    #[test]
    fn fuse_recovery_is_read_from_the_file_and_the_flag_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "fuse_recovery = \"journal\"\n").unwrap();
        let mut a = args();
        a.config = Some(path);
        assert_eq!(a.resolve().unwrap().fuse_recovery, FuseRecovery::Journal);
        a.fuse_recovery = Some(FuseRecovery::Auto);
        assert_eq!(a.resolve().unwrap().fuse_recovery, FuseRecovery::Auto);
        std::fs::write(dir.path().join("c.toml"), "fuse_recovery = \"maybe\"\n").unwrap();
        a.fuse_recovery = None;
        assert!(a.resolve().is_err());
    }

    #[test]
    fn range_deadline_keys_have_documented_defaults() {
        let c = args().resolve().unwrap();
        assert_eq!((c.range_deadline_secs, c.min_throughput), (30, 64 << 10));
        let mut a = args();
        a.config = Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../dist/config.toml"
        )));
        let c = a.resolve().unwrap();
        assert_eq!((c.range_deadline_secs, c.min_throughput), (30, 64 << 10));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "range_deadline_secs = 5\nmin_throughput = \"1MiB\"\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        let c = a.resolve().unwrap();
        assert_eq!((c.range_deadline_secs, c.min_throughput), (5, 1 << 20));
        std::fs::write(&path, "min_throughput = 0\n").unwrap();
        let err = a.resolve().unwrap_err().to_string();
        assert!(err.contains("min_throughput"), "{err}");
    }

    #[test]
    fn max_meta_size_defaults_to_1_gib_and_is_read_from_the_file() {
        assert_eq!(args().resolve().unwrap().max_meta_size, 1 << 30);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max_meta_size = \"256MiB\"\n").unwrap();
        let mut a = args();
        a.config = Some(path);
        assert_eq!(a.resolve().unwrap().max_meta_size, 256 << 20);
    }

    #[test]
    fn hosts_dir_defaults_to_containerds_and_the_flag_wins_over_the_file() {
        assert_eq!(
            args().resolve().unwrap().hosts_dir,
            Some(PathBuf::from("/etc/containerd/certs.d"))
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "hosts_dir = \"/srv/certs.d\"\n").unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        assert_eq!(
            a.resolve().unwrap().hosts_dir,
            Some(PathBuf::from("/srv/certs.d"))
        );
        a.hosts_dir = Some(PathBuf::from("/flag/certs.d"));
        assert_eq!(
            a.resolve().unwrap().hosts_dir,
            Some(PathBuf::from("/flag/certs.d"))
        );
        // "" reads none.
        a.hosts_dir = Some(PathBuf::new());
        assert_eq!(a.resolve().unwrap().hosts_dir, None);
    }

    #[test]
    fn an_empty_hosts_dir_flag_is_taken_on_the_command_line() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            daemon: DaemonArgs,
        }
        use clap::Parser;
        let cli = Cli::try_parse_from(["lazypull", "--hosts-dir", ""])
            .unwrap_or_else(|e| panic!("--hosts-dir \"\" refused: {e}"));
        assert_eq!(cli.daemon.hosts_dir, Some(PathBuf::new()));
        assert_eq!(cli.daemon.resolve().unwrap().hosts_dir, None);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("1.5M").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "cache_dir = \"/c\"\nblob_dir = \"/b\"\nmax_in_flight = 3\nfill_window = \"256KiB\"\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        a.blob_dir = Some("/flag-blobs".into());
        let c = a.resolve().unwrap();
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        assert_eq!(c.blob_dir, Some(PathBuf::from("/flag-blobs")));
        assert_eq!(c.max_in_flight, 3);
        assert_eq!(c.fill_window, 256 << 10);
        assert_eq!(c.tag, "lazypull");
    }

    #[test]
    fn missing_and_bad_settings_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.config = Some(dir.path().join("absent.toml"));
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("absent.toml"));
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "cache_dirr = \"/c\"\n").unwrap();
        a.config = Some(path);
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("unknown field"));
        let mut a = args();
        a.config = Some(dir.path().join("none.toml"));
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
        let c = a.resolve().unwrap();
        assert_eq!(c.blob_dir, None, "a blob dir is optional");
        assert_eq!(
            c.cache_dir,
            PathBuf::from("/var/cache/lazypull"),
            "a default cache dir"
        );
        assert_eq!(c.transport, TransportKind::Auto);
        assert_eq!(
            c.fd_store,
            Some(PathBuf::from(crate::fdstore::DEFAULT_SOCKET))
        );
        a.no_fd_store = true;
        assert_eq!(a.resolve().unwrap().fd_store, None);
        a.no_fd_store = false;
        std::fs::write(
            dir.path().join("none.toml"),
            "transport = \"fuse\"\nfd_store = \"\"\n",
        )
        .unwrap();
        let c = a.resolve().unwrap();
        assert_eq!((c.transport, c.fd_store), (TransportKind::Fuse, None));
        std::fs::write(dir.path().join("none.toml"), "transport = \"magic\"\n").unwrap();
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("unknown variant"));
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
        assert_eq!(c.socket, PathBuf::from(crate::control::DEFAULT_SOCKET));
        a.fill_window = Some(3000);
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("power of two"));
    }
}
