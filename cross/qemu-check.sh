#!/usr/bin/env bash
# Prove a cross-built agent runs: under qemu-user (called explicitly, binfmt
# is not needed), run --version, then the integration tests against the fake
# server with the agent process replaced by the cross binary.
#
#   cross/qemu-check.sh [--no-tls] [--build] <target> [filter] [-- test-args...]
#
#   <target>   e.g. aarch64-unknown-linux-musl; if target/dist has no binary
#              for it but has the static-glibc fallback build (armv7/riscv64
#              without a musl rust-std), that one is checked.
#   filter     cargo test name filter for `cargo test --test it`, default
#              "full_job": the test(s) whose name contains full_job run a
#              real job through the fake server (phases, output, artifacts).
#   --build    run cross/build.sh for the target first
#   --no-tls   check the -notls binary
#
# The test harness (tests/it/harness.rs) starts the agent as
#   $TF_AGENT_WRAPPER $TF_AGENT_BIN <args>   (wrapper omitted when unset)
# Fails if qemu or the binary is missing, if --version fails, if the filter
# matches no test, or if any test fails.
set -euo pipefail
# shellcheck source=cross/targets.sh
. "$(dirname "$0")/targets.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

suffix="" build=0 tls_flag=()
pos=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tls) suffix="-notls"; tls_flag=(--no-tls) ;;
    --build) build=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "qemu-check: unknown option $1" >&2; exit 2 ;;
    *) pos+=("$1") ;;
  esac
  shift
done
[ ${#pos[@]} -ge 1 ] || { echo "usage: $0 [--no-tls] [--build] <target> [filter] [-- test-args]" >&2; exit 2; }
target=${pos[0]}
filter=${pos[1]:-full_job}

case "$target" in
  x86_64-*)    qemu="" ;;                 # runs natively on the x86_64 host
  aarch64-*)   qemu="qemu-aarch64-static" ;;
  armv7-*)     qemu="qemu-arm-static" ;;
  riscv64gc-*) qemu="qemu-riscv64-static" ;;
  *) echo "qemu-check: unknown target $target" >&2; exit 2 ;;
esac
fb=$(fallback_of "$target")

if [ "$build" = 1 ]; then
  "$ROOT/cross/build.sh" "${tls_flag[@]}" "$target"
fi

bin="$ROOT/target/dist/testflinger-agent-$target$suffix"
if [ ! -x "$bin" ] && [ -n "$fb" ] && [ -x "$ROOT/target/dist/testflinger-agent-$fb$suffix" ]; then
  bin="$ROOT/target/dist/testflinger-agent-$fb$suffix"
  echo "qemu-check: using the static-glibc fallback build $(basename "$bin")"
fi
[ -x "$bin" ] || { echo "qemu-check: $bin not built (run cross/build.sh ${tls_flag[*]} $target)" >&2; exit 1; }

wrapper=""
if [ -n "$qemu" ]; then
  wrapper=$(command -v "$qemu") || { echo "qemu-check: $qemu not found (apt-get install qemu-user-static)" >&2; exit 1; }
fi

desc=$(file -b "$bin")
echo "qemu-check: $bin"
echo "qemu-check: $desc"
if [[ "$desc" == *"dynamically linked"* || "$desc" == *interpreter* ]]; then
  echo "qemu-check: not a static binary" >&2; exit 1
fi

echo "qemu-check: ${qemu:-native} $(basename "$bin") --version"
out=$(${wrapper:+"$wrapper"} "$bin" --version 2>&1) || { echo "$out"; echo "qemu-check: --version failed" >&2; exit 1; }
echo "$out"
[ -n "$out" ] || { echo "qemu-check: --version printed nothing" >&2; exit 1; }
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
[[ "$out" == *"$version"* ]] || echo "qemu-check: warning: --version output does not mention $version"

echo "qemu-check: TF_AGENT_BIN=$bin TF_AGENT_WRAPPER=${wrapper:-<unset>} cargo test --test it $filter"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
if [ -n "$wrapper" ]; then
  TF_AGENT_BIN="$bin" TF_AGENT_WRAPPER="$wrapper" \
    cargo test --locked --test it "$filter" -- "${extra[@]}" 2>&1 | tee "$log"
else
  env -u TF_AGENT_WRAPPER TF_AGENT_BIN="$bin" \
    cargo test --locked --test it "$filter" -- "${extra[@]}" 2>&1 | tee "$log"
fi
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || { echo "qemu-check: tests failed under ${qemu:-native} ($target)" >&2; exit "$rc"; }
passed=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
if [ "$passed" -lt 1 ]; then
  echo "qemu-check: filter '$filter' ran no test: nothing was proven" >&2
  exit 1
fi
echo "qemu-check: OK $target ($(basename "$bin")): --version and $passed test(s) matching '$filter' passed under ${qemu:-native}"
