#!/usr/bin/env bash
# kernels/custom/build.sh OUTDIR
#
# Compiles the project's micro-VM guest kernel from Debian's linux-source-6.1
# with kernels/custom/microvm.config (everything built in, no modules) and
# writes to OUTDIR:
#   vmlinux   uncompressed ELF (what Firecracker boots; QEMU boots it via PVH)
#   bzImage   compressed image (QEMU -kernel, acpi=on or off)
#   config    the resulting .config
#
# The build tree lives outside the work tree, in
#   $ALEPH_VM_BUILD_CACHE/kernels/custom-<hash>/   (default /var/cache/aleph-vm-build)
# keyed by the fragment, this recipe and the linux-source package version, so
# a rerun with nothing changed only copies the cached result.
# Env: JOBS (default nproc), KEEP_OBJ=0 to delete the object tree after a build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: $0 OUTDIR}
fragment=$here/microvm.config
cache=${ALEPH_VM_BUILD_CACHE:-/var/cache/aleph-vm-build}/kernels
src_pkg=linux-source-6.1
jobs=${JOBS:-$(nproc)}
# Bump when the way the config or the build is made changes.
recipe="allnoconfig+KCONFIG_ALLCONFIG,olddefconfig,vmlinux+bzImage,v1"

log() { printf '[kernel-custom %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- build dependencies (installed only when missing) ------------------------
need=()
for c in gcc make bc bison flex perl xz; do
	command -v "$c" >/dev/null || need+=("$c")
done
[ -e /usr/include/libelf.h ] || need+=(libelf-dev)    # objtool (ORC unwinder)
[ -e /usr/include/openssl/evp.h ] || need+=(libssl-dev) # scripts/ host tools
[ -e "/usr/src/$src_pkg.tar.xz" ] || need+=("$src_pkg")
if ((${#need[@]})); then
	pkgs=()
	for n in "${need[@]}"; do
		case $n in
		gcc | make) pkgs+=(build-essential) ;;
		xz) pkgs+=(xz-utils) ;;
		*) pkgs+=("$n") ;;
		esac
	done
	log "installing build dependencies: ${pkgs[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2 ||
		{ apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; }
fi

# One build at a time: two makes in one object tree corrupt it.
mkdir -p "$cache"
exec 9>"$cache/.custom.lock"
if ! flock -n 9; then
	log "another kernel build is running; waiting for it"
	flock 9
fi

src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg")
key=$({ cat "$fragment"; echo "$recipe"; echo "$src_pkg=$src_ver"; } | sha256sum | cut -c1-16)
build=$cache/custom-$key
mkdir -p "$out"

install_outputs() {
	for f in vmlinux bzImage config; do
		cp -f "$build/out/$f" "$out/$f.tmp" && mv -f "$out/$f.tmp" "$out/$f"
	done
	log "kernel $(cat "$build/out/release") -> $out/{vmlinux,bzImage,config}"
}

if [ -e "$build/out/done" ]; then
	log "cached: $build (fragment+source unchanged)"
	install_outputs
	exit 0
fi

# --- source tree, extracted once per package version -------------------------
srcdir=$cache/src/$src_ver/$src_pkg
if [ ! -e "$srcdir/.extracted" ]; then
	log "extracting /usr/src/$src_pkg.tar.xz ($src_ver)"
	rm -rf "$cache/src/$src_ver.tmp"
	mkdir -p "$cache/src/$src_ver.tmp"
	tar -C "$cache/src/$src_ver.tmp" -xf "/usr/src/$src_pkg.tar.xz"
	touch "$cache/src/$src_ver.tmp/$src_pkg/.extracted"
	rm -rf "$cache/src/$src_ver"
	mv "$cache/src/$src_ver.tmp" "$cache/src/$src_ver"
fi

# --- configure ----------------------------------------------------------------
obj=$build/obj
# A changed fragment starts from the newest earlier build of the same source
# (kbuild rebuilds exactly what the changed options touch); FRESH=1 opts out.
if [ ! -e "$obj" ] && [ "${FRESH:-0}" != 1 ]; then
	prev=$(ls -td "$cache"/custom-*/obj 2>/dev/null | while read -r d; do
		[ "$(cat "$(dirname "$d")/source-version" 2>/dev/null)" = "$src_ver" ] && { echo "$d"; break; }
	done || true)
	if [ -n "$prev" ]; then
		log "seeding the object tree from $prev"
		mkdir -p "$build"
		rm -rf "$obj.tmp"
		cp -a "$prev" "$obj.tmp"
		mv "$obj.tmp" "$obj"
	fi
fi
mkdir -p "$obj" "$build/out"
echo "$src_ver" >"$build/source-version"
kmake() { make -C "$srcdir" O="$obj" ARCH=x86_64 "$@"; }
log "configuring in $obj (allnoconfig + $(basename "$fragment"))"
kmake -s allnoconfig KCONFIG_ALLCONFIG="$fragment" >&2
kmake -s olddefconfig >&2
"$here/check-config.sh" "$fragment" "$obj/.config" >&2

# --- build ----------------------------------------------------------------------
logf=$build/build.log
log "building vmlinux + bzImage with -j$jobs (log: $logf)"
start=$(date +%s)
set +e
# Progress: one line per compiled object goes to the log; a counter to stderr.
kmake -j"$jobs" vmlinux bzImage 2>&1 | tee "$logf" | awk -v t0="$start" '
	/^  (CC|AS|LD|AR)/ { n++; if (n % 100 == 0) { printf "[kernel-custom] %5d objects, %4ds\n", n, systime() - t0 > "/dev/stderr"; fflush("/dev/stderr") } }
	/(: error:|\*\*\*)/ { print > "/dev/stderr" }'
rc=${PIPESTATUS[0]}
set -e
((rc == 0)) || die "make failed (rc=$rc), see $logf"
secs=$(($(date +%s) - start))

cp -f "$obj/vmlinux" "$build/out/vmlinux"
cp -f "$obj/arch/x86/boot/bzImage" "$build/out/bzImage"
cp -f "$obj/.config" "$build/out/config"
kmake -s kernelrelease >"$build/out/release"
echo "$secs" >"$build/out/build-seconds"
touch "$build/out/done"
log "built in ${secs}s: $(du -h "$build/out/vmlinux" | cut -f1) vmlinux, $(du -h "$build/out/bzImage" | cut -f1) bzImage"
if [ "${KEEP_OBJ:-1}" = 0 ]; then rm -rf "$obj"; fi
install_outputs
