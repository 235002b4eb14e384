#!/usr/bin/env bash
# The one command that runs every lazypull test on a fresh Debian bookworm machine,
# as root: set-up (packages, the guest kernel; both once), then the whole cargo test
# suite, including the cachefiles tests that boot the Linux 6.12 kernel under qemu.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=$(bash scripts/setup.sh)
echo "scripts/test.sh: guest kernel $kernel" >&2
cargo test --workspace --locked -- --test-threads=2 "$@"
