//! Failure reporting of `run`, with stand-ins for qemu (no real guest boots here).

use lazypull_guest::{run, GuestConfig, TimeoutError};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("bzImage"), "not really a kernel").unwrap();
        fs::write(dir.path().join("scenario.sh"), "#!/bin/bash\nexit 0\n").unwrap();
        Fixture { dir }
    }

    fn fake_qemu(&self, body: &str) -> PathBuf {
        let path = self.dir.path().join("fake-qemu");
        fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn config(&self, qemu: PathBuf) -> GuestConfig {
        let mut cfg = GuestConfig::new(self.dir.path().join("bzImage"));
        cfg.qemu = Some(qemu);
        cfg
    }

    fn scenario(&self) -> PathBuf {
        self.dir.path().join("scenario.sh")
    }
}

#[test]
fn guest_that_never_reaches_the_scenario_is_an_error_quoting_the_console() {
    let f = Fixture::new();
    let qemu = f.fake_qemu("echo 'Kernel panic - fake: VFS: Unable to mount root fs'");
    let err = format!("{:#}", run(&f.scenario(), &f.config(qemu)).unwrap_err());
    assert!(err.contains("never reached the scenario"), "{err}");
    assert!(err.contains("Unable to mount root fs"), "{err}");
}

#[test]
fn qemu_failure_quotes_its_stderr() {
    let f = Fixture::new();
    let qemu = f.fake_qemu("echo 'qemu: bad option -frobnicate' >&2; exit 1");
    let err = format!("{:#}", run(&f.scenario(), &f.config(qemu)).unwrap_err());
    assert!(err.contains("bad option -frobnicate"), "{err}");
    assert!(err.contains("exit status: 1"), "{err}");
}

#[test]
fn missing_qemu_says_what_to_install() {
    let f = Fixture::new();
    let err = format!(
        "{:#}",
        run(&f.scenario(), &f.config(PathBuf::from("/nonexistent/qemu"))).unwrap_err()
    );
    assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
}

#[test]
fn timeout_before_the_scenario_kills_qemu() {
    let f = Fixture::new();
    let pidfile = f.dir.path().join("pid");
    // The fake qemu never exits by itself: it is gone afterwards only if the
    // timeout killed it, whatever the machine's speed.
    let qemu = f.fake_qemu(&format!(
        "echo booting...; echo $$ > {}; exec sleep infinity",
        pidfile.display()
    ));
    let cfg = f.config(qemu).timeout(Duration::from_secs(2));
    let scenario = f.scenario();
    let (done, returned) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let _ = done.send(run(&scenario, &cfg));
    });
    // A guard against hanging the suite, not a measure of speed.
    let err = returned
        .recv_timeout(Duration::from_secs(600))
        .expect("run() did not return: qemu was not killed at the timeout")
        .unwrap_err();
    runner.join().unwrap();
    let timeout = err.downcast_ref::<TimeoutError>().expect("a TimeoutError");
    assert!(!timeout.scenario_started);
    assert!(timeout.console_tail.contains("booting..."), "{err:#}");
    assert!(format!("{err}").contains("timed out after 2s"), "{err}");
    let pid = fs::read_to_string(&pidfile).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "fake qemu {} still alive",
        pid.trim()
    );
}

#[test]
fn bad_configuration_is_refused_before_booting() {
    let f = Fixture::new();
    let qemu = f.fake_qemu("exit 0");
    let bad_env = f.config(qemu.clone()).env("NOT.VALID", "x");
    assert!(run(&f.scenario(), &bad_env).is_err());
    let bad_name = f.config(qemu.clone()).name("with space");
    assert!(run(&f.scenario(), &bad_name).is_err());
    let mut no_kernel = f.config(qemu);
    no_kernel.kernel = PathBuf::from("/nonexistent/bzImage");
    let err = format!("{:#}", run(&f.scenario(), &no_kernel).unwrap_err());
    assert!(err.contains("lazypull_guest::kernel()"), "{err}");
}
