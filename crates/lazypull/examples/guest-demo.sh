#!/bin/bash
# The demo's guest side: serve the sample image lazily through cachefiles, read a
# few files, report what the daemon fetched. Env: LP_BIN, LP_DEMO (host dir).
set -euo pipefail
BLOBS=/run/lp/blobs CACHE=/run/lp/cache LOG=/run/lp/daemon.log
mkdir -p "$BLOBS" "$CACHE/fscache" /mnt/demo
mount -t ext4 /dev/vda "$BLOBS"
mount -t ext4 /dev/vdb "$CACHE"
"$LP_BIN" daemon --cache-dir "$CACHE/fscache" --blob-dir "$BLOBS" >"$LOG" 2>&1 &
DPID=$!
until grep -q "lazypull daemon ready" "$LOG"; do
	kill -0 "$DPID" 2>/dev/null || { cat "$LOG"; exit 1; }
	sleep 0.05
done
META=$(cat "$LP_DEMO/meta")
t0=$(date +%s%N)
mount -t erofs -o "fsid=$META" none /mnt/demo
t1=$(date +%s%N)
echo "mounted the image in $(((t1 - t0) / 1000000)) ms (nothing fetched but the meta blob's first window)"
read_bytes=0
while read -r path; do
	n=$(wc -c <"/mnt/demo/$path")
	read_bytes=$((read_bytes + n))
	printf '  read %-14s %4d bytes: %s\n' "$path" "$n" "$(head -c 60 "/mnt/demo/$path" | tr -c '[:print:]' ' ')"
done <"$LP_DEMO/read-list"
echo "$read_bytes" >"$LP_OUT/read-bytes"
echo "  the image holds $(find /mnt/demo | wc -l) entries, $(du -sm --apparent-size /mnt/demo | cut -f1) MiB; listing them fetched only metadata"
umount /mnt/demo
kill -TERM "$DPID"
wait "$DPID"
cp "$LOG" "$LP_OUT/daemon.log"
