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
//!
//! `server` is the store, `client` what talks to it, `wire` their
//! messages. It must not know what the fds are (the daemon names them).

mod client;
mod server;
mod wire;

pub(crate) use client::{Client, Entry, Spawned};
pub use server::{serve, serve_inherited};

/// Default path of the store's socket.
pub const DEFAULT_SOCKET: &str = "/run/lazypull/fdstore.sock";

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;

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
