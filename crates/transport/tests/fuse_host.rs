//! The FUSE transport against the host kernel: blobs served as files of a real
//! FUSE mount, a real EROFS mount over them (file-backed, data blobs as
//! `device=` files), the mounted tree compared with its source.
//!
//! Needs root, /dev/fuse and EROFS file-backed mounts (Linux 6.12+); without
//! them the tests FAIL with the reason, never skip.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lazypull_engine::FillPolicy;
use lazypull_erofs::{build_from_layers, BuildOptions, BuiltImage};
use lazypull_source::{BlobSource, LocalDir, OpenError};
use lazypull_testkit::maketree::{self, TreeOptions};
use lazypull_testkit::{compare_entries, format_differences, scan};
use lazypull_transport::fuse::{Config, FuseServer};
use lazypull_transport::Prefetch;

/// A blob that behaves like a remote one (no local file to read directly)
/// and counts the bytes read from it.
#[derive(Debug)]
struct Remote {
    inner: Arc<dyn BlobSource>,
    bytes: Arc<AtomicU64>,
}

impl BlobSource for Remote {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let n = self.inner.read_at(buf, off)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts FUSE and EROFS and must run as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "this test needs /dev/fuse (CONFIG_FUSE_FS)"
    );
}

struct Served {
    server: Arc<FuseServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(blobs: &Path, cache: &Path, mnt: &Path, fetched: Arc<AtomicU64>) -> Served {
        let store = LocalDir::new(blobs);
        let resolver = move |_v: &[u8], c: &[u8]| -> Result<Arc<dyn BlobSource>, OpenError> {
            Ok(Arc::new(Remote {
                inner: store.open(c)?,
                bytes: fetched.clone(),
            }))
        };
        let server = FuseServer::mount(
            Config {
                mountpoint: mnt.to_path_buf(),
                device: "/dev/fuse".into(),
                cache_dir: cache.to_path_buf(),
                threads: 4,
                policy: FillPolicy {
                    window: 256 << 10,
                    io_size: 256 << 10,
                },
                flush_interval: Duration::from_millis(200),
                recovery: lazypull_transport::fuse::Recovery::Auto,
                budget: None,
                readahead: lazypull_engine::DEFAULT_READAHEAD,
            },
            Arc::new(resolver),
        )
        .expect("mounting the FUSE blob transport");
        let server = Arc::new(server);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                s.serve(async {
                    let _ = rx.await;
                })
                .await
                .expect("serving");
            });
        });
        Served {
            server,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let _ = self.server.unmount();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

fn mount_erofs(img: &BuiltImage, blob_mnt: &Path, mnt: &Path) -> Mounted {
    fs::create_dir_all(mnt).unwrap();
    let devices: Vec<String> = img
        .blobs
        .iter()
        .map(|b| format!("device={}", blob_mnt.join(&b.digest).display()))
        .collect();
    let data = std::ffi::CString::new(devices.join(",")).unwrap();
    rustix::mount::mount(
        blob_mnt.join(&img.meta_digest),
        mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        data.as_c_str(),
    )
    .unwrap_or_else(|e| panic!("mounting EROFS over the FUSE blob files: {e}"));
    Mounted(mnt.to_path_buf())
}

fn drop_caches() {
    rustix::fs::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping caches (root)");
}

#[test]
fn a_realistic_image_reads_back_identical_and_then_from_the_local_cache() {
    require_root();
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    maketree::make_tree(
        &src,
        &TreeOptions {
            seed: 7,
            with_huge: false,
        },
    )
    .unwrap();
    let img =
        build_from_layers(std::slice::from_ref(&src), &out, &BuildOptions::default()).unwrap();
    let expected = scan(&src).unwrap();

    let fetched = Arc::new(AtomicU64::new(0));
    let (cache, blob_mnt, mnt) = (
        tmp.path().join("cache"),
        tmp.path().join("blobs"),
        tmp.path().join("mnt"),
    );
    let mut served = Served::start(&out, &cache, &blob_mnt, fetched.clone());
    let m = mount_erofs(&img, &blob_mnt, &mnt);
    let got = scan(&mnt).unwrap();
    let diffs = compare_entries(&expected, &got);
    assert!(
        diffs.is_empty(),
        "tree read through FUSE differs (A = source, B = mounted):\n{}",
        format_differences(&diffs, 30)
    );
    let after_first = fetched.load(Ordering::Relaxed);
    assert!(after_first > 0);
    // Read-ahead (on, 8 MiB) filled windows ahead of the walk, and no byte
    // of any blob was read from its source twice.
    let stored: u64 = std::iter::once(&img.meta_digest)
        .chain(img.blobs.iter().map(|b| &b.digest))
        .map(|d| fs::metadata(out.join(d)).unwrap().len())
        .sum();
    assert!(
        after_first <= stored,
        "{after_first} bytes read from blobs of {stored}: some twice"
    );
    let stats = served.server.stats().snapshot();
    assert!(stats.readahead_bytes > 0, "{stats:?}");
    assert!(
        stats.readahead_unused_bytes <= stats.readahead_bytes,
        "{stats:?}"
    );

    // The daemon's cache holds what was read: after dropping the kernel's
    // caches, a second full read fetches nothing.
    drop_caches();
    let again = scan(&mnt).unwrap();
    assert!(compare_entries(&expected, &again).is_empty());
    assert_eq!(
        fetched.load(Ordering::Relaxed),
        after_first,
        "the second read after drop_caches reached the backend"
    );
    let blobs = served.server.blobs().blobs();
    assert_eq!(blobs.len(), 1 + img.blobs.len(), "{blobs:#?}");
    drop(m);
    served.stop();

    // A new server on the same cache dir serves it all without fetching.
    let mut served = Served::start(&out, &cache, &blob_mnt, fetched.clone());
    let m = mount_erofs(&img, &blob_mnt, &mnt);
    drop_caches();
    assert!(compare_entries(&expected, &scan(&mnt).unwrap()).is_empty());
    assert_eq!(
        fetched.load(Ordering::Relaxed),
        after_first,
        "a restarted server fetched again what its cache held"
    );
    drop(m);
    served.stop();
}

#[test]
fn a_blob_that_fails_gives_eio_and_the_rest_keeps_serving() {
    require_root();
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    fs::create_dir_all(&src).unwrap();
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("a-small"), b"small file").unwrap(); // stored first, before the truncation
    let img =
        build_from_layers(std::slice::from_ref(&src), &out, &BuildOptions::default()).unwrap();
    let fetched = Arc::new(AtomicU64::new(0));
    let (cache, blob_mnt, mnt) = (
        tmp.path().join("cache"),
        tmp.path().join("blobs"),
        tmp.path().join("mnt"),
    );
    let mut served = Served::start(&out, &cache, &blob_mnt, fetched);
    let m = mount_erofs(&img, &blob_mnt, &mnt);
    // The data blob loses its tail under the daemon.
    let data = out.join(&img.blobs[0].digest);
    let len = fs::metadata(&data).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = fs::read(mnt.join("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(mnt.join("a-small")).unwrap(), b"small file");
    let stats = served.server.stats().snapshot();
    assert!(stats.read_failures > 0, "{stats:?}");
    // What was read correctly is cached; nothing past the truncation is.
    let info = served.server.blobs().blobs();
    let d = info.iter().find(|b| b.blob == img.blobs[0].digest).unwrap();
    assert!(d.cached_bytes <= len / 2, "{d:?}");
    drop(m);
    served.stop();
}
