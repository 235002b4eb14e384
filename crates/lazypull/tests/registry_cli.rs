//! `lazypull push`, `convert` and the registry CLI's errors, on the host against a
//! real `docker-registry` on 127.0.0.1 (no kernel needed: the pushed images are
//! read back through lazypull's own EROFS reader and stored-blob decoder).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

use lazypull_backend::registry::{ClientOptions, Registry};
use lazypull_oci::lazy::LazyImage;
use lazypull_source::BlobSource;
use lazypull_testkit::registry::RegistryServer;
use sha2::{Digest, Sha256};

fn lazypull(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(args)
        .output()
        .expect("running lazypull")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "lazypull failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Reads the lazy image `repo:tag` back from the registry and checks that every
/// regular file of `source` is in it with the same bytes.
fn check_lazy_image(registry: &str, repo: &str, tag: &str, source: &Path) {
    let reg = Registry::new(registry, repo, None, &ClientOptions::default()).unwrap();
    let manifest = reg.get_manifest(tag).unwrap();
    let (parsed, config) = LazyImage::parse_manifest(&manifest.bytes).unwrap();
    // The config is an OCI image config whose diff_ids are the layers.
    config
        .check_config(&reg.get_blob(&parsed.config.digest, &|_| {}).unwrap())
        .unwrap();
    let meta = reg.get_blob(&config.meta.digest, &|_| {}).unwrap();
    let image = lazypull_erofs::Image::from_bytes(meta).unwrap();
    // Each data blob, decoded from its stored form into a plain file.
    let dir = tempfile::tempdir().unwrap();
    let mut blobs = Vec::new();
    for b in &config.blobs {
        let table =
            lazypull_blob::ChunkTable::decode(&reg.get_blob(&b.table.digest, &|_| {}).unwrap())
                .unwrap();
        let stored = reg.get_blob(&b.data.digest, &|_| {}).unwrap();
        let data_path = dir.path().join("stored");
        fs::write(&data_path, &stored).unwrap();
        let blob = lazypull_blob::StoredBlob::new(
            b.digest.clone(),
            table,
            fs::File::open(&data_path).unwrap(),
        );
        let mut plain = vec![0u8; blob.size() as usize];
        assert_eq!(blob.read_at(&mut plain, 0).unwrap(), plain.len());
        assert_eq!(hex::encode(Sha256::digest(&plain)), b.digest);
        let path = dir.path().join(&b.digest);
        fs::write(&path, plain).unwrap();
        blobs.push(fs::File::open(path).unwrap());
    }
    let mut checked = 0;
    for entry in walkdir::WalkDir::new(source) {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(source).unwrap();
        let inode = image
            .lookup(rel.to_str().unwrap().as_bytes())
            .unwrap_or_else(|e| panic!("{} missing from the image: {e}", rel.display()));
        let mut got = vec![0u8; inode.size as usize];
        assert_eq!(
            image.read_file_at(&inode, &blobs, 0, &mut got).unwrap(),
            got.len()
        );
        assert_eq!(got, fs::read(entry.path()).unwrap(), "{}", rel.display());
        checked += 1;
    }
    assert!(checked > 10, "only {checked} files checked");
}

/// An ordinary image's config with every runtime field set, and fields
/// lazypull does not know.
const RICH_CONFIG: &[u8] = br#"{
  "architecture": "amd64",
  "os": "linux",
  "created": "2024-05-06T07:08:09.123456789Z",
  "author": "lazypull tests <tests@example.invalid>",
  "config": {
    "User": "1000:1000",
    "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world", "EMPTY="],
    "Entrypoint": ["/bin/app", "--config", "/etc/app.toml"],
    "Cmd": ["serve", "--port=8080"],
    "Volumes": {"/data": {}, "/var/log/app": {}},
    "WorkingDir": "/srv/app",
    "Labels": {"org.opencontainers.image.title": "app", "com.example.z": "last", "com.example.a": "first"},
    "StopSignal": "SIGQUIT",
    "ArgsEscaped": true
  },
  "rootfs": {"type": "layers", "diff_ids": [
    "sha256:1111111111111111111111111111111111111111111111111111111111111111",
    "sha256:2222222222222222222222222222222222222222222222222222222222222222"]},
  "history": [
    {"created": "2024-05-06T07:08:00Z", "created_by": "ADD rootfs.tar /", "comment": "base"},
    {"created": "2024-05-06T07:08:05Z", "created_by": "ENV GREETING=hello world", "empty_layer": true},
    {"created": "2024-05-06T07:08:09Z", "created_by": "COPY app /srv/app"}
  ],
  "x-lazypull-test-unknown": {"kept": [1, 2.5, null, "x"]}
}"#;

/// The manifest of `tag` (a lazypull image) and its config's bytes.
fn lazy_config(reg: &Registry, tag: &str) -> (lazypull_oci::ImageManifest, Vec<u8>) {
    let (manifest, image) =
        LazyImage::parse_manifest(&reg.get_manifest(tag).unwrap().bytes).unwrap();
    assert_eq!(
        manifest.config.media_type,
        "application/vnd.oci.image.config.v1+json"
    );
    let config = reg
        .get_blob_sized(&manifest.config.digest, manifest.config.size, &|_| {})
        .unwrap();
    image.check_config(&config).unwrap();
    (manifest, config)
}

/// `config_bytes` is the `source` config with only `rootfs` replaced: one
/// diff id per manifest layer, each that layer's digest.
fn check_runtime_config(
    config_bytes: &[u8],
    source: &[u8],
    manifest: &lazypull_oci::ImageManifest,
) {
    let got: serde_json::Value = serde_json::from_slice(config_bytes).unwrap();
    let want: serde_json::Value = serde_json::from_slice(source).unwrap();
    for key in ["architecture", "os", "created", "author", "history"] {
        assert!(!want[key].is_null(), "{key}");
        assert_eq!(got[key], want[key], "{key}");
    }
    for key in [
        "Entrypoint",
        "Cmd",
        "Env",
        "WorkingDir",
        "User",
        "ExposedPorts",
        "Volumes",
        "Labels",
        "StopSignal",
    ] {
        assert!(!want["config"][key].is_null(), "config.{key}");
        assert_eq!(got["config"][key], want["config"][key], "config.{key}");
    }
    // Every other field as well, unknown ones included.
    let (mut got_rest, mut want_rest) = (got.clone(), want.clone());
    got_rest.as_object_mut().unwrap().remove("rootfs");
    want_rest.as_object_mut().unwrap().remove("rootfs");
    assert_eq!(got_rest, want_rest);
    assert_eq!(got["rootfs"]["type"], "layers");
    let ids: Vec<&str> = got["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let layers: Vec<&str> = manifest.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(ids, layers);
}

/// Where Debian's golang-github-opencontainers-image-spec-dev puts the schema package.
const IMAGE_SPEC_SCHEMA: &str = "/usr/share/gocode/src/github.com/opencontainers/image-spec/schema";

/// Builds `go/ocivalidate` (offline, GOPATH mode, in `work`) and validates
/// `manifest` and `config` with it against the OCI image spec's schemas.
fn oci_validate(work: &Path, manifest: &lazypull_oci::ImageManifest, config: &[u8]) {
    assert!(
        Path::new(IMAGE_SPEC_SCHEMA).join("validator.go").is_file(),
        "{IMAGE_SPEC_SCHEMA} is missing: install Debian's golang-github-opencontainers-image-spec-dev"
    );
    let gopath = work.join("gopath");
    let pkg = gopath.join("src/lazypull.invalid/ocivalidate");
    fs::create_dir_all(&pkg).unwrap();
    let main_go = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../go/ocivalidate/main.go");
    fs::copy(&main_go, pkg.join("main.go"))
        .unwrap_or_else(|e| panic!("{}: {e}", main_go.display()));
    let bin = work.join("ocivalidate");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg("lazypull.invalid/ocivalidate")
        .current_dir(&gopath)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
        .env("GOCACHE", work.join("gocache"))
        .output()
        .unwrap_or_else(|e| panic!("running go (install Debian's golang-go): {e}"));
    assert!(
        out.status.success(),
        "building go/ocivalidate failed (needs golang-go and golang-github-opencontainers-image-spec-dev): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (m, c) = (work.join("manifest.json"), work.join("config.json"));
    fs::write(&m, serde_json::to_vec(manifest).unwrap()).unwrap();
    fs::write(&c, config).unwrap();
    let out = Command::new(&bin)
        .arg("manifest")
        .arg(&m)
        .arg("config")
        .arg(&c)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the lazy image does not validate against the OCI image spec: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok manifest") && stdout.contains("ok config"),
        "{stdout}"
    );
    // Not vacuous: a manifest the spec refuses fails.
    let mut bad = serde_json::to_value(manifest).unwrap();
    bad["config"]["size"] = "big".into();
    fs::write(&m, serde_json::to_vec(&bad).unwrap()).unwrap();
    let out = Command::new(&bin).arg("manifest").arg(&m).output().unwrap();
    assert!(!out.status.success(), "ocivalidate accepted a bad manifest");
}

fn make_tree(dir: &Path) {
    for i in 0..40u32 {
        let sub = dir.join(format!("d{}", i % 4));
        fs::create_dir_all(&sub).unwrap();
        let len = (i as usize * 37_000) % 300_000 + 1;
        let data: Vec<u8> = (0..len).map(|j| (j as u32 * 31 + i) as u8).collect();
        fs::write(sub.join(format!("f{i}.bin")), data).unwrap();
    }
    fs::write(dir.join("hello.txt"), "hello\n").unwrap();
}

#[test]
fn push_uploads_an_image_that_reads_back_identical_and_skips_what_is_there() {
    let work = tempfile::tempdir().unwrap();
    let server = RegistryServer::start(&work.path().join("reg"), None).unwrap();
    let src = work.path().join("src");
    make_tree(&src);
    let out = work.path().join("img");
    ok(lazypull(&[
        "build",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]));
    let target = format!("{}/lazy/app:v1", server.addr());
    let pushed: serde_json::Value = serde_json::from_str(&ok(lazypull(&[
        "push",
        out.to_str().unwrap(),
        &target,
        "--json",
    ])))
    .unwrap();
    assert!(pushed["uploaded_bytes"].as_u64().unwrap() > 0, "{pushed}");
    assert_eq!(pushed["format"], 2, "{pushed}");
    check_lazy_image(&server.addr().to_string(), "lazy/app", "v1", &src);
    // A directory has no config: a minimal one, the host's architecture in
    // OCI naming.
    let reg = Registry::new(
        &server.addr().to_string(),
        "lazy/app",
        None,
        &ClientOptions::default(),
    )
    .unwrap();
    let (_, config) = lazy_config(&reg, "v1");
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["architecture"],
        lazypull_oci::lazy::host_architecture()
    );
    assert_eq!(config["config"], serde_json::json!({}));

    // Again, under another tag: every blob is already there.
    let again: serde_json::Value = serde_json::from_str(&ok(lazypull(&[
        "push",
        out.to_str().unwrap(),
        &format!("{}/lazy/app:v2", server.addr()),
        "--json",
    ])))
    .unwrap();
    assert_eq!(again["uploaded_bytes"], 0, "{again}");
    assert_eq!(again["manifest_digest"], pushed["manifest_digest"]);

    // Plain (uncompressed) images get a chunk table on the way.
    let plain = work.path().join("plain");
    ok(lazypull(&[
        "build",
        src.to_str().unwrap(),
        "-o",
        plain.to_str().unwrap(),
        "--compression",
        "none",
    ]));
    ok(lazypull(&[
        "push",
        plain.to_str().unwrap(),
        &format!("{}/lazy/plain:v1", server.addr()),
    ]));
    check_lazy_image(&server.addr().to_string(), "lazy/plain", "v1", &src);
}

/// An OCI image layout in `layout` of one gzip'd tar layer of `tree`, with
/// `config` as its config.
fn make_oci_layout(layout: &Path, tree: &Path, config: &[u8]) {
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = sha(bytes);
        fs::write(blobs.join(&digest[7..]), bytes).unwrap();
        digest
    };
    let tgz = layout.join("layer.tar.gz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let layer = fs::read(&tgz).unwrap();
    fs::remove_file(&tgz).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest), "size": manifest.len()}],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

#[test]
fn build_keeps_the_source_config_for_push() {
    let work = tempfile::tempdir().unwrap();
    let server = RegistryServer::start(&work.path().join("reg"), None).unwrap();
    let addr = server.addr().to_string();
    let reg = Registry::new(&addr, "lazy/kept", None, &ClientOptions::default()).unwrap();
    let tree = work.path().join("tree");
    make_tree(&tree);
    let layout = work.path().join("oci");
    make_oci_layout(&layout, &tree, RICH_CONFIG);
    let out = work.path().join("img");
    let build = |src: &Path, extra: &[&str]| {
        let mut args = vec![
            "build",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        let built: serde_json::Value = serde_json::from_str(&ok(lazypull(&args))).unwrap();
        built
    };
    let built = build(&layout, &[]);
    assert_eq!(built["runtime_config"], true, "{built}");
    // inspect shows the recorded runtime config.
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(lazypull(&["inspect", out.to_str().unwrap(), "--json"]))).unwrap();
    let want: serde_json::Value = serde_json::from_slice(RICH_CONFIG).unwrap();
    assert_eq!(inspected["push_format"], 2);
    assert_eq!(
        inspected["runtime_config"]["config"], want["config"],
        "{inspected}"
    );
    assert_eq!(inspected["runtime_config"]["architecture"], "amd64");
    let text = ok(lazypull(&["inspect", out.to_str().unwrap()]));
    assert!(
        text.contains("Entrypoint") && text.contains("format 2"),
        "{text}"
    );
    ok(lazypull(&[
        "push",
        out.to_str().unwrap(),
        &format!("{addr}/lazy/kept:oci"),
    ]));
    let (manifest, config) = lazy_config(&reg, "oci");
    check_runtime_config(&config, RICH_CONFIG, &manifest);
    check_lazy_image(&addr, "lazy/kept", "oci", &tree);

    // Built again into the same directory from a plain directory: the old
    // config does not linger.
    let built = build(&tree, &[]);
    assert_eq!(built["runtime_config"], false, "{built}");
    ok(lazypull(&[
        "push",
        out.to_str().unwrap(),
        &format!("{addr}/lazy/kept:dir"),
    ]));
    let (_, config) = lazy_config(&reg, "dir");
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["config"], serde_json::json!({}));

    // --config FILE gives one.
    let file = work.path().join("config.json");
    fs::write(&file, RICH_CONFIG).unwrap();
    build(&tree, &["--config", file.to_str().unwrap()]);
    ok(lazypull(&[
        "push",
        out.to_str().unwrap(),
        &format!("{addr}/lazy/kept:given"),
    ]));
    let (manifest, config) = lazy_config(&reg, "given");
    check_runtime_config(&config, RICH_CONFIG, &manifest);
    // A --config that is no config is refused before anything is built.
    fs::write(&file, "[1, 2]").unwrap();
    let out2 = work.path().join("img2");
    let failed = lazypull(&[
        "build",
        tree.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
        "--config",
        file.to_str().unwrap(),
    ]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("not a JSON object") && err.contains("config.json"),
        "{err}"
    );
    assert!(!out2.exists(), "a refused build wrote {}", out2.display());
    // A config without architecture cannot be pushed, and push says why.
    fs::write(out.join("image-config.json"), r#"{"os":"linux"}"#).unwrap();
    let failed = lazypull(&[
        "push",
        out.to_str().unwrap(),
        &format!("{addr}/lazy/kept:bad"),
    ]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("architecture"), "{err}");
}

#[test]
fn convert_turns_an_ordinary_oci_image_into_a_lazy_one() {
    let work = tempfile::tempdir().unwrap();
    let server = RegistryServer::start(&work.path().join("reg"), None).unwrap();
    let addr = server.addr().to_string();
    // An ordinary image: two gzip'd tar layers, the second deleting a file of the first.
    let l1 = work.path().join("l1");
    make_tree(&l1);
    let l2 = work.path().join("l2");
    fs::create_dir_all(l2.join("d0")).unwrap();
    fs::write(l2.join("d0/.wh.f0.bin"), "").unwrap();
    fs::write(l2.join("added.txt"), "from layer two\n").unwrap();
    let reg = Registry::new(&addr, "plain/app", None, &ClientOptions::default()).unwrap();
    let mut layers = Vec::new();
    for (i, dir) in [&l1, &l2].iter().enumerate() {
        let tgz = work.path().join(format!("layer{i}.tar.gz"));
        let st = Command::new("tar")
            .arg("-czf")
            .arg(&tgz)
            .arg("-C")
            .arg(dir)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let bytes = fs::read(&tgz).unwrap();
        let digest = sha(&bytes);
        let size = bytes.len() as u64;
        let path = tgz.clone();
        reg.push_blob(
            &digest,
            size,
            &move || Ok(Box::new(fs::File::open(&path)?) as Box<dyn Read + Send>),
            &|_| {},
        )
        .unwrap();
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size,
        }));
    }
    let config = RICH_CONFIG;
    reg.push_blob(
        &sha(config),
        config.len() as u64,
        &|| Ok(Box::new(config) as Box<dyn Read + Send>),
        &|_| {},
    )
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": config.len()},
        "layers": layers,
    }))
    .unwrap();
    let mdigest = reg
        .put_manifest(
            "amd64",
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )
        .unwrap();
    // Tagged through a multi-platform index, as real images are.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": manifest.len(),
             "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }))
    .unwrap();
    reg.put_manifest("v1", "application/vnd.oci.image.index.v1+json", &index)
        .unwrap();
    // The same image as Docker schema 2 (Docker media types throughout).
    let mut docker: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    docker["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into();
    docker["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json".into();
    for l in docker["layers"].as_array_mut().unwrap() {
        l["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip".into();
    }
    reg.put_manifest(
        "docker",
        "application/vnd.docker.distribution.manifest.v2+json",
        &serde_json::to_vec(&docker).unwrap(),
    )
    .unwrap();

    let converted: serde_json::Value = serde_json::from_str(&ok(lazypull(&[
        "convert",
        &format!("{addr}/plain/app:v1"),
        &format!("{addr}/lazy/app:v1"),
        "--json",
    ])))
    .unwrap();
    assert_eq!(
        converted["blobs"], 2,
        "one data blob per layer: {converted}"
    );

    // The expected tree: layer one, minus the whiteout, plus layer two's file.
    let expected = work.path().join("expected");
    Command::new("cp")
        .arg("-a")
        .arg(&l1)
        .arg(&expected)
        .status()
        .unwrap();
    fs::remove_file(expected.join("d0/f0.bin")).unwrap();
    fs::write(expected.join("added.txt"), "from layer two\n").unwrap();
    check_lazy_image(&addr, "lazy/app", "v1", &expected);
    let reg = Registry::new(&addr, "lazy/app", None, &ClientOptions::default()).unwrap();
    // The lazy image carries the source's runtime config, field for field.
    let (manifest, config_bytes) = lazy_config(&reg, "v1");
    check_runtime_config(&config_bytes, config, &manifest);
    // ... and validates against the OCI image spec's schemas.
    oci_validate(work.path(), &manifest, &config_bytes);
    // From a Docker image too: its config kept, as an OCI config.
    ok(lazypull(&[
        "convert",
        &format!("{addr}/plain/app:docker"),
        &format!("{addr}/lazy/app:docker"),
    ]));
    let (docker_manifest, docker_config) = lazy_config(&reg, "docker");
    check_runtime_config(&docker_config, config, &docker_manifest);
    assert_eq!(
        docker_config, config_bytes,
        "the same image, the same config"
    );
    let (_, config) = LazyImage::parse_manifest(&reg.get_manifest("v1").unwrap().bytes).unwrap();
    let image =
        lazypull_erofs::Image::from_bytes(reg.get_blob(&config.meta.digest, &|_| {}).unwrap())
            .unwrap();
    assert!(
        image.lookup(b"d0/f0.bin").is_err(),
        "the whiteout must hide f0.bin"
    );

    // Converting a lazy image again is refused with a reason.
    let again = lazypull(&[
        "convert",
        &format!("{addr}/lazy/app:v1"),
        &format!("{addr}/lazy/x:v1"),
    ]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already a lazypull image"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn registry_commands_fail_clearly() {
    let work = tempfile::tempdir().unwrap();
    let server = RegistryServer::start(&work.path().join("reg"), None).unwrap();
    let addr = server.addr();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "push".into(),
                work.path().to_str().unwrap().into(),
                format!("{addr}/x/y:v1"),
            ],
            "is this a `lazypull build` output?",
        ),
        (
            vec![
                "push".into(),
                "/nonexistent".into(),
                "no-registry-here:v1".into(),
            ],
            "registry",
        ),
        (
            vec![
                "convert".into(),
                format!("{addr}/none/such:v1"),
                format!("{addr}/x/y:v1"),
            ],
            "none/such",
        ),
        (
            vec![
                "mount".into(),
                format!("{addr}/x/y:v1"),
                work.path().join("mnt").to_str().unwrap().into(),
                "--socket".into(),
                work.path().join("no.sock").to_str().unwrap().into(),
            ],
            "is `lazypull daemon` running",
        ),
        (
            vec![
                "status".into(),
                "--socket".into(),
                "/nonexistent.sock".into(),
            ],
            "cannot reach the lazypull daemon",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lazypull(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: want {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

/// A registry that answers every request with a Basic challenge and records
/// the `Authorization` header of each (None for a request without one).
struct ChallengingRegistry {
    addr: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChallengingRegistry {
    fn start() -> ChallengingRegistry {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut auth = None;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.trim().eq_ignore_ascii_case("authorization") {
                            auth = Some(v.trim().to_owned());
                        }
                    }
                }
                seen2.lock().unwrap().push(auth);
                let _ = conn.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"r\"\r\n\
                      Content-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        ChallengingRegistry {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ChallengingRegistry {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// `convert`'s credentials (flags or environment) are the target registry's:
/// a source on another host never sees them (it gets the docker config's
/// entry for its own host, here none); a source on the target's host does.
#[test]
fn convert_sends_credentials_only_to_their_registry() {
    let work = tempfile::tempdir().unwrap();
    let no_config = work.path().join("no-docker-config.json");
    let convert = |source: &str, target: &str| {
        Command::new(env!("CARGO_BIN_EXE_lazypull"))
            .args(["convert", source, target, "--username", "alice"])
            .arg("--docker-config")
            .arg(&no_config)
            .env("LAZYPULL_REGISTRY_PASSWORD", "target-secret")
            .env_remove("LAZYPULL_REGISTRY_USER")
            .output()
            .expect("running lazypull")
    };
    let source = ChallengingRegistry::start();
    let target = ChallengingRegistry::start();
    let out = convert(
        &format!("{}/src/img:v1", source.addr),
        &format!("{}/dst/img:v1", target.addr),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&source.addr), "{stderr}");
    let seen = source.seen();
    assert!(!seen.is_empty(), "the source was never asked");
    assert!(
        seen.iter().all(Option::is_none),
        "the target's credentials reached the source registry: {seen:?}"
    );

    // Source and target on one host: the credentials are that host's.
    let out = convert(
        &format!("{}/src/img:v1", target.addr),
        &format!("{}/dst/img:v1", target.addr),
    );
    assert!(!out.status.success());
    // base64("alice:target-secret")
    let basic = "Basic YWxpY2U6dGFyZ2V0LXNlY3JldA==".to_owned();
    assert!(target.seen().contains(&Some(basic)), "{:?}", target.seen());
}

/// `hosts.toml` for the commands (issue 18): `lazypull push` to a registry
/// whose certificate is from a private CA fails naming the host without the
/// host directory and works with its `ca`; `lazypull convert` reads its
/// source through the mirror the upstream's `hosts.toml` declares (the
/// mirror's log shows the source's blobs) and pushes to the upstream itself.
#[test]
fn the_commands_read_containerds_hosts_toml() {
    use lazypull_testkit::registry::RegistryOptions;
    use lazypull_testkit::tls::TestCa;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let ca = TestCa::new(&dir.join("pki"), "lazypull-test-ca").unwrap();
    let server = ca.server("registry").unwrap();
    let tls = RegistryServer::start_with(
        &dir.join("tls"),
        &RegistryOptions {
            tls: Some((&server.cert, &server.key)),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    let src = dir.join("src");
    make_tree(&src);
    let img = dir.join("img");
    ok(lazypull(&[
        "build",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
    ]));
    let certs = dir.join("certs.d");
    let target = format!("{}/lp/tls:v1", tls.host());

    // A loopback registry is plain HTTP unless its hosts.toml says HTTPS:
    // it does here, without the CA first.
    let hosts = certs.join(tls.host()).join("hosts.toml");
    fs::create_dir_all(hosts.parent().unwrap()).unwrap();
    let server_line = format!("server = \"https://{}\"\n", tls.host());
    fs::write(&hosts, &server_line).unwrap();
    let without = Command::new(env!("CARGO_BIN_EXE_lazypull"))
        .args(["push", img.to_str().unwrap(), &target])
        .env("LAZYPULL_HOSTS_DIR", &certs)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(!without.status.success(), "pushed to an unknown CA");
    for needle in [&*tls.host(), "TLS", "ca = ", &*hosts.to_string_lossy()] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    fs::write(
        &hosts,
        format!("{server_line}ca = \"{}\"\n", ca.cert.display()),
    )
    .unwrap();
    ok(lazypull(&[
        "push",
        img.to_str().unwrap(),
        &target,
        "--hosts-dir",
        certs.to_str().unwrap(),
    ]));

    // convert through a pull-through mirror of a plain-HTTP upstream.
    let upstream = RegistryServer::start(&dir.join("upstream"), None).unwrap();
    let remote = format!("http://{}", upstream.host());
    let mirror = RegistryServer::start_with(
        &dir.join("mirror"),
        &RegistryOptions {
            proxy_remote: Some(&remote),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    lazypull_testkit::oci_image::busybox_image()
        .unwrap()
        .push(upstream.addr(), "plain/box", "v1")
        .unwrap();
    fs::create_dir_all(certs.join(upstream.host())).unwrap();
    fs::write(
        certs.join(upstream.host()).join("hosts.toml"),
        lazypull_testkit::containerd::mirror_hosts_toml(&upstream.host(), &mirror.host()),
    )
    .unwrap();
    let source = format!("{}/plain/box:v1", upstream.host());
    let lazy = format!("{}/lazy/box:v1", upstream.host());
    ok(lazypull(&[
        "convert",
        &source,
        &lazy,
        "--hosts-dir",
        certs.to_str().unwrap(),
    ]));
    let mirrored: Vec<String> = mirror
        .access_log()
        .into_iter()
        .filter(|(m, p, s)| m == "GET" && p.contains("/plain/box/blobs/") && *s == 200)
        .map(|(_, p, _)| p)
        .collect();
    assert!(
        !mirrored.is_empty(),
        "convert read no source blob through the mirror: {:?}",
        mirror.access_log()
    );
    let pushed_to_mirror: Vec<_> = mirror
        .access_log()
        .into_iter()
        .filter(|(m, _, _)| m == "PUT" || m == "POST" || m == "PATCH")
        .collect();
    assert!(pushed_to_mirror.is_empty(), "{pushed_to_mirror:?}");
    let reg = Registry::new(
        &upstream.host(),
        "lazy/box",
        None,
        &ClientOptions::default(),
    )
    .unwrap();
    let manifest = reg.get_manifest("v1").unwrap();
    LazyImage::parse_manifest(&manifest.bytes).expect("the upstream holds the lazy image");
}
