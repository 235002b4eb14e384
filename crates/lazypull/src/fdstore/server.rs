//! The store itself (`lazypull fdstore`): one connection at a time, holding
//! every fd it was given until told to drop it or to exit.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rustix::net::SocketAddrUnix;
use tracing::{info, warn};

use super::client::Client;
use super::wire::{recv, send, seqpacket, Op, Reply, MAX_FDS};

/// Runs the store on `socket` until told to exit.
pub fn serve(socket: &Path) -> anyhow::Result<()> {
    serve_on(listen(socket)?, socket)
}

/// Runs the store on the listening socket it was started with as its stdin
/// (bound at `socket` by the daemon that started it, see
/// `Client::connect_or_spawn`): the daemon need not wait for this process to
/// bind before it goes on, since connections queue in the listener's backlog
/// until the store accepts them.
pub fn serve_inherited(socket: &Path) -> anyhow::Result<()> {
    let listener = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("taking the inherited listener (stdin)")?;
    match rustix::net::sockopt::socket_acceptconn(&listener) {
        Ok(true) => {}
        _ => bail!(
            "--inherit-listener: stdin is not a listening socket (the daemon starts the \
             store this way; to run one by hand, leave the flag out)"
        ),
    }
    serve_on(listener, socket)
}

/// Binds and listens on `socket` (mode 0600, in a directory made root's
/// only), unless a store already answers there; a stale socket is replaced.
pub(super) fn listen(socket: &Path) -> anyhow::Result<OwnedFd> {
    if let Some(dir) = socket.parent() {
        // Created root's only; one that exists is left as it is: the socket
        // itself is 0600.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if Client::connect(socket).is_ok() {
        bail!("an fd store already answers on {}", socket.display());
    }
    let _ = std::fs::remove_file(socket);
    let listener = seqpacket()?;
    rustix::net::bind(&listener, &SocketAddrUnix::new(socket)?)
        .with_context(|| format!("binding {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    rustix::net::listen(&listener, 16)?;
    Ok(listener)
}

fn serve_on(listener: OwnedFd, socket: &Path) -> anyhow::Result<()> {
    info!(socket = %socket.display(), pid = std::process::id(), "fd store ready");
    let mut entries: Vec<(String, bool, OwnedFd)> = Vec::new();
    loop {
        let conn = match rustix::net::accept(&listener) {
            Ok(c) => c,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e).context("accepting on the fd store socket"),
        };
        let _ = rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(10)),
        );
        loop {
            let (op, fds) = match recv::<Op>(conn.as_fd()) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    warn!("fd store: bad request: {e}");
                    break;
                }
            };
            let ok = |names: Vec<String>, more: bool| Reply {
                ok: true,
                names,
                more,
                ..Reply::default()
            };
            let result = match op {
                Op::Put { name, keep } => match fds.into_iter().next() {
                    Some(fd) => {
                        entries.retain(|(n, _, _)| *n != name);
                        info!(%name, keep, "fd store: holding an fd");
                        entries.push((name, keep, fd));
                        send(conn.as_fd(), &ok(vec![], false), &[])
                    }
                    None => send(
                        conn.as_fd(),
                        &Reply {
                            error: Some("put without an fd".into()),
                            ..Reply::default()
                        },
                        &[],
                    ),
                },
                Op::Get => {
                    let mut result = Ok(());
                    let chunks: Vec<_> = entries.chunks(MAX_FDS).collect();
                    let n = chunks.len().max(1);
                    for i in 0..n {
                        let chunk = chunks.get(i).copied().unwrap_or(&[]);
                        let names = chunk.iter().map(|(n, _, _)| n.clone()).collect();
                        let fds: Vec<_> = chunk.iter().map(|(_, _, fd)| fd.as_fd()).collect();
                        result = send(conn.as_fd(), &ok(names, i + 1 < n), &fds);
                        if result.is_err() {
                            break;
                        }
                    }
                    if result.is_ok() {
                        entries.retain(|(_, keep, _)| *keep);
                    }
                    result
                }
                Op::Remove { names } => {
                    entries.retain(|(n, _, _)| !names.contains(n));
                    send(conn.as_fd(), &ok(vec![], false), &[])
                }
                Op::Exit => {
                    // The socket goes before the reply: whoever hears it
                    // finds no store there any more.
                    let _ = std::fs::remove_file(socket);
                    let _ = send(conn.as_fd(), &ok(vec![], false), &[]);
                    info!(
                        fds = entries.len(),
                        "fd store: closing every fd and exiting"
                    );
                    return Ok(());
                }
            };
            if let Err(e) = result {
                warn!("fd store: replying failed: {e}");
                break;
            }
        }
    }
}
