//! containerd's `Snapshots` gRPC service over the [`Store`]: decodes each
//! request, runs the store operation on a blocking thread, encodes the
//! answer. Each call is logged at debug, each error at warn, except
//! NotFound / AlreadyExists (containerd's routine existence probes): debug.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::du::Usage;
use crate::error::Error;
use crate::filter::Filter;
use crate::lazy::{self, Lazy, Plan};
use crate::mounts::{lazy_mounts, mounts, OverlayOptions};
use crate::proto::containerd::services::snapshots::v1 as api;
use crate::proto::containerd::types::Mount;
use crate::store::{Info, Kind, Store, Timestamp, UpdateRequest};

/// The gRPC service.
pub struct Service {
    store: Arc<Store>,
    opts: OverlayOptions,
    lazy: Arc<Lazy>,
}

impl Service {
    /// Serves `store`, with mount options `opts` and lazy images mounted
    /// through `lazy`.
    pub fn new(store: Arc<Store>, opts: OverlayOptions, lazy: Arc<Lazy>) -> Service {
        Service { store, opts, lazy }
    }

    /// Runs `f` on a blocking thread; logs and converts its error.
    async fn run<T, F>(&self, call: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &Lazy, OverlayOptions) -> Result<T, Error> + Send + 'static,
    {
        tracing::debug!(call, key, "snapshots call");
        let store = Arc::clone(&self.store);
        let lazy = Arc::clone(&self.lazy);
        let opts = self.opts;
        let result = tokio::task::spawn_blocking(move || f(&store, &lazy, opts)).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            // containerd probes existence with Stat (and races on Prepare)
            // all the time, and lazy layers are answered AlreadyExists:
            // those answers are routine, the rest are not.
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
    lazy: &Lazy,
    opts: OverlayOptions,
    k: Kind,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, Error> {
    match lazy::plan(store, k, key, parent, &labels)? {
        Plan::Ordinary => {
            let s = store.create(k, key, parent, labels)?;
            Ok(mounts(store, &s, opts))
        }
        Plan::Remote { target } => {
            store.create_committed(&target, parent, labels)?;
            tracing::info!(key, snapshot = %target, parent, "lazy layer committed without fetching it");
            Err(Error::AlreadyExists(format!(
                "snapshot {target}: a lazypull layer, committed as it is (nothing to unpack)"
            )))
        }
        Plan::Container(image) => {
            // Mount (once per image) and record the snapshot under one
            // lock, so that a Remove between the two cannot unmount it.
            let guard = lazy.lock();
            let dir = lazy.ensure_mounted(&image)?;
            match store.create(k, key, parent, labels) {
                Ok(s) => Ok(lazy_mounts(store, &s, &dir, opts)),
                Err(e) => {
                    drop(guard);
                    if let Err(u) = lazy.reconcile(store) {
                        tracing::warn!(error = %u, "cannot unmount an unused lazy image");
                    }
                    Err(e)
                }
            }
        }
    }
}

/// The mounts of active or view `key`: over its lazy image (mounting it
/// again if it is gone, as after a reboot) or ordinary.
fn mounts_of(
    store: &Store,
    lazy: &Lazy,
    opts: OverlayOptions,
    key: &str,
) -> Result<Vec<Mount>, Error> {
    let s = store.snapshot(key)?;
    let chain = store.chain(key)?;
    if chain.len() > 1 && lazy::image_of_chain(&chain[1..]).is_some() {
        let own: HashMap<String, String> = chain[0].labels.clone().into_iter().collect();
        let image = lazy::lazy_image(key, &chain[1..], &own)?;
        let _guard = lazy.lock();
        let dir = lazy.ensure_mounted(&image)?;
        return Ok(lazy_mounts(store, &s, &dir, opts));
    }
    Ok(mounts(store, &s, opts))
}

/// `Usage`: a lazy layer's is what the daemon has cached of its blob.
fn usage_of(store: &Store, lazy: &Lazy, key: &str) -> Result<Usage, Error> {
    let info = store.stat(key)?;
    let role = info.labels.get(lazy::LABEL_ROLE).map(String::as_str);
    if info.kind != Kind::Committed || role.is_none() {
        return store.usage(key);
    }
    let blob = match role {
        Some("data") => info.labels.get(lazy::LABEL_BLOB).cloned(),
        Some("meta") => info.name.strip_prefix("sha256:").map(str::to_string),
        _ => None,
    };
    let Some(blob) = blob else {
        return Ok(Usage::default());
    };
    let size = match lazy.provider().cached_bytes(&blob) {
        Ok(v) => v.unwrap_or(0),
        Err(e) => {
            // Usage feeds containerd's accounting: an unreachable daemon
            // must not fail it.
            tracing::warn!(snapshot = key, error = %e, "cannot ask the lazypull daemon what it cached; usage 0");
            0
        }
    };
    Ok(Usage {
        size: i64::try_from(size).unwrap_or(i64::MAX),
        inodes: 0,
    })
}

fn commit(
    store: &Store,
    name: &str,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<(), Error> {
    if let Ok(chain) = store.chain(key) {
        if chain
            .iter()
            .skip(1)
            .any(|i| i.labels.contains_key(lazy::LABEL_ROLE))
        {
            return Err(Error::FailedPrecondition(format!(
                "cannot commit {key} as {name}: it stands on lazypull layers, and ordinary layers on lazy ones are not supported"
            )));
        }
    }
    store.commit(name, key, labels)
}

fn remove(store: &Store, lazy: &Lazy, key: &str) -> Result<(), Error> {
    let was_lazy = store
        .chain(key)
        .map(|c| c.iter().any(|i| i.labels.contains_key(lazy::LABEL_ROLE)))
        .unwrap_or(false);
    store.remove(key)?;
    if was_lazy {
        // The snapshot is gone whatever happens to the mount: a failed
        // unmount is retried by Cleanup and at start-up.
        if let Err(e) = lazy.reconcile(store) {
            tracing::warn!(key, error = %e, "snapshot removed, but its unused lazy image is still mounted");
        }
    }
    Ok(())
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
            .run("Mounts", &key, move |s, l, o| mounts_of(s, l, o, &r.key))
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
            commit(s, &r.name, &r.key, r.labels)
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
        self.run("Remove", &key, move |s, l, _| remove(s, l, &r.key))
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
            .run("Usage", &key, move |s, l, _| usage_of(s, l, &r.key))
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
        let (removed, unmounted) = self
            .run("Cleanup", "", |s, l, _| {
                let removed = s.cleanup()?;
                Ok((removed, l.reconcile(s)?))
            })
            .await?;
        tracing::debug!(
            removed,
            unmounted,
            "cleanup removed orphaned directories and unused lazy mounts"
        );
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy::{LazyMounts, LABEL_FORMAT, LABEL_IMAGE_REF, LABEL_SNAPSHOT_REF};
    use api::snapshots_server::Snapshots;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use tonic::Code;

    /// Records calls; "mounts" by remembering the directory.
    #[derive(Default)]
    struct Fake {
        mounted: Mutex<Vec<PathBuf>>,
        calls: Mutex<Vec<String>>,
        down: bool,
    }

    impl Fake {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn mounted(&self) -> Vec<PathBuf> {
            self.mounted.lock().unwrap().clone()
        }
    }

    impl LazyMounts for Fake {
        fn mount(&self, r: &str, hex: &str, dir: &Path, eager: bool) -> Result<(), Error> {
            if self.down {
                return Err(Error::Unavailable("daemon at /x.sock is down".into()));
            }
            assert!(dir.is_dir(), "mount dir {} exists", dir.display());
            self.calls
                .lock()
                .unwrap()
                .push(format!("mount {r} {hex} eager={eager}"));
            self.mounted.lock().unwrap().push(dir.to_path_buf());
            Ok(())
        }
        fn unmount(&self, dir: &Path) -> Result<(), Error> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("unmount {}", dir.display()));
            self.mounted.lock().unwrap().retain(|d| d != dir);
            Ok(())
        }
        fn cached_bytes(&self, blob: &str) -> Result<Option<u64>, Error> {
            Ok(match &blob[..2] {
                "bb" => Some(4096),
                "aa" => Some(100),
                _ => None,
            })
        }
        fn mounted_under(&self, dir: &Path) -> Result<Vec<PathBuf>, Error> {
            Ok(self
                .mounted()
                .into_iter()
                .filter(|p| p.starts_with(dir))
                .collect())
        }
    }

    const IMAGE: &str = "127.0.0.1:5000/busybox@sha256:0123";

    fn meta() -> String {
        format!("sha256:{}", "aa".repeat(32))
    }

    fn setup(fake: &Arc<Fake>, root: &Path) -> (Service, Arc<Lazy>) {
        let store = Arc::new(Store::open(root).unwrap());
        let lazy = Arc::new(Lazy::open(root, Arc::clone(fake) as Arc<dyn LazyMounts>).unwrap());
        lazy.reconcile(&store).unwrap();
        let opts = OverlayOptions {
            index_off: true,
            userxattr: false,
        };
        (Service::new(store, opts, Arc::clone(&lazy)), lazy)
    }

    fn layer_labels(role: &str, target: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut l: HashMap<String, String> = [
            (lazy::LABEL_ROLE, role),
            (LABEL_FORMAT, "2"),
            (LABEL_SNAPSHOT_REF, target),
            (LABEL_IMAGE_REF, IMAGE),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            l.insert(k.to_string(), v.to_string());
        }
        l
    }

    async fn prepare(
        svc: &Service,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        svc.prepare(Request::new(api::PrepareSnapshotRequest {
            snapshotter: "lazypull".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        }))
        .await
        .map(|r| r.into_inner().mounts)
    }

    async fn stat(svc: &Service, key: &str) -> Result<api::Info, Status> {
        svc.stat(Request::new(api::StatSnapshotRequest {
            snapshotter: "lazypull".into(),
            key: key.into(),
        }))
        .await
        .map(|r| r.into_inner().info.unwrap())
    }

    async fn remove(svc: &Service, key: &str) -> Result<(), Status> {
        svc.remove(Request::new(api::RemoveSnapshotRequest {
            snapshotter: "lazypull".into(),
            key: key.into(),
        }))
        .await
        .map(|_| ())
    }

    async fn usage(svc: &Service, key: &str) -> i64 {
        svc.usage(Request::new(api::UsageRequest {
            snapshotter: "lazypull".into(),
            key: key.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .size
    }

    /// The three layers of a one-blob lazy image, as containerd's unpacker
    /// prepares them; returns the top chain id.
    async fn pull(svc: &Service) -> String {
        let blob = "bb".repeat(32);
        let layers = [
            ("meta", meta(), String::new(), vec![]),
            (
                "table",
                "sha256:c1".to_string(),
                meta(),
                vec![(lazy::LABEL_BLOB, blob.as_str())],
            ),
            (
                "data",
                "sha256:c2".to_string(),
                "sha256:c1".to_string(),
                vec![(lazy::LABEL_BLOB, blob.as_str())],
            ),
        ];
        for (role, target, parent, extra) in &layers {
            let key = format!("extract-1-{target}");
            let e = prepare(svc, &key, parent, layer_labels(role, target, extra))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::AlreadyExists, "{role}: {e:?}");
            assert!(e.message().contains(target.as_str()), "{}", e.message());
            let e = stat(svc, &key).await.unwrap_err();
            assert_eq!(
                e.code(),
                Code::NotFound,
                "the key's active snapshot is not kept"
            );
        }
        "sha256:c2".into()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remote_layers_are_committed_under_their_chain_id() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let (svc, _) = setup(&fake, dir.path());
        let top = pull(&svc).await;
        let i = stat(&svc, &top).await.unwrap();
        assert_eq!(i.kind, api::Kind::Committed as i32);
        assert_eq!(i.parent, "sha256:c1");
        assert_eq!(
            i.labels,
            layer_labels("data", &top, &[(lazy::LABEL_BLOB, &"bb".repeat(32))])
        );
        let m = stat(&svc, &meta()).await.unwrap();
        assert_eq!(
            (m.kind, m.parent.as_str()),
            (api::Kind::Committed as i32, "")
        );
        assert_eq!(m.labels[lazy::LABEL_ROLE], "meta");
        // Again (a second pull of the same image): AlreadyExists, nothing new.
        assert_eq!(pull(&svc).await, top);
        let e = prepare(
            &svc,
            "extract-2",
            "sha256:c1",
            layer_labels("data", &top, &[]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        assert_eq!(svc.store.list(&Filter::default()).len(), 3);
        // Usage: the daemon's cached bytes of the layer's blob.
        assert_eq!(usage(&svc, &top).await, 4096);
        assert_eq!(usage(&svc, &meta()).await, 100);
        assert_eq!(
            usage(&svc, "sha256:c1").await,
            0,
            "a table's blob is not tracked"
        );
        // Nothing was mounted to pull.
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
        // Malformed lazy labels are refused, naming what is wrong.
        let mut no_ref = layer_labels("data", "x", &[]);
        no_ref.remove(LABEL_SNAPSHOT_REF);
        let e = prepare(&svc, "k", "sha256:c1", no_ref).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(LABEL_SNAPSHOT_REF), "{}", e.message());
        let e = prepare(&svc, "k", "", layer_labels("meta", "sha256:short", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        let e = prepare(
            &svc,
            "k",
            &top,
            layer_labels("data", "sha256:c3", &[(LABEL_FORMAT, "3")]),
        )
        .await
        .unwrap_err();
        assert!(e.message().contains("format"), "{}", e.message());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn containers_share_one_lazy_mount_until_the_last_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let (svc, lazy) = setup(&fake, dir.path());
        let top = pull(&svc).await;
        let image_dir = lazy.mount_dir(&"aa".repeat(32));
        let m = prepare(&svc, "c1", &top, HashMap::new()).await.unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "overlay");
        let s = svc.store.snapshot("c1").unwrap();
        assert_eq!(
            m[0].options,
            [
                "index=off".to_string(),
                format!("workdir={}", svc.store.work_path(s.id).display()),
                format!("upperdir={}", svc.store.fs_path(s.id).display()),
                format!("lowerdir={}", image_dir.display()),
            ]
        );
        assert_eq!(
            fake.calls(),
            [format!("mount {IMAGE} {} eager=false", "aa".repeat(32))]
        );
        // A second container and a view: the same mount.
        prepare(&svc, "c2", &top, HashMap::new()).await.unwrap();
        let v = svc
            .view(Request::new(api::ViewSnapshotRequest {
                snapshotter: String::new(),
                key: "v".into(),
                parent: top.clone(),
                labels: HashMap::new(),
            }))
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(
            (
                v[0].r#type.as_str(),
                v[0].source.clone(),
                v[0].options.clone()
            ),
            (
                "bind",
                image_dir.display().to_string(),
                vec!["ro".to_string(), "rbind".to_string()]
            )
        );
        assert_eq!(fake.calls().len(), 1, "{:?}", fake.calls());
        let again = svc
            .mounts(Request::new(api::MountsRequest {
                snapshotter: String::new(),
                key: "c1".into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(again, m);
        // Removing a lazy layer under containers is refused as for any parent.
        assert_eq!(
            remove(&svc, &top).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        remove(&svc, "c1").await.unwrap();
        remove(&svc, "v").await.unwrap();
        assert_eq!(fake.mounted(), vec![image_dir.clone()], "c2 still uses it");
        remove(&svc, "c2").await.unwrap();
        assert_eq!(fake.mounted(), Vec::<PathBuf>::new());
        assert_eq!(
            fake.calls().last().unwrap(),
            &format!("unmount {}", image_dir.display())
        );
        assert!(!image_dir.exists(), "its directory is removed");
        // Eager images ask for everything.
        let mut l = HashMap::new();
        l.insert(lazy::LABEL_EAGER.to_string(), "true".to_string());
        prepare(&svc, "c3", &top, l).await.unwrap();
        assert!(
            fake.calls().last().unwrap().ends_with("eager=true"),
            "{:?}",
            fake.calls()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mixed_chains_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let (svc, _) = setup(&fake, dir.path());
        let top = pull(&svc).await;
        prepare(&svc, "o-active", "", HashMap::new()).await.unwrap();
        svc.commit(Request::new(api::CommitSnapshotRequest {
            snapshotter: String::new(),
            name: "o".into(),
            key: "o-active".into(),
            labels: HashMap::new(),
        }))
        .await
        .unwrap();
        // A lazy layer on an ordinary one.
        let e = prepare(&svc, "k", "o", layer_labels("data", "sha256:x", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("ordinary"), "{}", e.message());
        // An ordinary layer (the unpacker's extraction) on lazy ones.
        let mut l = HashMap::new();
        l.insert(LABEL_SNAPSHOT_REF.to_string(), "sha256:y".to_string());
        let e = prepare(&svc, "k", &top, l).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("lazypull layers"), "{}", e.message());
        // Committing a container snapshot on lazy layers.
        prepare(&svc, "c", &top, HashMap::new()).await.unwrap();
        let e = svc
            .commit(Request::new(api::CommitSnapshotRequest {
                snapshotter: String::new(),
                name: "n".into(),
                key: "c".into(),
                labels: HashMap::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("lazypull layers"), "{}", e.message());
        assert_eq!(stat(&svc, "n").await.unwrap_err().code(), Code::NotFound);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cleanup_and_restart_unmount_orphans_and_keep_used_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let (svc, lazy) = setup(&fake, dir.path());
        let top = pull(&svc).await;
        prepare(&svc, "c1", &top, HashMap::new()).await.unwrap();
        let used = lazy.mount_dir(&"aa".repeat(32));
        // A mount a crash left: no snapshot uses it.
        let orphan = lazy.mount_dir(&"cc".repeat(32));
        std::fs::create_dir(&orphan).unwrap();
        fake.mounted.lock().unwrap().push(orphan.clone());
        svc.cleanup(Request::new(api::CleanupRequest {
            snapshotter: String::new(),
        }))
        .await
        .unwrap();
        assert_eq!(fake.mounted(), vec![used.clone()]);
        assert!(!orphan.exists());

        // A restart (the store reopened, the mount still there): kept, and
        // not mounted again.
        drop(svc);
        drop(lazy);
        fake.mounted.lock().unwrap().push(orphan.clone());
        let calls = fake.calls().len();
        let (svc, _) = setup(&fake, dir.path());
        assert_eq!(
            fake.mounted(),
            vec![used.clone()],
            "orphan unmounted at start-up"
        );
        svc.mounts(Request::new(api::MountsRequest {
            snapshotter: String::new(),
            key: "c1".into(),
        }))
        .await
        .unwrap();
        assert_eq!(
            fake.calls().len(),
            calls + 1,
            "only the orphan's unmount: {:?}",
            fake.calls()
        );
        // After a reboot (the mount gone), Mounts mounts it again.
        fake.mounted.lock().unwrap().clear();
        svc.mounts(Request::new(api::MountsRequest {
            snapshotter: String::new(),
            key: "c1".into(),
        }))
        .await
        .unwrap();
        assert_eq!(fake.mounted(), vec![used.clone()]);
        remove(&svc, "c1").await.unwrap();
        assert!(fake.mounted().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn containers_without_reference_or_daemon_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake {
            down: true,
            ..Fake::default()
        });
        let (svc, _) = setup(&fake, dir.path());
        let top = pull(&svc).await;
        let e = prepare(&svc, "c", &top, HashMap::new()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("/x.sock"), "{}", e.message());
        assert_eq!(
            stat(&svc, "c").await.unwrap_err().code(),
            Code::NotFound,
            "not recorded"
        );

        // A chain whose labels name no image.
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let (svc, _) = setup(&fake, dir.path());
        let mut l = layer_labels("meta", &meta(), &[]);
        l.remove(LABEL_IMAGE_REF);
        prepare(&svc, "x", "", l).await.unwrap_err();
        let e = prepare(&svc, "c", &meta(), HashMap::new())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains(LABEL_IMAGE_REF), "{}", e.message());
    }
}
