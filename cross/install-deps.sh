#!/usr/bin/env bash
# Install what cross/build.sh (zig mode) and cross/qemu-check.sh need.
# Idempotent: each step runs only when its tool is missing.
#
#   cross/install-deps.sh [--glibc-static] [target...]   (default: the five release targets)
#
#   apt     file, qemu-user-static (from bookworm-backports on Debian 12:
#           qemu 7.2 returns EINVAL for PR_SET_CHILD_SUBREAPER, which the
#           agent's process-tree cleanup relies on; 10.0 passes it through),
#           busybox-static (the minimal-image proof)
#   pip     ziglang (zig: C compiler and linker, musl CRT and libc per target)
#   cargo   cargo-zigbuild, cargo-auditable (--locked; 0.7.3 or later
#           works under zigbuild)
#   The versions installed are pinned below (what the README's figures and
#   the release workflow use); tools already present are left alone.
#   rustup  rust-src for nightly (build-std), and the rustup musl std for
#           each target where the mirror has it (x86_64, aarch64 here)
#   --glibc-static  also Debian's gcc cross compilers and the *-linux-gnu std
set -euo pipefail
# shellcheck source=cross/targets.sh
. "$(dirname "$0")/targets.sh"

ZIG_VERSION=0.17.1 ZIGBUILD_VERSION=0.24.1 AUDITABLE_VERSION=0.7.7

glibc=0
if [ "${1:-}" = --glibc-static ]; then glibc=1; shift; fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${RELEASE_TARGETS[@]}")

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_install() {   # apt_install [-t suite] pkg...
  [ "$updated" = 1 ] || { $SUDO apt-get update -qq; updated=1; }
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pkgs=(file busybox-static)
if [ "$glibc" = 1 ]; then
  for t in "${targets[@]}"; do
    pre=$(gcc_prefix "$t")
    [ -n "$pre" ] && pkgs+=("gcc-$pre" "libc6-dev-$(case $pre in aarch64*) echo arm64;; arm*) echo armhf;; riscv64*) echo riscv64;; esac)-cross")
  done
fi
missing=()
for p in $(printf '%s\n' "${pkgs[@]}" | sort -u); do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  apt_install "${missing[@]}"
fi

# qemu-user >= 10 (see above). Debian 12 ships 7.2; its backports has 10.0.
qemu_major() { qemu-aarch64-static --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }
if [ "$(qemu_major || true)" = "" ] || [ "$(qemu_major)" -lt 10 ]; then
  if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    list=/etc/apt/sources.list.d/bookworm-backports.list
    grep -qs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/* \
      || echo 'deb http://deb.debian.org/debian bookworm-backports main' | $SUDO tee "$list" >/dev/null
    updated=0
    echo "install-deps: apt-get install -t bookworm-backports qemu-user-static"
    apt_install -t bookworm-backports qemu-user-static
  else
    echo "install-deps: apt-get install qemu-user-static"
    apt_install qemu-user-static
  fi
fi
echo "install-deps: $(qemu-aarch64-static --version | head -1)"

if ! command -v python-zig >/dev/null 2>&1 && ! command -v zig >/dev/null 2>&1; then
  echo "install-deps: pip install ziglang==$ZIG_VERSION"
  python3 -m pip install -q "ziglang==$ZIG_VERSION"
fi
command -v python-zig >/dev/null 2>&1 || command -v zig >/dev/null 2>&1 || python3 -m ziglang version >/dev/null
if ! command -v cargo-zigbuild >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-zigbuild --locked --version $ZIGBUILD_VERSION"
  cargo install -q cargo-zigbuild --locked --version "$ZIGBUILD_VERSION"
fi
if ! command -v cargo-auditable >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-auditable --locked --version $AUDITABLE_VERSION"
  cargo install -q cargo-auditable --locked --version "$AUDITABLE_VERSION"
fi
echo "install-deps: zig $(python3 -m ziglang version 2>/dev/null || zig version), $(cargo-zigbuild --version 2>/dev/null || cargo zigbuild --version)"

need_src=0
for t in "${targets[@]}"; do
  if rustup target list --installed | grep -qx "$t" || rustup target add "$t" >/dev/null 2>&1; then
    echo "install-deps: rustup std $t present"
  else
    echo "install-deps: no rustup std for $t on this mirror: build.sh builds it from source (nightly build-std)"
    need_src=1
  fi
  if [[ " ${BUILD_STD_TARGETS[*]} " == *" $t "* ]]; then need_src=1; fi
  if [ "$glibc" = 1 ] && fb=$(fallback_of "$t") && [ -n "$fb" ]; then
    rustup target add "$fb" >/dev/null
  fi
done
if [ "$need_src" = 1 ]; then
  # component add, not toolchain install: an installed "nightly" is not updated.
  if rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1; then
    rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src' \
      || { echo "install-deps: rustup component add rust-src --toolchain $NIGHTLY"; rustup component add rust-src --toolchain "$NIGHTLY"; }
  else
    echo "install-deps: rustup toolchain install $NIGHTLY --component rust-src"
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
  fi
fi
