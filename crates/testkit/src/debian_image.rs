//! Realistic images built from Debian packages with `mmdebstrap`, for the
//! time-to-ready benchmark (`lazypull-bench startup`) and its smoke test.
//!
//! Each [`Workload`] names the packages of a Debian bookworm `minbase` root
//! file system (`mmdebstrap --variant=minbase --include=...`, root mode,
//! written straight to a tar) and a shell command that makes the container
//! "ready" and then prints [`Workload::ready_line`]:
//! - `python`: python3 + numpy; imports numpy, multiplies two matrices;
//! - `gcc`: gcc + libc6-dev; compiles and runs hello.c;
//! - `postgres`: postgresql-15; initdb, the server up, `select 1` answered;
//! - `bloated`: the python workload's packages plus about 1 GB of packages
//!   it never touches (fonts, LLVM, Boost, gfortran).
//!
//! The root file systems are cached outside the clone, in [`CACHE_DIR`], as
//! `<name>-<key>.tar` (key: the first 16 hex digits of the SHA-256 of the
//! suite, variant and package list, so another list is another file), and
//! their gzip layer beside it (`.tar.gz`, with its digests in
//! `.tar.gz.digests`); each is built only when missing. Building needs
//! root, `mmdebstrap` (Debian's package) and Debian's archive
//! (`http://deb.debian.org/debian`): a missing tool is an error naming the
//! package. A build takes from a minute (python, gcc, postgres) to several
//! (bloated, some 300 MB of downloads).
//!
//! The image ([`image`]) is one gzip layer (the whole root file system) and
//! a runtime config whose `Cmd` is the ready command under `/bin/sh -c`.

use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::oci_image::{Image, Layer};

/// Where root file systems and layers are cached.
pub const CACHE_DIR: &str = "/var/cache/lazypull-bench/images";

/// The Debian suite the images are built from.
const SUITE: &str = "bookworm";
/// `mmdebstrap --variant`.
const VARIANT: &str = "minbase";
/// The archive.
const MIRROR: &str = "http://deb.debian.org/debian";

/// One benchmark workload: an image's packages and what "ready" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Short name (`python`, `gcc`, `postgres`, `bloated`).
    pub name: &'static str,
    /// `mmdebstrap --include=` (on top of `minbase`).
    pub includes: &'static [&'static str],
    /// Shell command (`/bin/sh -c`) that makes the container ready and then
    /// prints [`ready_line`](Self::ready_line) as its last line.
    pub ready: &'static str,
    /// What the ready command prints when it is done.
    pub ready_line: &'static str,
}

const PYTHON_READY: &str = "python3 -c 'import numpy as np; a = np.ones((300, 300)); \
     b = a @ a; print(\"READY python\", int(b[0, 0]))'";

/// python3 + numpy: `import numpy`, a matrix product, print.
pub const PYTHON: Workload = Workload {
    name: "python",
    includes: &["python3", "python3-numpy"],
    ready: PYTHON_READY,
    ready_line: "READY python 300",
};

/// gcc: compile and run hello.c.
pub const GCC: Workload = Workload {
    name: "gcc",
    includes: &["gcc", "libc6-dev"],
    ready: "printf '#include <stdio.h>\\nint main(void) { puts(\"READY gcc\"); return 0; }\\n' \
            > /tmp/hello.c && gcc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello",
    ready_line: "READY gcc",
};

/// postgresql: initdb, the server up, `select 1` answered.
///
/// As user `postgres` (the package's postinst creates it; initdb refuses
/// root), data and socket in `/tmp`, no TCP listener.
pub const POSTGRES: Workload = Workload {
    name: "postgres",
    includes: &["postgresql-15"],
    ready: "su postgres -s /bin/sh -c '\
            B=/usr/lib/postgresql/15/bin; \
            $B/initdb -D /tmp/pg >/dev/null && \
            $B/pg_ctl -D /tmp/pg -w -o \"-k /tmp -c listen_addresses=\" -l /tmp/pg.log start >/dev/null && \
            psql -h /tmp -At -c \"select 1\" postgres' | sed 's/^/READY postgres /'",
    ready_line: "READY postgres 1",
};

/// The python workload in an image with about 1 GB more of packages it
/// never touches.
pub const BLOATED: Workload = Workload {
    name: "bloated",
    includes: &[
        "python3",
        "python3-numpy",
        "fonts-noto-extra",
        "llvm-15-dev",
        "libboost1.81-all-dev",
        "gfortran-12",
    ],
    ready: PYTHON_READY,
    ready_line: "READY python 300",
};

/// Every workload, smallest first.
pub const ALL: [Workload; 4] = [GCC, POSTGRES, PYTHON, BLOATED];

/// The workload called `name`.
pub fn workload(name: &str) -> Option<Workload> {
    ALL.into_iter().find(|w| w.name == name)
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl Workload {
    /// The cache key: 16 hex digits of SHA-256("suite\nvariant\nincludes"),
    /// the includes joined by commas.
    pub fn key(&self) -> String {
        let text = format!("{SUITE}\n{VARIANT}\n{}", self.includes.join(","));
        hex::encode(Sha256::digest(text.as_bytes()))[..16].to_owned()
    }

    /// `CACHE_DIR/<name>-<key>.tar`.
    pub fn tar_path(&self) -> PathBuf {
        Path::new(CACHE_DIR).join(format!("{}-{}.tar", self.name, self.key()))
    }

    /// The root file system as a tar, built with mmdebstrap if it is not
    /// in the cache yet (into a temporary name, renamed when complete: an
    /// interrupted build leaves no tar that looks finished).
    pub fn rootfs_tar(&self) -> io::Result<PathBuf> {
        let tar = self.tar_path();
        if tar.is_file() {
            return Ok(tar);
        }
        let mmdebstrap = crate::containerd::find("mmdebstrap", "mmdebstrap")?;
        if !rustix::process::geteuid().is_root() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "building images with mmdebstrap (root mode) needs root",
            ));
        }
        fs::create_dir_all(CACHE_DIR)?;
        let tmp = tar.with_extension("tar.part");
        let log = tar.with_extension("log");
        eprintln!(
            "building {} with mmdebstrap (log: {})",
            tar.display(),
            log.display()
        );
        let logfile = fs::File::create(&log)?;
        let status = Command::new(mmdebstrap)
            .args([
                "--mode=root",
                "--format=tar",
                &format!("--variant={VARIANT}"),
                &format!("--include={}", self.includes.join(",")),
                SUITE,
            ])
            .arg(&tmp)
            .arg(MIRROR)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile)
            .status()?;
        if !status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(other(format!(
                "mmdebstrap for the {} image failed ({status}); see {}",
                self.name,
                log.display()
            )));
        }
        fs::rename(&tmp, &tar)?;
        Ok(tar)
    }

    /// The gzip layer of the root file system (cached beside the tar).
    pub fn layer(&self) -> io::Result<Layer> {
        let tar = self.rootfs_tar()?;
        let gz = tar.with_extension("tar.gz");
        let digests = tar.with_extension("tar.gz.digests");
        if let (Ok(blob), Ok(text)) = (fs::read(&gz), fs::read_to_string(&digests)) {
            if let Some((digest, diff_id)) = text.trim().split_once(' ') {
                if crate::oci_image::sha256_digest(&blob) == digest {
                    return Ok(Layer {
                        blob,
                        digest: digest.to_owned(),
                        diff_id: diff_id.to_owned(),
                    });
                }
            }
        }
        eprintln!("compressing {} (gzip)", tar.display());
        let mut input = BufReader::with_capacity(1 << 20, fs::File::open(&tar)?);
        let mut diff = Sha256::new();
        let mut gz_out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            diff.update(&buf[..n]);
            gz_out.write_all(&buf[..n])?;
        }
        let blob = gz_out.finish()?;
        let layer = Layer {
            digest: crate::oci_image::sha256_digest(&blob),
            diff_id: format!("sha256:{}", hex::encode(diff.finalize())),
            blob,
        };
        let tmp = gz.with_extension("gz.part");
        let mut w = BufWriter::new(fs::File::create(&tmp)?);
        w.write_all(&layer.blob)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, &gz)?;
        fs::write(&digests, format!("{} {}\n", layer.digest, layer.diff_id))?;
        Ok(layer)
    }

    /// The ordinary OCI image: one gzip layer, `Cmd` the ready command.
    pub fn image(&self) -> io::Result<Image> {
        Image::new(
            vec![self.layer()?],
            serde_json::json!({
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh", "-c", self.ready],
                "WorkingDir": "/",
            }),
        )
    }

    /// Bytes of the uncompressed root file system (the tar's size).
    pub fn tar_bytes(&self) -> io::Result<u64> {
        Ok(fs::metadata(self.rootfs_tar()?)?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_package_list() {
        // The same formula as a shell's
        // `printf 'bookworm\nminbase\n%s' python3,python3-numpy | sha256sum`.
        let text = "bookworm\nminbase\npython3,python3-numpy";
        assert_eq!(
            PYTHON.key(),
            hex::encode(Sha256::digest(text.as_bytes()))[..16]
        );
        assert_ne!(PYTHON.key(), BLOATED.key());
        assert!(PYTHON
            .tar_path()
            .starts_with("/var/cache/lazypull-bench/images"));
        assert_eq!(workload("gcc"), Some(GCC));
        assert_eq!(workload("nope"), None);
    }
}
