//! Credentials kubelet sent with a CRI `PullImage`, handed over by
//! `lazypull cri-proxy` after the pull succeeded: kept in memory only, per
//! registry host and repository (the scope kubelet found them for), and used
//! when an image of that repository is registered without credentials of
//! its own (as the snapshotter registers the images CRI pulled).
//!
//! They are kept while an image registered (or being restored) from their
//! repository uses them; others are dropped once [`UNUSED_GRACE`] old (a
//! pull is followed by its container within seconds). A newer pull's
//! credentials replace older ones of the same repository.
//!
//! To outlive the daemon they never touch a file system: each change is
//! written into a fresh sealed memfd (the [`snapshot`](KubeletCredentials::snapshot)),
//! which the daemon parks in the fd store; a successor reads it back
//! ([`KubeletCredentials::load`]) before it re-registers the images, so a
//! mount keeps reading after the daemon restarts. Whoever kills the fd store
//! kills the mounts too.
//!
//! It owns this store and its serial form; it must not touch the fd store
//! (the daemon's handover does) nor the registry client.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use lazypull_backend::registry::{Credentials, Reference};
use serde::{Deserialize, Serialize};

/// How long credentials no registered image uses are kept.
pub(crate) const UNUSED_GRACE: Duration = Duration::from_secs(600);

/// Most repositories kept at once (a bound on what a caller of the control
/// socket can make the daemon hold).
const MAX_ENTRIES: usize = 4096;

/// The serial form's version.
const VERSION: u32 = 1;

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    registry: String,
    repository: String,
    username: String,
    secret: String,
    /// When they arrived (seconds since the epoch).
    received: u64,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    entries: Vec<Entry>,
}

/// The registry host and repository an image name is in, as containerd
/// normalises a kubelet image name: no host means docker.io, and a
/// one-component name on docker.io is under `library/`.
pub(crate) fn scope_of(image: &str) -> anyhow::Result<(String, String)> {
    let first = image.split('/').next().unwrap_or("");
    let explicit_host =
        image.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if explicit_host {
        image.to_owned()
    } else if image.contains('/') {
        format!("docker.io/{image}")
    } else {
        format!("docker.io/library/{image}")
    };
    let r = Reference::parse(&full).with_context(|| format!("image name {image:?}"))?;
    Ok((r.registry.to_ascii_lowercase(), r.repository))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The store.
#[derive(Default)]
pub(crate) struct KubeletCredentials {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

impl std::fmt::Debug for KubeletCredentials {
    /// The scopes only: never a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.lock().keys()).finish()
    }
}

impl KubeletCredentials {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `username`/`secret` for the repository of `image`; returns its
    /// (registry, repository).
    pub(crate) fn put(
        &self,
        image: &str,
        username: &str,
        secret: &str,
    ) -> anyhow::Result<(String, String)> {
        if username.is_empty() || secret.is_empty() {
            bail!("credentials for {image} need both a username and a secret");
        }
        let (registry, repository) = scope_of(image)?;
        let mut entries = self.lock();
        let key = (registry.clone(), repository.clone());
        if !entries.contains_key(&key) && entries.len() >= MAX_ENTRIES {
            bail!("the daemon holds kubelet credentials for {MAX_ENTRIES} repositories already");
        }
        entries.insert(
            key,
            Entry {
                registry: registry.clone(),
                repository: repository.clone(),
                username: username.to_owned(),
                secret: secret.to_owned(),
                received: now(),
            },
        );
        Ok((registry, repository))
    }

    /// The credentials for `repository` at `registry`, if kubelet sent some.
    pub(crate) fn get(&self, registry: &str, repository: &str) -> Option<Credentials> {
        self.lock()
            .get(&(registry.to_ascii_lowercase(), repository.to_owned()))
            .map(|e| Credentials {
                username: e.username.clone(),
                password: e.secret.clone(),
            })
    }

    /// How many repositories it holds credentials for.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The repositories it holds credentials for, `registry/repository`,
    /// sorted.
    pub(crate) fn scopes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .keys()
            .map(|(r, p)| format!("{r}/{p}"))
            .collect();
        v.sort();
        v
    }

    /// Drops the credentials of repositories no image in `in_use`
    /// ((registry, repository) pairs) is from, once [`UNUSED_GRACE`] old.
    /// Returns whether anything was dropped.
    pub(crate) fn prune(&self, in_use: &[(String, String)]) -> bool {
        let cutoff = now().saturating_sub(UNUSED_GRACE.as_secs());
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|k, e| e.received > cutoff || in_use.contains(k));
        entries.len() != before
    }

    /// The whole store in its serial form (JSON), for the fd store.
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        let mut entries: Vec<Entry> = self.lock().values().cloned().collect();
        entries.sort_by(|a, b| (&a.registry, &a.repository).cmp(&(&b.registry, &b.repository)));
        serde_json::to_vec(&Snapshot {
            version: VERSION,
            entries,
        })
        .unwrap_or_default()
    }

    /// Adds what a predecessor's [`snapshot`](Self::snapshot) held; returns
    /// how many repositories.
    pub(crate) fn load(&self, bytes: &[u8]) -> anyhow::Result<usize> {
        let s: Snapshot = serde_json::from_slice(bytes)
            .context("the kubelet credentials a previous daemon left are not readable")?;
        if s.version != VERSION {
            bail!(
                "the kubelet credentials a previous daemon left are in format version {}, this daemon reads {VERSION}",
                s.version
            );
        }
        let n = s.entries.len();
        let mut entries = self.lock();
        for e in s.entries {
            entries.insert((e.registry.clone(), e.repository.clone()), e);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_scoped_as_containerd_normalises_them() {
        let s = |i| scope_of(i).unwrap();
        assert_eq!(s("nginx"), ("docker.io".into(), "library/nginx".into()));
        assert_eq!(s("team/app:v1"), ("docker.io".into(), "team/app".into()));
        assert_eq!(
            s("Registry.LAN:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000"),
            ("registry.lan:5000".into(), "team/app".into())
        );
        assert_eq!(s("localhost/app"), ("localhost".into(), "app".into()));
        assert!(scope_of("bad name").is_err());
    }

    #[test]
    fn credentials_are_per_repository_and_survive_a_snapshot() {
        let store = KubeletCredentials::default();
        store
            .put("registry.lan/team/app:v1", "alice", "s3cret")
            .unwrap();
        store
            .put("registry.lan/team/app:v2", "alice", "newer")
            .unwrap();
        assert_eq!(store.len(), 1, "one entry per repository, the newest");
        assert_eq!(
            store.get("registry.lan", "team/app").unwrap().password,
            "newer"
        );
        assert_eq!(
            store.get("registry.lan", "team/other"),
            None,
            "scoped to the repository"
        );
        assert_eq!(store.get("other.lan", "team/app"), None, "and to the host");
        assert!(store.put("registry.lan/x", "", "p").is_err());

        let successor = KubeletCredentials::default();
        assert_eq!(successor.load(&store.snapshot()).unwrap(), 1);
        assert_eq!(
            successor.get("REGISTRY.lan", "team/app").unwrap().username,
            "alice"
        );
        assert!(successor.load(b"{\"version\":9,\"entries\":[]}").is_err());
        assert!(successor.load(b"not json").is_err());
    }

    #[test]
    fn unused_credentials_go_after_the_grace_time() {
        let store = KubeletCredentials::default();
        store.put("registry.lan/used", "u", "p").unwrap();
        store.put("registry.lan/unused", "u", "p").unwrap();
        assert!(!store.prune(&[]), "both are fresh");
        for e in store.lock().values_mut() {
            e.received -= UNUSED_GRACE.as_secs() + 1;
        }
        assert!(store.prune(&[("registry.lan".into(), "used".into())]));
        assert!(store.get("registry.lan", "used").is_some());
        assert!(store.get("registry.lan", "unused").is_none());
    }
}
