# Shared helpers for the cachefiles guest scenarios. Sourced by each scenario; runs
# inside the test guest (Linux 6.12 with cachefiles on-demand), as PID 1's child.
#
# Environment from the host test:
#   LP_BIN      the lazypull binary        LP_TESTKIT  the lazypull-testkit binary
#   LP_DATA     host dir with expected results (visible read-only over 9p)
#   LP_SCENARIOS this directory
#   LP_OUT      read-write share returned to the host
# Disks: /dev/vda = ext4 with the blobs (read-write), /dev/vdb = empty ext4 for the cache.
set -euo pipefail

BLOBS=/run/lp/blobs
CACHE=/run/lp/cache
LOG=/run/lp/daemon.log
DPID=

fail() {
	echo "SCENARIO FAILED: $*"
	save_log
	exit 1
}

check() {
	"$@" || fail "check failed: $*"
}

save_log() {
	[ -f "$LOG" ] && cp "$LOG" "$LP_OUT/daemon.log" || true
}

setup_disks() {
	mkdir -p "$BLOBS" "$CACHE"
	mount -t ext4 /dev/vda "$BLOBS" || fail "mounting the blob disk"
	mount -t ext4 /dev/vdb "$CACHE" || fail "mounting the cache disk"
	mkdir -p "$CACHE/fscache"
}

# start_daemon [extra flags...]: starts lazypull, waits until the cache is bound.
start_daemon() {
	"$LP_BIN" daemon --cache-dir "$CACHE/fscache" --blob-dir "$BLOBS" \
		--log-level "${LP_LOG_LEVEL:-info,lazypull_transport=debug}" "$@" >>"$LOG" 2>&1 &
	DPID=$!
	local i
	for i in $(seq 200); do
		grep -q "lazypull daemon ready" "$LOG" 2>/dev/null && return 0
		kill -0 "$DPID" 2>/dev/null || fail "daemon exited during start: $(tail -5 "$LOG")"
		sleep 0.05
	done
	fail "daemon did not become ready in 10 s"
}

# stop_daemon: SIGTERM, wait, record the exit status in $LP_OUT/daemon.exit.
stop_daemon() {
	kill -TERM "$DPID"
	local rc=0
	wait "$DPID" || rc=$?
	echo "$rc" >"$LP_OUT/daemon.exit"
	save_log
	DPID=
}

daemon_alive() {
	[ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null
}

# Number of READ requests the daemon has logged so far.
read_count() {
	grep -c "READ msg_id" "$LOG" || true
}

# Anonymous cachefiles fds the daemon holds right now.
anon_fds() {
	local n=0 f
	for f in /proc/"$DPID"/fd/*; do
		case "$(readlink "$f" 2>/dev/null)" in *cachefiles*) n=$((n + 1)) ;; esac
	done
	echo "$n"
}

# mount_image FSID MOUNTPOINT [extra -o options]
mount_image() {
	mkdir -p "$2"
	mount -t erofs -o "fsid=$1${3:+,$3}" none "$2"
}

# Peak RSS of the daemon, in KiB.
daemon_hwm_kib() {
	awk '/^VmHWM:/ {print $2}' /proc/"$DPID"/status
}
