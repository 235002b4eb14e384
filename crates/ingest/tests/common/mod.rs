//! Helpers for the integration tests: the two that `sources.rs` needs, the
//! same as `crates/erofs/tests/common` has (the reader's view of an image as a
//! testkit manifest is erofs-specific, so it is not in `lazypull-testkit`,
//! which does not depend on the format crate).

use std::fs::File;

use lazypull_erofs::layout::FileType;
use lazypull_erofs::Image;
use lazypull_testkit::manifest::assign_links;
use lazypull_testkit::{Entry, Kind};
use sha2::{Digest, Sha256};

/// The testkit manifest of an image as seen by this crate's reader (no
/// kernel involved): file contents are read through the chunk maps from
/// `blobs` (device table order).
pub fn image_manifest(img: &Image, blobs: &[File]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for w in img.walk().expect("walk") {
        let i = &w.inode;
        let kind = match i.file_type {
            FileType::Directory => Kind::Dir,
            FileType::Regular => Kind::File,
            FileType::Symlink => Kind::Symlink,
            FileType::CharDevice => Kind::CharDev,
            FileType::BlockDevice => Kind::BlockDev,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::Unknown => panic!("unknown inode type"),
        };
        let sha256 = (kind == Kind::File).then(|| {
            let mut h = Sha256::new();
            let mut pos = 0;
            while pos < i.size {
                let n = img.read_file_at(i, blobs, pos, &mut buf).expect("read");
                assert!(n > 0);
                h.update(&buf[..n]);
                pos += n as u64;
            }
            h.finalize().into()
        });
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = i
            .xattrs
            .iter()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        xattrs.sort();
        out.push(Entry {
            path: if w.path.is_empty() {
                b".".to_vec()
            } else {
                w.path.clone()
            },
            kind,
            perm: i.mode & 0o7777,
            uid: i.uid,
            gid: i.gid,
            size: matches!(kind, Kind::File | Kind::Symlink).then_some(i.size),
            mtime: i.mtime,
            mtime_nsec: i.mtime_nsec,
            rdev: i.rdev,
            target: i.symlink_target.clone(),
            xattrs,
            sha256,
            link: None,
            inode: (0, 0, i.nid),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    assign_links(&mut out);
    out
}

/// Sets `path`'s mtime (and atime) without following a symlink.
pub fn set_mtime(path: &std::path::Path, sec: i64, nsec: u32) {
    let ts = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: i64::from(nsec),
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}
