#!/bin/bash
# Build the default runtime of aleph-vm programs: Debian 12 (bookworm,
# minbase) with Python 3, uvicorn, FastAPI, aiohttp and msgpack, packed as a
# read-only squashfs.
#
#   create.sh [--without-uvicorn] [OUTPUT_SQUASHFS]
#       (default output: rootfs.squashfs next to this file, or
#        rootfs-no-uvicorn.squashfs with --without-uvicorn)
#
# --without-uvicorn (or WITHOUT_UVICORN=1) builds the variant without
# uvicorn (nor its uvloop/httptools speed-ups), like aleph-vm's official
# runtimes, whose init serves ASGI itself: vm-agent's launcher then serves
# with its standard-library server. Debian's python3-fastapi depends on
# python3-uvicorn, so the variant is a copy of the cached tree with those
# packages purged past the dependency, cached beside it.
#
# The debootstrap tree is cached outside the work tree, keyed on the package
# list, so a rerun with nothing changed only re-packs (or does nothing when
# the output is newer than the cached tree).
#
# Environment: ALEPH_VM_BUILD_CACHE (default /var/cache/aleph-vm-build),
# DEBIAN_MIRROR (default: the bookworm mirror configured for apt here).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
without_uvicorn=${WITHOUT_UVICORN:-0}
if [ "${1:-}" = --without-uvicorn ]; then
	without_uvicorn=1
	shift
fi
[ "$without_uvicorn" = 1 ] && default_output=$here/rootfs-no-uvicorn.squashfs || default_output=$here/rootfs.squashfs
output=$(realpath -m "${1:-$default_output}")
suite=bookworm
cache=${ALEPH_VM_BUILD_CACHE:-/var/cache/aleph-vm-build}/debian-12-python

# Bump when the customisation below changes, to force a rebuild of the tree.
recipe_version=1
packages=(
	python3 python3-uvicorn python3-fastapi python3-aiohttp python3-msgpack
	# Optional speed-ups and websocket support picked by uvicorn when present.
	python3-httptools python3-uvloop python3-websockets
	python3-multipart ca-certificates
)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'create.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"

# Prerequisites, installed only when missing.
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ ${#need[@]} -gt 0 ]; then
	log "installing prerequisites: ${need[*]}"
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

# The mirror apt already uses for $suite, so the build works wherever apt
# does (snapshot or local mirrors included).
find_mirror() {
	local f
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -e "$f" ] || continue
		# deb822 paragraphs: print the URI of the first one listing $suite.
		awk -v suite="$suite" '
			BEGIN { RS=""; FS="\n" }
			{
				uri=""; ok=0; deb=0
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri=a[2] }
					if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb=1
					if ($i ~ /^Suites:/) { n=split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok=1 }
				}
				if (ok && deb && uri != "") { print uri; exit }
			}' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -e "$f" ] || continue
		# One-line format, optional [options] after "deb".
		sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }'
	done
}
mirror=${DEBIAN_MIRROR:-$(find_mirror | head -n1)}
[ -n "$mirror" ] || die "no apt source for $suite found; set DEBIAN_MIRROR"

key=$(printf '%s\n' "$recipe_version" "$suite" "$mirror" "${packages[@]}" | sha256sum | cut -d' ' -f1)
tree=$cache/rootfs
stamp=$cache/stamp

if [ -d "$tree" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
	if [ "$without_uvicorn" != 1 ] && [ -f "$output" ] && [ "$output" -nt "$stamp" ]; then
		log "up to date: $output"
		exit 0
	fi
	[ "$without_uvicorn" = 1 ] || log "cached tree $tree is current; re-packing only"
else
	log "debootstrap $suite from $mirror into $cache (about 2 minutes)"
	mkdir -p "$cache"
	# An interrupted debootstrap can leave proc/sys mounted in its tree:
	# unmount before deleting, or rm would walk into the host's /proc.
	awk -v t="$tree.tmp/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l
	rm -rf "$tree" "$tree.tmp" "$stamp"
	# debootstrap prints one line per step (I: Retrieving/Unpacking/Configuring ...).
	debootstrap --variant=minbase \
		--include="$(IFS=,; echo "${packages[*]}")" \
		"$suite" "$tree.tmp" "$mirror"

	log "customising"
	t=$tree.tmp
	# Nothing in the image needs docs, manuals or translations.
	rm -rf "$t"/usr/share/doc/* "$t"/usr/share/man/* "$t"/usr/share/info/* \
		"$t"/usr/share/lintian "$t"/usr/share/linda
	find "$t"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
	# apt state is useless in an immutable image and weighs tens of MB.
	rm -rf "$t"/var/cache/apt/* "$t"/var/lib/apt/lists/* "$t"/var/log/* "$t"/tmp/*
	# Lock root: no password login, ever (aleph-vm once shipped one).
	sed -i -E 's/^root:[^:]*:/root:*:/' "$t"/etc/shadow
	if [ -e "$t"/usr/sbin/sshd ]; then die "sshd must not be in the runtime"; fi
	# Mount points the backends use.
	mkdir -p "$t"/opt/code "$t"/run/aleph "$t"/opt/aleph
	echo aleph > "$t"/etc/hostname
	printf 'nameserver 9.9.9.9\n' > "$t"/etc/resolv.conf

	mv "$tree.tmp" "$tree"
	echo "$key" > "$stamp"
fi

if [ "$without_uvicorn" = 1 ]; then
	# Bump when the removal below changes.
	variant_version=1
	variant_key=$(printf '%s\n' "$key" no-uvicorn "$variant_version" | sha256sum | cut -d' ' -f1)
	vtree=$cache/rootfs-no-uvicorn
	vstamp=$cache/stamp-no-uvicorn
	if [ -d "$vtree" ] && [ "$(cat "$vstamp" 2>/dev/null)" = "$variant_key" ]; then
		if [ -f "$output" ] && [ "$output" -nt "$vstamp" ]; then
			log "up to date: $output"
			exit 0
		fi
		log "cached tree $vtree is current; re-packing only"
	else
		log "copying $tree to $vtree without uvicorn"
		rm -rf "$vtree" "$vtree.tmp" "$vstamp"
		cp -a "$tree" "$vtree.tmp"
		# dpkg keeps its database right; --force-depends because
		# python3-fastapi declares uvicorn a dependency it never imports.
		chroot "$vtree.tmp" dpkg --purge --force-depends \
			python3-uvicorn python3-uvloop python3-httptools
		find "$vtree.tmp"/usr/lib/python3/dist-packages -maxdepth 1 -iname '*uvicorn*' | grep . && die "uvicorn files left in the tree"
		chroot "$vtree.tmp" /usr/bin/python3 -c 'import fastapi, starlette, pydantic' ||
			die "fastapi no longer imports without uvicorn"
		if chroot "$vtree.tmp" /usr/bin/python3 -c 'import uvicorn' 2>/dev/null; then
			die "uvicorn still imports in the variant"
		fi
		rm -rf "$vtree.tmp"/var/log/* "$vtree.tmp"/tmp/*
		mv "$vtree.tmp" "$vtree"
		echo "$variant_key" > "$vstamp"
	fi
	tree=$vtree
fi

# Read the help once: `grep -q` quitting early would kill mksquashfs with
# SIGPIPE and, under pipefail, silently fall back to gzip.
comp=gzip
squashfs_help=$(mksquashfs -help 2>&1 || true)
for c in zstd xz; do
	if grep -qE "^[[:space:]]+$c\b" <<<"$squashfs_help"; then comp=$c; break; fi
done
log "packing $output ($comp)"
mkdir -p "$(dirname "$output")"
# Pack to a temporary name so a half-written image is never picked up.
for m in proc sys dev/pts; do
	if mountpoint -q "$tree/$m"; then die "$tree/$m is still mounted"; fi
done
mksquashfs "$tree" "$output.tmp" -noappend -comp "$comp" -all-root
mv "$output.tmp" "$output"
log "done: $output ($(du -h "$output" | cut -f1))"
