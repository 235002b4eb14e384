//! What kubelet sends `lazypull cri-proxy` in a CRI `PullImage`: the gRPC
//! frame and the `PullImageRequest` in it (`lazypull_cri_proxy::pull`),
//! whose credentials are handed to the daemon.
//!
//! Input: the request body as it arrives (frame header, then message).
//!
//! Properties: nothing panics; credentials come only with an image name;
//! their `Debug` (what the logs print) never shows the secret.
#![no_main]

use lazypull_cri_proxy::pull::pull_credentials;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(c)) = pull_credentials(data) {
        assert!(!c.image.is_empty(), "credentials without an image: {c:?}");
        // The secret is not in what the logs print: the Debug form does
        // not change with it.
        let mut other = c.clone();
        other.secret = format!("{}x", c.secret);
        assert_eq!(format!("{c:?}"), format!("{other:?}"), "Debug shows the secret");
    }
});
