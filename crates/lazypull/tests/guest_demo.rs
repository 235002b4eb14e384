//! `lazypull demo` through the cachefiles transport, in the Linux 6.12 guest
//! (the host tests run it through FUSE): the same command, the other kernel path;
//! and through loop devices in the Linux 6.1 guest, where `auto` must pick them.
//!
//! Needs root, qemu and the guest kernels; fails (never skips) without them.

use std::path::Path;
use std::time::Duration;

use lazypull_guest::{Disk, GuestConfig, KernelSeries};

#[test]
fn the_demo_runs_green_through_cachefiles() {
    let v = demo_in(KernelSeries::V6_12, "demo");
    assert_eq!(
        v["transport"], "cachefiles",
        "auto picks cachefiles on this kernel"
    );
    let reads = v["daemon_status"]["transport"]["counters"]["reads"]
        .as_u64()
        .unwrap();
    assert!(reads > 0, "cachefiles READs were served: {reads}");
}

#[test]
fn the_demo_runs_green_on_linux_6_1_through_loop_devices() {
    let v = demo_in(KernelSeries::V6_1, "demo-6-1");
    assert_eq!(
        v["transport"], "loop",
        "auto picks loop devices on 6.1: {v}"
    );
}

/// Runs `lazypull demo --transport auto --json` in a guest of `series` and
/// checks what every demo must show: every read right, fetched lazily, and
/// nothing fetched again after drop_caches. Returns its JSON.
fn demo_in(series: KernelSeries, name: &str) -> serde_json::Value {
    lazypull_guest::require_root().expect("guest tests need root");
    let kernel = lazypull_guest::kernel_of(series).expect("guest kernel");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guest-demo.sh");
    let cfg = GuestConfig::new(&kernel)
        .name(name)
        .timeout(Duration::from_secs(900))
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_TRANSPORT", "auto")
        .env("LP_DEMO_JSON", "1");
    let run = lazypull_guest::run(&script, &cfg).expect("booting the guest");
    println!("{}", run.log);
    assert_eq!(
        run.status,
        0,
        "demo failed in the {} guest:\n{}",
        series.name(),
        run.log
    );
    let v: serde_json::Value =
        serde_json::from_str(&run.read_out("demo.out").unwrap()).expect("demo --json output");
    for r in v["reads"].as_array().unwrap() {
        assert_eq!(r["ok"], true, "{r}");
    }
    let (fetched, size) = (
        v["fetched_bytes"].as_u64().unwrap(),
        v["image_bytes"].as_u64().unwrap(),
    );
    assert!(fetched < size / 4, "lazily: {fetched} of {size}");
    assert_eq!(
        v["refetched_after_drop_caches_bytes"], 0,
        "the cache answered after drop_caches"
    );
    v
}
