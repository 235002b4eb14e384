//! cachefiles on-demand requests as one `read()` of `/dev/cachefiles`
//! returns them (`lazypull_cachefiles::msg::parse`).
//!
//! Properties: parsing never panics; an accepted message re-encodes to
//! exactly the input bytes (the format has no slack: no padding, no
//! trailing bytes) and parses again to the same request; a refused one
//! names its msg_id exactly when the header was readable; the accessors the
//! daemon uses (`end`, `volume`, `cookie`, `Display`) are total on whatever
//! parse accepts.
#![no_main]

use lazypull_cachefiles::msg::{self, ParseError, Request, MSG_HEADER_SIZE, MSG_MAX_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match msg::parse(data) {
        Ok(req) => {
            assert!(data.len() >= MSG_HEADER_SIZE && data.len() <= MSG_MAX_SIZE);
            let bytes = msg::encode(&req);
            assert_eq!(bytes, data, "encode(parse(x)) != x for {req:?}");
            assert_eq!(msg::parse(&bytes).as_ref(), Ok(&req));
            assert_eq!(
                u32::from_le_bytes(data[0..4].try_into().unwrap()),
                req.msg_id()
            );
            assert_eq!(
                u32::from_le_bytes(data[12..16].try_into().unwrap()),
                req.object_id()
            );
            match &req {
                Request::Open(o) => {
                    assert!(o.volume().len() <= o.volume_key.len());
                    assert!(o.cookie().len() <= o.cookie_key.len());
                }
                Request::Read(r) => assert!(r.end() >= r.off),
                Request::Close(_) => {}
            }
            let _ = req.to_string();
        }
        Err(e) => {
            let readable = data.len() >= MSG_HEADER_SIZE
                && data.len() <= MSG_MAX_SIZE
                && !matches!(e, ParseError::LengthMismatch { .. });
            assert_eq!(e.msg_id().is_some(), readable, "{e:?}");
            if let Some(id) = e.msg_id() {
                assert_eq!(u32::from_le_bytes(data[0..4].try_into().unwrap()), id);
            }
            let _ = e.to_string();
        }
    }
});
