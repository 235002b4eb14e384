//! The fanotify transport against the host kernel (Linux 6.14+): data blobs
//! as sparse cache files marked for pre-content events, a real EROFS mount
//! over them (file-backed, the meta blob complete, the cache files as
//! `device=`), the mounted tree compared with its source.
//!
//! Needs root and a kernel with pre-content events; without them the tests
//! FAIL with the reason, never skip.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use lazypull_engine::{FillPolicy, NO_BINDING};
use lazypull_erofs::{build_from_layers, BuildOptions, BuiltImage};
use lazypull_source::{BlobSource, LocalDir};
use lazypull_testkit::maketree::{self, TreeOptions};
use lazypull_testkit::{compare_entries, format_differences, scan};
use lazypull_transport::fanotify::{Config, FanotifyServer};

/// A blob read as if remote, counting its bytes; `broken` makes it fail.
#[derive(Debug)]
struct Remote {
    inner: Arc<dyn BlobSource>,
    bytes: Arc<AtomicU64>,
    broken: Arc<AtomicBool>,
}

impl BlobSource for Remote {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(io::Error::other("the backend is down (test)"));
        }
        let n = self.inner.read_at(buf, off)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test marks files with fanotify and mounts EROFS: run it as root"
    );
}

struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

fn drop_caches() {
    rustix::fs::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping caches (root)");
}

struct Setup {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    img: BuiltImage,
    out: PathBuf,
    server: Arc<FanotifyServer>,
    devices: Vec<PathBuf>,
    fetched: Arc<AtomicU64>,
    broken: Arc<AtomicBool>,
    mnt: PathBuf,
}

fn setup(seed: u64) -> Setup {
    require_root();
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    maketree::make_tree(
        &src,
        &TreeOptions {
            seed,
            with_huge: false,
        },
    )
    .unwrap();
    let img =
        build_from_layers(std::slice::from_ref(&src), &out, &BuildOptions::default()).unwrap();
    let server = FanotifyServer::new(
        Config {
            cache_dir: tmp.path().join("cache"),
            policy: FillPolicy {
                window: 256 << 10,
                io_size: 256 << 10,
            },
            threads: 2,
            readahead: 0,
            budget: None,
            journal: tmp.path().join("journal"),
        },
        None,
    )
    .expect("a fanotify pre-content group (Linux 6.14+, root)");
    let (fetched, broken) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let store = LocalDir::new(&out);
    let devices = img
        .blobs
        .iter()
        .map(|b| {
            let inner = store.open(b.digest.as_bytes()).unwrap();
            server
                .add_blob(
                    Arc::new(Remote {
                        inner,
                        bytes: fetched.clone(),
                        broken: broken.clone(),
                    }),
                    NO_BINDING,
                )
                .unwrap()
        })
        .collect();
    server.serve().unwrap();
    let mnt = tmp.path().join("mnt");
    Setup {
        _tmp: tmp,
        src,
        img,
        out,
        server,
        devices,
        fetched,
        broken,
        mnt,
    }
}

fn mount_erofs(s: &Setup) -> Mounted {
    fs::create_dir_all(&s.mnt).unwrap();
    let devices: Vec<String> = s
        .devices
        .iter()
        .map(|p| format!("device={}", p.display()))
        .collect();
    let data = std::ffi::CString::new(devices.join(",")).unwrap();
    rustix::mount::mount(
        s.out.join(&s.img.meta_digest),
        &s.mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        data.as_c_str(),
    )
    .unwrap_or_else(|e| panic!("mounting EROFS over the cache files: {e}"));
    Mounted(s.mnt.clone())
}

fn stored_bytes(s: &Setup) -> u64 {
    s.img
        .blobs
        .iter()
        .map(|b| fs::metadata(s.out.join(&b.digest)).unwrap().len())
        .sum()
}

#[test]
fn a_realistic_image_reads_back_identical_and_warm_reads_never_leave_the_kernel() {
    let s = setup(11);
    let expected = scan(&s.src).unwrap();
    let m = mount_erofs(&s);
    drop_caches();
    let got = scan(&s.mnt).unwrap();
    let diffs = compare_entries(&expected, &got);
    assert!(
        diffs.is_empty(),
        "tree read through fanotify differs (A = source, B = mounted):\n{}",
        format_differences(&diffs, 30)
    );
    let first = s.fetched.load(Ordering::Relaxed);
    assert!(first > 0, "the data came from the backend");
    assert!(first <= stored_bytes(&s), "no byte fetched twice");
    let events = s.server.stats.events.load(Ordering::Relaxed);
    assert!(events > 0);

    // Warm: the cache files hold what was read; after dropping the kernel's
    // caches the same reads raise no event the server has to fill.
    drop_caches();
    assert!(compare_entries(&expected, &scan(&s.mnt).unwrap()).is_empty());
    assert_eq!(
        s.fetched.load(Ordering::Relaxed),
        first,
        "warm reads fetched"
    );
    drop(m);
    s.server.stop();
}

#[test]
fn a_backend_that_fails_gives_the_reader_eio_never_zeros() {
    let s = setup(12);
    s.broken.store(true, Ordering::Relaxed);
    let m = mount_erofs(&s);
    drop_caches();
    // Every regular file with data: reading it fails with EIO (none reads
    // back as zeros from the holes).
    let mut failed = 0;
    for e in walk(&s.mnt) {
        let want = fs::read(s.src.join(e.strip_prefix(&s.mnt).unwrap())).unwrap();
        if want.len() < 8192 {
            continue; // inline in the meta blob: no data blob read
        }
        match fs::read(&e) {
            Ok(got) => assert!(got == want, "{}: wrong bytes", e.display()),
            Err(err) => {
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::EIO),
                    "{}: {err}",
                    e.display()
                );
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "some reads reached the broken backend");
    assert!(s.server.stats.denied.load(Ordering::Relaxed) > 0);
    // The backend comes back: the same reads now succeed.
    s.broken.store(false, Ordering::Relaxed);
    let expected = scan(&s.src).unwrap();
    assert!(compare_entries(&expected, &scan(&s.mnt).unwrap()).is_empty());
    drop(m);
    s.server.stop();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}
