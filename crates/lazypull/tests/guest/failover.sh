#!/bin/bash
# Failover: the daemon is killed with SIGKILL while 8 readers stream large files,
# and a new daemon takes the mount over; then the same with an upgrade through
# the control API (`lazypull daemon --takeover`). Every reader must finish with
# the right bytes; none may hang.
source "$LP_SCENARIOS/lib.sh"
setup_disks
IMG=$(cat "$LP_DATA/img")

# wait_reads N: until the current daemon log shows N more READs than now.
wait_reads() {
	local i want=$(($(read_count) + $1))
	for i in $(seq 600); do
		[ "$(read_count)" -ge "$want" ] && return 0
		sleep 0.05
	done
	fail "fewer than $1 new READs after 30 s"
}

# ready_in LOGFILE: waits until a daemon writing LOGFILE is ready.
ready_in() {
	local i
	for i in $(seq 400); do
		grep -q "lazypull daemon ready" "$1" 2>/dev/null && return 0
		sleep 0.05
	done
	fail "no daemon became ready in 20 s: $(tail -5 "$1")"
}

start_daemon
mount_image "$IMG" /mnt/f || fail "mount"

# 1. SIGKILL in the middle of the reads.
readers 0
wait_reads 40
running=$(alive)
echo "kill -9 with $running of 8 readers running, $(read_count) READs answered"
echo "$running" >"$LP_OUT/alive-at-kill"
kill -9 "$DPID"
wait "$DPID" 2>/dev/null || true
save_log
cp "$LOG" "$LP_OUT/daemon-1.log"
sleep 1
# Nobody serves the cache now: the readers wait in the kernel (they must not fail).
echo "$(alive)" >"$LP_OUT/alive-while-dead"
pgrep -f "lazypull fdstore" >/dev/null || fail "the fd store died with the daemon"
LOG=/run/lp/daemon-2.log
start_daemon
grep -q "took over the bound cachefiles cache" "$LOG" || fail "the new daemon did not take over: $(tail -5 "$LOG")"
wait_all 600 "${PIDS[@]}"
echo "after the kill: all readers done"

# 2. An upgrade via the control API while 8 other readers stream.
readers 8
wait_reads 40
running=$(alive)
echo "takeover with $running of 8 readers running"
echo "$running" >"$LP_OUT/alive-at-takeover"
OLD=$DPID
LOG=/run/lp/daemon-3.log
"$LP_BIN" daemon --takeover --cache-dir "$CACHE/fscache" --blob-dir "$BLOBS" \
	--log-level "${LP_LOG_LEVEL:-info,lazypull_transport=debug}" >>"$LOG" 2>&1 &
DPID=$!
ready_in "$LOG"
# What the adopted objects hold, as the new daemon sees it at once.
"$LP_BIN" status --json >"$LP_OUT/status-after-takeover.json" 2>&1 || true
rc=0
wait "$OLD" || rc=$?
echo "$rc" >"$LP_OUT/old-daemon.exit"
grep -q "took over the bound cachefiles cache" "$LOG" || fail "the upgraded daemon did not take over"
cp /run/lp/daemon-2.log "$LP_OUT/daemon-2.log"
wait_all 600 "${PIDS[@]}"
echo "after the takeover: all readers done"

# Everything still reads, then a clean stop.
sha256sum /mnt/f/big0.bin >"$LP_OUT/again-0.txt" || fail "reading after failover"
umount /mnt/f
cp "$LOG" "$LP_OUT/daemon-3.log"
stop_daemon
pgrep -f "lazypull fdstore" >/dev/null && fail "the fd store outlived a shutdown"
echo "failover scenario done"
