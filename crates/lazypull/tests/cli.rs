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

/// Pids of the processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_daemon_that_fails_to_start_leaves_no_fd_store_behind() {
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("run");
    let store = run.join("fdstore.sock");
    // Its output goes to a file, not a pipe: an fd store left running would
    // hold a pipe open and hang the wait for its end.
    let log = work.path().join("daemon.log");
    let log_file = fs::File::create(&log).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(["daemon", "--config", "/dev/null"])
        .args(["--transport", "cachefiles"])
        .args(["--device", "/nonexistent/cachefiles"])
        .arg("--cache-dir")
        .arg(work.path().join("c"))
        .arg("--work-dir")
        .arg(work.path().join("w"))
        .arg("--run-dir")
        .arg(&run)
        .arg("--socket")
        .arg(run.join("ctl.sock"))
        .arg("--fd-store")
        .arg(&store)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .status()
        .unwrap();
    let orphans = processes_naming(store.to_str().unwrap());
    for pid in &orphans {
        // The test's own leftover (through the daemon it ran): end it.
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    let out = fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{out}");
    assert!(out.contains("this kernel has no cachefiles"), "{out}");
    assert!(
        orphans.is_empty(),
        "the fd store it started runs on: {orphans:?}"
    );
    assert!(!store.exists(), "its socket is left: {}", store.display());
}

/// The fd store the daemon starts serves on a listener the daemon bound and
/// handed over as its stdin; run by hand with that flag and no such stdin, it
/// says what is wrong instead of serving nothing.
#[test]
fn an_fd_store_told_to_inherit_a_listener_it_lacks_says_so() {
    let work = tempfile::tempdir().unwrap();
    let socket = work.path().join("fdstore.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(["fdstore", "--inherit-listener", "--socket"])
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("stdin is not a listening socket"),
        "{}",
        text(&out)
    );
    assert!(!socket.exists());
}

/// The meta blob's trailer vouches for each data blob's chunk table: `inspect`
/// shows it, and `verify` finds a table that is valid (it describes the right
/// bytes) but not the one the meta blob (the fsid) vouches for — what a daemon
/// serving the image from a web server would refuse.
#[test]
fn verify_checks_the_chunk_tables_against_the_meta_blobs_trailer() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let (zstd, plain) = (work.path().join("zstd"), work.path().join("plain"));
    for (dir, compression) in [(&zstd, "zstd"), (&plain, "none")] {
        let built = lazypull(&[
            "build",
            src.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
            "--compression",
            compression,
        ]);
        assert!(built.status.success(), "{}", text(&built));
    }
    let out = zstd.to_str().unwrap();
    let inspected = lazypull(&["inspect", out, "--json"]);
    assert!(inspected.status.success(), "{}", text(&inspected));
    let report: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(report["trailer"], true, "{report}");
    let blob = report["blobs"][0]["digest"].as_str().unwrap().to_owned();
    let table = report["blobs"][0]["table"].as_str().unwrap().to_owned();
    assert!(table.starts_with("sha256:"), "{table}");
    let plain_report: serde_json::Value =
        serde_json::from_slice(&lazypull(&["inspect", plain.to_str().unwrap(), "--json"]).stdout)
            .unwrap();
    assert_eq!(plain_report["blobs"][0]["table"], "plain");
    let verified = lazypull(&["verify", "--json", out]);
    assert!(verified.status.success(), "{}", text(&verified));

    // The same blob packed again in 64 KiB units: a valid stored form of the
    // right bytes, but another chunk table.
    lazypull_blob::pack(
        &plain.join(&blob),
        &zstd,
        &lazypull_blob::PackOptions {
            unit_size: 64 << 10,
            ..lazypull_blob::PackOptions::default()
        },
    )
    .unwrap();
    let bad = lazypull(&["verify", "--json", out]);
    assert!(!bad.status.success(), "{}", text(&bad));
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    let problems = report["problems"].to_string();
    assert!(
        problems.contains(&blob) && problems.contains("trailer vouches for"),
        "{report}"
    );
    assert_eq!(report["problems"].as_array().unwrap().len(), 1, "{report}");
}

/// An error is one line naming each cause once: `build` of a missing source
/// said the OS error twice (the I/O error's message holds its cause, and the
/// cause was printed again after it).
#[test]
fn a_missing_build_source_is_one_line_with_the_os_error_once() {
    let work = tempfile::tempdir().unwrap();
    let out = lazypull(&[
        "build",
        "/nonexistent",
        "-o",
        work.path().join("o").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        "lazypull: error: building /nonexistent: /nonexistent: No such file or directory (os error 2)\n"
    );
    assert!(out.stdout.is_empty());
}

/// `lazypull build --max-layer-size` bounds what one layer may expand to: a
/// gzip'd tar whose 8 MiB of zeros compress to a few KiB is refused at 1 MiB,
/// saying so, and leaves no output; the default builds it.
#[test]
fn build_refuses_a_layer_past_max_layer_size() {
    use std::io::Write;
    let work = tempfile::tempdir().unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(8 << 20);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    let zeros = std::io::Read::take(std::io::repeat(0), 8 << 20);
    tar.append_data(&mut h, "zeros", zeros).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let src = work.path().join("bomb.tar.gz");
    fs::write(&src, gz.finish().unwrap()).unwrap();
    let o = work.path().join("o");
    let out = lazypull(&[
        "build",
        src.to_str().unwrap(),
        "-o",
        o.to_str().unwrap(),
        "--max-layer-size",
        "1MiB",
    ]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("\"zeros\"")
            && err.contains("limit of 1048576 bytes")
            && err.contains("--max-layer-size"),
        "{err}"
    );
    assert!(!o.join("manifest.json").exists());
    let out = lazypull(&["build", src.to_str().unwrap(), "-o", o.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `--transport fanotify` with its cache on tmpfs (no pre-content events
/// there): the daemon refuses at start, naming the file system problem,
/// and leaves no fd store behind.
#[test]
fn a_fanotify_daemon_on_tmpfs_refuses_at_start_and_says_why() {
    let work = tempfile::tempdir_in("/dev/shm").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(["daemon", "--config", "/dev/null", "--transport", "fanotify"])
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .arg("--work-dir")
        .arg(work.path().join("work"))
        .arg("--run-dir")
        .arg(work.path().join("run"))
        .arg("--socket")
        .arg(work.path().join("run/ctl.sock"))
        .arg("--fd-store")
        .arg(work.path().join("run/fdstore.sock"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("the fanotify transport cannot mark files in") && t.contains("not tmpfs"),
        "{t}"
    );
    assert!(
        !work.path().join("run/fdstore.sock").exists(),
        "the fd store it started is gone"
    );
}
