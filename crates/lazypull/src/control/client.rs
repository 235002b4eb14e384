//! The client side of the control socket: sending one request to the daemon
//! and waiting for its reply, and waiting for a daemon process to be gone.
//! Blocking (std sockets); used by the command front ends and by a daemon
//! taking over from another. It must not interpret results beyond the
//! reply's `ok`/`error`; the wire form is `control::protocol`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::protocol::{Reply, Request};

/// Sends one request to the daemon at `socket` and returns its result.
pub(crate) fn call(
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
pub(crate) fn process_running(pid: u64) -> bool {
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
pub(crate) fn wait_for_exit(pid: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while process_running(pid) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the daemon (pid {pid}) did not exit within {limit:?} of handing over");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
