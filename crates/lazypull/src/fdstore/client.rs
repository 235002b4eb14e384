//! A client of the store: what the daemon (and `lazypull shutdown`) uses to
//! park fds, take them back, and end the store.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rustix::net::SocketAddrUnix;

use super::wire::{recv, send, seqpacket, Op, Reply};

/// One stored fd.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) fd: OwnedFd,
}

/// A store this process started (`Client::connect_or_spawn`).
#[derive(Debug)]
pub(crate) struct Spawned {
    child: std::process::Child,
}

impl Spawned {
    /// Lets the store outlive this process (it is meant to: it keeps the
    /// kernel connections for the next daemon).
    pub(crate) fn keep_running(self) {
        let mut child = self.child;
        // Reap it if it ever exits while we live; it is not our child to wait on otherwise.
        std::thread::spawn(move || child.wait());
    }
}

/// The store at one socket path. Each call is a connection of its own: the
/// store serves one connection at a time and drops idle ones, so none is kept.
#[derive(Clone)]
pub(crate) struct Client {
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
    pub(crate) fn connect(socket: &Path) -> std::io::Result<Client> {
        drop(connect(socket)?);
        Ok(Client {
            path: socket.to_path_buf(),
        })
    }

    /// Connects to the store at `socket`, starting one (this executable's
    /// `fdstore` command, in its own process group so a terminal's Ctrl-C
    /// does not reach it) if none answers; then also returns the store started.
    pub(crate) fn connect_or_spawn(socket: &Path) -> anyhow::Result<(Client, Option<Spawned>)> {
        if let Ok(c) = Client::connect(socket) {
            return Ok((c, None));
        }
        // The listener is bound here and handed to the store as its stdin:
        // once this returns, the store's socket accepts connections (they
        // queue until the store's first accept), so the daemon goes on at
        // once instead of waiting for a process to start and bind.
        let listener = super::server::listen(socket).context("binding the fd store's socket")?;
        let exe =
            std::env::current_exe().context("finding this executable to start the fd store")?;
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(exe)
            .arg("fdstore")
            .arg("--socket")
            .arg(socket)
            .arg("--inherit-listener")
            .stdin(std::process::Stdio::from(listener))
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the fd store")?;
        Ok((
            Client {
                path: socket.to_path_buf(),
            },
            Some(Spawned { child }),
        ))
    }

    /// Ends a store this process started: closes every fd it holds and waits
    /// until the process is gone (its socket is removed before it answers).
    pub(crate) fn end_spawned(&self, mut spawned: Spawned) -> anyhow::Result<()> {
        self.exit()?;
        spawned
            .child
            .wait()
            .context("waiting for the fd store to exit")?;
        Ok(())
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
    pub(crate) fn put(&self, name: &str, fd: BorrowedFd<'_>, keep: bool) -> anyhow::Result<()> {
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
    pub(crate) fn get(&self) -> anyhow::Result<Vec<Entry>> {
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

    pub(crate) fn remove(&self, names: &[String]) -> anyhow::Result<()> {
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
    pub(crate) fn exit(&self) -> anyhow::Result<()> {
        self.call(&Op::Exit, &[]).map(|_| ())
    }
}
