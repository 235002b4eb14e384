#!/usr/bin/env bash
# The one command that runs every lazypull test on a fresh Debian bookworm machine,
# as root: the static checks first (they fail in seconds: formatting, the declared
# minimum Rust version, clippy with warnings as errors), then set-up (packages, the
# guest kernel; both once), then the whole cargo test suite, including the
# cachefiles tests that boot the Linux 6.12 kernel under qemu.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
bash scripts/check-msrv.sh
# clippy reads rust-version: `incompatible_msrv` rejects std APIs newer than it.
cargo clippy --workspace --all-targets --locked -- -D warnings
kernel=$(bash scripts/setup.sh)
echo "scripts/test.sh: guest kernel $kernel" >&2
cargo test --workspace --locked -- --test-threads=2 "$@"
