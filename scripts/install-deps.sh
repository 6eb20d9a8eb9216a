#!/bin/sh
# Installs the Debian packages the supervisor, its runtime recipe and its
# tests need. Idempotent: does nothing when every package is present, and
# runs `apt-get update` at most once.
set -eu

PACKAGES="debootstrap squashfs-tools e2fsprogs qemu-system-x86 redis-server iproute2 nftables busybox-static cpio zip unzip ca-certificates wrk"
# systemd-analyze checks the installed unit (make install); dpkg-deb
# builds and reads the package (make deb).
PACKAGES="$PACKAGES systemd dpkg"

missing=""
for p in $PACKAGES; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done
# Node.js and npm run the TypeScript SDK's signature check (test/sdkverify).
# By command, not package: NodeSource's nodejs bundles npm and conflicts
# with Debian's npm package.
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
# Firecracker's jailer drops to this user, as the seed's install does.
ensure_jail_user() {
	if ! id jailman >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
		useradd --system --no-create-home --shell /usr/sbin/nologin jailman
	fi
}

if [ -z "$missing" ]; then
	ensure_jail_user
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: missing packages:$missing (run as root to install them)" >&2
	exit 1
fi
echo "install-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
ensure_jail_user
