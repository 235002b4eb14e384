#!/bin/bash
# Missing blobs fail the mount with a clear log line; a blob truncated under the
# daemon gives the reader EIO (not a hang); the daemon keeps serving good images.
source "$LP_SCENARIOS/lib.sh"
setup_disks
start_daemon
A=$(cat "$LP_DATA/img-a")
C=$(cat "$LP_DATA/img-c")
D=$(cat "$LP_DATA/img-d")
C_BLOB=$(cat "$LP_DATA/blob-c")

# 1. No such meta blob.
if mount_image no-such-image /mnt/x 2>"$LP_OUT/mount-missing-meta.err"; then
	fail "mount of a missing image succeeded"
fi
echo "missing meta blob: mount failed as expected: $(cat "$LP_OUT/mount-missing-meta.err")"

# 2. Meta blob present, its data blob missing. Linux 6.12 sends the device's OPEN
# at mount time but does not fail the mount when it is refused; reads of that
# blob's data must then fail with EIO (not hang, not return zeros).
if mount_image "$D" /mnt/d 2>"$LP_OUT/mount-missing-data.err"; then
	echo "mounted" >"$LP_OUT/mount-missing-data.result"
	try_read missing-data /mnt/d/file.bin
	umount /mnt/d
else
	echo "refused" >"$LP_OUT/mount-missing-data.result"
	echo "missing data blob: mount failed"
fi
daemon_alive || fail "daemon died after refusing OPENs"

# 3. Truncate C's data blob while the daemon serves it.
mount_image "$C" /mnt/c || fail "mount C"
truncate -s 4096 "$BLOBS/$C_BLOB"
sync
try_read truncated /mnt/c/big.bin
umount /mnt/c
daemon_alive || fail "daemon died after a failed READ"

# 4. A stored (compressed) blob with a corrupted unit: the reader gets EIO, and
# no byte of that unit reaches the cache.
E=$(cat "$LP_DATA/img-e")
mount_image "$E" /mnt/e || fail "mount E"
try_read corrupt /mnt/e/file.bin
umount /mnt/e
daemon_alive || fail "daemon died after a digest mismatch"

# 5. A good image still mounts and reads correctly.
mount_image "$A" /mnt/a || fail "mount A after failures"
(cd /mnt/a && timeout 600 sha256sum -c --quiet "$LP_DATA/sample-a.sha256") >"$LP_OUT/check-a" 2>&1 || fail "A differs after failures"
umount /mnt/a
stop_daemon
