//! Boots the real test guest (qemu, TCG): needs qemu-system-x86_64, mkfs.ext4, mkfs.erofs
//! and the guest kernel (built on first use by guest/build-kernel.sh).

use lazypull_guest::{kernel, run, Disk, GuestConfig, TimeoutError};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
}

fn config() -> GuestConfig {
    GuestConfig::new(kernel().expect("guest kernel"))
}

#[test]
fn boots_with_cachefiles_disks_env_and_output() {
    let seed = tempfile::tempdir().unwrap();
    fs::write(seed.path().join("seed.txt"), "seeded from the host\n").unwrap();
    let cfg = config()
        .disk(Disk::EmptyExt4 { size_mib: 64 })
        .disk(Disk::Ext4From {
            dir: seed.path().to_path_buf(),
            extra_mib: 1,
        })
        .env("GREETING", "it's a b  c");
    let run = run(&scenario("basic.sh"), &cfg).unwrap();
    eprintln!("basic: boot {:?}, total {:?}", run.boot_time, run.elapsed);
    run.ensure_success().unwrap();
    let uname = run.read_out("uname").unwrap();
    assert!(uname.starts_with("6.12"), "guest kernel is {uname:?}");
    assert_eq!(run.read_out("seed").unwrap(), "seeded from the host\n");
    assert_eq!(run.read_out("greeting").unwrap(), "it's a b  c");
    assert_eq!(run.read_out("where").unwrap(), "home=/tmp cwd=/tmp\n");
    assert_eq!(run.read_out("nproc").unwrap().trim(), "2");
    assert!(run.log.contains("basic-scenario-done"), "log: {}", run.log);
    assert!(run.console.contains("basic-scenario-done"));
    assert!(run.boot_time.is_some());
    // The output share goes away with the run.
    let out = run.out_dir.clone();
    assert!(out.exists());
    if std::env::var_os("LAZYPULL_KEEP_GUEST").is_none() {
        drop(run);
        assert!(!out.exists(), "{} left behind", out.display());
    }
}

#[test]
fn reports_the_scenario_exit_status() {
    let run = run(&scenario("exit3.sh"), &config()).unwrap();
    eprintln!("exit3: boot {:?}, total {:?}", run.boot_time, run.elapsed);
    assert_eq!(run.status, 3, "console:\n{}", run.console);
    assert!(!run.success());
    let err = run.ensure_success().unwrap_err().to_string();
    assert!(err.contains("about to exit with status 3"), "{err}");
}

/// Command lines of the live processes that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) && cmdline.contains("qemu") {
                found.push(cmdline);
            }
        }
    }
    found
}

#[test]
fn timeout_kills_the_guest() {
    let name = format!("lp-hang-test-{}", std::process::id());
    let cfg = config().name(name.clone()).timeout(Duration::from_secs(15));
    // Watch qemu appear, so that "none left" below is not vacuous.
    let seen = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, done, name) = (seen.clone(), done.clone(), name.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if !processes_mentioning(&name).is_empty() {
                    seen.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let start = Instant::now();
    let err = run(&scenario("hang.sh"), &cfg).unwrap_err();
    let took = start.elapsed();
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();

    let text = format!("{err:#}");
    assert!(text.contains("timed out"), "{text}");
    let timeout = err.downcast_ref::<TimeoutError>().expect("a TimeoutError");
    assert!(timeout.scenario_started, "{text}");
    assert!(
        timeout.console_tail.contains("hang-scenario-sleeping"),
        "{text}"
    );
    assert!(
        took >= Duration::from_secs(15) && took < Duration::from_secs(30),
        "took {took:?}"
    );
    assert!(seen.load(Ordering::SeqCst), "never saw qemu {name} running");
    let left = processes_mentioning(&name);
    assert!(left.is_empty(), "qemu left behind: {left:?}");
}

#[test]
fn file_backed_erofs_mounts_in_the_guest() {
    // Under the host's /tmp on purpose: the guest sees it through its /tmp overlay.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("hello.txt"), "hello from erofs\n").unwrap();
    fs::write(src.join("sub/deep.txt"), "x".repeat(10000)).unwrap();
    let img = dir.path().join("test.erofs");
    let out = Command::new("mkfs.erofs")
        .arg(&img)
        .arg(&src)
        .output()
        .expect("running mkfs.erofs (apt-get install erofs-utils)");
    assert!(out.status.success(), "mkfs.erofs: {out:?}");

    let cfg = config().env("EROFS_IMG", img.to_str().unwrap());
    let run = run(&scenario("erofs.sh"), &cfg).unwrap();
    eprintln!("erofs: boot {:?}, total {:?}", run.boot_time, run.elapsed);
    run.ensure_success().unwrap();
    assert_eq!(run.read_out("hello").unwrap(), "hello from erofs\n");
    assert_eq!(run.read_out("deep").unwrap(), "x".repeat(10000));
}
