#!/usr/bin/env bash
# CI: static musl binaries for the five release targets (TLS and plain HTTP,
# each checked static, stripped and within its size budget by build.sh),
# then proof that they run: the whole integration suite under qemu-aarch64,
# `full_job` (a real job through the fake server) for every other binary.
# Prints each section's time and a summary table.
# CROSS_CI_TARGETS (space-separated) narrows the targets when time is short;
# default: all five.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== static musl binaries, five targets, under qemu (.ci/cross.sh)"
. cross/targets.sh
t0=$SECONDS
times=()
section() {   # section NAME command...
  local name=$1 s=$SECONDS
  shift
  echo "== cross: $name"
  "$@"
  times+=("$(printf '%-55s %5d s' "$name" $((SECONDS - s)))")
}

section "install deps (apt, pip ziglang, cargo-zigbuild, rust-src)" bash cross/install-deps.sh
read -r -a targets <<<"${CROSS_CI_TARGETS:-${RELEASE_TARGETS[*]}}"
section "build TLS, ${#targets[@]} targets" bash cross/build.sh "${targets[@]}"
section "build plain HTTP, ${#targets[@]} targets" bash cross/build.sh --no-tls "${targets[@]}"

# The dependency list each binary carries (cargo auditable) is readable by
# `cargo audit bin`, as on a binary taken from a controller.
bins=()
for t in "${targets[@]}"; do bins+=("target/dist/testflinger-agent-$t" "target/dist/testflinger-agent-$t-notls"); done
section "cargo audit bin, ${#bins[@]} binaries" cargo audit --db ../shared/advisory-db --no-fetch --stale bin "${bins[@]}"

# What ran where, for the table: target -> "passed/skipped".
declare -A suite
check() {   # check TARGET [--no-tls] [filter]
  local t=$1 tls=() kind=tls; shift
  if [ "${1:-}" = --no-tls ]; then tls=(--no-tls); kind=plain; shift; fi
  local filter=${1:-} log; log=$(mktemp)
  set +e
  bash cross/qemu-check.sh "${tls[@]}" "$t" ${filter:+"$filter"} > "$log" 2>&1
  local rc=$?
  set -e
  grep -E '^(qemu-check|test result)' "$log" || true
  if [ "$rc" != 0 ]; then cat "$log"; rm -f "$log"; return "$rc"; fi
  suite["$t $kind"]="$(sed -n 's/^qemu-check: \([0-9]*\) passed, 0 failed, \([0-9]*\) skipped.*/\1 passed, \2 skipped/p' "$log") (${filter:-whole suite})"
  rm -f "$log"
}
for t in "${targets[@]}"; do
  if [ "$t" = aarch64-unknown-linux-musl ]; then
    section "qemu aarch64: the whole suite (TLS)" check "$t"
    section "qemu aarch64: full_job (plain)" check "$t" --no-tls full_job
  else
    section "qemu ${t%%-*}: full_job (TLS, plain)" eval "check $t full_job && check $t --no-tls full_job"
  fi
done

echo
echo "== cross: summary"
printf '%-31s %-8s %10s %10s  %s\n' target static "TLS B" "plain B" "under qemu (TLS / plain)"
for t in "${targets[@]}"; do
  f=target/dist/testflinger-agent-$t
  st=no; file -b "$f" | grep -qE 'statically linked|static-pie linked' && st=yes
  printf '%-31s %-8s %10s %10s  %s / %s\n' "$t" "$st" "$(stat -c %s "$f")" "$(stat -c %s "$f-notls")" \
    "${suite["$t tls"]:-not run}" "${suite["$t plain"]:-not run}"
done
echo
printf '%s\n' "${times[@]}"
echo "cross: total $((SECONDS - t0)) s"
