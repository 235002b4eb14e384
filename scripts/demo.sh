#!/usr/bin/env bash
# The lazypull demo, as root: builds lazypull and runs `lazypull demo` on this
# machine (a built-in sample image served from a local web server, mounted
# lazily with the best transport the kernel has: FUSE here, cachefiles where the
# kernel has on-demand mode), then prints what was fetched against its size.
#
#   scripts/demo.sh [--json]   the demo on this machine's kernel
#   scripts/demo.sh --guest    the same demo through cachefiles, in the Linux 6.12
#                              test guest (builds that kernel once, ~7 min)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "lazypull demo mounts file systems: run it as root (sudo $0)" >&2
	exit 1
fi
if [ "${1:-}" = --guest ]; then
	bash scripts/setup.sh >/dev/null
	cargo build --quiet --locked --release -p lazypull --bins --example demo
	exec target/release/examples/demo
fi
cargo build --quiet --locked --release -p lazypull --bin lazypull
exec target/release/lazypull demo "$@"
