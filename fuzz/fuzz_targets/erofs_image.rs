//! The EROFS reader (`lazypull_erofs::Image`) on arbitrary bytes: open the
//! image, walk the tree, look every path up again, read every file, list
//! every directory, decode chunk maps and the blob trailer.
//!
//! Input: one mode byte, then the image. Mode bit 0 clear: the superblock
//! checksum is recomputed before parsing (when the image asks for one), so
//! that mutations get past it to the structures behind it; set: the bytes
//! are parsed as they are.
//!
//! Properties: nothing panics, loops or allocates past a bound tied to the
//! input; `walk` starts at the root; each walked path looks up to the inode
//! it was walked to; a directory's entries are strictly sorted; reads stay
//! within the file size and the buffer; chunk extents stay within the file.
#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use lazypull_erofs::layout::{self, FileType, FEATURE_COMPAT_SB_CHKSUM, SUPER_OFFSET};
use lazypull_erofs::Image;
use libfuzzer_sys::fuzz_target;

/// Stand-ins for the data blobs: one scratch file of patterned bytes,
/// opened once per device slot the image can name.
fn blobs() -> &'static [File] {
    static BLOBS: OnceLock<(tempfile::TempDir, Vec<File>)> = OnceLock::new();
    &BLOBS
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("lazypull-fuzz-erofs-")
                .tempdir()
                .expect("scratch directory");
            let path = dir.path().join("blob");
            let bytes: Vec<u8> = (0..(256u32 << 10)).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, bytes).expect("write blob");
            let files = (0..16)
                .map(|_| File::open(&path).expect("open blob"))
                .collect();
            (dir, files)
        })
        .1
}

fn fix_checksum(img: &mut [u8]) {
    if img.len() < layout::BLOCK_SIZE as usize {
        return;
    }
    let sb = &img[SUPER_OFFSET..];
    let compat = u32::from_le_bytes(sb[8..12].try_into().unwrap());
    let blkszbits = sb[12];
    if compat & FEATURE_COMPAT_SB_CHKSUM == 0 || blkszbits != layout::BLOCK_SIZE_BITS {
        return;
    }
    if let Ok(c) = layout::superblock_checksum(img, blkszbits) {
        img[SUPER_OFFSET + 4..SUPER_OFFSET + 8].copy_from_slice(&c.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 0 {
        fix_checksum(&mut bytes);
    }
    let Ok(img) = Image::from_bytes(bytes) else {
        return;
    };
    let _ = img.trailer();
    let len = img.data().len() as u64;
    assert!(img.image_len() <= len);
    let Ok(walk) = img.walk() else {
        // Still read what can be read below the root.
        if let Ok(root) = img.inode(img.root_nid()) {
            let _ = img.read_dir(&root);
        }
        return;
    };
    assert!(walk[0].path.is_empty());
    assert_eq!(walk[0].inode.nid, img.root_nid());
    let blobs = blobs();
    let mut buf = vec![0u8; 8192];
    for w in &walk {
        let inode = &w.inode;
        let found = img.lookup(&w.path).expect("a walked path looks up");
        assert_eq!(found.nid, inode.nid);
        match inode.file_type {
            FileType::Directory => {
                let entries = img.read_dir(inode).expect("walk read this directory");
                assert!(entries.windows(2).all(|p| p[0].name < p[1].name));
            }
            FileType::Symlink => {
                let _ = img.flat_data(inode);
            }
            FileType::Regular => {
                if let Some(map) = &inode.chunks {
                    if let Ok(extents) = map.extents(inode.size) {
                        let total: u64 = extents.iter().map(|e| e.len).sum();
                        assert!(total <= inode.size);
                    }
                    for pos in [0, inode.size / 2, inode.size.saturating_sub(1)] {
                        let _ = map.locate(pos);
                    }
                } else {
                    let _ = img.flat_data(inode);
                }
                for pos in [0, inode.size / 3, inode.size.saturating_sub(100)] {
                    if let Ok(n) = img.read_file_at(inode, blobs, pos, &mut buf) {
                        assert!(n <= buf.len());
                        assert!(pos + n as u64 <= inode.size);
                    }
                }
            }
            _ => {}
        }
    }
});
