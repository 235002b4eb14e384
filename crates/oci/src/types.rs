//! Descriptors, manifests and indexes (the fields lazypull uses).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Empty when the document left it out.
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor with no platform and no annotations.
    pub fn new(media_type: &str, digest: impl Into<String>, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.into(),
            size,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    /// The `org.opencontainers.image.ref.name` annotation (the tag an OCI
    /// image layout's `index.json` gives an entry), if any.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .get("org.opencontainers.image.ref.name")
            .map(String::as_str)
    }
}

/// The `oci-layout` file that marks a directory as an OCI image layout
/// (next to its `index.json` and `blobs/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageLayout {
    /// The layout version, `"1.0.0"` in every layout so far.
    pub image_layout_version: String,
}

/// The platform an index entry is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An OCI (or Docker schema 2) image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image index (or Docker manifest list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

impl ImageIndex {
    /// The entries for `os`/`architecture`, in the index's order.
    pub fn for_platform<'a>(
        &'a self,
        os: &'a str,
        architecture: &'a str,
    ) -> impl Iterator<Item = &'a Descriptor> + 'a {
        self.manifests.iter().filter(move |d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_descriptors_and_platform_choice() {
        let index: ImageIndex = serde_json::from_str(
            r#"{"schemaVersion":2,"manifests":[
                {"digest":"sha256:aa","size":1,"platform":{"architecture":"arm64","os":"linux"}},
                {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":2,
                 "platform":{"architecture":"amd64","os":"linux"},"annotations":{"k":"v"}}]}"#,
        )
        .unwrap();
        assert_eq!(index.manifests[0].media_type, "");
        let amd: Vec<_> = index.for_platform("linux", "amd64").collect();
        assert_eq!(amd.len(), 1);
        assert_eq!(amd[0].digest, "sha256:bb");
        assert_eq!(amd[0].annotations["k"], "v");
        // Serialising leaves out what is absent.
        let text = serde_json::to_string(&Descriptor::new("m", "sha256:cc", 3)).unwrap();
        assert_eq!(text, r#"{"mediaType":"m","digest":"sha256:cc","size":3}"#);
    }

    #[test]
    fn ref_name_and_layout_marker() {
        let mut d = Descriptor::new("m", "sha256:cc", 3);
        assert_eq!(d.ref_name(), None);
        d.annotations
            .insert("org.opencontainers.image.ref.name".into(), "latest".into());
        assert_eq!(d.ref_name(), Some("latest"));
        let marker: ImageLayout =
            serde_json::from_str(r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        assert_eq!(marker.image_layout_version, "1.0.0");
        assert!(serde_json::from_str::<ImageLayout>("{}").is_err());
    }
}
