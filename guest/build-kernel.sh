#!/usr/bin/env bash
# Builds (once) the Linux 6.12 guest kernel used by the cachefiles tests and prints the path
# of its bzImage on stdout. The build is cached outside the clone, keyed by a hash of the
# config fragment and the exact linux-source-6.12 package version, so it is paid once per
# machine. Needs: linux-source-6.12 flex bison bc libelf-dev libssl-dev cpio (see .ci/run).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/kernel.config"
tarball=/usr/src/linux-source-6.12.tar.xz
[ -f "$tarball" ] || { echo "build-kernel: $tarball missing: apt-get install linux-source-6.12" >&2; exit 1; }
version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
key=$( { cat "$fragment"; echo "$version"; } | sha256sum | cut -c1-16)
cache=${LAZYPULL_KERNEL_CACHE:-/var/cache/lazypull/kernel}
out="$cache/$key"
if [ -f "$out/bzImage" ]; then echo "$out/bzImage"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-kernel: building linux-source $version (key $key), takes ~6 min on 2 cores" >&2
tar -xJf "$tarball" -C "$work"
src=$(echo "$work"/linux-source-6.12)
make -C "$src" -s tinyconfig >&2
cat "$fragment" >> "$src/.config"
make -C "$src" -s olddefconfig >&2
# Fail loudly if any requested option did not survive olddefconfig (a missing dependency).
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) grep -qx "$line" "$src/.config" || { echo "build-kernel: $line not set after olddefconfig" >&2; missing=1; } ;; esac
done < "$fragment"
[ "$missing" = 0 ] || exit 1
make -C "$src" -s -j"$(nproc)" bzImage >&2
mkdir -p "$out.tmp"
cp "$src/arch/x86/boot/bzImage" "$src/.config" "$out.tmp/"
mv "$out.tmp" "$out"
echo "$out/bzImage"
