//! The control protocol: what `lazypull mount` / `umount` / `status` and the
//! daemon say to each other on the control socket. Newline-delimited JSON over a
//! Unix socket (root only): one request per line, each answered by one reply
//! line `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
//!
//! Types only: it owns the wire form (and, through [`RegisterRequest`], the
//! form of images.json's entries); sending requests is the control client's,
//! serving them the daemon's control server.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default path of the control socket.
pub(crate) const DEFAULT_SOCKET: &str = "/run/lazypull/lazypull.sock";

/// What to fetch ahead of need after a mount.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PrefetchSpec {
    /// Every data blob of the image, in device order (after `paths`).
    #[serde(default)]
    pub(crate) all: bool,
    /// Files (absolute paths inside the image), in priority order.
    #[serde(default)]
    pub(crate) paths: Vec<String>,
    /// Do not fetch the image's recorded prefetch order (`lazypull optimize`
    /// records a new one, which must see every read).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) skip_record: bool,
}

impl PrefetchSpec {
    pub(crate) fn is_empty(&self) -> bool {
        !self.all && self.paths.is_empty()
    }
}

/// What `lazypull mount` asks the daemon to register: an image in a registry
/// (`reference`), or one the daemon's blob dir or blob URL holds (`fsid`, the
/// meta blob's name). Its `Debug` hides the password (requests are logged).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RegisterRequest {
    #[serde(default)]
    pub(crate) reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fsid: Option<String>,
    #[serde(default)]
    pub(crate) username: Option<String>,
    #[serde(default)]
    pub(crate) password: Option<String>,
    /// Speak plain HTTP to this registry (loopback registries always are).
    #[serde(default)]
    pub(crate) insecure: bool,
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("reference", &self.reference)
            .field("fsid", &self.fsid)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// What `lazypull cri-proxy` hands over after a CRI `PullImage` succeeded:
/// the credentials kubelet sent for `image`. Its `Debug` hides the secret.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KubeletCredentialsRequest {
    /// The image as kubelet named it.
    pub(crate) image: String,
    pub(crate) username: String,
    /// The password (or identity token, with username `<token>`).
    pub(crate) secret: String,
}

impl std::fmt::Debug for KubeletCredentialsRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletCredentialsRequest")
            .field("image", &self.image)
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What registering an image did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Registered {
    /// The meta blob's name: the `fsid` to mount.
    pub(crate) fsid: String,
    pub(crate) reference: String,
    pub(crate) manifest_digest: String,
    pub(crate) blobs: usize,
    /// Uncompressed bytes of all data blobs.
    pub(crate) data_bytes: u64,
    /// Bytes fetched to register it (manifest, config, meta blob, tables).
    pub(crate) fetched_bytes: u64,
    pub(crate) elapsed_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
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
    /// Keep kubelet's credentials of a pull for the images of its repository
    /// (in memory only): `lazypull cri-proxy`.
    KubeletCredentials(KubeletCredentialsRequest),
    /// Start recording which data blob ranges the readers of image `fsid`
    /// wait for (first touch, in order): `lazypull optimize`.
    RecordStart { fsid: String },
    /// Stop recording image `fsid`; the reply holds the record (files and
    /// ranges within them).
    RecordStop { fsid: String },
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
pub(crate) struct MountPlan {
    pub(crate) source: String,
    pub(crate) fstype: String,
    pub(crate) options: String,
    /// Whether an EROFS `domain_id` may be added (cachefiles only).
    pub(crate) domain: bool,
    /// The loop transport: `source` and every `device=` path are files to
    /// back with read-only loop devices, which the mount then uses instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) loop_devices: bool,
    /// With `loop_devices`: ask for direct I/O on them (`loop_direct_io`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) loop_direct_io: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

impl Reply {
    pub(crate) fn from_result(r: anyhow::Result<serde_json::Value>) -> Reply {
        match r {
            Ok(v) => Reply {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Reply {
                ok: false,
                result: None,
                // Each cause once (as the CLI prints its own errors).
                error: Some(crate::cli::error_text(&e)),
            },
        }
    }
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
                skip_record: false,
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

    /// A register request (or a request holding one) in a log line or an
    /// error message shows the user name, never the password.
    #[test]
    fn debug_hides_the_password() {
        let r = RegisterRequest {
            reference: "h:1/r:t".into(),
            username: Some("alice".into()),
            password: Some("s3cret-pw".into()),
            ..RegisterRequest::default()
        };
        for text in [
            format!("{r:?}"),
            format!("{:?}", Request::Register(r.clone())),
        ] {
            assert!(
                text.contains("alice") && text.contains("h:1/r:t") && !text.contains("s3cret"),
                "{text}"
            );
        }
        let none = format!("{:?}", RegisterRequest::default());
        assert!(none.contains("password: None"), "{none}");
        // The wire form still carries it.
        assert!(serde_json::to_string(&r).unwrap().contains("s3cret-pw"));
    }
}
