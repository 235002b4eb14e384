//! `lazypull-testkit`: manifest, compare and make-tree on the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use lazypull_testkit::{compare, maketree, manifest};

const USAGE: &str = "usage:
  lazypull-testkit manifest [--no-hash] DIR
      print one canonical line per entry, sorted by path
  lazypull-testkit compare [--no-hash] DIR_A DIR_B
      print the first 50 differences; exit 1 if any, 0 if identical
  lazypull-testkit make-tree DIR [--seed N] [--with-huge]
      create the deterministic test tree (needs root)";

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
                Ok(report) => {
                    for s in &report.skipped {
                        eprintln!("lazypull-testkit: skipped: {s}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        _ => fail(format!("bad arguments\n{USAGE}")),
    }
}
