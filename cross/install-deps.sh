#!/usr/bin/env bash
# Install what cross/build.sh and cross/qemu-check.sh need to cross-compile
# locally (without Docker) and to run the results under qemu-user.
# Idempotent: apt only runs when a package is missing, rustup only adds
# targets that are not installed yet.
#
#   cross/install-deps.sh [target...]      (default: the four release targets)
#
# A target whose standard library rustup cannot fetch is reported, not fatal:
# build.sh then falls back to a static glibc build for it (see README section).
set -euo pipefail
# shellcheck source=cross/targets.sh
. "$(dirname "$0")/targets.sh"

DEFAULT_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl
                 armv7-unknown-linux-musleabihf riscv64gc-unknown-linux-musl)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${DEFAULT_TARGETS[@]}")

# Packages: always file + qemu-user-static; per target the gcc cross compiler
# (ring compiles C and assembly for the target) and glibc headers/crt files.
pkgs=(file qemu-user-static)
rust_targets=()
for t in "${targets[@]}"; do
  case "$t" in
    x86_64-unknown-linux-musl)      pkgs+=(musl-tools); rust_targets+=("$t") ;;
    x86_64-unknown-linux-gnu)       rust_targets+=("$t") ;;
    aarch64-unknown-linux-*)        pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
                                    rust_targets+=("$t") ;;
    armv7-unknown-linux-*)          pkgs+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
                                    rust_targets+=("$t") ;;
    riscv64gc-unknown-linux-*)      pkgs+=(gcc-riscv64-linux-gnu libc6-dev-riscv64-cross)
                                    rust_targets+=("$t") ;;
    *) echo "install-deps: unknown target $t" >&2; exit 2 ;;
  esac
done

missing=()
for p in $(printf '%s\n' "${pkgs[@]}" | sort -u); do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-deps: apt packages present"
fi


add_target() {   # add_target TRIPLE -> 0 when the rust-std is (now) installed
  if rustup target list --installed | grep -qx "$1"; then
    echo "install-deps: rust-std $1 present"
  elif rustup target add "$1" >/dev/null 2>&1; then
    echo "install-deps: rust-std $1 added"
  else
    return 1
  fi
}

for t in $(printf '%s\n' "${rust_targets[@]}" | sort -u); do
  add_target "$t" && continue
  fb=$(fallback_of "$t")
  if [ -n "$fb" ] && add_target "$fb"; then
    echo "install-deps: rust-std $t not available from rustup here; build.sh will build $fb with +crt-static instead"
  else
    echo "install-deps: rust-std $t not available from rustup here and no fallback" >&2
  fi
done
