//! An emulated network for benchmarks and tests: a network namespace
//! reached from the host over a veth pair, the pair's two ends the only
//! addresses (a /30 of 10.x.y.z), bandwidth shaped with `tc ... tbf` on the
//! egress of both ends. Everything is removed when the [`Netns`] is dropped,
//! also after an error half-way through [`Netns::create`].
//!
//! This host's kernel has no `netem` (and no modules), so there is no
//! delay here: put [`crate::proxy::Proxy`] with
//! [`set_latency`](crate::proxy::Proxy::set_latency) in front of the
//! server as the delaying hop.
//!
//! Needs root and `ip`/`tc` (Debian's `iproute2`); a missing tool is an
//! error naming the package.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::containerd::find;

/// A network namespace with a veth pair to the host, removed when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
    ip: PathBuf,
    tc: PathBuf,
    /// What has been created, for `Drop`.
    created_ns: bool,
    created_link: bool,
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

impl Netns {
    /// Creates namespace `lpb<pid>n<k>` and veth pair `lpb<pid>h<k>` (host)
    /// / `lpb<pid>p<k>` (namespace), both ends up with the two addresses of
    /// a /30 (10.<a>.<b>.<c>, from the process id and a counter), and the
    /// namespace's loopback up.
    pub fn create() -> io::Result<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if !rustix::process::geteuid().is_root() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "network namespaces need root",
            ));
        }
        let ip = find("ip", "iproute2")?;
        let tc = find("tc", "iproute2")?;
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names hold at most 15 bytes: "lpb" + up to 7 digits +
        // 1 + the counter.
        let tag = format!("{}{}", pid % 10_000_000, k % 100);
        // A /30 per (pid, k): 10.(200 + pid/.. % 50).(..).(4 * (k % 64)).
        let block = (pid % (50 * 256)) as u16;
        let base = Ipv4Addr::new(
            10,
            200 + (block / 256) as u8,
            (block % 256) as u8,
            (4 * (k % 64)) as u8,
        );
        let base = u32::from(base);
        let mut ns = Netns {
            name: format!("lpb{tag}"),
            host_if: format!("lpb{}h{}", pid % 10_000_000, k % 100),
            ns_if: format!("lpb{}p{}", pid % 10_000_000, k % 100),
            host_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
            ip,
            tc,
            created_ns: false,
            created_link: false,
        };
        run(Command::new(&ns.ip).args(["netns", "add", &ns.name]))?;
        ns.created_ns = true;
        run(Command::new(&ns.ip).args([
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ]))?;
        ns.created_link = true;
        run(Command::new(&ns.ip).args(["link", "set", &ns.ns_if, "netns", &ns.name]))?;
        run(Command::new(&ns.ip).args([
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.host_if,
        ]))?;
        run(Command::new(&ns.ip).args(["link", "set", &ns.host_if, "up"]))?;
        let in_ns = |args: &[&str]| {
            let mut c = Command::new(&ns.ip);
            c.args(["-n", &ns.name]).args(args);
            run(&mut c)
        };
        in_ns(&[
            "addr",
            "add",
            &format!("{}/30", ns.ns_addr),
            "dev",
            &ns.ns_if,
        ])?;
        in_ns(&["link", "set", &ns.ns_if, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (`ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end's address.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The namespace end's address.
    pub fn ns_addr(&self) -> Ipv4Addr {
        self.ns_addr
    }

    /// `ip netns exec NAME program`: a command run inside the namespace
    /// (`ip` enters it and execs the program: the child's pid is the
    /// program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Shapes both directions to `bits_per_sec` with a token bucket
    /// (`tc qdisc replace ... root tbf`) on the egress of each end.
    ///
    /// The bucket holds 10 ms of traffic (at least 64 KiB): veth hands tbf
    /// GSO packets of up to 64 KiB, and a bucket smaller than the timer
    /// tick's worth of bytes could not reach the rate. The queue holds 50 ms
    /// (`latency`), beyond which packets are dropped as at a real bottleneck.
    pub fn shape(&self, bits_per_sec: u64) -> io::Result<()> {
        let burst = (bits_per_sec / 8 / 100).max(64 * 1024);
        let rate = format!("{bits_per_sec}bit");
        let burst = burst.to_string();
        let args = |dev: &str| -> Vec<String> {
            [
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "50ms",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        run(Command::new(&self.tc).args(args(&self.host_if)))?;
        run(Command::new(&self.tc)
            .args(["-n", &self.name])
            .args(args(&self.ns_if)))
    }

    /// Removes the shaping of both ends (back to the default qdisc).
    pub fn unshape(&self) -> io::Result<()> {
        for (ns, dev) in [(None, &self.host_if), (Some(&self.name), &self.ns_if)] {
            let mut c = Command::new(&self.tc);
            if let Some(ns) = ns {
                c.args(["-n", ns]);
            }
            c.args(["qdisc", "del", "dev", dev, "root"]);
            // "No such file or directory" when nothing was shaped: fine.
            let _ = c.stdin(Stdio::null()).output()?;
        }
        Ok(())
    }

    /// `tc -s qdisc show` of the host end: bytes sent, drops, overlimits.
    pub fn qdisc_stats(&self) -> io::Result<String> {
        let out = Command::new(&self.tc)
            .args(["-s", "qdisc", "show", "dev", &self.host_if])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the
        // peer; deleting the host end as well covers a pair whose other end
        // never moved into the namespace.
        if self.created_link {
            let _ = Command::new(&self.ip)
                .args(["link", "del", &self.host_if])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if self.created_ns {
            let _ = Command::new(&self.ip)
                .args(["netns", "del", &self.name])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    /// A namespace is reachable over its pair, shaped, and removed on drop.
    /// Needs root (as the benchmarks using it do): fails loudly otherwise.
    #[test]
    fn namespace_reachable_over_its_pair_and_gone_after_drop() {
        let ns = Netns::create().expect("creating a network namespace (run as root)");
        let name = ns.name().to_owned();
        // Nothing listens in the namespace: a connect over the pair is
        // refused (an RST from the namespace's stack), not timed out.
        let addr = SocketAddr::from((ns.ns_addr(), 18080));
        let e = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        ns.shape(100_000_000).unwrap();
        assert!(ns.qdisc_stats().unwrap().contains("tbf"));
        ns.unshape().unwrap();
        drop(ns);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&list.stdout)
                .split_whitespace()
                .any(|w| w == name),
            "{name} left behind"
        );
    }
}
