//! The image commands end to end through the `lazypull` binary, on the host.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn lazypull(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(args)
        .output()
        .expect("running lazypull")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/deep")).unwrap();
    fs::write(root.join("etc/hostname"), "sample\n").unwrap();
    // 3 MiB whose 1 MiB chunks all differ, and an exact copy of it.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    fs::write(root.join("etc/deep/data.bin"), &data).unwrap();
    fs::write(root.join("copy.bin"), &data).unwrap();
    std::os::unix::fs::symlink("etc/hostname", root.join("link")).unwrap();
}

fn round_trip(compression: &str) {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let out_dir = work.path().join("img");
    let out = out_dir.to_str().unwrap();
    let built = lazypull(&[
        "build",
        src.to_str().unwrap(),
        "-o",
        out,
        "--json",
        "--compression",
        compression,
    ]);
    assert!(built.status.success(), "{}", text(&built));
    let built: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap();
    assert_eq!(built["files"], 3);
    assert_eq!(
        built["chunks_deduplicated"], 3,
        "copy.bin repeats data.bin's chunks"
    );
    let blob = built["blobs"][0]["digest"].as_str().unwrap().to_owned();
    let stored = built["stored_bytes"].as_u64().unwrap();
    let (damaged, plain_exists) = if compression == "zstd" {
        assert!(
            stored < built["blobs"][0]["size"].as_u64().unwrap() / 4,
            "compressed: {stored}"
        );
        (out_dir.join(format!("{blob}.zst")), false)
    } else {
        (out_dir.join(&blob), true)
    };
    assert_eq!(out_dir.join(&blob).exists(), plain_exists);

    let inspected = lazypull(&["inspect", out, "--json", "--files"]);
    assert!(inspected.status.success(), "{}", text(&inspected));
    let report: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(report["entries_by_type"]["file"], 3);
    assert_eq!(report["entries_by_type"]["symlink"], 1);
    assert_eq!(report["chunk_refs"], 7, "3 + 3 + 1 chunks");
    assert_eq!(report["unique_chunks"], 4);
    assert_eq!(report["blobs"][0]["present"], true);
    assert!(report["files"].as_array().unwrap().len() >= 6);

    let verified = lazypull(&["verify", out]);
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(text(&verified).contains("ok: meta blob, 1 data blob(s) and 3 files"));

    // One flipped byte in the stored data is found and named.
    let mut bytes = fs::read(&damaged).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0xff;
    fs::write(&damaged, bytes).unwrap();
    let bad = lazypull(&["verify", "--json", out]);
    assert!(!bad.status.success());
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(
        report["problems"][0].as_str().unwrap().contains(&blob),
        "{report}"
    );
}

#[test]
fn build_inspect_verify_round_trip_and_detect_corruption_zstd() {
    round_trip("zstd");
}

#[test]
fn build_inspect_verify_round_trip_and_detect_corruption_plain() {
    round_trip("none");
}

#[test]
fn bad_input_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let junk = work.path().join("junk.tar");
    fs::write(&junk, b"this is not an archive").unwrap();
    let out = lazypull(&[
        "build",
        junk.to_str().unwrap(),
        "-o",
        work.path().join("o").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("junk.tar"), "{}", text(&out));
    let out = lazypull(&[
        "build",
        "/nonexistent-source",
        "-o",
        "/tmp/x",
        "--chunk-size",
        "1000",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--chunk-size"), "{}", text(&out));
    let out = lazypull(&["inspect", work.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("manifest.json"), "{}", text(&out));
}

#[test]
fn help_teaches_each_command() {
    let out = lazypull(&["--help"]);
    assert!(out.status.success());
    let help = text(&out);
    for cmd in ["daemon", "build", "inspect", "verify"] {
        assert!(help.contains(cmd), "{help}");
    }
    let out = lazypull(&["daemon", "--help"]);
    assert!(text(&out).contains("mount -t erofs none -o fsid="));
}

#[test]
fn the_demo_refuses_clearly_without_root() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_lazypull"))
        .arg("demo")
        .output()
        .expect("running setpriv (util-linux)");
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("needs root") && err.contains("sudo lazypull demo"),
        "{err}"
    );
}

#[test]
fn a_daemon_with_a_bad_transport_or_config_says_why() {
    let out = lazypull(&["daemon", "--config", "/dev/null", "--transport", "magic"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("possible values: auto, cachefiles, fuse"),
        "{}",
        text(&out)
    );
    let work = tempfile::tempdir().unwrap();
    let out = lazypull(&[
        "daemon",
        "--config",
        "/dev/null",
        "--transport",
        "cachefiles",
        "--no-fd-store",
        "--device",
        "/nonexistent/cachefiles",
        "--cache-dir",
        work.path().join("c").to_str().unwrap(),
        "--run-dir",
        work.path().join("r").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("this kernel has no cachefiles"),
        "{}",
        text(&out)
    );
}
