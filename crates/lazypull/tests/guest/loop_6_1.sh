#!/bin/bash
# Linux 6.1 (no cachefiles on-demand mode, no file-backed EROFS), run by
# tests/guest_failover.rs: `lazypull daemon --transport auto` must pick loop
# devices over its FUSE blob files; a realistic tree reads back identical
# (bytes and metadata) through them; then the daemon is killed with SIGKILL
# while 8 readers stream large files, and a successor (auto again) takes the
# FUSE connection and the loop devices over. This kernel cannot resend FUSE
# requests (FUSE_NOTIFY_RESEND is 6.9+): the successor answers the READs the
# killed daemon had taken from its request journal. Every reader must finish
# with the right bytes; none may hang. At the end, the unmounts release every
# loop device.
#
# Writes to $LP_OUT: kernel, status.json, status.txt, manifest, loops-mounted,
# alive-at-kill, alive-while-dead, sum-N.txt/.err, status-after.json,
# loops-after-umount, daemon-1.log, daemon-2.log, daemon.exit.
source "$LP_SCENARIOS/lib.sh"
setup_disks
uname -r >"$LP_OUT/kernel"
TREE=$(cat "$LP_DATA/img-tree")
BIG=$(cat "$LP_DATA/img-big")

# fuse_reads: READs the running daemon has answered (its status).
fuse_reads() {
	"$LP_BIN" status --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["transport"]["counters"]["reads"])' 2>/dev/null || echo 0
}

# Loop devices whose backing file is one of the daemon's FUSE blob files.
blob_loops() {
	local f
	for f in /sys/block/loop*/loop/backing_file; do
		[ -f "$f" ] && case "$(cat "$f")" in /run/lazypull/blobs/*) echo "${f%/loop/backing_file}" ;; esac
	done
	return 0
}

start_daemon --transport auto --work-dir "$CACHE/work"
"$LP_BIN" status --json >"$LP_OUT/status.json" || fail "lazypull status --json"
"$LP_BIN" status >"$LP_OUT/status.txt" || fail "lazypull status"
grep -q "transport chosen" "$LOG" && grep "transport chosen" "$LOG"

# 1. The realistic tree, identical.
mkdir -p /mnt/t /mnt/f
"$LP_BIN" mount --fsid "$TREE" /mnt/t >/dev/null || fail "lazypull mount of the tree: $(tail -5 "$LOG")"
grep ' /mnt/t ' /proc/self/mountinfo
blob_loops >"$LP_OUT/loops-mounted"
timeout 1200 "$LP_TESTKIT" manifest /mnt/t >"$LP_OUT/manifest" || fail "walking the tree"
echo "tree walked: $(wc -l <"$LP_OUT/manifest") entries"

# 2. SIGKILL under 8 streaming readers.
"$LP_BIN" mount --fsid "$BIG" /mnt/f >/dev/null || fail "lazypull mount of the big files: $(tail -5 "$LOG")"
readers 0
base=$(fuse_reads)
for _ in $(seq 600); do
	[ "$(fuse_reads)" -ge $((base + 8)) ] && break
	sleep 0.1
done
running=$(alive)
echo "kill -9 with $running of 8 readers running, $(fuse_reads) READs answered"
echo "$running" >"$LP_OUT/alive-at-kill"
kill -9 "$DPID"
wait "$DPID" 2>/dev/null || true
cp "$LOG" "$LP_OUT/daemon-1.log"
sleep 1
echo "$(alive)" >"$LP_OUT/alive-while-dead"
pgrep -f "lazypull fdstore" >/dev/null || fail "the fd store died with the daemon"
LOG=/run/lp/daemon-2.log
start_daemon --transport auto --work-dir "$CACHE/work"
grep -q "took over the FUSE connection" "$LOG" || fail "the new daemon did not take over: $(tail -5 "$LOG")"
wait_all 900 "${PIDS[@]}"
echo "after the kill: all readers done"
"$LP_BIN" status --json >"$LP_OUT/status-after.json" || fail "lazypull status --json after the takeover"
cp "$LOG" "$LP_OUT/daemon-2.log"

# 3. Unmounts release the loop devices.
"$LP_BIN" umount /mnt/f || fail "lazypull umount /mnt/f"
"$LP_BIN" umount /mnt/t || fail "lazypull umount /mnt/t"
for _ in $(seq 100); do [ -z "$(blob_loops)" ] && break; sleep 0.1; done
blob_loops >"$LP_OUT/loops-after-umount"
stop_daemon
cp "$LOG" "$LP_OUT/daemon-2.log"
echo "loop scenario done"
