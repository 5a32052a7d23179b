#!/usr/bin/env bash
# Build static musl release binaries of testflinger-agent for lab controllers.
#
#   cross/build.sh [--no-tls] [--install-deps] [--cross|--glibc-static]
#                  [--build-std] [--no-budget] [target...]
#
# Targets default to the five release targets (cross/targets.sh):
#   x86_64-unknown-linux-musl aarch64-unknown-linux-musl
#   armv7-unknown-linux-musleabihf arm-unknown-linux-musleabihf (ARMv6)
#   riscv64gc-unknown-linux-musl
#
# How (default "zig"): cargo-zigbuild, zig as the C compiler (ring) and the
# linker, zig's own musl CRT and libc (-C link-self-contained=no). The Rust
# standard library is rustup's where rustup has it for the target (stable
# toolchain), else built from source: `cargo +nightly zigbuild
# -Zbuild-std=std,panic_abort` (always for armv7, armv6 and riscv64:
# BUILD_STD_TARGETS in cross/targets.sh; TF_NIGHTLY names a dated nightly).
#
# Every binary carries its dependency list (cargo auditable: a .dep-v0
# section, zlib-compressed JSON) for `cargo audit bin`, and is reproducible:
# see remap_flags below and .ci/reproducible.sh.
#
# Results: target/dist/testflinger-agent-<triple>[-notls]. Every binary is
# checked with `file` to be statically linked and against its size budget
# (cross/targets.sh: 3,000,000 bytes with TLS, 1,500,000 without). Exit
# status is non-zero if any requested target did not build, is not static or
# is over budget: nothing is skipped silently.
#
# Options:
#   --no-tls        build with --no-default-features (plain HTTP only)
#   --install-deps  run cross/install-deps.sh for the targets first
#   --cross         `cross build` (cross-rs Docker images, CROSS_CONFIG=cross/Cross.toml)
#   --glibc-static  the fallback: the matching *-linux-gnu target with
#                   +crt-static and Debian's gcc cross compiler (no ARMv6);
#                   named after the triple actually built
#   --build-std     build the standard library from source for every target
#   --no-budget     report sizes without failing on the budget
set -euo pipefail
# shellcheck source=cross/targets.sh
. "$(dirname "$0")/targets.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

tls=1 install=0 mode=zig build_std=0 budget=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tls) tls=0 ;;
    --install-deps) install=1 ;;
    --cross) mode=cross ;;
    --glibc-static) mode=glibc-static ;;
    --build-std) build_std=1 ;;
    --no-budget) budget=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${RELEASE_TARGETS[@]}")

if [ "$install" = 1 ]; then
  "$ROOT/cross/install-deps.sh" "${targets[@]}"
fi

export CROSS_CONFIG="${CROSS_CONFIG:-$ROOT/cross/Cross.toml}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
DIST="$ROOT/target/dist"
mkdir -p "$DIST"

suffix="" features=() limit=$BUDGET_TLS
if [ "$tls" = 0 ]; then suffix="-notls"; features=(--no-default-features); limit=$BUDGET_PLAIN; fi

if [ "$mode" = cross ]; then
  command -v cross >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
    || { echo "build.sh: --cross given but cross/docker unavailable" >&2; exit 1; }
fi

# Reproducible: the same commit gives bit-identical binaries whatever the
# checkout's directory, the user's $HOME (cargo registry, rustup toolchain)
# or the time of the build. The absolute paths rustc would write into panic
# locations are mapped to fixed ones; build.rs takes the build date from
# SOURCE_DATE_EPOCH, which defaults to the commit's date.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH
remap_flags() {   # remap_flags [+toolchain]
  local sysroot
  sysroot=$(rustc "$@" --print sysroot)
  printf '%s ' "--remap-path-prefix=$ROOT=/build/testflinger-agent" \
    "--remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
    "--remap-path-prefix=$sysroot=/rustc/toolchain"
}

have_std() {   # rustup (stable) has the standard library for $1
  rustup target list --installed 2>/dev/null | grep -qx "$1" && return 0
  rustup target add "$1" >/dev/null 2>&1
}

# zig: stable + rustup std where it exists, else nightly + build-std.
cargo_zig() {
  local t=$1
  local -a tc=() zflags=()
  if [ "$build_std" = 1 ] || [[ " ${BUILD_STD_TARGETS[*]} " == *" $t "* ]] || ! have_std "$t"; then
    tc=("+$NIGHTLY"); zflags=(-Zbuild-std=std,panic_abort)
    how="zig, build-std"
  else
    how="zig, rustup std"
  fi
  # zig supplies musl's CRT and libc; rustc's self-contained copies stay out.
  env RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$(remap_flags "${tc[@]}")-C link-self-contained=no" \
    cargo "${tc[@]}" auditable zigbuild --release --locked --target "$t" "${zflags[@]}" "${features[@]}"
}

# The glibc-static fallback, with Debian's gcc cross compiler.
cargo_glibc() {
  local t=$1 up low pre
  up=$(tr 'a-z-' 'A-Z_' <<<"$t"); low=${t//-/_}
  pre=$(gcc_prefix "$t")
  env "CC_$low=$pre-gcc" "AR_$low=$pre-ar" "CARGO_TARGET_${up}_LINKER=$pre-gcc" \
    RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$(remap_flags)-C target-feature=+crt-static" \
    cargo auditable build --release --locked --target "$t" "${features[@]}"
}

fail=0
rows=()
for t in "${targets[@]}"; do
  echo "=== $t${suffix} ($mode)"
  start=$SECONDS
  built="" how=""
  case "$mode" in
    cross)
      cross build --release --locked --target "$t" "${features[@]}" && built=$t how=cross ;;
    zig)
      cargo_zig "$t" && built=$t ;;
    glibc-static)
      fb=$(fallback_of "$t")
      if [ -z "$fb" ]; then
        echo "build.sh: no glibc-static fallback for $t" >&2
      elif have_std "$fb" && cargo_glibc "$fb"; then
        built=$fb how=glibc-static
      fi ;;
  esac
  secs=$((SECONDS - start))
  if [ -z "$built" ]; then
    rows+=("$t|-|FAILED (build)|-|${secs}s")
    fail=1
    continue
  fi
  out="$DIST/testflinger-agent-$built$suffix"
  # Copy then rename: a qemu-check running the old binary keeps its inode.
  cp "$TARGET_DIR/$built/release/testflinger-agent" "$out.tmp" && mv -f "$out.tmp" "$out"
  desc=$(file -b "$out")
  size=$(stat -c %s "$out")
  echo "file: $desc"
  if [[ "$desc" != *"statically linked"* && "$desc" != *"static-pie linked"* ]] \
     || [[ "$desc" == *"dynamically linked"* || "$desc" == *interpreter* ]]; then
    echo "build.sh: $out is NOT statically linked" >&2
    how="FAILED (not static)"; fail=1
  elif [[ "$desc" != *stripped* || "$desc" == *"not stripped"* ]]; then
    echo "build.sh: $out is not stripped" >&2
    how="FAILED (not stripped)"; fail=1
  elif [ "$budget" = 1 ] && [ "$size" -gt "$limit" ]; then
    echo "build.sh: $out is $size bytes, over the budget of $limit" >&2
    how="FAILED (over $limit)"; fail=1
  fi
  rows+=("$t|$built|$how|$size|${secs}s")
done

echo
printf '%-31s %-38s %-20s %9s %6s\n' "target" "built as" "how" "bytes" "time"
for r in "${rows[@]}"; do
  IFS='|' read -r a b c d e <<<"$r"
  printf '%-31s %-38s %-20s %9s %6s\n' "$a" "$b$suffix" "$c" "$d" "$e"
done
if [ "$budget" = 1 ]; then echo "budget: $limit bytes per binary"; else echo "budget: $limit bytes (not enforced: --no-budget)"; fi
exit "$fail"
