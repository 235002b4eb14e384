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
	dump_state
	save_log
	exit 1
}

# What every daemon thread and every other process is blocked in, plus the
# daemon's counters, so that a hang is diagnosable from the test output.
dump_state() {
	{
		echo "== daemon threads (syscall number, state)"
		local t p
		for t in /proc/"$DPID"/task/*; do
			echo "$(cat "$t/comm" 2>/dev/null) sys=$(cut -d' ' -f1 "$t/syscall" 2>/dev/null) $(grep State "$t/status" 2>/dev/null)"
		done
		echo "== processes not sleeping interruptibly (state, syscall)"
		for p in /proc/[0-9]*; do
			case "$(grep State "$p/status" 2>/dev/null)" in
			*"(sleeping)"* | "") ;;
			*) echo "$(cat "$p/comm" 2>/dev/null) pid=${p#/proc/} $(grep State "$p/status") sys=$(cut -d' ' -f1 "$p/syscall" 2>/dev/null)" ;;
			esac
		done
		echo "== readers"
		for p in $(pgrep -x sha256sum; pgrep -f lazypull-testkit); do
			echo "pid=$p $(grep State /proc/$p/status 2>/dev/null) sys=$(cut -d' ' -f1,2,3 /proc/$p/syscall 2>/dev/null)"
		done
		echo "== READs seen $(read_count), completed $(grep -c 'READ completed' "$LOG" || true)"
		echo "== daemon log tail"
		tail -30 "$LOG"
	} >"$LP_OUT/state.txt" 2>&1
	cat "$LP_OUT/state.txt"
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
		case "$(readlink "$f" 2>/dev/null)" in "anon_inode:[cachefiles]") n=$((n + 1)) ;; esac
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

# wait_all DEADLINE_S PID...: waits for every PID, failing with a state dump if
# any is still running after DEADLINE_S seconds (a hung reader may be in an
# uninterruptible sleep that `wait` and `timeout` cannot end).
wait_all() {
	local deadline=$1 t p alive
	shift
	for t in $(seq $((deadline * 10))); do
		alive=0
		for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
		[ "$alive" = 0 ] && return 0
		sleep 0.1
	done
	fail "$alive of $# readers still running after ${deadline}s"
}

# try_read NAME PATH: reads PATH (bounded to 120 s), recording the exit status and
# stderr in $LP_OUT/read-NAME.rc and .err for the host test; prints a summary.
try_read() {
	local rc=0
	timeout 120 cat "$2" >/dev/null 2>"$LP_OUT/read-$1.err" || rc=$?
	echo "$rc" >"$LP_OUT/read-$1.rc"
	echo "read $2 ($1): rc=$rc $(cat "$LP_OUT/read-$1.err")"
}

# network_up: configures the user-mode network card (the host's 127.0.0.1 is 10.0.2.2).
network_up() {
	ip link set lo up || fail "lo up"
	ip link set eth0 up || fail "eth0 up (no network card? GuestConfig::network)"
	ip addr add 10.0.2.15/24 dev eth0 || fail "eth0 address"
	ip route add default via 10.0.2.2 || fail "default route"
}

# now_ms: monotonic-enough wall clock in milliseconds.
now_ms() {
	echo $(($(date +%s%N) / 1000000))
}

# lp_mount NAME REFERENCE MOUNTPOINT [flags...]: `lazypull mount --json`, saving the
# reply in $LP_OUT/mount-NAME.json and stderr in mount-NAME.err; returns its status.
lp_mount() {
	local name=$1 ref=$2 mp=$3 rc=0
	shift 3
	"$LP_BIN" mount --json "$ref" "$mp" "$@" >"$LP_OUT/mount-$name.json" 2>"$LP_OUT/mount-$name.err" || rc=$?
	echo "$rc" >"$LP_OUT/mount-$name.rc"
	echo "lazypull mount $ref ($name): rc=$rc $(head -c 400 "$LP_OUT/mount-$name.err")"
	return "$rc"
}

# readers FIRST: starts 8 sha256sum readers of /mnt/f/big$FIRST..big$((FIRST+7)),
# each writing $LP_OUT/sum-N.txt and .err; sets PIDS.
readers() {
	PIDS=()
	local i
	for i in $(seq "$1" $(($1 + 7))); do
		(cd /mnt/f && sha256sum "big$i.bin" >"$LP_OUT/sum-$i.txt" 2>"$LP_OUT/sum-$i.err") &
		PIDS+=($!)
	done
}

# alive: how many of $PIDS still run.
alive() {
	local n=0 p
	for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
	echo "$n"
}
