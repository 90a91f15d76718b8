#!/usr/bin/env bash
# `systemd-analyze verify` of systemd/dsd.service. The unit names /usr/sbin/dsd; verify needs
# that path to exist, so a copy of the unit pointing at the build's dsd is checked. Skips
# (exit 0 with a message) where systemd-analyze is missing or cannot run (containers without
# systemd as PID 1 still run verify; a missing binary is the usual reason to skip).
set -u
: "${DS_BUILD:?}" "${DS_ROOT:?}"
if ! command -v systemd-analyze >/dev/null; then
    echo "SKIP: systemd-analyze is not installed"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/sbin/dsd|$DS_BUILD/daemon/dsd|g" "$DS_ROOT/systemd/dsd.service" >"$tmp/dsd.service"
out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$tmp/dsd.service" 2>&1)
rc=$?
# a user named in User= that does not exist on the build host is not a unit error
out=$(echo "$out" | grep -v -e "Failed to resolve user" -e "^$" || true)
if [ $rc -ne 0 ] && echo "$out" | grep -q -e "Failed to connect" -e "No such file or directory.*bus"; then
    echo "SKIP: systemd-analyze cannot run here: $out"
    exit 0
fi
if [ -n "$out" ]; then
    echo "FAIL: systemd-analyze verify:"
    echo "$out"
    exit 1
fi
echo "PASS: systemd-analyze verify accepts dsd.service"
