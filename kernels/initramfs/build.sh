#!/usr/bin/env bash
# kernels/initramfs/build.sh AGENT_BINARY MODULES_DIR OUT.cpio.gz
#
# Packs the production initramfs of the micro-VM guests (newc cpio, gzip):
#   /init                      the static vm-agent binary
#   /lib/modules/*.ko          the files of MODULES_DIR (flat)
#   /lib/modules/modules.order the load order (from MODULES_DIR; empty when
#                              MODULES_DIR is "none", for kernels with
#                              everything built in)
#   /dev/console, /dev/null    so PID 1 has stdio before it mounts devtmpfs
#   /proc /sys /mnt /run /tmp  mount points
# No shell, no busybox. The output is deterministic: sorted entries, owner
# 0:0, fixed mtimes (SOURCE_DATE_EPOCH, default 0), no gzip timestamp.
set -euo pipefail

agent=${1:?usage: $0 AGENT_BINARY MODULES_DIR|none OUT.cpio.gz}
mods=${2:?usage: $0 AGENT_BINARY MODULES_DIR|none OUT.cpio.gz}
out=${3:?usage: $0 AGENT_BINARY MODULES_DIR|none OUT.cpio.gz}
epoch=${SOURCE_DATE_EPOCH:-0}

log() { printf '[initramfs] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$agent" ] || die "agent binary $agent not found"
[ -x "$agent" ] || die "agent binary $agent is not executable"
# A dynamically linked /init cannot start: there is no libc in here.
if LC_ALL=C readelf -l "$agent" 2>/dev/null | grep -q 'Requesting program interpreter'; then
	die "$agent is dynamically linked; build it with CGO_ENABLED=0"
fi
if [ "$mods" != none ]; then
	[ -e "$mods/modules.order" ] || die "$mods/modules.order not found"
	while IFS= read -r m; do
		[ -z "$m" ] || [ -f "$mods/$m" ] || die "modules.order names $m, missing from $mods"
	done <"$mods/modules.order"
fi
for c in cpio gzip; do command -v $c >/dev/null || die "$c is required (apt-get install $c)"; done

root=$(mktemp -d "${TMPDIR:-/tmp}/initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
umask 022
mkdir -p "$root"/{dev,proc,sys,mnt,run,tmp,lib/modules}
chmod 1777 "$root/tmp"
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
install -m 0755 "$agent" "$root/init"
if [ "$mods" = none ]; then
	: >"$root/lib/modules/modules.order"
else
	find "$mods" -maxdepth 1 -type f \( -name '*.ko' -o -name modules.order \) \
		-exec install -m 0644 -t "$root/lib/modules" {} +
fi

find "$root" -exec touch -h -d "@$epoch" {} +
mkdir -p "$(dirname "$out")"
(cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
	cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -9 >"$out.tmp"
mv -f "$out.tmp" "$out"
log "$out: $(du -h "$out" | cut -f1), $(find "$root/lib/modules" -name '*.ko' | wc -l) modules"
