//! Tracing setup: levels from `--log-level` or `LAZYPULL_LOG`, text or JSON
//! lines on stderr. Set up once, by the binary, before any command runs.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub fn init(level: Option<&str>, format: Format) -> anyhow::Result<()> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).with_context(|| format!("invalid --log-level {l:?}"))?,
        None => EnvFilter::try_from_env("LAZYPULL_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().init(),
    }
    Ok(())
}
