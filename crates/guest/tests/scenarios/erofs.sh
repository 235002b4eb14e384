#!/bin/bash
# The baseline EROFS mount without cachefiles: a file-backed image made on the host (under
# the host's /tmp, seen through the guest's /tmp overlay) mounted directly.
set -euo pipefail
test -f "$EROFS_IMG"
mkdir -p /mnt/x
mount -t erofs -o ro "$EROFS_IMG" /mnt/x
grep ' /mnt/x erofs ' /proc/mounts
cat /mnt/x/hello.txt >"$LP_OUT/hello"
cat /mnt/x/sub/deep.txt >"$LP_OUT/deep"
umount /mnt/x
