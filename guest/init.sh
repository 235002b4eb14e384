#!/bin/bash
# PID 1 of the lazypull test guest (booted by crates/guest via `init=`).
#
# The root filesystem is the host's `/`, read-only over 9p, so every host binary and every
# host path is visible at the same place. This script makes the few writable places a test
# needs (tmpfs on /run, /mnt, /dev/shm; tmpfs-backed overlays on /tmp and /var/tmp, which keep
# showing the host's files), what containers need (cgroup v2 at /sys/fs/cgroup with every
# controller enabled for child cgroups, devpts, mqueue at /dev/mqueue), mounts the read-write
# output share, runs the scenario script and records its result, then reboots, which ends
# qemu (`-no-reboot`). If anything goes wrong before the scenario starts, it says so on the
# console and reboots without a `started` file.
#
# Parameters arrive from the kernel command line (unknown NAME=value words become our
# environment; names cannot contain dots):
#   LP_OUT_TAG   9p mount tag of the read-write output share (default lpout)
#   LP_OUT_MNT   where to mount it in the guest (default /run/lp-out)
# Inside the share, `.lp/` is the control directory shared with the host:
#   .lp/scenario  the scenario script (run directly; bash runs it if it has no #! line)
#   .lp/env       optional shell file of `export NAME='value'` lines for the scenario
#   .lp/started   written just before the scenario starts
#   .lp/log       the scenario's stdout+stderr (also copied to the serial console)
#   .lp/status    the scenario's exit status, written when it has exited
# The scenario runs in /tmp with HOME=/tmp, stdin from /dev/null and LP_OUT set to the share.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp
export LANG=C.UTF-8
umask 022

LP_OUT_TAG=${LP_OUT_TAG:-lpout}
LP_OUT_MNT=${LP_OUT_MNT:-/run/lp-out}

say() { echo "lp-init: $*"; }

uptime_s() {
	local up _
	read -r up _ </proc/uptime 2>/dev/null && echo "${up}s"
}

# End the guest: flush, then reboot(2) directly (qemu runs with -no-reboot, so a reboot
# exits qemu). perl is part of every Debian system; if the call fails, exiting makes the
# kernel panic, which with panic=-1 reboots as well.
finish() {
	# 162 is sync(2), 169 reboot(2) on x86_64.
	perl -e 'syscall(162); syscall(169, 0xfee1dead, 672274793, 0x01234567)' 2>/dev/null
	sync
	say "reboot(2) failed; exiting PID 1 instead"
	exit 1
}

die() {
	say "FATAL: $*"
	finish
}

if [ "$$" != 1 ]; then
	echo "lp-init: this is the test guest's init; it must run as PID 1 inside the guest" >&2
	exit 2
fi

# Every exec costs ~0.1 s under TCG, so one perl process (perl-base is Essential in Debian)
# does all the mkdirs, symlinks and mounts; without perl, plain mkdir/ln/mount do it.
# Each argument is one step, fields separated by '|':
#   dir|PATH|MODE          mkdir -p PATH; chmod MODE PATH
#   link|TARGET|PATH       symlink PATH -> TARGET unless PATH exists
#   mount|TYPE|SRC|DST|DATA    mount (creating DST); mount? skips an already mounted DST;
#                              else|... is tried only if the mount on the same DST failed
#                              try|... is a mount whose failure is only reported
setup() {
	if command -v perl >/dev/null; then
		perl -e '
			use strict;
			my %failed;
			sub mkdir_p { my $p = ""; for (grep { length } split m{/}, $_[0]) { $p .= "/$_"; mkdir $p } -d $_[0] }
			sub mounted {
				open(my $f, "<", "/proc/self/mounts") or return 0;
				while (<$f>) { return 1 if (split)[1] eq $_[0] }
				return 0;
			}
			for (@ARGV) {
				my ($op, @a) = split /\|/, $_, -1;
				if ($op eq "dir") {
					mkdir_p($a[0]) or warn "lp-init: mkdir $a[0]: $!\n";
					chmod(oct($a[1]), $a[0]);
				} elsif ($op eq "link") {
					symlink($a[0], $a[1]) unless -e $a[1] or -l $a[1];
				} else {
					my ($type, $src, $dst, $data) = @a;
					next if $op eq "mount?" and mounted($dst);
					my $try = $op eq "try";
					next if $op eq "else" and !$failed{$dst};
					mkdir_p($dst);
					# 165 is mount(2) on x86_64.
					if (syscall(165, $src, $dst, $type, 0, $data) == 0) {
						delete $failed{$dst};
					} else {
						warn "lp-init: mount -t $type $src $dst -o $data: $!\n";
						$failed{$dst} = 1 unless $try;
					}
				}
			}
			exit(%failed ? 1 : 0);
		' "$@"
		return
	fi
	local step op a b c d rc=0 failed=""
	for step in "$@"; do
		IFS='|' read -r op a b c d <<<"$step"
		case $op in
		dir) mkdir -p "$a" && chmod "$b" "$a" ;;
		link) [ -e "$b" ] || [ -L "$b" ] || ln -s "$a" "$b" ;;
		try)
			mkdir -p "$c" 2>/dev/null
			mount -t "$a" -o "$d" "$b" "$c" || true
			;;
		mount | mount\? | else)
			if [ "$op" = "mount?" ] && grep -qs "^[^ ]* $c " /proc/self/mounts; then continue; fi
			if [ "$op" = else ] && [ "$failed" != "$c" ]; then continue; fi
			mkdir -p "$c"
			if mount -t "$a" -o "$d" "$b" "$c"; then failed=""; else failed=$c; rc=1; fi
			;;
		esac
	done
	[ -z "$failed" ] && return 0
	return $rc
}

# /tmp and /var/tmp: writable, yet still showing the host's files (test data the host made
# under /tmp stays visible at the same path): an overlay whose upper layer is on /run.
# If the overlay cannot be made they are empty tmpfs instead.
setup \
	"mount?|proc|proc|/proc|" \
	"mount?|sysfs|sysfs|/sys|" \
	"mount?|devtmpfs|devtmpfs|/dev|" \
	"link|/proc/self/fd|/dev/fd" \
	"link|/proc/self/fd/0|/dev/stdin" \
	"link|/proc/self/fd/1|/dev/stdout" \
	"link|/proc/self/fd/2|/dev/stderr" \
	"mount|devpts|devpts|/dev/pts|gid=5,mode=620,ptmxmode=666" \
	"mount|tmpfs|tmpfs|/dev/shm|mode=1777" \
	"mount|tmpfs|tmpfs|/run|mode=0755" \
	"mount|tmpfs|tmpfs|/mnt|mode=0755" \
	"dir|/run/lp-ovl/tmp/upper|1777" "dir|/run/lp-ovl/tmp/work|0755" \
	"mount|overlay|overlay|/tmp|lowerdir=/tmp,upperdir=/run/lp-ovl/tmp/upper,workdir=/run/lp-ovl/tmp/work" \
	"else|tmpfs|tmpfs|/tmp|mode=1777" \
	"dir|/run/lp-ovl/var/tmp/upper|1777" "dir|/run/lp-ovl/var/tmp/work|0755" \
	"mount|overlay|overlay|/var/tmp|lowerdir=/var/tmp,upperdir=/run/lp-ovl/var/tmp/upper,workdir=/run/lp-ovl/var/tmp/work" \
	"else|tmpfs|tmpfs|/var/tmp|mode=1777" \
	"try|cgroup2|cgroup2|/sys/fs/cgroup|" \
	"try|mqueue|mqueue|/dev/mqueue|" \
	"mount|9p|$LP_OUT_TAG|$LP_OUT_MNT|trans=virtio,version=9p2000.L,msize=512000,cache=none" ||
	die "setting up the guest's filesystems failed (see above)"

# Containers: runc (cgroupfs driver) creates each container's cgroup below the root and
# enables controllers on the way down; enabling them all at the root here (bash builtins, no
# exec) lets any scenario use them too. Without cgroup v2 (a kernel built without CGROUPS)
# the cgroup2 mount above only warned: the other scenarios do not need it, and runc fails
# naming what is missing.
if [ -r /sys/fs/cgroup/cgroup.controllers ]; then
	read -r controllers </sys/fs/cgroup/cgroup.controllers
	for c in $controllers; do
		echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control || say "enabling cgroup controller $c failed"
	done
	unset c controllers
fi

ctl=$LP_OUT_MNT/.lp
[ -f "$ctl/scenario" ] || die "no scenario at $ctl/scenario"
export LP_OUT=$LP_OUT_MNT

# Keep init's own parameters out of the scenario's environment.
unset LP_OUT_TAG LP_OUT_MNT
if [ -f "$ctl/env" ]; then
	# shellcheck disable=SC1091
	. "$ctl/env" || die "sourcing $ctl/env failed"
fi

cd /tmp || die "cd /tmp failed"
say "running scenario at $(uptime_s)"
echo "$(uptime_s)" >"$ctl/started" || die "cannot write to the output share"

# Copy the scenario's output to the console and to the log. The scenario runs in the
# background and is waited for by pid, so daemons it leaves behind (holding the pipe open)
# cannot keep us from finishing.
exec 3> >(exec tee -a "$ctl/log")
teepid=$!
"$ctl/scenario" </dev/null >&3 2>&3 &
scenario_pid=$!
wait "$scenario_pid"
status=$?
exec 3>&-
say "scenario exited with status $status at $(uptime_s)"

# Stop whatever the scenario left running (except tee, which drains the log), give tee a
# moment to see end-of-file, then kill everything that is left.
for p in /proc/[0-9]*; do
	pid=${p#/proc/}
	[ "$pid" = 1 ] || [ "$pid" = "$teepid" ] || kill -TERM "$pid" 2>/dev/null
done
for ((i = 0; i < 30; i++)); do
	state=Z
	[ -r "/proc/$teepid/stat" ] && read -r _ _ state _ <"/proc/$teepid/stat"
	[ "$state" = Z ] && break
	sleep 0.1
done
kill -KILL -1 2>/dev/null

echo "$status" >"$ctl/status" || say "writing the status failed"
finish
