#!/usr/bin/env bash
# Installs the non-Python tools the checks need into .tools/bin (git-ignored), without root
# installs: promtool is extracted from Debian's `prometheus` package (the server is not installed
# or started). Idempotent and fast: a tool that is already there and runs is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_BIN=".tools/bin"

install_promtool() {
    if [ -x "$TOOLS_BIN/promtool" ] && "$TOOLS_BIN/promtool" --version >/dev/null 2>&1; then
        return 0
    fi
    local work
    work="$(mktemp -d)"
    chmod 755 "$work"  # apt downloads as the _apt user when it can reach the folder
    (
        cd "$work"
        apt-get download -q prometheus >/dev/null 2>&1 || {
            apt-get update -q >/dev/null
            apt-get download -q prometheus >/dev/null
        }
        dpkg-deb -x prometheus_*.deb root
    )
    mkdir -p "$TOOLS_BIN"
    install -m 0755 "$work/root/usr/bin/promtool" "$TOOLS_BIN/promtool"
    rm -rf "$work"
    "$TOOLS_BIN/promtool" --version 2>&1 | head -n 1
}

install_promtool
