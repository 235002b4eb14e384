//! Progress reporting for builds, for front ends that draw progress bars.

use std::fmt;
use std::sync::Arc;

/// A stage of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Unpacking a layer from an archive (reported by `lazypull-ingest`,
    /// before the build proper).
    Extracting {
        /// 0-based position of the layer.
        index: usize,
        /// Number of layers.
        count: usize,
        /// What the layer is (path, or archive member).
        label: String,
    },
    /// Chunking, hashing and storing file data.
    Chunking {
        /// Regular files with data.
        files: u64,
        /// Their bytes in all.
        bytes: u64,
    },
    /// Writing the meta blob.
    Meta,
}

/// Receives a build's progress. Called on the building thread; keep it cheap.
pub trait BuildProgress: Send + Sync {
    /// A new stage begins.
    fn stage(&self, stage: Stage);
    /// `bytes` more bytes of file data were chunked.
    fn advance(&self, bytes: u64);
}

/// An optional [`BuildProgress`] observer (no-op when empty).
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<dyn BuildProgress>>);

impl Progress {
    /// Reports to `observer`.
    pub fn new(observer: Arc<dyn BuildProgress>) -> Self {
        Progress(Some(observer))
    }

    /// Reports that `stage` begins (nothing when empty). The builders report
    /// their own stages; callers doing work before a build (extracting
    /// archives, as `lazypull-ingest` does) report theirs with this.
    pub fn stage(&self, stage: Stage) {
        if let Some(p) = &self.0 {
            p.stage(stage);
        }
    }

    pub(crate) fn advance(&self, bytes: u64) {
        if let Some(p) = &self.0 {
            p.advance(bytes);
        }
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(observer)"
        } else {
            "Progress(none)"
        })
    }
}

/// Observers do not change what is built, so any two compare equal.
impl PartialEq for Progress {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Progress {}
