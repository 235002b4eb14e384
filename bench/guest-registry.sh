#!/bin/bash
# Benchmark scenario, run inside the 6.12 guest. Each round reads the same image cold
# through lazypull two ways: from the local blob directory (stored form on the ext4
# disk) and from the registry on the host's loopback (reached through qemu's user
# network), each with a fresh daemon and cache; the order alternates per round.
# Env: LP_BIN, LP_BENCH (host dir: meta, ref, first), ROUNDS, REG.
set -euo pipefail
BLOBS=/run/lp/blobs CACHE=/run/lp/cache LOG=/run/lp/daemon.log
mkdir -p "$BLOBS" "$CACHE" /mnt/img
mount -t ext4 /dev/vda "$BLOBS"
mount -t ext4 /dev/vdb "$CACHE"
ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
META=$(cat "$LP_BENCH/meta")
REF=$REG/$(cat "$LP_BENCH/ref")
FIRST=$(cat "$LP_BENCH/first")
RESULTS="$LP_OUT/results"
: >"$RESULTS"

now() { date +%s%N; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
read_big() { cat /mnt/img/big.bin >/dev/null; }
read_small() { find /mnt/img -type f ! -name big.bin -print0 | xargs -0 cat >/dev/null; }

DPID=
start_daemon() {
	rm -rf "$CACHE/fscache" "$CACHE/work"
	mkdir -p "$CACHE/fscache"
	drop
	"$LP_BIN" daemon --cache-dir "$CACHE/fscache" --work-dir "$CACHE/work" --blob-dir "$BLOBS" \
		--log-level warn >"$LOG" 2>&1 &
	DPID=$!
	until [ -S /run/lazypull/lazypull.sock ]; do
		kill -0 "$DPID" || { echo "daemon died"; cat "$LOG"; exit 1; }
		sleep 0.005
	done
}
stop_daemon() {
	kill -TERM "$DPID"
	wait "$DPID"
}
field() { # SECTION NAME FILE: a number from section SECTION of `lazypull status --json`
	awk -v sec="\"$1\":" -v key="\"$2\":" '$1 == sec { inside = 1 } inside && $1 == key { gsub(/[^0-9]/, "", $2); print $2; exit }' "$3"
}

# measure KIND WHAT: fresh daemon, mount cold, time to the first byte of a small
# file, then time the read (the first byte's window is all that is warm);
# backend requests from the daemon's counters.
measure() {
	local kind=$1 what=$2 t0 t1 t2 t3
	start_daemon
	t0=$(now)
	if [ "$kind" = local ]; then
		mount -t erofs -o "fsid=$META" none /mnt/img
	else
		"$LP_BIN" mount --insecure "$REF" /mnt/img >/dev/null
	fi
	head -c 1 "/mnt/img/$FIRST" >/dev/null
	t1=$(now)
	"$LP_BIN" status --json >/run/lp/s0.json
	t2=$(now)
	"read_$what"
	t3=$(now)
	"$LP_BIN" status --json >/run/lp/s1.json
	umount /mnt/img
	stop_daemon
	local req=$(($(field fetch range_requests /run/lp/s1.json) - $(field fetch range_requests /run/lp/s0.json)))
	local bytes=$(($(field counters bytes_written /run/lp/s1.json) - $(field counters bytes_written /run/lp/s0.json)))
	echo "round=$round kind=$kind what=$what ms=$(((t3 - t2) / 1000000)) first_ms=$(((t1 - t0) / 1000000)) requests=$req bytes=$bytes" | tee -a "$RESULTS"
}

for round in $(seq "$ROUNDS"); do
	for what in big small; do
		if [ $((round % 2)) = 1 ]; then order="local registry"; else order="registry local"; fi
		for kind in $order; do
			measure "$kind" "$what"
		done
	done
done
