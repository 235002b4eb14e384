//! `lazypull status`, `shutdown` and `handover`: asking the running daemon
//! how it is doing, or to stop (for good, or leaving its mounts to the next
//! daemon), over its control socket. A client only: what the daemon does
//! on such a request is `daemon::control_server`'s. `lazypull status` also
//! shows the snapshotter's lazy images and their containers
//! (`super::lazy_status`).

use std::path::PathBuf;
use std::time::Duration;

use crate::control::{self, Request};
use crate::fdstore;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    /// The snapshotter's socket: its lazy images and the containers on them
    /// are shown too when it answers.
    #[arg(long, value_name = "PATH", default_value = lazypull_snapshotter::DEFAULT_ADDRESS)]
    pub(crate) snapshotter_socket: PathBuf,
    /// Print the raw status as JSON (the snapshotter's part under
    /// `snapshotter`).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShutdownArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    /// The fd store to release when no daemon answers (after a crash).
    #[arg(long, value_name = "PATH", default_value = fdstore::DEFAULT_SOCKET)]
    pub(crate) fd_store: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct HandoverArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
}

/// `lazypull handover`: asks the daemon to stop serving and park its mounts
/// for the next daemon; returns once it has exited.
pub fn handover(args: HandoverArgs) -> anyhow::Result<()> {
    let status = control::call(&args.socket, &Request::Status, Duration::from_secs(10))?;
    let pid = status["pid"].as_u64().unwrap_or(0);
    control::call(&args.socket, &Request::Handover, Duration::from_secs(120))?;
    control::wait_for_exit(pid, Duration::from_secs(60))?;
    println!(
        "lazypull daemon (pid {pid}) handed over; the next `lazypull daemon` takes the mounts"
    );
    Ok(())
}

/// `lazypull shutdown`: asks the daemon to stop for good; with no daemon
/// running, releases what the fd store still holds.
pub fn shutdown(args: ShutdownArgs) -> anyhow::Result<()> {
    match control::call(&args.socket, &Request::Shutdown, Duration::from_secs(30)) {
        Ok(v) => {
            println!("lazypull daemon (pid {}) is shutting down", v["pid"]);
            Ok(())
        }
        Err(daemon_err) => match fdstore::Client::connect(&args.fd_store) {
            Ok(store) => {
                store.exit()?;
                println!(
                    "no daemon answered; released the kernel connections the fd store at {} held",
                    args.fd_store.display()
                );
                Ok(())
            }
            Err(_) => Err(daemon_err.context("no daemon and no fd store to stop")),
        },
    }
}

/// `lazypull status`: the daemon's status, then the snapshotter's lazy
/// images and their containers (a snapshotter not running is said, not an
/// error). A daemon that does not answer fails the command after the
/// snapshotter's part is shown.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let daemon = control::call(&args.socket, &Request::Status, Duration::from_secs(10));
    let snap = super::lazy_status::status(&args.snapshotter_socket, daemon.as_ref().ok());
    if args.json {
        let mut s = match &daemon {
            Ok(s) => s.clone(),
            Err(_) => serde_json::json!({}),
        };
        s["snapshotter"] = serde_json::to_value(&snap)?;
        println!("{}", serde_json::to_string_pretty(&s)?);
        return daemon.map(|_| ());
    }
    let s = match daemon {
        Ok(s) => s,
        Err(e) => {
            for line in super::lazy_status::render(&snap) {
                println!("{line}");
            }
            return Err(e);
        }
    };
    daemon_lines(&s);
    for line in super::lazy_status::render(&snap) {
        println!("{line}");
    }
    Ok(())
}

fn daemon_lines(s: &serde_json::Value) {
    let bytes = |v: &serde_json::Value| indicatif::HumanBytes(v.as_u64().unwrap_or(0));
    let t = &s["transport"];
    let c = &t["counters"];
    let f = &s["fetch"];
    let h = &s["backend_http"];
    println!(
        "lazypull daemon {} pid {} up {}s",
        s["version"].as_str().unwrap_or("?"),
        s["pid"],
        s["uptime_secs"]
    );
    println!(
        "  transport: {} ({})",
        t["kind"].as_str().unwrap_or("?"),
        t["reason"].as_str().unwrap_or("")
    );
    println!(
        "  kernel: {} reads ({} failed), {} written into the cache, {} prefetched",
        c["reads"],
        c["read_failures"],
        bytes(&c["bytes_written"]),
        bytes(&c["prefetched_bytes"])
    );
    println!(
        "  fetch: {} range requests, {} fetched, {} units ({} shared in flight, {} cached), {} verify failures",
        f["range_requests"],
        bytes(&f["stored_bytes"]),
        f["units_fetched"],
        f["dedup_waits"],
        f["cache_hits"],
        f["verify_failures"]
    );
    println!(
        "  time: {} ms in backend reads, {} ms decompressing and verifying (summed over threads)",
        f["fetch_micros"].as_u64().unwrap_or(0) / 1000,
        f["decode_micros"].as_u64().unwrap_or(0) / 1000
    );
    println!(
        "  backend: {} HTTP requests ({} ranges, {} retries, {} failed, {} mirror fallbacks, {} proxy fallbacks), {} received",
        h["requests"],
        h["range_requests"],
        h["retries"],
        h["failures"],
        h["mirror_fallbacks"],
        h["proxy_fallbacks"],
        bytes(&h["bytes_received"])
    );
    let cache = &s["cache"];
    if cache.is_object() {
        println!(
            "  cache: {} of {} limit held, {} evicted ({} windows), {} unused blobs removed, {} fills without room",
            bytes(&cache["used_bytes"]),
            bytes(&cache["limit_bytes"]),
            bytes(&cache["evicted_bytes"]),
            cache["evicted_windows"],
            cache["removed_blobs"],
            cache["no_room"]
        );
    }
    for b in s["backends"].as_array().into_iter().flatten() {
        println!("  {}", backend_line(b));
    }
    let short = |v: &serde_json::Value| short_name(v.as_str().unwrap_or("?"));
    for i in s["images"].as_array().into_iter().flatten() {
        println!(
            "  image {} fsid {} mounted at {}",
            i["reference"].as_str().unwrap_or("?"),
            short(&i["fsid"]),
            i["mountpoints"]
        );
    }
    for i in s["restoring"].as_array().into_iter().flatten() {
        println!(
            "  image {} NOT SERVED ({}{}), mounted at {}",
            i["reference"].as_str().unwrap_or("?"),
            i["state"].as_str().unwrap_or("?"),
            i["error"]
                .as_str()
                .map(|e| format!(": {e}; retrying"))
                .unwrap_or_default(),
            i["mountpoints"]
        );
    }
    if let Some(k) = s["kubelet_credentials"]
        .as_array()
        .filter(|k| !k.is_empty())
    {
        let names: Vec<&str> = k.iter().filter_map(|v| v.as_str()).collect();
        println!(
            "  kubelet credentials (in memory) for: {}",
            names.join(", ")
        );
    }
    for f in s["prefetching"].as_array().into_iter().flatten() {
        println!("  prefetching image {}", short(f));
    }
    for b in s["blobs"].as_array().into_iter().flatten() {
        println!(
            "  blob {}: {} of {} cached, {} fetched in {} requests, {} errors, {} in flight",
            short(&b["blob"]),
            bytes(&b["cached_bytes"]),
            bytes(&b["size"]),
            bytes(&b["source"]["bytes"]),
            b["source"]["requests"],
            b["source"]["errors"],
            bytes(&b["source"]["in_flight_bytes"])
        );
    }
}

/// One backend's circuit breaker, for `lazypull status`.
fn backend_line(b: &serde_json::Value) -> String {
    let name = b["backend"].as_str().unwrap_or("?");
    let counts = format!(
        "{} opens, {} probes, {} fast failures",
        b["opens"], b["probes"], b["fast_failures"]
    );
    let cause = b["last_cause"].as_str().unwrap_or("?");
    match b["state"].as_str().unwrap_or("?") {
        "closed" => format!("backend {name}: up (circuit closed; {counts})"),
        state => {
            let since = b["down_since_unix"]
                .as_u64()
                .map(|t| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(t),
                    )
                    .to_string()
                })
                .unwrap_or_else(|| "?".into());
            format!(
                "backend {name}: DOWN (circuit {state} since {since}, {} s ago; last error: {cause}; {counts})",
                b["down_secs"]
            )
        }
    }
}

/// The first 12 characters of a name (a digest, an fsid: registered names
/// may hold any UTF-8).
fn short_name(s: &str) -> String {
    s.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::{backend_line, short_name};

    #[test]
    fn backend_lines_say_up_or_down_since_when_and_why() {
        let up = serde_json::json!({"backend": "http://h:80", "state": "closed",
            "opens": 1, "probes": 2, "fast_failures": 3, "last_cause": "old"});
        assert_eq!(
            backend_line(&up),
            "backend http://h:80: up (circuit closed; 1 opens, 2 probes, 3 fast failures)"
        );
        let down = serde_json::json!({"backend": "http://h:80", "state": "open",
            "down_since_unix": 86_400 + 3661, "down_secs": 4.5,
            "opens": 1, "probes": 0, "fast_failures": 0, "last_cause": "connection refused"});
        assert_eq!(
            backend_line(&down),
            "backend http://h:80: DOWN (circuit open since 1970-01-02T01:01:01Z, 4.5 s ago; \
             last error: connection refused; 1 opens, 0 probes, 0 fast failures)"
        );
    }

    #[test]
    fn short_names_are_cut_by_character_not_byte() {
        assert_eq!(short_name("sha256:0123456789abcdef"), "sha256:01234");
        assert_eq!(short_name("abc"), "abc");
        // 'é' is two bytes: the 12th character ends at byte 13, and byte 12
        // is inside the 'é'.
        assert_eq!(short_name("abcdefghijkéxyz"), "abcdefghijké");
        assert_eq!(short_name("ééééééééééééé"), "éééééééééééé");
    }
}
