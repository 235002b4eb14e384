//! EROFS on-disk layout: constants, structures and their little-endian
//! encode/decode, kept in one place like `erofs_fs.h` is for the kernel and
//! erofs-utils.
//!
//! Only the parts this crate writes or reads are modelled: the superblock, the
//! device table, compact and extended inodes, inline xattrs (plus shared xattr
//! references when reading), chunk indexes and directory entries. Compression
//! structures are not modelled.
//!
//! Every `decode` takes a byte slice and returns [`LayoutError::Truncated`]
//! when it is too short; nothing here panics on malformed input.

use std::fmt;

/// Byte offset of the superblock in the first block.
pub const SUPER_OFFSET: usize = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Size of the (base) on-disk superblock.
pub const SUPER_BLOCK_SIZE: usize = 128;
/// Block size this crate builds with (and the only one it reads).
pub const BLOCK_SIZE_BITS: u8 = 12;
/// `1 << BLOCK_SIZE_BITS`.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_SIZE_BITS;

/// Superblock checksum present (crc32c, see [`superblock_checksum`]).
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x0000_0001;
/// Per-inode mtimes (informational for erofs-utils; the kernel ignores it).
pub const FEATURE_COMPAT_MTIME: u32 = 0x0000_0002;
/// Xattr name bloom filter in `h_name_filter`.
pub const FEATURE_COMPAT_XATTR_FILTER: u32 = 0x0000_0004;

/// `EROFS_FEATURE_INCOMPAT_ZERO_PADDING` (LZ4 0-padding; harmless without compression).
pub const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x0000_0001;
/// `EROFS_FEATURE_INCOMPAT_COMPR_CFGS` / `BIG_PCLUSTER`.
pub const FEATURE_INCOMPAT_COMPR_CFGS: u32 = 0x0000_0002;
/// Chunk-based regular files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;
/// Device table (multiple blobs/devices).
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x0000_0008;
/// `EROFS_FEATURE_INCOMPAT_ZTAILPACKING`.
pub const FEATURE_INCOMPAT_ZTAILPACKING: u32 = 0x0000_0010;
/// `EROFS_FEATURE_INCOMPAT_FRAGMENTS` / `DEDUPE`.
pub const FEATURE_INCOMPAT_FRAGMENTS: u32 = 0x0000_0020;
/// Long xattr name prefixes.
pub const FEATURE_INCOMPAT_XATTR_PREFIXES: u32 = 0x0000_0040;
/// 48-bit block addressing.
pub const FEATURE_INCOMPAT_48BIT: u32 = 0x0000_0080;
/// Metabox inode.
pub const FEATURE_INCOMPAT_METABOX: u32 = 0x0000_0100;

/// Size of one device table slot.
pub const DEVICE_SLOT_SIZE: usize = 128;
/// Length of a device slot tag (a sha256 hex digest fills it exactly).
pub const DEVICE_TAG_LEN: usize = 64;

/// Inode slots are addressed in 32-byte units (`nid`).
pub const INODE_SLOT_SIZE: u64 = 32;
/// Size of a compact inode.
pub const INODE_COMPACT_SIZE: usize = 32;
/// Size of an extended inode.
pub const INODE_EXTENDED_SIZE: usize = 64;

/// `i_format` bit 0: inode version (0 compact, 1 extended).
pub const I_VERSION_MASK: u16 = 0x01;
/// `i_format` bits 1..=3: data layout.
pub const I_DATALAYOUT_BIT: u16 = 1;
/// Mask for the data layout after shifting.
pub const I_DATALAYOUT_MASK: u16 = 0x07;
/// `i_format` bit 4: nlink == 1 for non-directory compact inodes
/// (and "dot omitted" for directories) on newer kernels.
pub const I_NLINK_1_BIT: u16 = 4;
/// All `i_format` bits a current kernel accepts.
pub const I_ALL: u16 = (1 << (I_NLINK_1_BIT + 1)) - 1;

/// Chunk format: chunk size is `block size << (format & mask)`.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x001F;
/// Chunk format: 8-byte chunk indexes (with device ids) instead of a block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x0020;
/// Chunk format: 48-bit start block numbers.
pub const CHUNK_FORMAT_48BIT: u16 = 0x0040;
/// All chunk format bits.
pub const CHUNK_FORMAT_ALL: u16 = (CHUNK_FORMAT_48BIT << 1) - 1;

/// A hole / unmapped block address (`EROFS_NULL_ADDR`).
pub const NULL_ADDR: u32 = 0xFFFF_FFFF;
/// Size of an 8-byte chunk index.
pub const CHUNK_INDEX_SIZE: usize = 8;
/// Size of one 4-byte block map entry.
pub const BLOCK_MAP_ENTRY_SIZE: usize = 4;

/// Size of `erofs_xattr_ibody_header`.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// Size of `erofs_xattr_entry` (without name and value).
pub const XATTR_ENTRY_SIZE: usize = 4;
/// Bit 7 of `e_name_index`: long name prefix (not supported here).
pub const XATTR_LONG_PREFIX: u8 = 0x80;

/// Xattr name index: `user.`
pub const XATTR_INDEX_USER: u8 = 1;
/// Xattr name index: `system.posix_acl_access` (empty suffix)
pub const XATTR_INDEX_POSIX_ACL_ACCESS: u8 = 2;
/// Xattr name index: `system.posix_acl_default` (empty suffix)
pub const XATTR_INDEX_POSIX_ACL_DEFAULT: u8 = 3;
/// Xattr name index: `trusted.`
pub const XATTR_INDEX_TRUSTED: u8 = 4;
/// Xattr name index: `lustre.`
pub const XATTR_INDEX_LUSTRE: u8 = 5;
/// Xattr name index: `security.`
pub const XATTR_INDEX_SECURITY: u8 = 6;

/// Size of one directory entry.
pub const DIRENT_SIZE: usize = 12;
/// Longest file name.
pub const NAME_LEN_MAX: usize = 255;

/// Errors decoding or encoding on-disk structures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The buffer is shorter than the structure.
    #[error("{what}: need {need} bytes, have {have}")]
    Truncated {
        /// Structure being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A value does not fit the chosen on-disk field.
    #[error("{what}: value {value} does not fit the on-disk field")]
    Overflow {
        /// Field.
        what: &'static str,
        /// Offending value.
        value: u64,
    },
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), LayoutError> {
    if buf.len() < n {
        Err(LayoutError::Truncated {
            what,
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn rd64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// `struct erofs_super_block` (the 128-byte base form).
///
/// `build_time`/`build_time_nsec` are called `epoch`/`fixed_nsec` in newer
/// headers: the time every compact inode derives its mtime from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuperBlock {
    /// Must be [`SUPER_MAGIC`].
    pub magic: u32,
    /// crc32c as computed by [`superblock_checksum`].
    pub checksum: u32,
    /// Compatible feature bits.
    pub feature_compat: u32,
    /// log2 of the block size.
    pub blkszbits: u8,
    /// Superblock size = 128 + 16 * `sb_extslots`.
    pub sb_extslots: u8,
    /// nid of the root directory (16-bit without the 48BIT feature).
    pub root_nid: u16,
    /// Number of inodes.
    pub inos: u64,
    /// Base seconds for compact inodes.
    pub build_time: u64,
    /// Nanoseconds for compact inodes.
    pub build_time_nsec: u32,
    /// Blocks of the primary device (statfs).
    pub blocks: u32,
    /// Block where nid 0 lives.
    pub meta_blkaddr: u32,
    /// Block of the shared xattr area.
    pub xattr_blkaddr: u32,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume name.
    pub volume_name: [u8; 16],
    /// Incompatible feature bits.
    pub feature_incompat: u32,
    /// Compression algorithms bitmap / lz4 max distance.
    pub available_compr_algs: u16,
    /// Devices besides the primary one.
    pub extra_devices: u16,
    /// Device table offset in units of [`DEVICE_SLOT_SIZE`].
    pub devt_slotoff: u16,
    /// Directory block bits (must be 0).
    pub dirblkbits: u8,
    /// Number of long xattr prefixes.
    pub xattr_prefix_count: u8,
    /// Start of long xattr prefixes.
    pub xattr_prefix_start: u32,
    /// nid of the packed inode.
    pub packed_nid: u64,
}

impl SuperBlock {
    /// Encode into `buf[..128]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), LayoutError> {
        need("superblock", buf, SUPER_BLOCK_SIZE)?;
        buf[..SUPER_BLOCK_SIZE].fill(0);
        wr32(buf, 0, self.magic);
        wr32(buf, 4, self.checksum);
        wr32(buf, 8, self.feature_compat);
        buf[12] = self.blkszbits;
        buf[13] = self.sb_extslots;
        wr16(buf, 14, self.root_nid);
        wr64(buf, 16, self.inos);
        wr64(buf, 24, self.build_time);
        wr32(buf, 32, self.build_time_nsec);
        wr32(buf, 36, self.blocks);
        wr32(buf, 40, self.meta_blkaddr);
        wr32(buf, 44, self.xattr_blkaddr);
        buf[48..64].copy_from_slice(&self.uuid);
        buf[64..80].copy_from_slice(&self.volume_name);
        wr32(buf, 80, self.feature_incompat);
        wr16(buf, 84, self.available_compr_algs);
        wr16(buf, 86, self.extra_devices);
        wr16(buf, 88, self.devt_slotoff);
        buf[90] = self.dirblkbits;
        buf[91] = self.xattr_prefix_count;
        wr32(buf, 92, self.xattr_prefix_start);
        wr64(buf, 96, self.packed_nid);
        Ok(())
    }

    /// Decode from `buf[..128]` (the bytes at [`SUPER_OFFSET`]).
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        need("superblock", buf, SUPER_BLOCK_SIZE)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[48..64]);
        let mut volume_name = [0u8; 16];
        volume_name.copy_from_slice(&buf[64..80]);
        Ok(SuperBlock {
            magic: rd32(buf, 0),
            checksum: rd32(buf, 4),
            feature_compat: rd32(buf, 8),
            blkszbits: buf[12],
            sb_extslots: buf[13],
            root_nid: rd16(buf, 14),
            inos: rd64(buf, 16),
            build_time: rd64(buf, 24),
            build_time_nsec: rd32(buf, 32),
            blocks: rd32(buf, 36),
            meta_blkaddr: rd32(buf, 40),
            xattr_blkaddr: rd32(buf, 44),
            uuid,
            volume_name,
            feature_incompat: rd32(buf, 80),
            available_compr_algs: rd16(buf, 84),
            extra_devices: rd16(buf, 86),
            devt_slotoff: rd16(buf, 88),
            dirblkbits: buf[90],
            xattr_prefix_count: buf[91],
            xattr_prefix_start: rd32(buf, 92),
            packed_nid: rd64(buf, 96),
        })
    }
}

/// The superblock checksum exactly as the kernel verifies it: crc32c with
/// seed `~0` and no final inversion over the first block from
/// [`SUPER_OFFSET`] to the block end (`1 << blkszbits`), with the checksum
/// field itself taken as zero. For 4 KiB blocks that is 3072 bytes, so
/// anything stored after the superblock in block 0 (device table, inodes) is
/// covered too.
///
/// `block0` must hold at least that block; `blkszbits` must be >= 11
/// (callers validate it first).
pub fn superblock_checksum(block0: &[u8], blkszbits: u8) -> Result<u32, LayoutError> {
    let end = 1usize
        .checked_shl(u32::from(blkszbits))
        .filter(|&e| e > SUPER_OFFSET + 8)
        .ok_or(LayoutError::Overflow {
            what: "blkszbits",
            value: u64::from(blkszbits),
        })?;
    need("superblock block", block0, end)?;
    // crc32c::crc32c computes the standard (pre- and post-inverted) CRC; the
    // kernel's crc32c(~0, ...) is the same without the final inversion.
    let c = crc32c::crc32c(&block0[SUPER_OFFSET..SUPER_OFFSET + 4]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    let c = crc32c::crc32c_append(c, &block0[SUPER_OFFSET + 8..end]);
    Ok(!c)
}

/// `struct erofs_deviceslot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Tag (we store the blob's sha256 hex digest, exactly 64 bytes).
    pub tag: [u8; DEVICE_TAG_LEN],
    /// Blocks of this device.
    pub blocks: u32,
    /// Unified start block (flat addressing); 0 for per-device addressing.
    pub mapped_blkaddr: u32,
}

impl DeviceSlot {
    /// The tag up to its first NUL, as bytes.
    pub fn tag_bytes(&self) -> &[u8] {
        let n = self
            .tag
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(DEVICE_TAG_LEN);
        &self.tag[..n]
    }

    /// Encode into `buf[..128]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), LayoutError> {
        need("device slot", buf, DEVICE_SLOT_SIZE)?;
        buf[..DEVICE_SLOT_SIZE].fill(0);
        buf[..DEVICE_TAG_LEN].copy_from_slice(&self.tag);
        wr32(buf, 64, self.blocks);
        wr32(buf, 68, self.mapped_blkaddr);
        Ok(())
    }

    /// Decode from `buf[..128]`.
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        need("device slot", buf, DEVICE_SLOT_SIZE)?;
        let mut tag = [0u8; DEVICE_TAG_LEN];
        tag.copy_from_slice(&buf[..DEVICE_TAG_LEN]);
        Ok(DeviceSlot {
            tag,
            blocks: rd32(buf, 64),
            mapped_blkaddr: rd32(buf, 68),
        })
    }
}

/// Inode data layouts (`EROFS_INODE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// Data in consecutive blocks starting at `i_u`.
    FlatPlain,
    /// Compressed, full indexes (not supported here).
    CompressedFull,
    /// Like `FlatPlain` but the last partial block is stored right after the
    /// inode (and must not cross a block boundary).
    FlatInline,
    /// Compressed, compact indexes (not supported here).
    CompressedCompact,
    /// Chunk-based: a chunk index array follows the inode.
    ChunkBased,
}

impl DataLayout {
    /// On-disk value.
    pub fn raw(self) -> u16 {
        match self {
            DataLayout::FlatPlain => 0,
            DataLayout::CompressedFull => 1,
            DataLayout::FlatInline => 2,
            DataLayout::CompressedCompact => 3,
            DataLayout::ChunkBased => 4,
        }
    }

    /// From the on-disk value.
    pub fn from_raw(v: u16) -> Option<Self> {
        Some(match v {
            0 => DataLayout::FlatPlain,
            1 => DataLayout::CompressedFull,
            2 => DataLayout::FlatInline,
            3 => DataLayout::CompressedCompact,
            4 => DataLayout::ChunkBased,
            _ => return None,
        })
    }
}

/// Compact (32-byte) or extended (64-byte) inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeVersion {
    /// 32 bytes; 16-bit uid/gid/nlink, 32-bit size, mtime from the superblock.
    Compact,
    /// 64 bytes; full-width fields and its own mtime.
    Extended,
}

impl InodeVersion {
    /// On-disk size.
    pub fn size(self) -> usize {
        match self {
            InodeVersion::Compact => INODE_COMPACT_SIZE,
            InodeVersion::Extended => INODE_EXTENDED_SIZE,
        }
    }
}

/// A decoded inode header (compact or extended), field names after the
/// extended form. For compact inodes `mtime` holds the raw 32-bit `i_mtime`
/// (seconds added to the superblock's `build_time` by newer kernels; older
/// ones ignore it) and `mtime_nsec` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeHeader {
    /// Raw `i_format`.
    pub format: u16,
    /// `i_xattr_icount`.
    pub xattr_icount: u16,
    /// `i_mode` (type and permission bits).
    pub mode: u16,
    /// Link count.
    pub nlink: u32,
    /// File size.
    pub size: u64,
    /// `i_u`: raw block address, rdev, or chunk info (format in the low 16 bits).
    pub i_u: u32,
    /// `i_ino` (32-bit stat compatibility only).
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (see the type docs for compact inodes).
    pub mtime: u64,
    /// Modification time nanoseconds (extended only).
    pub mtime_nsec: u32,
}

impl InodeHeader {
    /// Build the `i_format` value.
    pub fn make_format(version: InodeVersion, layout: DataLayout) -> u16 {
        let v = match version {
            InodeVersion::Compact => 0,
            InodeVersion::Extended => 1,
        };
        v | (layout.raw() << I_DATALAYOUT_BIT)
    }

    /// Version from `format`.
    pub fn version(&self) -> InodeVersion {
        if self.format & I_VERSION_MASK == 0 {
            InodeVersion::Compact
        } else {
            InodeVersion::Extended
        }
    }

    /// Raw data layout from `format`.
    pub fn datalayout_raw(&self) -> u16 {
        (self.format >> I_DATALAYOUT_BIT) & I_DATALAYOUT_MASK
    }

    /// Size of the inline xattr body for `xattr_icount`.
    pub fn xattr_ibody_size(&self) -> usize {
        xattr_ibody_size(self.xattr_icount)
    }

    /// Encode in the form selected by `format`. Fails if a field does not fit
    /// a compact inode.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, LayoutError> {
        match self.version() {
            InodeVersion::Compact => {
                need("compact inode", buf, INODE_COMPACT_SIZE)?;
                let fit16 = |what, v: u64| {
                    u16::try_from(v).map_err(|_| LayoutError::Overflow { what, value: v })
                };
                let nlink = fit16("compact i_nlink", u64::from(self.nlink))?;
                let uid = fit16("compact i_uid", u64::from(self.uid))?;
                let gid = fit16("compact i_gid", u64::from(self.gid))?;
                let size = u32::try_from(self.size).map_err(|_| LayoutError::Overflow {
                    what: "compact i_size",
                    value: self.size,
                })?;
                let mtime = u32::try_from(self.mtime).map_err(|_| LayoutError::Overflow {
                    what: "compact i_mtime",
                    value: self.mtime,
                })?;
                let b = &mut buf[..INODE_COMPACT_SIZE];
                b.fill(0);
                wr16(b, 0, self.format);
                wr16(b, 2, self.xattr_icount);
                wr16(b, 4, self.mode);
                wr16(b, 6, nlink);
                wr32(b, 8, size);
                wr32(b, 12, mtime);
                wr32(b, 16, self.i_u);
                wr32(b, 20, self.ino);
                wr16(b, 24, uid);
                wr16(b, 26, gid);
                Ok(INODE_COMPACT_SIZE)
            }
            InodeVersion::Extended => {
                need("extended inode", buf, INODE_EXTENDED_SIZE)?;
                let b = &mut buf[..INODE_EXTENDED_SIZE];
                b.fill(0);
                wr16(b, 0, self.format);
                wr16(b, 2, self.xattr_icount);
                wr16(b, 4, self.mode);
                wr64(b, 8, self.size);
                wr32(b, 16, self.i_u);
                wr32(b, 20, self.ino);
                wr32(b, 24, self.uid);
                wr32(b, 28, self.gid);
                wr64(b, 32, self.mtime);
                wr32(b, 40, self.mtime_nsec);
                wr32(b, 44, self.nlink);
                Ok(INODE_EXTENDED_SIZE)
            }
        }
    }

    /// Decode a compact or extended inode (as told by its first two bytes).
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        need("inode", buf, 2)?;
        let format = rd16(buf, 0);
        if format & I_VERSION_MASK == 0 {
            need("compact inode", buf, INODE_COMPACT_SIZE)?;
            Ok(InodeHeader {
                format,
                xattr_icount: rd16(buf, 2),
                mode: rd16(buf, 4),
                nlink: u32::from(rd16(buf, 6)),
                size: u64::from(rd32(buf, 8)),
                mtime: u64::from(rd32(buf, 12)),
                i_u: rd32(buf, 16),
                ino: rd32(buf, 20),
                uid: u32::from(rd16(buf, 24)),
                gid: u32::from(rd16(buf, 26)),
                mtime_nsec: 0,
            })
        } else {
            need("extended inode", buf, INODE_EXTENDED_SIZE)?;
            Ok(InodeHeader {
                format,
                xattr_icount: rd16(buf, 2),
                mode: rd16(buf, 4),
                size: rd64(buf, 8),
                i_u: rd32(buf, 16),
                ino: rd32(buf, 20),
                uid: rd32(buf, 24),
                gid: rd32(buf, 28),
                mtime: rd64(buf, 32),
                mtime_nsec: rd32(buf, 40),
                nlink: rd32(buf, 44),
            })
        }
    }
}

/// Inline xattr body size for an `i_xattr_icount` (0 means no body).
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + 4 * (usize::from(icount) - 1)
    }
}

/// `i_xattr_icount` for an inline body holding `entries_len` bytes of
/// (4-byte aligned) entries and no shared xattrs.
pub fn xattr_icount_for(entries_len: usize) -> Result<u16, LayoutError> {
    if entries_len == 0 {
        return Ok(0);
    }
    let n = entries_len.div_ceil(4) + 1;
    u16::try_from(n).map_err(|_| LayoutError::Overflow {
        what: "i_xattr_icount",
        value: n as u64,
    })
}

/// `struct erofs_xattr_ibody_header`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XattrIbodyHeader {
    /// Bloom filter (only meaningful with [`FEATURE_COMPAT_XATTR_FILTER`]).
    pub name_filter: u32,
    /// Number of shared xattr ids following the header.
    pub shared_count: u8,
}

impl XattrIbodyHeader {
    /// Encode into `buf[..12]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), LayoutError> {
        need("xattr ibody header", buf, XATTR_IBODY_HEADER_SIZE)?;
        buf[..XATTR_IBODY_HEADER_SIZE].fill(0);
        wr32(buf, 0, self.name_filter);
        buf[4] = self.shared_count;
        Ok(())
    }

    /// Decode from `buf[..12]`.
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        need("xattr ibody header", buf, XATTR_IBODY_HEADER_SIZE)?;
        Ok(XattrIbodyHeader {
            name_filter: rd32(buf, 0),
            shared_count: buf[4],
        })
    }
}

/// `struct erofs_xattr_entry` header (name and value follow).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XattrEntry {
    /// Length of the name suffix.
    pub name_len: u8,
    /// Name index (prefix).
    pub name_index: u8,
    /// Value length.
    pub value_size: u16,
}

impl XattrEntry {
    /// Encode into `buf[..4]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), LayoutError> {
        need("xattr entry", buf, XATTR_ENTRY_SIZE)?;
        buf[0] = self.name_len;
        buf[1] = self.name_index;
        wr16(buf, 2, self.value_size);
        Ok(())
    }

    /// Decode from `buf[..4]`.
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        need("xattr entry", buf, XATTR_ENTRY_SIZE)?;
        Ok(XattrEntry {
            name_len: buf[0],
            name_index: buf[1],
            value_size: rd16(buf, 2),
        })
    }

    /// Whole entry size including name, value and alignment padding.
    pub fn total_size(&self) -> usize {
        (XATTR_ENTRY_SIZE + usize::from(self.name_len) + usize::from(self.value_size))
            .next_multiple_of(4)
    }
}

/// Split a full xattr name into the kernel's (index, suffix) form. `None`
/// if the name fits no standard index (such names cannot be stored without
/// long-prefix support).
pub fn xattr_split_name(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((XATTR_INDEX_POSIX_ACL_ACCESS, &[])),
        b"system.posix_acl_default" => return Some((XATTR_INDEX_POSIX_ACL_DEFAULT, &[])),
        _ => {}
    }
    for (index, prefix) in [
        (XATTR_INDEX_USER, &b"user."[..]),
        (XATTR_INDEX_TRUSTED, b"trusted."),
        (XATTR_INDEX_SECURITY, b"security."),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            if !rest.is_empty() {
                return Some((index, rest));
            }
        }
    }
    None
}

/// The name prefix of a standard xattr index.
pub fn xattr_prefix(index: u8) -> Option<&'static [u8]> {
    Some(match index {
        XATTR_INDEX_USER => b"user.",
        XATTR_INDEX_POSIX_ACL_ACCESS => b"system.posix_acl_access",
        XATTR_INDEX_POSIX_ACL_DEFAULT => b"system.posix_acl_default",
        XATTR_INDEX_TRUSTED => b"trusted.",
        XATTR_INDEX_LUSTRE => b"lustre.",
        XATTR_INDEX_SECURITY => b"security.",
        _ => return None,
    })
}

/// `struct erofs_inode_chunk_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkIndex {
    /// High 16 bits of the start block (only with 48-bit addressing; 0 here).
    pub startblk_hi: u16,
    /// Device id: 0 is the primary device, `n` the n-th device table slot.
    pub device_id: u16,
    /// Start block of the chunk, or [`NULL_ADDR`] for a hole.
    pub blkaddr: u32,
}

impl ChunkIndex {
    /// A hole.
    pub const HOLE: ChunkIndex = ChunkIndex {
        startblk_hi: 0,
        device_id: 0,
        blkaddr: NULL_ADDR,
    };

    /// Encode into `buf[..8]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), LayoutError> {
        need("chunk index", buf, CHUNK_INDEX_SIZE)?;
        wr16(buf, 0, self.startblk_hi);
        wr16(buf, 2, self.device_id);
        wr32(buf, 4, self.blkaddr);
        Ok(())
    }

    /// Decode from `buf[..8]`.
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        need("chunk index", buf, CHUNK_INDEX_SIZE)?;
        Ok(ChunkIndex {
            startblk_hi: rd16(buf, 0),
            device_id: rd16(buf, 2),
            blkaddr: rd32(buf, 4),
        })
    }
}

/// Directory entry file types (`EROFS_FT_*`, same as the generic `FT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileType {
    /// Unknown.
    Unknown,
    /// Regular file.
    Regular,
    /// Directory.
    Directory,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// FIFO.
    Fifo,
    /// Socket.
    Socket,
    /// Symbolic link.
    Symlink,
}

/// `S_IFMT` and friends.
pub mod mode {
    /// File type mask.
    pub const S_IFMT: u32 = 0o170000;
    /// Socket.
    pub const S_IFSOCK: u32 = 0o140000;
    /// Symlink.
    pub const S_IFLNK: u32 = 0o120000;
    /// Regular file.
    pub const S_IFREG: u32 = 0o100000;
    /// Block device.
    pub const S_IFBLK: u32 = 0o060000;
    /// Directory.
    pub const S_IFDIR: u32 = 0o040000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020000;
    /// FIFO.
    pub const S_IFIFO: u32 = 0o010000;
}

impl FileType {
    /// On-disk dirent value.
    pub fn raw(self) -> u8 {
        match self {
            FileType::Unknown => 0,
            FileType::Regular => 1,
            FileType::Directory => 2,
            FileType::CharDevice => 3,
            FileType::BlockDevice => 4,
            FileType::Fifo => 5,
            FileType::Socket => 6,
            FileType::Symlink => 7,
        }
    }

    /// From the dirent value.
    pub fn from_raw(v: u8) -> Option<Self> {
        Some(match v {
            0 => FileType::Unknown,
            1 => FileType::Regular,
            2 => FileType::Directory,
            3 => FileType::CharDevice,
            4 => FileType::BlockDevice,
            5 => FileType::Fifo,
            6 => FileType::Socket,
            7 => FileType::Symlink,
            _ => return None,
        })
    }

    /// From the `S_IFMT` bits of a mode; `None` for an invalid type.
    pub fn from_mode(m: u32) -> Option<Self> {
        Some(match m & mode::S_IFMT {
            mode::S_IFREG => FileType::Regular,
            mode::S_IFDIR => FileType::Directory,
            mode::S_IFCHR => FileType::CharDevice,
            mode::S_IFBLK => FileType::BlockDevice,
            mode::S_IFIFO => FileType::Fifo,
            mode::S_IFSOCK => FileType::Socket,
            mode::S_IFLNK => FileType::Symlink,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileType::Unknown => 0,
            FileType::Regular => mode::S_IFREG,
            FileType::Directory => mode::S_IFDIR,
            FileType::CharDevice => mode::S_IFCHR,
            FileType::BlockDevice => mode::S_IFBLK,
            FileType::Fifo => mode::S_IFIFO,
            FileType::Socket => mode::S_IFSOCK,
            FileType::Symlink => mode::S_IFLNK,
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileType::Unknown => "unknown",
            FileType::Regular => "file",
            FileType::Directory => "dir",
            FileType::CharDevice => "chardev",
            FileType::BlockDevice => "blockdev",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
            FileType::Symlink => "symlink",
        })
    }
}

/// `struct erofs_dirent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    /// Target inode.
    pub nid: u64,
    /// Offset of the name within the directory block.
    pub nameoff: u16,
    /// Raw file type.
    pub file_type: u8,
}

impl Dirent {
    /// Encode into `buf[..12]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), LayoutError> {
        need("dirent", buf, DIRENT_SIZE)?;
        wr64(buf, 0, self.nid);
        wr16(buf, 8, self.nameoff);
        buf[10] = self.file_type;
        buf[11] = 0;
        Ok(())
    }

    /// Decode from `buf[..12]`.
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        need("dirent", buf, DIRENT_SIZE)?;
        Ok(Dirent {
            nid: rd64(buf, 0),
            nameoff: rd16(buf, 8),
            file_type: buf[10],
        })
    }
}

/// The kernel's `new_encode_dev` (32-bit device number as stored in `i_u`).
pub fn new_encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// The kernel's `new_decode_dev`: `(major, minor)`.
pub fn new_decode_dev(dev: u32) -> (u32, u32) {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_roundtrip_and_offsets() {
        let sb = SuperBlock {
            magic: SUPER_MAGIC,
            checksum: 0x1234_5678,
            feature_compat: FEATURE_COMPAT_SB_CHKSUM,
            blkszbits: 12,
            root_nid: 40,
            inos: 3,
            build_time: 1_700_000_000,
            build_time_nsec: 5,
            blocks: 7,
            uuid: [9; 16],
            feature_incompat: FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE,
            extra_devices: 2,
            devt_slotoff: 9,
            ..Default::default()
        };
        let mut b = [0xAAu8; 128];
        sb.encode(&mut b).unwrap();
        assert_eq!(&b[0..4], &[0xE2, 0xE1, 0xF5, 0xE0]);
        assert_eq!(b[12], 12);
        assert_eq!(&b[14..16], &40u16.to_le_bytes());
        assert_eq!(&b[36..40], &7u32.to_le_bytes());
        assert_eq!(&b[80..84], &12u32.to_le_bytes());
        assert_eq!(&b[86..88], &2u16.to_le_bytes());
        assert_eq!(&b[88..90], &9u16.to_le_bytes());
        assert!(b[100..].iter().all(|&x| x == 0));
        assert_eq!(SuperBlock::decode(&b).unwrap(), sb);
        assert!(matches!(
            SuperBlock::decode(&b[..127]),
            Err(LayoutError::Truncated { .. })
        ));
    }

    #[test]
    fn checksum_matches_kernel_rule() {
        // Kernel: crc32c(~0, block[1024..4096] with checksum zeroed), no
        // final xor. Compute it bitwise here, independently of the crate.
        fn raw_crc32c(mut crc: u32, data: &[u8]) -> u32 {
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        (crc >> 1) ^ 0x82F6_3B78
                    } else {
                        crc >> 1
                    };
                }
            }
            crc
        }
        let mut blk = vec![0u8; 4096];
        for (i, b) in blk.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let got = superblock_checksum(&blk, 12).unwrap();
        let mut z = blk[1024..].to_vec();
        z[4..8].fill(0);
        assert_eq!(got, raw_crc32c(!0, &z));
        // The stored checksum field does not influence the result.
        blk[1028] ^= 0xFF;
        assert_eq!(superblock_checksum(&blk, 12).unwrap(), got);
        blk[4000] ^= 1;
        assert_ne!(superblock_checksum(&blk, 12).unwrap(), got);
        assert!(superblock_checksum(&blk[..4095], 12).is_err());
        assert!(superblock_checksum(&blk, 9).is_err());
    }

    #[test]
    fn inode_compact_and_extended() {
        let mut h = InodeHeader {
            format: InodeHeader::make_format(InodeVersion::Compact, DataLayout::ChunkBased),
            xattr_icount: 4,
            mode: 0o100644,
            nlink: 2,
            size: 12345,
            i_u: u32::from(CHUNK_FORMAT_INDEXES | 8),
            ino: 17,
            uid: 1000,
            gid: 65535,
            mtime: 0,
            mtime_nsec: 0,
        };
        let mut b = [0u8; 64];
        assert_eq!(h.encode(&mut b).unwrap(), 32);
        assert_eq!(rd16(&b, 0), 4 << 1);
        assert_eq!(InodeHeader::decode(&b).unwrap(), h);
        assert_eq!(h.xattr_ibody_size(), 12 + 12);

        h.uid = 65536;
        assert!(matches!(
            h.encode(&mut b),
            Err(LayoutError::Overflow { .. })
        ));
        h.format = InodeHeader::make_format(InodeVersion::Extended, DataLayout::FlatInline);
        h.size = 5 << 32;
        h.mtime = (-5i64) as u64;
        h.mtime_nsec = 999_999_999;
        assert_eq!(h.encode(&mut b).unwrap(), 64);
        assert_eq!(b[0], 1 | (2 << 1));
        let d = InodeHeader::decode(&b).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.version(), InodeVersion::Extended);
        assert_eq!(d.datalayout_raw(), 2);
        assert!(InodeHeader::decode(&b[..63]).is_err());
    }

    #[test]
    fn xattr_names() {
        assert_eq!(xattr_split_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(
            xattr_split_name(b"system.posix_acl_access"),
            Some((2, &b""[..]))
        );
        assert_eq!(
            xattr_split_name(b"system.posix_acl_default"),
            Some((3, &b""[..]))
        );
        assert_eq!(xattr_split_name(b"trusted.x"), Some((4, &b"x"[..])));
        assert_eq!(
            xattr_split_name(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(xattr_split_name(b"system.foo"), None);
        assert_eq!(xattr_split_name(b"system.posix_acl_accessX"), None);
        assert_eq!(xattr_split_name(b"user."), None);
        assert_eq!(xattr_prefix(6), Some(&b"security."[..]));
        assert_eq!(xattr_icount_for(0).unwrap(), 0);
        assert_eq!(xattr_icount_for(8).unwrap(), 3);
        assert_eq!(xattr_ibody_size(3), 20);
        let e = XattrEntry {
            name_len: 3,
            name_index: 1,
            value_size: 2,
        };
        assert_eq!(e.total_size(), 12);
        let mut b = [0u8; 4];
        e.encode(&mut b).unwrap();
        assert_eq!(XattrEntry::decode(&b).unwrap(), e);
    }

    #[test]
    fn dirent_chunk_device() {
        let d = Dirent {
            nid: 0x0102_0304_0506,
            nameoff: 36,
            file_type: FileType::Symlink.raw(),
        };
        let mut b = [0u8; 12];
        d.encode(&mut b).unwrap();
        assert_eq!(Dirent::decode(&b).unwrap(), d);

        let c = ChunkIndex {
            startblk_hi: 0,
            device_id: 2,
            blkaddr: 77,
        };
        let mut b = [0u8; 8];
        c.encode(&mut b).unwrap();
        assert_eq!(b, [0, 0, 2, 0, 77, 0, 0, 0]);
        assert_eq!(ChunkIndex::decode(&b).unwrap(), c);

        let mut tag = [0u8; 64];
        tag.copy_from_slice(&[b'a'; 64]);
        let s = DeviceSlot {
            tag,
            blocks: 10,
            mapped_blkaddr: 0,
        };
        let mut b = [0u8; 128];
        s.encode(&mut b).unwrap();
        assert_eq!(DeviceSlot::decode(&b).unwrap(), s);
        assert_eq!(s.tag_bytes().len(), 64);
    }

    #[test]
    fn dev_encoding_matches_kernel() {
        // new_encode_dev(MKDEV(8, 1)) == 0x801
        assert_eq!(new_encode_dev(8, 1), 0x801);
        let e = new_encode_dev(259, 131_071);
        assert_eq!(new_decode_dev(e), (259, 131_071));
        assert_eq!(
            new_decode_dev(new_encode_dev(4095, 0xFFFFF)),
            (4095, 0xFFFFF)
        );
        for t in [
            FileType::Regular,
            FileType::Directory,
            FileType::CharDevice,
            FileType::BlockDevice,
            FileType::Fifo,
            FileType::Socket,
            FileType::Symlink,
        ] {
            assert_eq!(FileType::from_mode(t.mode_bits() | 0o644), Some(t));
            assert_eq!(FileType::from_raw(t.raw()), Some(t));
        }
        assert_eq!(FileType::from_mode(0o644), None);
    }
}
