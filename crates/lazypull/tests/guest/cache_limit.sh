#!/bin/bash
# cache_limit on cachefiles: idle objects culled, least recently used first.
source "$LP_SCENARIOS/lib.sh"
setup_disks
start_daemon --cache-limit 30MiB
F=$(cat "$LP_DATA/img-f")
G=$(cat "$LP_DATA/img-g")
H=$(cat "$LP_DATA/img-h")

verify() { # verify MOUNTPOINT SUMFILE OUTNAME
	(cd "$1" && timeout 600 sha256sum -c --quiet "$2") >"$LP_OUT/$3" 2>&1 || fail "checksums differ under $1: $(head -5 "$LP_OUT/$3")"
}
cache_kib() { du -sk "$CACHE/fscache" | cut -f1; }

# Sample the cache's size, as often as du can, while images are read one at a time.
(while :; do cache_kib >>"$LP_OUT/du-samples"; done) &
SAMPLER=$!
one() { # one NAME IMAGE
	mount_image "$2" "/mnt/$1" || fail "mount $1"
	verify "/mnt/$1" "$LP_DATA/$1.sha256" "check-$1"
	umount "/mnt/$1"
	echo "$1 read alone; cache $(cache_kib) KiB"
}
one f "$F"
one g "$G"
one h "$H"   # f's objects are the least recently used: culled
one f "$F"   # read right again, fetched anew; g's culled
# A write shows in a cache file's blocks a moment after the daemon made it:
# sample on for a while.
sleep 3
kill "$SAMPLER"
wait "$SAMPLER" 2>/dev/null || true
"$LP_BIN" status --json >"$LP_OUT/status.json" || fail "status"

# All three mounted: every object is in use, the cache goes over its limit.
for n in f g h; do
	img=$(cat "$LP_DATA/img-$n")
	mount_image "$img" "/mnt/$n" || fail "mount $n"
done
for n in f g h; do verify "/mnt/$n" "$LP_DATA/$n.sha256" "check-all-$n"; done
echo "three mounted: cache $(cache_kib) KiB"
"$LP_BIN" status --json >"$LP_OUT/status-over.json" || fail "status"
umount /mnt/f /mnt/g /mnt/h
# Idle again: the next read's culling (or the 5 s pass) brings it back.
one g "$G"
sleep 6
echo "kib=$(cache_kib)" >"$LP_OUT/after-over"
grep -c "over its limit" "$LOG" >"$LP_OUT/over-logged" || true
grep -i "cull\|limit\|CLOSE\|in use" "$LOG" | cut -c1-250 | head -60
daemon_alive || fail "daemon died"
stop_daemon
