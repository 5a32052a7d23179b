#!/usr/bin/env bash
# Release artifacts from the static binaries cross/build.sh leaves in
# target/dist/ (missing ones are built first), into target/release/:
#
#   cross/release.sh [--targets T1,T2,...] [--out DIR]
#
#   testflinger-agent-<version>-<triple>.tar.gz   per target: the binary,
#       README.md, docs/, LICENSE, deploy/ (unit, sysusers, tmpfiles), example.yaml
#   testflinger-agent_<version>-1_<arch>.deb      amd64, arm64, armhf, riscv64
#       (armhf carries the ARMv6 binary: it runs on Raspberry Pi OS's armhf,
#       which is ARMv6 for the Pi 1/Zero, and on every ARMv7 armhf system)
#   SHA256SUMS
#
# The .deb is built by hand with dpkg-deb: /usr/bin/testflinger-agent, the
# template unit in /usr/lib/systemd/system (ExecStart pointed at /usr/bin),
# sysusers/tmpfiles in /usr/lib, /etc/testflinger-agent/example.yaml as a
# conffile; postinst creates the user (systemd-sysusers, else adduser) and
# the directories. Archives are reproducible: sorted, owned by root, mtimes
# and gzip/deb timestamps from SOURCE_DATE_EPOCH (default: the commit date).
# cross/deb-check.sh installs, upgrades and removes the amd64 package.
set -euo pipefail
# shellcheck source=cross/targets.sh
. "$(dirname "$0")/targets.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

targets=("${RELEASE_TARGETS[@]}") out="$ROOT/target/release-artifacts"
while [ $# -gt 0 ]; do
  case "$1" in
    --targets) IFS=, read -r -a targets <<<"$2"; shift ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "release.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || { echo "release.sh: no version in Cargo.toml" >&2; exit 1; }
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH
DIST="$ROOT/target/dist"

deb_arch() {
  case "$1" in
    x86_64-*) echo amd64 ;;
    aarch64-*) echo arm64 ;;
    arm-*) echo armhf ;;
    riscv64*) echo riscv64 ;;
  esac
}

missing=()
for t in "${targets[@]}"; do
  [ -x "$DIST/testflinger-agent-$t" ] || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "release.sh: building ${missing[*]}"
  cross/build.sh "${missing[@]}"
fi

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# tar with fixed order, owner and times, so equal inputs give equal bytes.
rtar() {   # rtar OUT.tar.gz DIR NAME
  find "$2/$3" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  tar -C "$2" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$SOURCE_DATE_EPOCH" -cf - "$3" | gzip -9n >"$1"
}

# The example config: what README's "Deploying on a controller" writes per device.
example_yaml() {
  cat <<'EOF'
# Example agent config: copy to /etc/testflinger-agent/<device>.yaml, set the
# server, queues and device connector commands, then
#   chgrp testflinger-agent /etc/testflinger-agent/<device>.yaml
#   chmod 0640 /etc/testflinger-agent/<device>.yaml
#   systemctl enable --now testflinger-agent@<device>
agent_id: rpi4-01
server_address: https://testflinger.example.com
job_queues: [rpi4-01, rpi4]
execution_basedir: /var/lib/testflinger-agent/rpi4-01/run
results_basedir: /var/lib/testflinger-agent/rpi4-01/results
logging_basedir: /var/log/testflinger-agent/rpi4-01
setup_command: tf-setup
provision_command: my-device-connector provision
test_command: my-device-connector runtest
cleanup_command: my-device-connector cleanup
EOF
}

tarball() {   # tarball TRIPLE
  local t=$1 name="testflinger-agent-$version-$1"
  local d="$work/$name"
  mkdir -p "$d/deploy" "$d/docs"
  install -m 0755 "$DIST/testflinger-agent-$t" "$d/testflinger-agent"
  install -m 0644 README.md LICENSE "$d/"
  install -m 0644 docs/*.md "$d/docs/"   # the README's links lead there
  install -m 0644 deploy/testflinger-agent.sysusers.conf deploy/testflinger-agent.tmpfiles.conf \
    'deploy/testflinger-agent@.service' "$d/deploy/"
  example_yaml >"$d/example.yaml"; chmod 0644 "$d/example.yaml"
  rtar "$out/$name.tar.gz" "$work" "$name"
  echo "release.sh: $name.tar.gz"
}

deb() {   # deb TRIPLE ARCH
  local t=$1 arch=$2 pkg=testflinger-agent
  local debver="$version-1"
  local d="$work/deb-$arch" doc="$work/deb-$arch/usr/share/doc/testflinger-agent"
  mkdir -p "$d/DEBIAN" "$d/usr/bin" "$d/usr/lib/systemd/system" "$d/usr/lib/sysusers.d" \
    "$d/usr/lib/tmpfiles.d" "$d/etc/testflinger-agent" "$doc"
  install -m 0755 "$DIST/testflinger-agent-$t" "$d/usr/bin/testflinger-agent"
  # The package's binary is in /usr/bin; deploy/'s unit (hand install) says /usr/local/bin.
  sed 's|/usr/local/bin/testflinger-agent|/usr/bin/testflinger-agent|' \
    'deploy/testflinger-agent@.service' >"$d/usr/lib/systemd/system/testflinger-agent@.service"
  grep -q '^ExecStart=/usr/bin/testflinger-agent ' "$d/usr/lib/systemd/system/testflinger-agent@.service" \
    || { echo "release.sh: the unit's ExecStart was not rewritten" >&2; exit 1; }
  install -m 0644 deploy/testflinger-agent.sysusers.conf "$d/usr/lib/sysusers.d/testflinger-agent.conf"
  install -m 0644 deploy/testflinger-agent.tmpfiles.conf "$d/usr/lib/tmpfiles.d/testflinger-agent.conf"
  example_yaml >"$d/etc/testflinger-agent/example.yaml"
  install -m 0644 README.md "$doc/README.md"
  gzip -9n "$doc/README.md"
  local year; year=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
  cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: testflinger-agent

Files: *
Copyright: $year The testflinger-agent authors
License: GPL-3
 On Debian systems the full text of the GNU General Public License version 3
 is in /usr/share/common-licenses/GPL-3.
EOF
  {
    echo "$pkg ($debver) unstable; urgency=medium"
    echo
    echo "  * Release $version, built from $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)."
    echo
    echo " -- testflinger-agent maintainers <testflinger-agent@localhost>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9n >"$doc/changelog.Debian.gz"
  echo /etc/testflinger-agent/example.yaml >"$d/DEBIAN/conffiles"
  cat >"$d/DEBIAN/control" <<EOF
Package: $pkg
Version: $debver
Architecture: $arch
Maintainer: testflinger-agent maintainers <testflinger-agent@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$d" | cut -f1)
Depends: adduser
Section: utils
Priority: optional
Homepage: https://github.com/canonical/testflinger
Description: Testflinger agent: runs test jobs on a lab device
 A small, static, single-threaded drop-in replacement for the Testflinger
 agent. One instance per device: testflinger-agent@<device>.service with
 its config in /etc/testflinger-agent/<device>.yaml.
EOF
  install -m 0755 /dev/stdin "$d/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# Idempotent: every step may run again on reinstall or upgrade.
set -e
if [ "$1" = configure ]; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers testflinger-agent.conf
  else
    getent group testflinger-agent >/dev/null ||
      addgroup --system --quiet testflinger-agent
    getent passwd testflinger-agent >/dev/null ||
      adduser --system --quiet --ingroup testflinger-agent --no-create-home \
        --home /var/lib/testflinger-agent --gecos "Testflinger agent" testflinger-agent
    if getent group dialout >/dev/null; then adduser --quiet testflinger-agent dialout; fi
  fi
  if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create testflinger-agent.conf
  else
    install -d -m 0750 -o root -g testflinger-agent /etc/testflinger-agent
    install -d -m 0750 -o testflinger-agent -g testflinger-agent \
      /var/lib/testflinger-agent /var/log/testflinger-agent
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # An upgrade: running agents finish their job, then restart on the new
    # binary (ExecReload = SIGUSR1); stopped ones stay stopped.
    if [ -n "$2" ]; then
      systemctl try-reload-or-restart 'testflinger-agent@*.service' || true
    fi
  fi
fi
EOF
  install -m 0755 /dev/stdin "$d/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# Removal stops the agents (SIGTERM: the phase ends, cleanup runs, results
# are kept); an upgrade leaves them running for postinst's reload.
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop 'testflinger-agent@*.service' || true
fi
EOF
  install -m 0755 /dev/stdin "$d/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
# Purge: the enable links and the logs go. The user and its home
# /var/lib/testflinger-agent (undelivered results, tokens, ~/.ssh) stay,
# as Debian does for system users.
if [ "$1" = purge ]; then
  rm -f /etc/systemd/system/multi-user.target.wants/testflinger-agent@*.service
  rm -rf /var/log/testflinger-agent
  rmdir --ignore-fail-on-non-empty /etc/testflinger-agent 2>/dev/null || true
fi
EOF
  find "$d" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  local f="${pkg}_${debver}_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz --build "$d" "$out/$f" >/dev/null
  echo "release.sh: $f"
}

for t in "${targets[@]}"; do
  tarball "$t"
  a=$(deb_arch "$t")
  if [ -n "$a" ]; then deb "$t" "$a"; fi
done
shopt -s nullglob
(cd "$out" && sha256sum -- *.tar.gz *.deb >SHA256SUMS && cat SHA256SUMS)
