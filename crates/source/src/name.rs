//! Blob names as the kernel sends them, and why a blob could not be opened.

use std::io;
use std::path::PathBuf;

/// Why a blob could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid blob name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("blob {name:?} not found at {path}")]
    NotFound { name: String, path: PathBuf },
    #[error("blob {name:?} at {path} is not a regular file")]
    NotAFile { name: String, path: PathBuf },
    #[error("cannot open blob {name:?} at {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
}

impl OpenError {
    /// The errno a transport should report for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::InvalidName { .. } => libc::EINVAL,
            OpenError::NotFound { .. } => libc::ENOENT,
            OpenError::NotAFile { .. } => libc::EISDIR,
            OpenError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Checks that a kernel-supplied key is a plain file name: no path separators,
/// no `.`/`..`, no control bytes, at most 255 bytes.
pub fn validate_name(name: &[u8]) -> Result<&str, OpenError> {
    let invalid = |why| OpenError::InvalidName {
        name: String::from_utf8_lossy(name).into_owned(),
        why,
    };
    let s = std::str::from_utf8(name).map_err(|_| invalid("not UTF-8"))?;
    if s.is_empty() {
        return Err(invalid("empty"));
    }
    if s.len() > 255 {
        return Err(invalid("longer than 255 bytes"));
    }
    if s == "." || s == ".." {
        return Err(invalid("is a directory reference"));
    }
    if s.bytes().any(|b| b == b'/' || b < 0x20 || b == 0x7f) {
        return Err(invalid("contains '/' or a control character"));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"../etc/passwd",
            b"x\0y",
            b"\xff\xfe",
            &[b'a'; 256],
        ] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.errno(), libc::EINVAL, "{err}");
        }
        assert_eq!(
            validate_name(b"sha256-abc.meta").unwrap(),
            "sha256-abc.meta"
        );
    }
}
