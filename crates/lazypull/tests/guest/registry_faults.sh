#!/bin/bash
# Reads through a proxy that injects 5xx answers, connection resets, truncated
# bodies, slow responses and a corrupted body into the data blob's Range
# requests, on a schedule per byte range (FAULTS in guest_registry.rs): every
# new range fails its first two tries, so the third (retries = 3 counts tries)
# must get it; the first one comes back corrupted once. Every read must return
# the right bytes (the first file's may fail with EIO), never wrong bytes; the
# second pass reads everything right; and the daemon keeps serving a healthy
# image meanwhile. The request timeout, and a Range request's deadline (4 s +
# its bytes at 4 MiB/s: at most 5 s for the 4 MiB merged ranges), are short
# enough that the proxy's slow answers (8 s) always time out, and long enough
# that no clean one does.
source "$LP_SCENARIOS/lib.sh"
setup_disks
network_up
cat >/run/lp/daemon.toml <<TOML
request_timeout_secs = 4
range_deadline_secs = 4
min_throughput = "4MiB"
retries = 3
TOML
start_daemon --work-dir "$CACHE/work" --config /run/lp/daemon.toml
FAULTY=10.0.2.2:$LP_FAULT_PORT
CLEAN=10.0.2.2:$LP_PROXY_PORT

lp_mount faulty "$FAULTY/lp/faults:v1" /mnt/f --insecure || fail "mounting through the faulty proxy"
mkdir -p /run/lp/f
: >"$LP_OUT/faults.results"
while read -r sum path; do
	rc=0
	got=$(timeout 300 sha256sum "/mnt/f/$path" 2>"/run/lp/f/err") || rc=$?
	echo "$path rc=$rc got=${got%% *} err=$(tr '\n' ' ' </run/lp/f/err)" >>"$LP_OUT/faults.results"
done <"$LP_DATA/faults.sha256"
# A second pass: what failed before succeeds now; what succeeded stays right.
: >"$LP_OUT/faults.results2"
while read -r sum path; do
	rc=0
	got=$(timeout 300 sha256sum "/mnt/f/$path" 2>"/run/lp/f/err") || rc=$?
	echo "$path rc=$rc got=${got%% *} err=$(tr '\n' ' ' </run/lp/f/err)" >>"$LP_OUT/faults.results2"
done <"$LP_DATA/faults.sha256"

# Every fetch of this image's data comes back corrupted: EIO, never its bytes.
lp_mount doomed "10.0.2.2:$LP_BROKEN_PORT/lp/doomed:v1" /mnt/d --insecure || fail "mounting the doomed image"
rc=0
timeout 300 cat /mnt/d/file.bin >/dev/null 2>/run/lp/d.err || rc=$?
echo "rc=$rc err=$(cat /run/lp/d.err)" | tee "$LP_OUT/doomed.result"

# The daemon still serves another image, through the healthy proxy.
daemon_alive || fail "daemon died under faults"
lp_mount healthy "$CLEAN/lp/conc:v1" /mnt/h --insecure || fail "mounting a healthy image after the faults"
sha256sum /mnt/h/shared.bin | sed 's#  /mnt/h/#  #' >"$LP_OUT/healthy.sum" || fail "reading the healthy image"
"$LP_BIN" status --json >"$LP_OUT/status.json" || fail "lazypull status"
"$LP_BIN" umount /mnt/f || fail "umount /mnt/f"
"$LP_BIN" umount /mnt/h || fail "umount /mnt/h"
"$LP_BIN" umount /mnt/d || fail "umount /mnt/d"
stop_daemon
