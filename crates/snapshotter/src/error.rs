//! The snapshotter's errors and how they reach containerd: as the gRPC codes
//! containerd's `errdefs.FromGRPC` turns back into `ErrNotFound`,
//! `ErrAlreadyExists`, `ErrFailedPrecondition` and `ErrInvalidArgument`.

use std::path::PathBuf;

/// What went wrong, with the snapshot key or the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or parent) named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A snapshot by that name exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the call (committed, has children, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed (bad filter, field path, empty key, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A service the snapshotter needs (the lazypull daemon) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A file system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// The operation, e.g. "create directory".
        what: &'static str,
        /// The path it worked on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store file is unreadable or inconsistent.
    #[error("snapshot store {}: {msg}", path.display())]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The store's root is in use by another snapshotter process.
    #[error("snapshotter root {} is in use by another lazypull snapshotter (lock {} is held)", root.display(), root.join("lock").display())]
    Locked {
        /// The --root directory.
        root: PathBuf,
    },
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Io { .. } | Error::Corrupt { .. } | Error::Locked { .. } => {
                tonic::Status::internal(msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_what_errdefs_expects() {
        let cases = [
            (
                Error::NotFound("snapshot a does not exist".into()),
                tonic::Code::NotFound,
            ),
            (Error::AlreadyExists("x".into()), tonic::Code::AlreadyExists),
            (
                Error::FailedPrecondition("x".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::InvalidArgument("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (Error::Unavailable("x".into()), tonic::Code::Unavailable),
        ];
        for (e, code) in cases {
            let s: tonic::Status = e.into();
            assert_eq!(s.code(), code);
        }
        let s: tonic::Status = Error::NotFound("snapshot a does not exist".into()).into();
        assert_eq!(s.message(), "snapshot a does not exist");
    }
}
