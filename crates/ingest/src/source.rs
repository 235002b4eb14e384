//! [`build_from_source`]: build an image from what users have — a layer
//! directory, a tar layer (plain or gzip), an OCI image layout directory or
//! a `docker save` archive.
//!
//! Archive layers are extracted one by one (streaming) into private
//! temporary directories under the output directory, then the ordinary
//! layer merge runs over them; the directories are removed at the end,
//! whatever the outcome.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use lazypull_erofs::{
    build_from_layer_inputs, build_from_layers, BuildError, BuildOptions, BuiltImage, LayerInput,
    Stage,
};
use lazypull_oci::{media_type, Descriptor, ImageIndex, ImageLayout, ImageManifest};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::extract::{self, Extracted, GZIP_MAGIC, ZSTD_MAGIC};
use crate::{io_err, IngestError, IngestOptions};

/// Largest JSON document (index, manifest) read.
const MAX_JSON: u64 = 16 << 20;
/// Deepest index nesting followed.
const MAX_INDEX_DEPTH: usize = 4;

/// Build an image from `source`, detected as:
///
/// 1. an OCI image layout directory (`oci-layout` and `index.json`): the
///    image manifest selected from `index.json` (the only one, else the
///    `linux/amd64` one; nested indexes are followed), its layers in order,
///    each blob's SHA-256 and size checked against its descriptor;
/// 2. any other directory: one layer, as [`build_from_layers`];
/// 3. a gzip file: one gzip-compressed tar layer;
/// 4. a tar file with a top-level `manifest.json` in the `docker save`
///    format: the `Layers` it lists, in order (each plain or gzip);
/// 5. any other tar file: one layer.
///
/// Formats are told apart by content (magic bytes, marker files), never by
/// file name. OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are applied in the
/// merge. Tar layers are extracted streaming, with bounded memory, into
/// private directories under `out_dir` that are removed before returning.
/// Hostile or broken input (`..` leaving the root, writes through symlinks,
/// dangling hard links, truncated or corrupt archives, malformed JSON,
/// missing blobs, digest mismatches) is an error; on any error no final
/// image file is written and an image already in `out_dir` is untouched.
pub fn build_from_source(
    source: &Path,
    out_dir: &Path,
    opts: &BuildOptions,
) -> Result<BuiltImage, IngestError> {
    build_from_source_with(source, out_dir, opts, &IngestOptions::default())
}

/// [`build_from_source`] within the limits of `limits` (what one tar layer
/// may expand to).
pub fn build_from_source_with(
    source: &Path,
    out_dir: &Path,
    opts: &BuildOptions,
    limits: &IngestOptions,
) -> Result<BuiltImage, IngestError> {
    Ok(build_source_image(source, out_dir, opts, limits)?.image)
}

/// [`build_from_source_with`], also returning the source image's config
/// (OCI image layouts and `docker save` archives carry one; directories and
/// tar layers do not), read and verified as the layers are: in an OCI
/// layout against its descriptor's digest and size; in a `docker save`
/// archive against the digest its file name carries (`<hex>.json` or
/// `blobs/sha256/<hex>`), when it carries one. Either way it must be a JSON
/// object.
pub fn build_source_image(
    source: &Path,
    out_dir: &Path,
    opts: &BuildOptions,
    limits: &IngestOptions,
) -> Result<SourceImage, IngestError> {
    opts.validate()?;
    let md = fs::metadata(source).map_err(io_err(source))?;
    let no_config = |image| SourceImage {
        image,
        config: None,
    };
    if md.is_dir() {
        if is_oci_layout(source) {
            let (layers, config) = oci_layers(source)?;
            let image = build_blobs(&layers, out_dir, opts, limits, ArchiveCheck::None)?;
            return Ok(SourceImage {
                image,
                config: Some(config),
            });
        }
        return Ok(no_config(build_from_layers(
            &[source.to_path_buf()],
            out_dir,
            opts,
        )?));
    }
    if !md.is_file() {
        return Err(invalid(source, "neither a directory nor a regular file"));
    }
    let mut f = File::open(source).map_err(io_err(source))?;
    let mut head = [0u8; 512];
    let n = read_up_to(&mut f, &mut head).map_err(io_err(source))?;
    let head = &head[..n];
    if head.starts_with(&GZIP_MAGIC) || head.starts_with(&ZSTD_MAGIC) {
        let layer = LayerBlob::whole_file(source, md.len());
        return Ok(no_config(build_blobs(
            &[layer],
            out_dir,
            opts,
            limits,
            ArchiveCheck::RefuseImageArchive,
        )?));
    }
    if !looks_like_tar(head) {
        return Err(invalid(
            source,
            "not a directory, tar archive or gzip-compressed tar archive",
        ));
    }
    match docker_layers(source)? {
        Some((layers, config)) => {
            let image = build_blobs(&layers, out_dir, opts, limits, ArchiveCheck::None)?;
            Ok(SourceImage { image, config })
        }
        None => {
            let layer = LayerBlob::whole_file(source, md.len());
            Ok(no_config(build_blobs(
                &[layer],
                out_dir,
                opts,
                limits,
                ArchiveCheck::RefuseImageArchive,
            )?))
        }
    }
}

/// What [`build_source_image`] built, and the source image's config.
#[derive(Debug)]
pub struct SourceImage {
    /// The built image.
    pub image: BuiltImage,
    /// The source image's config, if the source has one.
    pub config: Option<SourceConfig>,
}

/// A source image's config, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Its media type: the OCI image config's or Docker's (for `docker save`
    /// archives, Docker's).
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The config JSON (an object) as the source holds it.
    pub bytes: Vec<u8>,
}

impl SourceConfig {
    /// A config whose bytes were checked against what names them.
    fn new(path: &Path, media_type: &str, bytes: Vec<u8>) -> Result<SourceConfig, IngestError> {
        let value: serde_json::Value = parse_json(path, &bytes)?;
        if !value.is_object() {
            return Err(invalid(path, "the image config is not a JSON object"));
        }
        Ok(SourceConfig {
            media_type: media_type.to_owned(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            bytes,
        })
    }
}

/// Whether a single-file layer must be checked for being a whole image archive.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ArchiveCheck {
    None,
    /// The source was taken as one layer: refuse it if its top level is that of
    /// an image archive (a gzip'd `docker save`, or an OCI layout packed in a
    /// tar), which would otherwise build a wrong image without any error.
    RefuseImageArchive,
}

fn refuse_image_archive(label: &str, root: &Path) -> Result<(), IngestError> {
    let has = |name: &str| root.join(name).symlink_metadata().is_ok();
    let kind = if has("oci-layout") {
        "an OCI image layout packed in an archive: unpack it to a directory and build that"
    } else if fs::read(root.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<DockerImage>>(&b).ok())
        .is_some_and(|images| !images.is_empty())
    {
        "a compressed `docker save` archive: decompress it (gunzip) and build the .tar"
    } else {
        return Ok(());
    };
    Err(IngestError::InvalidSource {
        path: PathBuf::from(label),
        reason: format!("this is not a layer but a whole image archive: {kind}"),
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> IngestError {
    IngestError::InvalidSource {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A tar header block: valid checksum, or an all-zero (empty archive) block.
fn looks_like_tar(head: &[u8]) -> bool {
    if head.len() < 512 {
        return false;
    }
    if head.iter().all(|&b| b == 0) {
        return true;
    }
    let field = &head[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    let Ok(want) = u32::from_str_radix(std::str::from_utf8(&digits).unwrap_or(""), 8) else {
        return false;
    };
    let sum: u32 = head[..148]
        .iter()
        .chain(&head[156..512])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    sum == want
}

/// One layer to extract: `size` bytes at `offset` of the file `path`.
struct LayerBlob {
    /// Names the layer in errors.
    label: String,
    path: PathBuf,
    offset: u64,
    size: u64,
    /// Expected SHA-256 (hex) of those bytes.
    digest: Option<String>,
}

impl LayerBlob {
    /// A whole file as one layer, with no digest to check.
    fn whole_file(path: &Path, size: u64) -> Self {
        LayerBlob {
            label: path.display().to_string(),
            path: path.to_path_buf(),
            offset: 0,
            size,
            digest: None,
        }
    }
}

/// Reader that hashes what passes through.
struct Hashing<'a, R> {
    inner: R,
    hash: &'a mut Sha256,
    count: &'a mut u64,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        *self.count += n as u64;
        Ok(n)
    }
}

fn hash_region(path: &Path, offset: u64, size: u64) -> Result<(String, u64), IngestError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let n = io::copy(&mut f.take(size), &mut h).map_err(io_err(path))?;
    Ok((hex::encode(h.finalize()), n))
}

fn extract_blob(l: &LayerBlob, out_dir: &Path, limit: u64) -> Result<Extracted, IngestError> {
    let mut f = File::open(&l.path).map_err(io_err(&l.path))?;
    f.seek(SeekFrom::Start(l.offset)).map_err(io_err(&l.path))?;
    let mut hash = Sha256::new();
    let mut count = 0u64;
    let result = {
        let reader = Hashing {
            inner: f.take(l.size),
            hash: &mut hash,
            count: &mut count,
        };
        let mut reader = reader;
        extract::extract_layer(&mut reader, &l.label, out_dir, limit).and_then(|ex| {
            // Hash what the tar reader left (trailing bytes).
            io::copy(&mut reader, &mut io::sink()).map_err(io_err(&l.path))?;
            Ok(ex)
        })
    };
    let Some(want) = &l.digest else {
        if result.is_ok() && count != l.size {
            return Err(IngestError::InvalidArchive {
                layer: l.label.clone(),
                reason: format!("truncated: {count} of {} bytes", l.size),
            });
        }
        return result;
    };
    let mismatch = |got: String, n: u64| IngestError::DigestMismatch {
        layer: l.label.clone(),
        expected: format!("sha256:{want} ({} bytes)", l.size),
        actual: format!("sha256:{got} ({n} bytes)"),
    };
    match result {
        Ok(ex) => {
            let got = hex::encode(hash.finalize());
            if &got != want || count != l.size {
                return Err(mismatch(got, count));
            }
            Ok(ex)
        }
        Err(e) => {
            // Unreadable content: report a digest mismatch if that is why.
            let (got, n) = hash_region(&l.path, l.offset, l.size)?;
            if &got != want || n != l.size {
                return Err(mismatch(got, n));
            }
            Err(e)
        }
    }
}

/// Extract every layer, build, and remove the extracted directories.
fn build_blobs(
    layers: &[LayerBlob],
    out_dir: &Path,
    opts: &BuildOptions,
    limits: &IngestOptions,
    check: ArchiveCheck,
) -> Result<BuiltImage, IngestError> {
    if layers.is_empty() {
        return Err(BuildError::NoLayers.into());
    }
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let mut extracted = Vec::with_capacity(layers.len());
    for (index, l) in layers.iter().enumerate() {
        opts.progress.stage(Stage::Extracting {
            index,
            count: layers.len(),
            label: l.label.clone(),
        });
        // Earlier extractions are dropped (removed) if this one fails.
        extracted.push(extract_blob(l, out_dir, limits.max_layer_size)?);
    }
    if check == ArchiveCheck::RefuseImageArchive {
        for (l, e) in layers.iter().zip(&extracted) {
            refuse_image_archive(&l.label, e.dir.path())?;
        }
    }
    let inputs: Vec<LayerInput<'_>> = extracted
        .iter()
        .map(|e| LayerInput {
            path: e.dir.path().to_path_buf(),
            recorded: Some(&e.meta),
        })
        .collect();
    let result = build_from_layer_inputs(&inputs, out_dir, opts);
    for e in extracted {
        let path = e.dir.path().to_path_buf();
        e.dir.close().map_err(io_err(&path))?;
    }
    Ok(result?)
}

// ---------------------------------------------------------------------
// OCI image layout

fn is_oci_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file() && dir.join("index.json").is_file()
}

/// The hex part of a `sha256:` digest, validated (it becomes a file name).
fn sha256_hex(d: &Descriptor, what: &Path) -> Result<String, IngestError> {
    let Some(hex) = d.digest.strip_prefix("sha256:") else {
        return Err(invalid(
            what,
            format!("unsupported digest {:?} (only sha256)", d.digest),
        ));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid(what, format!("malformed digest {:?}", d.digest)));
    }
    Ok(hex.to_string())
}

fn read_json_file(path: &Path, limit: u64) -> Result<Vec<u8>, IngestError> {
    let f = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            invalid(path, "missing")
        } else {
            io_err(path)(e)
        }
    })?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > limit {
        return Err(invalid(path, format!("larger than {limit} bytes")));
    }
    Ok(buf)
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, IngestError> {
    serde_json::from_slice(bytes).map_err(|e| invalid(path, format!("malformed JSON: {e}")))
}

/// A small JSON blob of the layout, verified against its descriptor.
fn read_json_blob(layout: &Path, d: &Descriptor) -> Result<(PathBuf, Vec<u8>), IngestError> {
    let hex = sha256_hex(d, &layout.join("index.json"))?;
    let path = layout.join("blobs/sha256").join(&hex);
    if d.size > MAX_JSON {
        return Err(invalid(
            &path,
            format!("descriptor size {} too large", d.size),
        ));
    }
    let bytes = read_json_file(&path, MAX_JSON)?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != hex || bytes.len() as u64 != d.size {
        return Err(IngestError::DigestMismatch {
            layer: format!("blob {}", path.display()),
            expected: format!("{} ({} bytes)", d.digest, d.size),
            actual: format!("sha256:{got} ({} bytes)", bytes.len()),
        });
    }
    Ok((path, bytes))
}

fn describe(d: &Descriptor) -> String {
    let mut s = d.digest.clone();
    if let Some(p) = &d.platform {
        s += &format!(" {}/{}", p.os, p.architecture);
    }
    if let Some(r) = d.ref_name() {
        s += &format!(" ref={r}");
    }
    s
}

/// Pick the one image among an index's manifests: entries without a media
/// type count as candidates too (OCI layouts may leave it out).
fn select<'d>(path: &Path, manifests: &'d [Descriptor]) -> Result<&'d Descriptor, IngestError> {
    let candidates: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| {
            let mt = d.media_type.as_str();
            mt.is_empty() || media_type::is_index(mt) || media_type::is_image_manifest(mt)
        })
        .collect();
    if let [only] = candidates[..] {
        return Ok(only);
    }
    if candidates.is_empty() {
        return Err(invalid(path, "lists no image manifest"));
    }
    let amd64: Vec<&Descriptor> = candidates
        .iter()
        .copied()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .collect();
    match amd64[..] {
        [only] => Ok(only),
        _ => Err(invalid(
            path,
            format!(
                "ambiguous: {} manifests and {} of them for linux/amd64; \
                 keep only the wanted image in the index: {}",
                candidates.len(),
                amd64.len(),
                candidates
                    .iter()
                    .map(|d| describe(d))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn oci_layers(layout: &Path) -> Result<(Vec<LayerBlob>, SourceConfig), IngestError> {
    let marker = layout.join("oci-layout");
    let _: ImageLayout = parse_json(&marker, &read_json_file(&marker, MAX_JSON)?)?;
    let index_path = layout.join("index.json");
    let mut index: ImageIndex = parse_json(&index_path, &read_json_file(&index_path, MAX_JSON)?)?;
    let mut at = index_path;
    for _ in 0..MAX_INDEX_DEPTH {
        let d = select(&at, &index.manifests)?;
        let (path, bytes) = read_json_blob(layout, d)?;
        let value: serde_json::Value = parse_json(&path, &bytes)?;
        // The descriptor's media type, else the document's own.
        let mt = Some(d.media_type.as_str())
            .filter(|mt| !mt.is_empty())
            .or_else(|| value.get("mediaType").and_then(|v| v.as_str()));
        let is_index = match mt {
            Some(mt) if media_type::is_index(mt) => true,
            Some(mt) if media_type::is_image_manifest(mt) => false,
            _ => value.get("manifests").is_some(),
        };
        if is_index {
            index = parse_json(&path, &bytes)?;
            at = path;
            continue;
        }
        let manifest: ImageManifest = parse_json(&path, &bytes)?;
        if let Some(mt) = manifest.media_type.as_deref() {
            if !media_type::is_image_manifest(mt) {
                return Err(invalid(
                    &path,
                    format!("unsupported manifest media type {mt:?}"),
                ));
            }
        }
        let mut out = Vec::with_capacity(manifest.layers.len());
        for (i, l) in manifest.layers.iter().enumerate() {
            // Compression is detected from the content.
            let mt = l.media_type.as_str();
            if !media_type::is_tar_layer(mt) {
                return Err(invalid(
                    &path,
                    format!(
                        "layer {} ({}): unsupported media type {mt:?}",
                        i + 1,
                        l.digest
                    ),
                ));
            }
            let hex = sha256_hex(l, &path)?;
            let blob = layout.join("blobs/sha256").join(&hex);
            let label = format!("{} ({})", i + 1, l.digest);
            let md = fs::symlink_metadata(&blob).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    invalid(&blob, format!("layer {label}: blob missing"))
                } else {
                    io_err(&blob)(e)
                }
            })?;
            if !md.is_file() {
                return Err(invalid(
                    &blob,
                    format!("layer {label}: blob is not a regular file"),
                ));
            }
            out.push(LayerBlob {
                label,
                path: blob,
                offset: 0,
                size: l.size,
                digest: Some(hex),
            });
        }
        let mt = manifest.config.media_type.as_str();
        if mt != media_type::OCI_CONFIG && mt != media_type::DOCKER_CONFIG {
            return Err(invalid(
                &path,
                format!(
                    "config ({}): unsupported media type {mt:?} (expected {} or {})",
                    manifest.config.digest,
                    media_type::OCI_CONFIG,
                    media_type::DOCKER_CONFIG
                ),
            ));
        }
        let (config_path, bytes) = read_json_blob(layout, &manifest.config)?;
        let config = SourceConfig::new(&config_path, mt, bytes)?;
        return Ok((out, config));
    }
    Err(invalid(layout, "image indexes nested too deeply"))
}

// ---------------------------------------------------------------------
// docker save archives

#[derive(Debug, Deserialize)]
struct DockerImage {
    #[serde(rename = "Config", default)]
    config: Option<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// An archive member of interest.
enum Member {
    File { offset: u64, size: u64 },
    Symlink(Vec<u8>),
    Other,
}

fn archive_err(path: &Path, e: io::Error) -> IngestError {
    IngestError::InvalidArchive {
        layer: path.display().to_string(),
        reason: format!("corrupt or truncated tar: {e}"),
    }
}

/// Scan the tar at `path` (seeking over contents); call `f` on each member.
fn scan_tar(
    path: &Path,
    mut f: impl FnMut(PathBuf, &mut tar::Entry<'_, File>) -> Result<(), IngestError>,
) -> Result<(), IngestError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut archive = tar::Archive::new(file);
    for entry in archive
        .entries_with_seek()
        .map_err(|e| archive_err(path, e))?
    {
        let mut entry = entry.map_err(|e| archive_err(path, e))?;
        let Some(name) = extract::normalize(&entry.path_bytes()) else {
            continue;
        };
        f(name, &mut entry)?;
    }
    Ok(())
}

/// The layers of a `docker save` archive and its config (if its
/// `manifest.json` names one), or `None` if `path` is not one (no top-level
/// `manifest.json` of that shape).
fn docker_layers(path: &Path) -> Result<Option<DockerSource>, IngestError> {
    let mut manifest: Option<Vec<u8>> = None;
    scan_tar(path, |name, entry| {
        if name == Path::new("manifest.json") && entry.header().entry_type().is_file() {
            if entry.size() > MAX_JSON {
                manifest = None;
                return Ok(());
            }
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|e| archive_err(path, e))?;
            manifest = Some(buf);
        }
        Ok(())
    })?;
    let Some(bytes) = manifest else {
        return Ok(None);
    };
    // Only the docker shape counts: an array of objects with "Layers".
    let Ok(images) = serde_json::from_slice::<Vec<DockerImage>>(&bytes) else {
        return Ok(None);
    };
    let shown = path.join("manifest.json");
    let image = match &images[..] {
        [] => return Ok(None),
        [one] => one,
        _ => {
            return Err(invalid(
                &shown,
                format!("holds {} images; save one image per archive", images.len()),
            ))
        }
    };
    let mut members: HashMap<PathBuf, Member> = HashMap::new();
    scan_tar(path, |name, entry| {
        let et = entry.header().entry_type();
        let m = if et.is_file() {
            Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            }
        } else if et.is_symlink() {
            Member::Symlink(entry.link_name_bytes().unwrap_or_default().into_owned())
        } else {
            Member::Other
        };
        members.insert(name, m);
        Ok(())
    })?;
    let file_len = fs::metadata(path).map_err(io_err(path))?.len();
    // Where member `name` (following symlinks) is: offset and size.
    let locate = |name: &str, label: &str| -> Result<(u64, u64), IngestError> {
        let mut cur = extract::normalize(name.as_bytes())
            .ok_or_else(|| invalid(&shown, format!("{label}: path leaves the archive")))?;
        let mut hops = 0;
        let (offset, size) = loop {
            match members.get(&cur) {
                Some(Member::File { offset, size }) => break (*offset, *size),
                Some(Member::Symlink(target)) if hops < 8 => {
                    hops += 1;
                    let base = cur.parent().unwrap_or(Path::new("")).as_os_str().as_bytes();
                    let joined = if target.starts_with(b"/") {
                        target.clone()
                    } else {
                        [base, b"/", target].concat()
                    };
                    cur = extract::normalize(&joined).ok_or_else(|| {
                        invalid(&shown, format!("{label}: link leaves the archive"))
                    })?;
                }
                Some(_) => {
                    return Err(invalid(
                        &shown,
                        format!("{label}: not a regular file in the archive"),
                    ))
                }
                None => {
                    return Err(invalid(
                        &shown,
                        format!("{label}: missing from the archive"),
                    ))
                }
            }
        };
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(IngestError::InvalidArchive {
                layer: path.display().to_string(),
                reason: format!("truncated: {label} extends past the end of the file"),
            });
        }
        Ok((offset, size))
    };
    let config = match &image.config {
        None => None,
        Some(name) => {
            let label = format!("config ({name})");
            let (offset, size) = locate(name, &label)?;
            if size > MAX_JSON {
                return Err(invalid(
                    &shown,
                    format!("{label}: larger than {MAX_JSON} bytes"),
                ));
            }
            let mut f = File::open(path).map_err(io_err(path))?;
            f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
            let mut bytes = Vec::new();
            f.take(size).read_to_end(&mut bytes).map_err(io_err(path))?;
            let shown_config = path.join(name);
            let config = SourceConfig::new(&shown_config, media_type::DOCKER_CONFIG, bytes)?;
            // Docker names the config by its digest (the image id).
            if let Some(want) = digest_in_name(name) {
                if config.digest[7..] != *want {
                    return Err(IngestError::DigestMismatch {
                        layer: label,
                        expected: format!("sha256:{want}"),
                        actual: config.digest,
                    });
                }
            }
            Some(config)
        }
    };
    let mut out = Vec::with_capacity(image.layers.len());
    for (i, l) in image.layers.iter().enumerate() {
        let label = format!("{} ({l})", i + 1);
        let (offset, size) = locate(l, &format!("layer {label}"))?;
        out.push(LayerBlob {
            label,
            path: path.to_path_buf(),
            offset,
            size,
            digest: None,
        });
    }
    Ok(Some((out, config)))
}

/// A `docker save` archive's layers and config.
type DockerSource = (Vec<LayerBlob>, Option<SourceConfig>);

/// The SHA-256 (hex) a `docker save` member name carries: `<hex>.json`
/// (classic) or `blobs/sha256/<hex>` (OCI-style archives), else `None`.
fn digest_in_name(name: &str) -> Option<&str> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let hex = base.strip_suffix(".json").unwrap_or(base);
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}
