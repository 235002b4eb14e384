//! containerd's `hosts.toml` against real registries (Debian's
//! `docker-registry` on 127.0.0.1, started by the test kit): a pull-through
//! cache as a mirror, and the upstream taking over when it stops; a private
//! CA and client certificates, working when configured and failing clearly
//! when not; a credential helper supplying the password of an htpasswd
//! registry. They fail, never skip, when docker-registry, htpasswd or
//! openssl are missing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazypull_backend::registry::media_type;
use lazypull_backend::{
    docker_config_credentials_with, ClientOptions, Helpers, Registry, RegistryError, RetryPolicy,
};
use lazypull_source::RangeRead;
use lazypull_testkit::registry::{RegistryOptions, RegistryServer};
use lazypull_testkit::tls::TestCa;
use sha2::Digest;

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2654435761) >> 13) as u8 ^ seed)
        .collect()
}

fn opts(hosts_dir: &Path) -> ClientOptions {
    ClientOptions {
        hosts_dir: Some(hosts_dir.to_path_buf()),
        retry: RetryPolicy {
            attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        ..ClientOptions::default()
    }
}

/// Pushes `layer` (and an empty config) and a manifest tagged `tag`;
/// returns the manifest's digest.
fn push_image(reg: &Registry, layer: &[u8], tag: &str) -> String {
    let config = b"{}".to_vec();
    for blob in [&config[..], layer] {
        let owned = Arc::new(blob.to_vec());
        reg.push_blob(
            &digest_of(blob),
            blob.len() as u64,
            &move || Ok(Box::new(std::io::Cursor::new((*owned).clone())) as Box<dyn Read + Send>),
            &|_| {},
        )
        .unwrap();
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest_of(layer), "size": layer.len()}],
    })
    .to_string();
    reg.put_manifest(tag, media_type::OCI_MANIFEST, manifest.as_bytes())
        .unwrap()
}

fn hosts_toml(certs: &Path, registry: &str, text: &str) -> PathBuf {
    let dir = certs.join(registry);
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("hosts.toml");
    std::fs::write(&f, text).unwrap();
    f
}

/// Requests in a registry's access log for `path_part` answered `status`.
fn logged(reg: &RegistryServer, path_part: &str, status: u16) -> usize {
    reg.access_log()
        .iter()
        .filter(|(_, p, s)| p.contains(path_part) && *s == status)
        .count()
}

#[test]
fn a_pull_through_cache_mirror_serves_range_reads_and_the_upstream_takes_over_when_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let upstream = RegistryServer::start(&tmp.path().join("up"), None).unwrap();
    let remote = format!("http://{}", upstream.host());
    let mut mirror = RegistryServer::start_with(
        &tmp.path().join("mirror"),
        &RegistryOptions {
            proxy_remote: Some(&remote),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    let layer = pattern(3 << 20, 7);
    let d = digest_of(&layer);
    let plain = Registry::new(&upstream.host(), "lp/img", None, &opts(&certs)).unwrap();
    let md = push_image(&plain, &layer, "v1");

    // The mirror may pull and resolve; an unreachable one before it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    hosts_toml(
        &certs,
        &upstream.host(),
        &format!(
            "server = \"{remote}\"\n\
             [host.\"http://{dead_addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
             [host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.host()
        ),
    );
    let reg = Registry::new(&upstream.host(), "lp/img", None, &opts(&certs)).unwrap();
    assert_eq!(
        reg.mirrors(),
        [
            format!("http://{dead_addr}"),
            format!("http://{}", mirror.host())
        ]
    );
    // The dead mirror is tried once, then skipped while it is down.
    assert_eq!(reg.get_manifest("v1").unwrap().digest, md);
    assert_eq!(reg.stats().mirror_fallbacks, 1);
    assert_eq!(
        logged(&mirror, "/v2/lp/img/manifests/v1", 200),
        1,
        "{}",
        std::fs::read_to_string(mirror.log_path()).unwrap()
    );
    // A whole blob through the mirror, which keeps it (another node's pull).
    assert!(reg.get_blob(&d, &|_| {}).unwrap() == layer);
    let stored = tmp.path().join(format!(
        "mirror/data/docker/registry/v2/blobs/sha256/{}/{}/data",
        &d[7..9],
        &d[7..]
    ));
    let t0 = Instant::now();
    while std::fs::metadata(&stored).map(|m| m.len()).unwrap_or(0) != layer.len() as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the mirror never stored the blob"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let upstream_ranges = || logged(&upstream, &format!("/blobs/{d}"), 206);
    let before = upstream_ranges();
    let reader = reg.blob_reader(&d, layer.len() as u64);
    let read = |off: usize, len: usize| {
        let mut buf = vec![0u8; len];
        reader.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf[..] == layer[off..off + len], "bytes at {off}");
    };
    for i in 0..4 {
        read(i * 300_000, 100_000);
    }
    // Range reads answered by the mirror (206), none by the upstream.
    assert_eq!(logged(&mirror, &format!("/v2/lp/img/blobs/{d}"), 206), 4);
    assert_eq!(upstream_ranges(), before);

    // The mirror stops in the middle of the reads: the upstream answers.
    mirror.stop();
    let fallbacks = reg.stats().mirror_fallbacks;
    for i in 4..8 {
        read(i * 300_000, 100_000);
    }
    assert_eq!(upstream_ranges(), before + 4);
    assert!(reg.stats().mirror_fallbacks >= fallbacks + 4);
    assert_eq!(reg.stats().failures, 0);
}

#[test]
fn a_registry_with_a_private_ca_works_with_its_ca_and_fails_clearly_without() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("pki"), "lazypull-test-ca").unwrap();
    let server = ca.server("registry").unwrap();
    let reg_srv = RegistryServer::start_with(
        &tmp.path().join("reg"),
        &RegistryOptions {
            tls: Some((&server.cert, &server.key)),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    let host = reg_srv.host();
    let certs = tmp.path().join("certs.d");
    let file = hosts_toml(&certs, &host, &format!("server = \"https://{host}\"\n"));

    let without = Registry::new(&host, "lp/tls", None, &opts(&certs)).unwrap();
    let err = without.get_manifest("v1").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Tls { .. }), "{msg}");
    for needle in [
        &*host,
        "not signed by a CA",
        "ca = ",
        &*file.to_string_lossy(),
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    assert_eq!(
        without.stats().retries,
        0,
        "a certificate error is not retried"
    );

    // The CA in hosts.toml, by a path relative to it: push and read back.
    std::fs::copy(&ca.cert, file.parent().unwrap().join("ca.pem")).unwrap();
    hosts_toml(
        &certs,
        &host,
        &format!("server = \"https://{host}\"\nca = \"ca.pem\"\n"),
    );
    let with = Registry::new(&host, "lp/tls", None, &opts(&certs)).unwrap();
    let layer = pattern(200_000, 3);
    let md = push_image(&with, &layer, "v1");
    assert_eq!(with.get_manifest("v1").unwrap().digest, md);
    let mut buf = vec![0u8; 5000];
    with.blob_reader(&digest_of(&layer), layer.len() as u64)
        .read_exact_at(&mut buf, 100_000)
        .unwrap();
    assert!(buf[..] == layer[100_000..105_000]);
}

#[test]
fn a_registry_requiring_client_certificates_works_with_one_and_fails_clearly_without() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("pki"), "lazypull-test-ca").unwrap();
    let clients = TestCa::new(&tmp.path().join("clients"), "lazypull-client-ca").unwrap();
    let strangers = TestCa::new(&tmp.path().join("strangers"), "stranger-ca").unwrap();
    let server = ca.server("registry").unwrap();
    let me = clients.client("node-1").unwrap();
    let stranger = strangers.client("intruder").unwrap();
    let reg_srv = RegistryServer::start_with(
        &tmp.path().join("reg"),
        &RegistryOptions {
            tls: Some((&server.cert, &server.key)),
            client_ca: Some(&clients.cert),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    let host = reg_srv.host();
    let certs = tmp.path().join("certs.d");
    let base = format!(
        "server = \"https://{host}\"\nca = \"{}\"\n",
        ca.cert.display()
    );
    let file = hosts_toml(&certs, &host, &base);

    let err = Registry::new(&host, "lp/mtls", None, &opts(&certs))
        .unwrap()
        .get_manifest("v1")
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Tls { .. }), "{msg}");
    for needle in [
        &*host,
        "requires a client certificate",
        "client = ",
        &*file.to_string_lossy(),
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }

    hosts_toml(
        &certs,
        &host,
        &format!(
            "{base}client = [[\"{}\", \"{}\"]]\n",
            stranger.cert.display(),
            stranger.key.display()
        ),
    );
    let err = Registry::new(&host, "lp/mtls", None, &opts(&certs))
        .unwrap()
        .get_manifest("v1")
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Tls { .. })
            && err.to_string().contains("refused the client certificate"),
        "{err}"
    );

    hosts_toml(
        &certs,
        &host,
        &format!(
            "{base}client = [[\"{}\", \"{}\"]]\n",
            me.cert.display(),
            me.key.display()
        ),
    );
    let ok = Registry::new(&host, "lp/mtls", None, &opts(&certs)).unwrap();
    let layer = pattern(100_000, 9);
    let md = push_image(&ok, &layer, "v1");
    assert_eq!(ok.get_manifest("v1").unwrap().digest, md);
    assert!(ok.get_blob(&digest_of(&layer), &|_| {}).unwrap() == layer);
}

#[test]
fn a_credential_helper_supplies_the_password_of_an_htpasswd_registry() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let srv =
        RegistryServer::start(&tmp.path().join("reg"), Some(("alice", "wonder-land"))).unwrap();
    let host = srv.host();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let asked = tmp.path().join("asked");
    let helper = bin.join("docker-credential-lptest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nhost=$(cat)\necho \"$host\" >> {}\n\
             if [ \"$host\" = {host} ]; then\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"alice\",\"Secret\":\"wonder-land\"}}' \"$host\"\n\
             else echo 'credentials not found in native keychain'; exit 1; fi\n",
            asked.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        format!(r#"{{"auths": {{}}, "credHelpers": {{"{host}": "lptest"}}}}"#),
    )
    .unwrap();
    let helpers = Helpers {
        search_path: Some(vec![bin.clone()]),
        ..Helpers::default()
    };
    let creds = docker_config_credentials_with(Some(&config), &host, &helpers)
        .unwrap()
        .expect("the helper's credentials");
    assert_eq!(creds.username, "alice");
    assert_eq!(
        std::fs::read_to_string(&asked).unwrap(),
        format!("{host}\n")
    );
    let certs = tmp.path().join("no-certs.d");
    let reg = Registry::new(&host, "lp/helped", Some(creds), &opts(&certs)).unwrap();
    let layer = pattern(50_000, 1);
    let md = push_image(&reg, &layer, "v1");
    assert_eq!(reg.get_manifest("v1").unwrap().digest, md);
    // Without the helper's answer, the registry refuses.
    let anon = Registry::new(&host, "lp/helped", None, &opts(&certs)).unwrap();
    assert!(matches!(
        anon.get_manifest("v1").unwrap_err(),
        RegistryError::AuthRequired { .. }
    ));
}
