#!/usr/bin/env bash
# The .deb (cmake/packaging.cmake, systemd/deb/*): build it with cpack from $DS_BUILD, check
# its contents, then — only as root and only where no dsd package is installed — install it
# for real, check the installed files, the dsd account (postinst) and the unit, purge it and
# check that every file it listed is gone and dpkg no longer knows it. What the postinst
# created outside the package (the dsd user and group, a render group that sysusers added) is
# removed again when it was not there before, and a file the package ships that was already on
# the host (e.g. /etc/dsd/dsd.conf from an earlier `cmake --install`, which dpkg takes over and
# the purge deletes) is saved first and put back, so the host is left as it was found.
# Exit 77 (ctest SKIP_RETURN_CODE) when the real install cannot run here.
set -u
: "${DS_BUILD:?}" "${DS_ROOT:?}"
fail() {
    echo "FAIL: $*"
    exit 1
}
for t in cpack dpkg-deb; do
    command -v $t >/dev/null || { echo "SKIP: $t is not installed"; exit 77; }
done
tmp=$(mktemp -d /tmp/dsd-deb.XXXXXX)
installed_here=0
created_user=0 created_group=0 created_render=0
cleanup() {
    if [ $installed_here = 1 ] && dpkg -s dsd >/dev/null 2>&1; then
        echo "cleanup: purging dsd"
        dpkg --purge dsd >/dev/null 2>&1
    fi
    [ $created_user = 1 ] && getent passwd dsd >/dev/null && userdel dsd 2>/dev/null
    [ $created_group = 1 ] && getent group dsd >/dev/null && groupdel dsd 2>/dev/null
    [ $created_render = 1 ] && getent group render >/dev/null && groupdel render 2>/dev/null
    if [ -d "$tmp/saved" ]; then
        while read -r f; do
            mkdir -p "$(dirname "$f")" && cp -a "$tmp/saved$f" "$f" && echo "cleanup: restored $f"
        done < <(cd "$tmp/saved" && find . -mindepth 1 ! -type d | sed 's|^\.||')
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# ---- build ----------------------------------------------------------------------------------
[ -f "$DS_BUILD/CPackConfig.cmake" ] || fail "no $DS_BUILD/CPackConfig.cmake (configure the build)"
if ! (cd "$tmp" && cpack --config "$DS_BUILD/CPackConfig.cmake" -G DEB -B "$tmp/out" >"$tmp/cpack.log" 2>&1); then
    tail -n 20 "$tmp/cpack.log"
    fail "cpack -G DEB failed"
fi
deb=$(ls "$tmp"/out/dsd_*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || fail "cpack made no dsd_*.deb"
echo "built $(basename "$deb")"

# ---- contents -------------------------------------------------------------------------------
# paths without the leading "." ; directories end in "/"
dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|' >"$tmp/all"
grep -v '/$' "$tmp/all" >"$tmp/files"
has() { grep -qx -- "$1" "$tmp/files"; }
has_re() { grep -qE -- "$1" "$tmp/files"; }
fails=0
need() { # need DESCRIPTION CHECK...
    local what=$1
    shift
    if "$@"; then echo "ok: contains $what"; else echo "FAIL: missing $what"; fails=$((fails + 1)); fi
}
unit=$(grep -E '^(/usr)?/lib/systemd/system/dsd\.service$' "$tmp/files" | head -n 1)
need "the unit under /lib/systemd/system or /usr/lib/systemd/system" test -n "$unit"
if [ -n "$unit" ]; then
    # the daemon binary must be where the packaged unit runs it from
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ".$unit" >"$tmp/dsd.service"
    exe=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$tmp/dsd.service")
    need "dsd at the unit's ExecStart ($exe)" has "$exe"
fi
need "dsd in /usr/bin or /usr/sbin" has_re '^/usr/s?bin/dsd$'
need /usr/bin/dsctl has /usr/bin/dsctl
need /etc/dsd/dsd.conf has /etc/dsd/dsd.conf
need /usr/include/ds_client.h has /usr/include/ds_client.h
need "libdsclient.so.0" has_re '^/usr/lib/([a-z0-9_-]+/)?libdsclient\.so\.0$'
need "libdsclient.a" has_re '^/usr/lib/([a-z0-9_-]+/)?libdsclient\.a$'
need "dsclient.pc" has_re '^/usr/(lib/([a-z0-9_-]+/)?|share/)pkgconfig/dsclient\.pc$'
need "the sysusers.d file" has_re '^(/usr)?/lib/sysusers\.d/dsd\.conf$'
need "the tmpfiles.d file" has_re '^(/usr)?/lib/tmpfiles\.d/dsd\.conf$'
need "the bash completion" has /usr/share/bash-completion/completions/dsctl
need "nothing under /usr/local" eval '! grep -q "^/usr/local/" "$tmp/all"'
pc=$(grep -E '/pkgconfig/dsclient\.pc$' "$tmp/files" | head -n 1)
if [ -n "$pc" ]; then
    prefix=$(dpkg-deb --fsys-tarfile "$deb" | tar -xO ".$pc" | sed -n 's/^prefix=//p')
    need "dsclient.pc with prefix=/usr (has $prefix)" test "$prefix" = /usr
fi
dpkg-deb -e "$deb" "$tmp/control"
need "/etc/dsd/dsd.conf as a conffile" grep -qx /etc/dsd/dsd.conf "$tmp/control/conffiles"
[ $fails = 0 ] || fail "$fails content checks failed"

# ---- real install and purge ------------------------------------------------------------------
if [ "$(id -u)" != 0 ]; then
    echo "SKIP: not root: the package contents are right; dpkg -i / --purge needs root"
    exit 77
fi
if dpkg -s dsd >/dev/null 2>&1; then
    echo "SKIP: a dsd package is already installed here; not touching it"
    exit 77
fi
# files the package ships that are already here: saved now, put back by cleanup
while read -r f; do
    if [ -e "$f" ] || [ -L "$f" ]; then
        mkdir -p "$tmp/saved$(dirname "$f")"
        cp -a "$f" "$tmp/saved$f"
        echo "note: $f is already on this host; saved, and put back after the purge"
    fi
done <"$tmp/files"
getent passwd dsd >/dev/null || created_user=1
getent group dsd >/dev/null || created_group=1
getent group render >/dev/null || created_render=1
# directories the package would create that do not exist now must be gone after the purge
: >"$tmp/new_dirs"
while read -r d; do
    d=${d%/}
    [ -n "$d" ] && [ ! -e "$d" ] && echo "$d" >>"$tmp/new_dirs"
done < <(grep '/$' "$tmp/all")
for d in /var/lib/dsd /etc/dsd; do [ -e $d ] || echo $d >>"$tmp/new_dirs"; done

installed_here=1
if ! dpkg --force-confdef --force-confold -i "$deb" </dev/null >"$tmp/install.log" 2>&1; then
    cat "$tmp/install.log"
    fail "dpkg -i failed"
fi
echo "ok: dpkg -i $(basename "$deb")"
dpkg -s dsd 2>/dev/null | grep -q '^Status: install ok installed' || fail "dpkg -s dsd: not installed after dpkg -i"
while read -r f; do
    [ -e "$f" ] || [ -L "$f" ] || { echo "FAIL: $f not installed"; fails=$((fails + 1)); }
done <"$tmp/files"
[ $fails = 0 ] || fail "$fails packaged files missing after dpkg -i"
echo "ok: all $(wc -l <"$tmp/files") packaged files are installed"
getent passwd dsd >/dev/null || fail "postinst did not create the dsd user (getent passwd dsd)"
echo "ok: getent passwd dsd: $(getent passwd dsd)"
[ "$(stat -c %U /var/lib/dsd 2>/dev/null)" = dsd ] || fail "/var/lib/dsd is not there owned by dsd"
echo "ok: /var/lib/dsd owned by dsd"
/usr/bin/dsctl --version >/dev/null || fail "installed dsctl does not run"
[ "$(PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --variable=prefix dsclient)" = /usr ] ||
    fail "installed dsclient.pc: prefix is not /usr"
bash -c 'source /usr/share/bash-completion/completions/dsctl && complete -p dsctl' >/dev/null ||
    fail "installed completion does not register for dsctl"
echo "ok: dsctl runs, dsclient.pc says /usr, completion registers"
if command -v systemd-analyze >/dev/null; then
    out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$unit" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && echo "$out" | grep -q -e "Failed to connect" -e "bus"; then
        echo "note: systemd-analyze cannot run here: $out"
    elif [ -n "$(echo "$out" | grep -v '^$')" ]; then
        echo "$out"
        fail "systemd-analyze verify $unit"
    else
        echo "ok: systemd-analyze verify $unit"
    fi
fi

if ! dpkg --purge dsd >"$tmp/purge.log" 2>&1; then
    cat "$tmp/purge.log"
    fail "dpkg --purge dsd failed"
fi
installed_here=0
echo "ok: dpkg --purge dsd"
if dpkg -s dsd >/dev/null 2>&1; then fail "dpkg -s dsd still succeeds after the purge"; fi
echo "ok: dpkg -s dsd fails after the purge"
while read -r f; do
    if [ -e "$f" ] || [ -L "$f" ]; then echo "FAIL: $f left after purge"; fails=$((fails + 1)); fi
done <"$tmp/files"
while read -r d; do
    if [ -e "$d" ]; then echo "FAIL: directory $d left after purge"; fails=$((fails + 1)); fi
done <"$tmp/new_dirs"
[ $fails = 0 ] || fail "$fails paths left after dpkg --purge"
echo "ok: no packaged file and no directory the package created is left"
echo "PASS: the .deb installs and purges cleanly"
