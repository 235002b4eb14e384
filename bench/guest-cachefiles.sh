#!/bin/bash
# Benchmark scenario, run inside the 6.12 guest. Each round reads the same image cold
# two ways: the limit (the image mounted file-backed, no daemon) and through lazypull
# over cachefiles (fresh cache each time), alternating to spread noise evenly.
# Env: LP_BIN, LP_BENCH (host dir with meta/blob names), ROUNDS, FILL_WINDOW.
set -euo pipefail
BLOBS=/run/lp/blobs CACHE=/run/lp/cache LOG=/run/lp/daemon.log
mkdir -p "$BLOBS" "$CACHE" /mnt/img
mount -t ext4 /dev/vda "$BLOBS"
mount -t ext4 /dev/vdb "$CACHE"
META=$(cat "$LP_BENCH/meta")
DEVOPTS=$(for b in $(cat "$LP_BENCH/blobs"); do printf ',device=%s/%s' "$BLOBS" "$b"; done)

# File-backed EROFS mount through mount(2): mount(8) would put a loop device under
# a regular-file source, and EROFS then refuses `device=` files.
# Both kinds of mount go through it, and it prints how long mount(2) itself took in
# microseconds, so process start-up (slow under TCG) is not counted.
mount_erofs() { # SRC DIR OPTS
	perl -MTime::HiRes=time -e 'my ($src, $dir, $opts) = @ARGV; my $type = "erofs";
		my $t0 = time; syscall(165, $src, $dir, $type, 1, $opts) == 0 or die "mount(2) erofs $src: $!\n";
		printf "%d\n", (time - $t0) * 1e6' "$@"
}
RESULTS="$LP_OUT/results"
: >"$RESULTS"

now() { date +%s%N; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

read_big() { cat /mnt/img/big.bin >/dev/null; }
read_small() { find /mnt/img -type f ! -name big.bin -print0 | xargs -0 cat >/dev/null; }

DPID=
start_daemon() {
	rm -rf "$CACHE/fscache"
	mkdir -p "$CACHE/fscache"
	drop
	local t0
	"$LP_BIN" daemon --cache-dir "$CACHE/fscache" --blob-dir "$BLOBS" --fill-window "$FILL_WINDOW" \
		--log-level info >"$LOG" 2>&1 &
	DPID=$!
	until grep -q "lazypull daemon ready" "$LOG"; do
		kill -0 "$DPID" || { echo "daemon died"; cat "$LOG"; exit 1; }
		sleep 0.005
	done
	echo "round=$round kind=daemon what=start ms=$(sed -n 's/.*startup_ms=\([0-9.]*\).*/\1/p' "$LOG")" >>"$RESULTS"
}
stop_daemon() {
	echo "round=$round kind=daemon what=rss_kib value=$(awk '/^VmHWM:/ {print $2}' /proc/$DPID/status)" >>"$RESULTS"
	kill -TERM "$DPID"
	wait "$DPID"
}

# measure KIND WHAT: mount cold, time the read, unmount.
measure() {
	local kind=$1 what=$2 mount_us t1 t2
	drop
	if [ "$kind" = limit ]; then
		mount_us=$(mount_erofs "$BLOBS/$META" /mnt/img "${DEVOPTS#,}")
	else
		mount_us=$(mount_erofs none /mnt/img "fsid=$META")
	fi
	t1=$(now)
	"read_$what"
	t2=$(now)
	umount /mnt/img
	echo "round=$round kind=$kind what=$what ms=$(((t2 - t1) / 1000000)) mount_us=$mount_us" >>"$RESULTS"
}

for round in $(seq "$ROUNDS"); do
	for what in big small; do
		if [ $((round % 2)) = 1 ]; then order="limit daemon"; else order="daemon limit"; fi
		for kind in $order; do
			if [ "$kind" = daemon ]; then
				start_daemon
				measure daemon "$what"
				stop_daemon
			else
				measure limit "$what"
			fi
		done
	done
done
cat "$RESULTS"
echo "--- last daemon log ---"
grep -v " INFO " "$LOG" || true
