//! The lazypull demo, run by `scripts/demo.sh`: a sample image built with
//! lazypull's own builder, served lazily through cachefiles in the Linux 6.12
//! test guest (this host's kernel has no cachefiles), a few files read, and what
//! was fetched compared with the image's size. The native `lazypull demo` on the
//! host arrives with the FUSE transport.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazypull_guest::{Disk, GuestConfig};

fn main() -> Result<()> {
    lazypull_guest::require_root()?;
    // target/<profile>/examples/demo -> target/<profile>/lazypull
    let exe = std::env::current_exe()?;
    let daemon = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("lazypull"))
        .context("locating the lazypull binary")?;
    if !daemon.exists() {
        bail!(
            "{} not built: run scripts/demo.sh (it builds it)",
            daemon.display()
        );
    }
    let work = tempfile::tempdir()?;
    let tree = work.path().join("sample");
    // The embedded sample: a deterministic tree with every kind of entry, plus a
    // few large files that a lazy mount should not fetch.
    lazypull_testkit::maketree::make_tree(
        &tree,
        &lazypull_testkit::maketree::TreeOptions {
            seed: 1,
            with_huge: false,
        },
    )
    .context("making the sample tree")?;
    for i in 0..4u64 {
        let mut x = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1) | 1;
        let data: Vec<u8> = (0..32 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::create_dir_all(tree.join("large"))?;
        fs::write(tree.join(format!("large/blob-{i}.bin")), data)?;
    }
    fs::write(
        tree.join("README.txt"),
        "Hello from a lazily pulled image.\n",
    )?;
    fs::create_dir_all(tree.join("etc"))?;
    fs::write(
        tree.join("etc/motd"),
        "Only the bytes you read are fetched.\n",
    )?;
    fs::write(tree.join("etc/hostname"), "lazypull-demo\n")?;
    let blobs = work.path().join("blobs");
    let img = lazypull_erofs::build_from_layers(
        std::slice::from_ref(&tree),
        &blobs,
        &Default::default(),
    )?;
    fs::remove_file(blobs.join("manifest.json"))?;
    let data_size: u64 = img.blobs.iter().map(|b| b.size).sum();
    let info = work.path().join("info");
    fs::create_dir_all(&info)?;
    fs::write(info.join("meta"), &img.meta_digest)?;
    fs::write(
        info.join("read-list"),
        "README.txt\netc/motd\netc/hostname\n",
    )?;
    println!(
        "built the sample image: {} files, meta blob {} KiB, {} data blob(s) {:.1} MiB",
        img.files,
        img.meta_size / 1024,
        img.blobs.len(),
        data_size as f64 / (1 << 20) as f64
    );
    println!("booting the Linux 6.12 guest (qemu TCG) and serving the image lazily...");
    let kernel = lazypull_guest::kernel()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guest-demo.sh");
    let cfg = GuestConfig::new(kernel)
        .name("lazypull-demo")
        .timeout(Duration::from_secs(600))
        .disk(Disk::Ext4From {
            dir: blobs,
            extra_mib: 16,
        })
        .disk(Disk::EmptyExt4 { size_mib: 512 })
        .env("LP_BIN", daemon.to_str().context("utf-8 path")?)
        .env("LP_DEMO", info.to_str().context("utf-8 path")?);
    let run = lazypull_guest::run(&script, &cfg)?;
    print!("{}", run.log);
    if run.status != 0 {
        bail!("the demo failed in the guest (status {})", run.status);
    }
    let log = run.read_out("daemon.log")?;
    let fetched: u64 = log
        .lines()
        .find(|l| l.contains("lazypull daemon exiting"))
        .and_then(|l| l.split("bytes_written=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("the daemon's exit line with bytes_written")?;
    let reads = log
        .lines()
        .filter(|l| l.contains("OPEN: serving blob"))
        .count();
    let total = img.meta_size + data_size;
    println!(
        "fetched {:.2} MiB of a {:.1} MiB image ({:.1}%; whole 1 MiB windows) from {} blob(s); the rest was never read",
        fetched as f64 / (1 << 20) as f64,
        total as f64 / (1 << 20) as f64,
        100.0 * fetched as f64 / total as f64,
        reads
    );
    Ok(())
}
