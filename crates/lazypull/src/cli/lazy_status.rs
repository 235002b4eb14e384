//! The snapshotter's part of `lazypull status`: its snapshots, which lazy
//! image mount each container uses, and per image the bytes the daemon
//! fetched against the image's size, so that an operator sees that an image
//! really is lazy.
//!
//! [`list`] asks the snapshotter (containerd's snapshots API `List` on its
//! own socket); [`join`] is pure: over that listing and the daemon's status
//! (as `lazypull status --json` shows it) it finds every lazy image (a
//! committed snapshot with role `meta`, named `sha256:<meta hex>`), the
//! active and view snapshots whose parent chain ends there (containerd names
//! them `<namespace>/<n>/<key>`, the key being the container id for `ctr
//! run`), and the daemon's image whose fsid is that meta hex (the daemon
//! mounts it at the snapshotter's `<root>/lazy/<meta hex>`) with its blobs'
//! figures.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use lazypull_containerd_api::containerd::services::snapshots::v1 as snapshots;
use lazypull_snapshotter::lazy::{LABEL_CRI_IMAGE_REF, LABEL_IMAGE_REF, LABEL_ROLE};
use serde::Serialize;

use crate::containerd_client::Client;

/// One snapshot as the snapshotter lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) name: String,
    pub(crate) parent: String,
    pub(crate) kind: Kind,
    pub(crate) labels: HashMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    Unknown,
    View,
    Active,
    Committed,
}

impl From<snapshots::Info> for Snapshot {
    fn from(i: snapshots::Info) -> Snapshot {
        let kind = match snapshots::Kind::try_from(i.kind) {
            Ok(snapshots::Kind::View) => Kind::View,
            Ok(snapshots::Kind::Active) => Kind::Active,
            Ok(snapshots::Kind::Committed) => Kind::Committed,
            _ => Kind::Unknown,
        };
        Snapshot {
            name: i.name,
            parent: i.parent,
            kind,
            labels: i.labels,
        }
    }
}

/// A snapshot using a lazy image mount (a container's, or a view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Container {
    /// The snapshot's name in the snapshotter.
    pub(crate) snapshot: String,
    /// containerd's namespace and the key it was given (`ctr run`'s
    /// container id), when the name has containerd's `<ns>/<n>/<key>` form.
    pub(crate) namespace: Option<String>,
    pub(crate) key: String,
    pub(crate) kind: Kind,
}

/// One lazy image the snapshotter holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct LazyImage {
    /// The meta blob's hex digest: the image's EROFS fsid.
    pub(crate) meta: String,
    /// The reference the chain's labels carry (`lazypull pull`'s pinned one,
    /// or CRI's).
    pub(crate) image_ref: Option<String>,
    /// Committed lazy layers on the chain (meta included).
    pub(crate) layers: usize,
    /// Where the daemon serves it (empty: not mounted now).
    pub(crate) mountpoints: Vec<String>,
    /// The daemon's figures for the image's blobs; `None` when the daemon
    /// does not have it registered (no container started it yet) or did not
    /// answer.
    pub(crate) size_bytes: Option<u64>,
    pub(crate) fetched_bytes: Option<u64>,
    pub(crate) cached_bytes: Option<u64>,
    /// The active and view snapshots on it (containers, and views such
    /// as `ctr snapshots view`).
    pub(crate) containers: Vec<Container>,
}

/// The snapshotter's part of the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct SnapshotterStatus {
    pub(crate) socket: String,
    pub(crate) running: bool,
    /// Why the listing failed, if it answered but failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// Snapshots by kind.
    pub(crate) snapshots: BTreeMap<&'static str, usize>,
    pub(crate) lazy_images: Vec<LazyImage>,
}

/// The last `/`-separated part of a snapshot name without `sha256:`, if it
/// is a hex digest: a meta snapshot's meta hex.
fn meta_hex(name: &str) -> Option<&str> {
    let last = name.rsplit('/').next()?;
    let hex = last.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// containerd's `<namespace>/<n>/<key>` split, else the whole name as key.
fn split_key(name: &str) -> (Option<String>, String) {
    let mut parts = name.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(n), Some(key))
            if !ns.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (Some(ns.to_owned()), key.to_owned())
        }
        _ => (None, name.to_owned()),
    }
}

/// The chain of `name`: itself, its parent, ..., up to the root (or to a
/// parent that is not listed); a cycle ends it.
fn chain<'a>(by_name: &HashMap<&str, &'a Snapshot>, name: &str) -> Vec<&'a Snapshot> {
    let mut out: Vec<&Snapshot> = Vec::new();
    let mut next = by_name.get(name).copied();
    while let Some(s) = next {
        if out.len() > by_name.len() || out.iter().any(|o| o.name == s.name) {
            break;
        }
        out.push(s);
        next = if s.parent.is_empty() {
            None
        } else {
            by_name.get(s.parent.as_str()).copied()
        };
    }
    out
}

/// Sums of the daemon's figures for image `fsid`: (mountpoints, size,
/// fetched, cached), or `None` if the daemon does not have it.
fn daemon_figures(daemon: &serde_json::Value, fsid: &str) -> Option<(Vec<String>, u64, u64, u64)> {
    let image = daemon["images"]
        .as_array()?
        .iter()
        .find(|i| i["fsid"].as_str() == Some(fsid))?;
    let bare = |s: &str| s.strip_prefix("sha256:").unwrap_or(s).to_owned();
    let wanted: Vec<String> = image["blobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.as_str().map(bare))
        .collect();
    let (mut size, mut fetched, mut cached) = (0u64, 0u64, 0u64);
    for b in daemon["blobs"].as_array().into_iter().flatten() {
        if b["blob"]
            .as_str()
            .is_some_and(|n| wanted.contains(&bare(n)))
        {
            size += b["size"].as_u64().unwrap_or(0);
            fetched += b["source"]["bytes"].as_u64().unwrap_or(0);
            cached += b["cached_bytes"].as_u64().unwrap_or(0);
        }
    }
    let mountpoints = image["mountpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str().map(str::to_owned))
        .collect();
    Some((mountpoints, size, fetched, cached))
}

/// The lazy images in `listing`, each with the snapshots using it and the
/// daemon's figures (from its status JSON, if it answered). Sorted by meta.
pub(crate) fn join(listing: &[Snapshot], daemon: Option<&serde_json::Value>) -> Vec<LazyImage> {
    let by_name: HashMap<&str, &Snapshot> = listing.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut images: BTreeMap<String, LazyImage> = BTreeMap::new();
    for s in listing {
        if s.kind == Kind::Committed && s.labels.get(LABEL_ROLE).map(String::as_str) == Some("meta")
        {
            if let Some(hex) = meta_hex(&s.name) {
                images.entry(hex.to_owned()).or_insert_with(|| LazyImage {
                    meta: hex.to_owned(),
                    image_ref: None,
                    layers: 0,
                    mountpoints: Vec::new(),
                    size_bytes: None,
                    fetched_bytes: None,
                    cached_bytes: None,
                    containers: Vec::new(),
                });
            }
        }
    }
    for s in listing {
        let c = chain(&by_name, &s.name);
        let Some(root) = c.last() else { continue };
        if root.labels.get(LABEL_ROLE).map(String::as_str) != Some("meta") {
            continue;
        }
        let Some(image) = meta_hex(&root.name).and_then(|h| images.get_mut(h)) else {
            continue;
        };
        let reference = c.iter().find_map(|x| {
            x.labels
                .get(LABEL_IMAGE_REF)
                .or_else(|| x.labels.get(LABEL_CRI_IMAGE_REF))
        });
        match s.kind {
            Kind::Committed if s.labels.contains_key(LABEL_ROLE) => {
                image.layers += 1;
                if image.image_ref.is_none() {
                    image.image_ref = reference.cloned();
                }
            }
            Kind::Active | Kind::View => {
                let (namespace, key) = split_key(&s.name);
                image.containers.push(Container {
                    snapshot: s.name.clone(),
                    namespace,
                    key,
                    kind: s.kind,
                });
            }
            _ => {}
        }
    }
    for image in images.values_mut() {
        image.containers.sort_by(|a, b| a.snapshot.cmp(&b.snapshot));
        if let Some((mountpoints, size, fetched, cached)) =
            daemon.and_then(|d| daemon_figures(d, &image.meta))
        {
            image.mountpoints = mountpoints;
            image.size_bytes = Some(size);
            image.fetched_bytes = Some(fetched);
            image.cached_bytes = Some(cached);
        }
    }
    images.into_values().collect()
}

/// Counts of `listing` by kind.
fn counts(listing: &[Snapshot]) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::from([("active", 0), ("committed", 0), ("view", 0)]);
    for s in listing {
        let k = match s.kind {
            Kind::Active => "active",
            Kind::Committed => "committed",
            Kind::View => "view",
            Kind::Unknown => "unknown",
        };
        *out.entry(k).or_insert(0) += 1;
    }
    out
}

/// Asks the snapshotter at `socket` for its snapshots and joins them with
/// the daemon's status. A socket nobody listens on is "not running", not an
/// error; a listing that fails is reported in [`SnapshotterStatus::error`].
pub(crate) fn status(socket: &Path, daemon: Option<&serde_json::Value>) -> SnapshotterStatus {
    let mut out = SnapshotterStatus {
        socket: socket.display().to_string(),
        running: false,
        error: None,
        snapshots: BTreeMap::new(),
        lazy_images: Vec::new(),
    };
    if std::os::unix::net::UnixStream::connect(socket).is_err() {
        return out;
    }
    out.running = true;
    match list(socket) {
        Ok(listing) => {
            out.snapshots = counts(&listing);
            out.lazy_images = join(&listing, daemon);
        }
        Err(e) => out.error = Some(format!("{e:#}")),
    }
    out
}

/// The snapshotter's `List`, on a runtime of its own (this is a blocking
/// CLI call).
fn list(socket: &Path) -> anyhow::Result<Vec<Snapshot>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let call = async {
            let client = Client::connect(socket, crate::containerd_client::DEFAULT_NAMESPACE)
                .await
                .map_err(|e| match e {
                    // Not containerd's hint (`--address`): this is the
                    // snapshotter's socket.
                    crate::containerd_client::Error::Unreachable { detail, .. } => {
                        anyhow::anyhow!("snapshotter unreachable at {}: {detail}", socket.display())
                    }
                    e => anyhow::Error::from(e),
                })?;
            client
                .list_snapshots("lazypull")
                .await
                .map_err(anyhow::Error::from)
        };
        let infos = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the snapshotter at {} did not answer List in 10 s",
                    socket.display()
                )
            })??;
        Ok(infos.into_iter().map(Snapshot::from).collect())
    })
}

/// Human-readable lines of `s`.
pub(crate) fn render(s: &SnapshotterStatus) -> Vec<String> {
    if !s.running {
        return vec![format!("snapshotter: not running at {}", s.socket)];
    }
    if let Some(e) = &s.error {
        return vec![format!("snapshotter at {}: {e}", s.socket)];
    }
    let mut lines = vec![format!(
        "snapshotter at {}: {} snapshots ({})",
        s.socket,
        s.snapshots.values().sum::<usize>(),
        s.snapshots
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )];
    if s.lazy_images.is_empty() {
        lines.push("  no lazy images".into());
        return lines;
    }
    let bytes = |b: Option<u64>| {
        b.map(|b| indicatif::HumanBytes(b).to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![[
        "IMAGE".to_string(),
        "META".into(),
        "MOUNTED AT".into(),
        "FETCHED".into(),
        "OF SIZE".into(),
        "CONTAINERS".into(),
    ]];
    for i in &s.lazy_images {
        let share = match (i.fetched_bytes, i.size_bytes) {
            (Some(f), Some(t)) if t > 0 => format!(" ({:.1}%)", f as f64 * 100.0 / t as f64),
            _ => String::new(),
        };
        let users: Vec<String> = i
            .containers
            .iter()
            .map(|u| match (&u.namespace, u.kind) {
                (Some(ns), Kind::View) => format!("{ns}/{} (view)", u.key),
                (Some(ns), _) => format!("{ns}/{}", u.key),
                (None, Kind::View) => format!("{} (view)", u.key),
                (None, _) => u.key.clone(),
            })
            .collect();
        rows.push([
            i.image_ref.clone().unwrap_or_else(|| "?".into()),
            i.meta.chars().take(12).collect(),
            if i.mountpoints.is_empty() {
                "-".into()
            } else {
                i.mountpoints.join(",")
            },
            format!("{}{share}", bytes(i.fetched_bytes)),
            bytes(i.size_bytes),
            if users.is_empty() {
                "-".into()
            } else {
                users.join(", ")
            },
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let mut line = String::from(" ");
        for (c, cell) in r.iter().enumerate() {
            line.push(' ');
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}", w = widths[c]));
                line.push(' ');
            }
        }
        lines.push(line.trim_end().to_owned());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn snap(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Two lazy images (one with two containers and a view, one unused), an
    /// ordinary chain with a container, and a dangling parent.
    fn listing() -> Vec<Snapshot> {
        let r = "127.0.0.1:5000/py@sha256:abc";
        vec![
            snap(
                &format!("sha256:{META}"),
                "",
                Kind::Committed,
                &[(LABEL_ROLE, "meta"), (LABEL_IMAGE_REF, r)],
            ),
            snap(
                "sha256:t1",
                &format!("sha256:{META}"),
                Kind::Committed,
                &[(LABEL_ROLE, "table"), (LABEL_IMAGE_REF, r)],
            ),
            snap(
                "sha256:d1",
                "sha256:t1",
                Kind::Committed,
                &[(LABEL_ROLE, "data"), (LABEL_IMAGE_REF, r)],
            ),
            snap("default/7/c1", "sha256:d1", Kind::Active, &[]),
            snap("k8s.io/9/c2", "sha256:d1", Kind::Active, &[]),
            snap("default/8/v1", "sha256:d1", Kind::View, &[]),
            snap(
                &format!("sha256:{OTHER}"),
                "",
                Kind::Committed,
                &[(LABEL_ROLE, "meta"), (LABEL_CRI_IMAGE_REF, "docker.io/x:1")],
            ),
            snap("default/3/sha256:ordinary", "", Kind::Committed, &[]),
            snap(
                "default/4/plain",
                "default/3/sha256:ordinary",
                Kind::Active,
                &[],
            ),
            snap("default/5/orphan", "sha256:gone", Kind::Active, &[]),
        ]
    }

    fn daemon() -> serde_json::Value {
        serde_json::json!({
            "images": [
                {"fsid": META, "reference": "r", "blobs": ["sha256:aa", "bb"],
                 "mountpoints": ["/var/lib/lazypull/snapshotter/lazy/1111"]},
                {"fsid": "unrelated", "blobs": ["cc"], "mountpoints": []}
            ],
            "blobs": [
                {"blob": "aa", "size": 1000, "cached_bytes": 100, "source": {"bytes": 120}},
                {"blob": "sha256:bb", "size": 3000, "cached_bytes": 50, "source": {"bytes": 60}},
                {"blob": "cc", "size": 99999, "cached_bytes": 99999, "source": {"bytes": 99999}}
            ]
        })
    }

    #[test]
    fn containers_join_the_image_their_chain_leads_to() {
        let d = daemon();
        let images = join(&listing(), Some(&d));
        assert_eq!(images.len(), 2, "{images:#?}");
        let py = &images[0];
        assert_eq!(py.meta, META);
        assert_eq!(
            py.image_ref.as_deref(),
            Some("127.0.0.1:5000/py@sha256:abc")
        );
        assert_eq!(py.layers, 3);
        let users: Vec<(Option<&str>, &str, Kind)> = py
            .containers
            .iter()
            .map(|u| (u.namespace.as_deref(), u.key.as_str(), u.kind))
            .collect();
        assert_eq!(
            users,
            [
                (Some("default"), "c1", Kind::Active),
                (Some("default"), "v1", Kind::View),
                (Some("k8s.io"), "c2", Kind::Active)
            ]
        );
        // Only the image's own blobs, digests with or without `sha256:`.
        assert_eq!(
            (py.size_bytes, py.fetched_bytes, py.cached_bytes),
            (Some(4000), Some(180), Some(150))
        );
        assert_eq!(py.mountpoints, ["/var/lib/lazypull/snapshotter/lazy/1111"]);

        let other = &images[1];
        assert_eq!(other.meta, OTHER);
        assert_eq!(other.image_ref.as_deref(), Some("docker.io/x:1"));
        assert!(other.containers.is_empty());
        assert_eq!(
            (other.size_bytes, other.fetched_bytes),
            (None, None),
            "not registered with the daemon"
        );
    }

    #[test]
    fn without_the_daemon_the_snapshots_still_join() {
        let images = join(&listing(), None);
        assert_eq!(images[0].containers.len(), 3);
        assert_eq!(images[0].fetched_bytes, None);
        assert!(images[0].mountpoints.is_empty());
    }

    #[test]
    fn a_parent_cycle_or_a_non_meta_root_joins_nothing() {
        let l = vec![
            snap("a", "b", Kind::Active, &[]),
            snap("b", "a", Kind::Committed, &[(LABEL_ROLE, "data")]),
            snap(
                &format!("sha256:{META}"),
                "",
                Kind::Committed,
                &[(LABEL_ROLE, "table")],
            ),
        ];
        assert_eq!(join(&l, None), Vec::new());
    }

    #[test]
    fn keys_split_as_containerd_names_them() {
        assert_eq!(
            split_key("default/12/c1"),
            (Some("default".into()), "c1".into())
        );
        assert_eq!(
            split_key("default/12/extract-1 sha256:x/y"),
            (Some("default".into()), "extract-1 sha256:x/y".into())
        );
        assert_eq!(split_key("c1"), (None, "c1".into()));
        assert_eq!(split_key("a/b/c"), (None, "a/b/c".into()));
        assert_eq!(meta_hex(&format!("default/3/sha256:{META}")), Some(META));
        assert_eq!(meta_hex("sha256:ABC"), None);
    }

    #[test]
    fn renders_a_table_and_a_missing_snapshotter() {
        let d = daemon();
        let listing = listing();
        let s = SnapshotterStatus {
            socket: "/run/s.sock".into(),
            running: true,
            error: None,
            snapshots: counts(&listing),
            lazy_images: join(&listing, Some(&d)),
        };
        let lines = render(&s);
        assert_eq!(
            lines[0],
            "snapshotter at /run/s.sock: 10 snapshots (4 active, 5 committed, 1 view)"
        );
        assert!(
            lines[1].contains("IMAGE") && lines[1].contains("CONTAINERS"),
            "{lines:?}"
        );
        assert!(
            lines[2].contains("127.0.0.1:5000/py@sha256:abc")
                && lines[2].contains("180 B (4.5%)")
                && lines[2].ends_with("default/c1, default/v1 (view), k8s.io/c2"),
            "{lines:?}"
        );
        assert!(
            lines[3].contains("docker.io/x:1") && lines[3].ends_with('-'),
            "{lines:?}"
        );
        let gone = SnapshotterStatus {
            running: false,
            ..s
        };
        assert_eq!(render(&gone), ["snapshotter: not running at /run/s.sock"]);
    }
}
