//! What registries and image layouts send: manifests and indexes
//! (`lazypull_oci`), lazypull manifests (`lazy::LazyImage::parse_manifest`,
//! `prefetch_record`, `check_config`), recorded prefetch orders
//! (`prefetch::Record::parse`), token answers, `WWW-Authenticate`
//! challenges, docker config files and manifest media types (the registry
//! client's parsers, `lazypull_backend::registry::fuzzing`), and image
//! references (`Reference::parse`).
//!
//! Input: one selector byte, then the document.
//!
//! Properties: nothing panics; what parses serializes and parses back to
//! itself; a lazypull manifest rebuilt from the image it describes
//! describes the same image; a prefetch record's merge is valid,
//! idempotent and names no more bytes; a token lives 1 s to a day; a
//! reference prints and parses back to itself.
#![no_main]

use lazypull_backend::registry::fuzzing;
use lazypull_backend::{registry::validate_digest, Reference};
use lazypull_oci::lazy::{self, LazyImage};
use lazypull_oci::prefetch::Record;
use lazypull_oci::{media_type, ImageIndex, ImageManifest};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(doc: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = serde_json::from_slice::<T>(doc) {
        let bytes = serde_json::to_vec(&v).expect("serializes");
        let back: T = serde_json::from_slice(&bytes).expect("parses back");
        assert_eq!(back, v);
    }
}

fn manifest(doc: &[u8]) {
    round_trip::<ImageManifest>(doc);
    let Ok(m) = serde_json::from_slice::<ImageManifest>(doc) else {
        return;
    };
    let _ = lazy::is_lazypull(&m);
    let _ = lazy::prefetch_record(&m);
    for d in std::iter::once(&m.config).chain(&m.layers) {
        let _ = (
            media_type::is_index(&d.media_type),
            media_type::is_image_manifest(&d.media_type),
            media_type::is_tar_layer(&d.media_type),
            d.ref_name(),
        );
    }
    let Ok((m2, image)) = LazyImage::parse_manifest(doc) else {
        return;
    };
    assert_eq!(m2, m);
    let _ = image.meta_hex();
    let config = image
        .config(&lazy::minimal_config())
        .expect("the minimal config is a config");
    let config_bytes = serde_json::to_vec(&config).unwrap();
    image
        .check_config(&config_bytes)
        .expect("its own config checks");
    let rebuilt = image.manifest(&config_bytes);
    let again = LazyImage::from_manifest(&rebuilt).expect("a rebuilt manifest parses");
    assert_eq!(again, image);
}

fn index(doc: &[u8]) {
    round_trip::<ImageIndex>(doc);
    if let Ok(i) = serde_json::from_slice::<ImageIndex>(doc) {
        let n = i.for_platform("linux", "amd64").count();
        assert!(n <= i.manifests.len());
    }
}

fn prefetch(doc: &[u8]) {
    let Ok(r) = Record::parse(doc) else {
        return;
    };
    let bytes = r.to_bytes();
    assert_eq!(Record::parse(&bytes).expect("re-parses"), r);
    let total = r.bytes();
    let m = r.merged();
    m.validate().expect("a merged valid record is valid");
    assert!(m.bytes() <= total);
    assert_eq!(m.clone().merged(), m, "merging is idempotent");
}

fn token(doc: &[u8]) {
    if let Ok((tok, life)) = fuzzing::token_response(doc) {
        assert!(!tok.is_empty());
        assert!((1..=24 * 60 * 60).contains(&life.as_secs()));
    }
}

fn reference(s: &str) {
    let _ = validate_digest(s);
    if let Ok(r) = Reference::parse(s) {
        let text = r.to_string();
        assert_eq!(
            Reference::parse(&text).expect("a printed reference parses"),
            r
        );
        let _ = r.is_digest();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, doc)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(doc);
    match which % 8 {
        0 => manifest(doc),
        1 => index(doc),
        2 => prefetch(doc),
        3 => token(doc),
        4 => {
            for (scheme, params) in fuzzing::www_authenticate(&text) {
                assert!(!scheme.is_empty());
                assert!(params.iter().all(|(k, _)| !k.is_empty()));
            }
        }
        5 => {
            // The registry name on the first line, the config after it.
            let (registry, cfg) = match doc.iter().position(|&b| b == b'\n') {
                Some(i) => (String::from_utf8_lossy(&doc[..i]), &doc[i + 1..]),
                None => ("docker.io".into(), doc),
            };
            let _ = fuzzing::docker_config(cfg, &registry);
        }
        6 => reference(&text),
        _ => {
            // The Content-Type on the first line, the manifest after it.
            let (ct, body) = match doc.iter().position(|&b| b == b'\n') {
                Some(i) => (Some(String::from_utf8_lossy(&doc[..i])), &doc[i + 1..]),
                None => (None, doc),
            };
            let _ = fuzzing::manifest_media_type(ct.as_deref(), body);
        }
    }
});
