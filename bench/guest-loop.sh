#!/bin/bash
# Benchmark scenario, run inside the Linux 6.1 guest (no cachefiles on-demand, no
# file-backed EROFS: lazypull serves through loop devices over its FUSE blob files).
# Each round reads the same tree in every arm, after drop_caches each time: the limit
# (the plain meta and data blobs attached to read-only loop devices with losetup and
# mounted as EROFS with device=, no daemon), and lazypull's loop transport with plain
# blobs and with its default zstd stored form: a cold read on a fresh daemon and
# cache, then a warm read of the same mount (the daemon's cache file holds the bytes;
# the kernel's caches were dropped). The order of the arms rotates between rounds.
# Env: LP_BIN, LP_BENCH (host dir with the image names), ROUNDS.
set -euo pipefail
BLOBS=/run/lp/blobs CACHE=/run/lp/cache LOG=/run/lp/daemon.log BIN=/run/lp/bin
mkdir -p "$BLOBS" "$CACHE" /mnt/img "$BIN"
mount -t ext4 /dev/vda "$BLOBS"
mount -t ext4 /dev/vdb "$CACHE"
cp "$LP_BIN" "$BIN/lazypull"
META=$(cat "$LP_BENCH/meta")
META_ZSTD=$(cat "$LP_BENCH/meta-zstd")
RESULTS="$LP_OUT/results"
: >"$RESULTS"
uname -r >"$LP_OUT/kernel"

now() { date +%s%N; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
read_big() { cat /mnt/img/big.bin >/dev/null; }
read_small() { find /mnt/img -type f ! -name big.bin -print0 | xargs -0 cat >/dev/null; }

# timed KIND WHAT PASS: drop the kernel's caches, time one read.
timed() {
	local t1 t2
	drop
	t1=$(now)
	"read_$2"
	t2=$(now)
	echo "round=$round kind=$1 what=$2 pass=$3 us=$(((t2 - t1) / 1000))" >>"$RESULTS"
}

LOOPS=()
limit() { # WHAT
	local meta dev opts="" b
	meta=$(losetup -r -f --show "$BLOBS/plain/$META")
	for b in $(cat "$LP_BENCH/blobs"); do
		dev=$(losetup -r -f --show "$BLOBS/plain/$b")
		LOOPS+=("$dev")
		opts="$opts,device=$dev"
	done
	mount -t erofs -o "ro${opts}" "$meta" /mnt/img
	timed limit "$1" cold
	timed limit "$1" warm
	umount /mnt/img
	losetup -d "$meta" "${LOOPS[@]}"
	LOOPS=()
}

DPID=
lazypull_arm() { # KIND WHAT
	local dir=$BLOBS/plain fsid=$META
	[ "$1" = lp-zstd ] && dir=$BLOBS/zstd fsid=$META_ZSTD
	rm -rf "$CACHE/lp"
	mkdir -p "$CACHE/lp"
	drop
	"$BIN/lazypull" daemon --transport auto --cache-dir "$CACHE/lp" --work-dir "$CACHE/lp/work" \
		--blob-dir "$dir" --no-fd-store --log-level info >"$LOG" 2>&1 &
	DPID=$!
	until grep -q "lazypull daemon ready" "$LOG"; do
		kill -0 "$DPID" || { echo "daemon died"; cat "$LOG"; exit 1; }
		sleep 0.01
	done
	grep -q 'transport="loop"' "$LOG" || { echo "auto did not pick loop"; cat "$LOG"; exit 1; }
	"$BIN/lazypull" mount --fsid "$fsid" /mnt/img >/dev/null
	timed "$1" "$2" cold
	timed "$1" "$2" warm
	echo "round=$round kind=$1 what=rss_$2 us=$(awk '/^VmHWM:/ {print $2}' /proc/$DPID/status)" >>"$RESULTS"
	"$BIN/lazypull" umount /mnt/img
	kill -TERM "$DPID"
	wait "$DPID" || true
}

KINDS=(limit lp-plain lp-zstd)
for round in $(seq "$ROUNDS"); do
	for what in small big; do
		for i in 0 1 2; do
			kind=${KINDS[$(((i + round) % 3))]}
			if [ "$kind" = limit ]; then limit "$what"; else lazypull_arm "$kind" "$what"; fi
		done
	done
done
cat "$RESULTS"
