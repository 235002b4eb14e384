#!/bin/bash
# `lazypull demo` in the Linux 6.12 guest, where the kernel has cachefiles
# on-demand mode: the same demo as on the host, through the other transport.
# Env: LP_BIN; /dev/vda is an empty ext4 disk (cachefiles refuses tmpfs).
set -euo pipefail
mkdir -p /run/lp/disk
mount -t ext4 /dev/vda /run/lp/disk
ip link set lo up
rc=0
"$LP_BIN" demo --transport "${LP_TRANSPORT:-auto}" --dir /run/lp/disk/demo ${LP_DEMO_JSON:+--json} >"$LP_OUT/demo.out" 2>"$LP_OUT/demo.err" || rc=$?
cat "$LP_OUT/demo.out" "$LP_OUT/demo.err"
echo "$rc" >"$LP_OUT/demo.rc"
exit "$rc"
