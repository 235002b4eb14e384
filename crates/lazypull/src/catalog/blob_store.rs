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
use lazypull_erofs::{TableRef, Trailer, TrailerEntry};
use lazypull_source::{BlobSource, LocalDir, OpenError, RangeBlob, RangeRead};
use sha2::{Digest, Sha256};

/// `--blob-url` and `--blob-dir`, either or both.
pub(crate) struct BlobStore {
    blob_dir: Option<LocalDir>,
    /// Base URL of a blob directory served over HTTP(S) (Range support needed).
    blob_url: Option<String>,
    /// How to reach the blob URL.
    client: ClientOptions,
    fetch: Arc<FetchContext>,
    /// Largest meta blob read (config key `max_meta_size`).
    max_meta_size: u64,
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
            max_meta_size: super::DEFAULT_MAX_META_SIZE,
        }
    }

    /// The same, reading meta blobs of at most `limit` bytes.
    pub(crate) fn with_max_meta_size(mut self, limit: u64) -> Self {
        self.max_meta_size = limit;
        self
    }

    /// Blob `name`, asked for by the kernel without any registered image
    /// naming it: from the blob dir (stored form first, then a plain file),
    /// never from the blob URL, whose bytes are served only as an image
    /// registered by its fsid vouches for them (see [`open_data`](Self::open_data)).
    pub(crate) fn open(&self, name: &str) -> Result<Arc<dyn BlobSource>, OpenError> {
        if let Some(store) = &self.blob_dir {
            if self.blob_url.is_none() || in_dir(store.root(), name) {
                return self.open_local(store, name);
            }
        }
        match &self.blob_url {
            Some(base) => Err(refused(
                name,
                base,
                "no registered image names this blob, and bytes from --blob-url are served only \
                 for an image registered by its fsid (lazypull mount --fsid FSID DIR), whose meta \
                 blob vouches for them",
            )),
            None => Err(OpenError::NotFound {
                name: name.to_owned(),
                path: PathBuf::from(format!(
                    "(no mounted image has blob {name}, and no blob dir is configured)"
                )),
            }),
        }
    }

    /// Data blob `name` of an image whose meta blob carries `trailer` (None:
    /// it has none): under the blob URL only with the chunk table the trailer
    /// vouches for (its sha256 and size checked before it is used), else from
    /// the blob dir, which is the administrator's and trusted as it is.
    pub(crate) fn open_data(
        &self,
        name: &str,
        trailer: Option<&Trailer>,
    ) -> Result<Arc<dyn BlobSource>, OpenError> {
        if let Some(base) = &self.blob_url {
            let local = self
                .blob_dir
                .as_ref()
                .is_some_and(|d| in_dir(d.root(), name));
            let entry = trailer.map(|t| t.entry(name));
            match entry {
                Some(Some(TrailerEntry {
                    table: Some(table), ..
                })) => match self.open_http(base, name, table) {
                    Err(e) if e.errno() == libc::ENOENT && local => {}
                    other => return other,
                },
                _ if local => {}
                None => {
                    return Err(refused(
                        name,
                        base,
                        "the image's meta blob has no blob trailer naming its chunk tables \
                         (built by an older lazypull), so nothing vouches for the bytes \
                         under --blob-url: rebuild the image with this lazypull (lazypull build)",
                    ))
                }
                Some(None) => {
                    return Err(refused(
                        name,
                        base,
                        "the image's meta blob does not list this data blob",
                    ))
                }
                Some(Some(TrailerEntry { table: None, .. })) => {
                    return Err(refused(
                        name,
                        base,
                        "it is stored plain (built with --compression none): a plain blob behind \
                         a URL cannot be verified as it is read; build the image with \
                         --compression zstd (the default), or serve it from a local --blob-dir",
                    ))
                }
            }
        }
        match &self.blob_dir {
            Some(store) => self.open_local(store, name),
            None => Err(OpenError::NotFound {
                name: name.to_owned(),
                path: PathBuf::from("(no blob dir or blob URL is configured)"),
            }),
        }
    }

    fn open_local(&self, store: &LocalDir, name: &str) -> Result<Arc<dyn BlobSource>, OpenError> {
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
            Ok(None) => Ok(store.open(name.as_bytes())?),
            Err(e) => Err(OpenError::Io {
                name: name.to_owned(),
                path: lazypull_blob::StoredPaths::in_dir(store.root(), name).table,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            }),
        }
    }

    /// `<base>/<name>.table`, checked against `want` (what the image's meta
    /// blob vouches for) before it is decoded, and `<name>.zst`, whose units
    /// are then verified one by one against it as they are read.
    fn open_http(
        &self,
        base: &str,
        name: &str,
        want: &TableRef,
    ) -> Result<Arc<dyn BlobSource>, OpenError> {
        let opts = &self.client;
        let table_url = format!("{base}/{}", lazypull_blob::names::table_file(name));
        let bad = |why: String| OpenError::Io {
            name: name.to_owned(),
            path: PathBuf::from(&table_url),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
        };
        // Called off the serving task (registration), but keep the runtime
        // free to move other work off this thread while the network answers.
        let work = || {
            // The table is fetched whole into memory: bound what the meta blob
            // may name before anything is asked for or allocated.
            let limit = lazypull_blob::format::MAX_TABLE_LEN;
            if want.size > limit {
                return Err(bad(format!(
                    "the image's meta blob names a chunk table of {} bytes, more than the \
                     limit of {limit} bytes: refusing it",
                    want.size
                )));
            }
            let t =
                HttpBlob::open(&table_url, opts).map_err(|e| http_error(name, &table_url, e))?;
            if t.size() != want.size {
                return Err(bad(format!(
                    "the web server's chunk table is {} bytes; the image's meta blob (its fsid) \
                     vouches for one of {} bytes: refusing it",
                    t.size(),
                    want.size
                )));
            }
            let mut bytes = vec![0u8; want.size as usize];
            t.read_exact_at(&mut bytes, 0).map_err(|e| OpenError::Io {
                name: name.to_owned(),
                path: PathBuf::from(&table_url),
                source: e,
            })?;
            let got: [u8; 32] = Sha256::digest(&bytes).into();
            if got != want.sha256 {
                return Err(bad(format!(
                    "the web server's chunk table has sha256:{}; the image's meta blob (its fsid) \
                     vouches for sha256:{}: refusing it",
                    hex::encode(got),
                    hex::encode(want.sha256)
                )));
            }
            let table = ChunkTable::decode(&bytes).map_err(|e| bad(e.to_string()))?;
            lazypull_blob::names::check_table_is_for(&table, name)
                .map_err(|e| bad(e.to_string()))?;
            let data_url = format!("{base}/{}", lazypull_blob::names::data_file(name));
            let data =
                HttpBlob::open(&data_url, opts).map_err(|e| http_error(name, &data_url, e))?;
            lazypull_blob::names::check_stored_len(&table, data.size())
                .map_err(|e| bad(format!("{data_url}: {e}")))?;
            Ok(Arc::new(ChunkedBlob::new(
                name.to_owned(),
                table,
                Arc::new(data),
                self.fetch.clone(),
            )) as Arc<dyn BlobSource>)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(work)
            }
            _ => work(),
        }
    }

    /// The whole meta blob `name`, checked against its name when that is a
    /// sha256 (the one copy the kernel then reads). Under the blob URL the name
    /// must be its sha256: that is all that vouches for it.
    pub(crate) fn read_meta(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let local = self
            .blob_dir
            .as_ref()
            .is_some_and(|d| d.root().join(name).is_file());
        let source: Arc<dyn BlobSource> = match (&self.blob_url, &self.blob_dir) {
            (Some(base), _) if !local || self.blob_dir.is_none() => {
                if !is_sha256_hex(name) {
                    bail!(
                        "image {name}: an image under --blob-url is named by its meta blob's \
                         sha256 (64 lowercase hex digits), which is what verifies it"
                    );
                }
                let url = format!("{base}/{name}");
                let plain = HttpBlob::open(&url, &self.client).map_err(|e| {
                    anyhow::anyhow!(
                        "image {name}: {} (is it in the daemon's --blob-dir or --blob-url?)",
                        http_error(name, &url, e)
                    )
                })?;
                Arc::new(RangeBlob::new(name, plain.size(), Arc::new(plain)))
            }
            (_, Some(store)) => store.open(name.as_bytes()).map_err(|e| {
                anyhow::anyhow!(
                    "image {name}: {e} (is it in the daemon's --blob-dir or --blob-url?)"
                )
            })?,
            (_, None) => bail!("image {name}: the daemon has no --blob-dir or --blob-url"),
        };
        let size = source.size();
        // Checked before a byte is allocated: under --blob-url the size is the
        // web server's word (its Content-Range total).
        let limit = self.max_meta_size;
        if size > limit {
            bail!(
                "meta blob {name} is {size} bytes, more than the limit of {limit} bytes \
                 (config key max_meta_size): refusing to read it"
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

/// Whether `dir` holds blob `name`, in stored form or plain.
fn in_dir(dir: &Path, name: &str) -> bool {
    lazypull_blob::StoredPaths::in_dir(dir, name)
        .table
        .is_file()
        || dir.join(name).is_file()
}

/// Blob `name` under the blob URL `base` is not served, for `why`.
fn refused(name: &str, base: &str, why: &str) -> OpenError {
    OpenError::Io {
        name: name.to_owned(),
        path: PathBuf::from(format!("{base}/{name}")),
        source: std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("refusing to serve it from --blob-url: {why}"),
        ),
    }
}

/// A backend error reaching `url` for blob `name`: NotFound for a 404.
fn http_error(name: &str, url: &str, e: lazypull_backend::RegistryError) -> OpenError {
    if e.errno() == libc::ENOENT {
        OpenError::NotFound {
            name: name.to_owned(),
            path: PathBuf::from(url),
        }
    } else {
        OpenError::Io {
            name: name.to_owned(),
            path: PathBuf::from(url),
            source: std::io::Error::other(e.to_string()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk table under --blob-url that the meta blob's trailer says is
    /// 1 TiB (and the web server agrees) is refused before anything is
    /// allocated or asked for: no table is that big.
    #[test]
    fn a_huge_table_under_the_blob_url_is_refused_before_allocating() {
        use std::io::{BufRead, BufReader, Write};
        let size: u64 = 1 << 40;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            listener.set_nonblocking(false).unwrap();
            let mut served = 0;
            // Answers every request (size probes) with the 1 TiB total until
            // the test connects once more to stop it.
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return served;
                }
                while r.read_line(&mut line).unwrap_or(0) > 2 {}
                served += 1;
                let _ = write!(
                    conn,
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/{size}\r\n\
                     Content-Length: 1\r\nConnection: close\r\n\r\nx"
                );
            }
            served
        });
        let name = "a".repeat(64);
        let trailer = Trailer {
            entries: vec![TrailerEntry {
                blob: [0xaa; 32],
                table: Some(TableRef {
                    sha256: [0; 32],
                    size,
                }),
            }],
        };
        let store = BlobStore::new(
            None,
            Some(format!("http://{addr}/")),
            ClientOptions::default(),
            FetchContext::new(Default::default()),
        );
        let err = match store.open_data(&name, Some(&trailer)) {
            Ok(_) => panic!("a 1 TiB chunk table was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&size.to_string()) && err.contains("limit"),
            "{err}"
        );
        drop(std::net::TcpStream::connect(addr).unwrap());
        assert_eq!(server.join().unwrap(), 0, "the web server was asked");
    }
}

/// The chain of trust under --blob-url: fsid → meta blob → trailer → tables.
#[cfg(test)]
pub(super) mod trust_tests {
    use super::*;
    use crate::blob_server::BlobServer;
    use lazypull_engine::FetchOptions;

    /// How a test image's data blobs are stored.
    #[derive(Clone, Copy, PartialEq)]
    pub(in crate::catalog) enum Form {
        /// zstd units with a chunk table, the meta blob sealed with a trailer.
        Sealed,
        /// Plain blob files, the meta blob sealed with a trailer.
        Plain,
        /// zstd units with a chunk table, the meta blob without a trailer (as
        /// an older lazypull built them).
        NoTrailer,
    }

    /// A one-blob image of `data` built into `out`: (fsid, data blob name).
    pub(in crate::catalog) fn build(out: &Path, data: &[u8], form: Form) -> (String, String) {
        let src = out.with_extension("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f.bin"), data).unwrap();
        let img = lazypull_erofs::build_from_layers(
            &[src],
            out,
            &lazypull_erofs::BuildOptions::default(),
        )
        .unwrap();
        let name = img.blobs[0].digest.clone();
        let mut table = None;
        if form != Form::Plain {
            let packed = lazypull_blob::pack(
                &out.join(&name),
                out,
                &lazypull_blob::PackOptions::default(),
            )
            .unwrap();
            std::fs::remove_file(out.join(&name)).unwrap();
            let t = std::fs::read(packed.table_path).unwrap();
            table = Some(TableRef {
                sha256: Sha256::digest(&t).into(),
                size: t.len() as u64,
            });
        }
        if form == Form::NoTrailer {
            return (img.meta_digest, name);
        }
        let mut blob = [0u8; 32];
        hex::decode_to_slice(&name, &mut blob).unwrap();
        let trailer = Trailer {
            entries: vec![TrailerEntry { blob, table }],
        };
        let sealed = lazypull_erofs::seal_output(out, &img, &trailer).unwrap();
        (sealed.meta_digest, name)
    }

    /// Makes the sealed image `fsid` in `out` lie about its data blob `name`:
    /// the stored form of `liar` (in `liar_out`, of the same size) under a
    /// chunk table declaring `name`, and a trailer vouching for that table.
    /// Returns the new fsid.
    pub(in crate::catalog) fn forge(
        out: &Path,
        fsid: &str,
        name: &str,
        liar_out: &Path,
        liar: &str,
    ) -> String {
        let mut table = std::fs::read(liar_out.join(format!("{liar}.table"))).unwrap();
        table[40..72].copy_from_slice(&hex::decode(name).unwrap());
        let n = table.len();
        let sum = Sha256::digest(&table[..n - 32]);
        table[n - 32..].copy_from_slice(&sum);
        std::fs::write(out.join(format!("{name}.table")), &table).unwrap();
        std::fs::copy(
            liar_out.join(format!("{liar}.zst")),
            out.join(format!("{name}.zst")),
        )
        .unwrap();
        let meta = std::fs::read(out.join(fsid)).unwrap();
        let image = lazypull_erofs::Image::from_bytes(meta.clone()).unwrap();
        let mut t = image.trailer().unwrap().unwrap();
        t.entries[0].table = Some(TableRef {
            sha256: Sha256::digest(&table).into(),
            size: table.len() as u64,
        });
        let sealed =
            lazypull_erofs::append_trailer(meta[..image.image_len() as usize].to_vec(), &t);
        let forged = hex::encode(Sha256::digest(&sealed));
        std::fs::write(out.join(&forged), sealed).unwrap();
        forged
    }

    fn store(server: &BlobServer) -> BlobStore {
        BlobStore::new(
            None,
            Some(server.url()),
            ClientOptions::default(),
            FetchContext::new(FetchOptions::default()),
        )
    }

    fn trailer(store: &BlobStore, fsid: &str) -> Option<Trailer> {
        let meta = store.read_meta(fsid).unwrap();
        lazypull_erofs::Image::from_bytes(meta)
            .unwrap()
            .trailer()
            .unwrap()
    }

    fn refusal(r: Result<Arc<dyn BlobSource>, OpenError>) -> String {
        match r {
            Ok(s) => panic!("served {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// 3,000,000 pseudo-random bytes (no chunk repeats: the blob is the file).
    pub(in crate::catalog) fn data(seed: u8) -> Vec<u8> {
        let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..3_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn a_table_the_fsid_vouches_for_serves_verified_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("www");
        let (fsid, name) = build(&out, &data(1), Form::Sealed);
        let server = BlobServer::start(&out).unwrap();
        let store = store(&server);
        let t = trailer(&store, &fsid).expect("sealed");
        let blob = store.open_data(&name, Some(&t)).unwrap();
        assert_eq!(blob.content_binding(), t.entries[0].table.map(|t| t.sha256));
        let mut got = vec![0u8; 3_000_000];
        assert_eq!(blob.read_at(&mut got, 0).unwrap(), got.len());
        assert!(got == data(1), "the blob holds the file, verified");
    }

    /// A web server that changed a blob's chunk table (and its stored units)
    /// under the name the image declares: a table as consistent as the real
    /// one, but not the one the fsid vouches for.
    #[test]
    fn a_lying_web_server_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("www");
        let (fsid, name) = build(&out, &data(1), Form::Sealed);
        let liar_out = dir.path().join("liar");
        let (_, liar) = build(&liar_out, &data(2), Form::Sealed);
        let server = BlobServer::start(&out).unwrap();
        let store = store(&server);
        let t = trailer(&store, &fsid).unwrap();
        // The liar's table, declaring the trusted name, checksum fixed.
        let mut table = std::fs::read(liar_out.join(format!("{liar}.table"))).unwrap();
        table[40..72].copy_from_slice(&hex::decode(&name).unwrap());
        let n = table.len();
        let sum = Sha256::digest(&table[..n - 32]);
        table[n - 32..].copy_from_slice(&sum);
        assert_eq!(ChunkTable::decode(&table).unwrap().digest(), name);
        std::fs::write(out.join(format!("{name}.table")), &table).unwrap();
        std::fs::copy(
            liar_out.join(format!("{liar}.zst")),
            out.join(format!("{name}.zst")),
        )
        .unwrap();
        let why = refusal(store.open_data(&name, Some(&t)));
        assert!(
            why.contains("the image's meta blob (its fsid) vouches for sha256:"),
            "{why}"
        );
        // A table of another size is refused before it is read.
        table.extend_from_slice(&[0; 48]);
        std::fs::write(out.join(format!("{name}.table")), &table).unwrap();
        let why = refusal(store.open_data(&name, Some(&t)));
        assert!(why.contains("vouches for one of"), "{why}");
        // Nor is the name served without an image vouching for it.
        let why = refusal(store.open(&name));
        assert!(why.contains("no registered image names this blob"), "{why}");
    }

    #[test]
    fn plain_blobs_behind_a_url_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("www");
        let (fsid, name) = build(&out, &data(3), Form::Plain);
        let server = BlobServer::start(&out).unwrap();
        let store = store(&server);
        let t = trailer(&store, &fsid).unwrap();
        assert_eq!(t.entries[0].table, None);
        let before = server.requests();
        let why = refusal(store.open_data(&name, Some(&t)));
        assert!(why.contains("stored plain"), "{why}");
        assert!(why.contains("--compression zstd"), "{why}");
        assert!(why.contains("--blob-dir"), "{why}");
        assert_eq!(server.requests(), before, "nothing of it was fetched");
        // From a local blob dir (the administrator's) it is served as before.
        let local = BlobStore::new(
            Some(out.clone()),
            None,
            ClientOptions::default(),
            FetchContext::new(FetchOptions::default()),
        );
        assert_eq!(local.open_data(&name, Some(&t)).unwrap().size(), 3_002_368);
    }

    #[test]
    fn a_meta_blob_without_a_trailer_behind_a_url_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("www");
        let (fsid, name) = build(&out, &data(4), Form::NoTrailer);
        let server = BlobServer::start(&out).unwrap();
        let store = store(&server);
        assert_eq!(trailer(&store, &fsid), None);
        let why = refusal(store.open_data(&name, None));
        assert!(why.contains("no blob trailer"), "{why}");
        assert!(
            why.contains("rebuild the image with this lazypull"),
            "{why}"
        );
    }
}
