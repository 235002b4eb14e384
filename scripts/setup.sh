#!/usr/bin/env bash
# Shared set-up of scripts/test.sh and scripts/demo.sh, for a fresh Debian bookworm
# machine, as root: installs what lazypull's tests and demo need (once) and builds
# the two guest kernels, Linux 6.12 and 6.1 (once; cached in
# /var/cache/lazypull/kernel; the two builds run side by side). Prints the 6.12
# kernel's path.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
	echo "lazypull: this mounts file systems and boots a guest kernel: run as root" >&2
	exit 1
fi

packages=(
	linux-source-6.12 linux-source-6.1 flex bison bc libelf-dev libssl-dev cpio make gcc # guest kernel build
	qemu-system-x86                                                     # the guest
	erofs-utils                                                         # cross-checks (fsck.erofs, mkfs.erofs)
	e2fsprogs attr perl                                                 # ext4 disk images, xattr tools, guest init
	docker-registry apache2-utils iproute2                              # a real OCI registry (+ htpasswd) for the registry tests; guest networking
	openssl                                                             # test CAs and certificates for the TLS registry tests
	containerd runc busybox-static                                      # the runtime tests: containerd 1.6 + runc, a static shell for test images
	golang-go golang-github-containerd-containerd-dev                   # containerd's snapshotter conformance suite (built offline, GOPATH mode)
	golang-github-opencontainers-image-spec-dev                         # the OCI image spec's JSON schemas (manifest validation)
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "lazypull: installing ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	# The package starts a system registry on :5000 where systemd runs; the tests
	# start their own on free ports and do not need it.
	if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
		systemctl disable --now docker-registry >/dev/null 2>&1 || true
	fi
fi

# The fuzz targets' build tool (cargo install, from crates.io): its output
# goes to stderr, like everything here but the kernel path.
bash scripts/fuzz.sh --setup >&2

# Both builds at once: each spends a minute single-threaded unpacking its sources.
bash guest/build-kernel.sh 6.1 >/dev/null &
k61=$!
k612=$(bash guest/build-kernel.sh 6.12)
wait "$k61" || { echo "lazypull: building the 6.1 guest kernel failed" >&2; exit 1; }
echo "$k612"
