#!/usr/bin/env bash
# Disk space for scripts/test.sh. The suite needs room for its build (the target
# directory) and for its fixtures and guest disks (target/tmp and $TMPDIR, which are
# usually on the same file system); a machine short of it fails here, with the figures,
# rather than hours later with ENOSPC in some test.
#   check-disk.sh start    fail unless NEED_GIB are free where the build and the fixtures go
#   check-disk.sh watch    sample the least free space every 5 s (until killed)
#   check-disk.sh report   print the least free space seen by `watch`
set -euo pipefail
cd "$(dirname "$0")/.."
# Measured: a full run from a fresh clone (scripts/test.sh) took at most 5.4 GiB
# (target directory 4.5 GiB at the end, the guest fixtures and disks beside it),
# plus the fuzz build (1.5 GiB).
NEED_GIB=${LAZYPULL_DISK_NEED_GIB:-9}
target=${CARGO_TARGET_DIR:-$PWD/target}
mkdir -p "$target"
tmp=${TMPDIR:-/tmp}
log="$target/.disk-low-water"
avail_kib() { df -Pk "$1" | awk 'NR == 2 { print $4 }'; }
least() { # the smaller free space of the two places, in KiB
	local a b
	a=$(avail_kib "$target")
	b=$(avail_kib "$tmp")
	echo $((a < b ? a : b))
}
case "${1:-}" in
start)
	free=$(least)
	rm -f "$log"
	echo "$free" >"$log.start"
	echo "scripts/check-disk.sh: $((free / 1048576)) GiB free for the build ($target) and fixtures ($tmp)" >&2
	if [ "$free" -lt $((NEED_GIB * 1048576)) ]; then
		echo "scripts/check-disk.sh: the suite needs about $NEED_GIB GiB free there; only $((free / 1024)) MiB are: free some space (or point CARGO_TARGET_DIR and TMPDIR elsewhere)" >&2
		exit 1
	fi
	;;
watch)
	low=$(least)
	while :; do
		now=$(least)
		if [ "$now" -lt "$low" ]; then low=$now; fi
		echo "$low" >"$log"
		sleep 5
	done
	;;
report)
	if [ -f "$log" ]; then
		low=$(cat "$log")
		start=$(cat "$log.start" 2>/dev/null || echo "$low")
		echo "scripts/check-disk.sh: least free space during the run: $((low / 1024)) MiB (the run took up to $(((start - low) / 1024)) MiB)" >&2
	fi
	;;
*)
	echo "usage: check-disk.sh start|watch|report" >&2
	exit 2
	;;
esac
