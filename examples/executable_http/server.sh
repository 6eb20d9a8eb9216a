#!/bin/sh
# An executable program as aleph-vm runs them: anything serving HTTP on
# 127.0.0.1:8080. This one serves the files next to it with Python's
# standard library, which every Python runtime has.
cd "$(dirname "$0")" || exit 1
exec python3 -m http.server 8080 --bind 127.0.0.1
