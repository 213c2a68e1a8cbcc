#!/usr/bin/env bash
# Makes sure the C toolchain the build needs is here: `cc` for the bundled SQLite and `make` for
# jemalloc (the daemon's allocator). Installs Debian's build-essential when either is missing.
set -euo pipefail

if command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "ensure-build-tools: cc or make is missing; install build-essential (as root: apt-get install build-essential)" >&2
    exit 1
fi
echo "ensure-build-tools: installing build-essential (cc and make) from the Debian archive" >&2
apt-get update >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential >&2
