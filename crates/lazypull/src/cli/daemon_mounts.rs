//! The snapshotter's lazy mounts ([`lazypull_snapshotter::LazyMounts`])
//! done with the daemon, by the same `mount_image` as `lazypull mount`: control
//! `Register` (by the image reference the snapshots' labels carry) ->
//! mount plan -> mount(2) in the snapshotter's mount namespace (read-only,
//! `nosuid`, `nodev`: the container's overlay on top has its own flags) ->
//! `Mounted`; umount(2) -> `Unmounted`. Cached bytes come from the daemon's
//! status (its per-blob `cached_bytes`).
//!
//! Blocking (std sockets, syscalls): the snapshotter calls it from its
//! blocking threads.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lazypull_backend::registry::{docker_config_credentials, Reference};
use lazypull_snapshotter::{Error, LazyMounts};

use super::mount::{mount_image, ImageTrust};
use crate::control::{self, PrefetchSpec, RegisterRequest, Request};

/// The daemon at one control socket.
#[derive(Debug, Clone)]
pub(crate) struct DaemonMounts {
    socket: PathBuf,
}

impl DaemonMounts {
    pub(crate) fn new(socket: PathBuf) -> DaemonMounts {
        DaemonMounts { socket }
    }

    /// Fails with `Unavailable` naming the socket if no daemon listens on it.
    fn reachable(&self) -> Result<(), Error> {
        UnixStream::connect(&self.socket).map(drop).map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach the lazypull daemon at {}: {e}; start it with `lazypull daemon` (or point the snapshotter's --daemon-socket at its control socket)",
                self.socket.display()
            ))
        })
    }

    fn call(&self, request: &Request, timeout: Duration) -> Result<serde_json::Value, Error> {
        self.reachable()?;
        control::call(&self.socket, request, timeout).map_err(|e| {
            Error::FailedPrecondition(format!(
                "lazypull daemon at {}: {}",
                self.socket.display(),
                crate::cli::error_text(&e)
            ))
        })
    }
}

impl LazyMounts for DaemonMounts {
    fn mount(&self, image_ref: &str, meta_hex: &str, dir: &Path, eager: bool) -> Result<(), Error> {
        let reference = Reference::parse(image_ref).map_err(|e| {
            Error::InvalidArgument(format!(
                "image reference {image_ref:?} in the snapshots' labels: {e}"
            ))
        })?;
        let creds = docker_config_credentials(None, &reference.registry).map_err(|e| {
            Error::FailedPrecondition(format!(
                "credentials for {} (docker config): {e}",
                reference.registry
            ))
        })?;
        let req = RegisterRequest {
            reference: image_ref.to_string(),
            fsid: None,
            username: creds.as_ref().map(|c| c.username.clone()),
            password: creds.map(|c| c.password),
            insecure: false,
        };
        self.reachable()?;
        let mounted = mount_image(
            &self.socket,
            req,
            image_ref,
            Some(meta_hex),
            dir,
            None,
            &PrefetchSpec {
                all: eager,
                paths: Vec::new(),
                skip_record: false,
            },
            ImageTrust::default(),
        )
        .map_err(|e| {
            Error::FailedPrecondition(format!(
                "lazypull daemon at {}: {}",
                self.socket.display(),
                crate::cli::error_text(&e)
            ))
        })?;
        let registered = mounted.registered;
        tracing::info!(image = image_ref, fsid = %registered.fsid, dir = %dir.display(), eager, "lazy image mounted");
        Ok(())
    }

    fn unmount(&self, dir: &Path) -> Result<(), Error> {
        match rustix::mount::unmount(dir, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => {}
            // Not mounted (any more): still tell the daemon.
            Err(rustix::io::Errno::INVAL) => {}
            Err(e) => {
                let hint = if e == rustix::io::Errno::BUSY {
                    " (a process or a container's overlay still uses it)"
                } else {
                    ""
                };
                return Err(Error::FailedPrecondition(format!(
                    "unmounting the lazy image at {}: {e}{hint}",
                    dir.display()
                )));
            }
        }
        let told = self.call(
            &Request::Unmounted {
                mountpoint: dir.to_path_buf(),
            },
            Duration::from_secs(10),
        );
        if let Err(e) = told {
            tracing::warn!(dir = %dir.display(), error = %e, "unmounted, but could not tell the lazypull daemon");
        }
        tracing::info!(dir = %dir.display(), "lazy image unmounted");
        Ok(())
    }

    fn cached_bytes(&self, blob_hex: &str) -> Result<Option<u64>, Error> {
        let status = self.call(&Request::Status, Duration::from_secs(10))?;
        Ok(status["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["blob"].as_str() == Some(blob_hex))
            .and_then(|b| b["cached_bytes"].as_u64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshotter restates the image format's labels: they must match.
    #[test]
    fn label_names_match_the_image_format() {
        use lazypull_oci::lazy as oci;
        use lazypull_snapshotter::lazy as snap;
        assert_eq!(snap::LABEL_ROLE, oci::LABEL_ROLE);
        assert_eq!(snap::LABEL_FORMAT, oci::LABEL_FORMAT);
        assert_eq!(snap::LABEL_BLOB, oci::LABEL_BLOB);
        assert_eq!(snap::FORMAT, oci::FORMAT_VERSION_STR);
    }

    #[test]
    fn an_absent_daemon_is_unavailable_naming_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("none.sock");
        let d = DaemonMounts::new(socket.clone());
        let e = d.cached_bytes("ab").unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&socket.display().to_string()) && msg.contains("lazypull daemon"),
            "{msg}"
        );
        let e = d
            .mount("127.0.0.1:1/x:y", "ab", dir.path(), false)
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let e = d
            .mount("not a reference", "ab", dir.path(), false)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }
}
