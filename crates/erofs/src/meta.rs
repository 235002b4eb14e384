//! The meta blob: an EROFS image (4 KiB blocks) holding the superblock,
//! device table, inodes, xattrs, directories and symlinks, with regular file
//! data referenced through chunk indexes into the data blobs.
//!
//! Layout of the blob:
//!
//! ```text
//! block 0:  [0..1024 zero][superblock @1024][device table @1152, 128 B/slot]
//!           [inodes, 32-byte aligned, starting right after the table ...
//! ...        ... inodes continue (nid = byte offset / 32, meta_blkaddr = 0)]
//! then:     directory / symlink blocks that are not stored inline
//! ```
//!
//! Inodes are laid out breadth-first from the root (the root comes first, so
//! its nid fits the superblock's 16-bit field), each directory's children
//! consecutively. An inode whose header, inline xattrs and inline tail fit
//! in one block never straddles a block boundary (the kernel rejects inline
//! data that crosses one).

use std::collections::VecDeque;

use sha2::{Digest, Sha256};

use crate::blob::ChunkRef;
use crate::layout::{
    self, ChunkIndex, DataLayout, DeviceSlot, Dirent, FileType, InodeHeader, InodeVersion,
    SuperBlock, XattrEntry, XattrIbodyHeader, BLOCK_SIZE,
};
use crate::tree::{Node, NodeId, NodeKind, Tree};
use crate::BuildError;

/// One data blob as listed in the device table.
pub(crate) struct DeviceInfo {
    pub tag: [u8; layout::DEVICE_TAG_LEN],
    pub blocks: u32,
}

/// Numbers about the meta blob, for [`crate::BuiltImage`].
#[derive(Debug, Default)]
pub(crate) struct MetaStats {
    pub inodes: u64,
    pub files: u64,
    pub bytes: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
}

const BS: u64 = BLOCK_SIZE;
const DEVT_OFFSET: u64 = (layout::SUPER_OFFSET + layout::SUPER_BLOCK_SIZE) as u64;

/// A planned dirent: name, target, type.
type PlannedDirent = (Vec<u8>, NodeId, FileType);

/// Per-inode plan.
struct Plan {
    node: NodeId,
    version: InodeVersion,
    layout: DataLayout,
    size: u64,
    nlink: u32,
    xattr_body: Vec<u8>,
    xattr_icount: u16,
    /// Directory: the entries of each dirent block (name, target, type).
    dir_blocks: Vec<Vec<PlannedDirent>>,
    /// Bytes stored right after the inode (FLAT_INLINE tail).
    inline_len: u64,
    /// Whole blocks in the data area (FLAT_PLAIN / FLAT_INLINE body).
    plain_blocks: u64,
    chunks: u64,
    iloc: u64,
    blkaddr: u32,
}

fn too_large(what: &str) -> BuildError {
    BuildError::TooLarge { what: what.into() }
}

/// Encode inline xattrs: `(ibody bytes, i_xattr_icount)`.
fn encode_xattrs(node: &Node) -> Result<(Vec<u8>, u16), BuildError> {
    if node.meta.xattrs.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut entries = Vec::new();
    for (name, value) in &node.meta.xattrs {
        let bad = || BuildError::UnsupportedXattr {
            path: node.source.clone(),
            name: String::from_utf8_lossy(name).into_owned(),
        };
        let (index, suffix) = layout::xattr_split_name(name).ok_or_else(bad)?;
        let too_big = || BuildError::XattrTooLarge {
            path: node.source.clone(),
            name: String::from_utf8_lossy(name).into_owned(),
        };
        let e = XattrEntry {
            name_len: u8::try_from(suffix.len()).map_err(|_| too_big())?,
            name_index: index,
            value_size: u16::try_from(value.len()).map_err(|_| too_big())?,
        };
        let start = entries.len();
        entries.resize(start + e.total_size(), 0);
        e.encode(&mut entries[start..])
            .map_err(|_| too_large("xattr entry"))?;
        let p = start + layout::XATTR_ENTRY_SIZE;
        entries[p..p + suffix.len()].copy_from_slice(suffix);
        entries[p + suffix.len()..p + suffix.len() + value.len()].copy_from_slice(value);
    }
    let icount =
        layout::xattr_icount_for(entries.len()).map_err(|_| BuildError::XattrTooLarge {
            path: node.source.clone(),
            name: "(all xattrs together)".into(),
        })?;
    let mut body = vec![0u8; layout::XATTR_IBODY_HEADER_SIZE];
    XattrIbodyHeader::default()
        .encode(&mut body)
        .map_err(|_| too_large("xattr header"))?;
    body.extend_from_slice(&entries);
    debug_assert_eq!(body.len(), layout::xattr_ibody_size(icount));
    Ok((body, icount))
}

/// Pack sorted dirents into blocks: dirents first, then names; a block
/// never splits an entry or a name.
fn pack_dir(entries: Vec<PlannedDirent>) -> (Vec<Vec<PlannedDirent>>, u64) {
    let mut blocks = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0u64;
    for e in entries {
        let need = (layout::DIRENT_SIZE + e.0.len()) as u64;
        if used + need > BS {
            blocks.push(std::mem::take(&mut cur));
            used = 0;
        }
        used += need;
        cur.push(e);
    }
    blocks.push(cur);
    let size = (blocks.len() as u64 - 1) * BS + used;
    (blocks, size)
}

fn encode_dir_block(
    entries: &[PlannedDirent],
    nids: &[u64],
    out: &mut [u8],
) -> Result<(), BuildError> {
    let mut nameoff = entries.len() * layout::DIRENT_SIZE;
    for (i, (name, target, ft)) in entries.iter().enumerate() {
        let d = Dirent {
            nid: nids[*target],
            nameoff: u16::try_from(nameoff).map_err(|_| too_large("dirent nameoff"))?,
            file_type: ft.raw(),
        };
        d.encode(&mut out[i * layout::DIRENT_SIZE..])
            .map_err(|_| too_large("dirent"))?;
        out[nameoff..nameoff + name.len()].copy_from_slice(name);
        nameoff += name.len();
    }
    Ok(())
}

/// Build the meta blob.
pub(crate) fn build_meta(
    tree: &Tree,
    chunk_maps: &[Vec<ChunkRef>],
    devices: &[DeviceInfo],
    chunk_size: u32,
    build_time: Option<u64>,
) -> Result<(Vec<u8>, MetaStats), BuildError> {
    let n = tree.nodes.len();
    let root = tree.root;

    // 1. Inode order (breadth-first), parents and link counts.
    let mut slot: Vec<Option<usize>> = vec![None; n];
    let mut parent: Vec<NodeId> = vec![root; n];
    let mut nlink: Vec<u64> = vec![0; n];
    let mut order: Vec<NodeId> = vec![root];
    slot[root] = Some(0);
    let mut queue = VecDeque::from([root]);
    while let Some(d) = queue.pop_front() {
        nlink[d] += 2;
        let NodeKind::Dir { children } = &tree.nodes[d].kind else {
            unreachable!("queue holds directories only")
        };
        for &c in children.values() {
            if matches!(tree.nodes[c].kind, NodeKind::Dir { .. }) {
                nlink[d] += 1;
                parent[c] = d;
                queue.push_back(c);
            } else {
                nlink[c] += 1;
            }
            if slot[c].is_none() {
                slot[c] = Some(order.len());
                order.push(c);
            }
        }
    }

    // 2. Build time: the newest mtime in the image unless given.
    let (bt_sec, bt_nsec) = match build_time {
        Some(t) => (t, 0),
        None => {
            let m = order
                .iter()
                .map(|&id| (tree.nodes[id].meta.mtime, tree.nodes[id].meta.mtime_nsec))
                .max()
                .unwrap_or((0, 0));
            if m.0 < 0 {
                (0, 0)
            } else {
                (m.0 as u64, m.1)
            }
        }
    };

    // 3. Per-inode plans.
    let chunkbits = chunk_size.trailing_zeros() as u16 - u16::from(layout::BLOCK_SIZE_BITS);
    let mut stats = MetaStats {
        inodes: order.len() as u64,
        build_time: bt_sec,
        build_time_nsec: bt_nsec,
        ..MetaStats::default()
    };
    let mut plans = Vec::with_capacity(order.len());
    for &id in &order {
        let node = &tree.nodes[id];
        let (xattr_body, xattr_icount) = encode_xattrs(node)?;
        let nl = u32::try_from(nlink[id]).map_err(|_| too_large("link count"))?;
        let mut plan = Plan {
            node: id,
            version: InodeVersion::Extended,
            layout: DataLayout::FlatPlain,
            size: 0,
            nlink: nl,
            xattr_body,
            xattr_icount,
            dir_blocks: Vec::new(),
            inline_len: 0,
            plain_blocks: 0,
            chunks: 0,
            iloc: 0,
            blkaddr: 0,
        };
        match &node.kind {
            NodeKind::Dir { children } => {
                let mut entries: Vec<PlannedDirent> = children
                    .iter()
                    .map(|(name, &c)| (name.clone(), c, tree.nodes[c].file_type()))
                    .collect();
                entries.push((b".".to_vec(), id, FileType::Directory));
                entries.push((b"..".to_vec(), parent[id], FileType::Directory));
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                let (blocks, size) = pack_dir(entries);
                plan.dir_blocks = blocks;
                plan.size = size;
            }
            NodeKind::Symlink { target } => plan.size = target.len() as u64,
            NodeKind::File { size, .. } => {
                plan.size = *size;
                stats.files += 1;
                stats.bytes += *size;
                if *size > 0 {
                    plan.layout = DataLayout::ChunkBased;
                    plan.chunks = size.div_ceil(u64::from(chunk_size));
                }
            }
            _ => {}
        }
        let compact = node.meta.uid <= 0xFFFF
            && node.meta.gid <= 0xFFFF
            && nl <= 0xFFFF
            && plan.size <= u64::from(u32::MAX)
            && node.meta.mtime >= 0
            && node.meta.mtime as u64 == bt_sec
            && node.meta.mtime_nsec == bt_nsec;
        if compact {
            plan.version = InodeVersion::Compact;
        }
        if matches!(node.kind, NodeKind::Dir { .. } | NodeKind::Symlink { .. }) {
            let nblocks = plan.size.div_ceil(BS);
            let tail = plan.size - (nblocks - 1) * BS;
            let head = plan.version.size() as u64 + plan.xattr_body.len() as u64;
            if head + tail <= BS {
                plan.layout = DataLayout::FlatInline;
                plan.inline_len = tail;
                plan.plain_blocks = nblocks - 1;
            } else {
                plan.plain_blocks = nblocks;
            }
        }
        plans.push(plan);
    }

    // 4. Allocate inode slots, then data blocks.
    let ndev = devices.len() as u64;
    let mut pos = (DEVT_OFFSET + ndev * layout::DEVICE_SLOT_SIZE as u64)
        .next_multiple_of(layout::INODE_SLOT_SIZE);
    for plan in &mut plans {
        let head = plan.version.size() as u64 + plan.xattr_body.len() as u64 + plan.inline_len;
        if head <= BS && pos % BS + head > BS {
            pos = pos.next_multiple_of(BS);
        }
        plan.iloc = pos;
        let mut end = pos + plan.version.size() as u64 + plan.xattr_body.len() as u64;
        if plan.layout == DataLayout::ChunkBased {
            end = end.next_multiple_of(layout::CHUNK_INDEX_SIZE as u64)
                + plan.chunks * layout::CHUNK_INDEX_SIZE as u64;
        } else {
            end += plan.inline_len;
        }
        pos = end.next_multiple_of(layout::INODE_SLOT_SIZE);
    }
    let mut next_blk = pos.div_ceil(BS);
    for plan in &mut plans {
        if plan.plain_blocks > 0 {
            plan.blkaddr = u32::try_from(next_blk).map_err(|_| too_large("meta blob"))?;
            next_blk += plan.plain_blocks;
        }
    }
    let total_blocks = u32::try_from(next_blk).map_err(|_| too_large("meta blob"))?;
    let total = usize::try_from(next_blk * BS).map_err(|_| too_large("meta blob"))?;
    let mut nids = vec![0u64; n];
    for plan in &plans {
        nids[plan.node] = plan.iloc / layout::INODE_SLOT_SIZE;
    }
    let root_nid = u16::try_from(nids[root]).map_err(|_| too_large("root nid"))?;

    // 5. Encode.
    let mut meta = vec![0u8; total];
    for (i, plan) in plans.iter().enumerate() {
        let node = &tree.nodes[plan.node];
        let i_u = match &node.kind {
            NodeKind::Dir { .. } | NodeKind::Symlink { .. } => plan.blkaddr,
            NodeKind::File { .. } if plan.layout == DataLayout::ChunkBased => {
                u32::from(chunkbits | layout::CHUNK_FORMAT_INDEXES)
            }
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                layout::new_encode_dev(*major, *minor)
            }
            _ => 0,
        };
        let hdr = InodeHeader {
            format: InodeHeader::make_format(plan.version, plan.layout),
            xattr_icount: plan.xattr_icount,
            mode: (node.file_type().mode_bits() | u32::from(node.meta.perm)) as u16,
            nlink: plan.nlink,
            size: plan.size,
            i_u,
            ino: u32::try_from(i + 1).unwrap_or(u32::MAX),
            uid: node.meta.uid,
            gid: node.meta.gid,
            // Compact inodes take their mtime from the superblock (offset 0).
            mtime: match plan.version {
                InodeVersion::Compact => 0,
                InodeVersion::Extended => node.meta.mtime as u64,
            },
            mtime_nsec: match plan.version {
                InodeVersion::Compact => 0,
                InodeVersion::Extended => node.meta.mtime_nsec,
            },
        };
        let mut p = plan.iloc as usize;
        p += hdr
            .encode(&mut meta[p..])
            .map_err(|e| BuildError::TooLarge {
                what: e.to_string(),
            })?;
        meta[p..p + plan.xattr_body.len()].copy_from_slice(&plan.xattr_body);
        p += plan.xattr_body.len();

        // Flat data (directory contents or symlink target).
        let flat: Option<Vec<u8>> = match &node.kind {
            NodeKind::Dir { .. } => {
                let mut data = vec![0u8; (plan.dir_blocks.len() as u64 * BS) as usize];
                for (b, entries) in plan.dir_blocks.iter().enumerate() {
                    let off = b * BS as usize;
                    encode_dir_block(entries, &nids, &mut data[off..off + BS as usize])?;
                }
                data.truncate(plan.size as usize);
                Some(data)
            }
            NodeKind::Symlink { target } => Some(target.clone()),
            _ => None,
        };
        if let Some(data) = flat {
            let body = (plan.plain_blocks * BS).min(plan.size) as usize;
            let at = plan.blkaddr as usize * BS as usize;
            meta[at..at + body].copy_from_slice(&data[..body]);
            if plan.layout == DataLayout::FlatInline {
                let tail = &data[body..];
                debug_assert_eq!(tail.len() as u64, plan.inline_len);
                debug_assert!(p % BS as usize + tail.len() <= BS as usize);
                meta[p..p + tail.len()].copy_from_slice(tail);
            }
        }
        if let NodeKind::File { data, .. } = &node.kind {
            if plan.layout == DataLayout::ChunkBased {
                let refs = &chunk_maps[*data];
                debug_assert_eq!(refs.len() as u64, plan.chunks);
                let mut q = p.next_multiple_of(layout::CHUNK_INDEX_SIZE);
                for r in refs {
                    let ci = match *r {
                        ChunkRef::Hole => ChunkIndex::HOLE,
                        ChunkRef::Stored { device, blkaddr } => ChunkIndex {
                            startblk_hi: 0,
                            device_id: device,
                            blkaddr,
                        },
                    };
                    ci.encode(&mut meta[q..])
                        .map_err(|_| too_large("chunk index"))?;
                    q += layout::CHUNK_INDEX_SIZE;
                }
            }
        }
    }

    // 6. Device table.
    for (i, d) in devices.iter().enumerate() {
        let off = DEVT_OFFSET as usize + i * layout::DEVICE_SLOT_SIZE;
        DeviceSlot {
            tag: d.tag,
            blocks: d.blocks,
            mapped_blkaddr: 0,
        }
        .encode(&mut meta[off..])
        .map_err(|_| too_large("device table"))?;
    }

    // 7. Superblock: uuid derived from the content (deterministic), then the
    // checksum over block 0.
    let mut sb = SuperBlock {
        magic: layout::SUPER_MAGIC,
        checksum: 0,
        feature_compat: layout::FEATURE_COMPAT_SB_CHKSUM,
        blkszbits: layout::BLOCK_SIZE_BITS,
        sb_extslots: 0,
        root_nid,
        inos: order.len() as u64,
        build_time: bt_sec,
        build_time_nsec: bt_nsec,
        blocks: total_blocks,
        meta_blkaddr: 0,
        xattr_blkaddr: 0,
        uuid: [0; 16],
        volume_name: [0; 16],
        feature_incompat: layout::FEATURE_INCOMPAT_CHUNKED_FILE
            | layout::FEATURE_INCOMPAT_DEVICE_TABLE,
        available_compr_algs: 0,
        extra_devices: u16::try_from(ndev).map_err(|_| too_large("device count"))?,
        devt_slotoff: (DEVT_OFFSET / layout::DEVICE_SLOT_SIZE as u64) as u16,
        dirblkbits: 0,
        xattr_prefix_count: 0,
        xattr_prefix_start: 0,
        packed_nid: 0,
    };
    let so = layout::SUPER_OFFSET;
    sb.encode(&mut meta[so..])
        .map_err(|_| too_large("superblock"))?;
    let digest = Sha256::digest(&meta);
    sb.uuid.copy_from_slice(&digest[..16]);
    sb.uuid[6] = (sb.uuid[6] & 0x0f) | 0x50; // RFC 4122 name-based style
    sb.uuid[8] = (sb.uuid[8] & 0x3f) | 0x80;
    sb.encode(&mut meta[so..])
        .map_err(|_| too_large("superblock"))?;
    sb.checksum = layout::superblock_checksum(&meta, layout::BLOCK_SIZE_BITS)
        .map_err(|_| too_large("superblock"))?;
    sb.encode(&mut meta[so..])
        .map_err(|_| too_large("superblock"))?;
    Ok((meta, stats))
}
