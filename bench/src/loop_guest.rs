//! `lazypull-bench loop-guest`: in the Linux 6.1 guest, lazypull's loop
//! transport (the default `auto` picks it there) against the same plain
//! image attached to loop devices with no daemon, cold and warm, in the same
//! boot (`bench/guest-loop.sh`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazypull_guest::{Disk, GuestConfig, KernelSeries};

use crate::{fmt_us, median, reference_images, sibling, walk_count};

pub(crate) fn run(rounds: u32, work: &Path) -> Result<()> {
    lazypull_guest::require_root()?;
    let daemon = sibling("lazypull")?;
    let kernel = lazypull_guest::kernel_of(KernelSeries::V6_1)?;
    let (tree, blobs, info, _) = reference_images(work, &daemon)?;
    let files = walk_count(&tree)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-loop.sh");
    let cfg = GuestConfig::new(&kernel)
        .name("bench-loop-6-1")
        .timeout(Duration::from_secs(3 * 3600))
        .disk(Disk::Ext4From {
            dir: blobs.clone(),
            extra_mib: 64,
        })
        .disk(Disk::EmptyExt4 { size_mib: 2048 })
        .env("LP_BIN", daemon.to_str().unwrap())
        .env("LP_BENCH", fs::canonicalize(&info)?.to_str().unwrap())
        .env("ROUNDS", rounds.to_string());
    let run = lazypull_guest::run(&script, &cfg)?;
    if run.status != 0 {
        bail!("bench scenario failed:\n{}", run.log);
    }
    let kernel = run.read_out("kernel")?;
    print!(
        "{}",
        report(&run.read_out("results")?, rounds, files, kernel.trim())?
    );
    Ok(())
}

/// The markdown table of a run's `results` lines.
fn report(results: &str, rounds: u32, files: usize, kernel: &str) -> Result<String> {
    // (kind, what, pass) -> round -> µs
    let mut us: BTreeMap<(String, String, String), BTreeMap<u32, f64>> = BTreeMap::new();
    let mut rss: BTreeMap<String, f64> = BTreeMap::new();
    for line in results.lines().filter(|l| !l.trim().is_empty()) {
        let kv: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let get = |k: &str| {
            kv.get(k)
                .copied()
                .with_context(|| format!("{k} missing in {line:?}"))
        };
        let round: u32 = get("round")?.parse()?;
        let value: f64 = get("us")?.parse()?;
        let (kind, what) = (get("kind")?.to_owned(), get("what")?);
        if what.starts_with("rss_") {
            let e = rss.entry(kind).or_default();
            *e = e.max(value);
            continue;
        }
        us.entry((kind, what.to_owned(), get("pass")?.to_owned()))
            .or_default()
            .insert(round, value);
    }
    let mut out = format!(
        "## Loop transport on Linux {kernel} (qemu TCG, 2 vCPU)\n\n{rounds} rounds, tree of {files} files \
         (python3.11 + perl libraries + one 256 MiB file), every read after drop_caches. Each cell: median over \
         rounds of (arm's time / the limit's cold time in the same round), then the arm's median time. \
         Limit: the plain meta and data blobs on read-only loop devices (losetup), mounted with device=, no daemon. \
         Warm: the same mount read again (lazypull's cache file holds the bytes).\n\n\
         | read | limit (median) | lazypull loop, plain, cold | lazypull loop, plain, warm | lazypull loop, zstd, cold | lazypull loop, zstd, warm |\n\
         |---|---|---|---|---|---|\n"
    );
    for (what, label) in [("small", "every small file"), ("big", "256 MiB file")] {
        let limit = us
            .get(&("limit".into(), what.into(), "cold".into()))
            .context("no limit results")?;
        let mut l: Vec<f64> = limit.values().copied().collect();
        out.push_str(&format!("| {label} | {} |", fmt_us(median(&mut l))));
        for kind in ["lp-plain", "lp-zstd"] {
            for pass in ["cold", "warm"] {
                let Some(arm) = us.get(&(kind.into(), what.into(), pass.into())) else {
                    out.push_str(" – |");
                    continue;
                };
                let mut ratios: Vec<f64> = arm
                    .iter()
                    .filter_map(|(r, v)| limit.get(r).map(|l| v / l))
                    .collect();
                let mut v: Vec<f64> = arm.values().copied().collect();
                out.push_str(&format!(
                    " **{:.2}×** ({}) |",
                    median(&mut ratios),
                    fmt_us(median(&mut v))
                ));
            }
        }
        out.push('\n');
    }
    let mut warm_limit = String::new();
    for what in ["small", "big"] {
        if let (Some(w), Some(c)) = (
            us.get(&("limit".into(), what.into(), "warm".into())),
            us.get(&("limit".into(), what.into(), "cold".into())),
        ) {
            let mut r: Vec<f64> = w
                .iter()
                .filter_map(|(k, v)| c.get(k).map(|c| v / c))
                .collect();
            warm_limit.push_str(&format!(" {what} {:.2}×;", median(&mut r)));
        }
    }
    out.push_str(&format!(
        "\nThe limit read twice (second / first, a check on the noise):{warm_limit} daemon peak RSS (VmHWM, max): {}\n",
        rss.iter()
            .map(|(k, v)| format!("{k} {:.1} MB", v / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_takes_ratios_per_round_against_the_limits_cold_read() {
        let results = "\
round=1 kind=limit what=small pass=cold us=1000
round=1 kind=limit what=small pass=warm us=1100
round=1 kind=lp-zstd what=small pass=cold us=2000
round=1 kind=lp-zstd what=small pass=warm us=1500
round=1 kind=lp-zstd what=rss_small us=20480
round=1 kind=limit what=big pass=cold us=4000
round=1 kind=limit what=big pass=warm us=4000
round=1 kind=lp-zstd what=big pass=cold us=6000
round=1 kind=lp-zstd what=big pass=warm us=5000
";
        let r = report(results, 1, 10, "6.1.192").unwrap();
        assert!(r.contains("Linux 6.1.192"), "{r}");
        assert!(
            r.contains(
                "| every small file | 1.0 ms | – | – | **2.00×** (2.0 ms) | **1.50×** (1.5 ms) |"
            ),
            "{r}"
        );
        assert!(r.contains("**1.25×** (5.0 ms)"), "{r}");
        assert!(r.contains("small 1.10×"), "{r}");
        assert!(r.contains("lp-zstd 20.0 MB"), "{r}");
        assert!(report("round=1 kind=lp-zstd what=big pass=cold", 1, 1, "x").is_err());
    }
}
