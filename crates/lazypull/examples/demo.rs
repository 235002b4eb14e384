//! `lazypull demo` inside the Linux 6.12 test guest, whose kernel has
//! cachefiles on-demand mode (this host's has not): the same demo as on the
//! host, served through the cachefiles transport. Run by `scripts/demo.sh --guest`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazypull_guest::{Disk, GuestConfig};

fn main() -> Result<()> {
    lazypull_guest::require_root()?;
    // target/<profile>/examples/demo -> target/<profile>/lazypull
    let exe = std::env::current_exe()?;
    let lazypull = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("lazypull"))
        .context("locating the lazypull binary")?;
    if !lazypull.exists() {
        bail!(
            "{} not built: run scripts/demo.sh --guest (it builds it)",
            lazypull.display()
        );
    }
    let kernel = lazypull_guest::kernel()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guest-demo.sh");
    let cfg = GuestConfig::new(&kernel)
        .name("demo")
        .timeout(Duration::from_secs(900))
        .disk(Disk::EmptyExt4 { size_mib: 1024 })
        .env("LP_BIN", lazypull.to_str().unwrap())
        .env("LP_TRANSPORT", "cachefiles");
    println!("booting the Linux 6.12 guest (qemu, software emulation: slower than the host)...");
    let run = lazypull_guest::run(&script, &cfg)?;
    print!("{}", run.read_out("demo.out").unwrap_or_default());
    eprint!("{}", run.read_out("demo.err").unwrap_or_default());
    if run.status != 0 {
        bail!("the demo failed in the guest:\n{}", run.log);
    }
    Ok(())
}
