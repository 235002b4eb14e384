//! A client of containerd's gRPC API (containerd 1.6) over its unix socket:
//! the few calls `lazypull pull` makes, each an ordinary containerd
//! operation, with containerd's request metadata (`containerd-namespace`,
//! `containerd-lease`) and errors that name the call, the socket and
//! containerd's answer.
//!
//! It owns connecting (tonic over a unix socket: tonic wants an `http://` URI,
//! which only names the HTTP/2 authority here, and a connector that dials the
//! socket) and the shape of each call: leases (`Create` with an expiry label,
//! `Delete`), content (`Write` stream, `Update` of labels), images
//! (`Create`, else `Update`) and snapshots (`Prepare`, `Remove`) in
//! containerd's snapshots service, which forwards to the named snapshotter.
//! What to write and in which order is the caller's ([`crate::pull`]); the
//! wire contract is `lazypull-containerd-api`'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lazypull_containerd_api::containerd::services::content::v1 as content;
use lazypull_containerd_api::containerd::services::images::v1 as images;
use lazypull_containerd_api::containerd::services::leases::v1 as leases;
use lazypull_containerd_api::containerd::services::snapshots::v1 as snapshots;
use lazypull_containerd_api::containerd::types::{Descriptor, Mount};
use lazypull_containerd_api::unix::UnixConnector;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// containerd's default gRPC socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// containerd's default namespace (`ctr`'s too).
pub const DEFAULT_NAMESPACE: &str = "default";
/// The lease label containerd's garbage collector reads: the lease (and
/// what only it holds) goes at this time (RFC 3339) even if not deleted.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Bytes per `Write` message: well under containerd's 16 MiB message limit.
const WRITE_CHUNK: usize = 1 << 20;
/// Longest wait for one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a call to containerd failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("containerd unreachable at {address}: {detail} (is containerd running? pass its socket with --address)")]
    Unreachable { address: PathBuf, detail: String },
    #[error("containerd at {address}: {what}: {} ({:?})", status.message(), status.code())]
    Call {
        address: PathBuf,
        what: String,
        /// Boxed: a `Status` is large, and this error travels in every
        /// `Result` here.
        status: Box<tonic::Status>,
    },
    #[error("containerd at {address}: {what}: {problem}")]
    Protocol {
        address: PathBuf,
        what: String,
        problem: String,
    },
}

impl Error {
    /// The gRPC status code containerd answered, if it answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// A connection to containerd, in one namespace, optionally under a lease.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    address: PathBuf,
    namespace: MetadataValue<tonic::metadata::Ascii>,
    lease: Option<MetadataValue<tonic::metadata::Ascii>>,
}

/// What [`Client::write_content`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The blob was written and committed with the labels.
    Committed,
    /// containerd had the blob already; its labels were updated.
    Existed,
}

/// What [`Client::prepare_snapshot`] got.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// containerd (its snapshotter) answered AlreadyExists: for a Prepare
    /// with `containerd.io/snapshot.ref`, the target snapshot exists
    /// (a remote snapshotter made it, or it was there).
    AlreadyExists(String),
    /// An active snapshot was made (the snapshotter does not do remote
    /// snapshots): its mounts.
    Active(Vec<Mount>),
}

/// Whether [`Client::put_image`] created or updated the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePut {
    Created,
    Updated,
}

fn ascii(value: &str, what: &str) -> Result<MetadataValue<tonic::metadata::Ascii>, String> {
    value
        .parse()
        .map_err(|_| format!("the {what} {value:?} is not printable ASCII"))
}

impl Client {
    /// Connects to containerd's socket at `address` for namespace
    /// `namespace`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Client, Error> {
        let unreachable = |detail: String| Error::Unreachable {
            address: address.to_owned(),
            detail,
        };
        let namespace = ascii(namespace, "namespace").map_err(|problem| Error::Protocol {
            address: address.to_owned(),
            what: "namespace".into(),
            problem,
        })?;
        // Checked first so that the error says what is missing: tonic's
        // own says only "transport error".
        match tokio::fs::metadata(address).await {
            Ok(_) => {}
            Err(e) => return Err(unreachable(e.to_string())),
        }
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(10))
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(UnixConnector::new(address))
            .await
            .map_err(|e| {
                let mut detail = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    detail.push_str(&format!(": {s}"));
                    source = s.source();
                }
                unreachable(detail)
            })?;
        Ok(Client {
            channel,
            address: address.to_owned(),
            namespace,
            lease: None,
        })
    }

    /// The socket this client speaks to.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// This client with every later request under lease `id`.
    pub fn with_lease(&self, id: &str) -> Result<Client, Error> {
        let lease = ascii(id, "lease id").map_err(|problem| self.protocol("lease", problem))?;
        Ok(Client {
            lease: Some(lease),
            ..self.clone()
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            r.metadata_mut().insert("containerd-lease", lease.clone());
        }
        r
    }

    fn call_error(&self, what: impl Into<String>, status: tonic::Status) -> Error {
        Error::Call {
            address: self.address.clone(),
            what: what.into(),
            status: Box::new(status),
        }
    }

    fn protocol(&self, what: impl Into<String>, problem: impl Into<String>) -> Error {
        Error::Protocol {
            address: self.address.clone(),
            what: what.into(),
            problem: problem.into(),
        }
    }

    /// Creates a lease that containerd's garbage collector drops by itself
    /// `expire` from now (if it is never deleted). Returns its id.
    pub async fn create_lease(
        &self,
        id: &str,
        expire: Duration,
        now: SystemTime,
    ) -> Result<String, Error> {
        let mut c = leases::leases_client::LeasesClient::new(self.channel.clone());
        let labels = HashMap::from([(LABEL_GC_EXPIRE.to_owned(), rfc3339(now + expire))]);
        let what = format!("creating lease {id}");
        let reply = c
            .create(self.request(leases::CreateRequest {
                id: id.to_owned(),
                labels,
            }))
            .await
            .map_err(|s| self.call_error(&what, s))?
            .into_inner();
        let lease = reply
            .lease
            .ok_or_else(|| self.protocol(&what, "the reply has no lease"))?;
        Ok(lease.id)
    }

    /// Deletes lease `id` (what only it held becomes garbage); with `sync`,
    /// waits for that garbage collection.
    pub async fn delete_lease(&self, id: &str, sync: bool) -> Result<(), Error> {
        let mut c = leases::leases_client::LeasesClient::new(self.channel.clone());
        c.delete(self.request(leases::DeleteRequest {
            id: id.to_owned(),
            sync,
        }))
        .await
        .map_err(|s| self.call_error(format!("deleting lease {id}"), s))?;
        Ok(())
    }

    /// Puts `bytes` (whose digest is `digest`, `sha256:<hex>`) into the
    /// content store with `labels`, through one `Write` stream keyed by
    /// `reference`: the first message declares the total and the expected
    /// digest (so containerd answers AlreadyExists at once if it has the
    /// blob, and then leases it for the request's lease), the data follows
    /// in [`WRITE_CHUNK`] pieces, the last message commits with the labels.
    /// A blob containerd had is given the labels with `Update`.
    pub async fn write_content(
        &self,
        reference: &str,
        bytes: &[u8],
        digest: &str,
        labels: &HashMap<String, String>,
    ) -> Result<Written, Error> {
        let what = format!("writing {digest} to the content store");
        let total = i64::try_from(bytes.len()).map_err(|_| self.protocol(&what, "too large"))?;
        let mut messages = Vec::new();
        let mut offset = 0usize;
        for piece in bytes.chunks(WRITE_CHUNK) {
            messages.push(content::WriteContentRequest {
                action: content::WriteAction::Write as i32,
                r#ref: reference.to_owned(),
                total,
                expected: digest.to_owned(),
                offset: offset as i64,
                data: piece.to_vec(),
                labels: HashMap::new(),
            });
            offset += piece.len();
        }
        messages.push(content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            r#ref: reference.to_owned(),
            total,
            expected: digest.to_owned(),
            offset: total,
            data: Vec::new(),
            labels: labels.clone(),
        });
        let expected_replies = messages.len();
        let mut c = content::content_client::ContentClient::new(self.channel.clone())
            .max_decoding_message_size(16 << 20);
        let outcome = c.write(self.request(tokio_stream::iter(messages))).await;
        let mut stream = match outcome {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.update_content_labels(digest, labels).await?;
                return Ok(Written::Existed);
            }
            Err(s) => return Err(self.call_error(&what, s)),
        };
        let mut replies = 0;
        let mut last = None;
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    replies += 1;
                    last = Some(m);
                }
                Ok(None) => break,
                Err(s) if s.code() == Code::AlreadyExists => {
                    self.update_content_labels(digest, labels).await?;
                    return Ok(Written::Existed);
                }
                Err(s) => return Err(self.call_error(&what, s)),
            }
        }
        let Some(last) = last else {
            return Err(self.protocol(&what, "the write stream ended without a reply"));
        };
        // containerd 1.6 answers every message, and the commit twice (once
        // in its loop, once more as it returns).
        if replies < expected_replies
            || last.action != content::WriteAction::Commit as i32
            || last.digest != digest
            || last.offset != total
        {
            return Err(self.protocol(
                &what,
                format!(
                    "the write ended with {replies} replies to {expected_replies} messages, the last {last:?}, not a commit of {total} bytes as {digest}"
                ),
            ));
        }
        Ok(Written::Committed)
    }

    /// Sets `labels` on the blob `digest` (others it has are kept).
    pub async fn update_content_labels(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), Error> {
        if labels.is_empty() {
            return Ok(());
        }
        let mut c = content::content_client::ContentClient::new(self.channel.clone());
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        c.update(self.request(content::UpdateRequest {
            info: Some(content::Info {
                digest: digest.to_owned(),
                labels: labels.clone(),
                ..content::Info::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .map_err(|s| self.call_error(format!("labelling {digest} in the content store"), s))?;
        Ok(())
    }

    /// `Prepare` through containerd's snapshots service with snapshotter
    /// `snapshotter`.
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Prepared, Error> {
        let mut c = snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        match c
            .prepare(self.request(snapshots::PrepareSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: key.to_owned(),
                parent: parent.to_owned(),
                labels,
            }))
            .await
        {
            Ok(r) => Ok(Prepared::Active(r.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => {
                Ok(Prepared::AlreadyExists(s.message().to_owned()))
            }
            Err(s) => Err(self.call_error(
                format!(
                    "preparing snapshot {key} (parent {:?}) in snapshotter {snapshotter}",
                    parent
                ),
                s,
            )),
        }
    }

    /// `Remove` of snapshot `key` in snapshotter `snapshotter`.
    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<(), Error> {
        let mut c = snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        c.remove(self.request(snapshots::RemoveSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
        }))
        .await
        .map_err(|s| {
            self.call_error(
                format!("removing snapshot {key} in snapshotter {snapshotter}"),
                s,
            )
        })?;
        Ok(())
    }

    /// `List` of every snapshot in snapshotter `snapshotter` (on a
    /// snapshotter's own socket, which serves the same API, the name is
    /// ignored).
    pub async fn list_snapshots(&self, snapshotter: &str) -> Result<Vec<snapshots::Info>, Error> {
        let mut c = snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let what = || format!("listing the snapshots of snapshotter {snapshotter}");
        let mut stream = c
            .list(self.request(snapshots::ListSnapshotsRequest {
                snapshotter: snapshotter.to_owned(),
                filters: Vec::new(),
            }))
            .await
            .map_err(|s| self.call_error(what(), s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream
            .message()
            .await
            .map_err(|s| self.call_error(what(), s))?
        {
            out.extend(batch.info);
        }
        Ok(out)
    }

    /// Points image record `name` at `target`: `Create`, or where it exists,
    /// `Update` of its target (its labels are kept).
    pub async fn put_image(&self, name: &str, target: Descriptor) -> Result<ImagePut, Error> {
        let mut c = images::images_client::ImagesClient::new(self.channel.clone());
        let image = images::Image {
            name: name.to_owned(),
            target: Some(target),
            ..images::Image::default()
        };
        match c
            .create(self.request(images::CreateImageRequest {
                image: Some(image.clone()),
            }))
            .await
        {
            Ok(_) => return Ok(ImagePut::Created),
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(self.call_error(format!("creating image {name}"), s)),
        }
        c.update(self.request(images::UpdateImageRequest {
            image: Some(image),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["target".into()],
            }),
        }))
        .await
        .map_err(|s| self.call_error(format!("updating image {name}"), s))?;
        Ok(ImagePut::Updated)
    }
}

/// `t` as RFC 3339 in UTC, to the second: `2026-01-02T03:04:05Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_767_323_045), "2026-01-02T03:04:05Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[tokio::test]
    async fn a_missing_socket_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let err = Client::connect(&socket, "default")
            .await
            .err()
            .expect("no containerd there");
        let text = err.to_string();
        assert!(
            text.contains("containerd unreachable at")
                && text.contains(&socket.display().to_string())
                && text.contains("--address"),
            "{text}"
        );
        // A socket nobody listens on.
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        drop(listener);
        let err = Client::connect(&socket, "default").await.err().unwrap();
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");
        let err = Client::connect(&socket, "bad\nname").await.err().unwrap();
        assert!(err.to_string().contains("namespace"), "{err}");
    }
}
