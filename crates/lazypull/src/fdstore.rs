//! The fd store: a tiny long-lived process (`lazypull fdstore`) that holds the
//! kernel connections — the cachefiles device fd, the FUSE connection fd — so
//! that they outlive the daemon.
//!
//! Why: closing the last fd of `/dev/cachefiles` unbinds the cache and every
//! mount served through it fails with EIO; closing the last fd of a FUSE
//! connection aborts it. With a dup of each kept here, a daemon that dies
//! (even by SIGKILL) leaves the mounts waiting rather than broken, and the
//! next daemon takes the fds back, writes `restore` (cachefiles) or sends
//! `FUSE_NOTIFY_RESEND` (FUSE), and the waiting readers carry on. A daemon
//! handing over on purpose (upgrade) also parks its cachefiles objects'
//! anonymous fds here for its successor ("keep": false entries, given out
//! once).
//!
//! Protocol: a SOCK_SEQPACKET Unix socket (mode 0600); each request is one
//! JSON message, with fds as SCM_RIGHTS; each reply likewise. The same
//! role as systemd's FileDescriptorStore, without needing systemd (and run
//! under systemd as its own unit, so a restart of the daemon's unit does
//! not take it down).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Default path of the store's socket.
pub const DEFAULT_SOCKET: &str = "/run/lazypull/fdstore.sock";

/// Most fds in one message (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 200;
const MAX_MSG: usize = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    /// Keep the fd sent along under `name` (replacing an entry of that name).
    /// `keep: false` entries are handed out by the next `get` only.
    Put { name: String, keep: bool },
    /// Send every entry.
    Get,
    /// Drop (close) the entries with these names.
    Remove { names: Vec<String> },
    /// Close everything and exit.
    Exit,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Names of the fds sent along, in order.
    #[serde(default)]
    names: Vec<String>,
    /// More replies follow (more fds than fit in one message).
    #[serde(default)]
    more: bool,
}

/// One stored fd.
#[derive(Debug)]
pub struct Entry {
    pub name: String,
    pub fd: OwnedFd,
}

fn send(sock: BorrowedFd<'_>, msg: &impl Serialize, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg)?;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("too many fds for one message"));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.bytes == 0 {
        return Ok(None);
    }
    let value = serde_json::from_slice(&buf[..msg.bytes])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((value, fds)))
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Runs the store on `socket` until told to exit.
pub fn serve(socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
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
                    let _ = send(conn.as_fd(), &ok(vec![], false), &[]);
                    info!(
                        fds = entries.len(),
                        "fd store: closing every fd and exiting"
                    );
                    let _ = std::fs::remove_file(socket);
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

/// The store at one socket path. Each call is a connection of its own: the
/// store serves one connection at a time and drops idle ones, so none is kept.
pub struct Client {
    path: std::path::PathBuf,
}

fn connect(socket: &Path) -> std::io::Result<OwnedFd> {
    let sock = seqpacket()?;
    rustix::net::connect(&sock, &SocketAddrUnix::new(socket)?)?;
    rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(10)),
    )?;
    Ok(sock)
}

impl Client {
    /// A client of the store at `socket`, if one answers there.
    pub fn connect(socket: &Path) -> std::io::Result<Client> {
        drop(connect(socket)?);
        Ok(Client {
            path: socket.to_path_buf(),
        })
    }

    /// Connects to the store at `socket`, starting one (this executable's
    /// `fdstore` command, in its own process group so a terminal's Ctrl-C
    /// does not reach it) if none answers.
    pub fn connect_or_spawn(socket: &Path) -> anyhow::Result<Client> {
        if let Ok(c) = Client::connect(socket) {
            return Ok(c);
        }
        let exe =
            std::env::current_exe().context("finding this executable to start the fd store")?;
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new(exe)
            .arg("fdstore")
            .arg("--socket")
            .arg(socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the fd store")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = Client::connect(socket) {
                // Reap it if it ever exits while we live; it is not our child to wait on otherwise.
                std::thread::spawn(move || child.wait());
                return Ok(c);
            }
            if let Some(status) = child.try_wait()? {
                bail!("the fd store exited at start ({status}); see its messages above");
            }
            if Instant::now() > deadline {
                bail!(
                    "the fd store did not answer on {} within 10 s",
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `op`; returns the connection (for multi-part replies) and the first reply.
    fn call(
        &self,
        op: &Op,
        fds: &[BorrowedFd<'_>],
    ) -> anyhow::Result<(OwnedFd, Reply, Vec<OwnedFd>)> {
        let sock = connect(&self.path)
            .with_context(|| format!("connecting to the fd store at {}", self.path.display()))?;
        send(sock.as_fd(), op, fds).context("sending to the fd store")?;
        let (reply, fds): (Reply, _) = recv(sock.as_fd())
            .context("reading the fd store's reply")?
            .context("the fd store closed the connection")?;
        if !reply.ok {
            bail!("the fd store refused: {}", reply.error.unwrap_or_default());
        }
        Ok((sock, reply, fds))
    }

    /// Keeps a dup of `fd` as `name`. `keep: false`: hand it out once.
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>, keep: bool) -> anyhow::Result<()> {
        self.call(
            &Op::Put {
                name: name.to_owned(),
                keep,
            },
            &[fd],
        )
        .map(|_| ())
    }

    /// Every stored fd (the store drops the `keep: false` ones).
    pub fn get(&self) -> anyhow::Result<Vec<Entry>> {
        let (sock, mut reply, mut fds) = self.call(&Op::Get, &[])?;
        let mut out = Vec::new();
        loop {
            if reply.names.len() != fds.len() {
                bail!(
                    "the fd store sent {} fds for {} names",
                    fds.len(),
                    reply.names.len()
                );
            }
            out.extend(
                reply
                    .names
                    .drain(..)
                    .zip(fds.drain(..))
                    .map(|(name, fd)| Entry { name, fd }),
            );
            if !reply.more {
                return Ok(out);
            }
            let (r, f) = recv(sock.as_fd())?.context("the fd store closed mid-reply")?;
            reply = r;
            fds = f;
        }
    }

    pub fn remove(&self, names: &[String]) -> anyhow::Result<()> {
        self.call(
            &Op::Remove {
                names: names.to_vec(),
            },
            &[],
        )
        .map(|_| ())
    }

    /// Closes every stored fd (unbinding the cache, aborting FUSE connections
    /// nobody else holds) and ends the store.
    pub fn exit(&self) -> anyhow::Result<()> {
        self.call(&Op::Exit, &[]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn fds_survive_their_sender_and_one_shot_entries_are_given_once() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("store.sock");
        let s = socket.clone();
        let store = std::thread::spawn(move || serve(&s).unwrap());
        let client = loop {
            match Client::connect(&socket) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"kept across owners").unwrap();
        client.put("device", file.as_fd(), true).unwrap();
        let other = tempfile::tempfile().unwrap();
        client.put("obj:1", other.as_fd(), false).unwrap();
        drop(file);
        drop(client);

        let client = Client::connect(&socket).unwrap();
        // Clients hold no connection between calls: another one is served
        // meanwhile (the store serves one connection at a time).
        let other = Client::connect(&socket).unwrap();
        other
            .put("scratch", tempfile::tempfile().unwrap().as_fd(), false)
            .unwrap();
        other.remove(&["scratch".into()]).unwrap();
        let got = client.get().unwrap();
        let names: Vec<_> = got.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["device", "obj:1"]);
        let mut f = std::fs::File::from(got.into_iter().next().unwrap().fd);
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "kept across owners", "the same open file came back");
        let again = client.get().unwrap();
        assert_eq!(again.len(), 1, "the one-shot entry was handed out once");
        client.remove(&["device".into()]).unwrap();
        assert!(client.get().unwrap().is_empty());
        assert!(serve(&socket).is_err(), "a second store refuses to start");
        client.exit().unwrap();
        store.join().unwrap();
        assert!(!socket.exists());
    }
}
