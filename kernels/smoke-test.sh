#!/usr/bin/env bash
# kernels/smoke-test.sh KERNEL INITRD|none [acpi=on|acpi=off]
#
# Boots KERNEL in `qemu-system-x86_64 -M microvm` (TCG unless SMOKE_ACCEL=kvm)
# with a TEST initramfs: the modules and modules.order of INITRD (the
# production initramfs from kernels/initramfs/build.sh; "none" for a kernel
# with everything built in) plus busybox and a shell script as /init, which
#   - loads the modules of modules.order in order (insmod),
#   - lists /dev/vd* /dev/vport* /dev/hvc*,
#   - mounts the virtio-blk drive (a squashfs, compressed like the runtime
#     image) read-only, puts a tmpfs overlay on it and writes through it,
#   - writes a line to the virtio-serial port (a chardev file on the host),
#   - prints SMOKE-OK and powers off (ACPI) or reboots (no ACPI; QEMU runs
#     with -no-reboot, so either ends the VM).
# The console (ttyS0) goes to a file. Succeeds when SMOKE-OK appears, /dev/vda
# exists and the squashfs, overlay and virtio-serial checks pass, within
# SMOKE_TIMEOUT seconds (default 90). Prints the wall time from QEMU's start
# to SMOKE-OK and the guest's uptime when /init started.
# Env: SMOKE_TIMEOUT, SMOKE_ACCEL (tcg), SMOKE_MEM (256), SMOKE_APPEND (extra
# kernel args), SMOKE_TSC_KHZ (TCG only; default: the host's cpu MHz),
# SMOKE_LOG (copy the console there), SMOKE_KEEP=1 keeps the temp dir,
# QEMU (qemu-system-x86_64).
# Busybox is test-only: it never goes into the production initramfs.
set -euo pipefail

kernel=${1:?usage: $0 KERNEL INITRD|none [acpi=on|acpi=off]}
initrd=${2:?usage: $0 KERNEL INITRD|none [acpi=on|acpi=off]}
acpi=${3:-acpi=on}
case $acpi in acpi=on | acpi=off) ;; *) echo "third argument must be acpi=on or acpi=off" >&2; exit 2 ;; esac
timeout=${SMOKE_TIMEOUT:-90}
accel=${SMOKE_ACCEL:-tcg}
qemu=${QEMU:-qemu-system-x86_64}

log() { printf '[smoke %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ -f "$kernel" ] || die "kernel $kernel not found"
kernel=$(realpath "$kernel")
if [ "$initrd" != none ]; then
	[ -f "$initrd" ] || die "initrd $initrd not found"
	initrd=$(realpath "$initrd")
fi
command -v "$qemu" >/dev/null || die "$qemu not found (apt-get install qemu-system-x86)"
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
if LC_ALL=C readelf -l "$busybox" | grep -q 'program interpreter'; then
	die "$busybox is dynamically linked; install busybox-static"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smoke.XXXXXX")
qpid=
cleanup() {
	if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then kill "$qpid" 2>/dev/null || true; fi
	if [ "${SMOKE_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# --- test initramfs -----------------------------------------------------------------
root=$tmp/root
mkdir -p "$root"
if [ "$initrd" != none ]; then
	[ -f "$initrd" ] || die "initrd $initrd not found"
	(cd "$root" && gzip -dc "$initrd" | cpio -idm --quiet)
	rm -f "$root/init" # the production agent is not run here
fi
mkdir -p "$root"/{bin,dev,proc,sys,mnt,run,tmp,lib/modules}
[ -e "$root/dev/console" ] || mknod -m 600 "$root/dev/console" c 5 1
cp "$busybox" "$root/bin/busybox"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "SMOKE-INIT uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r)"
echo "SMOKE-CMDLINE $(cat /proc/cmdline)"
loaded=
if [ -s /lib/modules/modules.order ]; then
	while read -r m; do
		[ -n "$m" ] || continue
		if insmod "/lib/modules/$m"; then loaded="$loaded ${m%.ko}"; else echo "SMOKE-FAIL insmod $m"; fi
	done </lib/modules/modules.order
fi
echo "SMOKE-MODULES loaded:${loaded:- none} uptime=$(cut -d' ' -f1 /proc/uptime)s"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "SMOKE-DEVICES $(ls /dev/vd* /dev/vport* /dev/hvc* 2>/dev/null | tr '\n' ' ')"
mkdir -p /mnt/ro /mnt/rw /mnt/root
if mount -t squashfs -o ro /dev/vda /mnt/ro; then cat /mnt/ro/hello.txt; fi
mount -t tmpfs -o size=16m tmpfs /mnt/rw && mkdir -p /mnt/rw/upper /mnt/rw/work &&
	mount -t overlay overlay -o lowerdir=/mnt/ro,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /mnt/root &&
	echo written >/mnt/root/new.txt && rm /mnt/root/hello.txt && [ ! -e /mnt/root/hello.txt ] &&
	[ -e /mnt/ro/hello.txt ] && [ "$(cat /mnt/root/new.txt)" = written ] && echo SMOKE-OVERLAY-OK
for p in /dev/vport*p1; do [ -c "$p" ] && echo SMOKE-VPORT-OK >"$p"; done
echo "SMOKE-OK uptime=$(cut -d' ' -f1 /proc/uptime)s"
sync
# Without ACPI there is no power-off method: a reboot (reboot=k) ends the VM
# (QEMU runs with -no-reboot; Firecracker exits on it).
if [ -d /sys/firmware/acpi ]; then poweroff -f; else reboot -f; fi
EOF
chmod 0755 "$root/init"
(cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
	cpio --quiet -o -H newc -R 0:0) | gzip -1 >"$tmp/test-initrd.cpio.gz"

# --- test drive: a squashfs compressed like the runtime image --------------------------
mkdir -p "$tmp/disk"
echo SMOKE-SQUASHFS-OK >"$tmp/disk/hello.txt"
comp=gzip
if command -v mksquashfs >/dev/null; then
	# (grep reads all of the help: with pipefail, grep -q could end the pipe
	# early and mksquashfs's SIGPIPE would then read as "not supported")
	help=$(mksquashfs -help 2>&1 || true)
	for c in zstd xz; do
		if grep -qE "^[[:space:]]+$c\b" <<<"$help"; then comp=$c; break; fi
	done
	mksquashfs "$tmp/disk" "$tmp/disk.img" -noappend -comp "$comp" -all-root -quiet >/dev/null
else
	log "mksquashfs missing (apt-get install squashfs-tools): the drive is raw, squashfs not tested"
	comp=none
	truncate -s 1M "$tmp/disk.img"
fi

# --- boot ---------------------------------------------------------------------------
append="console=ttyS0 reboot=k panic=1 pci=off random.trust_cpu=on"
# Under TCG the guest's TSC is the host's, but the kernel's PIT calibration of
# it fails when the host is busy, and the boot then hangs after "tsc: Marking
# TSC unstable" (seen here with both cores loaded). Telling the kernel the
# frequency skips that calibration.
if [ "$accel" = tcg ]; then
	tsc_khz=${SMOKE_TSC_KHZ:-$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)}
	[ -z "$tsc_khz" ] || append+=" tsc_early_khz=$tsc_khz"
fi
append+=" ${SMOKE_APPEND:-}"
args=(
	-M "microvm,$acpi" -accel "$accel" -m "${SMOKE_MEM:-256}" -smp 1
	-nodefaults -no-user-config -display none -no-reboot
	-serial "file:$tmp/console.log"
	-kernel "$kernel" -initrd "$tmp/test-initrd.cpio.gz" -append "$append"
	-drive "id=vda,file=$tmp/disk.img,format=raw,if=none,readonly=on"
	-device virtio-blk-device,drive=vda
	-device virtio-serial-device
	-chardev "file,id=vport,path=$tmp/vport.out"
	-device virtserialport,chardev=vport,name=aleph.smoke
)
log "booting $(basename "$kernel") with -M microvm,$acpi -accel $accel, append: $append"
touch "$tmp/console.log"
t0=$(date +%s.%N)
"$qemu" "${args[@]}" >"$tmp/qemu.out" 2>&1 &
qpid=$!

ok_at=
deadline=$(echo "$t0 + $timeout" | bc)
while :; do
	now=$(date +%s.%N)
	if [ -z "$ok_at" ] && grep -q '^SMOKE-OK' "$tmp/console.log"; then ok_at=$now; fi
	if ! kill -0 "$qpid" 2>/dev/null; then break; fi
	if [ -n "$ok_at" ] && (($(echo "$now - $ok_at > 10" | bc))); then break; fi
	if (($(echo "$now > $deadline" | bc))); then break; fi
	sleep 0.05
done
exited=no
if kill -0 "$qpid" 2>/dev/null; then
	kill "$qpid" 2>/dev/null || true
else
	exited=yes
fi
wait "$qpid" 2>/dev/null || true
qpid=
end=$(date +%s.%N)

tr -d '\r' <"$tmp/console.log" >"$tmp/console.txt"
if [ -n "${SMOKE_LOG:-}" ]; then cp "$tmp/console.txt" "$SMOKE_LOG"; fi
grep -E '^SMOKE-' "$tmp/console.txt" | sed 's/^/  guest: /' >&2 || true

fail=()
[ -n "$ok_at" ] || fail+=("no SMOKE-OK within ${timeout}s")
grep -qE '^SMOKE-DEVICES .*/dev/vda( |$)' "$tmp/console.txt" || fail+=("/dev/vda missing")
grep -q '^SMOKE-FAIL' "$tmp/console.txt" && fail+=("$(grep '^SMOKE-FAIL' "$tmp/console.txt" | tr '\n' ' ')")
if [ "$comp" != none ]; then
	grep -q '^SMOKE-SQUASHFS-OK' "$tmp/console.txt" || fail+=("squashfs ($comp) mount failed")
	grep -q '^SMOKE-OVERLAY-OK' "$tmp/console.txt" || fail+=("overlay on tmpfs failed")
fi
grep -q SMOKE-VPORT-OK "$tmp/vport.out" 2>/dev/null || fail+=("nothing reached the host through the virtio-serial port")

if ((${#fail[@]})); then
	log "console (last 40 lines):"
	tail -n 40 "$tmp/console.txt" | sed 's/^/  /' >&2
	[ -s "$tmp/qemu.out" ] && sed 's/^/  qemu: /' "$tmp/qemu.out" >&2
	for f in "${fail[@]}"; do log "FAIL: $f"; done
	exit 1
fi
boot=$(printf '%.2f' "$(echo "$ok_at - $t0" | bc)")
total=$(printf '%.2f' "$(echo "$end - $t0" | bc)")
log "PASS: $(basename "$kernel") $acpi: SMOKE-OK ${boot}s after QEMU start (guest $(sed -n 's/^SMOKE-INIT uptime=\([^ ]*\).*/\1/p' "$tmp/console.txt") at /init); QEMU exited by itself: $exited (${total}s)"
echo "boot_to_smoke_ok_seconds=$boot acpi=${acpi#acpi=} exited=$exited"
