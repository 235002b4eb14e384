//! containerd's snapshots API requests, decoded as tonic decodes them
//! (prost, `lazypull_containerd_api`), served by the snapshotter's real
//! service (`lazypull_snapshotter::Service` over a fresh `Store` and
//! `Lazy` without a daemon), one request after another: keys, parents,
//! labels (lazypull's layer roles among them), commit names, update masks
//! and `List` filter expressions all come from the input.
//!
//! Input: a sequence of requests, each a selector byte (which RPC), a
//! little-endian u16 length and that many bytes of protobuf.
//!
//! Properties: decoding and serving never panic; every decoded request
//! encodes and decodes back to itself; a snapshot a successful Prepare /
//! View made can be stat'ed as active / view; a committed one as committed
//! (and its key is gone); a removed one is not found; the store read back
//! from disk afterwards lists exactly what the service listed last.
#![no_main]

use std::sync::{Arc, OnceLock};

use lazypull_containerd_api::containerd::services::snapshots::v1 as api;
use lazypull_snapshotter::filter::Filter;
use lazypull_snapshotter::lazy::{Lazy, NoDaemon};
use lazypull_snapshotter::mounts::OverlayOptions;
use lazypull_snapshotter::{Service, Store};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

use api::snapshots_server::Snapshots;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .expect("tokio runtime")
    })
}

/// Decodes `bytes` as `M`, checks that it encodes and decodes back to
/// itself, and returns it.
fn decode<M: Message + Default + PartialEq>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded request decodes");
    assert_eq!(again, m);
    Some(m)
}

async fn stat(svc: &Service, key: &str) -> Result<api::Info, Code> {
    svc.stat(Request::new(api::StatSnapshotRequest {
        snapshotter: String::new(),
        key: key.to_string(),
    }))
    .await
    .map(|r| r.into_inner().info.expect("Stat answers an info"))
    .map_err(|s| s.code())
}

async fn list(svc: &Service, filters: Vec<String>) -> Result<Vec<api::Info>, Code> {
    let mut stream = svc
        .list(Request::new(api::ListSnapshotsRequest {
            snapshotter: String::new(),
            filters,
        }))
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.next().await {
        out.extend(batch.expect("List batches are answers").info);
    }
    Ok(out)
}

async fn serve(svc: &Service, mut data: &[u8]) -> Option<Vec<api::Info>> {
    let mut n = 0;
    while data.len() >= 3 && n < 32 {
        n += 1;
        let which = data[0];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
        let body = &data[3..3 + len];
        data = &data[3 + len..];
        match which % 10 {
            0 | 1 => {
                let view = which % 10 == 1;
                let Some(r) = decode::<api::PrepareSnapshotRequest>(body) else {
                    continue;
                };
                let key = r.key.clone();
                let ok = if view {
                    svc.view(Request::new(api::ViewSnapshotRequest {
                        snapshotter: r.snapshotter,
                        key: r.key,
                        parent: r.parent,
                        labels: r.labels,
                    }))
                    .await
                    .is_ok()
                } else {
                    svc.prepare(Request::new(r)).await.is_ok()
                };
                if ok {
                    let want = if view {
                        api::Kind::View
                    } else {
                        api::Kind::Active
                    };
                    let info = stat(svc, &key).await.expect("a prepared snapshot stats");
                    assert_eq!(info.kind, want as i32);
                }
            }
            2 => {
                if let Some(r) = decode::<api::MountsRequest>(body) {
                    if let Ok(m) = svc.mounts(Request::new(r)).await {
                        assert!(!m.into_inner().mounts.is_empty());
                    }
                }
            }
            3 => {
                if let Some(r) = decode::<api::CommitSnapshotRequest>(body) {
                    let (name, key) = (r.name.clone(), r.key.clone());
                    if svc.commit(Request::new(r)).await.is_ok() {
                        let info = stat(svc, &name).await.expect("a committed snapshot stats");
                        assert_eq!(info.kind, api::Kind::Committed as i32);
                        if key != name {
                            assert_eq!(stat(svc, &key).await.err(), Some(Code::NotFound));
                        }
                    }
                }
            }
            4 => {
                if let Some(r) = decode::<api::RemoveSnapshotRequest>(body) {
                    let key = r.key.clone();
                    if svc.remove(Request::new(r)).await.is_ok() {
                        assert_eq!(stat(svc, &key).await.err(), Some(Code::NotFound));
                    }
                }
            }
            5 => {
                if let Some(r) = decode::<api::StatSnapshotRequest>(body) {
                    let _ = svc.stat(Request::new(r)).await;
                }
            }
            6 => {
                if let Some(r) = decode::<api::UpdateSnapshotRequest>(body) {
                    let _ = svc.update(Request::new(r)).await;
                }
            }
            7 => {
                if let Some(r) = decode::<api::ListSnapshotsRequest>(body) {
                    // The filters parse alone as they do in the service.
                    let parsed = Filter::parse_all(&r.filters).is_ok();
                    let listed = list(svc, r.filters).await;
                    assert_eq!(listed.is_ok(), parsed);
                }
            }
            8 => {
                if let Some(r) = decode::<api::UsageRequest>(body) {
                    let _ = svc.usage(Request::new(r)).await;
                }
            }
            _ => {
                if let Some(r) = decode::<api::CleanupRequest>(body) {
                    let _ = svc.cleanup(Request::new(r)).await;
                }
            }
        }
    }
    list(svc, Vec::new()).await.ok()
}

fuzz_target!(|data: &[u8]| {
    let root = tempfile::Builder::new()
        .prefix("lazypull-fuzz-snap-")
        .tempdir()
        .expect("scratch root");
    let listed = {
        let store = Arc::new(Store::open(root.path()).expect("open a fresh store"));
        let lazy = Arc::new(Lazy::open(root.path(), Arc::new(NoDaemon)).expect("lazy dir"));
        let svc = Service::new(store, OverlayOptions::default(), lazy);
        runtime().block_on(serve(&svc, data))
    };
    // What the service answered is what it wrote down.
    let store = Store::open(root.path()).expect("reopen the store");
    let all = store.list(&Filter::default());
    let listed = listed.expect("listing everything works");
    assert_eq!(listed.len(), all.len());
    for (a, b) in listed.iter().zip(&all) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.parent, b.parent);
        assert_eq!(a.labels.len(), b.labels.len());
    }
});
