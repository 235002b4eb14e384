#!/bin/bash
# A device read error that is not the loss of the device does not end serving:
# with the daemon at its open-file limit the kernel cannot install an OPEN's
# anonymous fd, fails that OPEN and returns EMFILE from the daemon's read of
# /dev/cachefiles; once the limit is raised again the daemon serves the next
# mount. Then a second daemon with --transport auto beside the running one
# refuses to start (another daemon holds /dev/cachefiles) instead of falling
# back to FUSE.
source "$LP_SCENARIOS/lib.sh"
setup_disks
start_daemon
A=$(cat "$LP_DATA/img-a")
C=$(cat "$LP_DATA/img-c")

mount_image "$A" /mnt/a || fail "mount A"
(cd /mnt/a && timeout 600 sha256sum -c --quiet "$LP_DATA/sample-a.sha256") >"$LP_OUT/check-a" 2>&1 || fail "A differs"

# The lowest fd number the daemon has free: with RLIMIT_NOFILE at it, the
# kernel can install no fd in the daemon.
lowest_free_fd() {
	local n=0
	while [ -e "/proc/$DPID/fd/$n" ]; do n=$((n + 1)); done
	echo "$n"
}
limit=$(lowest_free_fd)
prlimit --pid "$DPID" --nofile="$limit:$limit" || fail "prlimit --nofile=$limit"
rc=0
mount_image "$C" /mnt/c 2>"$LP_OUT/mount-at-limit.err" || rc=$?
echo "$rc" >"$LP_OUT/mount-at-limit.rc"
echo "mount of C with the daemon at its fd limit ($limit): rc=$rc $(cat "$LP_OUT/mount-at-limit.err")"
prlimit --pid "$DPID" --nofile=65536:65536 || fail "raising the limit again"
daemon_alive || fail "the daemon died at its fd limit: $(tail -5 "$LOG")"
if mountpoint -q /mnt/c; then umount /mnt/c; fi

# Serving goes on: a new mount, a new blob's READs, the old mount's files.
mount_image "$C" /mnt/c || fail "mount C once the limit is raised: $(tail -5 "$LOG")"
try_read after-limit /mnt/c/big.bin
(cd /mnt/a && timeout 600 sha256sum -c --quiet "$LP_DATA/sample-a.sha256") >"$LP_OUT/check-a-again" 2>&1 || fail "A differs after the errors: $(head -5 "$LP_OUT/check-a-again"; dmesg | tail -8)"
"$LP_BIN" status --json >"$LP_OUT/status.json" || fail "status"

# A second daemon (its own run dir, socket and cache dir) with --transport auto.
mkdir -p /run/lp2 "$CACHE/fscache2"
rc=0
timeout 60 "$LP_BIN" daemon --transport auto --cache-dir "$CACHE/fscache2" --blob-dir "$BLOBS" \
	--run-dir /run/lp2/run --socket /run/lp2/sock --no-fd-store --fuse-dir /run/lp2/fuse \
	>"$LP_OUT/second-daemon.log" 2>&1 || rc=$?
echo "$rc" >"$LP_OUT/second-daemon.rc"
echo "second daemon: rc=$rc $(tail -2 "$LP_OUT/second-daemon.log")"
daemon_alive || fail "the first daemon died beside the second"
try_read after-second /mnt/c/big.bin

umount /mnt/a /mnt/c
stop_daemon
