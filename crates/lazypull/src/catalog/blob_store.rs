//! The daemon's blob store: blobs named by their key (an fsid or a device tag)
//! under `--blob-url` (a blob directory served over HTTP(S) with Range
//! support) and in `--blob-dir`, for images not mounted by reference. Opening
//! a blob is where its chunk table is read and checked and its [`ChunkedBlob`]
//! built.
//!
//! It owns how a name becomes a [`BlobSource`] there; it must not know which
//! images are registered (the catalog does) or keep anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use lazypull_backend::registry::ClientOptions;
use lazypull_backend::HttpBlob;
use lazypull_blob::ChunkTable;
use lazypull_engine::{ChunkedBlob, FetchContext};
use lazypull_source::{BlobSource, LocalDir, OpenError, RangeBlob, RangeRead};
use sha2::{Digest, Sha256};

/// Meta blobs are small (metadata only); anything bigger is a mistake.
const MAX_META_BYTES: u64 = 1 << 30;

/// `--blob-url` and `--blob-dir`, either or both.
pub(crate) struct BlobStore {
    blob_dir: Option<LocalDir>,
    /// Base URL of a blob directory served over HTTP(S) (Range support needed).
    blob_url: Option<String>,
    /// How to reach the blob URL.
    client: ClientOptions,
    fetch: Arc<FetchContext>,
}

impl BlobStore {
    pub(crate) fn new(
        blob_dir: Option<PathBuf>,
        blob_url: Option<String>,
        client: ClientOptions,
        fetch: Arc<FetchContext>,
    ) -> Self {
        BlobStore {
            blob_dir: blob_dir.map(LocalDir::new),
            blob_url: blob_url.map(|u| u.trim_end_matches('/').to_owned()),
            client,
            fetch,
        }
    }

    /// Blob `name` under the blob URL, else in the blob dir (stored form
    /// first, then a plain file, in both places).
    pub(crate) fn open(&self, name: &str) -> Result<Arc<dyn BlobSource>, OpenError> {
        let cookie = name.as_bytes();
        if let Some(base) = &self.blob_url {
            match self.open_http(base, name) {
                Err(e) if e.errno() == libc::ENOENT && self.blob_dir.is_some() => {}
                other => return other,
            }
        }
        let Some(store) = &self.blob_dir else {
            return Err(OpenError::NotFound {
                name: name.to_owned(),
                path: PathBuf::from(format!(
                    "(no mounted image has blob {name}, and no blob dir is configured)"
                )),
            });
        };
        match lazypull_blob::open_local(store.root(), name) {
            Ok(Some(stored)) => {
                let (name, table, file) = stored.into_parts();
                let stored: Arc<dyn RangeRead> = Arc::new(file);
                Ok(Arc::new(ChunkedBlob::new(
                    name,
                    table,
                    stored,
                    self.fetch.clone(),
                )))
            }
            Ok(None) => Ok(store.open(cookie)?),
            Err(e) => Err(OpenError::Io {
                name: name.to_owned(),
                path: lazypull_blob::StoredPaths::in_dir(store.root(), name).table,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            }),
        }
    }

    /// `<base>/<name>.table` + `<name>.zst` (verified unit by unit), else the
    /// plain `<base>/<name>`.
    fn open_http(&self, base: &str, name: &str) -> Result<Arc<dyn BlobSource>, OpenError> {
        let io = |what: &str, e: lazypull_backend::RegistryError| {
            let errno = e.errno();
            let err = OpenError::Io {
                name: name.to_owned(),
                path: PathBuf::from(what),
                source: std::io::Error::other(e.to_string()),
            };
            if errno == libc::ENOENT {
                OpenError::NotFound {
                    name: name.to_owned(),
                    path: PathBuf::from(what),
                }
            } else {
                err
            }
        };
        let opts = &self.client;
        // OPEN is answered on the serving task: let the runtime move other work
        // off this thread while the network answers.
        tokio::task::block_in_place(|| {
            let table_url = format!("{base}/{}", lazypull_blob::names::table_file(name));
            match HttpBlob::open(&table_url, opts) {
                Ok(t) => {
                    let mut bytes = vec![0u8; t.size() as usize];
                    t.read_exact_at(&mut bytes, 0).map_err(|e| OpenError::Io {
                        name: name.to_owned(),
                        path: PathBuf::from(&table_url),
                        source: e,
                    })?;
                    let bad = |why: String| OpenError::Io {
                        name: name.to_owned(),
                        path: PathBuf::from(&table_url),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
                    };
                    let table = ChunkTable::decode(&bytes).map_err(|e| bad(e.to_string()))?;
                    lazypull_blob::names::check_table_is_for(&table, name)
                        .map_err(|e| bad(e.to_string()))?;
                    let data_url = format!("{base}/{}", lazypull_blob::names::data_file(name));
                    let data = HttpBlob::open(&data_url, opts).map_err(|e| io(&data_url, e))?;
                    lazypull_blob::names::check_stored_len(&table, data.size())
                        .map_err(|e| bad(format!("{data_url}: {e}")))?;
                    Ok(Arc::new(ChunkedBlob::new(
                        name.to_owned(),
                        table,
                        Arc::new(data),
                        self.fetch.clone(),
                    )) as Arc<dyn BlobSource>)
                }
                Err(e) if e.errno() == libc::ENOENT => {
                    let url = format!("{base}/{name}");
                    let plain = HttpBlob::open(&url, opts).map_err(|e| io(&url, e))?;
                    Ok(
                        Arc::new(RangeBlob::new(name, plain.size(), Arc::new(plain)))
                            as Arc<dyn BlobSource>,
                    )
                }
                Err(e) => Err(io(&table_url, e)),
            }
        })
    }

    /// The whole meta blob `name`, checked against its name when that is a
    /// sha256 (the one copy the kernel then reads).
    pub(crate) fn read_meta(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let source = self.open(name).map_err(|e| {
            anyhow::anyhow!("image {name}: {e} (is it in the daemon's --blob-dir or --blob-url?)")
        })?;
        let size = source.size();
        if size > MAX_META_BYTES {
            bail!(
                "meta blob {name} is {size} bytes; more than {MAX_META_BYTES} is not a meta blob"
            );
        }
        let mut bytes = vec![0u8; size as usize];
        let mut done = 0;
        while done < bytes.len() {
            let n = source
                .read_at(&mut bytes[done..], done as u64)
                .with_context(|| format!("reading meta blob {name}"))?;
            if n == 0 {
                bail!("meta blob {name} ended after {done} of {size} bytes");
            }
            done += n;
        }
        if is_sha256_hex(name) && hex::encode(Sha256::digest(&bytes)) != name {
            bail!("meta blob {name} does not match its digest: refusing to serve it");
        }
        Ok(bytes)
    }
}

/// The verified copy of a registered meta blob at `path`, opened by the name
/// the kernel gives it (`cookie`).
pub(crate) fn open_meta_copy(path: &Path, cookie: &[u8]) -> Result<Arc<dyn BlobSource>, OpenError> {
    let dir = LocalDir::new(path.parent().unwrap_or(Path::new("/")));
    Ok(dir.open(cookie)?)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
