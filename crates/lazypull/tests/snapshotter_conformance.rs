//! containerd 1.6's own snapshotter conformance suite
//! (`snapshots/testsuite.SnapshotterSuite`) against `lazypull snapshotter`,
//! reached over its unix socket through containerd's proxy snapshotter
//! client — the path containerd takes to a `[proxy_plugins]` snapshotter.
//!
//! The Go runner is go/conformance; it is built offline in GOPATH mode with
//! Debian's Go against Debian's containerd sources, in a temporary GOPATH.
//! The bar: no failure, at least 20 passes, and every test containerd's own
//! overlay snapshotter passes on this kernel passes here (measured with
//! `CONFORMANCE_TARGET=overlay`: 20 pass, `Rename` skips).
//!
//! Needs root (the suite mounts). A missing `go` or containerd source tree
//! fails the test naming the Debian package.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CONTAINERD_SRC: &str = "/usr/share/gocode/src/github.com/containerd/containerd";

/// Tests containerd 1.6's overlay snapshotter passes here (served over a
/// socket by contrib/snapshotservice, run by hand with
/// `CONFORMANCE_TARGET=overlay`). `Rename` skips for it, as for us.
const OVERLAY_PASSES: [&str; 20] = [
    "Basic",
    "StatActive",
    "StatComitted",
    "TransitivityTest",
    "PreareViewFailingtest",
    "Update",
    "Remove",
    "Walk",
    "LayerFileupdate",
    "RemoveDirectoryInLowerLayer",
    "Chown",
    "DirectoryPermissionOnCommit",
    "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer",
    "ViewReadonly",
    "StatInWalk",
    "CloseTwice",
    "RootPermission",
    "128LayersMount",
];

const SUITE_TIMEOUT: Duration = Duration::from_secs(180);

fn find_go() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("go"))
        .find(|p| p.is_file())
}

/// Runs `cmd` to completion within `timeout`, returning its status and
/// combined output. Kills it on timeout.
fn run(mut cmd: Command, timeout: Duration, what: &str) -> (std::process::ExitStatus, String) {
    let out = tempfile::tempfile().expect("temp file for output");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let mut text = String::new();
            let mut f = out;
            use std::io::Seek;
            f.rewind().expect("rewind");
            let _ = f.read_to_string(&mut text);
            panic!("{what} took longer than {timeout:?}; output:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut f = out;
    use std::io::Seek;
    f.rewind().expect("rewind");
    let mut text = String::new();
    f.read_to_string(&mut text).expect("read output");
    (status, text)
}

/// `--- PASS: TestSnapshotter/Name (0.01s)` -> ("PASS", "Name").
fn results(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|l| {
            let l = l.trim_start().strip_prefix("--- ")?;
            let (verdict, rest) = l.split_once(": ")?;
            let name = rest.split_whitespace().next()?;
            let sub = name.strip_prefix("TestSnapshotter/")?;
            matches!(verdict, "PASS" | "FAIL" | "SKIP")
                .then(|| (verdict.to_string(), sub.to_string()))
        })
        .collect()
}

fn build_runner(go: &Path, out: &Path) {
    assert!(
        Path::new(CONTAINERD_SRC)
            .join("snapshots/testsuite")
            .is_dir(),
        "containerd's Go sources are missing ({CONTAINERD_SRC}/snapshots/testsuite): \
         install the Debian package golang-github-containerd-containerd-dev"
    );
    let runner_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../go/conformance");
    let gopath = tempfile::tempdir().expect("temp GOPATH");
    let pkg = gopath.path().join("src/lazypull-conformance");
    std::fs::create_dir_all(&pkg).expect("GOPATH package dir");
    for entry in
        std::fs::read_dir(&runner_src).unwrap_or_else(|e| panic!("{}: {e}", runner_src.display()))
    {
        let p = entry.expect("read go/conformance").path();
        if p.extension().is_some_and(|e| e == "go") {
            std::fs::copy(&p, pkg.join(p.file_name().expect("name"))).expect("copy runner source");
        }
    }
    // A cache kept across runs (in cargo's target dir) makes rebuilds quick.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-build-cache");
    let mut cmd = Command::new(go);
    cmd.current_dir(&pkg)
        .args(["test", "-c", "-o"])
        .arg(out)
        .arg(".")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", gopath.path().display()),
        )
        .env("GOCACHE", &cache)
        .env("HOME", gopath.path());
    let (status, text) = run(
        cmd,
        Duration::from_secs(300),
        "go test -c (conformance runner)",
    );
    assert!(
        status.success(),
        "building the Go conformance runner failed:\n{text}"
    );
}

#[test]
fn containerd_snapshotter_suite_passes() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the conformance suite mounts file systems: run this test as root"
    );
    let go = find_go().expect("`go` not found in PATH: install the Debian package golang-go");
    let work = tempfile::tempdir().expect("temp dir");
    let runner = work.path().join("conformance.test");
    build_runner(&go, &runner);

    let started = Instant::now();
    let mut cmd = Command::new(&runner);
    cmd.args(["-test.v", "-test.root", "-test.timeout", "150s"])
        .env("LAZYPULL_BIN", env!("CARGO_BIN_EXE_lazypull"))
        .env("LAZYPULL_LOG", "warn")
        .env("TMPDIR", "/tmp");
    let (status, output) = run(cmd, SUITE_TIMEOUT, "the conformance suite");
    let took = started.elapsed();
    let results = results(&output);
    let count = |v: &str| results.iter().filter(|(r, _)| r == v).count();
    let (pass, fail, skip) = (count("PASS"), count("FAIL"), count("SKIP"));
    println!(
        "containerd snapshotter suite: {pass} passed, {fail} failed, {skip} skipped in {took:.1?}"
    );
    for (verdict, name) in &results {
        println!("  {verdict} {name}");
    }
    let failed: Vec<&String> = results
        .iter()
        .filter(|(r, _)| r == "FAIL")
        .map(|(_, n)| n)
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{output}");
    assert!(
        status.success(),
        "the runner exited with {status}:\n{output}"
    );
    for name in OVERLAY_PASSES {
        assert!(
            results.iter().any(|(r, n)| r == "PASS" && n == name),
            "{name} passes for containerd's overlay snapshotter but not for lazypull:\n{output}"
        );
    }
    assert!(
        pass >= 20,
        "only {pass} tests passed (containerd's overlay passes 20):\n{output}"
    );
}

#[test]
fn results_are_parsed() {
    let out = "=== RUN   TestSnapshotter/Basic\n--- FAIL: TestSnapshotter (0.00s)\n    --- PASS: TestSnapshotter/Basic (0.05s)\n    --- SKIP: TestSnapshotter/Rename (0.01s)\n    --- FAIL: TestSnapshotter/Walk (0.03s)\n";
    assert_eq!(
        results(out),
        vec![
            ("PASS".to_string(), "Basic".to_string()),
            ("SKIP".to_string(), "Rename".to_string()),
            ("FAIL".to_string(), "Walk".to_string()),
        ]
    );
}

fn wait_for_socket(path: &Path, child: &mut std::process::Child) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "snapshotter exited with {status} before listening on {}",
                path.display()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no socket at {} after 10s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_snapshotter(root: &Path, socket: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .arg("snapshotter")
        .arg("--root")
        .arg(root)
        .arg("--address")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lazypull snapshotter")
}

fn wait_timeout(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("snapshotter did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process around the store: socket 0600 in a new 0700 directory, root
/// 0700; a second snapshotter on a live socket is refused; SIGTERM stops it
/// cleanly (socket removed); after a SIGKILL the stale socket is replaced.
#[test]
fn snapshotter_process_lifecycle() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("lpsnap")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let root = dir.path().join("root");
    let socket = dir.path().join("run/s.sock");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;

    let mut first = start_snapshotter(&root, &socket);
    wait_for_socket(&socket, &mut first);
    assert_eq!(mode(&socket), 0o600, "socket mode");
    assert_eq!(
        mode(socket.parent().expect("parent")),
        0o700,
        "socket directory mode"
    );
    assert_eq!(mode(&root), 0o700, "root mode");

    let second = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(["snapshotter", "--root"])
        .arg(dir.path().join("root2"))
        .arg("--address")
        .arg(&socket)
        .output()
        .expect("run a second snapshotter");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second snapshotter on a live socket must fail"
    );
    assert!(err.contains("another snapshotter is listening"), "{err}");

    let other_socket = dir.path().join("other.sock");
    let same_root = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .arg("snapshotter")
        .arg("--root")
        .arg(&root)
        .arg("--address")
        .arg(&other_socket)
        .output()
        .expect("run a second snapshotter on the same root");
    let err = String::from_utf8_lossy(&same_root.stderr);
    assert!(
        !same_root.status.success(),
        "a second snapshotter on the same root must fail"
    );
    assert!(
        err.contains("in use by another lazypull snapshotter"),
        "{err}"
    );

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&first),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let status = wait_timeout(&mut first, Duration::from_secs(10));
    assert!(status.success(), "SIGTERM: exit {status}");
    assert!(!socket.exists(), "socket removed on a graceful stop");

    let mut again = start_snapshotter(&root, &socket);
    wait_for_socket(&socket, &mut again);
    again.kill().expect("SIGKILL");
    again.wait().expect("reap");
    assert!(socket.exists(), "a killed snapshotter leaves its socket");
    let mut after = start_snapshotter(&root, &socket);
    wait_for_socket(&socket, &mut after);
    after.kill().expect("SIGKILL");
    after.wait().expect("reap");
}

#[test]
fn help_teaches_the_containerd_snippet() {
    let out = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(["snapshotter", "--help"])
        .output()
        .expect("lazypull snapshotter --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for want in [
        "[proxy_plugins.lazypull]",
        "type = \"snapshot\"",
        "address = \"/run/lazypull/snapshotter.sock\"",
        "/var/lib/lazypull/snapshotter",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
}
