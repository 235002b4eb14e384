//! `lazypull demo` through the cachefiles transport, in the Linux 6.12 guest
//! (the host tests run it through FUSE): the same command, the other kernel path;
//! and through loop devices in the Linux 6.1 guest, where `auto` must pick them.
//!
//! Needs root, qemu and the guest kernel; fails (never skips) without them.

use std::path::Path;
use std::time::Duration;

use lazypull_guest::{Disk, GuestConfig};

#[test]
fn the_demo_runs_green_through_cachefiles() {
    lazypull_guest::require_root().expect("guest tests need root");
    let kernel = lazypull_guest::kernel().expect("guest kernel");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guest-demo.sh");
    let cfg = GuestConfig::new(&kernel)
        .name("demo")
        .timeout(Duration::from_secs(900))
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_TRANSPORT", "auto")
        .env("LP_DEMO_JSON", "1");
    let run = lazypull_guest::run(&script, &cfg).expect("booting the guest");
    println!("{}", run.log);
    assert_eq!(run.status, 0, "demo failed in the guest:\n{}", run.log);
    let v: serde_json::Value =
        serde_json::from_str(&run.read_out("demo.out").unwrap()).expect("demo --json output");
    assert_eq!(
        v["transport"], "cachefiles",
        "auto picks cachefiles on this kernel"
    );
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
        "the kernel's cache answered"
    );
    let reads = v["daemon_status"]["transport"]["counters"]["reads"]
        .as_u64()
        .unwrap();
    assert!(reads > 0, "cachefiles READs were served: {reads}");
}

#[test]
fn the_demo_runs_green_on_linux_6_1_through_loop_devices() {
    lazypull_guest::require_root().expect("guest tests need root");
    let kernel = lazypull_guest::kernel_of(lazypull_guest::KernelSeries::V6_1)
        .expect("the Linux 6.1 guest kernel");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guest-demo.sh");
    let cfg = GuestConfig::new(&kernel)
        .name("demo-6-1")
        .timeout(Duration::from_secs(900))
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LP_TRANSPORT", "auto")
        .env("LP_DEMO_JSON", "1");
    let run = lazypull_guest::run(&script, &cfg).expect("booting the guest");
    println!("{}", run.log);
    assert_eq!(run.status, 0, "demo failed in the 6.1 guest:\n{}", run.log);
    let v: serde_json::Value =
        serde_json::from_str(&run.read_out("demo.out").unwrap()).expect("demo --json output");
    assert_eq!(
        v["transport"], "loop",
        "auto picks loop devices on 6.1: {v}"
    );
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
        "the daemon's cache answered after drop_caches"
    );
}
