//! Reading an EROFS meta blob back: superblock validation, inodes, xattrs,
//! directories, symlinks and chunk maps.
//!
//! Every malformed input yields a [`ReadError`]; offsets and counts from the
//! image are bounds-checked before use and nothing is allocated from an
//! untrusted count before the bytes it describes are known to exist.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::layout::{
    self, ChunkIndex, DataLayout, DeviceSlot, Dirent, FileType, InodeHeader, InodeVersion,
    SuperBlock, XattrEntry, XattrIbodyHeader, BLOCK_SIZE,
};

/// Errors from [`Image`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the input failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Shorter than one block.
    #[error("image too small: {0} bytes")]
    TooSmall(usize),
    /// No EROFS magic.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// Block size other than 4096.
    #[error("unsupported block size 2^{0}")]
    UnsupportedBlockSize(u8),
    /// Superblock checksum mismatch.
    #[error("superblock checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// Stored value.
        stored: u32,
        /// Computed value.
        computed: u32,
    },
    /// Incompatible features this reader does not implement.
    #[error("unsupported incompatible features {0:#x}")]
    UnsupportedFeatures(u32),
    /// A structure is inconsistent or points outside the image.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// An inode is inconsistent.
    #[error("inode nid {nid}: {reason}")]
    BadInode {
        /// Inode number.
        nid: u64,
        /// What is wrong.
        reason: String,
    },
    /// Valid EROFS this reader does not implement (compression, long xattr
    /// prefixes, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Path lookup failed.
    #[error("not found: {0}")]
    NotFound(String),
}

/// `(offset, len)` within the meta blob.
type ByteRange = (u64, u64);

fn corrupt(s: impl Into<String>) -> ReadError {
    ReadError::Corrupt(s.into())
}

/// One extended attribute (full name, e.g. `user.foo`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    /// Full name including the prefix.
    pub name: Vec<u8>,
    /// Raw value.
    pub value: Vec<u8>,
}

/// Where one chunk of a chunk-based file lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkEntry {
    /// Reads as zeros.
    Hole,
    /// Stored on `device_id` (0 = the meta blob itself, n = device table
    /// slot n) at block `blkaddr` (4096-byte blocks).
    Mapped {
        /// Device id (already masked like the kernel does).
        device_id: u16,
        /// Start block on that device.
        blkaddr: u64,
    },
}

/// The chunk map of a chunk-based regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMap {
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Whether 8-byte indexes (with device ids) are used rather than a
    /// 4-byte block map.
    pub indexes: bool,
    /// One entry per chunk (`ceil(size / chunk_size)` entries).
    pub entries: Vec<ChunkEntry>,
}

/// A byte range of one device holding part of a file, from [`ChunkMap::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Device id (0 = the meta blob, n = device table slot n).
    pub device_id: u16,
    /// Byte offset on that device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl ChunkMap {
    /// Where the bytes of a file of `size` bytes live, in file order, with
    /// ranges that continue each other on the same device merged. Holes have
    /// no extent. A chunk whose file offset, device offset or end does not
    /// fit in 64 bits (a corrupt map) is an error naming it.
    pub fn extents(&self, size: u64) -> Result<Vec<Extent>, ReadError> {
        let overflow = |i: usize, what: &str| {
            corrupt(format!(
                "chunk {i} of a chunk map ({} byte chunks, file size {size}): its {what} \
                 overflows 64 bits",
                self.chunk_size
            ))
        };
        let mut out: Vec<Extent> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let start = (i as u64)
                .checked_mul(self.chunk_size)
                .ok_or_else(|| overflow(i, "file offset"))?;
            if start >= size {
                break;
            }
            let ChunkEntry::Mapped { device_id, blkaddr } = *e else {
                continue;
            };
            let offset = blkaddr
                .checked_mul(BLOCK_SIZE)
                .ok_or_else(|| overflow(i, "device offset"))?;
            let len = self.chunk_size.min(size - start);
            offset
                .checked_add(len)
                .ok_or_else(|| overflow(i, "device end"))?;
            match out.last_mut() {
                // `last` ends within 64 bits (checked when it grew), and so
                // does the merged extent: it ends where this chunk does.
                Some(last) if last.device_id == device_id && last.offset + last.len == offset => {
                    last.len += len
                }
                _ => out.push(Extent {
                    device_id,
                    offset,
                    len,
                }),
            }
        }
        Ok(out)
    }

    /// `(device_id, byte offset on that device)` holding file offset `pos`,
    /// or `None` inside a hole or past the map.
    pub fn locate(&self, pos: u64) -> Option<(u16, u64)> {
        let idx = usize::try_from(pos / self.chunk_size).ok()?;
        match self.entries.get(idx)? {
            ChunkEntry::Hole => None,
            ChunkEntry::Mapped { device_id, blkaddr } => Some((
                *device_id,
                blkaddr.checked_mul(BLOCK_SIZE)? + pos % self.chunk_size,
            )),
        }
    }
}

/// A decoded inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Inode number (offset / 32 from the metadata start).
    pub nid: u64,
    /// Compact or extended.
    pub version: InodeVersion,
    /// Data layout.
    pub layout: DataLayout,
    /// File type.
    pub file_type: FileType,
    /// Full mode (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// `i_ino` (32-bit stat compatibility).
    pub ino: u32,
    /// Extended attributes in on-disk order (shared ones first).
    pub xattrs: Vec<Xattr>,
    /// `(major, minor)` for character and block devices.
    pub rdev: Option<(u32, u32)>,
    /// Target of a symlink.
    pub symlink_target: Option<Vec<u8>>,
    /// Chunk map of a chunk-based regular file.
    pub chunks: Option<ChunkMap>,
    /// Start block of flat (plain/inline) data in the meta blob.
    pub raw_blkaddr: u32,
    /// Byte offset in the meta blob right after the inode and its xattrs.
    pub inline_offset: u64,
}

impl Inode {
    /// Permission and special bits.
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name (never `/`-containing, never empty).
    pub name: Vec<u8>,
    /// Target inode.
    pub nid: u64,
    /// Type recorded in the dirent.
    pub file_type: FileType,
}

/// One path found by [`Image::walk`].
#[derive(Debug, Clone)]
pub struct WalkEntry {
    /// Path relative to the root, `/`-separated; empty for the root itself.
    pub path: Vec<u8>,
    /// The inode (shared between hard links).
    pub inode: Arc<Inode>,
}

/// A parsed, validated meta blob.
#[derive(Debug, Clone)]
pub struct Image {
    data: Vec<u8>,
    sb: SuperBlock,
    devices: Vec<DeviceSlot>,
}

const BS: u64 = BLOCK_SIZE;
const SUPPORTED_INCOMPAT: u32 = layout::FEATURE_INCOMPAT_ZERO_PADDING
    | layout::FEATURE_INCOMPAT_CHUNKED_FILE
    | layout::FEATURE_INCOMPAT_DEVICE_TABLE;

impl Image {
    /// Read all of `r` and parse it.
    pub fn from_reader(mut r: impl Read) -> Result<Image, ReadError> {
        let mut data = Vec::new();
        r.read_to_end(&mut data)?;
        Image::from_bytes(data)
    }

    /// Parse and validate a meta blob: magic, block size, superblock
    /// checksum, features, device table, and the root inode.
    pub fn from_bytes(data: Vec<u8>) -> Result<Image, ReadError> {
        if data.len() < BS as usize {
            return Err(ReadError::TooSmall(data.len()));
        }
        let sb = SuperBlock::decode(&data[layout::SUPER_OFFSET..])
            .map_err(|e| corrupt(e.to_string()))?;
        if sb.magic != layout::SUPER_MAGIC {
            return Err(ReadError::BadMagic(sb.magic));
        }
        if sb.blkszbits != layout::BLOCK_SIZE_BITS {
            return Err(ReadError::UnsupportedBlockSize(sb.blkszbits));
        }
        if sb.feature_compat & layout::FEATURE_COMPAT_SB_CHKSUM != 0 {
            let computed = layout::superblock_checksum(&data, sb.blkszbits)
                .map_err(|e| corrupt(e.to_string()))?;
            if computed != sb.checksum {
                return Err(ReadError::BadChecksum {
                    stored: sb.checksum,
                    computed,
                });
            }
        }
        let unsupported = sb.feature_incompat & !SUPPORTED_INCOMPAT;
        if unsupported != 0 {
            return Err(ReadError::UnsupportedFeatures(unsupported));
        }
        if sb.dirblkbits != 0 {
            return Err(ReadError::Unsupported(format!(
                "dirblkbits {}",
                sb.dirblkbits
            )));
        }
        if sb.xattr_prefix_count != 0 {
            return Err(ReadError::Unsupported("long xattr name prefixes".into()));
        }
        let claimed = u64::from(sb.blocks) * BS;
        if claimed > data.len() as u64 {
            return Err(corrupt(format!(
                "superblock claims {} blocks but the image has {} bytes",
                sb.blocks,
                data.len()
            )));
        }
        if u64::from(sb.meta_blkaddr) * BS >= data.len() as u64 {
            return Err(corrupt(format!(
                "meta_blkaddr {} out of range",
                sb.meta_blkaddr
            )));
        }
        let mut devices = Vec::new();
        if sb.feature_incompat & layout::FEATURE_INCOMPAT_DEVICE_TABLE != 0 {
            let start = usize::from(sb.devt_slotoff) * layout::DEVICE_SLOT_SIZE;
            for i in 0..usize::from(sb.extra_devices) {
                let off = start + i * layout::DEVICE_SLOT_SIZE;
                let slot = data
                    .get(off..)
                    .ok_or_else(|| corrupt("device table out of range"))
                    .and_then(|b| DeviceSlot::decode(b).map_err(|e| corrupt(e.to_string())))?;
                devices.push(slot);
            }
        }
        let img = Image { data, sb, devices };
        let root = img.inode(img.root_nid())?;
        if root.file_type != FileType::Directory {
            return Err(corrupt("root inode is not a directory"));
        }
        Ok(img)
    }

    /// The raw meta blob.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes of the EROFS image proper (`blocks * 4096`): what follows is the
    /// blob trailer, if there is one.
    pub fn image_len(&self) -> u64 {
        u64::from(self.sb.blocks) * BS
    }

    /// The meta blob's [blob trailer](crate::trailer), checked against the
    /// device table (one entry per data blob, naming it, in order); `None` if
    /// the meta blob ends with the EROFS image (built without one).
    pub fn trailer(&self) -> Result<Option<crate::Trailer>, ReadError> {
        let rest = &self.data[self.image_len() as usize..];
        if rest.is_empty() {
            return Ok(None);
        }
        let t = crate::Trailer::decode(rest).map_err(|e| corrupt(e.to_string()))?;
        let tags: Vec<&[u8]> = self.devices.iter().map(|d| d.tag_bytes()).collect();
        let names: Vec<String> = t.entries.iter().map(|e| e.name()).collect();
        if names.len() != tags.len() || names.iter().zip(&tags).any(|(n, t)| n.as_bytes() != *t) {
            return Err(corrupt(format!(
                "the blob trailer lists data blobs {names:?}, the device table {:?}",
                tags.iter()
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .collect::<Vec<_>>()
            )));
        }
        Ok(Some(t))
    }

    /// The superblock.
    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// The device table (one slot per extra device / data blob).
    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    /// nid of the root directory.
    pub fn root_nid(&self) -> u64 {
        u64::from(self.sb.root_nid)
    }

    fn slice(&self, off: u64, len: u64, what: &str) -> Result<&[u8], ReadError> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.data.len() as u64)
            .ok_or_else(|| corrupt(format!("{what} at {off}+{len} is outside the image")))?;
        Ok(&self.data[off as usize..end as usize])
    }

    /// Decode the inode at `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode, ReadError> {
        let bad = |reason: String| ReadError::BadInode { nid, reason };
        let off = nid
            .checked_mul(layout::INODE_SLOT_SIZE)
            .and_then(|o| o.checked_add(u64::from(self.sb.meta_blkaddr) * BS))
            .filter(|&o| o < self.data.len() as u64)
            .ok_or_else(|| bad("outside the image".into()))?;
        let hdr =
            InodeHeader::decode(&self.data[off as usize..]).map_err(|e| bad(e.to_string()))?;
        if hdr.format & !layout::I_ALL != 0 {
            return Err(ReadError::Unsupported(format!(
                "nid {nid}: i_format {:#x}",
                hdr.format
            )));
        }
        let dl = DataLayout::from_raw(hdr.datalayout_raw())
            .ok_or_else(|| bad(format!("data layout {}", hdr.datalayout_raw())))?;
        let version = hdr.version();
        let mode = u32::from(hdr.mode);
        let file_type =
            FileType::from_mode(mode).ok_or_else(|| bad(format!("bogus mode {mode:o}")))?;
        let (mtime, mtime_nsec) = match version {
            // Newer kernels add i_mtime to the superblock time; older ones
            // ignore it (and builders that target both write 0).
            InodeVersion::Compact => (
                (self.sb.build_time as i64).wrapping_add(hdr.mtime as i64),
                self.sb.build_time_nsec,
            ),
            InodeVersion::Extended => (hdr.mtime as i64, hdr.mtime_nsec),
        };
        let nlink = if version == InodeVersion::Compact
            && file_type != FileType::Directory
            && (hdr.format >> layout::I_NLINK_1_BIT) & 1 == 1
        {
            1
        } else {
            hdr.nlink
        };
        let xoff = off + version.size() as u64;
        let xsize = hdr.xattr_ibody_size() as u64;
        let xattrs = self.parse_xattrs(nid, xoff, xsize)?;
        let inline_offset = xoff + xsize;

        let mut inode = Inode {
            nid,
            version,
            layout: dl,
            file_type,
            mode,
            uid: hdr.uid,
            gid: hdr.gid,
            nlink,
            size: hdr.size,
            mtime,
            mtime_nsec,
            ino: hdr.ino,
            xattrs,
            rdev: None,
            symlink_target: None,
            chunks: None,
            raw_blkaddr: 0,
            inline_offset,
        };
        match file_type {
            FileType::CharDevice | FileType::BlockDevice => {
                inode.rdev = Some(layout::new_decode_dev(hdr.i_u));
                return Ok(inode);
            }
            FileType::Fifo | FileType::Socket => return Ok(inode),
            _ => {}
        }
        match dl {
            DataLayout::FlatPlain | DataLayout::FlatInline => {
                inode.raw_blkaddr = hdr.i_u;
                // Validate that the data is inside the image.
                let _ = self.flat_ranges(&inode)?;
            }
            DataLayout::ChunkBased => {
                if file_type != FileType::Regular {
                    return Err(ReadError::Unsupported(format!(
                        "nid {nid}: chunk-based {file_type}"
                    )));
                }
                inode.chunks = Some(self.parse_chunks(nid, &hdr, inline_offset)?);
            }
            DataLayout::CompressedFull | DataLayout::CompressedCompact => {
                return Err(ReadError::Unsupported(format!(
                    "nid {nid}: compressed data"
                )));
            }
        }
        if file_type == FileType::Symlink {
            inode.symlink_target = Some(self.flat_data(&inode)?);
        }
        Ok(inode)
    }

    fn parse_xattrs(&self, nid: u64, off: u64, size: u64) -> Result<Vec<Xattr>, ReadError> {
        let bad = |reason: String| ReadError::BadInode { nid, reason };
        if size == 0 {
            return Ok(Vec::new());
        }
        let body = self.slice(off, size, "inline xattrs")?;
        let hdr = XattrIbodyHeader::decode(body).map_err(|e| bad(e.to_string()))?;
        let mut pos = layout::XATTR_IBODY_HEADER_SIZE;
        let mut out = Vec::new();
        for _ in 0..hdr.shared_count {
            let id = body
                .get(pos..pos + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad("shared xattr ids exceed the xattr body".into()))?;
            pos += 4;
            let eoff = u64::from(self.sb.xattr_blkaddr) * BS + u64::from(id) * 4;
            let rest = self
                .data
                .get(eoff as usize..)
                .filter(|_| eoff <= self.data.len() as u64)
                .ok_or_else(|| bad(format!("shared xattr {id} outside the image")))?;
            let (x, _) = decode_xattr(rest).map_err(bad)?;
            out.push(x);
        }
        while pos < body.len() {
            let (x, used) = decode_xattr(&body[pos..]).map_err(bad)?;
            out.push(x);
            pos += used;
        }
        Ok(out)
    }

    fn parse_chunks(&self, nid: u64, hdr: &InodeHeader, after: u64) -> Result<ChunkMap, ReadError> {
        let bad = |reason: String| ReadError::BadInode { nid, reason };
        let format = (hdr.i_u & 0xFFFF) as u16;
        if format & !layout::CHUNK_FORMAT_ALL != 0 {
            return Err(ReadError::Unsupported(format!(
                "nid {nid}: chunk format {format:#x}"
            )));
        }
        let chunkbits = u32::from(layout::BLOCK_SIZE_BITS)
            + u32::from(format & layout::CHUNK_FORMAT_BLKBITS_MASK);
        let chunk_size = 1u64 << chunkbits;
        let count = hdr.size.div_ceil(chunk_size);
        let indexes = format & layout::CHUNK_FORMAT_INDEXES != 0;
        let unit = if indexes {
            layout::CHUNK_INDEX_SIZE
        } else {
            layout::BLOCK_MAP_ENTRY_SIZE
        } as u64;
        let start = after.next_multiple_of(unit);
        let len = count
            .checked_mul(unit)
            .ok_or_else(|| bad("chunk count overflows".into()))?;
        let raw = self.slice(start, len, "chunk indexes")?;
        let addrmask: u64 = if format & layout::CHUNK_FORMAT_48BIT != 0 {
            (1 << 48) - 1
        } else {
            (1 << 32) - 1
        };
        let devmask = self.device_id_mask();
        let entries = raw
            .chunks_exact(unit as usize)
            .map(|b| {
                if indexes {
                    let ci = ChunkIndex::decode(b).expect("exact chunk");
                    let blk =
                        ((u64::from(ci.startblk_hi) << 32) | u64::from(ci.blkaddr)) & addrmask;
                    // EROFS_NULL_ADDR (-1) within the address width: a hole.
                    if blk == addrmask {
                        ChunkEntry::Hole
                    } else {
                        ChunkEntry::Mapped {
                            device_id: ci.device_id & devmask,
                            blkaddr: blk,
                        }
                    }
                } else {
                    let blk = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if blk == layout::NULL_ADDR {
                        ChunkEntry::Hole
                    } else {
                        ChunkEntry::Mapped {
                            device_id: 0,
                            blkaddr: u64::from(blk),
                        }
                    }
                }
            })
            .collect();
        Ok(ChunkMap {
            chunk_size,
            indexes,
            entries,
        })
    }

    /// The kernel's device id mask: `roundup_pow_of_two(extra_devices + 1) - 1`.
    fn device_id_mask(&self) -> u16 {
        let n = u32::from(self.devices.len() as u16) + 1;
        (n.next_power_of_two() - 1) as u16
    }

    /// `(plain part range, inline tail range)` of flat data in the meta blob.
    fn flat_ranges(&self, inode: &Inode) -> Result<(ByteRange, ByteRange), ReadError> {
        let bad = |reason: String| ReadError::BadInode {
            nid: inode.nid,
            reason,
        };
        let size = inode.size;
        if size > self.data.len() as u64 {
            return Err(bad(format!("flat data of {size} bytes exceeds the image")));
        }
        let (plain_len, tail_len) = match inode.layout {
            DataLayout::FlatPlain => (size, 0),
            DataLayout::FlatInline => {
                let nblocks = size.div_ceil(BS);
                let plain = nblocks.saturating_sub(1) * BS;
                (plain, size - plain)
            }
            _ => return Err(bad("not a flat inode".into())),
        };
        let plain_off = u64::from(inode.raw_blkaddr) * BS;
        if plain_len > 0 {
            self.slice(plain_off, plain_len, "flat data")?;
        }
        if tail_len > 0 {
            if inode.inline_offset % BS + tail_len > BS {
                return Err(bad("inline data crosses a block boundary".into()));
            }
            self.slice(inode.inline_offset, tail_len, "inline data")?;
        }
        Ok(((plain_off, plain_len), (inode.inline_offset, tail_len)))
    }

    /// Contents of a flat (plain or inline) inode stored in the meta blob:
    /// directories, symlinks, or flat regular files.
    pub fn flat_data(&self, inode: &Inode) -> Result<Vec<u8>, ReadError> {
        let ((po, pl), (to, tl)) = self.flat_ranges(inode)?;
        let mut v = Vec::with_capacity((pl + tl) as usize);
        // Empty parts may carry any address (erofs-utils writes NULL_ADDR).
        if pl > 0 {
            v.extend_from_slice(self.slice(po, pl, "flat data")?);
        }
        if tl > 0 {
            v.extend_from_slice(self.slice(to, tl, "inline data")?);
        }
        Ok(v)
    }

    /// Read a regular file's bytes at `pos` into `buf`, taking chunk data
    /// from `blobs` (device table order: device id `n` is `blobs[n - 1]`)
    /// and flat data from the meta blob. Returns the bytes read (short only
    /// at end of file).
    pub fn read_file_at<F: FileExt>(
        &self,
        inode: &Inode,
        blobs: &[F],
        pos: u64,
        buf: &mut [u8],
    ) -> Result<usize, ReadError> {
        if inode.file_type != FileType::Regular {
            return Err(ReadError::BadInode {
                nid: inode.nid,
                reason: "not a regular file".into(),
            });
        }
        if pos >= inode.size {
            return Ok(0);
        }
        let n = (inode.size - pos).min(buf.len() as u64) as usize;
        let Some(map) = &inode.chunks else {
            let data = self.flat_data(inode)?;
            buf[..n].copy_from_slice(&data[pos as usize..pos as usize + n]);
            return Ok(n);
        };
        let mut done = 0;
        while done < n {
            let p = pos + done as u64;
            let in_chunk = map.chunk_size - p % map.chunk_size;
            let m = (n - done).min(in_chunk.min(usize::MAX as u64) as usize);
            let out = &mut buf[done..done + m];
            match map.locate(p) {
                None => out.fill(0),
                Some((0, off)) => out.copy_from_slice(self.slice(off, m as u64, "chunk data")?),
                Some((dev, off)) => {
                    let f = blobs.get(usize::from(dev) - 1).ok_or_else(|| {
                        ReadError::Corrupt(format!(
                            "chunk on device {dev}, but only {} blobs given",
                            blobs.len()
                        ))
                    })?;
                    f.read_exact_at(out, off)?;
                }
            }
            done += m;
        }
        Ok(n)
    }

    /// Entries of a directory (including `.` and `..`), validated: dirents
    /// within their block, names non-empty, at most 255 bytes, without `/`
    /// or NUL, strictly sorted across the directory.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>, ReadError> {
        let bad = |reason: String| ReadError::BadInode {
            nid: dir.nid,
            reason,
        };
        if dir.file_type != FileType::Directory {
            return Err(bad("not a directory".into()));
        }
        let data = self.flat_data(dir)?;
        let mut out: Vec<DirEntry> = Vec::new();
        for blk in data.chunks(BS as usize) {
            let first = Dirent::decode(blk).map_err(|e| bad(e.to_string()))?;
            let n0 = usize::from(first.nameoff);
            if n0 < layout::DIRENT_SIZE || n0 % layout::DIRENT_SIZE != 0 || n0 > blk.len() {
                return Err(bad(format!("bad first nameoff {n0}")));
            }
            let count = n0 / layout::DIRENT_SIZE;
            for i in 0..count {
                let d = Dirent::decode(&blk[i * layout::DIRENT_SIZE..])
                    .map_err(|e| bad(e.to_string()))?;
                let start = usize::from(d.nameoff);
                let end = if i + 1 < count {
                    let next = Dirent::decode(&blk[(i + 1) * layout::DIRENT_SIZE..])
                        .map_err(|e| bad(e.to_string()))?;
                    usize::from(next.nameoff)
                } else {
                    let rest = blk.get(start..).unwrap_or(&[]);
                    start + rest.iter().position(|&b| b == 0).unwrap_or(rest.len())
                };
                if start < n0 || end <= start || end > blk.len() {
                    return Err(bad(format!("bad name range {start}..{end}")));
                }
                let name = &blk[start..end];
                if name.len() > layout::NAME_LEN_MAX || name.contains(&b'/') || name.contains(&0) {
                    return Err(bad(format!(
                        "invalid name {:?}",
                        String::from_utf8_lossy(name)
                    )));
                }
                if let Some(prev) = out.last() {
                    if prev.name.as_slice() >= name {
                        return Err(bad(format!(
                            "names not sorted: {:?} then {:?}",
                            String::from_utf8_lossy(&prev.name),
                            String::from_utf8_lossy(name)
                        )));
                    }
                }
                let file_type = FileType::from_raw(d.file_type)
                    .ok_or_else(|| bad(format!("bad dirent file type {}", d.file_type)))?;
                out.push(DirEntry {
                    name: name.to_vec(),
                    nid: d.nid,
                    file_type,
                });
            }
        }
        Ok(out)
    }

    /// Look up a `/`-separated path relative to the root (empty = root).
    pub fn lookup(&self, path: &[u8]) -> Result<Inode, ReadError> {
        let mut cur = self.inode(self.root_nid())?;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let entries = self.read_dir(&cur)?;
            let e = entries
                .iter()
                .find(|e| e.name == comp)
                .ok_or_else(|| ReadError::NotFound(String::from_utf8_lossy(path).into_owned()))?;
            cur = self.inode(e.nid)?;
        }
        Ok(cur)
    }

    /// Every path in the image, depth-first in sorted order, the root first
    /// (with an empty path). Hard links appear once per name, sharing one
    /// [`Inode`]. Fails on directory cycles, hard-linked directories, dirent
    /// types that disagree with the inode, and `.`/`..` pointing elsewhere
    /// than expected.
    pub fn walk(&self) -> Result<Vec<WalkEntry>, ReadError> {
        let root_nid = self.root_nid();
        let root = Arc::new(self.inode(root_nid)?);
        let mut cache: HashMap<u64, Arc<Inode>> = HashMap::new();
        let mut seen_dirs: HashSet<u64> = HashSet::from([root_nid]);
        let mut out = Vec::new();
        // (path, inode, parent nid)
        let mut stack = vec![(Vec::new(), root, root_nid)];
        while let Some((path, inode, parent)) = stack.pop() {
            out.push(WalkEntry {
                path: path.clone(),
                inode: inode.clone(),
            });
            if inode.file_type != FileType::Directory {
                continue;
            }
            let entries = self.read_dir(&inode)?;
            let mut children = Vec::new();
            for e in entries {
                match e.name.as_slice() {
                    b"." | b".." => {
                        let want = if e.name == b"." { inode.nid } else { parent };
                        if e.nid != want {
                            return Err(corrupt(format!(
                                "{:?} in {:?} points to nid {} instead of {want}",
                                String::from_utf8_lossy(&e.name),
                                String::from_utf8_lossy(&path),
                                e.nid
                            )));
                        }
                        continue;
                    }
                    _ => {}
                }
                let child = match cache.get(&e.nid) {
                    Some(c) => c.clone(),
                    None => {
                        let c = Arc::new(self.inode(e.nid)?);
                        cache.insert(e.nid, c.clone());
                        c
                    }
                };
                let mut cpath = path.clone();
                if !cpath.is_empty() {
                    cpath.push(b'/');
                }
                cpath.extend_from_slice(&e.name);
                if child.file_type != e.file_type {
                    return Err(corrupt(format!(
                        "{:?}: dirent type {} but inode type {}",
                        String::from_utf8_lossy(&cpath),
                        e.file_type,
                        child.file_type
                    )));
                }
                if child.file_type == FileType::Directory && !seen_dirs.insert(e.nid) {
                    return Err(corrupt(format!(
                        "{:?}: directory nid {} reached twice (cycle or hard-linked directory)",
                        String::from_utf8_lossy(&cpath),
                        e.nid
                    )));
                }
                children.push((cpath, child, inode.nid));
            }
            // Reverse so the smallest name is popped first.
            stack.extend(children.into_iter().rev());
        }
        Ok(out)
    }
}

/// Decode one xattr entry from the start of `b`: `(xattr, bytes used)`.
fn decode_xattr(b: &[u8]) -> Result<(Xattr, usize), String> {
    let e = XattrEntry::decode(b).map_err(|e| e.to_string())?;
    if e.name_index & layout::XATTR_LONG_PREFIX != 0 {
        return Err("long xattr name prefix (unsupported)".into());
    }
    let prefix = layout::xattr_prefix(e.name_index)
        .ok_or(format!("unknown xattr index {}", e.name_index))?;
    let total = e.total_size();
    let nl = usize::from(e.name_len);
    let vl = usize::from(e.value_size);
    if total > b.len() {
        return Err(format!("xattr entry of {total} bytes exceeds its area"));
    }
    let p = layout::XATTR_ENTRY_SIZE;
    let mut name = prefix.to_vec();
    name.extend_from_slice(&b[p..p + nl]);
    Ok((
        Xattr {
            name,
            value: b[p + nl..p + nl + vl].to_vec(),
        },
        total,
    ))
}
