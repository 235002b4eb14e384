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

mod common;

#[test]
fn mirror_harness_measures_every_arm_and_the_second_node_spares_the_upstream() {
    common::require_root_and_fuse("creates network namespaces and FUSE mounts");
    let report = common::run_bench(
        env!("CARGO_BIN_EXE_lazypull-bench"),
        &["mirror", "--network", "1g", "--samples", "1"],
        "lpbmsmoke",
        "mirror",
    );

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
