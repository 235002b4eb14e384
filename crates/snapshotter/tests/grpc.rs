//! `serve` end to end over its unix socket with the generated tonic client:
//! error codes and messages, `List` filters and batching, `Update` field
//! paths, `Usage`, and a graceful stop that removes the socket.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use api::snapshots_client::SnapshotsClient;
use lazypull_containerd_api::unix::UnixConnector;
use lazypull_snapshotter::proto::containerd::services::snapshots::v1 as api;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

async fn connect(socket: &Path) -> SnapshotsClient<Channel> {
    for _ in 0..500 {
        if socket.exists() {
            let channel = Endpoint::from_static("http://localhost")
                .connect_with_connector(UnixConnector::new(socket))
                .await
                .expect("connect");
            return SnapshotsClient::new(channel);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no socket at {}", socket.display());
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn list(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<(usize, Vec<String>), tonic::Status> {
    let mut stream = c
        .list(api::ListSnapshotsRequest {
            snapshotter: "lazypull".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut messages = 0;
    let mut names = Vec::new();
    while let Some(m) = stream.message().await? {
        messages += 1;
        names.extend(m.info.into_iter().map(|i| i.name));
    }
    Ok((messages, names))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_api_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = lazypull_snapshotter::Config {
        root: dir.path().join("root"),
        address: socket.clone(),
    };
    let server = tokio::spawn(lazypull_snapshotter::serve(config, async {
        let _ = stopped.await;
    }));
    let mut c = connect(&socket).await;

    let prep = |key: &str, parent: &str, l: &[(&str, &str)]| api::PrepareSnapshotRequest {
        snapshotter: "lazypull".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(l),
    };
    let m = c
        .prepare(prep("a", "", &[("x", "1")]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "bind");
    let e = c.prepare(prep("a", "", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains("a"), "{}", e.message());
    let e = c
        .prepare(prep("b", "missing-parent", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("missing-parent")),
        (Code::NotFound, true)
    );
    let e = c.prepare(prep("b", "a", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "an active parent");

    c.commit(api::CommitSnapshotRequest {
        snapshotter: "lazypull".into(),
        name: "base".into(),
        key: "a".into(),
        labels: labels(&[("gc", "keep")]),
    })
    .await
    .unwrap();
    let info = c
        .stat(api::StatSnapshotRequest {
            snapshotter: "".into(),
            key: "base".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, api::Kind::Committed as i32);
    assert!(info.created_at.is_some() && info.updated_at.is_some());
    let e = c
        .stat(api::StatSnapshotRequest {
            snapshotter: "".into(),
            key: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .mounts(api::MountsRequest {
            snapshotter: "".into(),
            key: "base".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    let m = c
        .prepare(prep("child", "base", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");
    assert!(
        m[0].options.iter().any(|o| o.starts_with("lowerdir=")),
        "{:?}",
        m[0].options
    );
    let e = c
        .remove(api::RemoveSnapshotRequest {
            snapshotter: "".into(),
            key: "base".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "a parent with a child");

    // Update: labels.<key> and an immutable field.
    let upd = |paths: &[&str], l: &[(&str, &str)]| api::UpdateSnapshotRequest {
        snapshotter: "".into(),
        info: Some(api::Info {
            name: "child".into(),
            labels: labels(l),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|s| s.to_string()).collect(),
        }),
    };
    let info = c
        .update(upd(&["labels.k"], &[("k", "v"), ("ignored", "x")]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.labels, labels(&[("k", "v")]));
    let e = c.update(upd(&["parent"], &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Usage of an active snapshot is measured now.
    let u = c
        .usage(api::UsageRequest {
            snapshotter: "".into(),
            key: "child".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.inodes, 1, "an empty upper dir");

    // List: filters, and batches of 100.
    for i in 0..230 {
        c.view(api::ViewSnapshotRequest {
            snapshotter: "".into(),
            key: format!("v{i:03}"),
            parent: "base".into(),
            labels: labels(&[("n", &i.to_string())]),
        })
        .await
        .unwrap();
    }
    let (messages, names) = list(&mut c, &[]).await.unwrap();
    assert_eq!((messages, names.len()), (3, 232));
    let (_, names) = list(&mut c, &["kind==active", "labels.n==7"])
        .await
        .unwrap();
    assert_eq!(names, ["child", "v007"]);
    let (_, names) = list(&mut c, &["kind==view,labels.n~=^22[0-9]$"])
        .await
        .unwrap();
    assert_eq!(names.len(), 10);
    let (_, names) = list(&mut c, &["labels.\"gc\""]).await.unwrap();
    assert_eq!(names, ["base"]);
    let e = list(&mut c, &["kind=="]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    c.cleanup(api::CleanupRequest {
        snapshotter: "".into(),
    })
    .await
    .unwrap();

    drop(c);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stops")
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "socket removed on stop");
}
