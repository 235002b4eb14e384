//! An image on disk, as `lazypull inspect` and `verify` take it: a build
//! output directory (with manifest.json) or a meta blob with its data blobs
//! beside it, plain or in stored form.
//!
//! It owns finding and opening those files; it must not check them.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use lazypull_erofs::{Image, Manifest};

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// An image: a build output directory (with manifest.json), or a meta blob
    /// whose data blobs sit beside it.
    pub(crate) image: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// An image on disk: its meta blob, parsed, and where its data blobs are.
pub(crate) struct Opened {
    pub(crate) meta_path: PathBuf,
    pub(crate) meta: Vec<u8>,
    pub(crate) image: Image,
    pub(crate) blob_dir: PathBuf,
}

pub(crate) fn open(path: &Path) -> anyhow::Result<Opened> {
    let (meta_path, blob_dir) = if path.is_dir() {
        let manifest_path = path.join(lazypull_erofs::MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", manifest_path.display()))?;
        (path.join(&manifest.meta), path.to_path_buf())
    } else {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        (path.to_path_buf(), dir)
    };
    let meta =
        std::fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
    let image = Image::from_bytes(meta.clone())
        .with_context(|| format!("{} is not a valid EROFS meta blob", meta_path.display()))?;
    Ok(Opened {
        meta_path,
        meta,
        image,
        blob_dir,
    })
}

/// A data blob of an image on disk: the plain file, or its stored form.
pub(crate) enum BlobFile {
    Plain(File),
    Stored(lazypull_blob::StoredBlob<File>),
}

impl BlobFile {
    pub(crate) fn open(dir: &Path, digest: &str) -> anyhow::Result<BlobFile> {
        if let Some(stored) = lazypull_blob::open_local(dir, digest)? {
            return Ok(BlobFile::Stored(stored));
        }
        let path = dir.join(digest);
        Ok(BlobFile::Plain(File::open(&path).with_context(|| {
            format!("data blob {}", path.display())
        })?))
    }

    pub(crate) fn present(dir: &Path, digest: &str) -> bool {
        dir.join(digest).is_file()
            || lazypull_blob::StoredPaths::in_dir(dir, digest)
                .table
                .is_file()
    }
}

/// Lets the image reader read file data through either form.
impl std::os::unix::fs::FileExt for BlobFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            BlobFile::Plain(f) => f.read_at(buf, offset),
            BlobFile::Stored(s) => lazypull_source::BlobSource::read_at(s, buf, offset),
        }
    }

    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// The names of the image's data blobs, in device table order.
pub(crate) fn tags(image: &Image) -> Vec<String> {
    image
        .devices()
        .iter()
        .map(|d| String::from_utf8_lossy(d.tag_bytes()).into_owned())
        .collect()
}
