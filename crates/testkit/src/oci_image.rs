//! Ordinary OCI images for tests, built from tiny trees: gzip tar layers
//! ([`LayerBuilder`]), an OCI image config with a runtime config, an OCI
//! manifest ([`Image`]), pushed to a registry over plain HTTP
//! ([`Image::push`]) or written as an OCI image layout
//! ([`Image::write_layout`]).
//!
//! [`busybox_image`] is a runnable one: Debian's static busybox, an
//! entrypoint, a command, an environment and a working directory, and a
//! second layer that overrides, adds and deletes (whiteout) files of the
//! first, so that whoever unpacks it has to stack layers.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

/// `application/vnd.oci.image.layer.v1.tar+gzip`.
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// `application/vnd.oci.image.config.v1+json`.
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// `application/vnd.oci.image.manifest.v1+json`.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Modification time of every entry: layers are byte-for-byte reproducible.
const MTIME: u64 = 1_700_000_000;

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One built layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The gzip-compressed tar (the blob).
    pub blob: Vec<u8>,
    /// Digest of [`blob`](Self::blob).
    pub digest: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
}

/// Builds a layer tar entry by entry (owner root, fixed mtime), in the
/// order given: parents before children.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        LayerBuilder { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    /// A directory `path` (relative, e.g. `etc`).
    pub fn dir(mut self, path: &str, mode: u32) -> io::Result<Self> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(
            &mut h,
            format!("{}/", path.trim_end_matches('/')),
            io::empty(),
        )?;
        Ok(self)
    }

    /// A regular file `path` holding `data`.
    pub fn file(mut self, path: &str, data: &[u8], mode: u32) -> io::Result<Self> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar.append_data(&mut h, path, data)?;
        Ok(self)
    }

    /// A symbolic link `path` -> `target`.
    pub fn symlink(mut self, path: &str, target: &str) -> io::Result<Self> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(self)
    }

    /// An OCI whiteout deleting `path` of the layers below (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> io::Result<Self> {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), b"", 0o644)
    }

    /// The finished layer, gzip-compressed.
    pub fn finish(self) -> io::Result<Layer> {
        let tar = self.tar.into_inner()?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar)?;
        let blob = gz.finish()?;
        Ok(Layer {
            digest: sha256_digest(&blob),
            diff_id: sha256_digest(&tar),
            blob,
        })
    }
}

/// An image: its layers, config and manifest, all as bytes.
#[derive(Debug, Clone)]
pub struct Image {
    /// Bottom layer first.
    pub layers: Vec<Layer>,
    /// The OCI image config document.
    pub config: Vec<u8>,
    /// The OCI image manifest document.
    pub manifest: Vec<u8>,
}

/// The OCI `architecture` of this machine (`amd64`, `arm64`, ...).
pub fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

impl Image {
    /// An image of `layers` whose config's `config` (the runtime config:
    /// `Entrypoint`, `Cmd`, `Env`, `WorkingDir`, ...) is `runtime`, for this
    /// machine's architecture and Linux.
    pub fn new(layers: Vec<Layer>, runtime: serde_json::Value) -> io::Result<Image> {
        let history: Vec<_> = (0..layers.len())
            .map(|i| {
                json!({
                    "created": "2023-11-14T22:13:20Z",
                    "created_by": format!("lazypull-testkit layer {}", i + 1),
                })
            })
            .collect();
        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": oci_architecture(),
            "os": "linux",
            "config": runtime,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
            "history": history,
        });
        let config = serde_json::to_vec(&config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {
                "mediaType": CONFIG,
                "digest": sha256_digest(&config),
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": LAYER_GZIP,
                "digest": l.digest,
                "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest)?;
        Ok(Image {
            layers,
            config,
            manifest,
        })
    }

    /// Digest of the manifest.
    pub fn manifest_digest(&self) -> String {
        sha256_digest(&self.manifest)
    }

    /// Digest of the config.
    pub fn config_digest(&self) -> String {
        sha256_digest(&self.config)
    }

    /// Uploads every blob (monolithic POST + PUT) and then the manifest
    /// under `tag` to the registry at `registry` (plain HTTP, no auth: the
    /// test registry of [`crate::registry`]).
    pub fn push(&self, registry: SocketAddr, repository: &str, tag: &str) -> io::Result<()> {
        let mut blobs: Vec<&[u8]> = self.layers.iter().map(|l| l.blob.as_slice()).collect();
        blobs.push(&self.config);
        for blob in blobs {
            push_blob(registry, repository, blob)?;
        }
        let path = format!("/v2/{repository}/manifests/{tag}");
        let resp = http(
            registry,
            "PUT",
            &path,
            &[("Content-Type", MANIFEST)],
            &self.manifest,
        )?;
        resp.expect(201, &format!("PUT {path}"))?;
        Ok(())
    }

    /// Writes the image as an OCI image layout in `dir` (`oci-layout`,
    /// `index.json` naming the manifest `tag`, `blobs/sha256/...`).
    pub fn write_layout(&self, dir: &Path, tag: &str) -> io::Result<()> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        let mut all: Vec<&[u8]> = self.layers.iter().map(|l| l.blob.as_slice()).collect();
        all.push(&self.config);
        all.push(&self.manifest);
        for b in all {
            let d = sha256_digest(b);
            std::fs::write(blobs.join(&d["sha256:".len()..]), b)?;
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": MANIFEST,
                "digest": self.manifest_digest(),
                "size": self.manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// What [`busybox_image`]'s container prints (one line, then a newline).
pub const BUSYBOX_IMAGE_OUTPUT: &str =
    "hello-lazypull from /work as 0; layer two; added by layer two; removed: gone";

/// Applets linked to busybox in [`busybox_image`].
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "env", "pwd", "id", "ls", "test", "sleep", "true", "false", "mkdir", "rm",
    "touch", "stat", "uname", "wc", "head", "grep",
];

/// A runnable image around Debian's static busybox (`/bin/busybox`, from
/// `busybox-static`):
/// - layer 1: `/bin/busybox` and applet links (`sh`, `echo`, `cat`, `id`,
///   ...), `/etc/passwd`, `/etc/group`, `/etc/layer` ("one"),
///   `/etc/removed`, an empty `/work` and `/tmp`;
/// - layer 2: `/etc/layer` overridden ("two"), `/etc/added` added,
///   `/etc/removed` deleted by a whiteout;
/// - config: `Entrypoint ["/bin/sh","-c"]`, a `Cmd` printing
///   [`BUSYBOX_IMAGE_OUTPUT`] from `$GREETING`, `$(pwd)`, `$(id -u)` and
///   those files, `Env ["PATH=/bin", "GREETING=hello-lazypull"]`,
///   `WorkingDir "/work"`.
pub fn busybox_image() -> io::Result<Image> {
    let busybox = std::fs::read("/bin/busybox").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read /bin/busybox (apt-get install busybox-static): {e}"),
        )
    })?;
    if busybox.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "/bin/busybox is not an ELF binary (apt-get install busybox-static)",
        ));
    }
    let mut one = LayerBuilder::new()
        .dir("bin", 0o755)?
        .file("bin/busybox", &busybox, 0o755)?;
    for applet in APPLETS {
        one = one.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let one = one
        .dir("etc", 0o755)?
        .file("etc/passwd", b"root:x:0:0:root:/work:/bin/sh\n", 0o644)?
        .file("etc/group", b"root:x:0:\n", 0o644)?
        .file("etc/layer", b"one\n", 0o644)?
        .file("etc/removed", b"layer two deletes this\n", 0o644)?
        .dir("tmp", 0o1777)?
        .dir("work", 0o755)?
        .finish()?;
    let two = LayerBuilder::new()
        .dir("etc", 0o755)?
        .file("etc/layer", b"two\n", 0o644)?
        .file("etc/added", b"added by layer two\n", 0o644)?
        .whiteout("etc/removed")?
        .finish()?;
    Image::new(
        vec![one, two],
        json!({
            "Env": ["PATH=/bin", "GREETING=hello-lazypull"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": [concat!(
                "echo \"$GREETING from $(pwd) as $(id -u); layer $(cat /etc/layer); ",
                "$(cat /etc/added); removed: $(test -e /etc/removed && echo present || echo gone)\""
            )],
            "WorkingDir": "/work",
        }),
    )
}

/// An HTTP answer: status, headers (names lowercase), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn expect(&self, status: u16, what: &str) -> io::Result<()> {
        if self.status == status {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{what}: HTTP {} (expected {status}): {}",
            self.status,
            String::from_utf8_lossy(&self.body).trim()
        )))
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{method} {path}: {why}"),
        )
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers in the answer"))?;
    let text = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// Monolithic upload: `POST /v2/<repo>/blobs/uploads/`, then `PUT` of the
/// whole blob to the returned location with `?digest=`.
fn push_blob(registry: SocketAddr, repository: &str, blob: &[u8]) -> io::Result<()> {
    let digest = sha256_digest(blob);
    let start = format!("/v2/{repository}/blobs/uploads/");
    let resp = http(registry, "POST", &start, &[], b"")?;
    resp.expect(202, &format!("POST {start}"))?;
    let location = resp
        .header("location")
        .ok_or_else(|| io::Error::other(format!("POST {start}: no Location in the answer")))?;
    // The location may be absolute (http://host:port/v2/...) or a path.
    let path = match location.find("://") {
        Some(i) => {
            let rest = &location[i + 3..];
            rest.find('/').map(|j| &rest[j..]).unwrap_or("/")
        }
        None => location,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let put = format!("{path}{sep}digest={digest}");
    let resp = http(
        registry,
        "PUT",
        &put,
        &[("Content-Type", "application/octet-stream")],
        blob,
    )?;
    resp.expect(201, &format!("PUT of blob {digest}"))?;
    if let Some(d) = resp.header("docker-content-digest") {
        if d != digest {
            return Err(io::Error::other(format!(
                "registry stored blob {digest} as {d}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_reproducible_and_whiteouts_named() {
        let build = || {
            LayerBuilder::new()
                .dir("etc", 0o755)
                .unwrap()
                .file("etc/a", b"x", 0o644)
                .unwrap()
                .whiteout("etc/b")
                .unwrap()
                .whiteout("top")
                .unwrap()
                .finish()
                .unwrap()
        };
        let (a, b) = (build(), build());
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, a.diff_id);
        let mut gz = flate2::read::GzDecoder::new(a.blob.as_slice());
        let mut tar_bytes = Vec::new();
        gz.read_to_end(&mut tar_bytes).unwrap();
        assert_eq!(sha256_digest(&tar_bytes), a.diff_id);
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["etc/", "etc/a", "etc/.wh.b", ".wh.top"]);
    }

    #[test]
    fn manifest_and_config_chain() {
        let layer = LayerBuilder::new()
            .file("f", b"1", 0o644)
            .unwrap()
            .finish()
            .unwrap();
        let image = Image::new(vec![layer.clone()], json!({"Cmd": ["x"]})).unwrap();
        let m: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
        assert_eq!(m["config"]["digest"], image.config_digest());
        assert_eq!(m["layers"][0]["digest"], layer.digest);
        assert_eq!(m["layers"][0]["mediaType"], LAYER_GZIP);
        let c: serde_json::Value = serde_json::from_slice(&image.config).unwrap();
        assert_eq!(c["rootfs"]["diff_ids"][0], layer.diff_id);
        assert_eq!(c["config"]["Cmd"][0], "x");
        assert_eq!(c["os"], "linux");
    }
}
