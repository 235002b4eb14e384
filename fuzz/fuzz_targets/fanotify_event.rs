//! fanotify events as one `read(2)` of a group returns them
//! (`lazypull_fanotify::event::parse`), and the journal a daemon leaves for
//! its successor (`lazypull_fanotify::journal::Journal::open`).
//!
//! The first byte picks the input: even = an event buffer, odd = journal
//! text.
//!
//! Properties (events): parsing never panics and never reads past an event;
//! an accepted buffer yields at most one event per 24 bytes; every event
//! re-encoded in the kernel's layout (metadata plus one range record when
//! it has a range) parses back to itself.
//! Properties (journal): reading never panics; what it returns, journaled
//! again into a fresh file with `begin`, reads back the same.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use lazypull_fanotify::event::{
    self, Event, INFO_TYPE_RANGE, METADATA_LEN, METADATA_VERSION, RANGE_INFO_LEN,
};
use lazypull_fanotify::journal::Journal;
use libfuzzer_sys::fuzz_target;

fn encode(e: &Event) -> Vec<u8> {
    let len = METADATA_LEN + if e.range.is_some() { RANGE_INFO_LEN } else { 0 };
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.push(METADATA_VERSION);
    b.push(0);
    b.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
    b.extend_from_slice(&e.mask.to_ne_bytes());
    b.extend_from_slice(&e.fd.to_ne_bytes());
    b.extend_from_slice(&e.pid.to_ne_bytes());
    if let Some((offset, count)) = e.range {
        b.push(INFO_TYPE_RANGE);
        b.push(0);
        b.extend_from_slice(&(RANGE_INFO_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&offset.to_ne_bytes());
        b.extend_from_slice(&count.to_ne_bytes());
    }
    b
}

/// A scratch directory under `$TMPDIR` (scripts/fuzz.sh points it at a
/// directory it removes afterwards), made once per process.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("lazypull-fuzz-fanotify-")
            .tempdir()
            .expect("scratch directory");
        let path = dir.path().to_path_buf();
        (dir, path)
    })
    .1
}

fn journal(text: &[u8]) {
    let dir = scratch();
    let path = dir.join("journal");
    std::fs::write(&path, text).expect("write journal");
    let records = match Journal::open(&path) {
        Ok((_, records)) => records,
        // Not UTF-8: refused as a whole.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return,
        Err(e) => panic!("opening the journal: {e}"),
    };
    for r in &records {
        assert!(!r.key.contains('\n'), "{r:?}");
    }
    let again = dir.join("again");
    let _ = std::fs::remove_file(&again);
    let (mut j, none) = Journal::open(&again).expect("fresh journal");
    assert!(none.is_empty());
    for r in &records {
        j.begin(r).expect("begin");
    }
    drop(j);
    let (_, back) = Journal::open(&again).expect("reopen");
    assert_eq!(back, records);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        journal(rest);
        return;
    }
    match event::parse(rest) {
        Ok(events) => {
            assert!(events.len() <= rest.len() / METADATA_LEN);
            for e in &events {
                assert_eq!(
                    event::parse(&encode(e)).as_deref(),
                    Ok(std::slice::from_ref(e))
                );
                let _ = (e.is_pre_access(), e.is_overflow());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
