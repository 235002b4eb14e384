//! FUSE requests as one `read()` of `/dev/fuse` returns them
//! (`lazypull_fuse::abi::parse` and `abi::header`).
//!
//! Properties: parsing never panics; `header` and `parse` agree on the
//! header; a refused request carries the `unique` exactly when the header
//! was readable (so the daemon can answer it with EIO); names point into
//! the input and hold no NUL; a batch forget never yields more pairs than
//! the bytes hold; `wants_reply` is the opcode's.
#![no_main]

use lazypull_fuse::abi::{self, Operation, ParseError, IN_HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let header = abi::header(data);
    assert_eq!(header.is_some(), data.len() >= IN_HEADER_SIZE);
    match abi::parse(data) {
        Ok(req) => {
            let h = header.expect("parse accepted a request without a header");
            assert_eq!(req.header, h);
            assert_eq!(h.len as usize, data.len());
            assert_eq!(req.wants_reply(), abi::wants_reply(h.opcode));
            let body = data.len() - IN_HEADER_SIZE;
            match &req.op {
                Operation::Lookup { name } => {
                    assert!(!name.contains(&0));
                    assert!(name.len() < body);
                }
                Operation::BatchForget { forgets } => {
                    assert!(8 + forgets.len() * 16 <= body);
                }
                _ => {}
            }
            let _ = h.to_string();
        }
        Err(e) => {
            assert_eq!(e.unique().is_some(), header.is_some(), "{e:?}");
            if let (Some(u), Some(h)) = (e.unique(), header) {
                assert_eq!(u, h.unique);
            }
            if let ParseError::ShortHeader { got } = e {
                assert_eq!(got, data.len());
            }
            let _ = e.to_string();
        }
    }
});
