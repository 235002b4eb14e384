//! Smoke test of `lazypull-bench mirror` (issue 18): the whole harness
//! (network namespace, shaped veth, delaying proxy, upstream registry, a
//! pull-through mirror with its logging proxy, `hosts.toml`, three lazypull
//! daemons on FUSE) for one sample on the 1 Gbit/s shape.
//!
//! Asserts what cannot depend on speed: the report has a sample of every
//! arm, each read the whole image (the bench itself fails when the arms
//! read different bytes), the node with no mirror never touched the
//! mirror, the second node was answered by the mirror and cost the upstream
//! fewer bytes than the first node and than no mirror. Never a time.
//!
//! Needs root, /dev/fuse, docker-registry, iproute2 and the `lazypull`
//! binary beside this crate's (`cargo build -p lazypull`): each missing
//! one is a failure that names it.

use std::path::PathBuf;
use std::process::Command;

fn lazypull_binary() -> PathBuf {
    // target/<profile>/deps/mirror_smoke-<hash> -> target/<profile>/lazypull
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("lazypull");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p lazypull; cargo test --workspace does)",
        bin.display()
    );
    bin
}

#[test]
fn mirror_harness_measures_every_arm_and_the_second_node_spares_the_upstream() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test creates network namespaces and FUSE mounts: run it as root"
    );
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "this test needs /dev/fuse"
    );
    let work = PathBuf::from(format!("/tmp/lpbmsmoke{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_lazypull-bench"))
        .args(["mirror", "--network", "1g", "--samples", "1", "--json"])
        .arg("--work")
        .arg(&work)
        .arg("--lazypull")
        .arg(lazypull_binary())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "lazypull-bench mirror failed ({}):\n{stderr}",
        out.status
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    assert!(work.join("mirror.svg").is_file(), "no chart written");
    assert!(work.join("mirror.json").is_file(), "no JSON written");
    let _ = std::fs::remove_dir_all(&work);

    let image = &report["image"];
    let bytes_read = image["bytes_read"].as_u64().unwrap_or(0);
    assert!(bytes_read > 1 << 20, "read too little: {report:#}");
    let sample = |arm: &str| -> &serde_json::Value {
        let s = &report["arms"][arm]["samples"][0];
        assert!(s.is_object(), "arm {arm} has no sample: {report:#}");
        assert_eq!(s["bytes_read"].as_u64(), Some(bytes_read), "{arm}: {s}");
        s
    };
    let (none, node1, node2) = (sample("no-mirror"), sample("node1"), sample("node2"));
    let up = |s: &serde_json::Value| s["upstream"]["bytes"].as_u64().unwrap();
    assert_eq!(
        none["mirror"]["requests"], 0,
        "the node without hosts.toml asked the mirror: {none}"
    );
    assert!(
        up(none) > 0,
        "the node without a mirror fetched nothing upstream"
    );
    assert!(
        node2["mirror"]["bytes"].as_u64().unwrap() > 0,
        "the mirror answered node 2 nothing: {node2}"
    );
    assert!(
        up(node2) < up(node1) && up(node2) < up(none),
        "node 2 cost the upstream {} bytes, node 1 {}, no mirror {}: {report:#}",
        up(node2),
        up(node1),
        up(none)
    );
}
