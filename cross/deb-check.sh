#!/usr/bin/env bash
# Install, upgrade, reinstall, remove and purge the amd64 .deb in a fresh
# Debian root (debootstrap --variant=minbase, chroot in a private mount
# namespace), and lint it with lintian when installed. Run as root.
#
#   cross/deb-check.sh [PACKAGE.deb]   (default: target/release-artifacts/*_amd64.deb)
#
# The minimal root has neither adduser nor systemd: the first install runs
# postinst's adduser fallback (adduser only), the upgrade then runs with
# systemd installed (systemd-sysusers/systemd-tmpfiles over the existing
# user). The "newer version" is the same package repacked as <version>+1
# with a changed example.yaml, so the edited conffile must be kept.
# systemctl cannot run in a chroot: the unit is checked with
# `systemd-analyze verify` instead. The base root is cached in
# target/deb-check/base (DEB_MIRROR, default deb.debian.org).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
deb=${1:-$(ls "$ROOT"/target/release-artifacts/testflinger-agent_*_amd64.deb 2>/dev/null | head -1)}
[ -f "$deb" ] || { echo "deb-check: no package (run cross/release.sh --targets x86_64-unknown-linux-musl)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "deb-check: needs root (debootstrap, chroot)" >&2; exit 1; }
mirror=${DEB_MIRROR:-http://deb.debian.org/debian}
W="$ROOT/target/deb-check"
base="$W/base" R="$W/root"
mkdir -p "$W"
if [ ! -x "$base/usr/bin/apt-get" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  echo "deb-check: debootstrap --variant=minbase bookworm ($mirror)"
  debootstrap --variant=minbase bookworm "$base.tmp" "$mirror" >"$W/debootstrap.log"
  mv "$base.tmp" "$base"
fi
rm -rf "$R"; cp -a "$base" "$R"
cp /etc/resolv.conf "$R/etc/resolv.conf"
trap 'rm -rf "$R"' EXIT

step() { echo; echo "\$ $*"; }
in_root() {   # in_root CMD...: a private mount namespace, so /proc goes with it
  unshare --mount --fork sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$R" "$@"
}
fail() { echo "deb-check: FAILED: $*" >&2; exit 1; }

version=$(dpkg-deb -f "$deb" Version)
cp "$deb" "$R/tmp/old.deb"
# The upgrade: same contents, higher version, a changed shipped conffile.
x="$W/repack"; rm -rf "$x"; dpkg-deb -R "$deb" "$x"
sed -i "s/^Version: .*/Version: $version+1/" "$x/DEBIAN/control"
echo "# changed in $version+1" >>"$x/etc/testflinger-agent/example.yaml"
dpkg-deb --root-owner-group -b "$x" "$R/tmp/new.deb" >/dev/null; rm -rf "$x"

step apt-get install adduser
in_root apt-get install -y -qq --no-install-recommends adduser >/dev/null 2>&1 || fail "apt-get install adduser"
step dpkg -i "$(basename "$deb")" "  (no systemd: adduser fallback)"
in_root dpkg -i /tmp/old.deb
in_root getent passwd testflinger-agent || fail "no user"
in_root id testflinger-agent
in_root stat -c '%A %U:%G %n' /etc/testflinger-agent /var/lib/testflinger-agent /var/log/testflinger-agent
in_root /usr/bin/testflinger-agent --version
in_root grep '^ExecStart=' /usr/lib/systemd/system/testflinger-agent@.service
in_root dpkg-query -W -f='${Conffiles}\n' testflinger-agent

step dpkg -i "  (again: idempotent)"
in_root dpkg -i /tmp/old.deb

# procps: the unit's ExecReload runs /bin/kill (on every real install; not in minbase).
step apt-get install systemd procps
in_root apt-get install -y -qq --no-install-recommends systemd procps >/dev/null 2>&1 || fail "apt-get install systemd"
step systemd-analyze verify testflinger-agent@rpi4-01.service
in_root sh -c 'cp /etc/testflinger-agent/example.yaml /etc/testflinger-agent/rpi4-01.yaml &&
  systemd-analyze verify /usr/lib/systemd/system/testflinger-agent@rpi4-01.service' \
  && echo "verify: ok" || fail "systemd-analyze verify"

step "edit example.yaml; dpkg -i --force-confold  (upgrade to $version+1)"
in_root sh -c 'echo "# edited by the admin" >>/etc/testflinger-agent/example.yaml'
in_root dpkg -i --force-confdef --force-confold /tmp/new.deb
in_root dpkg-query -W testflinger-agent
in_root tail -1 /etc/testflinger-agent/example.yaml | grep -q 'edited by the admin' || fail "edited conffile replaced"
echo "example.yaml: the admin's edit kept; $(in_root ls /etc/testflinger-agent | tr '\n' ' ')"
in_root id testflinger-agent
in_root stat -c '%A %U:%G %n' /etc/testflinger-agent

step dpkg -r testflinger-agent
in_root dpkg -r testflinger-agent
[ ! -e "$R/usr/bin/testflinger-agent" ] || fail "binary left after remove"
[ -f "$R/etc/testflinger-agent/example.yaml" ] || fail "conffile gone after remove"
echo "after remove: binary gone, $(in_root ls /etc/testflinger-agent | tr '\n' ' ')kept; $(in_root dpkg-query -W -f='${db:Status-Abbrev}' testflinger-agent)"

step dpkg -P testflinger-agent
in_root dpkg -P testflinger-agent
[ ! -e "$R/etc/testflinger-agent/example.yaml" ] || fail "conffile left after purge"
[ ! -e "$R/var/log/testflinger-agent" ] || fail "logs left after purge"
echo "after purge: example.yaml gone, /var/log/testflinger-agent gone; left: $(in_root ls -d /etc/testflinger-agent /var/lib/testflinger-agent 2>/dev/null | tr '\n' ' ')(user kept: $(in_root id -un testflinger-agent))"

step "dpkg -i after purge  (user exists already)"
in_root dpkg -i /tmp/new.deb >/dev/null && in_root dpkg-query -W testflinger-agent

step "userdel testflinger-agent; dpkg -P; dpkg -i  (with systemd: systemd-sysusers creates the user)"
in_root dpkg -P testflinger-agent >/dev/null
in_root userdel testflinger-agent
in_root getent group testflinger-agent >/dev/null && in_root groupdel testflinger-agent
in_root dpkg -i /tmp/new.deb >/dev/null
in_root id testflinger-agent || fail "systemd-sysusers made no user"
in_root stat -c '%A %U:%G %n' /etc/testflinger-agent /var/lib/testflinger-agent /var/log/testflinger-agent

if command -v lintian >/dev/null; then
  step lintian "$(basename "$deb")"
  lintian --tag-display-limit 0 "$deb" || true
fi
echo; echo "deb-check: ok"
