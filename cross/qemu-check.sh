#!/usr/bin/env bash
# Prove a cross-built agent runs: under qemu-user (called explicitly,
# binfmt_misc is not needed), run --version, then the integration tests
# against the fake server with the agent process replaced by the cross binary.
#
#   cross/qemu-check.sh [--no-tls] [--build] <target> [filter] [-- test-args...]
#
#   <target>   e.g. aarch64-unknown-linux-musl (or a glibc-static fallback
#              triple such as armv7-unknown-linux-gnueabihf)
#   filter     cargo test name filter for `cargo test --test it`; none = the
#              whole integration suite (`full_job` = one real job through the
#              fake server: phases, output, artifacts)
#   --build    run cross/build.sh for the target first
#   --no-tls   check the -notls binary
#
# The harness (tests/it/harness.rs) starts every agent as
#   $TF_AGENT_WRAPPER $TF_AGENT_BIN <args>
# with TF_AGENT_WRAPPER = "qemu-<arch>-static -cpu <oldest core of the target>"
# (cross/targets.sh). Tests that cannot prove anything under qemu are skipped,
# each with its reason printed (SKIPS below). Fails if qemu or the binary is
# missing, if --version fails, if the filter matches no test, or if any test
# fails. Ends with "qemu-check: N passed, 0 failed, M skipped".
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
filter=${pos[1]:-}
qemu=$(qemu_of "$target") || { echo "qemu-check: unknown target $target" >&2; exit 2; }

if [ "$build" = 1 ]; then
  "$ROOT/cross/build.sh" "${tls_flag[@]}" "$target"
fi

bin="${QEMU_CHECK_BIN:-$ROOT/target/dist/testflinger-agent-$target$suffix}"   # QEMU_CHECK_BIN: check another copy
[ -x "$bin" ] || { echo "qemu-check: $bin not built (run cross/build.sh ${tls_flag[*]} $target)" >&2; exit 1; }

qemu_bin=""
if [ -n "$qemu" ]; then
  qemu_bin=$(command -v "${qemu%% *}") || { echo "qemu-check: ${qemu%% *} not found (cross/install-deps.sh)" >&2; exit 1; }
  wrapper="$qemu_bin${qemu#"${qemu%% *}"}"
  echo "qemu-check: $("$qemu_bin" --version | head -1)"
fi

desc=$(file -b "$bin")
echo "qemu-check: $bin"
echo "qemu-check: $desc"
if [[ "$desc" == *"dynamically linked"* || "$desc" == *interpreter* ]]; then
  echo "qemu-check: not a static binary" >&2; exit 1
fi

echo "qemu-check: ${qemu:-native} $(basename "$bin") --version"
# shellcheck disable=SC2086 # the wrapper is words: program and -cpu option
out=$(${qemu:+$wrapper} "$bin" --version 2>&1) || { echo "$out"; echo "qemu-check: --version failed" >&2; exit 1; }
echo "$out"
[ -n "$out" ] || { echo "qemu-check: --version printed nothing" >&2; exit 1; }
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
[[ "$out" == *"$version"* ]] || echo "qemu-check: warning: --version output does not mention $version"

# Tests skipped under qemu, with why. Only under emulation: natively
# (x86_64) nothing is skipped.
skips=()
skip() {   # only those the filter would have run
  [ -z "$filter" ] || [[ "$1" == *"$filter"* ]] || return 0
  skips+=("$1"); echo "qemu-check: skip $1: $2"
}
if [ -n "$qemu" ]; then
  skip artifacts::attachments_bomb_stops_at_the_entry_limit \
    "unpacks a 100,001-member attachments tarball, past the test's 60 s limit under emulation on 2 shared cores (measured: not done in 60 s under qemu-aarch64 10.0.2); the entry limit is the same code on every target and is proven natively"
  major=$("$qemu_bin" --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
  if [ "${major:-0}" -lt 10 ]; then
    why="qemu-user $major returns EINVAL for prctl(PR_SET_CHILD_SUBREAPER) (measured: 7.2 does, 10.0 passes it through), so a setsid'd grandchild is re-parented past the agent and cannot be found; install qemu 10 (cross/install-deps.sh)"
    skip streaming::cancel_stops_the_phase_and_leaves_no_process "$why"
    skip streaming::global_timeout_writes_its_line_emits_its_event_and_leaves_no_process "$why"
    skip streaming::sigterm_to_the_agent_mid_phase_leaves_no_process_and_delivers_the_outcome "$why"
  fi
fi

# Every binary here is a release build, which ignores the debug-only hook
# that makes a name lookup hang (TESTFLINGER_AGENT_TEST_LOOKUP_DELAY): no
# test can make a real lookup hang without a name server of its own. The
# lookup's deadline is the same code on every target; cargo test proves it.
why="needs the debug-only hanging-lookup hook; release binaries ignore it"
skip stalls::a_hanging_name_lookup_is_given_up_at_the_call_deadline "$why"
skip stalls::sigterm_is_honoured_while_a_name_lookup_hangs "$why"

skip_args=()
for s in "${skips[@]}"; do skip_args+=(--skip "$s"); done

echo "qemu-check: TF_AGENT_BIN=$bin TF_AGENT_WRAPPER=${wrapper:-<unset>} cargo test --test it ${filter:-<all>}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
if [ -n "$qemu" ]; then
  TF_AGENT_BIN="$bin" TF_AGENT_WRAPPER="$wrapper" \
    cargo test --locked --test it ${filter:+"$filter"} -- "${skip_args[@]}" "${extra[@]}" 2>&1 | tee "$log"
else
  env -u TF_AGENT_WRAPPER TF_AGENT_BIN="$bin" \
    cargo test --locked --test it ${filter:+"$filter"} -- "${skip_args[@]}" "${extra[@]}" 2>&1 | tee "$log"
fi
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || { echo "qemu-check: tests failed under ${qemu:-native} ($target)" >&2; exit "$rc"; }
passed=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
ignored=$(sed -n 's/^test result: .* \([0-9]*\) ignored.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
if [ "$passed" -lt 1 ]; then
  echo "qemu-check: filter '$filter' ran no test: nothing was proven" >&2
  exit 1
fi
echo "qemu-check: OK $target ($(basename "$bin")) under ${qemu:-native}, filter '${filter:-<all>}'"
echo "qemu-check: $passed passed, 0 failed, ${#skips[@]} skipped ($ignored #[ignore]d)"
