//! A real containerd for tests: Debian's `containerd` (1.6) started with its
//! root, state, gRPC and ttrpc sockets in a directory, optionally with proxy
//! snapshotters (`[proxy_plugins.NAME]`, `type = "snapshot"`) and with or
//! without the CRI plugin ([`ContainerdOptions::cri`], [`CriSettings`]: the
//! sandbox image, plain-HTTP registries, the snapshotter), run with
//! Debian's `runc`, and stopped when dropped.
//!
//! There is no systemd here: the test owns the daemon. Dropping a
//! [`Containerd`] kills what is left of its containers (tasks, shims), stops
//! the daemon and waits for it, undoes every mount under its directory and
//! removes what it created there, also when the test failed half-way. Left
//! behind, as after any containerd: its fixed run-time directories
//! (`/run/containerd/{fifo,runc,s}`, empty) and the namespace's parent
//! cgroups (`default`, empty). A test process killed outright (no unwinding)
//! gets its containerd stopped by a watchdog, but not its shims.
//!
//! A missing binary is an error that names the Debian package: tests using
//! this fail loudly rather than skip.

use lazypull_snapshotter::lazy::unescape_mountinfo;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `PATH` containerd runs with: it finds `containerd-shim-runc-v2`,
/// the shim `runc` (Debian puts runc in /usr/sbin), whatever the test's own
/// `PATH` is.
const DAEMON_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Plugins never needed here: they would only probe for kernel modules or
/// file systems at start. The CRI plugin is disabled unless asked for
/// ([`ContainerdOptions::cri`]).
const ALWAYS_DISABLED: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// What [`Containerd::start`] configures.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// Proxy snapshotters: `[proxy_plugins.NAME]` with `type = "snapshot"`
    /// and `address` the unix socket. containerd dials lazily, so the
    /// socket need not exist yet when containerd starts.
    pub proxy_snapshotters: Vec<(String, PathBuf)>,
    /// Keep the CRI plugin (off by default: it starts slower and complains
    /// about the missing CNI configuration). Its CNI directories are empty
    /// ones in the daemon's directory (`cni/bin`, `cni/net.d`), never the
    /// host's: host-network pods need none.
    pub cri: bool,
    /// Settings of the CRI plugin; `Some` keeps the plugin as [`cri`](Self::cri)
    /// does.
    pub cri_settings: Option<CriSettings>,
    /// Further config files, as the config's `imports = [...]` (they
    /// override the generated file's fields, as in containerd).
    pub imports: Vec<PathBuf>,
}

/// What the CRI plugin (`[plugins."io.containerd.grpc.v1.cri"]`) is set to
/// beyond containerd's defaults. An import ([`ContainerdOptions::imports`])
/// with a CRI section replaces the whole generated section (containerd
/// merges imported plugin sections whole), these settings included.
#[derive(Debug, Clone, Default)]
pub struct CriSettings {
    /// `sandbox_image`: the pod sandbox ("pause") image, pulled by the CRI
    /// plugin when a pod starts (e.g. [`crate::cri::sandbox_image`] pushed to
    /// the test registry).
    pub sandbox_image: Option<String>,
    /// Registries (`host:port`) reached over plain HTTP: a `hosts.toml` each
    /// under `certs.d/<host:port>/` in the daemon's directory, which becomes
    /// the registry `config_path`.
    pub plain_http_registries: Vec<String>,
    /// `[...containerd] snapshotter`: the snapshotter the CRI plugin
    /// unpacks images and makes container snapshots with (containerd's
    /// default: `overlayfs`).
    pub snapshotter: Option<String>,
    /// `disable_snapshot_annotations = false`: the CRI plugin passes the
    /// image's layer annotations, and `containerd.io/snapshot/cri.image-ref`
    /// and `...cri.layer-digest`, to the snapshotter (remote snapshotters
    /// need them; containerd's default is off).
    pub snapshot_annotations: bool,
    /// `restrict_oom_score_adj = true`: containers get no lower
    /// `oom_score_adj` than containerd's own. Needed where root lacks
    /// `CAP_SYS_RESOURCE` (runc then cannot give a pod sandbox the -998 the
    /// CRI plugin asks for, and fails with "can't get final child's PID
    /// from pipe").
    pub restrict_oom_score_adj: bool,
}

/// The `hosts.toml` making `host` (`host:port`) a plain-HTTP registry
/// with pull and resolve capabilities.
pub fn plain_http_hosts_toml(host: &str) -> String {
    let url = toml_string(&format!("http://{host}"));
    format!(
        "# Written by lazypull-testkit: {host} over plain HTTP.\n\
         server = {url}\n\
         \n\
         [host.{url}]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// The `hosts.toml` of plain-HTTP registry `upstream` (`host:port`) that
/// declares `mirror` (`host:port`, plain HTTP) before it, with pull and
/// resolve capabilities, as for a pull-through cache.
pub fn mirror_hosts_toml(upstream: &str, mirror: &str) -> String {
    format!(
        "server = {}\n\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        toml_string(&format!("http://{upstream}")),
        toml_string(&format!("http://{mirror}"))
    )
}

/// The CRI plugin's section of the config for a daemon living in `dir`.
fn cri_section(dir: &Path, settings: Option<&CriSettings>) -> io::Result<String> {
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\"]";
    let mut text = format!("\n  {cri}\n");
    let default = CriSettings::default();
    let settings = settings.unwrap_or(&default);
    if settings.restrict_oom_score_adj {
        text.push_str("    restrict_oom_score_adj = true\n");
    }
    if let Some(image) = &settings.sandbox_image {
        text.push_str(&format!("    sandbox_image = {}\n", toml_string(image)));
    }
    let cri = &cri[..cri.len() - 1];
    text.push_str(&format!(
        "    {cri}.cni]\n      bin_dir = {}\n      conf_dir = {}\n",
        toml_path(&dir.join("cni/bin"))?,
        toml_path(&dir.join("cni/net.d"))?
    ));
    text.push_str(&format!("    {cri}.containerd]\n"));
    if let Some(snapshotter) = &settings.snapshotter {
        text.push_str(&format!(
            "      snapshotter = {}\n",
            toml_string(snapshotter)
        ));
    }
    text.push_str(&format!(
        "      disable_snapshot_annotations = {}\n",
        !settings.snapshot_annotations
    ));
    if !settings.plain_http_registries.is_empty() {
        text.push_str(&format!(
            "    {cri}.registry]\n      config_path = {}\n",
            toml_path(&dir.join("certs.d"))?
        ));
    }
    Ok(text)
}

/// A running containerd.
pub struct Containerd {
    child: Option<Child>,
    ctr: PathBuf,
    dir: PathBuf,
    address: PathBuf,
    config: PathBuf,
    log: PathBuf,
    namespace: String,
}

/// A containerd namespace no other [`Containerd`] of any process uses.
///
/// runc keeps its state under `/run/containerd/runc/<namespace>/<container
/// id>` whatever containerd's `root` and `state` say, so two test
/// containerds running containers of the same id in the same namespace at
/// once clobber each other's runc state ("unable to store init state").
fn unique_namespace() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "lp{}n{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The absolute path of `binary` (in /usr/bin, /usr/sbin, /usr/local/...),
/// or an error naming the Debian `package` to install.
pub fn find(binary: &str, package: &str) -> io::Result<PathBuf> {
    for dir in [
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/bin",
        "/sbin",
    ] {
        let p = Path::new(dir).join(binary);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{binary} is not installed: run scripts/setup.sh (apt-get install {package})"),
    ))
}

/// A TOML basic string holding `s` (quotes, backslashes and control
/// characters escaped).
pub fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> io::Result<String> {
    let s = p.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not UTF-8", p.display()),
        )
    })?;
    Ok(toml_string(s))
}

/// The containerd config (version 2) for a daemon living in `dir`.
pub fn config_text(dir: &Path, opts: &ContainerdOptions) -> io::Result<String> {
    let mut disabled: Vec<String> = ALWAYS_DISABLED.iter().map(|s| toml_string(s)).collect();
    let cri = opts.cri || opts.cri_settings.is_some();
    if !cri {
        disabled.push(toml_string("io.containerd.grpc.v1.cri"));
    }
    let imports = opts
        .imports
        .iter()
        .map(|p| toml_path(p))
        .collect::<io::Result<Vec<_>>>()?;
    let mut text = format!(
        "# Written by lazypull-testkit for one test's containerd.\n\
         version = 2\n\
         root = {root}\n\
         state = {state}\n\
         imports = [{imports}]\n\
         disabled_plugins = [{disabled}]\n\
         \n\
         [grpc]\n  address = {grpc}\n\
         \n\
         [ttrpc]\n  address = {ttrpc}\n\
         \n\
         [debug]\n  level = \"debug\"\n\
         \n\
         [plugins]\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = {opt}\n",
        root = toml_path(&dir.join("root"))?,
        state = toml_path(&dir.join("state"))?,
        imports = imports.join(", "),
        disabled = disabled.join(", "),
        grpc = toml_path(&dir.join("containerd.sock"))?,
        ttrpc = toml_path(&dir.join("containerd.sock.ttrpc"))?,
        opt = toml_path(&dir.join("opt"))?,
    );
    if cri {
        text.push_str(&cri_section(dir, opts.cri_settings.as_ref())?);
    }
    if !opts.proxy_snapshotters.is_empty() {
        text.push_str("\n[proxy_plugins]\n");
        for (name, socket) in &opts.proxy_snapshotters {
            text.push_str(&format!(
                "  [proxy_plugins.{}]\n    type = \"snapshot\"\n    address = {}\n",
                toml_string(name),
                toml_path(socket)?
            ));
        }
    }
    Ok(text)
}

/// Writes the config for `dir` to `dir/config.toml` and returns its path.
fn write_config(dir: &Path, opts: &ContainerdOptions) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    if opts.cri || opts.cri_settings.is_some() {
        std::fs::create_dir_all(dir.join("cni/bin"))?;
        std::fs::create_dir_all(dir.join("cni/net.d"))?;
    }
    for host in opts
        .cri_settings
        .iter()
        .flat_map(|s| s.plain_http_registries.iter())
    {
        if host.is_empty() || host.contains(['/', '\\']) || host.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("registry {host:?} is not a host:port"),
            ));
        }
        let hosts = dir.join("certs.d").join(host);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(hosts.join("hosts.toml"), plain_http_hosts_toml(host))?;
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, config_text(dir, opts)?)?;
    Ok(path)
}

/// `containerd --config <generated> config dump`: the configuration
/// containerd makes of the generated file and its imports (every field,
/// defaults filled in), without starting a daemon. containerd refuses a
/// config it cannot parse, and that error is returned.
pub fn config_dump(dir: &Path, opts: &ContainerdOptions) -> io::Result<String> {
    let binary = find("containerd", "containerd")?;
    let config = write_config(dir, opts)?;
    let out = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .args(["config", "dump"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "containerd config dump of {} failed ({}): {}",
            config.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    String::from_utf8(out.stdout)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

impl Containerd {
    /// Starts containerd with everything in `dir` (created if missing):
    /// `root/`, `state/`, `opt/`, `containerd.sock` (+ `.ttrpc`),
    /// `config.toml`, and `containerd.log` (its debug log). Returns once it
    /// answers `ctr version`.
    pub fn start(dir: &Path, opts: &ContainerdOptions) -> io::Result<Containerd> {
        let binary = find("containerd", "containerd")?;
        let ctr = find("ctr", "containerd")?;
        find("containerd-shim-runc-v2", "containerd")?;
        find("runc", "runc")?;
        let dir = std::path::absolute(dir)?;
        let address = dir.join("containerd.sock");
        // sockaddr_un holds 108 bytes, terminator included.
        if address.as_os_str().len() > 100 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "containerd socket path too long for a unix socket: {}",
                    address.display()
                ),
            ));
        }
        let config = write_config(&dir, opts)?;
        let log = dir.join("containerd.log");
        let logfile = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .env("PATH", DAEMON_PATH)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile)
            .spawn()?;
        let mut server = Containerd {
            child: Some(child),
            ctr,
            dir,
            address,
            config,
            log,
            namespace: unique_namespace(),
        };
        // A daemon kept in a test's static fixture is never dropped: a
        // watchdog ends it when this process ends, whichever way.
        if let Some(child) = &server.child {
            Command::new("sh")
                .args([
                    "-c",
                    "while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill \"$1\" 2>/dev/null",
                ])
                .arg(std::process::id().to_string())
                .arg(child.id().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
        }
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!(
                        "containerd exited with {status} during start; its log ({}) ends:\n{}",
                        self.log.display(),
                        self.log_tail(20)
                    )));
                }
            }
            if self.address.exists() {
                let out = self.ctr_raw(&["--timeout", "5s", "version"])?;
                if out.status.success() {
                    return Ok(());
                }
                last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "containerd did not answer `ctr version` within {limit:?} (last: {last}); its log ends:\n{}",
                self.log_tail(20)
            ),
        ))
    }

    /// The gRPC socket (`ctr --address`).
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The containerd namespace every [`Containerd::ctr`] call uses (unique
    /// to this instance: see [`unique_namespace`]). Other clients of this
    /// containerd (`lazypull pull --namespace`) must use it too.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// containerd's log (debug level).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ctr);
        // The namespace by environment, not `--namespace`, so that a
        // caller's own `-n NS` still wins over it (given both flags, ctr
        // does not take the caller's).
        cmd.arg("--address")
            .arg(&self.address)
            .env("CONTAINERD_NAMESPACE", &self.namespace)
            .args(args)
            .env("PATH", DAEMON_PATH)
            .stdin(Stdio::null());
        cmd
    }

    /// `ctr --address <socket> ARGS...`, not started: for a caller that
    /// reads its output as it comes (a benchmark timing the first line).
    pub fn ctr_unstarted(&self, args: &[&str]) -> Command {
        self.ctr_command(args)
    }

    /// `ctr --address <socket> ARGS...`, whatever its exit status.
    pub fn ctr_raw(&self, args: &[&str]) -> io::Result<Output> {
        self.ctr_command(args).output().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run ctr (apt-get install containerd): {e}"),
            )
        })
    }

    /// `ctr --address <socket> ARGS...`; an exit status other than 0 is an
    /// error holding ctr's output and the tail of containerd's log.
    pub fn ctr(&self, args: &[&str]) -> io::Result<Output> {
        let out = self.ctr_raw(args)?;
        if out.status.success() {
            return Ok(out);
        }
        Err(io::Error::other(format!(
            "ctr {} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd's log ({}) ends:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log.display(),
            self.log_tail(25)
        )))
    }

    /// [`ctr`](Self::ctr)'s standard output as text.
    pub fn ctr_stdout(&self, args: &[&str]) -> io::Result<String> {
        let out = self.ctr(args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills and deletes every task and container of every namespace
    /// (best effort, bounded in time).
    fn remove_containers(&self) {
        let lines = |args: &[&str]| -> Vec<String> {
            match self.ctr_raw(args) {
                Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect(),
                _ => Vec::new(),
            }
        };
        for ns in lines(&["--timeout", "5s", "namespaces", "ls", "-q"]) {
            let n = ns.as_str();
            for task in lines(&["--timeout", "5s", "-n", n, "tasks", "ls", "-q"]) {
                let t = task.as_str();
                let _ = self.ctr_raw(&[
                    "--timeout",
                    "5s",
                    "-n",
                    n,
                    "tasks",
                    "kill",
                    "-a",
                    "-s",
                    "SIGKILL",
                    t,
                ]);
                let _ = self.ctr_raw(&["--timeout", "10s", "-n", n, "tasks", "delete", "-f", t]);
            }
            for c in lines(&["--timeout", "5s", "-n", n, "containers", "ls", "-q"]) {
                let _ = self.ctr_raw(&["--timeout", "5s", "-n", n, "containers", "delete", &c]);
            }
        }
    }

    /// Stops the daemon: SIGTERM, up to 5 s, then SIGKILL; always reaped.
    fn stop_daemon(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Processes (not this one, not zombies) whose command line mentions
/// `needle`: the shims of a containerd started by this module are given its
/// socket path.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let me = std::process::id() as i32;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || process_gone(pid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether process `pid` has ended: no such process, or a zombie (its
/// parent, perhaps init, not yet having reaped it).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => true,
    }
}

/// Mount points at or below `dir`, deepest (last mounted) first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.reverse();
    out
}

/// Detaches every mount at or below `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let running = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)));
        if running {
            self.remove_containers();
        }
        self.stop_daemon();
        // Shims outlive containerd; they were given its socket path.
        let needle = self.address.to_string_lossy().into_owned();
        let start = Instant::now();
        loop {
            let pids = processes_mentioning(&needle);
            if pids.is_empty() || start.elapsed() > Duration::from_secs(5) {
                break;
            }
            for pid in pids {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unmount_under(&self.dir);
        for sub in ["root", "state", "opt"] {
            let _ = std::fs::remove_dir_all(self.dir.join(sub));
        }
        let _ = std::fs::remove_file(&self.address);
        let _ = std::fs::remove_file(self.address.with_extension("sock.ttrpc"));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The chain ids of a layer stack (OCI image spec) from its diff ids:
/// containerd's names for the committed snapshots.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {d}").as_bytes()))
            ),
        };
        out.push(id);
    }
    out
}

/// `ctr snapshots ls` rows of `snapshotter`: (key, parent, kind), sorted.
/// Panics naming the output if `ctr` fails or prints an unexpected row.
pub fn snapshot_rows(ctr: &Containerd, snapshotter: &str) -> Vec<(String, String, String)> {
    let text = ctr
        .ctr_stdout(&["snapshots", "--snapshotter", snapshotter, "ls"])
        .unwrap();
    let mut rows: Vec<(String, String, String)> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.as_slice() {
                [key, kind] => (key.to_string(), String::new(), kind.to_string()),
                [key, parent, kind] => (key.to_string(), parent.to_string(), kind.to_string()),
                _ => panic!("unexpected `ctr snapshots ls` row {l:?} in:\n{text}"),
            }
        })
        .collect();
    rows.sort();
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_quoted_and_escaped() {
        assert_eq!(toml_string(""), "\"\"");
        assert_eq!(toml_string("/a/b"), "\"/a/b\"");
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(toml_string("a\nb"), "\"a\\u000ab\"");
    }

    #[test]
    fn a_mirror_hosts_toml_puts_the_mirror_before_the_upstream() {
        let text = mirror_hosts_toml("127.0.0.1:5000", "127.0.0.1:5001");
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(doc["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert_eq!(
            doc["host"]["http://127.0.0.1:5001"]["capabilities"],
            toml::Value::Array(vec!["pull".into(), "resolve".into()])
        );
    }

    #[test]
    fn config_quotes_paths_and_lists_proxies() {
        let opts = ContainerdOptions {
            proxy_snapshotters: vec![("lazypull".into(), PathBuf::from("/tmp/a \"b\"/s.sock"))],
            cri: false,
            cri_settings: None,
            imports: vec![PathBuf::from("/etc/x.toml")],
        };
        let text = config_text(Path::new("/tmp/d"), &opts).unwrap();
        assert!(text.contains("root = \"/tmp/d/root\""), "{text}");
        assert!(text.contains("[proxy_plugins.\"lazypull\"]"), "{text}");
        assert!(
            text.contains("address = \"/tmp/a \\\"b\\\"/s.sock\""),
            "{text}"
        );
        assert!(text.contains("\"io.containerd.grpc.v1.cri\""), "{text}");
        assert!(text.contains("imports = [\"/etc/x.toml\"]"), "{text}");
        let cri = ContainerdOptions {
            cri: true,
            ..ContainerdOptions::default()
        };
        let text = config_text(Path::new("/tmp/d"), &cri).unwrap();
        let disabled = text
            .lines()
            .find(|l| l.starts_with("disabled_plugins"))
            .unwrap();
        assert!(!disabled.contains("grpc.v1.cri"), "{text}");
        assert!(text.contains("conf_dir = \"/tmp/d/cni/net.d\""), "{text}");
        assert!(!text.contains("sandbox_image"), "{text}");
    }

    /// What containerd makes of the CRI settings: every one lands where the
    /// CRI plugin reads it (a misplaced key would leave the default).
    #[test]
    fn cri_settings_reach_containerd() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ContainerdOptions {
            cri_settings: Some(CriSettings {
                sandbox_image: Some("127.0.0.1:5000/pause:1".into()),
                plain_http_registries: vec!["127.0.0.1:5000".into()],
                snapshotter: Some("lazypull".into()),
                snapshot_annotations: true,
                restrict_oom_score_adj: true,
            }),
            ..ContainerdOptions::default()
        };
        let dir = tmp.path();
        let dump = config_dump(dir, &opts).unwrap();
        let p = |s: &Path| s.to_str().unwrap().to_string();
        for want in [
            "sandbox_image = \"127.0.0.1:5000/pause:1\"".to_string(),
            "snapshotter = \"lazypull\"".to_string(),
            "disable_snapshot_annotations = false".to_string(),
            "restrict_oom_score_adj = true".to_string(),
            format!("config_path = \"{}\"", p(&dir.join("certs.d"))),
            format!("conf_dir = \"{}\"", p(&dir.join("cni/net.d"))),
            format!("bin_dir = \"{}\"", p(&dir.join("cni/bin"))),
        ] {
            assert!(dump.contains(&want), "{want} not in:\n{dump}");
        }
        let hosts = std::fs::read_to_string(dir.join("certs.d/127.0.0.1:5000/hosts.toml")).unwrap();
        assert!(
            hosts.contains("server = \"http://127.0.0.1:5000\""),
            "{hosts}"
        );
        assert!(
            hosts.contains(
                "[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]"
            ),
            "{hosts}"
        );
        let bad = ContainerdOptions {
            cri_settings: Some(CriSettings {
                plain_http_registries: vec!["../x".into()],
                ..CriSettings::default()
            }),
            ..ContainerdOptions::default()
        };
        let e = config_dump(&dir.join("bad"), &bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }

    #[test]
    fn missing_binary_names_the_package() {
        let e = find("lazypull-no-such-tool", "some-package").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(
            e.to_string().contains("apt-get install some-package"),
            "{e}"
        );
        assert!(find("sh", "dash").unwrap().is_absolute());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain\\04"), "/plain\\04");
    }
}
