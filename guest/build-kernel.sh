#!/usr/bin/env bash
# Builds (once) a guest kernel used by the guest tests and prints the path of its bzImage
# on stdout. `build-kernel.sh` or `build-kernel.sh 6.12`: Linux 6.12 with cachefiles
# on-demand mode and file-backed EROFS (guest/kernel.config). `build-kernel.sh 6.1`: Linux
# 6.1 as most nodes run it, without either (guest/kernel-6.1.config). Each build is cached
# outside the clone, keyed by a hash of its config fragment and the exact linux-source
# package version, so it is paid once per machine. Needs: linux-source-6.12 or
# linux-source-6.1, flex bison bc libelf-dev libssl-dev cpio (scripts/setup.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
series=${1:-6.12}
case "$series" in
  6.12) fragment="$here/kernel.config" ;;
  6.1) fragment="$here/kernel-6.1.config" ;;
  *) echo "build-kernel: unknown kernel series $series (6.12 or 6.1)" >&2; exit 2 ;;
esac
package=linux-source-$series
tarball=/usr/src/$package.tar.xz
[ -f "$tarball" ] || { echo "build-kernel: $tarball missing: apt-get install $package" >&2; exit 1; }
version=$(dpkg-query -W -f='${Version}' "$package")
key=$( { cat "$fragment"; echo "$version"; } | sha256sum | cut -c1-16)
cache=${LAZYPULL_KERNEL_CACHE:-/var/cache/lazypull/kernel}
out="$cache/$key"
if [ -f "$out/bzImage" ]; then echo "$out/bzImage"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-kernel: building $package $version (key $key), takes ~6 min on 2 cores" >&2
tar -xJf "$tarball" -C "$work"
src=$(echo "$work"/"$package")
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
