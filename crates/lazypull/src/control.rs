//! The daemon's control socket: newline-delimited JSON requests and replies
//! over a Unix socket (root only), used by `lazypull mount` / `umount` /
//! `status`. One request per line; each gets one reply line
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::catalog::RegisterRequest;

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/lazypull/lazypull.sock";

/// What to fetch ahead of need after a mount.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchSpec {
    /// Every data blob of the image, in device order (after `paths`).
    #[serde(default)]
    pub all: bool,
    /// Files (absolute paths inside the image), in priority order.
    #[serde(default)]
    pub paths: Vec<String>,
}

impl PrefetchSpec {
    pub fn is_empty(&self) -> bool {
        !self.all && self.paths.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Fetch an image's manifest, config, meta blob and chunk tables and serve it.
    Register(RegisterRequest),
    /// The image with this fsid is now mounted at `mountpoint`.
    Mounted {
        fsid: String,
        mountpoint: PathBuf,
        #[serde(default)]
        prefetch: PrefetchSpec,
    },
    /// Whatever was mounted at `mountpoint` is gone.
    Unmounted { mountpoint: PathBuf },
    /// Counters, images and open objects.
    Status,
    /// Stop serving and leave the mounts to a successor (`lazypull daemon
    /// --takeover`): the reply comes once everything is parked.
    Handover,
    /// Stop for good: unbind the cache / unmount the blob files.
    Shutdown,
}

/// How to mount a registered image: `mount -t FSTYPE -o OPTIONS SOURCE DIR`,
/// done with mount(2) by whoever asked (in their mount namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    pub source: String,
    pub fstype: String,
    pub options: String,
    /// Whether an EROFS `domain_id` may be added (cachefiles only).
    pub domain: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn from_result(r: anyhow::Result<serde_json::Value>) -> Reply {
        match r {
            Ok(v) => Reply {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Reply {
                ok: false,
                result: None,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

/// Sends one request to the daemon at `socket` and returns its result.
pub fn call(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the lazypull daemon at {}: is `lazypull daemon` running (and is this the socket it was given)?",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .context("sending the request to the daemon")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("waiting for the daemon's reply (timeout {timeout:?})"))?;
    if reply.is_empty() {
        anyhow::bail!("the daemon closed the control connection without replying");
    }
    let reply: Reply = serde_json::from_str(&reply).context("the daemon's reply is not valid")?;
    match (reply.ok, reply.error) {
        (true, _) => Ok(reply.result.unwrap_or(serde_json::Value::Null)),
        (false, Some(e)) => Err(anyhow::anyhow!("the daemon refused: {e}")),
        (false, None) => Err(anyhow::anyhow!("the daemon refused without saying why")),
    }
}

/// Whether process `pid` still runs (a zombie, exited but not yet reaped by
/// its parent, counts as gone).
pub fn process_running(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `limit` for process `pid` to exit.
pub fn wait_for_exit(pid: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while process_running(pid) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the daemon (pid {pid}) did not exit within {limit:?} of handing over");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Binds the control socket at `path` (mode 0600), replacing a stale socket
/// file but refusing to steal one a live daemon answers on.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another lazypull daemon is listening on {}; stop it or pass --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_a_tagged_json_form() {
        let r = Request::Mounted {
            fsid: "ab".into(),
            mountpoint: "/mnt".into(),
            prefetch: PrefetchSpec {
                all: true,
                paths: vec!["/etc/os-release".into()],
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"op":"mounted""#), "{text}");
        let back: Request = serde_json::from_str(&text).unwrap();
        assert!(matches!(back, Request::Mounted { prefetch, .. } if prefetch.all));
        let reg: Request =
            serde_json::from_str(r#"{"op":"register","reference":"h:1/r:t"}"#).unwrap();
        assert!(matches!(reg, Request::Register(r) if !r.insecure && r.username.is_none()));
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn zombies_count_as_exited() {
        assert!(process_running(u64::from(std::process::id())));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = u64::from(child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process_running(pid) {
            assert!(std::time::Instant::now() < deadline, "true never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "a zombie until reaped"
        );
        child.wait().unwrap();
        assert!(!process_running(pid));
    }

    #[test]
    fn an_absent_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(
            &dir.path().join("none.sock"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("is `lazypull daemon` running"),
            "{err:#}"
        );
    }
}
