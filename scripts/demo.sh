#!/usr/bin/env bash
# The lazypull demo on a fresh Debian bookworm machine, as root: a sample image,
# served lazily through cachefiles, mounted, a few files read, and what was fetched
# against the image's size. This host kernel has no cachefiles on-demand mode, so
# the demo runs in the Linux 6.12 guest that the tests use (built once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --quiet --locked --release -p lazypull --bins --example demo
exec target/release/examples/demo
