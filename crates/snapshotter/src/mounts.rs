//! The mounts a client performs for a snapshot, as containerd 1.6's overlay
//! snapshotter gives them:
//!
//! * no parent: a bind mount of the snapshot's own `fs` (`rw` for active,
//!   `ro` for a view), options `rbind`;
//! * a view of one parent: a read-only bind mount of the parent's `fs`;
//! * otherwise overlay: `lowerdir=` the parents' `fs` dirs, nearest first,
//!   plus `workdir=`/`upperdir=` for an active snapshot; `index=off` where the
//!   kernel's overlay has the `index` feature (so that lower layers shared by
//!   several overlays do not trip its inode index), `userxattr` only in a
//!   user namespace (on kernels from 5.11, not on tmpfs), as containerd
//!   decides it.

use std::path::Path;

use crate::proto::containerd::types::Mount;
use crate::store::{Kind, Snapshot, Store};

/// Overlay options fixed at start-up from the kernel and the root's file system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Add `index=off`.
    pub index_off: bool,
    /// Add `userxattr`.
    pub userxattr: bool,
}

impl OverlayOptions {
    /// Detects them as containerd does for `root`.
    pub fn detect(root: &Path) -> OverlayOptions {
        OverlayOptions {
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            userxattr: needs_userxattr(root),
        }
    }
}

/// containerd's `userns.RunningInUserNS`: not in the initial user namespace.
fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let maj = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    let min = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    (maj, min) >= (major, minor)
}

fn on_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    rustix::fs::statfs(path)
        .map(|s| s.f_type as u64 == TMPFS_MAGIC)
        .unwrap_or(false)
}

/// Real root never needs `userxattr`; in a user namespace it is needed (and
/// known to the kernel) from 5.11 on, except on tmpfs. Older kernels in a user
/// namespace, which containerd probes by test mounts, get none.
fn needs_userxattr(root: &Path) -> bool {
    in_user_namespace() && !on_tmpfs(root) && kernel_at_least(5, 11)
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The mounts for `s`.
pub fn mounts(store: &Store, s: &Snapshot, opts: OverlayOptions) -> Vec<Mount> {
    let bind = |source: &Path, ro: bool| Mount {
        r#type: "bind".into(),
        source: path_string(source),
        target: String::new(),
        options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
    };
    if s.parent_ids.is_empty() {
        return vec![bind(&store.fs_path(s.id), s.kind == Kind::View)];
    }
    if s.kind != Kind::Active && s.parent_ids.len() == 1 {
        return vec![bind(&store.fs_path(s.parent_ids[0]), true)];
    }
    let mut options = Vec::new();
    if opts.index_off {
        options.push("index=off".to_string());
    }
    if opts.userxattr {
        options.push("userxattr".to_string());
    }
    if s.kind == Kind::Active {
        options.push(format!("workdir={}", path_string(&store.work_path(s.id))));
        options.push(format!("upperdir={}", path_string(&store.fs_path(s.id))));
    }
    let lower: Vec<String> = s
        .parent_ids
        .iter()
        .map(|id| path_string(&store.fs_path(*id)))
        .collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

/// The mounts for `s`, a snapshot on a lazy image mounted at `image`: an
/// overlay whose one lower dir is the image (active), or a read-only bind
/// mount of it (view).
pub fn lazy_mounts(store: &Store, s: &Snapshot, image: &Path, opts: OverlayOptions) -> Vec<Mount> {
    if s.kind != Kind::Active {
        return vec![Mount {
            r#type: "bind".into(),
            source: path_string(image),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        }];
    }
    let mut options = Vec::new();
    if opts.index_off {
        options.push("index=off".to_string());
    }
    if opts.userxattr {
        options.push("userxattr".to_string());
    }
    options.push(format!("workdir={}", path_string(&store.work_path(s.id))));
    options.push(format!("upperdir={}", path_string(&store.fs_path(s.id))));
    options.push(format!("lowerdir={}", path_string(image)));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> OverlayOptions {
        OverlayOptions {
            index_off: true,
            userxattr: false,
        }
    }

    #[test]
    fn specs_follow_containerds_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let root = dir.path().display().to_string();
        let snap = |id, kind, parent_ids: &[u64]| Snapshot {
            id,
            kind,
            parent_ids: parent_ids.to_vec(),
        };

        let m = mounts(&store, &snap(1, Kind::Active, &[]), opts());
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.clone()),
            ("bind", format!("{root}/snapshots/1/fs"))
        );
        assert_eq!(m[0].options, ["rw", "rbind"]);

        let m = mounts(&store, &snap(2, Kind::View, &[]), opts());
        assert_eq!(m[0].options, ["ro", "rbind"]);

        let m = mounts(&store, &snap(3, Kind::View, &[1]), opts());
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.clone()),
            ("bind", format!("{root}/snapshots/1/fs"))
        );
        assert_eq!(m[0].options, ["ro", "rbind"]);

        let m = mounts(&store, &snap(4, Kind::Active, &[3, 1]), opts());
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("overlay", "overlay")
        );
        assert_eq!(
            m[0].options,
            [
                "index=off".to_string(),
                format!("workdir={root}/snapshots/4/work"),
                format!("upperdir={root}/snapshots/4/fs"),
                format!("lowerdir={root}/snapshots/3/fs:{root}/snapshots/1/fs"),
            ]
        );

        let with_userxattr = OverlayOptions {
            index_off: false,
            userxattr: true,
        };
        let m = mounts(&store, &snap(5, Kind::View, &[3, 1]), with_userxattr);
        assert_eq!(
            m[0].options,
            [
                "userxattr".to_string(),
                format!("lowerdir={root}/snapshots/3/fs:{root}/snapshots/1/fs")
            ]
        );
    }

    #[test]
    fn real_root_needs_no_userxattr() {
        // This test runs in the initial user namespace, as the snapshotter does.
        if !in_user_namespace() {
            assert!(!needs_userxattr(Path::new("/")));
        }
        assert!(kernel_at_least(3, 0));
        assert!(!kernel_at_least(999, 0));
    }
}
