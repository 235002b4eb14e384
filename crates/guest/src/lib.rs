//! Boots the lazypull test guest and returns the results of a scenario run in it.
//!
//! This crate owns everything about the guest — building (once, cached) the Linux 6.12 kernel
//! with cachefiles on-demand mode and the Linux 6.1 kernel most nodes run, making disk images, starting qemu (TCG), waiting with a
//! timeout, and collecting the scenario's exit status, its output and the files it wrote —
//! and knows nothing about lazypull's protocol.
//!
//! How a guest looks from inside:
//! - The root filesystem is the host's `/`, exported read-only over 9p, so every host binary,
//!   the workspace's `target/` binaries and test data anywhere on the host are visible at the
//!   same paths; nothing needs packing.
//! - PID 1 is `guest/init.sh`. It mounts proc, sysfs, devtmpfs, tmpfs on `/run` and `/mnt`,
//!   and a tmpfs-backed overlay on `/tmp` and `/var/tmp` (writable, still showing the host's
//!   files), cgroup2 at `/sys/fs/cgroup` (every controller enabled for children) and mqueue at
//!   `/dev/mqueue` (both for runc; a kernel without them only warns), then mounts the
//!   read-write output share at [`GUEST_OUT_DIR`].
//! - The scenario script runs as root in `/tmp`, with `HOME=/tmp`, a standard `PATH`,
//!   `LP_OUT` set to [`GUEST_OUT_DIR`], stdin from `/dev/null` and the variables of
//!   [`GuestConfig::env`]. Its output goes to the serial console and to a log; its exit
//!   status is the run's [`GuestRun::status`]. Processes it leaves behind are killed.
//! - Disks of [`GuestConfig::disks`] appear as `/dev/vda`, `/dev/vdb`, ... in order.
//!
//! Environment variables read on the host:
//! - `LAZYPULL_KEEP_GUEST=1`: keep the run's temporary directory (disk images, console log,
//!   output share) instead of removing it; its path is printed on stderr.
//! - `LAZYPULL_GUEST_KERNEL`, `LAZYPULL_GUEST_KERNEL_6_1`: a bzImage to use instead of
//!   building one in [`kernel_of`].
//! - `LAZYPULL_QEMU`: the qemu binary (default `qemu-system-x86_64` from `PATH`).

use anyhow::{anyhow, bail, Context, Result};
use std::fmt;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the read-write output share is mounted in the guest (also `$LP_OUT` there).
pub const GUEST_OUT_DIR: &str = "/run/lp-out";
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
/// Default number of guest CPUs.
pub const DEFAULT_CPUS: u32 = 2;
/// Default limit on one whole run (boot, scenario, shutdown).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How many console lines errors quote.
pub const CONSOLE_TAIL_LINES: usize = 80;

const ROOT_TAG: &str = "lproot";
const OUT_TAG: &str = "lpout";
/// 9p root mount options; `cache=loose` is safe because the host tree is not expected to
/// change under a running guest, and makes exec/stat of host binaries much faster.
const ROOT_FLAGS: &str = "trans=virtio,version=9p2000.L,msize=512000,cache=loose";
const CTL_DIR: &str = ".lp";
const KEEP_ENV: &str = "LAZYPULL_KEEP_GUEST";

/// How to boot one guest. [`GuestConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The bzImage to boot (see [`kernel`]).
    pub kernel: PathBuf,
    /// Guest memory in MiB (default 2048).
    pub memory_mib: u32,
    /// Guest CPUs (default 2).
    pub cpus: u32,
    /// Limit on the whole run; past it qemu is killed and [`run`] fails with a
    /// [`TimeoutError`].
    pub timeout: Duration,
    /// Disks, attached as virtio-blk in order: `/dev/vda`, `/dev/vdb`, ...
    pub disks: Vec<Disk>,
    /// Environment variables of the scenario (names: letters, digits, `_`; values: anything
    /// without NUL).
    pub env: Vec<(String, String)>,
    /// Name given to qemu (`-name`), to recognise its process; letters, digits, `-`, `_`.
    pub name: String,
    /// The qemu binary; `None`: `$LAZYPULL_QEMU`, else `qemu-system-x86_64` from `PATH`.
    pub qemu: Option<PathBuf>,
    /// Extra kernel command-line words, appended last (e.g. `loglevel=8`; no whitespace).
    pub kernel_args: Vec<String>,
    /// A virtio network card on qemu's user-mode network: the guest reaches the
    /// host's 127.0.0.1 at 10.0.2.2 once it configures `eth0` (see
    /// `guest_network_setup` in the scenario helpers).
    pub network: bool,
}

impl GuestConfig {
    /// A configuration with the defaults: 2048 MiB, 2 CPUs, [`DEFAULT_TIMEOUT`], no disks.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        GuestConfig {
            kernel: kernel.into(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            timeout: DEFAULT_TIMEOUT,
            disks: Vec::new(),
            env: Vec::new(),
            name: "lazypull-guest".to_string(),
            qemu: None,
            kernel_args: Vec::new(),
            network: false,
        }
    }

    /// Attaches a user-mode network card (see [`GuestConfig::network`]).
    pub fn network(mut self) -> Self {
        self.network = true;
        self
    }

    /// Adds a disk (the next `/dev/vdX`).
    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Adds an environment variable of the scenario.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Appends a kernel command-line word.
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.kernel_args.push(arg.into());
        self
    }

    /// Sets the qemu process name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// A disk attached to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// A fresh, empty ext4 filesystem of this size (a sparse file on the host).
    EmptyExt4 { size_mib: u64 },
    /// An ext4 filesystem holding a copy of `dir` (`mkfs.ext4 -d`), sized from the
    /// directory's contents plus `extra_mib` MiB of free room (a sparse file on the host).
    Ext4From { dir: PathBuf, extra_mib: u64 },
    /// An existing raw image, attached read-write as it is.
    Raw(PathBuf),
}

/// The result of a guest run whose scenario ran to its end.
///
/// Owns the run's temporary directory: `out_dir` is removed when this is dropped (unless
/// `LAZYPULL_KEEP_GUEST=1`).
#[derive(Debug)]
pub struct GuestRun {
    /// The scenario's exit status (128+N if killed by signal N).
    pub status: i32,
    /// Everything the guest wrote on its serial console (kernel and scenario), `\r` removed.
    pub console: String,
    /// Only the scenario's stdout and stderr.
    pub log: String,
    /// The output share as seen on the host: files the scenario wrote under `$LP_OUT`.
    /// Its `.lp/` subdirectory holds the control files (scenario, env, log, status).
    pub out_dir: PathBuf,
    /// Time from starting qemu to the scenario starting (host clock).
    pub boot_time: Option<Duration>,
    /// Time from starting qemu to qemu exiting.
    pub elapsed: Duration,
    work: Option<tempfile::TempDir>,
}

impl GuestRun {
    /// Reads a file the scenario wrote, `rel` being relative to `$LP_OUT`.
    pub fn read_out(&self, rel: impl AsRef<Path>) -> Result<String> {
        let path = self.out_dir.join(rel.as_ref());
        fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} written by the guest scenario\n{}",
                path.display(),
                self.describe()
            )
        })
    }

    /// Whether the scenario exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// Fails, quoting the scenario's log and console, unless the status is 0.
    pub fn ensure_success(&self) -> Result<()> {
        if self.success() {
            Ok(())
        } else {
            bail!(
                "guest scenario exited with status {}\n{}",
                self.status,
                self.describe()
            )
        }
    }

    fn describe(&self) -> String {
        format!(
            "--- scenario log ---\n{}--- last {} console lines ---\n{}",
            self.log,
            CONSOLE_TAIL_LINES,
            tail_lines(&self.console, CONSOLE_TAIL_LINES)
        )
    }
}

/// The error of a run that did not end in time (qemu has been killed and reaped).
#[derive(Debug, Clone)]
pub struct TimeoutError {
    /// The configured timeout.
    pub timeout: Duration,
    /// Whether the scenario had started.
    pub scenario_started: bool,
    /// The last [`CONSOLE_TAIL_LINES`] console lines.
    pub console_tail: String,
}

impl fmt::Display for TimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest timed out after {:?} ({}); qemu was killed\n--- last {} console lines ---\n{}",
            self.timeout,
            if self.scenario_started {
                "the scenario was running"
            } else {
                "the scenario had not started yet"
            },
            CONSOLE_TAIL_LINES,
            self.console_tail
        )
    }
}

impl std::error::Error for TimeoutError {}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    dir.canonicalize().unwrap_or(dir)
}

/// `guest/init.sh` of the workspace.
pub fn init_script() -> PathBuf {
    workspace_root().join("guest/init.sh")
}

/// A guest kernel `guest/build-kernel.sh` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSeries {
    /// Linux 6.12 with cachefiles on-demand mode and file-backed EROFS
    /// (`guest/kernel.config`).
    V6_12,
    /// Linux 6.1 as most nodes run it: EROFS with extra devices, FUSE and
    /// loop devices, no cachefiles on-demand mode, no file-backed EROFS
    /// (`guest/kernel-6.1.config`).
    V6_1,
}

impl KernelSeries {
    /// `6.12` or `6.1`: the argument of `guest/build-kernel.sh`.
    pub fn name(self) -> &'static str {
        match self {
            KernelSeries::V6_12 => "6.12",
            KernelSeries::V6_1 => "6.1",
        }
    }

    /// The variable that names a prebuilt bzImage of this series.
    pub fn override_env(self) -> &'static str {
        match self {
            KernelSeries::V6_12 => "LAZYPULL_GUEST_KERNEL",
            KernelSeries::V6_1 => "LAZYPULL_GUEST_KERNEL_6_1",
        }
    }
}

/// Returns the Linux 6.12 guest kernel's bzImage: [`kernel_of`] with
/// [`KernelSeries::V6_12`].
pub fn kernel() -> Result<PathBuf> {
    kernel_of(KernelSeries::V6_12)
}

/// Returns a guest kernel's bzImage, building it first if needed (`guest/build-kernel.sh`,
/// cached under `/var/cache/lazypull/kernel`; the first build takes several minutes, its
/// progress goes to stderr). `LAZYPULL_GUEST_KERNEL` (6.12) or `LAZYPULL_GUEST_KERNEL_6_1`
/// overrides the path. Concurrent callers, in this process or others, wait for one build.
pub fn kernel_of(series: KernelSeries) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(series.override_env()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{}={} is not a file", series.override_env(), path.display());
        }
        return Ok(path);
    }
    static BUILT: OnceLock<Mutex<Vec<(KernelSeries, PathBuf)>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(s, _)| *s == series) {
        if path.is_file() {
            return Ok(path.clone());
        }
    }
    let script = workspace_root().join("guest/build-kernel.sh");
    if !script.is_file() {
        bail!("guest kernel build script {} is missing", script.display());
    }
    let _lock = BuildLock::take();
    let output = Command::new("bash")
        .arg(&script)
        .arg(series.name())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running bash {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "building the {} guest kernel failed ({}): run `bash {} {}` by hand to see why. It \
             needs `apt-get install linux-source-{} build-essential flex bison bc libelf-dev \
             libssl-dev cpio`",
            series.name(),
            output.status,
            script.display(),
            series.name(),
            series.name()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{} printed no bzImage path", script.display()))?;
    if !path.is_file() {
        bail!(
            "{} printed {}, which is not a file",
            script.display(),
            path.display()
        );
    }
    built.push((series, path.clone()));
    Ok(path)
}

/// An exclusive `flock` on a file in the kernel cache, so that concurrent test processes
/// do not start two kernel builds. Best effort: without a writable cache, no lock.
struct BuildLock(Option<File>);

impl BuildLock {
    fn take() -> BuildLock {
        let cache = std::env::var_os("LAZYPULL_KERNEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/lazypull/kernel"));
        let file = fs::create_dir_all(&cache).ok().and_then(|_| {
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(cache.join(".lazypull-guest.lock"))
                .ok()
        });
        if let Some(f) = &file {
            // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        }
        BuildLock(file)
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// Fails unless running as root (the guest itself always runs the scenario as root; the
/// host needs root only to read root-only files through the 9p root share).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: run it as root (e.g. `sudo -E cargo test`)");
    }
    Ok(())
}

/// Checks that the host tools a run needs are installed, explaining what to install.
pub fn check_host() -> Result<()> {
    qemu_binary()?;
    find_tool("mkfs.ext4", "e2fsprogs")?;
    Ok(())
}

fn qemu_binary() -> Result<PathBuf> {
    if let Some(q) = std::env::var_os("LAZYPULL_QEMU") {
        return Ok(PathBuf::from(q));
    }
    find_tool("qemu-system-x86_64", "qemu-system-x86")
}

/// Finds `name` in `PATH` (and the sbin directories, which non-root `PATH`s often lack).
pub fn find_tool(name: &str, debian_package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/sbin"),
        PathBuf::from("/usr/bin"),
    ];
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or_else(|| {
            anyhow!(
                "`{name}` not found in PATH: install it with `apt-get install {debian_package}`"
            )
        })
}

/// Boots a guest that runs `script` (a host file; run directly, or by bash when it has no
/// `#!` line) and returns its status and output once it has exited and the guest is down.
///
/// Fails if qemu or mkfs.ext4 is missing, a disk cannot be made, qemu fails, the guest never
/// reaches the scenario (the error quotes the console), or the run exceeds `cfg.timeout`
/// (a [`TimeoutError`], after killing qemu). A scenario that fails is not an error: look at
/// [`GuestRun::status`].
pub fn run(script: &Path, cfg: &GuestConfig) -> Result<GuestRun> {
    let qemu = match &cfg.qemu {
        Some(q) => q.clone(),
        None => qemu_binary()?,
    };
    check_config(script, cfg)?;
    let init = init_script();
    match init.metadata() {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => bail!(
            "guest init {} is not an executable file (chmod +x it)",
            init.display()
        ),
        Err(e) => bail!("guest init {}: {e}", init.display()),
    }

    let keep = std::env::var(KEEP_ENV).map(|v| v == "1").unwrap_or(false);
    let work = tempfile::Builder::new()
        .prefix("lazypull-guest-")
        .tempdir()
        .context("creating the guest's temporary directory")?;
    if keep {
        eprintln!(
            "lazypull-guest: {KEEP_ENV}=1: keeping {}",
            work.path().display()
        );
    }
    let result = run_in(work.path(), &qemu, &init, script, cfg);
    match result {
        Ok(mut run) => {
            if !keep {
                run.work = Some(work);
            } else {
                let _ = work.keep();
            }
            Ok(run)
        }
        Err(e) => {
            if keep {
                let _ = work.keep();
            }
            Err(e)
        }
    }
}

fn check_config(script: &Path, cfg: &GuestConfig) -> Result<()> {
    if !script.is_file() {
        bail!("scenario script {} is not a file", script.display());
    }
    if !cfg.kernel.is_file() {
        bail!(
            "guest kernel {} is not a file (use lazypull_guest::kernel())",
            cfg.kernel.display()
        );
    }
    if cfg.cpus == 0 || cfg.memory_mib < 128 {
        bail!(
            "guest needs at least 1 CPU and 128 MiB (got {} CPUs, {} MiB)",
            cfg.cpus,
            cfg.memory_mib
        );
    }
    if cfg.disks.len() > 20 {
        bail!("at most 20 disks are supported");
    }
    if cfg.name.is_empty()
        || !cfg
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!(
            "guest name {:?} must be non-empty letters, digits, '-', '_'",
            cfg.name
        );
    }
    for arg in &cfg.kernel_args {
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '"') {
            bail!("kernel argument {arg:?} must be one word without quotes");
        }
    }
    for (name, value) in &cfg.env {
        if !valid_env_name(name) {
            bail!("guest environment variable name {name:?} is not a valid shell name");
        }
        if value.contains('\0') {
            bail!("guest environment variable {name} contains NUL");
        }
    }
    Ok(())
}

fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Escapes a value inside a qemu `-opt key=value,...` list.
fn qemu_escape(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))?;
    Ok(s.replace(',', ",,"))
}

/// The kernel command line for a guest whose PID 1 is `init`, ending with `extra`.
///
/// `root=<tag> rootfstype=9p` mounts the 9p share as root (recent kernels accept a non-block
/// root this way; verified with the 6.12 guest kernel); `panic=-1` turns any panic into a reboot, which ends qemu
/// (`-no-reboot`). The `LP_*=` words are unknown to the kernel, which hands them to init
/// as environment variables.
pub fn kernel_cmdline(init: &Path, extra: &[String]) -> Result<String> {
    let init = init
        .to_str()
        .filter(|s| !s.contains(char::is_whitespace) && !s.contains('"'))
        .ok_or_else(|| {
            anyhow!(
                "init path {} must be UTF-8 without spaces or quotes",
                init.display()
            )
        })?;
    let mut cmdline = format!(
        "console=ttyS0 loglevel=6 panic=-1 root={ROOT_TAG} rootfstype=9p rootflags={ROOT_FLAGS} \
         ro init={init} LP_OUT_TAG={OUT_TAG} LP_OUT_MNT={GUEST_OUT_DIR}"
    );
    for arg in extra {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    Ok(cmdline)
}

fn run_in(
    work: &Path,
    qemu: &Path,
    init: &Path,
    script: &Path,
    cfg: &GuestConfig,
) -> Result<GuestRun> {
    let out_dir = work.join("out");
    let ctl = out_dir.join(CTL_DIR);
    fs::create_dir_all(&ctl).with_context(|| format!("creating {}", ctl.display()))?;
    let scenario = ctl.join("scenario");
    fs::copy(script, &scenario)
        .with_context(|| format!("copying {} to {}", script.display(), scenario.display()))?;
    fs::set_permissions(&scenario, fs::Permissions::from_mode(0o755))?;
    let mut env = String::new();
    for (name, value) in &cfg.env {
        env.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    fs::write(ctl.join("env"), env)?;

    let mut disk_args = Vec::new();
    for (i, disk) in cfg.disks.iter().enumerate() {
        let (path, cache) = match disk {
            Disk::EmptyExt4 { size_mib } => {
                let img = work.join(format!("disk{i}.img"));
                make_ext4(&img, *size_mib, None)?;
                (img, "unsafe")
            }
            Disk::Ext4From { dir, extra_mib } => {
                let img = work.join(format!("disk{i}.img"));
                let size = ext4_size_for(dir)? + extra_mib;
                make_ext4(&img, size, Some(dir))?;
                (img, "unsafe")
            }
            Disk::Raw(path) => {
                if !path.is_file() {
                    bail!("raw disk image {} is not a file", path.display());
                }
                (path.clone(), "writeback")
            }
        };
        disk_args.push(format!(
            "file={},format=raw,if=virtio,cache={cache}",
            qemu_escape(&path)?
        ));
    }

    let console_path = work.join("console.log");
    let stderr_path = work.join("qemu.stderr");
    let mut cmd = Command::new(qemu);
    cmd.args(["-name", &cfg.name])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        // One CPU per socket: the kernel has no ACPI, so it finds CPUs in SeaBIOS's MP
        // table, which lists only one CPU per package.
        .args([
            "-smp",
            &format!("{n},sockets={n},cores=1,threads=1", n = cfg.cpus),
        ])
        .args(["-m", &cfg.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&cfg.kernel)
        .args(["-append", &kernel_cmdline(init, &cfg.kernel_args)?])
        .arg("-virtfs")
        .arg(format!(
            "local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag={OUT_TAG},security_model=none,multidevs=remap",
            qemu_escape(&out_dir)?
        ));
    for d in &disk_args {
        cmd.arg("-drive").arg(d);
    }
    if cfg.network {
        cmd.args([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0",
        ]);
    }
    cmd.stdin(Stdio::null())
        .stdout(File::create(&console_path)?)
        .stderr(File::create(&stderr_path)?);
    fs::write(work.join("qemu.cmd"), format!("{cmd:?}\n"))?;

    let started_marker = ctl.join("started");
    let start = Instant::now();
    let start_wall = std::time::SystemTime::now();
    let mut child = KillOnDrop(Some(cmd.spawn().with_context(|| {
        format!(
            "starting {} (install it with `apt-get install qemu-system-x86`)",
            qemu.display()
        )
    })?));
    let exit: ExitStatus = loop {
        if let Some(status) = child.get().try_wait()? {
            break status;
        }
        if start.elapsed() >= cfg.timeout {
            child.kill();
            let console = read_console(&console_path);
            return Err(TimeoutError {
                timeout: cfg.timeout,
                scenario_started: started_marker.exists(),
                console_tail: tail_lines(&console, CONSOLE_TAIL_LINES),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let elapsed = start.elapsed();
    child.0 = None;

    let console = read_console(&console_path);
    let qemu_stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let status_file = ctl.join("status");
    let context = || {
        format!(
            "--- qemu: {} ({}) ---\n{}--- last {} console lines ---\n{}",
            qemu.display(),
            exit,
            qemu_stderr,
            CONSOLE_TAIL_LINES,
            tail_lines(&console, CONSOLE_TAIL_LINES)
        )
    };
    if !status_file.exists() {
        if started_marker.exists() {
            bail!(
                "the guest went down before the scenario finished (no exit status)\n{}",
                context()
            );
        }
        bail!("the guest never reached the scenario\n{}", context());
    }
    let status_text = fs::read_to_string(&status_file)?;
    let status: i32 = status_text.trim().parse().map_err(|_| {
        anyhow!(
            "unreadable scenario status {:?}\n{}",
            status_text,
            context()
        )
    })?;
    let log = fs::read(ctl.join("log"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    // The marker's mtime comes from the host clock (qemu wrote it), so it is exact even when
    // the scenario started and ended between two polls.
    let boot_time = fs::metadata(&started_marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| at.duration_since(start_wall).ok());
    Ok(GuestRun {
        status,
        console,
        log,
        out_dir,
        boot_time,
        elapsed,
        work: None,
    })
}

/// Kills (SIGKILL) and reaps the child on drop, so no qemu outlives its run.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already gone")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_console(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes).replace('\r', "")
}

/// The last `n` lines of `s`.
pub fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(n);
    let mut out = lines[from..].join("\n");
    out.push('\n');
    out
}

const MIB: u64 = 1 << 20;

/// Size in MiB for an ext4 filesystem holding a copy of `dir`, with a little room to spare.
fn ext4_size_for(dir: &Path) -> Result<u64> {
    fn walk(dir: &Path, bytes: &mut u64, entries: &mut u64) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            *entries += 1;
            // Every entry costs at least a block (directory, symlink, file tail).
            *bytes += meta.len().div_ceil(4096).max(1) * 4096;
            if meta.is_dir() {
                walk(&entry.path(), bytes, entries)?;
            }
        }
        Ok(())
    }
    if !dir.is_dir() {
        bail!("Ext4From: {} is not a directory", dir.display());
    }
    let (mut bytes, mut entries) = (0u64, 0u64);
    walk(dir, &mut bytes, &mut entries)?;
    // Data plus 25%, and enough inodes at the default ratio of one per 16 KiB, plus room
    // for the journal and metadata.
    let need = (bytes + bytes / 4).max(entries * 16384 * 3 / 2);
    Ok(need.div_ceil(MIB) + 32)
}

/// Makes a sparse `size_mib` image at `img` with an ext4 filesystem, filled from `from`.
fn make_ext4(img: &Path, size_mib: u64, from: Option<&Path>) -> Result<()> {
    let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
    let size_mib = size_mib.max(8);
    File::create(img)
        .and_then(|f| f.set_len(size_mib * MIB))
        .with_context(|| format!("creating {}", img.display()))?;
    let mut cmd = Command::new(&mkfs);
    // `-T default` keeps 4 KiB blocks and 256-byte inodes even for small images.
    cmd.args(["-q", "-F", "-T", "default"]);
    if let Some(dir) = from {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(img);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", mkfs.display()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Writes `contents` to a new executable file `path` (for scenario scripts made by tests).
pub fn write_script(path: &Path, contents: &str) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(qemu_escape(Path::new("/a,b")).unwrap(), "/a,,b");
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("FOO_1"));
        assert!(valid_env_name("_x"));
        assert!(!valid_env_name("1A"));
        assert!(!valid_env_name("a.b"));
        assert!(!valid_env_name(""));
    }

    #[test]
    fn tail() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail_lines("a", 5), "a\n");
    }

    #[test]
    fn cmdline_has_root_and_init() {
        let c = kernel_cmdline(Path::new("/x/init.sh"), &["loglevel=8".to_string()]).unwrap();
        assert!(c.contains("rootfstype=9p"));
        assert!(c.contains("init=/x/init.sh"));
        assert!(c.ends_with(" loglevel=8"));
        assert!(kernel_cmdline(Path::new("/x y/init.sh"), &[]).is_err());
    }
}
