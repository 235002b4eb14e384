//! Writes the seed corpus of every fuzz target into `<dir>/<target>/`
//! (default `fuzz/corpus`): a few small valid inputs each, made with
//! lazypull's own encoders and builders where it has them.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml -p lazypull-fuzz-seedgen -- fuzz/corpus`

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use lazypull_cachefiles::msg::{self, CloseRequest, OpenRequest, ReadRequest, Request};
use lazypull_containerd_api::containerd::services::snapshots::v1 as api;
use lazypull_oci::lazy::{BlobRef, DataBlob, LazyImage};
use prost::Message;
use sha2::{Digest, Sha256};

struct Out {
    dir: PathBuf,
}

impl Out {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let d = self.dir.join(target);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(name), bytes).unwrap();
    }
}

fn with_mode(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(rest);
    v
}

fn hex_of(seed: &[u8]) -> String {
    hex::encode(Sha256::digest(seed))
}

fn cachefiles(o: &Out) {
    let fsid = hex_of(b"meta");
    let mut volume = format!("erofs,{fsid}").into_bytes();
    volume.push(0);
    let mut tag = hex_of(b"blob").into_bytes();
    tag.resize(64, 0);
    let open = Request::Open(OpenRequest {
        msg_id: 1,
        object_id: 7,
        volume_key: volume.clone(),
        cookie_key: fsid.clone().into_bytes(),
        fd: 5,
        flags: 0,
    });
    let open_blob = Request::Open(OpenRequest {
        msg_id: 2,
        object_id: 8,
        volume_key: volume,
        cookie_key: tag,
        fd: 6,
        flags: 0,
    });
    let read = Request::Read(ReadRequest {
        msg_id: 3,
        object_id: 7,
        off: 4096,
        len: 1 << 20,
    });
    let close = Request::Close(CloseRequest {
        msg_id: 4,
        object_id: 7,
    });
    o.put("cachefiles_msg", "open_meta", &msg::encode(&open));
    o.put("cachefiles_msg", "open_blob", &msg::encode(&open_blob));
    o.put("cachefiles_msg", "read", &msg::encode(&read));
    o.put("cachefiles_msg", "close", &msg::encode(&close));
}

/// `struct fuse_in_header` + body, `len` filled in.
fn fuse(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    b.extend_from_slice(&opcode.to_le_bytes());
    b.extend_from_slice(&unique.to_le_bytes());
    b.extend_from_slice(&nodeid.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // uid
    b.extend_from_slice(&0u32.to_le_bytes()); // gid
    b.extend_from_slice(&1234u32.to_le_bytes()); // pid
    b.extend_from_slice(&0u16.to_le_bytes()); // total_extlen
    b.extend_from_slice(&0u16.to_le_bytes()); // padding
    b.extend_from_slice(body);
    b
}

fn fuse_seeds(o: &Out) {
    let le32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // INIT 7.40, max_readahead 128 KiB, flags with INIT_EXT (1 << 30), flags2.
    let mut init = le32(&[7, 40, 128 << 10, 1 << 30, 1]);
    init.resize(64, 0);
    o.put("fuse_request", "init", &fuse(26, 1, 0, &init));
    o.put("fuse_request", "lookup", &fuse(1, 2, 1, b"etc\0"));
    o.put("fuse_request", "getattr", &fuse(3, 3, 1, &[0u8; 16]));
    o.put("fuse_request", "open", &fuse(14, 4, 5, &le32(&[0, 0])));
    let read_in = |fh: u64, off: u64, size: u32| {
        let mut b = Vec::new();
        b.extend_from_slice(&fh.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&[0u8; 20]);
        b
    };
    o.put(
        "fuse_request",
        "read",
        &fuse(15, 5, 5, &read_in(9, 4096, 65536)),
    );
    o.put(
        "fuse_request",
        "readdir",
        &fuse(28, 6, 1, &read_in(1, 0, 4096)),
    );
    o.put("fuse_request", "release", &fuse(18, 7, 5, &[0u8; 24]));
    o.put(
        "fuse_request",
        "forget",
        &fuse(2, 8, 5, &3u64.to_le_bytes()),
    );
    let mut batch = le32(&[2, 0]);
    for (n, l) in [(5u64, 1u64), (6, 2)] {
        batch.extend_from_slice(&n.to_le_bytes());
        batch.extend_from_slice(&l.to_le_bytes());
    }
    o.put("fuse_request", "batch_forget", &fuse(42, 9, 0, &batch));
    o.put(
        "fuse_request",
        "interrupt",
        &fuse(36, 10, 0, &5u64.to_le_bytes()),
    );
    o.put("fuse_request", "access", &fuse(34, 11, 1, &le32(&[4, 0])));
    o.put("fuse_request", "statfs", &fuse(17, 12, 1, &[]));
}

fn fanotify(o: &Out) {
    let event = |mask: u64, fd: i32, range: Option<(u64, u64)>| {
        let len = 24 + if range.is_some() { 24 } else { 0 };
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.push(3);
        b.push(0);
        b.extend_from_slice(&24u16.to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&4321i32.to_ne_bytes());
        if let Some((off, count)) = range {
            b.extend_from_slice(&[6, 0]);
            b.extend_from_slice(&24u16.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&off.to_ne_bytes());
            b.extend_from_slice(&count.to_ne_bytes());
        }
        b
    };
    let mut two = event(0x0010_0000, 7, Some((0, 4096)));
    two.extend(event(0x0010_0000, 8, Some((1 << 20, 65536))));
    o.put("fanotify_event", "pre_access_two", &with_mode(0, &two));
    o.put(
        "fanotify_event",
        "overflow",
        &with_mode(0, &event(0x4000, -1, None)),
    );
    o.put(
        "fanotify_event",
        "journal",
        &with_mode(
            1,
            b"B 7 0 4096 blob-a\nE 7\nB 8 4096 8192 blob b\nB 9 0 1 x\n",
        ),
    );
    o.put(
        "fanotify_event",
        "journal_cut",
        &with_mode(1, b"B 7 0 4096 a\nB 8 0 4"),
    );
}

fn erofs(o: &Out, tmp: &Path) {
    use std::os::unix::fs::symlink;
    let l1 = tmp.join("layer1");
    let l2 = tmp.join("layer2");
    fs::create_dir_all(l1.join("etc/deep/er")).unwrap();
    fs::write(l1.join("etc/hostname"), b"lazypull\n").unwrap();
    fs::write(l1.join("etc/deep/er/big"), vec![7u8; 9000]).unwrap();
    fs::write(l1.join("empty"), b"").unwrap();
    symlink("etc/hostname", l1.join("link")).unwrap();
    fs::hard_link(l1.join("etc/hostname"), l1.join("hard")).unwrap();
    fs::create_dir_all(&l2).unwrap();
    fs::write(l2.join("etc-override"), b"second layer").unwrap();
    fs::write(l2.join(".wh.empty"), b"").unwrap();
    let opts = lazypull_erofs::BuildOptions {
        chunk_size: 4096,
        build_time: Some(1_700_000_000),
        ..Default::default()
    };
    for (name, layers) in [
        ("one_layer", vec![l1.clone()]),
        ("two_layers", vec![l1, l2]),
    ] {
        let out = tmp.join(format!("out-{name}"));
        fs::create_dir_all(&out).unwrap();
        let built = lazypull_erofs::build_from_layers(&layers, &out, &opts).unwrap();
        let meta = fs::read(built.meta_path(&out)).unwrap();
        o.put("erofs_image", name, &with_mode(0, &meta));
        if name == "two_layers" {
            let trailer = lazypull_erofs::Trailer {
                entries: built
                    .blobs
                    .iter()
                    .map(|b| lazypull_erofs::TrailerEntry {
                        blob: hex::decode(&b.digest).unwrap().try_into().unwrap(),
                        table: None,
                    })
                    .collect(),
            };
            let with = lazypull_erofs::append_trailer(meta, &trailer);
            o.put("erofs_image", "two_layers_trailer", &with_mode(0, &with));
        }
    }
}

fn chunk_table(o: &Out, tmp: &Path) {
    use lazypull_blob::{pack, Compression, PackOptions};
    // Compressible, then incompressible (a SHA-256 chain), then empty.
    let mut noise = Vec::new();
    let mut h = Sha256::digest(b"noise").to_vec();
    while noise.len() < 70_000 {
        h = Sha256::digest(&h).to_vec();
        noise.extend_from_slice(&h);
    }
    let text: Vec<u8> = b"lazypull ".iter().cycle().take(150_000).copied().collect();
    for (name, bytes, compression) in [
        ("zstd_units", text, Compression::Zstd { level: 3 }),
        ("raw_units", noise, Compression::None),
        ("empty", Vec::new(), Compression::Zstd { level: 3 }),
    ] {
        let src = tmp.join(format!("blob-{name}"));
        fs::write(&src, &bytes).unwrap();
        let out = tmp.join(format!("packed-{name}"));
        fs::create_dir_all(&out).unwrap();
        let p = pack(
            &src,
            &out,
            &PackOptions {
                unit_size: 64 << 10,
                compression,
            },
        )
        .unwrap();
        let mut seed = fs::read(&p.table_path).unwrap();
        // Only the first units' stored bytes: keeps the seed small, and the
        // reads of the later ones then fail as truncated.
        let stored = fs::read(&p.data_path).unwrap();
        seed.extend_from_slice(&stored[..stored.len().min(80_000)]);
        o.put("chunk_table", name, &with_mode(0, &seed));
    }
}

fn registry(o: &Out) {
    let blob_ref = |seed: &str, size| BlobRef {
        digest: format!("sha256:{}", hex_of(seed.as_bytes())),
        size,
    };
    let image = LazyImage {
        meta: blob_ref("meta", 16384),
        chunk_size: 1 << 20,
        blobs: vec![DataBlob {
            digest: hex_of(b"blob"),
            size: 1 << 20,
            table: blob_ref("table", 152),
            data: blob_ref("data", 4096),
        }],
    };
    let config = image.config(&lazypull_oci::lazy::minimal_config()).unwrap();
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let m = lazypull_oci::lazy::with_prefetch_record(
        image.manifest(&config_bytes),
        &blob_ref("record", 80),
    );
    o.put(
        "registry_json",
        "lazypull_manifest",
        &with_mode(0, &serde_json::to_vec_pretty(&m).unwrap()),
    );
    let ordinary = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", hex_of(b"c")), "size": 7023},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", hex_of(b"l")), "size": 32654,
                    "annotations": {"org.opencontainers.image.title": "layer"}}],
        "annotations": {"org.opencontainers.image.ref.name": "v1"}
    });
    o.put(
        "registry_json",
        "oci_manifest",
        &with_mode(0, &serde_json::to_vec(&ordinary).unwrap()),
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", hex_of(b"a")), "size": 7143,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": format!("sha256:{}", hex_of(b"b")), "size": 7682,
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}
        ]
    });
    o.put(
        "registry_json",
        "index",
        &with_mode(1, &serde_json::to_vec(&index).unwrap()),
    );
    let record = serde_json::json!({"version": 1, "entries": [
        {"path": "/usr/bin/python3", "offset": 0, "length": 65536},
        {"path": "/usr/bin/python3", "offset": 65536, "length": 4096},
        {"path": "/etc/hosts", "offset": 0, "length": 100}
    ]});
    o.put(
        "registry_json",
        "prefetch_record",
        &with_mode(2, &serde_json::to_vec(&record).unwrap()),
    );
    o.put(
        "registry_json",
        "token",
        &with_mode(
            3,
            br#"{"token":"abc.def.ghi","expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}"#,
        ),
    );
    o.put("registry_json", "oauth_token", &with_mode(3, br#"{"access_token":"xyz","expires_in":18446744073709551615,"scope":"repository:a/b:pull"}"#));
    o.put(
        "registry_json",
        "www_authenticate",
        &with_mode(4, br#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push", Basic realm="x""#),
    );
    o.put(
        "registry_json",
        "docker_config",
        &with_mode(5, b"registry.example:5000\n{\"auths\":{\"https://registry.example:5000/v2/\":{\"auth\":\"dXNlcjpwYXNz\"},\"docker.io\":{\"identitytoken\":\"t\"}},\"credHelpers\":{\"gcr.io\":\"gcloud\"},\"credsStore\":\"desktop\"}"),
    );
    o.put(
        "registry_json",
        "reference_tag",
        &with_mode(6, b"registry.example:5000/library/debian:bookworm"),
    );
    o.put(
        "registry_json",
        "reference_digest",
        &with_mode(
            6,
            format!("localhost/a/b@sha256:{}", hex_of(b"r")).as_bytes(),
        ),
    );
    o.put(
        "registry_json",
        "content_type",
        &with_mode(7, b"application/json; charset=utf-8\n{\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[]}"),
    );
}

/// One request of a snapshotter sequence: selector, u16 length, protobuf.
fn req(out: &mut Vec<u8>, which: u8, m: &impl Message) {
    let b = m.encode_to_vec();
    out.push(which);
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(&b);
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn snapshotter(o: &Out) {
    let s = String::new;
    let prepare = |key: &str, parent: &str, l: &[(&str, &str)]| api::PrepareSnapshotRequest {
        snapshotter: "lazypull".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(l),
    };
    // An ordinary image: unpack a layer, commit it, a container on it.
    let mut ordinary = Vec::new();
    req(
        &mut ordinary,
        0,
        &prepare(
            "extract-1",
            "",
            &[("containerd.io/snapshot.ref", "sha256:aaa")],
        ),
    );
    req(
        &mut ordinary,
        2,
        &api::MountsRequest {
            snapshotter: s(),
            key: "extract-1".into(),
        },
    );
    req(
        &mut ordinary,
        3,
        &api::CommitSnapshotRequest {
            snapshotter: s(),
            name: "sha256:aaa".into(),
            key: "extract-1".into(),
            labels: labels(&[("containerd.io/gc.root", "x")]),
        },
    );
    req(&mut ordinary, 0, &prepare("ctr", "sha256:aaa", &[]));
    req(&mut ordinary, 1, &prepare("view", "sha256:aaa", &[]));
    req(
        &mut ordinary,
        5,
        &api::StatSnapshotRequest {
            snapshotter: s(),
            key: "ctr".into(),
        },
    );
    req(
        &mut ordinary,
        6,
        &api::UpdateSnapshotRequest {
            snapshotter: s(),
            info: Some(api::Info {
                name: "ctr".into(),
                labels: labels(&[("a.b", "c"), ("x", "")]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.a.b".into(), "labels.x".into()],
            }),
        },
    );
    req(
        &mut ordinary,
        7,
        &api::ListSnapshotsRequest {
            snapshotter: s(),
            filters: vec![
                r#"kind==active,labels."a.b"~=/^c/"#.into(),
                "parent!=x".into(),
                "name".into(),
            ],
        },
    );
    req(
        &mut ordinary,
        8,
        &api::UsageRequest {
            snapshotter: s(),
            key: "ctr".into(),
        },
    );
    req(
        &mut ordinary,
        4,
        &api::RemoveSnapshotRequest {
            snapshotter: s(),
            key: "ctr".into(),
        },
    );
    req(&mut ordinary, 9, &api::CleanupRequest { snapshotter: s() });
    o.put("snapshotter_request", "ordinary_image", &ordinary);

    // A lazypull image: meta and data layers committed on the spot, then a
    // container on them (refused: no daemon).
    let meta = format!("sha256:{}", hex_of(b"meta"));
    let role = "containerd.io/snapshot/lazypull.role";
    let mut lazy = Vec::new();
    req(
        &mut lazy,
        0,
        &prepare(
            "extract-m",
            "",
            &[
                (role, "meta"),
                ("containerd.io/snapshot/lazypull.format", "2"),
                ("containerd.io/snapshot.ref", &meta),
                (
                    "containerd.io/snapshot/lazypull.image-ref",
                    "registry.example/a:b",
                ),
            ],
        ),
    );
    req(
        &mut lazy,
        0,
        &prepare(
            "extract-d",
            &meta,
            &[
                (role, "data"),
                ("containerd.io/snapshot/lazypull.blob", &hex_of(b"blob")),
                ("containerd.io/snapshot.ref", "sha256:chain2"),
            ],
        ),
    );
    req(
        &mut lazy,
        0,
        &prepare(
            "ctr",
            "sha256:chain2",
            &[("containerd.io/snapshot/lazypull.eager", "true")],
        ),
    );
    req(
        &mut lazy,
        8,
        &api::UsageRequest {
            snapshotter: s(),
            key: meta.clone(),
        },
    );
    req(
        &mut lazy,
        7,
        &api::ListSnapshotsRequest {
            snapshotter: s(),
            filters: vec![format!("labels.\"{role}\"==meta")],
        },
    );
    req(
        &mut lazy,
        4,
        &api::RemoveSnapshotRequest {
            snapshotter: s(),
            key: "sha256:chain2".into(),
        },
    );
    o.put("snapshotter_request", "lazy_image", &lazy);
}

fn tar_seeds(o: &Out) {
    fn layer(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)], pax: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            if pax {
                b.append_pax_extensions([
                    ("mtime", b"1700000000.123456789".as_slice()),
                    ("SCHILY.xattr.user.lazypull", b"yes".as_slice()),
                ])
                .unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }
    use tar::EntryType as T;
    let plain = layer(
        &[
            ("etc/", T::Directory, b"", None),
            ("etc/hostname", T::Regular, b"lazypull\n", None),
            ("etc/link", T::Symlink, b"", Some("hostname")),
            ("etc/hard", T::Link, b"", Some("etc/hostname")),
            ("dev-null", T::Char, b"", None),
            ("etc/.wh.gone", T::Regular, b"", None),
        ],
        false,
    );
    o.put("tar_ingest", "layer.tar", &plain);
    let pax = layer(
        &[
            ("usr/", T::Directory, b"", None),
            ("usr/bin-x", T::Regular, &[0x7f, b'E', b'L', b'F'], None),
        ],
        true,
    );
    o.put("tar_ingest", "pax.tar", &pax);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&plain).unwrap();
    o.put("tar_ingest", "layer.tar.gz", &gz.finish().unwrap());
    // A `docker save` archive: manifest.json naming two layer tars.
    let l2 = layer(
        &[
            ("etc/.wh..wh..opq", T::Regular, b"", None),
            ("etc/new", T::Regular, b"2", None),
        ],
        false,
    );
    let manifest = serde_json::json!([{
        "Config": format!("{}.json", hex_of(b"{}")),
        "RepoTags": ["example:latest"],
        "Layers": ["l1/layer.tar", "l2/layer.tar"]
    }]);
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        (&*format!("{}.json", hex_of(b"{}")), b"{}".to_vec()),
        ("l1/layer.tar", plain.clone()),
        ("l2/layer.tar", l2),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    o.put("tar_ingest", "docker_save.tar", &b.into_inner().unwrap());
}

fn cri_pull(o: &Out) {
    use base64::Engine;
    use lazypull_cri_proxy::pull::{AuthConfig, ImageSpec, PullImageRequest};
    let frame = |req: &PullImageRequest| {
        let m = req.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(&m);
        out
    };
    let image = Some(ImageSpec {
        image: "registry.lan:5000/team/app:v1".into(),
    });
    let auth = |a: AuthConfig| PullImageRequest {
        image: image.clone(),
        auth: Some(a),
    };
    o.put(
        "cri_pull",
        "password",
        &frame(&auth(AuthConfig {
            username: "alice".into(),
            password: "s3cret".into(),
            server_address: "registry.lan:5000".into(),
            ..AuthConfig::default()
        })),
    );
    o.put(
        "cri_pull",
        "auth",
        &frame(&auth(AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:pa:ss"),
            ..AuthConfig::default()
        })),
    );
    o.put(
        "cri_pull",
        "identity_token",
        &frame(&auth(AuthConfig {
            identity_token: "refresh-me".into(),
            ..AuthConfig::default()
        })),
    );
    o.put(
        "cri_pull",
        "anonymous",
        &frame(&PullImageRequest {
            image,
            auth: None,
        }),
    );
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let o = Out {
        dir: PathBuf::from(dir),
    };
    let tmp = tempfile::tempdir().unwrap();
    cachefiles(&o);
    fuse_seeds(&o);
    fanotify(&o);
    erofs(&o, tmp.path());
    chunk_table(&o, tmp.path());
    registry(&o);
    snapshotter(&o);
    tar_seeds(&o);
    cri_pull(&o);
    eprintln!("seeds written to {}", o.dir.display());
}
