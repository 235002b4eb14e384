#!/usr/bin/env bash
# The one command that runs every lazypull test on a fresh Debian bookworm machine,
# as root: the static checks first (they fail in seconds: formatting, the declared
# minimum Rust version, clippy with warnings as errors), then set-up (packages, the
# guest kernel; both once), then the whole cargo test suite, including the
# cachefiles tests that boot the Linux 6.12 kernel under qemu, then a minute
# of coverage-guided fuzzing per fuzz target (scripts/fuzz.sh, fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# CI builds once from a fresh clone: incremental state would only take disk (GBs).
export CARGO_INCREMENTAL=0
bash scripts/check-disk.sh start
# The least free space seen during the run, printed at the end however it ends: a
# suite that fails with ENOSPC says so.
bash scripts/check-disk.sh watch &
disk_watch=$!
# (errexit holds in traps too: the watcher's kill status must not become the run's.)
trap 'rc=$?; kill "$disk_watch" 2>/dev/null || true; wait "$disk_watch" 2>/dev/null || true; bash scripts/check-disk.sh report || true; exit $rc' EXIT
cargo fmt --all -- --check
bash scripts/check-msrv.sh
# clippy reads rust-version: `incompatible_msrv` rejects std APIs newer than it.
cargo clippy --workspace --all-targets --locked -- -D warnings
kernel=$(bash scripts/setup.sh)
echo "scripts/test.sh: guest kernel $kernel" >&2
cargo test --workspace --locked -- --test-threads=2 "$@"
bash scripts/fuzz.sh 60
