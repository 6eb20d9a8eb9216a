#!/usr/bin/env bash
# check-config.sh FRAGMENT DOTCONFIG
#
# Fails loudly when an option of FRAGMENT did not land in DOTCONFIG as
# written (Kconfig silently drops options whose dependencies are missing).
# "CONFIG_X=v" lines must appear verbatim; "# CONFIG_X is not set" lines
# must not be set to anything.
set -euo pipefail
frag=${1:?usage: check-config.sh FRAGMENT DOTCONFIG}
conf=${2:?usage: check-config.sh FRAGMENT DOTCONFIG}

bad=0 n=0
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		sym=${BASH_REMATCH[1]}
		n=$((n + 1))
		if ! grep -qxF -- "$line" "$conf"; then
			got=$(grep -E "^(# )?$sym[= ]" "$conf" || true)
			echo "check-config: MISMATCH want '$line' got '${got:-<absent>}'" >&2
			bad=$((bad + 1))
		fi
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		sym=${BASH_REMATCH[1]}
		n=$((n + 1))
		if got=$(grep -E "^$sym=" "$conf"); then
			echo "check-config: MISMATCH want '$sym' off, got '$got'" >&2
			bad=$((bad + 1))
		fi
	fi
done <"$frag"

if ((bad)); then
	echo "check-config: $bad of $n options from $frag did not land in $conf" >&2
	exit 1
fi
echo "check-config: all $n options from $(basename "$frag") landed"
