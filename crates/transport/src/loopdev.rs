//! Read-only loop devices over blob files, for kernels whose EROFS mounts
//! block devices only (Linux 5.16–6.11: extra devices, but no file-backed
//! mounts).
//!
//! [`attach`] backs a free loop device (`LOOP_CTL_GET_FREE` on
//! `/dev/loop-control`) with a file in one `LOOP_CONFIGURE` (Linux 5.8+),
//! read-only and autoclear: the kernel detaches the device when its last
//! opener closes it. So whoever mounts holds the [`LoopDevice`] until
//! mount(2) has opened the device and then drops it; from then on the EROFS
//! mount is the only opener, and its unmount releases the device. A process
//! that dies between attach and mount leaves nothing behind either: its fd
//! closes and the device clears.
//!
//! [`attached`] lists the loop devices bound now with their backing files
//! (`/sys/block/loopN/loop/backing_file`): how a successor daemon finds the
//! devices its predecessor's mounts hold over its FUSE files.
//!
//! Direct I/O (`LO_FLAGS_DIRECT_IO`): by default the loop driver reads its
//! backing file through that file's page cache, and the block device has a
//! page cache of its own, so a blob byte can sit in memory twice (three times
//! counting the daemon's cache file). With direct I/O the loop driver reads
//! the FUSE file with `IOCB_DIRECT`, which FUSE turns into a READ of the
//! daemon without caching it, so only the block device's cache is left.
//! FUSE files accept O_DIRECT (fuse's `direct_IO` address-space op). The
//! kernel decides whether the device really uses it (it needs the request
//! alignment to fit the backing file); [`LoopDevice::direct_io`] reports
//! what it chose (`/sys/block/loopN/loop/dio`).
//!
//! `lazypull mount` asks for it when the daemon's `loop_direct_io` key is
//! set (the mount plan carries it); off by default. Checked on Linux 6.18:
//! asked for, the kernel turns it on for loop devices over the FUSE blob
//! files and the bytes read back right. Measured (BENCHMARKS.md): not slower,
//! warm small-file reads faster (one page cache fewer), cold reads even, on
//! a noisy host; with direct I/O every block-layer read (128 KiB read-ahead
//! by default) becomes a FUSE READ of its own, where buffered reads get
//! FUSE's larger read-ahead READs. Buffered stays the default (the path the
//! failover and container tests run) until an idle-machine run says more.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The loop control device.
pub const CONTROL: &str = "/dev/loop-control";

// include/uapi/linux/loop.h
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
/// The device refuses writes.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// Detached when its last opener closes it.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Reads the backing file with direct I/O.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// `struct loop_info64` of include/uapi/linux/loop.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` of include/uapi/linux/loop.h (the `LOOP_CONFIGURE`
/// argument).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopConfig {
    fn zeroed() -> Self {
        LoopConfig {
            fd: 0,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: 0,
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        }
    }
}

/// How a loop device is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Ask for direct I/O on the backing file (see the module docs).
    pub direct_io: bool,
}

/// Why a loop device could not be attached; the message names the cause.
#[derive(Debug)]
pub struct LoopError(String, Option<i32>);

impl LoopError {
    fn io(what: String, e: &io::Error) -> Self {
        LoopError(format!("{what}: {e}"), e.raw_os_error())
    }

    /// The errno behind it, if a system call failed.
    pub fn errno(&self) -> Option<i32> {
        self.1
    }
}

impl std::fmt::Display for LoopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoopError {}

/// A loop device this process attached and still holds open. Dropping it
/// closes that fd: the device is released then unless something else (a
/// mount) opened it meanwhile.
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    path: PathBuf,
    _fd: OwnedFd,
}

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether the kernel reads its backing file with direct I/O.
    pub fn direct_io(&self) -> bool {
        sysfs(self.number, "dio").is_some_and(|s| s.trim() == "1")
    }
}

fn sysfs(number: u32, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/loop{number}/loop/{attr}")).ok()
}

/// How often a free device is asked for when another process takes the one
/// offered first (`LOOP_CTL_GET_FREE` reserves nothing).
const ATTEMPTS: usize = 8;

/// Attaches `backing` (opened read-only) to a free loop device, read-only
/// and autoclear.
pub fn attach(backing: &Path, options: Options) -> Result<LoopDevice, LoopError> {
    let file = File::open(backing).map_err(|e| {
        LoopError::io(
            format!("opening {} for a loop device", backing.display()),
            &e,
        )
    })?;
    let size = file
        .metadata()
        .map_err(|e| LoopError::io(format!("stat of {}", backing.display()), &e))?
        .len();
    // A loop device has whole 512-byte sectors: a tail beyond the last one
    // would be cut off, and EROFS would read past the device's end.
    if !size.is_multiple_of(512) {
        return Err(LoopError(
            format!(
                "{} is {size} bytes, not a whole number of 512-byte sectors: a loop device would cut off its tail",
                backing.display()
            ),
            None,
        ));
    }
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(CONTROL)
        .map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound {
                " (this kernel has no loop driver: CONFIG_BLK_DEV_LOOP, or `modprobe loop`)"
            } else {
                ""
            };
            LoopError::io(format!("opening {CONTROL}{hint}"), &e)
        })?;
    let mut config = LoopConfig::zeroed();
    config.fd = u32::try_from(file.as_raw_fd()).expect("an fd is not negative");
    config.info.lo_flags = LO_FLAGS_READ_ONLY
        | LO_FLAGS_AUTOCLEAR
        | if options.direct_io {
            LO_FLAGS_DIRECT_IO
        } else {
            0
        };
    // Informational only (losetup shows it); the kernel keeps the file itself.
    let name = backing.as_os_str().as_encoded_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    config.info.lo_file_name[..n].copy_from_slice(&name[..n]);

    let mut last = None;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device
        // number (or -1 with errno); `control` is an open fd.
        let free = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if free < 0 {
            let e = io::Error::last_os_error();
            return Err(LoopError::io(
                format!(
                    "asking {CONTROL} for a free loop device (none free, or max_loop reached?)"
                ),
                &e,
            ));
        }
        let number = free as u32;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        // Read-only: the device is only ever read, and LOOP_CONFIGURE does
        // not need write access to it.
        let dev = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(d) => d,
            Err(e) => return Err(LoopError::io(format!("opening {}", path.display()), &e)),
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, whose layout
        // `LoopConfig` mirrors (size checked in the tests); `config` lives
        // across the call and the kernel does not keep the pointer.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                LOOP_CONFIGURE,
                &config as *const LoopConfig,
            )
        };
        if r == 0 {
            return Ok(LoopDevice {
                number,
                path,
                _fd: dev.into(),
            });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            // Another process bound it between GET_FREE and CONFIGURE.
            last = Some(e);
            continue;
        }
        let hint = if e.raw_os_error() == Some(libc::EINVAL) {
            " (LOOP_CONFIGURE needs Linux 5.8+)"
        } else {
            ""
        };
        return Err(LoopError::io(
            format!("binding {} to {}{hint}", path.display(), backing.display()),
            &e,
        ));
    }
    Err(LoopError::io(
        format!(
            "binding a loop device to {}: every free device was taken by another process first ({ATTEMPTS} tries)",
            backing.display()
        ),
        &last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

/// A loop device bound now, and its backing file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attached {
    pub device: PathBuf,
    pub backing_file: PathBuf,
    pub read_only: bool,
    pub autoclear: bool,
    pub direct_io: bool,
}

/// Every loop device bound now (a device without a backing file is free).
pub fn attached() -> io::Result<Vec<Attached>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/block")? {
        let name = entry?.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Absent while the device is free; it can also go away under us.
        let Some(backing) = sysfs(number, "backing_file") else {
            continue;
        };
        let flag = |attr: &str| sysfs(number, attr).is_some_and(|s| s.trim() == "1");
        out.push(Attached {
            device: PathBuf::from(format!("/dev/loop{number}")),
            // The kernel's d_path; a deleted file gets " (deleted)".
            backing_file: PathBuf::from(backing.trim_end_matches('\n')),
            read_only: sysfs(number, "../ro").is_some_and(|s| s.trim() == "1"),
            autoclear: flag("autoclear"),
            direct_io: flag("dio"),
        });
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(out)
}

/// The bound loop devices whose backing files lie in `dir`.
pub fn attached_under(dir: &Path) -> io::Result<Vec<Attached>> {
    Ok(attached()?
        .into_iter()
        .filter(|a| a.backing_file.starts_with(dir))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The sizes and offsets of include/uapi/linux/loop.h on every Linux ABI
    /// (all fields are fixed-width, no padding).
    #[test]
    fn structs_match_the_kernel_layout() {
        assert_eq!(size_of::<LoopInfo64>(), 232);
        assert_eq!(offset_of!(LoopInfo64, lo_number), 40);
        assert_eq!(offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(offset_of!(LoopInfo64, lo_init), 216);
        assert_eq!(size_of::<LoopConfig>(), 304);
        assert_eq!(offset_of!(LoopConfig, info), 8);
        assert_eq!(offset_of!(LoopConfig, reserved), 240);
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // _IO('L', 0x0A) and _IO('L', 0x82): no size or direction bits.
        assert_eq!(LOOP_CONFIGURE, (b'L' as libc::c_ulong) << 8 | 0x0A);
        assert_eq!(LOOP_CTL_GET_FREE, (b'L' as libc::c_ulong) << 8 | 0x82);
    }

    #[test]
    fn a_file_of_partial_sectors_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("odd");
        std::fs::write(&f, vec![0u8; 4097]).unwrap();
        let e = attach(&f, Options { direct_io: false }).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a whole number of 512-byte sectors"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = attach(Path::new("/nonexistent/blob"), Options { direct_io: false }).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("opening /nonexistent/blob for a loop device: "),
            "{e}"
        );
        assert_eq!(e.errno(), Some(libc::ENOENT));
    }

    /// A real attach on this host (root, /dev/loop-control): read-only,
    /// autoclear, the same bytes as the file, released when dropped.
    #[test]
    fn attach_reads_the_file_and_is_released_when_dropped() {
        assert!(
            rustix::process::geteuid().is_root() && Path::new(CONTROL).exists(),
            "this test attaches a loop device: run it as root on a kernel with {CONTROL}"
        );
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = dir.path().join("blob");
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        std::fs::write(&f, &data).unwrap();
        let dev = attach(&f, Options { direct_io: false }).unwrap();
        let listed = attached_under(dir.path()).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].device, dev.path());
        assert!(listed[0].read_only && listed[0].autoclear, "{listed:?}");
        assert_eq!(std::fs::read(dev.path()).unwrap(), data);
        // The kernel lets a read-only disk be opened for writing; the write
        // itself is refused.
        use std::io::Write;
        let mut w = OpenOptions::new().write(true).open(dev.path()).unwrap();
        let e = w
            .write_all(&[1u8; 4096])
            .and_then(|()| w.sync_all())
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        drop(w);
        drop(dev);
        // Released at the last close (synchronously on 6.x; polled anyway).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !attached_under(dir.path()).unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "not released when its only opener closed it: {:?}",
                attached_under(dir.path())
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
