//! The fd store's wire form: one JSON message per SOCK_SEQPACKET packet, fds
//! along as SCM_RIGHTS, the same in both directions. Framing only.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketType,
};
use serde::{Deserialize, Serialize};

/// Most fds in one message (the kernel's SCM_MAX_FD is 253).
pub(super) const MAX_FDS: usize = 200;

const MAX_MSG: usize = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Op {
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
pub(super) struct Reply {
    pub(super) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
    /// Names of the fds sent along, in order.
    #[serde(default)]
    pub(super) names: Vec<String>,
    /// More replies follow (more fds than fit in one message).
    #[serde(default)]
    pub(super) more: bool,
}

pub(super) fn send(
    sock: BorrowedFd<'_>,
    msg: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
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

pub(super) fn recv<T: for<'de> Deserialize<'de>>(
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

pub(super) fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}
