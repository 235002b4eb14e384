//! A registry behind an emulated network, shared by `startup` and
//! `mirror`: Debian's `docker-registry` in a network namespace of its own
//! (testkit's `netns`), reached over a veth pair shaped with `tbf` on both
//! ends, and in front of it, on the host end's address, testkit's proxy
//! adding the round-trip time (this kernel has no netem) and logging every
//! response (its body bytes: the bytes moved, and the requests).
//!
//! The registry is plain HTTP on a non-loopback address: clients name it
//! by the proxy's `host:port` ([`Net::host`]) and need their insecure
//! switches (`--insecure-registry`, `--insecure`, `--plain-http`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazypull_testkit::netns::Netns;
use lazypull_testkit::oci_image::Image;
use lazypull_testkit::proxy::{read_log, FaultSource, LogEntry, Proxy};
use lazypull_testkit::registry::RegistryServer;
use serde_json::Value;

use crate::containers::image_bytes;

/// The port the registry listens on in its namespace.
const REGISTRY_PORT: u16 = 5000;

/// One network shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) name: &'static str,
    pub(crate) bits_per_sec: u64,
    pub(crate) rtt: Duration,
}

pub(crate) const SHAPES: [Shape; 2] = [
    Shape {
        name: "1g",
        bits_per_sec: 1_000_000_000,
        rtt: Duration::from_micros(500),
    },
    Shape {
        name: "100m",
        bits_per_sec: 100_000_000,
        rtt: Duration::from_millis(20),
    },
];

/// The shape called `name` (`1g`, `100m`).
pub(crate) fn shape(name: &str) -> Result<Shape> {
    SHAPES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .with_context(|| format!("unknown network {name:?}: 1g or 100m"))
}

/// The registry side: namespace, registry, proxy.
pub(crate) struct Net {
    pub(crate) ns: Netns,
    pub(crate) registry: RegistryServer,
    pub(crate) proxy: Proxy,
    /// The proxy's access log.
    pub(crate) log: PathBuf,
}

impl Net {
    /// The namespace, the registry in it (storage under `work/registry`),
    /// the proxy (its log `work/proxy.log`); unshaped.
    pub(crate) fn start(work: &Path) -> Result<Net> {
        let ns = Netns::create().context("creating the network namespace")?;
        let registry = RegistryServer::start_in(&work.join("registry"), &ns, REGISTRY_PORT)
            .context("starting the registry in its namespace")?;
        let log = work.join("proxy.log");
        let proxy = Proxy::start_on(
            SocketAddr::from((ns.host_addr(), 0)),
            registry.addr(),
            log.clone(),
            FaultSource::Fixed(String::new()),
        )?;
        Ok(Net {
            ns,
            registry,
            proxy,
            log,
        })
    }

    /// `host:port` of the proxy: the registry as clients name it.
    pub(crate) fn host(&self) -> String {
        self.proxy.addr().to_string()
    }

    /// Entries in the proxy's log once it is idle (at most 5 s of waiting).
    pub(crate) fn log_len(&self) -> Result<usize> {
        self.proxy.wait_idle(Duration::from_secs(5));
        Ok(read_log(&self.log)?.len())
    }

    /// (requests, body bytes) answered after entry `from`.
    pub(crate) fn sent_since(&self, from: usize) -> Result<(u64, u64)> {
        let log = read_log(&self.log)?;
        let tail = &log[from.min(log.len())..];
        Ok((tail.len() as u64, tail.iter().map(|e| e.bytes).sum()))
    }

    /// (requests, bytes) after waiting for the proxy to be idle.
    pub(crate) fn settled_since(&self, from: usize) -> Result<(u64, u64)> {
        self.proxy.wait_idle(Duration::from_secs(10));
        self.sent_since(from)
    }

    pub(crate) fn set_shape(&self, shape: Option<Shape>) -> Result<()> {
        match shape {
            Some(s) => {
                self.ns.shape(s.bits_per_sec)?;
                self.proxy.set_latency(s.rtt);
            }
            None => {
                self.ns.unshape()?;
                self.proxy.set_latency(Duration::ZERO);
            }
        }
        Ok(())
    }
}

/// Waits until `proxy` has had no request in flight and its log (`log`)
/// has not grown for `quiet`, at most `limit`; returns the log's entries
/// then. For traffic a client does not wait for (a pull-through cache
/// filling itself in the background after its client went away).
pub(crate) fn settle(
    proxy: &Proxy,
    log: &Path,
    quiet: Duration,
    limit: Duration,
) -> Result<Vec<LogEntry>> {
    let start = Instant::now();
    let mut last = read_log(log)?.len();
    let mut since = Instant::now();
    loop {
        let idle = proxy.wait_idle(Duration::from_millis(200));
        let now = read_log(log)?.len();
        if !idle || now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(read_log(log)?);
        }
        if start.elapsed() > limit {
            bail!(
                "{} still busy after {limit:?} ({last} requests logged)",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An image pushed ordinary and converted to the lazy format in the same
/// registry.
pub(crate) struct Converted {
    /// `HOST/REPO:v1` of the ordinary image (HOST: [`Net::host`]).
    pub(crate) ordinary: String,
    /// `HOST/REPO-lazy:v1`.
    pub(crate) lazy: String,
    /// Bytes the registry stores of each (layers and config).
    pub(crate) ordinary_bytes: u64,
    pub(crate) lazy_bytes: u64,
}

/// Pushes `image` to `net`'s registry as `bench/NAME:v1` and converts it
/// with `lazypull convert` to `bench/NAME-lazy:v1`, both through the proxy
/// (shape the network first as wanted: unshaped is quickest).
pub(crate) fn push_and_convert(
    net: &Net,
    lazypull: &Path,
    image: &Image,
    name: &str,
) -> Result<Converted> {
    let host = net.host();
    let repo = format!("bench/{name}");
    image
        .push(net.registry.addr(), &repo, "v1")
        .with_context(|| format!("pushing {repo}:v1"))?;
    let ordinary = format!("{host}/{repo}:v1");
    let lazy = format!("{host}/{repo}-lazy:v1");
    eprintln!("[{name}] lazypull convert {ordinary} {lazy}");
    let out = Command::new(lazypull)
        .args(["convert", &ordinary, &lazy, "--json", "--insecure"])
        .output()
        .with_context(|| format!("running {}", lazypull.display()))?;
    if !out.status.success() {
        bail!(
            "lazypull convert {ordinary}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let converted: Value =
        serde_json::from_slice(&out.stdout).context("lazypull convert --json's output")?;
    let lazy_digest = converted["manifest_digest"]
        .as_str()
        .context("lazypull convert --json: manifest_digest")?;
    let (ordinary_bytes, _) = image_bytes(&net.registry, &image.manifest_digest())?;
    let (lazy_bytes, _) = image_bytes(&net.registry, lazy_digest)?;
    eprintln!("[{name}] ordinary {ordinary_bytes} bytes, lazy {lazy_bytes} bytes");
    Ok(Converted {
        ordinary,
        lazy,
        ordinary_bytes,
        lazy_bytes,
    })
}
