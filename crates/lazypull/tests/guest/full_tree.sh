#!/bin/bash
# One image (two data blobs) served through cachefiles: 32 concurrent cold readers,
# then every file and its metadata, then a second pass after drop_caches that must
# not reach the daemon, then umount → CLOSE and every anon fd released.
source "$LP_SCENARIOS/lib.sh"
setup_disks
start_daemon
IMG=$(cat "$LP_DATA/img-a")

mount_image "$IMG" /mnt/a || fail "mount of image A failed: $(tail -5 "$LOG")"
echo "mounted A; daemon holds $(anon_fds) anon fds"

# The meta blob is filled whole right after its OPEN: once that is done, a
# metadata walk sends no READ for it.
for _ in $(seq 200); do grep -q "meta blob filled up front" "$LOG" && break; sleep 0.05; done
grep -q "meta blob filled up front" "$LOG" || fail "meta blob not filled up front: $(tail -5 "$LOG")"
meta_object=$(sed -n "s/.*OPEN: serving blob object=\([0-9]*\) volume=erofs,$IMG cookie=$IMG .*/\1/p" "$LOG")
[ -n "$meta_object" ] || fail "no OPEN of the meta blob in the log"
meta_reads() { grep -c "READ msg_id=[0-9]* object=$meta_object " "$LOG" || true; }
meta_reads_mount=$(meta_reads)
find /mnt/a -printf '%s\n' >/dev/null || fail "metadata walk"
echo "meta_reads_mount=$meta_reads_mount meta_reads_walk=$(($(meta_reads) - meta_reads_mount))" | tee "$LP_OUT/meta_reads"

# 32 concurrent readers of different files, all cold.
mkdir -p /run/lp/sums
i=0
pids=()
while read -r sum path; do
	sha256sum "/mnt/a/$path" >"/run/lp/sums/$i" &
	pids+=($!)
	i=$((i + 1))
done <"$LP_DATA/concurrent.sha256"
wait_all 300 "${pids[@]}"
[ "$(cat /run/lp/sums/* | wc -l)" = "$i" ] || fail "a concurrent reader failed or hung"
cat /run/lp/sums/* | sed 's#  /mnt/a/#  #' | sort -k2 >"$LP_OUT/concurrent.got"
echo "concurrent readers done: $i"

# Every file: bytes and metadata.
timeout 1200 "$LP_TESTKIT" manifest /mnt/a >"$LP_OUT/manifest.first" || fail "first walk"
reads_first=$(read_count)

echo 3 >/proc/sys/vm/drop_caches
timeout 1200 "$LP_TESTKIT" manifest /mnt/a >"$LP_OUT/manifest.second" || fail "second walk"
reads_second=$(read_count)
echo "reads_first=$reads_first reads_second=$reads_second" | tee "$LP_OUT/reads"

fds_mounted=$(anon_fds)
umount /mnt/a
# CLOSE arrives asynchronously after umount; give the daemon a moment.
for _ in $(seq 100); do [ "$(anon_fds)" = 0 ] && break; sleep 0.05; done
echo "anon_fds_mounted=$fds_mounted anon_fds_after_umount=$(anon_fds)" | tee "$LP_OUT/fds"
echo "hwm_kib=$(daemon_hwm_kib)" | tee "$LP_OUT/rss"
daemon_alive || fail "daemon died"
stop_daemon
