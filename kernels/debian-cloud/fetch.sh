#!/usr/bin/env bash
# kernels/debian-cloud/fetch.sh OUTDIR
#
# Gets Debian's cloud kernel (the versioned package that the metapackage
# linux-image-cloud-amd64 depends on) with `apt-get download`, extracts it with
# `dpkg-deb -x` into a cache outside the work tree (never installs it), and
# writes to OUTDIR:
#   vmlinuz               the bzImage
#   config                the kernel's config
#   kernel-release        e.g. 6.1.0-56-cloud-amd64
#   modules/*.ko          the modules a guest needs plus their dependencies,
#                         uncompressed, flat
#   modules/modules.order the order to load them in (one file name a line,
#                         dependencies first); modules the kernel has built
#                         in are left out
#
# Env: KERNEL_META (default linux-image-cloud-amd64), KERNEL_PACKAGE to pin
# the versioned package, GUEST_MODULES to override the wanted list,
# ALEPH_VM_BUILD_CACHE (default /var/cache/aleph-vm-build).
# A rerun with nothing changed only checks a stamp.
set -euo pipefail

out=${1:?usage: $0 OUTDIR}
cache=${ALEPH_VM_BUILD_CACHE:-/var/cache/aleph-vm-build}/kernels/debian-cloud
meta=${KERNEL_META:-linux-image-cloud-amd64}
# What the guest agent needs, in the order it should come up: the virtio
# core, the MMIO transport (so devices appear), then drivers, then
# filesystems. Dependencies are added in front of each automatically; names
# the kernel has built in are skipped.
wanted=${GUEST_MODULES:-"virtio_ring virtio virtio_mmio virtio_blk virtio_console virtio_net
	vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
	crc16 crc32c_generic mbcache jbd2 ext4 squashfs overlay loop"}
recipe=v1

log() { printf '[kernel-debian %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# --- which package ---------------------------------------------------------------
resolve() {
	apt-cache depends "$meta" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
pkg=${KERNEL_PACKAGE:-$(resolve)}
if [ -z "$pkg" ]; then
	log "$meta unknown to apt; running apt-get update"
	apt-get update >&2
	pkg=$(resolve)
fi
[ -n "$pkg" ] || die "cannot resolve the image package of $meta"
ver=$(apt-cache show --no-all-versions "$pkg" | awk '$1 == "Version:" { print $2; exit }')
[ -n "$ver" ] || die "no candidate version for $pkg"

key=$(printf '%s\n' "$recipe" "$pkg=$ver" $wanted | sha256sum | cut -c1-16)
if [ -e "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$key" ] &&
	[ -e "$out/vmlinuz" ] && [ -e "$out/modules/modules.order" ]; then
	log "up to date: $out ($pkg $ver)"
	exit 0
fi

# --- download and extract, once per version ---------------------------------------
tree=$cache/${pkg}_$ver
if [ ! -e "$tree/.extracted" ]; then
	mkdir -p "$cache/dl"
	deb=$cache/dl/${pkg}_${ver//:/%3a}_amd64.deb
	if [ ! -s "$deb" ]; then
		log "downloading $pkg=$ver"
		# apt drops to user _apt for downloads; let it write there.
		chmod 0777 "$cache/dl" 2>/dev/null || true
		(cd "$cache/dl" && apt-get download "$pkg=$ver" >&2)
	fi
	[ -s "$deb" ] || deb=$(ls -t "$cache/dl/${pkg}_"*.deb | head -n1)
	log "extracting $(basename "$deb")"
	rm -rf "$tree.tmp"
	dpkg-deb -x "$deb" "$tree.tmp"
	touch "$tree.tmp/.extracted"
	rm -rf "$tree"
	mv "$tree.tmp" "$tree"
fi

kdirs=("$tree"/lib/modules/*)
[ ${#kdirs[@]} = 1 ] && [ -d "${kdirs[0]}" ] || die "expected one lib/modules/<release> in $tree"
kdir=${kdirs[0]}
krel=$(basename "$kdir")
[ -e "$tree/boot/vmlinuz-$krel" ] || die "no boot/vmlinuz-$krel in $pkg"

# --- module index: name -> file; built-in names ------------------------------------
norm() { local n=${1##*/}; n=${n%%.ko*}; echo "${n//-/_}"; }
declare -A path builtin
while IFS= read -r f; do path[$(norm "$f")]=$f; done < <(cd "$kdir" && find kernel -name '*.ko*' | sort)
if [ -e "$kdir/modules.builtin" ]; then
	while IFS= read -r f; do builtin[$(norm "$f")]=1; done <"$kdir/modules.builtin"
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/kernel-debian.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/modules"

# Uncompressed copy of module $1 in the stage (finit_module gets plain ELF).
unpack() {
	local n=$1 src=$kdir/${path[$1]} dst=$stage/modules/$1.ko
	[ -e "$dst" ] && return 0
	case $src in
	*.ko.xz) xz -dc "$src" >"$dst" ;;
	*.ko.zst) zstd -qdc "$src" >"$dst" ;;
	*.ko.gz) gzip -dc "$src" >"$dst" ;;
	*.ko) cp "$src" "$dst" ;;
	*) die "unknown module format: $src" ;;
	esac
}
# modinfo field $2 of staged module $1 (no kmod needed: the .modinfo section
# is NUL-separated key=value strings).
field() { tr '\0' '\n' <"$stage/modules/$1.ko" | sed -n "s/^$2=//p" | head -n1; }

declare -A state
order=() skipped=()
visit() {
	local n=$1 d
	case ${state[$n]:-} in
	done) return 0 ;;
	active) die "dependency cycle at $n" ;;
	esac
	if [ -z "${path[$n]:-}" ]; then
		if [ -n "${builtin[$n]:-}" ]; then
			skipped+=("$n")
			state[$n]=done
			return 0
		fi
		die "$n is neither a module nor built into $krel"
	fi
	state[$n]=active
	unpack "$n"
	local deps soft
	deps=$(field "$n" depends)
	# "pre:" soft dependencies name modules (or aliases) to load first; take
	# the ones that are module files and ignore aliases.
	soft=$(field "$n" softdep | sed -n 's/^pre: *//p' | sed 's/ post:.*//')
	for d in ${deps//,/ }; do visit "$(norm "$d")"; done
	for d in $soft; do
		d=$(norm "$d")
		if [ -n "${path[$d]:-}" ]; then visit "$d"; fi
	done
	state[$n]=done
	order+=("$n")
}
for m in $wanted; do visit "$(norm "$m")"; done

for m in "${order[@]}"; do echo "$m.ko"; done >"$stage/modules/modules.order"
cp "$tree/boot/vmlinuz-$krel" "$stage/vmlinuz"
cp "$tree/boot/config-$krel" "$stage/config"
echo "$krel" >"$stage/kernel-release"

# --- publish ------------------------------------------------------------------------
mkdir -p "$out"
rm -rf "$out/modules" "$out/.stamp"
cp -r "$stage/modules" "$out/modules"
for f in vmlinuz config kernel-release; do
	cp -f "$stage/$f" "$out/$f.tmp" && mv -f "$out/$f.tmp" "$out/$f"
done
echo "$key" >"$out/.stamp"
log "kernel $krel ($pkg $ver) -> $out/vmlinuz"
log "modules (load order): ${order[*]}"
((${#skipped[@]} == 0)) || log "built in, not needed as modules: ${skipped[*]}"
