//! CI smoke test of `lazypull-bench startup` (issue 14): the whole harness
//! (network namespace, shaped veth, delaying proxy, registry, containerd,
//! the lazypull daemon on FUSE and its snapshotter) on one small image, one
//! network shape, one sample.
//!
//! The image is testkit's python image (30 MB, built from the host's
//! python3.11), not an mmdebstrap one: those need Debian's archive and
//! minutes to build on a cold cache, too slow and too fragile for CI; the
//! benchmark proper runs them. Asserts what cannot depend on speed: every
//! arm's workload printed its ready line, the full read after ready saw the
//! same bytes through lazypull as through containerd's overlayfs, and the
//! lazy arms moved fewer bytes by ready than the full pull. Never a time.
//!
//! Needs root, /dev/fuse, docker-registry, containerd, runc, iproute2 and the
//! `lazypull` binary beside this crate's (`cargo build -p lazypull`): each
//! missing one is a failure that names it.

mod common;

#[test]
fn startup_harness_runs_every_arm_on_one_small_image() {
    common::require_root_and_fuse("creates network namespaces, mounts and runs containerd");
    let report = common::run_bench(
        env!("CARGO_BIN_EXE_lazypull-bench"),
        &[
            "startup",
            "--images",
            "testkit-python",
            "--networks",
            "1g",
            "--samples",
            "1",
        ],
        "lpbsmoke",
        "startup",
    );

    let image = &report["images"][0];
    assert_eq!(image["image"], "testkit-python", "{report:#}");
    let arms = &image["networks"]["1g"];
    let sample = |arm: &str| -> &serde_json::Value {
        let s = &arms[arm]["samples"][0];
        assert!(s.is_object(), "arm {arm} has no sample: {arms:#}");
        s
    };
    // The bench fails when a run prints no ready line: a sample is a ready
    // line seen, at a time after the clock started.
    let measured: Vec<&str> = ["A", "B", "C", "D-A", "D-B"]
        .into_iter()
        .filter(|arm| arms[*arm].get("not_run").is_none())
        .collect();
    for arm in ["A", "B", "C", "D-A", "D-B"] {
        assert!(measured.contains(&arm), "arm {arm} did not run: {arms:#}");
    }
    for arm in &measured {
        let s = sample(arm);
        assert!(s["ready_secs"].as_f64().unwrap() > 0.0, "{arm}: {s}");
        assert!(
            s["full_read_bytes"].as_u64().unwrap_or(0) > 0,
            "{arm}: no full read: {s}"
        );
    }
    // Every file read once after ready: the same bytes whichever snapshotter.
    let full = sample("A")["full_read_bytes"].as_u64().unwrap();
    for arm in &measured {
        assert_eq!(
            sample(arm)["full_read_bytes"].as_u64().unwrap(),
            full,
            "arm {arm} read another amount than A: {arms:#}"
        );
    }
    let a_bytes = sample("A")["bytes_to_ready"].as_u64().unwrap();
    assert!(a_bytes > 0, "A moved nothing: {arms:#}");
    for arm in measured.iter().filter(|a| matches!(**a, "B" | "C")) {
        let b = sample(arm)["bytes_to_ready"].as_u64().unwrap();
        assert!(
            b < a_bytes,
            "arm {arm} moved {b} bytes by ready, the full pull {a_bytes}: {arms:#}"
        );
    }
}
