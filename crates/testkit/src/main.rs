//! `lazypull-testkit`: manifest, compare, make-tree and proxy on the
//! command line.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use lazypull_testkit::proxy::{self, FaultSource, Proxy};
use lazypull_testkit::{compare, maketree, manifest};

const USAGE: &str = "usage:
  lazypull-testkit manifest [--no-hash] DIR
      print one canonical line per entry, sorted by path
  lazypull-testkit compare [--no-hash] DIR_A DIR_B
      print the first 50 differences; exit 1 if any, 0 if identical
  lazypull-testkit make-tree DIR [--seed N] [--with-huge]
      create the deterministic test tree (needs root)
  lazypull-testkit proxy --listen ADDR --upstream ADDR --log FILE
                   [--port-file FILE] [--faults SPEC | --faults-file FILE]
      fault-injecting HTTP/1.1 reverse proxy appending one JSON line per
      request to FILE; runs until killed. SPEC example:
      5xx:3,reset:5,truncate:7,slow:4,corrupt:6,slow_ms:3000,only:/blobs/
      or, scripted per byte range: first_range:corrupt,ranges:5xx+reset/slow
      (--faults-file is re-read before every request)";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("lazypull-testkit: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if cmd == "proxy" {
        return run_proxy(&args[1..]);
    }
    let mut opts = manifest::ScanOptions::default();
    let mut seed = 0u64;
    let mut with_huge = false;
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-hash" => opts.hash = false,
            "--with-huge" => with_huge = true,
            "--seed" => match it.next().map(|s| s.parse::<u64>()) {
                Some(Ok(n)) => seed = n,
                _ => return fail("--seed needs a number"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s if s.starts_with("--") => return fail(format!("unknown option {s}\n{USAGE}")),
            s => paths.push(PathBuf::from(s)),
        }
    }
    match (cmd.as_str(), paths.as_slice()) {
        ("manifest", [dir]) => match manifest::scan_with(dir, &opts) {
            Ok(entries) => {
                let out = std::io::stdout();
                let mut out = out.lock();
                for e in &entries {
                    if writeln!(out, "{}", manifest::render_line(e)).is_err() {
                        return ExitCode::from(2);
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        ("compare", [a, b]) => match compare::compare_dirs_with(a, b, &opts) {
            Ok(diffs) if diffs.is_empty() => ExitCode::SUCCESS,
            Ok(diffs) => {
                print!("{}", compare::format_differences(&diffs, 50));
                ExitCode::from(1)
            }
            Err(e) => fail(e),
        },
        ("make-tree", [dir]) => {
            match maketree::make_tree(dir, &maketree::TreeOptions { seed, with_huge }) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        _ => fail(format!("bad arguments\n{USAGE}")),
    }
}

fn resolve(what: &str, addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{what} {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what} {addr}: no address"))
}

fn run_proxy(args: &[String]) -> ExitCode {
    let mut listen = None;
    let mut upstream = None;
    let mut log = None;
    let mut port_file = None;
    let mut faults = None;
    let mut faults_file = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--listen" => &mut listen,
            "--upstream" => &mut upstream,
            "--log" => &mut log,
            "--port-file" => &mut port_file,
            "--faults" => &mut faults,
            "--faults-file" => &mut faults_file,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s => return fail(format!("proxy: unexpected argument {s}\n{USAGE}")),
        };
        match it.next() {
            Some(v) => *slot = Some(v.clone()),
            None => return fail(format!("proxy: {a} needs a value")),
        }
    }
    let (Some(listen), Some(upstream), Some(log)) = (listen, upstream, log) else {
        return fail(format!(
            "proxy: --listen, --upstream and --log are required\n{USAGE}"
        ));
    };
    let source = match (faults, faults_file) {
        (Some(_), Some(_)) => return fail("proxy: give --faults or --faults-file, not both"),
        (Some(spec), None) => FaultSource::Fixed(spec),
        (None, Some(file)) => FaultSource::File(PathBuf::from(file)),
        (None, None) => FaultSource::Fixed(String::new()),
    };
    let (listen, upstream) = match (
        resolve("--listen", &listen),
        resolve("--upstream", &upstream),
    ) {
        (Ok(l), Ok(u)) => (l, u),
        (Err(e), _) | (_, Err(e)) => return fail(format!("proxy: {e}")),
    };
    let proxy = match Proxy::start_on(listen, upstream, PathBuf::from(log), source) {
        Ok(p) => p,
        Err(e) => return fail(format!("proxy: {e}")),
    };
    if let Some(port_file) = port_file {
        let port = format!("{}\n", proxy.addr().port());
        if let Err(e) = proxy::write_atomically(port_file.as_ref(), port.as_bytes()) {
            return fail(format!("proxy: writing {port_file}: {e}"));
        }
    }
    eprintln!(
        "lazypull-testkit proxy: listening on {}, upstream {upstream}",
        proxy.addr()
    );
    loop {
        std::thread::park();
    }
}
