#!/bin/bash
# Images mounted by reference from a real registry (docker-registry on the host,
# behind the logging proxy, reached at 10.0.2.2): a realistic tree read whole,
# one small file of a 300 MB image, 64 concurrent readers of the same chunks,
# and a registry with htpasswd auth (no / wrong / right credentials).
source "$LP_SCENARIOS/lib.sh"
setup_disks
network_up
start_daemon --work-dir "$CACHE/work" --blob-url "http://10.0.2.2:$LP_HTTP_PORT/blobs/"
REG=10.0.2.2:$LP_PROXY_PORT
AUTH=10.0.2.2:$LP_AUTH_PORT

# 1. The realistic tree: time from `lazypull mount` to the first byte of a file,
# then every file and its metadata.
t0=$(now_ms)
lp_mount tree "$REG/lp/tree:v1" /mnt/tree --insecure || fail "mounting the tree"
head -c 1 "/mnt/tree/$(cat "$LP_DATA/first-byte-file")" >/dev/null || fail "first byte"
t1=$(now_ms)
echo "mount_to_first_byte_ms=$((t1 - t0))" | tee "$LP_OUT/first-byte"
timeout 1200 "$LP_TESTKIT" manifest /mnt/tree >"$LP_OUT/manifest.tree" || fail "walking the tree"

# 2. One small file of the 300 MB image.
lp_mount big "$REG/lp/big:v1" /mnt/big --insecure || fail "mounting the big image"
sha256sum /mnt/big/etc/small.txt | sed 's#  /mnt/big/#  #' >"$LP_OUT/big.sum" || fail "reading the small file"

# 3. 64 concurrent readers over the same chunks, all cold.
lp_mount conc "$REG/lp/conc:v1" /mnt/conc --insecure || fail "mounting the concurrency image"
mkdir -p /run/lp/conc
pids=()
for i in $(seq 64); do
	f=shared.bin
	[ $((i % 4)) = 0 ] && f=other.bin
	sha256sum "/mnt/conc/$f" >"/run/lp/conc/$i" &
	pids+=($!)
done
wait_all 600 "${pids[@]}"
cat /run/lp/conc/* | sed 's#  /mnt/conc/#  #' | sort | uniq -c | sed 's/^ *//' >"$LP_OUT/conc.sums"

# 4. Authentication: none, wrong, right.
lp_mount noauth "$AUTH/lp/private:v1" /mnt/auth --insecure && fail "mount without credentials succeeded"
LAZYPULL_REGISTRY_USER=alice LAZYPULL_REGISTRY_PASSWORD=wrong \
	lp_mount badauth "$AUTH/lp/private:v1" /mnt/auth --insecure && fail "mount with a wrong password succeeded"
LAZYPULL_REGISTRY_USER=alice LAZYPULL_REGISTRY_PASSWORD=secret \
	lp_mount auth "$AUTH/lp/private:v1" /mnt/auth --insecure || fail "mount with the right credentials failed"
sha256sum /mnt/auth/secret.bin | sed 's#  /mnt/auth/#  #' >"$LP_OUT/auth.sum" || fail "reading through auth"

# 5. A blob directory on a plain web server (Range requests), mounted by fsid.
# Registered first (lazypull mount --fsid): the daemon serves bytes from the
# web server only for an image whose meta blob (its fsid) vouches for them.
"$LP_BIN" mount --fsid "$(cat "$LP_DATA/web-meta")" /mnt/web || fail "mounting the image served over HTTP"
(cd /mnt/web && sha256sum $(cut -d' ' -f3 "$LP_DATA/web.sums")) >"$LP_OUT/web.sums" || fail "reading over HTTP"
"$LP_BIN" umount /mnt/web || fail "lazypull umount /mnt/web"
# The kernel's cache outlives the daemon: the name -> chunk table bindings it
# holds bytes under are kept for later daemons (0600, in the work dir).
grep -q "$(cat "$LP_DATA/web-meta")" "$CACHE/work/kernel-bindings.json" || fail "the kernel bindings file does not name the web image"
[ "$(stat -c %a "$CACHE/work/kernel-bindings.json")" = 600 ] || fail "the kernel bindings file is not 0600"

# 6. Prefetch: the whole image, then a list of files.
prefetched() { # N: waits until N prefetches have finished
	local i
	for i in $(seq 600); do
		[ "$(grep -c "prefetch finished" "$LOG")" -ge "$1" ] && return 0
		sleep 0.1
	done
	fail "prefetch did not finish"
}
lp_mount pall "$REG/lp/pall:v1" /mnt/pall --insecure --prefetch-all || fail "mounting with --prefetch-all"
prefetched 1
"$LP_BIN" status --json >"$LP_OUT/pall-0.json"
(cd /mnt/pall && sha256sum a.bin b.bin) >"$LP_OUT/pall.sums" || fail "reading the prefetched image"
"$LP_BIN" status --json >"$LP_OUT/pall-1.json"
lp_mount plist "$REG/lp/plist:v1" /mnt/plist --insecure --prefetch-list "$LP_DATA/plist.txt" || fail "mounting with --prefetch-list"
prefetched 2
"$LP_BIN" status --json >"$LP_OUT/plist-0.json"
(cd /mnt/plist && sha256sum b.bin) >"$LP_OUT/plist.sums" || fail "reading the listed file"
"$LP_BIN" status --json >"$LP_OUT/plist-1.json"
(cd /mnt/plist && sha256sum a.bin) >>"$LP_OUT/plist.sums" || fail "reading the unlisted file"
"$LP_BIN" status --json >"$LP_OUT/plist-2.json"

"$LP_BIN" status --json >"$LP_OUT/status.json" || fail "lazypull status"
for m in /mnt/tree /mnt/big /mnt/conc /mnt/auth /mnt/pall /mnt/plist; do
	"$LP_BIN" umount "$m" || fail "lazypull umount $m"
done
daemon_alive || fail "daemon died"
stop_daemon
