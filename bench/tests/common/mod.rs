//! What the bench smoke tests share: the `lazypull` binary they drive, the
//! privileges they need, and running the bench for its JSON report.

use std::path::PathBuf;
use std::process::Command;

/// The `lazypull` binary beside this test's (`target/<profile>/lazypull`),
/// or a failure saying how to build it.
pub fn lazypull_binary() -> PathBuf {
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/lazypull
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

/// Fails unless this runs as root with /dev/fuse; `why` says what the test
/// does as root.
pub fn require_root_and_fuse(why: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test {why}: run it as root"
    );
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "this test needs /dev/fuse"
    );
}

/// `CARGO_BIN_EXE_lazypull-bench` names it) with a fresh work directory
/// `/tmp/<work>`, checks it succeeded and wrote `<chart>.svg` and
/// `<chart>.json` there, removes the directory and returns the report.
pub fn run_bench(bench: &str, args: &[&str], work: &str, chart: &str) -> serde_json::Value {
    let work = PathBuf::from(format!("/tmp/{work}{}", std::process::id()));
    let out = Command::new(bench)
        .args(args)
        .arg("--json")
        .arg("--work")
        .arg(&work)
        .arg("--lazypull")
        .arg(lazypull_binary())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "lazypull-bench {} failed ({}):\n{stderr}",
        args[0],
        out.status
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    assert!(
        work.join(format!("{chart}.svg")).is_file(),
        "no chart written"
    );
    assert!(
        work.join(format!("{chart}.json")).is_file(),
        "no JSON written"
    );
    let _ = std::fs::remove_dir_all(&work);
    report
}
