#!/usr/bin/env bash
# Build static release binaries of testflinger-agent for lab controllers.
#
#   cross/build.sh [--no-tls] [--install-deps] [--local|--cross] [target...]
#
# Targets default to the four release targets:
#   x86_64-unknown-linux-musl aarch64-unknown-linux-musl
#   armv7-unknown-linux-musleabihf riscv64gc-unknown-linux-musl
#
# How each target is built:
#   cross         `cross build` (cross-rs, Docker images, CROSS_CONFIG=cross/Cross.toml),
#                 used when `cross` is installed and `docker info` works.
#   local         cargo with the rustup standard library for the target and
#                 Debian's gcc cross compiler as C compiler (ring) and linker.
#   glibc-static  when rustup has no standard library for a musl target here:
#                 the matching *-linux-gnu target with -C target-feature=+crt-static.
#
# Results: target/dist/testflinger-agent-<built-triple>[-notls]. Every binary is
# checked with `file` to be statically linked. Exit status is non-zero if any
# requested target did not build or is not static: nothing is skipped silently.
#
# Options:
#   --no-tls        build with --no-default-features (plain HTTP only)
#   --install-deps  run cross/install-deps.sh for the targets first
#   --local         never use cross, even if Docker works
#   --cross         require cross (fail if cross or Docker is unavailable)
#   --no-fallback   fail instead of falling back to a static glibc build
set -euo pipefail
# shellcheck source=cross/targets.sh
. "$(dirname "$0")/targets.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DEFAULT_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl
                 armv7-unknown-linux-musleabihf riscv64gc-unknown-linux-musl)
tls=1 install=0 mode=auto fallback=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tls) tls=0 ;;
    --install-deps) install=1 ;;
    --local) mode=local ;;
    --cross) mode=cross ;;
    --no-fallback) fallback=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${DEFAULT_TARGETS[@]}")

if [ "$install" = 1 ]; then
  "$ROOT/cross/install-deps.sh" "${targets[@]}"
fi

export CROSS_CONFIG="${CROSS_CONFIG:-$ROOT/cross/Cross.toml}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
DIST="$ROOT/target/dist"
mkdir -p "$DIST"

suffix=""; features=()
if [ "$tls" = 0 ]; then suffix="-notls"; features=(--no-default-features); fi

have_cross() {
  command -v cross >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 \
    && docker info >/dev/null 2>&1
}
use_cross=0
case "$mode" in
  auto) have_cross && use_cross=1 ;;
  cross) have_cross || { echo "build.sh: --cross given but cross/docker unavailable" >&2; exit 1; }
         use_cross=1 ;;
esac

# Debian cross gcc prefix for a triple (C compiler for ring, and the linker).
gcc_prefix() {
  case "$1" in
    aarch64-*)   echo aarch64-linux-gnu ;;
    armv7-*)     echo arm-linux-gnueabihf ;;
    riscv64gc-*) echo riscv64-linux-gnu ;;
    x86_64-*)    echo "" ;;
  esac
}
have_std() {
  rustup target list --installed 2>/dev/null | grep -qx "$1" && return 0
  rustup target add "$1" >/dev/null 2>&1
}

# Run cargo for TRIPLE with the env a local cross build needs.
# $2 = 1 to force +crt-static (glibc fallback).
cargo_local() {
  local t=$1 crt=$2 up low pre
  up=$(tr 'a-z-' 'A-Z_' <<<"$t"); low=${t//-/_}
  pre=$(gcc_prefix "$t")
  local -a env=()
  if [ -n "$pre" ]; then
    env+=("CC_$low=$pre-gcc" "AR_$low=$pre-ar" "CARGO_TARGET_${up}_LINKER=$pre-gcc")
  elif [[ "$t" == x86_64-*-musl ]]; then
    # ring's C code against musl headers; rustc links with its self-contained crt.
    env+=("CC_$low=musl-gcc")
  fi
  if [ "$crt" = 1 ]; then
    # RUSTFLAGS, when set, wins over CARGO_TARGET_<T>_RUSTFLAGS: extend whichever applies.
    if [ -n "${RUSTFLAGS:-}" ]; then
      env+=("RUSTFLAGS=$RUSTFLAGS -C target-feature=+crt-static")
    else
      env+=("CARGO_TARGET_${up}_RUSTFLAGS=-C target-feature=+crt-static")
    fi
  fi
  env "${env[@]}" cargo build --release --locked --target "$t" "${features[@]}"
}

fail=0
rows=()
for t in "${targets[@]}"; do
  echo "=== $t${suffix}"
  built="" how=""
  if [ "$use_cross" = 1 ]; then
    if cross build --release --locked --target "$t" "${features[@]}"; then
      built=$t how=cross
    fi
  elif have_std "$t"; then
    if cargo_local "$t" 0; then built=$t how=local; fi
  else
    fb=$(fallback_of "$t")
    if [ "$fallback" = 1 ] && [ -n "$fb" ] && have_std "$fb"; then
      echo "build.sh: no rust-std for $t here; building $fb with +crt-static"
      if cargo_local "$fb" 1; then built=$fb how=glibc-static; fi
    else
      echo "build.sh: no rust-std for $t and no usable fallback" >&2
    fi
  fi
  if [ -z "$built" ]; then
    rows+=("$t|-|FAILED (build)|-")
    fail=1
    continue
  fi
  out="$DIST/testflinger-agent-$built$suffix"
  cp "$TARGET_DIR/$built/release/testflinger-agent" "$out"
  desc=$(file -b "$out")
  echo "file: $desc"
  if [[ "$desc" != *"statically linked"* && "$desc" != *"static-pie linked"* ]] \
     || [[ "$desc" == *"dynamically linked"* || "$desc" == *interpreter* ]]; then
    echo "build.sh: $out is NOT statically linked" >&2
    rows+=("$t|$built|FAILED (not static)|$(stat -c %s "$out")")
    fail=1
    continue
  fi
  rows+=("$t|$built|$how|$(stat -c %s "$out")")
done

echo
printf '%-31s %-38s %-13s %9s\n' "target" "built as" "how" "bytes"
for r in "${rows[@]}"; do
  IFS='|' read -r a b c d <<<"$r"
  printf '%-31s %-38s %-13s %9s\n' "$a" "$b$suffix" "$c" "$d"
done
exit "$fail"
