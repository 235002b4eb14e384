//! Integration tests against a real `docker-registry` (distribution) started
//! on 127.0.0.1 for each test. They fail, never skip, when it is missing.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazypull_backend::registry::media_type;
use lazypull_backend::{
    docker_config_credentials, ClientOptions, Credentials, HttpBlob, Registry, RegistryError,
    RetryPolicy,
};
use lazypull_source::RangeRead;
use sha2::Digest;

const SETUP_HINT: &str = "run scripts/setup.sh (it installs the docker-registry and \
                          apache2-utils packages these tests need)";

fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: {SETUP_HINT}"))
}

/// A `docker-registry serve` process with its storage in a temp dir; killed on drop.
struct RegistryProcess {
    child: Child,
    dir: tempfile::TempDir,
    host: String,
}

impl RegistryProcess {
    fn start(auth: Option<(&str, &str)>) -> RegistryProcess {
        let bin = find_program("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let auth_cfg = match auth {
            Some((user, pass)) => {
                let htpasswd = dir.path().join("htpasswd");
                let st = Command::new(find_program("htpasswd"))
                    .args(["-Bbc"])
                    .arg(&htpasswd)
                    .args([user, pass])
                    .stderr(Stdio::null())
                    .status()
                    .expect("running htpasswd");
                assert!(st.success(), "htpasswd failed: {st}");
                format!(
                    "auth: {{htpasswd: {{realm: lazypull-test, path: {}}}}}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        // The port is free when we look; another process could take it before
        // the registry binds it, so try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log: {{level: info}}\n\
                     storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
                     http: {{addr: 127.0.0.1:{port}}}\n{auth_cfg}",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    eprintln!(
                        "docker-registry exited ({st}) on port {port}:\n{}",
                        std::fs::read_to_string(dir.path().join("registry.log")).unwrap()
                    );
                    break;
                }
                if answers_v2(port) {
                    return RegistryProcess {
                        child,
                        dir,
                        host: format!("127.0.0.1:{port}"),
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "docker-registry did not answer on port {port} within 30 s:\n{}",
                        std::fs::read_to_string(dir.path().join("registry.log")).unwrap()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("docker-registry could not be started");
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /v2/` gets an HTTP answer (200, or 401 with auth).
fn answers_v2(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok()
        && (&head[..12] == b"HTTP/1.0 200"
            || &head[..12] == b"HTTP/1.0 401"
            || &head[..12] == b"HTTP/1.1 200"
            || &head[..12] == b"HTTP/1.1 401")
}

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn opts() -> ClientOptions {
    ClientOptions {
        retry: RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        ..ClientOptions::default()
    }
}

fn push(reg: &Registry, data: &[u8]) -> Result<bool, RegistryError> {
    let owned = Arc::new(data.to_vec());
    reg.push_blob(
        &digest_of(data),
        data.len() as u64,
        &|| Ok(Box::new(std::io::Cursor::new(owned.as_ref().clone())) as Box<dyn Read + Send>),
        &|_| {},
    )
}

const CONFIG_TYPE: &str = "application/vnd.lazypull.image.config.v1+json";
const META_TYPE: &str = "application/vnd.lazypull.meta.v1.erofs";
const DATA_TYPE: &str = "application/vnd.lazypull.data.v1.erofs+zstd";

fn manifest_for(config: &[u8], layers: &[(&str, &[u8])]) -> Vec<u8> {
    let desc = |mt: &str, b: &[u8]| serde_json::json!({"mediaType": mt, "digest": digest_of(b), "size": b.len()});
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "config": desc(CONFIG_TYPE, config),
        "layers": layers.iter().map(|(mt, b)| desc(mt, b)).collect::<Vec<_>>(),
        "annotations": {"org.opencontainers.image.title": "lazypull test"},
    }))
    .unwrap()
}

#[test]
fn push_pull_and_range_reads_with_custom_media_types() {
    let r = RegistryProcess::start(None);
    let reg = Registry::new(&r.host, "lp/demo", None, &opts()).unwrap();
    assert_eq!(reg.base_url(), format!("http://{}", r.host));

    let config = br#"{"lazypull":1,"blobs":2}"#.to_vec();
    let meta = pattern(300 * 1024 + 7, 1);
    let data = pattern(2 * 1024 * 1024 + 123, 2);

    // Push: progress reaches the size; a second push of the same blob is skipped.
    let last = AtomicU64::new(0);
    let data_arc = Arc::new(data.clone());
    let opened = AtomicU64::new(0);
    let pushed = reg
        .push_blob(
            &digest_of(&data),
            data.len() as u64,
            &|| {
                opened.fetch_add(1, Ordering::SeqCst);
                Ok(Box::new(std::io::Cursor::new(data_arc.as_ref().clone()))
                    as Box<dyn Read + Send>)
            },
            &|n| {
                last.fetch_max(n, Ordering::SeqCst);
            },
        )
        .unwrap();
    assert!(pushed);
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    assert_eq!(last.load(Ordering::SeqCst), data.len() as u64);
    assert!(push(&reg, &config).unwrap());
    assert!(push(&reg, &meta).unwrap());
    let opened_before = opened.load(Ordering::SeqCst);
    assert!(
        !push(&reg, &data).unwrap(),
        "existing blob was uploaded again"
    );
    assert_eq!(opened.load(Ordering::SeqCst), opened_before);

    assert_eq!(
        reg.blob_size(&digest_of(&data)).unwrap(),
        Some(data.len() as u64)
    );
    assert_eq!(reg.blob_size(&digest_of(b"never pushed")).unwrap(), None);

    // A manifest with lazypull's own media types.
    let manifest = manifest_for(&config, &[(META_TYPE, &meta), (DATA_TYPE, &data)]);
    let md = reg
        .put_manifest("v1", media_type::OCI_MANIFEST, &manifest)
        .unwrap_or_else(|e| panic!("registry refused the custom media types: {e}"));
    assert_eq!(md, digest_of(&manifest));

    for reference in ["v1", md.as_str()] {
        let m = reg.get_manifest(reference).unwrap();
        assert_eq!(m.bytes, manifest, "{reference}");
        assert_eq!(m.digest, md);
        assert_eq!(m.media_type, media_type::OCI_MANIFEST);
    }
    let err = reg.get_manifest("nope").unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert_eq!(err.errno(), libc::ENOENT);
    assert!(err.to_string().contains("lp/demo:nope"), "{err}");

    // Whole blobs, verified, with progress.
    let seen = AtomicU64::new(0);
    let got = reg
        .get_blob(&digest_of(&data), &|n| {
            seen.store(n, Ordering::SeqCst);
        })
        .unwrap();
    assert!(got == data);
    assert_eq!(seen.load(Ordering::SeqCst), data.len() as u64);
    let mut out = Vec::new();
    assert_eq!(
        reg.get_blob_to(&digest_of(&meta), &mut out, &|_| {})
            .unwrap(),
        meta.len() as u64
    );
    assert!(out == meta);
    let err = reg.get_blob(&digest_of(b"missing"), &|_| {}).unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");

    // Range reads.
    let before = reg.stats();
    let blob = reg.blob_reader(&digest_of(&data), data.len() as u64);
    let size = data.len() as u64;
    for (off, len) in [
        (0u64, 1usize),
        (0, 4096),
        (1, 1),
        (12345, 65536),
        (1 << 20, 1 << 20),
        (size - 1, 1),
        (size - 1000, 1000),
        (0, size as usize),
    ] {
        let mut buf = vec![0u8; len];
        blob.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf[..] == data[off as usize..off as usize + len],
            "bytes {off}+{len} differ"
        );
    }
    let after = reg.stats();
    assert_eq!(after.range_requests - before.range_requests, 8);
    assert!(after.bytes_received - before.bytes_received >= size);
    assert_eq!(after.failures, before.failures);

    let mut buf = vec![0u8; 2];
    let err = blob.read_exact_at(&mut buf, size - 1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains(&digest_of(&data)), "{err}");
    let err = blob.read_exact_at(&mut buf, size + 10).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    blob.read_exact_at(&mut [], size).unwrap();

    // A reader that believes the blob is larger than it is: the registry's
    // answer is refused rather than trusted.
    let wrong = reg.blob_reader(&digest_of(&data), size + 100);
    let mut buf = vec![0u8; 50];
    let err = wrong.read_exact_at(&mut buf, size + 10).unwrap_err();
    assert!(err.to_string().contains(&digest_of(&data)), "{err}");
    let mut buf = vec![0u8; 10];
    let err = wrong.read_exact_at(&mut buf, 0).unwrap_err();
    assert!(err.to_string().contains("changed"), "{err}");

    // A missing blob read by range: NotFound, naming the blob.
    let missing = reg.blob_reader(&digest_of(b"missing"), 10);
    let err = missing.read_exact_at(&mut [0u8; 4], 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains(&digest_of(b"missing")), "{err}");

    // Many threads at once through a Registry limited to 2 connections.
    let narrow = Registry::new(
        &r.host,
        "lp/demo",
        None,
        &ClientOptions {
            max_connections: 2,
            ..opts()
        },
    )
    .unwrap();
    let blob = narrow.blob_reader(&digest_of(&data), size);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let blob = &blob;
            let data = &data;
            s.spawn(move || {
                for i in 0..10u64 {
                    let off = (t * 7919 + i * 104729) % (size - 5000);
                    let mut buf = vec![0u8; 5000];
                    blob.read_exact_at(&mut buf, off).unwrap();
                    assert!(buf[..] == data[off as usize..off as usize + 5000]);
                }
            });
        }
    });
    assert_eq!(narrow.stats().range_requests, 80);
    assert_eq!(narrow.stats().retries, 0);

    // The same blob as a plain HTTP URL.
    let url = format!("http://{}/v2/lp/demo/blobs/{}", r.host, digest_of(&data));
    let hb = HttpBlob::open(&url, &opts()).unwrap();
    assert_eq!(hb.size(), size);
    let mut buf = vec![0u8; 777];
    hb.read_exact_at(&mut buf, size - 777).unwrap();
    assert!(buf[..] == data[data.len() - 777..]);
    let err = hb.read_exact_at(&mut buf, size - 776).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains(&url), "{err}");
    let err = HttpBlob::open(
        &format!("http://{}/v2/lp/demo/blobs/{}", r.host, digest_of(b"x")),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

#[test]
fn digests_are_verified_both_ways() {
    let r = RegistryProcess::start(None);
    let reg = Registry::new(&r.host, "lp/verify", None, &opts()).unwrap();
    let good = pattern(100_000, 3);

    // Pushing bytes that do not match the digest: the registry refuses, and
    // that refusal is not retried.
    let lie = digest_of(b"something else");
    let err = reg
        .push_blob(
            &lie,
            good.len() as u64,
            &|| Ok(Box::new(std::io::Cursor::new(pattern(100_000, 3))) as Box<dyn Read + Send>),
            &|_| {},
        )
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Status { status: 400, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("DIGEST_INVALID"), "{err}");
    assert_eq!(reg.stats().retries, 0);

    // Bytes changed in the registry's storage are caught on download.
    assert!(push(&reg, &good).unwrap());
    let d = digest_of(&good);
    let path = r.blob_path(&d);
    let mut bad = std::fs::read(&path).unwrap();
    assert!(bad == good);
    bad[50_000] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    let err = reg.get_blob(&d, &|_| {}).unwrap_err();
    match &err {
        RegistryError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &d);
            assert_eq!(actual, &digest_of(&bad));
        }
        _ => panic!("expected a digest mismatch, got {err}"),
    }
    assert_eq!(err.errno(), libc::EIO);
    // Range reads do not verify: they return the stored bytes.
    let mut buf = [0u8; 1];
    reg.blob_reader(&d, good.len() as u64)
        .read_exact_at(&mut buf, 50_000)
        .unwrap();
    assert_eq!(buf[0], bad[50_000]);

    // A manifest whose digest reference does not match its bytes is refused
    // before it is sent.
    let err = reg
        .put_manifest(&d, media_type::OCI_MANIFEST, b"{}")
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
}

fn check_auth_required(err: &RegistryError, host: &str) {
    assert!(matches!(err, RegistryError::AuthRequired { .. }), "{err}");
    let msg = err.to_string();
    for needle in [
        host,
        "--username",
        "--password-stdin",
        "LAZYPULL_REGISTRY_USER",
        "LAZYPULL_REGISTRY_PASSWORD",
        "docker login",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    assert_eq!(err.errno(), libc::EACCES);
}

#[test]
fn htpasswd_authentication() {
    let r = RegistryProcess::start(Some(("alice", "wonder-land")));
    let blob = pattern(70_000, 4);
    let d = digest_of(&blob);

    // No credentials.
    let anon = Registry::new(&r.host, "lp/auth", None, &opts()).unwrap();
    check_auth_required(&anon.get_manifest("v1").unwrap_err(), &r.host);
    check_auth_required(&push(&anon, &blob).unwrap_err(), &r.host);
    let err = anon
        .blob_reader(&d, blob.len() as u64)
        .read_exact_at(&mut [0u8; 8], 0)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("requires authentication"), "{err}");
    assert_eq!(anon.stats().retries, 0);

    // Wrong password.
    let wrong = Registry::new(
        &r.host,
        "lp/auth",
        Some(Credentials {
            username: "alice".into(),
            password: "not-it".into(),
        }),
        &opts(),
    )
    .unwrap();
    let err = wrong.get_manifest("v1").unwrap_err();
    assert!(matches!(err, RegistryError::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains("alice") && err.to_string().contains(&r.host));
    assert!(!err.to_string().contains("not-it"));
    assert_eq!(err.errno(), libc::EACCES);
    assert!(matches!(
        push(&wrong, &blob).unwrap_err(),
        RegistryError::AuthFailed { .. }
    ));
    assert!(!format!("{wrong:?}").contains("not-it"));

    // Right credentials, taken from a docker config file as `docker login` writes it.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("config.json");
    write_docker_config(&cfg, &format!("http://{}", r.host), "alice", "wonder-land");
    let creds = docker_config_credentials(Some(&cfg), &r.host)
        .unwrap()
        .expect("credentials for the registry");
    let ok = Registry::new(&r.host, "lp/auth", Some(creds), &opts()).unwrap();
    assert!(push(&ok, &blob).unwrap());
    assert!(!push(&ok, &blob).unwrap());
    let manifest = manifest_for(&blob, &[(META_TYPE, &blob)]);
    let md = ok
        .put_manifest("v1", media_type::OCI_MANIFEST, &manifest)
        .unwrap();
    assert_eq!(ok.get_manifest("v1").unwrap().digest, md);
    assert!(ok.get_blob(&d, &|_| {}).unwrap() == blob);
    let mut buf = vec![0u8; 1000];
    ok.blob_reader(&d, blob.len() as u64)
        .read_exact_at(&mut buf, 69_000)
        .unwrap();
    assert!(buf[..] == blob[69_000..]);
    assert_eq!(ok.stats().failures, 0);
}

fn write_docker_config(path: &Path, key: &str, user: &str, pass: &str) {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        path,
        serde_json::json!({"auths": {key: {"auth": auth}}}).to_string(),
    )
    .unwrap();
}
