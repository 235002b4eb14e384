#!/bin/bash
# containerd + runc in the test guest (run by tests/guest_containerd.rs). containerd and runc
# are the host's binaries (over the 9p root); containerd's root is on the ext4 disk /dev/vda,
# its state and sockets on tmpfs under /run. The scenario imports the image the host test built
# ($LP_IMAGE_TAR, named $LP_IMAGE) and runs one container from it with `ctr run --rm`.
#
# Writes to $LP_OUT: run.out (the container's stdout), root-fstype (the filesystem type of
# containerd's overlayfs snapshotter directory), times (seconds since the scenario started at
# each step), and containerd.log. On failure it quotes ctr's error and containerd's log.
set -euo pipefail

DISK=/mnt/lp-containerd
STATE=/run/lp-containerd
SOCK=$STATE/containerd.sock
LOG=$STATE/containerd.log
T0=$EPOCHREALTIME
CPID=

save_log() {
	[ -f "$LOG" ] && cp "$LOG" "$LP_OUT/containerd.log" || true
}

fail() {
	echo "SCENARIO FAILED: $*"
	if [ -f "$LOG" ]; then
		echo "--- containerd log (last 40 lines) ---"
		tail -n 40 "$LOG"
	fi
	save_log
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

for tool in containerd ctr containerd-shim-runc-v2 runc; do
	command -v "$tool" >/dev/null || fail "$tool not found in the guest's PATH (apt-get install containerd runc on the host)"
done
# Not fatal here: without cgroup v2, ctr run fails below with runc's own error.
if [ -r /sys/fs/cgroup/cgroup.controllers ]; then
	echo "cgroup controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
else
	echo "WARNING: cgroup v2 is not mounted at /sys/fs/cgroup (a guest kernel without CONFIG_CGROUPS?)"
fi

mkdir -p "$DISK" "$STATE"
mount -t ext4 /dev/vda "$DISK" || fail "mounting the ext4 disk /dev/vda"
cat >"$STATE/config.toml" <<EOF
version = 2
root = "$DISK/root"
state = "$STATE/state"
# No CRI (no kubelet here); no /opt/containerd (the root is read-only); no snapshotters
# other than overlayfs and native (they would only fail to load).
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
EOF

containerd --config "$STATE/config.toml" >>"$LOG" 2>&1 &
CPID=$!
ready=
for ((i = 0; i < 1200; i++)); do
	if [ -S "$SOCK" ] && [[ $(<"$LOG") == *"containerd successfully booted"* ]]; then
		ready=1
		break
	fi
	kill -0 "$CPID" 2>/dev/null || fail "containerd exited during start"
	sleep 0.1
done
[ -n "$ready" ] || fail "containerd did not come up in 120 s"
mark containerd-ready

ctr_ images import "$LP_IMAGE_TAR" >"$STATE/import.out" 2>&1 ||
	fail "ctr images import $LP_IMAGE_TAR failed: $(cat "$STATE/import.out")"
mark image-imported
stat -f -c %T "$DISK/root/io.containerd.snapshotter.v1.overlayfs" >"$LP_OUT/root-fstype" ||
	fail "containerd's overlayfs snapshotter directory is missing"

# The container's program (the image's Cmd) tries to read this block device after mknod;
# runc's device filter (an eBPF program on the container's cgroup) must refuse the open.
block=$(cat /sys/block/vda/dev)
if ! ctr_ run --rm --env "LP_BLOCK=$block" "$LP_IMAGE" c1 >"$LP_OUT/run.out" 2>"$STATE/run.err"; then
	echo "--- container stdout ---"
	cat "$LP_OUT/run.out"
	err=$(cat "$STATE/run.err")
	# runc's own words (nsexec's errors, a Go panic) go to its stderr, which during `create`
	# is the container's, and the shim drops it when creation fails. A second try through a
	# wrapper that sends runc's stderr to a file recovers them.
	printf '#!/bin/bash\nexec 2>>%s/runc.stderr\nexec runc "$@"\n' "$STATE" >"$STATE/runc-stderr"
	chmod 755 "$STATE/runc-stderr"
	ctr_ run --rm --runc-binary "$STATE/runc-stderr" "$LP_IMAGE" c1-diag >/dev/null 2>&1 || true
	fail "ctr run failed: $err
--- runc's stderr on a second try ---
$(head -n 30 "$STATE/runc.stderr" 2>/dev/null)"
fi
mark container-done
echo "--- container stdout ---"
cat "$LP_OUT/run.out"
left=$(ctr_ containers ls -q)
[ -z "$left" ] || fail "ctr run --rm left containers behind: $left"

kill -TERM "$CPID"
wait "$CPID" || true
save_log
mark containerd-stopped
