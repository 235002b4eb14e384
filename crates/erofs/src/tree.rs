//! The merged in-memory tree built from layer directories.
//!
//! Layers are applied in order ([`Tree::apply_layer`]): a later layer's entry
//! replaces an earlier one at the same path, directories merge (the later
//! directory's own metadata wins), and a later non-directory replaces a whole
//! directory subtree. The tree holds metadata only; regular file contents are
//! referenced by [`FileSource`] and streamed later.
//!
//! Inodes live in an arena; directories map names to inode ids, so hard links
//! (same source `st_dev`/`st_ino` within one layer) are simply several names
//! mapping to one id. Replaced inodes stay in the arena but are unreachable.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::layout::{self, FileType};
use crate::BuildError;

/// Index into [`Tree::nodes`].
pub(crate) type NodeId = usize;

/// Full xattr names (prefix included, such as `user.foo`) and values.
pub type XattrList = Vec<(Vec<u8>, Vec<u8>)>;

/// Sorted (name, path) entries of a directory still to be processed.
type DirIter = std::vec::IntoIter<(Vec<u8>, PathBuf)>;

/// Attributes common to every inode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission and special bits (`mode & 0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Modification time, nanoseconds (below 10^9).
    pub mtime_nsec: u32,
    /// Full xattr names and values, sorted by name.
    pub xattrs: XattrList,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    Dir {
        children: BTreeMap<Vec<u8>, NodeId>,
    },
    /// `data` indexes [`Tree::files`].
    File {
        size: u64,
        data: usize,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub meta: Meta,
    pub kind: NodeKind,
    /// Where it came from (for error messages).
    pub source: PathBuf,
}

impl Node {
    pub fn file_type(&self) -> FileType {
        match self.kind {
            NodeKind::Dir { .. } => FileType::Directory,
            NodeKind::File { .. } => FileType::Regular,
            NodeKind::Symlink { .. } => FileType::Symlink,
            NodeKind::CharDev { .. } => FileType::CharDevice,
            NodeKind::BlockDev { .. } => FileType::BlockDevice,
            NodeKind::Fifo => FileType::Fifo,
            NodeKind::Socket => FileType::Socket,
        }
    }
}

/// A regular file's content source: one per regular-file inode of every
/// layer (including ones a later layer hides), in layer order and, within a
/// layer, sorted depth-first path order. This is the order chunks are stored
/// in, so a layer's blob depends only on that layer and the ones before it.
#[derive(Debug, Clone)]
pub(crate) struct FileSource {
    pub layer: usize,
    pub path: PathBuf,
    pub size: u64,
}

/// Inode kinds a tar layer records only in its headers: on disk they are
/// empty regular placeholder files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// A character device.
    CharDev {
        /// Major number (at most 0xfff).
        major: u32,
        /// Minor number (at most 0xfffff).
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number (at most 0xfff).
        major: u32,
        /// Minor number (at most 0xfffff).
        minor: u32,
    },
    /// A FIFO.
    Fifo,
}

/// Metadata of one extracted entry, taken from its tar header.
#[derive(Debug, Clone)]
pub struct EntryMeta {
    /// The entry's attributes.
    pub meta: Meta,
    /// Set for devices and FIFOs (the file on disk is a placeholder).
    pub special: Option<Special>,
    /// A directory the archive did not list but that had to exist for its
    /// children: it keeps a lower layer's metadata when there is one.
    pub implicit: bool,
}

/// Metadata of an extracted layer, keyed by path relative to the layer
/// root (the root itself is the empty path). When given with a layer
/// ([`LayerInput::recorded`](crate::LayerInput::recorded)), it replaces what
/// the extracted files carry on disk (mode, owner, times, xattrs, device
/// numbers), so extraction needs no privileges and the image does not depend
/// on the extracting filesystem. Every file of the layer directory must have
/// an entry (else [`BuildError::Unsupported`]); a root entry marked
/// `implicit` (or none) leaves the root's metadata as the lower layers set it.
#[derive(Debug, Default)]
pub struct LayerMeta {
    /// Every entry of the layer directory, by relative path.
    pub entries: HashMap<PathBuf, EntryMeta>,
}

/// Whiteout marker prefix (OCI image spec, layer changesets).
pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Opaque directory marker.
pub(crate) const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

#[derive(Debug)]
pub(crate) struct Tree {
    pub nodes: Vec<Node>,
    pub root: NodeId,
    pub files: Vec<FileSource>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read all xattrs of `path` (not following symlinks), sorted by name.
pub(crate) fn read_xattrs(path: &Path) -> Result<XattrList, BuildError> {
    let to_io = |e: rustix::io::Errno| BuildError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    };
    let mut list = Vec::new();
    loop {
        let n = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            // Filesystems without xattr support.
            Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(to_io(e)),
        };
        if n == 0 {
            return Ok(Vec::new());
        }
        list.resize(n, 0);
        match rustix::fs::llistxattr(path, &mut list[..]) {
            Ok(got) => {
                list.truncate(got);
                break;
            }
            // The list grew between the two calls: retry.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(to_io(e)),
        }
    }
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name_os = std::ffi::OsStr::from_bytes(name);
        let mut value = Vec::new();
        loop {
            let n = match rustix::fs::lgetxattr_query(path, name_os) {
                Ok(n) => n,
                // Removed meanwhile.
                Err(rustix::io::Errno::NODATA) => break,
                Err(e) => return Err(to_io(e)),
            };
            value.resize(n, 0);
            if n == 0 {
                break;
            }
            match rustix::fs::lgetxattr(path, name_os, &mut value[..]) {
                Ok(got) => {
                    value.truncate(got);
                    break;
                }
                Err(rustix::io::Errno::RANGE) => continue,
                Err(e) => return Err(to_io(e)),
            }
        }
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// Check that every xattr fits an EROFS name index and the on-disk limits:
/// [`BuildError::UnsupportedXattr`] or [`BuildError::XattrTooLarge`] naming
/// `path` otherwise. For callers that record metadata (see [`LayerMeta`]) and
/// want to refuse an entry where they meet it.
pub fn check_xattrs(path: &Path, xattrs: &XattrList) -> Result<(), BuildError> {
    for (name, value) in xattrs {
        let Some((_, suffix)) = layout::xattr_split_name(name) else {
            return Err(BuildError::UnsupportedXattr {
                path: path.to_path_buf(),
                name: String::from_utf8_lossy(name).into_owned(),
            });
        };
        if suffix.len() > usize::from(u8::MAX) || value.len() > usize::from(u16::MAX) {
            return Err(BuildError::XattrTooLarge {
                path: path.to_path_buf(),
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
    }
    Ok(())
}

fn meta_of(path: &Path, md: &fs::Metadata) -> Result<Meta, BuildError> {
    let xattrs = read_xattrs(path)?;
    check_xattrs(path, &xattrs)?;
    Ok(Meta {
        perm: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs,
    })
}

/// glibc's `major()`/`minor()` for a 64-bit `st_rdev`.
pub(crate) fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn sorted_entries(dir: &Path) -> Result<Vec<(Vec<u8>, PathBuf)>, BuildError> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name().into_vec();
        v.push((name, e.path()));
    }
    v.sort();
    Ok(v)
}

impl Tree {
    /// An empty tree whose root has default metadata (overwritten by the
    /// first layer's root directory).
    pub fn new() -> Self {
        Tree {
            nodes: vec![Node {
                meta: Meta {
                    perm: 0o755,
                    ..Meta::default()
                },
                kind: NodeKind::Dir {
                    children: BTreeMap::new(),
                },
                source: PathBuf::new(),
            }],
            root: 0,
            files: Vec::new(),
        }
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Apply one layer directory on top of the tree. `recorded`, if given,
    /// supplies every entry's metadata instead of the filesystem (see
    /// [`LayerMeta`]).
    ///
    /// OCI whiteouts are honoured: `.wh.NAME` removes `NAME` (and its
    /// subtree) of the lower layers, `.wh..wh..opq` hides everything the
    /// lower layers have in its directory. Markers never enter the tree.
    pub fn apply_layer(
        &mut self,
        layer: usize,
        root: &Path,
        recorded: Option<&LayerMeta>,
    ) -> Result<(), BuildError> {
        let md = fs::symlink_metadata(root).map_err(io_err(root))?;
        if !md.is_dir() {
            return Err(BuildError::NotADirectory(root.to_path_buf()));
        }
        let root_id = self.root;
        let lookup = |path: &Path| -> Result<Option<&EntryMeta>, BuildError> {
            let Some(rec) = recorded else { return Ok(None) };
            let rel = path.strip_prefix(root).unwrap_or(path);
            match rec.entries.get(rel) {
                Some(e) => Ok(Some(e)),
                None => Err(BuildError::Unsupported {
                    path: path.to_path_buf(),
                    what: "extracted entry without recorded metadata".into(),
                }),
            }
        };
        match recorded {
            // A layer archive without a root entry leaves the root as is.
            Some(rec) => match rec.entries.get(Path::new("")) {
                Some(e) if !e.implicit => {
                    self.nodes[root_id].meta = e.meta.clone();
                    self.nodes[root_id].source = root.to_path_buf();
                }
                _ => {}
            },
            None => {
                self.nodes[root_id].meta = meta_of(root, &md)?;
                self.nodes[root_id].source = root.to_path_buf();
            }
        }

        // Hard-link groups are per layer: the same (dev, ino) seen twice in
        // this layer is one inode. Different layers never share inodes.
        let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
        // Explicit stack (no recursion limit on tree depth). Entries of a
        // directory are processed in sorted order, descending into a
        // subdirectory when it is met: depth-first, sorted.
        let mut stack: Vec<(NodeId, DirIter)> = vec![(root_id, self.layer_entries(root_id, root)?)];
        while let Some((dir_id, iter)) = stack.last_mut() {
            let dir_id = *dir_id;
            let Some((name, path)) = iter.next() else {
                stack.pop();
                continue;
            };
            if name.len() > layout::NAME_LEN_MAX {
                return Err(BuildError::NameTooLong(path));
            }
            // OCI whiteouts were applied and dropped by `layer_entries`.
            let md = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let ft = md.file_type();
            let rec = lookup(&path)?;
            let meta = match rec {
                Some(e) => e.meta.clone(),
                None => meta_of(&path, &md)?,
            };
            if ft.is_dir() {
                let existing = match &self.nodes[dir_id].kind {
                    NodeKind::Dir { children } => children.get(&name).copied(),
                    _ => unreachable!("stack holds directories only"),
                };
                let child = match existing {
                    Some(id) if matches!(self.nodes[id].kind, NodeKind::Dir { .. }) => {
                        if !rec.is_some_and(|e| e.implicit) {
                            self.nodes[id].meta = meta;
                            self.nodes[id].source = path.clone();
                        }
                        id
                    }
                    _ => self.push(Node {
                        meta,
                        kind: NodeKind::Dir {
                            children: BTreeMap::new(),
                        },
                        source: path.clone(),
                    }),
                };
                self.insert(dir_id, name, child);
                let entries = self.layer_entries(child, &path)?;
                stack.push((child, entries));
                continue;
            }
            let key = (md.dev(), md.ino());
            let id = match links.get(&key) {
                Some(&id) if md.nlink() > 1 => id,
                _ => {
                    let special = rec.and_then(|e| e.special);
                    let kind = if let Some(sp) = special {
                        match sp {
                            Special::CharDev { major, minor } => NodeKind::CharDev { major, minor },
                            Special::BlockDev { major, minor } => {
                                NodeKind::BlockDev { major, minor }
                            }
                            Special::Fifo => NodeKind::Fifo,
                        }
                    } else if ft.is_file() {
                        self.files.push(FileSource {
                            layer,
                            path: path.clone(),
                            size: md.len(),
                        });
                        NodeKind::File {
                            size: md.len(),
                            data: self.files.len() - 1,
                        }
                    } else if ft.is_symlink() {
                        let target = fs::read_link(&path).map_err(io_err(&path))?;
                        let target = target.into_os_string().into_vec();
                        if target.is_empty() || target.len() >= layout::BLOCK_SIZE as usize {
                            return Err(BuildError::Unsupported {
                                path,
                                what: format!("symlink target of {} bytes", target.len()),
                            });
                        }
                        NodeKind::Symlink { target }
                    } else if ft.is_char_device() || ft.is_block_device() {
                        let (major, minor) = split_dev(md.rdev());
                        if major > 0xfff || minor > 0xfffff {
                            return Err(BuildError::Unsupported {
                                path,
                                what: format!("device number {major}:{minor}"),
                            });
                        }
                        if ft.is_char_device() {
                            NodeKind::CharDev { major, minor }
                        } else {
                            NodeKind::BlockDev { major, minor }
                        }
                    } else if ft.is_fifo() {
                        NodeKind::Fifo
                    } else if ft.is_socket() {
                        NodeKind::Socket
                    } else {
                        return Err(BuildError::Unsupported {
                            path,
                            what: "unknown file type".into(),
                        });
                    };
                    let id = self.push(Node {
                        meta,
                        kind,
                        source: path.clone(),
                    });
                    if md.nlink() > 1 {
                        links.insert(key, id);
                    }
                    id
                }
            };
            self.insert(dir_id, name, id);
        }
        Ok(())
    }

    /// The sorted entries of layer directory `path`, merged onto tree
    /// directory `dir`, with its whiteouts applied to `dir` (which still holds
    /// only lower-layer children) and the markers removed.
    fn layer_entries(&mut self, dir: NodeId, path: &Path) -> Result<DirIter, BuildError> {
        let mut entries = sorted_entries(path)?;
        let mut opaque = false;
        let mut removed: Vec<Vec<u8>> = Vec::new();
        entries.retain(|(name, _)| {
            if name.as_slice() == WHITEOUT_OPAQUE {
                opaque = true;
                false
            } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
                // ".wh..wh.*" other than the opaque marker: AUFS metadata,
                // meaningless here; dropped like every marker.
                if !target.starts_with(WHITEOUT_PREFIX) {
                    removed.push(target.to_vec());
                }
                false
            } else {
                true
            }
        });
        for target in &removed {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(BuildError::Unsupported {
                    path: path.join(std::ffi::OsStr::from_bytes(
                        &[WHITEOUT_PREFIX, target.as_slice()].concat(),
                    )),
                    what: "whiteout naming no file".into(),
                });
            }
        }
        if let NodeKind::Dir { children } = &mut self.nodes[dir].kind {
            if opaque {
                children.clear();
            }
            for target in removed {
                children.remove(&target);
            }
        }
        Ok(entries.into_iter())
    }

    fn insert(&mut self, dir: NodeId, name: Vec<u8>, child: NodeId) {
        if let NodeKind::Dir { children } = &mut self.nodes[dir].kind {
            children.insert(name, child);
        }
    }
}
