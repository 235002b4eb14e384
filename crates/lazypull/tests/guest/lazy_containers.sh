#!/bin/bash
# A lazy image run as a container in the test guest through the cachefiles transport (run by
# tests/guest_lazy_containers.rs). The host runs docker-registry (reached at 10.0.2.2) holding
# the lazy image $LP_REF. Here: `lazypull daemon --transport cachefiles` (cache and work dir on
# the ext4 disk /dev/vda), `lazypull snapshotter` (root on that disk) as containerd's proxy
# snapshotter `lazypull`, containerd (the host's, over the 9p root; its root on the disk, its
# state on tmpfs), then `lazypull pull`, `ctr run --rm --snapshotter lazypull`, a view of the
# image (to see its mount), `ctr images rm --sync`.
#
# Markers in the registry's access log (requests for /v2/lazypull-marker/manifests/NAME) let
# the host tell what was fetched before the container ran from what was fetched while it ran.
#
# Writes to $LP_OUT: pull.json, run.out (the container's stdout), view-mount (the lazy mount's
# /proc/self/mountinfo line while the view held it), lazy-mounts-after-run (those left once
# containerd collected the container's snapshot), status.json and status.txt (`lazypull
# status` then), reread.sum and status-reread.json (the big file read again through that mount,
# and the status after), snapshots-after-rm, lazy-mounts-after-rm, times, and the logs of
# containerd, the daemon and the snapshotter. On failure it quotes the failing tool and the logs' tails.
set -euo pipefail

DISK=/mnt/lp-lazy
STATE=/run/lp-lazy
SOCK=$STATE/containerd.sock
CLOG=$STATE/containerd.log
CONTROL=$STATE/lazypull.sock
DLOG=$STATE/daemon.log
SNAP_ROOT=$DISK/snapshotter
SNAP_SOCK=$STATE/snapshotter.sock
SLOG=$STATE/snapshotter.log
T0=$EPOCHREALTIME
CPID= DPID= SPID=

save_logs() {
	local f
	for f in "$CLOG" "$DLOG" "$SLOG"; do
		[ -f "$f" ] && cp "$f" "$LP_OUT/" || true
	done
}

fail() {
	echo "SCENARIO FAILED: $*"
	local f
	for f in "$CLOG" "$DLOG" "$SLOG"; do
		if [ -f "$f" ]; then
			echo "--- $(basename "$f") (last 30 lines) ---"
			tail -n 30 "$f"
		fi
	done
	save_logs
	exit 1
}

# mark NAME: records the time since the scenario started (bash builtins only).
mark() {
	local now=$EPOCHREALTIME
	local s=$((${now/./} - ${T0/./}))
	printf '%s %d.%06d\n' "$1" $((s / 1000000)) $((s % 1000000)) | tee -a "$LP_OUT/times"
}

ctr_() {
	ctr --address "$SOCK" "$@"
}

# registry_marker NAME: one request the registry logs (it answers 404), over bash's /dev/tcp.
registry_marker() {
	exec 3<>"/dev/tcp/10.0.2.2/$LP_REG_PORT" || fail "cannot reach the registry at 10.0.2.2:$LP_REG_PORT"
	printf 'GET /v2/lazypull-marker/manifests/%s HTTP/1.0\r\nHost: 10.0.2.2\r\n\r\n' "$1" >&3
	cat <&3 >/dev/null
	exec 3<&-
}

# wait_for WHAT PID SECONDS COMMAND...: polls COMMAND every 0.1 s while PID lives.
wait_for() {
	local what=$1 pid=$2 secs=$3 i
	shift 3
	for ((i = 0; i < secs * 10; i++)); do
		"$@" 2>/dev/null && return 0
		kill -0 "$pid" 2>/dev/null || fail "$what exited during start"
		sleep 0.1
	done
	fail "$what did not come up in $secs s"
}

# Mounts (mountinfo lines) under the snapshotter's lazy image directory.
lazy_mounts() {
	awk -v d="$SNAP_ROOT/lazy/" 'index($5, d) == 1' /proc/self/mountinfo
}

for tool in containerd ctr containerd-shim-runc-v2 runc; do
	command -v "$tool" >/dev/null || fail "$tool not found in the guest's PATH (apt-get install containerd runc on the host)"
done
[ -x "$LP_BIN" ] || fail "the lazypull binary $LP_BIN is missing"

ip link set lo up || fail "lo up"
ip link set eth0 up || fail "eth0 up (no network card?)"
ip addr add 10.0.2.15/24 dev eth0 || fail "eth0 address"
ip route add default via 10.0.2.2 || fail "default route"

mkdir -p "$DISK" "$STATE"
chmod 0700 "$STATE"
mount -t ext4 /dev/vda "$DISK" || fail "mounting the ext4 disk /dev/vda"
mkdir -p -m 0700 "$DISK/cache" "$DISK/work" "$SNAP_ROOT"

# The daemon: cachefiles only (no fallback to FUSE) unless LP_TRANSPORT says
# otherwise, the registry over plain HTTP.
"$LP_BIN" daemon --config /dev/null --transport "${LP_TRANSPORT:-cachefiles}" \
	--cache-dir "$DISK/cache" --work-dir "$DISK/work" --run-dir "$STATE/run" \
	--socket "$CONTROL" --no-fd-store --insecure-registry "$LP_REG" \
	--log-level info >>"$DLOG" 2>&1 &
DPID=$!
wait_for "lazypull daemon" "$DPID" 60 grep -q "lazypull daemon ready" "$DLOG"
mark daemon-ready

LAZYPULL_LOG=info "$LP_BIN" snapshotter --root "$SNAP_ROOT" --address "$SNAP_SOCK" \
	--daemon-socket "$CONTROL" >>"$SLOG" 2>&1 &
SPID=$!
wait_for "lazypull snapshotter" "$SPID" 60 test -S "$SNAP_SOCK"
mark snapshotter-ready

cat >"$STATE/config.toml" <<EOF
version = 2
root = "$DISK/containerd"
state = "$STATE/state"
# No CRI (no kubelet here); no /opt/containerd (the root is read-only); no snapshotters
# that would only fail to load.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$STATE/containerd.sock.ttrpc"

[proxy_plugins]
  [proxy_plugins.lazypull]
    type = "snapshot"
    address = "$SNAP_SOCK"
EOF
containerd --config "$STATE/config.toml" >>"$CLOG" 2>&1 &
CPID=$!
booted() { [ -S "$SOCK" ] && [[ $(<"$CLOG") == *"containerd successfully booted"* ]]; }
wait_for containerd "$CPID" 120 booted
mark containerd-ready

registry_marker before-pull
"$LP_BIN" pull --address "$SOCK" --insecure --json "$LP_REF" >"$LP_OUT/pull.json" 2>"$STATE/pull.err" ||
	fail "lazypull pull $LP_REF failed: $(cat "$STATE/pull.err")"
mark pulled

registry_marker before-run
if ! ctr_ --timeout 300s run --rm --snapshotter lazypull "$LP_REF" c1 >"$LP_OUT/run.out" 2>"$STATE/run.err"; then
	echo "--- container stdout ---"
	cat "$LP_OUT/run.out"
	fail "ctr run failed: $(cat "$STATE/run.err")"
fi
registry_marker after-run
mark container-done
echo "--- container stdout ---"
cat "$LP_OUT/run.out"
left=$(ctr_ containers ls -q)
[ -z "$left" ] || fail "ctr run --rm left containers behind: $left"

# containerd removes the container's snapshot from the snapshotter in its garbage collection,
# soon after `ctr run --rm` returns; with it the lazy mount goes (no other snapshot uses it).
for ((i = 0; i < 300; i++)); do
	[ -z "$(lazy_mounts)" ] && break
	sleep 0.1
done
lazy_mounts >"$LP_OUT/lazy-mounts-after-run"
mark container-snapshot-gone

# A view of the image holds its lazy mount: show it, and the daemon's status with it. Labelled
# a garbage collection root: containerd collects unreferenced snapshots (ctr makes no lease).
ctr_ snapshots --snapshotter lazypull view lp-view "$LP_TOP_CHAIN" >/dev/null 2>"$STATE/view.err" ||
	fail "ctr snapshots view failed: $(cat "$STATE/view.err")"
ctr_ snapshots --snapshotter lazypull label lp-view containerd.io/gc.root=lazypull-test >/dev/null ||
	fail "ctr snapshots label lp-view"
lazy_mounts >"$LP_OUT/view-mount"
"$LP_BIN" status --socket "$CONTROL" --json >"$LP_OUT/status.json" || fail "lazypull status --json"
"$LP_BIN" status --socket "$CONTROL" >"$LP_OUT/status.txt" || fail "lazypull status"
cat "$LP_OUT/status.txt"
# The file the container read, again, through the new mount: the kernel's cache (cachefiles'
# files on the ext4 disk) outlived the container's mount, so no READ reaches the daemon.
sha256sum "$SNAP_ROOT/lazy/$LP_META/$LP_BIG_FILE" >"$LP_OUT/reread.sum" || fail "reading $LP_BIG_FILE through the view's mount"
"$LP_BIN" status --socket "$CONTROL" --json >"$LP_OUT/status-reread.json" || fail "lazypull status --json"
ctr_ snapshots --snapshotter lazypull rm lp-view || fail "ctr snapshots rm lp-view"
mark viewed

registry_marker after-view
ctr_ images rm --sync "$LP_REF" >/dev/null || fail "ctr images rm --sync $LP_REF"
# The garbage collector removes the chain after the image record is gone.
for ((i = 0; i < 100; i++)); do
	[ -z "$(ctr_ snapshots --snapshotter lazypull ls | tail -n +2)" ] && break
	sleep 0.1
done
ctr_ snapshots --snapshotter lazypull ls | tail -n +2 >"$LP_OUT/snapshots-after-rm"
lazy_mounts >"$LP_OUT/lazy-mounts-after-rm"
mark image-removed

kill -TERM "$CPID"
wait "$CPID" || true
kill -TERM "$SPID"
wait "$SPID" || true
kill -0 "$DPID" 2>/dev/null || fail "the daemon died"
kill -TERM "$DPID"
wait "$DPID" || true
save_logs
mark stopped
