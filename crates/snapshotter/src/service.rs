//! containerd's `Snapshots` gRPC service over the [`Store`]: decodes each
//! request, runs the store operation on a blocking thread, encodes the
//! answer. Each call is logged at debug, each error at warn, except
//! NotFound / AlreadyExists (containerd's routine existence probes): debug.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::filter::Filter;
use crate::mounts::{mounts, OverlayOptions};
use crate::proto::containerd::services::snapshots::v1 as api;
use crate::proto::containerd::types::Mount;
use crate::store::{Info, Kind, Store, Timestamp, UpdateRequest};

/// What a remote-snapshot provider decides about a `Prepare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemotePrepare {
    /// Not a remote snapshot: prepare an ordinary overlay snapshot.
    Ordinary,
}

/// The seam for remote snapshots (lazily pulled layers, a later issue):
/// every `Prepare` asks it first, with the key, parent and labels containerd
/// sent (containerd's `containerd.io/snapshot/...` target labels among
/// them). Today's only implementation, [`NoRemote`], always answers
/// [`RemotePrepare::Ordinary`]. Called on a blocking thread.
pub trait RemoteSnapshots: Send + Sync + 'static {
    /// Decides how to prepare `key` on `parent`.
    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: &HashMap<String, String>,
    ) -> Result<RemotePrepare, Error>;
}

/// No remote snapshots: every layer is ordinary.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRemote;

impl RemoteSnapshots for NoRemote {
    fn prepare(
        &self,
        _: &str,
        _: &str,
        _: &HashMap<String, String>,
    ) -> Result<RemotePrepare, Error> {
        Ok(RemotePrepare::Ordinary)
    }
}

/// The gRPC service.
pub struct Service {
    store: Arc<Store>,
    opts: OverlayOptions,
    remote: Arc<dyn RemoteSnapshots>,
}

impl Service {
    /// Serves `store`, with mount options `opts` and remote provider `remote`.
    pub fn new(
        store: Arc<Store>,
        opts: OverlayOptions,
        remote: Arc<dyn RemoteSnapshots>,
    ) -> Service {
        Service {
            store,
            opts,
            remote,
        }
    }

    /// Runs `f` on a blocking thread; logs and converts its error.
    async fn run<T, F>(&self, call: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &dyn RemoteSnapshots, OverlayOptions) -> Result<T, Error>
            + Send
            + 'static,
    {
        tracing::debug!(call, key, "snapshots call");
        let store = Arc::clone(&self.store);
        let remote = Arc::clone(&self.remote);
        let opts = self.opts;
        let result = tokio::task::spawn_blocking(move || f(&store, remote.as_ref(), opts)).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            // containerd probes existence with Stat (and races on Prepare)
            // all the time: those answers are routine, the rest are not.
            Ok(Err(e @ (Error::NotFound(_) | Error::AlreadyExists(_)))) => {
                tracing::debug!(call, key, error = %e, "snapshots call answered with an error");
                Err(e.into())
            }
            Ok(Err(e)) => {
                tracing::warn!(call, key, error = %e, "snapshots call failed");
                Err(e.into())
            }
            Err(e) => {
                tracing::warn!(call, key, error = %e, "snapshots call's task failed");
                Err(Status::internal(format!("{call} {key}: task failed: {e}")))
            }
        }
    }
}

fn timestamp(t: Timestamp) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos as i32,
    })
}

fn kind(k: Kind) -> i32 {
    match k {
        Kind::View => api::Kind::View as i32,
        Kind::Active => api::Kind::Active as i32,
        Kind::Committed => api::Kind::Committed as i32,
    }
}

fn info(i: Info) -> api::Info {
    api::Info {
        name: i.name,
        parent: i.parent,
        kind: kind(i.kind),
        created_at: timestamp(i.created),
        updated_at: timestamp(i.updated),
        labels: i.labels.into_iter().collect(),
    }
}

fn create(
    store: &Store,
    remote: &dyn RemoteSnapshots,
    opts: OverlayOptions,
    k: Kind,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, Error> {
    if k == Kind::Active {
        match remote.prepare(key, parent, &labels)? {
            RemotePrepare::Ordinary => {}
        }
    }
    let s = store.create(k, key, parent, labels)?;
    Ok(mounts(store, &s, opts))
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

/// containerd's own service sends `List` answers in batches of this many.
const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl api::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .run("Prepare", &key, move |s, rm, o| {
                create(s, rm, o, Kind::Active, &r.key, &r.parent, r.labels)
            })
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .run("View", &key, move |s, rm, o| {
                create(s, rm, o, Kind::View, &r.key, &r.parent, r.labels)
            })
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .run("Mounts", &key, move |s, _, o| {
                Ok(mounts(s, &s.snapshot(&r.key)?, o))
            })
            .await?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        self.run("Commit", &key, move |s, _, _| {
            s.commit(&r.name, &r.key, r.labels)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        self.run("Remove", &key, move |s, _, _| s.remove(&r.key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let i = self
            .run("Stat", &key, move |s, _, _| s.stat(&r.key))
            .await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(given) = r.info else {
            return Err(Status::invalid_argument(
                "Update: the request has no snapshot info",
            ));
        };
        let key = given.name.clone();
        let req = UpdateRequest {
            name: given.name,
            labels: given.labels,
            paths: r.update_mask.map(|m| m.paths).unwrap_or_default(),
        };
        let i = self
            .run("Update", &key, move |s, _, _| s.update(req))
            .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let filters = r.filters.join(" | ");
        let infos = self
            .run("List", &filters, move |s, _, _| {
                let filter = Filter::parse_all(&r.filters)?;
                Ok(s.list(&filter))
            })
            .await?;
        let mut batches = Vec::new();
        let mut it = infos.into_iter().map(info).peekable();
        while it.peek().is_some() {
            let info: Vec<api::Info> = it.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(api::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let u = self
            .run("Usage", &key, move |s, _, _| s.usage(&r.key))
            .await?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<()>, Status> {
        let removed = self.run("Cleanup", "", |s, _, _| s.cleanup()).await?;
        tracing::debug!(removed, "cleanup removed orphaned directories");
        Ok(Response::new(()))
    }
}
