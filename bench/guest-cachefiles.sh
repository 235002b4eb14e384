#!/bin/bash
# Benchmark scenario, run inside the 6.12 guest. Each round reads the same tree cold
# in every arm: the limit (the plain image mounted file-backed, no daemon), lazypull
# over cachefiles with plain blobs and with its default zstd stored form, and, when
# NYDUSD is set, nydusd --fscache with RAFS v6 images of the same tree (plain and
# zstd). Each daemon arm starts a fresh daemon on a fresh cache. The order of the
# arms rotates between rounds to spread noise evenly. Then one profiling mount per
# daemon arm records where mount time goes (daemon log at debug, fscache stats).
# Env: LP_BIN, LP_BENCH (host dir with the image names), ROUNDS, FILL_WINDOW,
# optionally NYDUSD (a nydusd binary) when LP_BENCH has nydus-none / nydus-zstd.
set -euo pipefail
BLOBS=/run/lp/blobs CACHE=/run/lp/cache LOG=/run/lp/daemon.log BIN=/run/lp/bin
mkdir -p "$BLOBS" "$CACHE" /mnt/img "$BIN"
mount -t ext4 /dev/vda "$BLOBS"
mount -t ext4 /dev/vdb "$CACHE"
# Both daemons start from the guest's tmpfs, not the 9p root share: same footing.
cp "$LP_BIN" "$BIN/lazypull"
KINDS="limit lp-plain lp-zstd"
if [ -n "${NYDUSD:-}" ]; then
	cp "$NYDUSD" "$BIN/nydusd"
	KINDS="$KINDS nydus-none nydus-zstd"
fi
META=$(cat "$LP_BENCH/meta")
META_ZSTD=$(cat "$LP_BENCH/meta-zstd")
DEVOPTS=$(for b in $(cat "$LP_BENCH/blobs"); do printf ',device=%s/plain/%s' "$BLOBS" "$b"; done)

# File-backed EROFS mount through mount(2): mount(8) would put a loop device under
# a regular-file source, and EROFS then refuses `device=` files.
# Both kinds of mount go through it, and it prints how long mount(2) itself took in
# microseconds, so process start-up (slow under TCG) is not counted; with a 4th
# argument it also prints mount(2)'s start and end (epoch seconds) on stderr.
mount_erofs() { # SRC DIR OPTS [stamps]
	perl -MTime::HiRes=time -e 'my ($src, $dir, $opts, $stamps) = @ARGV; my $type = "erofs";
		my $t0 = time; syscall(165, $src, $dir, $type, 1, $opts) == 0 or die "mount(2) erofs $src: $!\n";
		my $t1 = time; printf "%d\n", ($t1 - $t0) * 1e6;
		printf STDERR "mount_start=%.6f mount_end=%.6f\n", $t0, $t1 if $stamps' "$@"
}
RESULTS="$LP_OUT/results"
: >"$RESULTS"

now() { date +%s%N; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

read_walk() { find /mnt/img -printf '%s\n' >/dev/null; }
read_big() { cat /mnt/img/big.bin >/dev/null; }
read_small() { find /mnt/img -type f ! -name big.bin -print0 | xargs -0 cat >/dev/null; }

nydus_config() { # KIND -> path of nydusd's blob list for that image
	local dir="$BLOBS/$1" cfg="/run/lp/$1.json"
	cat >"$cfg" <<EOF
{"blobs": [{"type": "bootstrap", "id": "$1", "domain_id": "$1",
  "config_v2": {"version": 2, "id": "bench",
    "backend": {"type": "localfs", "localfs": {"dir": "$dir"}},
    "cache": {"type": "fscache", "fscache": {"work_dir": "$CACHE/fscache"}},
    "metadata_path": "$dir/bootstrap"}}]}
EOF
	echo "$cfg"
}

DPID=
# start_daemon KIND [LOG_LEVEL]: a fresh daemon on a fresh cache, timed from its
# launch to the log line saying its cache is bound (nydusd logs "Starting all
# Nydus services" right after `bind ondemand`; lazypull "daemon ready").
start_daemon() {
	local kind=$1 level=${2:-info} t0 ready
	rm -rf "$CACHE/fscache"
	mkdir -p "$CACHE/fscache"
	drop
	t0=$(now)
	case $kind in
	lp-plain | lp-zstd)
		local dir=$BLOBS/plain
		[ "$kind" = lp-zstd ] && dir=$BLOBS/zstd
		"$BIN/lazypull" daemon --cache-dir "$CACHE/fscache" --blob-dir "$dir" --fill-window "$FILL_WINDOW" \
			--log-level "$level" >"$LOG" 2>&1 &
		ready="lazypull daemon ready"
		;;
	nydus-*)
		"$BIN/nydusd" singleton --fscache "$CACHE/fscache" --config "$(nydus_config "$kind")" \
			--log-level "$level" >"$LOG" 2>&1 &
		ready="Starting all Nydus services"
		;;
	esac
	DPID=$!
	until grep -q "$ready" "$LOG"; do
		kill -0 "$DPID" || { echo "daemon $kind died"; cat "$LOG"; exit 1; }
		sleep 0.002
	done
	local seen
	seen=$(now)
	local internal
	internal=$(sed -n 's/.*startup_ms=\([0-9.]*\).*/\1/p' "$LOG")
	echo "round=$round kind=$kind what=start us=$(((seen - t0) / 1000)) internal_ms=${internal:--1}" >>"$RESULTS"
	# The daemon's own steps from main to ready (lazypull only), as
	# list=main:0.8,config:0.2,...
	local steps
	steps=$(sed -n 's/.*steps_ms=//p' "$LOG" | head -1 | tr ' =' ',:')
	[ -n "$steps" ] && echo "round=$round kind=$kind what=steps list=$steps" >>"$RESULTS"
	return 0
}
stop_daemon() {
	echo "round=$round kind=$1 what=rss_kib value=$(awk '/^VmHWM:/ {print $2}' /proc/$DPID/status)" >>"$RESULTS"
	kill -TERM "$DPID"
	local i
	for i in $(seq 400); do
		kill -0 "$DPID" 2>/dev/null || break
		sleep 0.025
	done
	kill -KILL "$DPID" 2>/dev/null || true
	wait "$DPID" || true
}

fsid_of() {
	case $1 in
	lp-plain) echo "$META" ;;
	lp-zstd) echo "$META_ZSTD" ;;
	nydus-*) echo "$1" ;;
	esac
}

# measure KIND WHAT: mount cold, time the read, unmount.
measure() {
	local kind=$1 what=$2 mount_us t1 t2
	drop
	if [ "$kind" = limit ]; then
		mount_us=$(mount_erofs "$BLOBS/plain/$META" /mnt/img "${DEVOPTS#,}")
	else
		mount_us=$(mount_erofs none /mnt/img "fsid=$(fsid_of "$kind")")
	fi
	t1=$(now)
	"read_$what"
	t2=$(now)
	umount /mnt/img
	# Microseconds: the walk can take only a few ms.
	echo "round=$round kind=$kind what=$what us=$(((t2 - t1) / 1000)) mount_us=$mount_us" >>"$RESULTS"
}

set -- $KINDS
NK=$#
for round in $(seq "$ROUNDS"); do
	for what in walk small big; do
		# Rotate the arms' order by round.
		order=""
		for i in $(seq 0 $((NK - 1))); do
			k=$(((i + round) % NK + 1))
			order="$order ${!k}"
		done
		for kind in $order; do
			if [ "$kind" = limit ]; then
				measure limit "$what"
			else
				start_daemon "$kind"
				measure "$kind" "$what"
				# Where a lazypull daemon's time went on this read: the
				# engine's time in backend reads and in decompression +
				# verification (summed over threads), against the read's
				# wall time in the line above.
				case $kind in lp-*)
					st=$("$BIN/lazypull" status --json 2>/dev/null || true)
					# (pretty-printed JSON: `"key": 123`)
					f=$(echo "$st" | grep -o '"fetch_micros": *[0-9]*' | head -1 | tr -dc 0-9)
					d=$(echo "$st" | grep -o '"decode_micros": *[0-9]*' | head -1 | tr -dc 0-9)
					echo "round=$round kind=$kind what=stages_$what fetch_us=${f:--1} decode_us=${d:--1}" >>"$RESULTS"
					;;
				esac
				stop_daemon "$kind"
			fi
		done
	done
done

# Profile: where a mount's time goes. For each daemon arm: the fscache
# statistics around the first mount (fresh cache: the kernel creates the volume
# and its objects) and a second mount with the same daemon (volume and cache
# files exist), mount(2)'s start and end, and the daemon's log at debug level.
# A kernel-only reference: 256 mkdirs on the cache file system (cachefiles
# creates a volume's 256 fan-out directories when it first acquires it).
round=0
perl -MTime::HiRes=time -e 'my $d = shift; mkdir $d; my $t0 = time;
	for my $i (0..255) { mkdir sprintf("%s/\@%02x", $d, $i) or die "mkdir: $!" }
	printf "mkdir256_us=%d\n", (time - $t0) * 1e6' "$CACHE/mkdir-probe" >"$LP_OUT/mkdir-probe"
rm -rf "$CACHE/mkdir-probe"
for kind in $KINDS; do
	[ "$kind" = limit ] && continue
	P="$LP_OUT/profile-$kind"
	mkdir -p "$P"
	level=debug
	case $kind in lp-*) level="info,lazypull_transport=debug" ;; esac
	start_daemon "$kind" "$level"
	for n in 1 2; do
		drop
		cat /proc/fs/fscache/stats >"$P/stats-before-$n"
		us=$(mount_erofs none /mnt/img "fsid=$(fsid_of "$kind")" stamps 2>"$P/stamps-$n")
		cat /proc/fs/fscache/stats >"$P/stats-after-$n"
		echo "mount_us=$us" >>"$P/stamps-$n"
		read_walk
		umount /mnt/img
	done
	stop_daemon "$kind"
	cp "$LOG" "$P/daemon.log"
	ls -R "$CACHE/fscache" | head -20 >"$P/cache-tree" || true
done
# The profile's own start and RSS lines are not the rounds'.
sed -i '/^round=0 /d' "$RESULTS"
cat "$RESULTS"
echo "--- last daemon log ---"
grep -v " INFO \|DEBUG" "$LOG" | tail -20 || true
