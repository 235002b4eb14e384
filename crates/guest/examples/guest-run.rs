//! Runs a scenario script in the test guest: `cargo run -p lazypull-guest --example guest-run
//! -- SCRIPT [NAME=VALUE...]`. Prints the scenario's log; exits with its status.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let script = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: guest-run SCRIPT [NAME=VALUE...]"))?;
    let mut cfg = lazypull_guest::GuestConfig::new(lazypull_guest::kernel()?);
    for kv in args {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{kv}: expected NAME=VALUE"))?;
        cfg = cfg.env(k, v);
    }
    let run = lazypull_guest::run(std::path::Path::new(&script), &cfg)?;
    eprintln!(
        "guest-run: status {} (scenario started after {:?}, total {:?})",
        run.status, run.boot_time, run.elapsed
    );
    print!("{}", run.log);
    let status = run.status;
    drop(run); // removes the run's temporary directory; process::exit would skip that
    std::process::exit(status);
}
