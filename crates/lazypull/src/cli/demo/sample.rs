//! The demo's sample tree, built into lazypull: a few real text files plus
//! generated "libraries" and a data file, so that the image is big (about
//! 130 MiB) and reading a few files fetches a small part of it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub(crate) const OS_RELEASE: &str = include_str!("sample/os-release");
pub(crate) const README: &str = include_str!("sample/README");
pub(crate) const HELLO: &str = include_str!("sample/hello.sh");

/// Generated libraries: `usr/lib/libsample-N.so`, each this big.
pub(crate) const LIBRARIES: usize = 12;
pub(crate) const LIBRARY_BYTES: usize = 8 << 20;
/// `opt/data/model.bin`.
pub(crate) const DATA_BYTES: usize = 32 << 20;
/// Small documentation files under `usr/share/doc/sample`.
pub(crate) const DOCS: usize = 200;

/// Deterministic bytes that do not compress (so sizes mean what they say).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The content of library `n` (for checking what the mount returns).
pub(crate) fn library(n: usize) -> Vec<u8> {
    noise(1000 + n as u64, LIBRARY_BYTES)
}

fn write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// Writes the sample tree into `root`.
pub(crate) fn make(root: &Path) -> io::Result<()> {
    write(&root.join("etc/os-release"), OS_RELEASE.as_bytes(), 0o644)?;
    write(
        &root.join("etc/motd"),
        b"Welcome to a lazily pulled image.\n",
        0o644,
    )?;
    write(&root.join("README"), README.as_bytes(), 0o644)?;
    write(&root.join("usr/bin/hello"), HELLO.as_bytes(), 0o755)?;
    for n in 0..LIBRARIES {
        write(
            &root.join(format!("usr/lib/libsample-{n}.so")),
            &library(n),
            0o755,
        )?;
    }
    std::os::unix::fs::symlink("libsample-0.so", root.join("usr/lib/libsample.so"))?;
    for n in 0..DOCS {
        let text = format!(
            "Sample document {n}.\n{}\n",
            "lazypull fetches only what is read. ".repeat(1 + n % 40)
        );
        write(
            &root.join(format!("usr/share/doc/sample/doc-{n:03}.txt")),
            text.as_bytes(),
            0o644,
        )?;
    }
    write(
        &root.join("opt/data/model.bin"),
        &noise(7, DATA_BYTES),
        0o644,
    )?;
    fs::create_dir_all(root.join("tmp"))?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_is_deterministic_and_as_described() {
        let a = tempfile::tempdir().unwrap();
        make(a.path()).unwrap();
        assert_eq!(
            fs::read(a.path().join("usr/lib/libsample-3.so")).unwrap(),
            library(3)
        );
        assert_eq!(
            fs::read_to_string(a.path().join("etc/os-release")).unwrap(),
            OS_RELEASE
        );
        assert_eq!(
            fs::read_link(a.path().join("usr/lib/libsample.so")).unwrap(),
            Path::new("libsample-0.so")
        );
        assert_ne!(library(1), library(2));
        assert_eq!(
            fs::read_dir(a.path().join("usr/share/doc/sample"))
                .unwrap()
                .count(),
            DOCS
        );
    }
}
