#!/bin/bash
# Two images mounted at once, then two images sharing a domain_id and a data blob.
source "$LP_SCENARIOS/lib.sh"
setup_disks
start_daemon
A=$(cat "$LP_DATA/img-a")
B=$(cat "$LP_DATA/img-b")
BASE=$(cat "$LP_DATA/blob-base")

verify() { # verify MOUNTPOINT SUMFILE OUTNAME
	(cd "$1" && timeout 600 sha256sum -c --quiet "$2") >"$LP_OUT/$3" 2>&1 || fail "checksums differ under $1: $(head -5 "$LP_OUT/$3")"
}

mount_image "$A" /mnt/a || fail "mount A"
mount_image "$B" /mnt/b || fail "mount B"
verify /mnt/a "$LP_DATA/sample-a.sha256" check-a
verify /mnt/b "$LP_DATA/sample-b.sha256" check-b
umount /mnt/a /mnt/b
echo "two separate images: ok"

mark=$(wc -l <"$LOG")
mount_image "$A" /mnt/a domain_id=shared || fail "mount A in domain"
mount_image "$B" /mnt/b domain_id=shared || fail "mount B in domain"
verify /mnt/a "$LP_DATA/sample-a.sha256" check-a-domain
verify /mnt/b "$LP_DATA/sample-b.sha256" check-b-domain
# The shared data blob is one cookie in the domain's volume: opened once for both mounts.
tail -n +"$((mark + 1))" "$LOG" | grep "OPEN: serving blob" >"$LP_OUT/domain-opens" || true
echo "base blob opens in domain: $(grep -c "cookie=$BASE" "$LP_OUT/domain-opens" || true)"
umount /mnt/a /mnt/b
daemon_alive || fail "daemon died"
stop_daemon
