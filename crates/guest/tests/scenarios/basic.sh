#!/bin/bash
# Basic guest check: the cachefiles device, an empty ext4 disk (/dev/vda), an ext4 disk made
# from a host directory (/dev/vdb), the environment, and writing to the output share.
set -euo pipefail
test -c /dev/cachefiles
mkdir -p /mnt/cache /mnt/seed
mount -t ext4 /dev/vda /mnt/cache
echo cache-ok >/mnt/cache/probe
grep -q ' /mnt/cache ext4 ' /proc/mounts
mount -t ext4 -o ro /dev/vdb /mnt/seed
uname -r >"$LP_OUT/uname"
cat /mnt/seed/seed.txt >"$LP_OUT/seed"
printf '%s' "$GREETING" >"$LP_OUT/greeting"
echo "home=$HOME cwd=$PWD" >"$LP_OUT/where"
nproc >"$LP_OUT/nproc"
echo basic-scenario-done
