#!/usr/bin/env bash
# The one command that runs every lazypull test, on a fresh Debian bookworm machine
# as root: installs what the tests need (once), builds the Linux 6.12 guest kernel
# (once; cached in /var/cache/lazypull/kernel), then runs the whole cargo test suite,
# including the cachefiles tests that boot that kernel under qemu.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
	echo "scripts/test.sh: the tests mount file systems and boot a guest kernel: run as root" >&2
	exit 1
fi

packages=(
	linux-source-6.12 flex bison bc libelf-dev libssl-dev cpio make gcc # guest kernel build
	qemu-system-x86                                                     # the guest
	erofs-utils                                                         # cross-checks (fsck.erofs, mkfs.erofs baseline)
	e2fsprogs attr                                                      # ext4 disk images, xattr tools
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "scripts/test.sh: installing ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

kernel=$(bash guest/build-kernel.sh)
echo "scripts/test.sh: guest kernel $kernel" >&2

cargo test --workspace --locked -- --test-threads=2 "$@"
