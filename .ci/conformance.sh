#!/usr/bin/env bash
# Conformance (issue 16): our release binary and the upstream agent, each on
# the same jobs, against the real upstream server (mongomock), device
# connectors and CLI; fails on any difference allowed.yaml does not explain.
#   UPSTREAM=path/to/canonical-testflinger-checkout bash .ci/conformance.sh
# Extra arguments go to tests/upstream/conformance.py (e.g. --only full_job).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
echo "== conformance against upstream testflinger"

upstream=${UPSTREAM:-../shared/upstream/testflinger}
if [ ! -d "$upstream/server" ]; then
    echo "conformance: no upstream checkout at $upstream; skipped"
    exit 0
fi
upstream=$(cd "$upstream" && pwd)

work=$(mktemp -d /tmp/tf-conformance.XXXXXX)
harness=
cleanup() {
    status=$?
    trap - EXIT INT TERM
    # the harness stops its agents itself; these are for when it could not
    if [ -n "$harness" ]; then kill -TERM -- "-$harness" 2>/dev/null || true; fi
    sleep 1
    if [ -f "$work/pgids" ]; then
        while read -r g; do kill -KILL -- "-$g" 2>/dev/null || true; done < "$work/pgids"
    fi
    if [ -n "$harness" ]; then kill -KILL -- "-$harness" 2>/dev/null || true; fi
    if [ -n "${KEEP_WORK:-}" ]; then echo "conformance: work dir kept: $work"; else rm -rf "$work"; fi
    echo "conformance: $(( $(date +%s) - start )) s"
    exit "$status"
}
trap cleanup EXIT INT TERM

if ! python3 -m venv "$work/venv" >/dev/null 2>&1; then
    echo "conformance: installing python3-venv"
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$work/venv"
fi

# ../shared is read-only and some of these builds write into their tree
cp -r "$upstream" "$work/testflinger"
t=$(date +%s)
SETUPTOOLS_SCM_PRETEND_VERSION=1.0.0 "$work/venv/bin/pip" install -q \
    "$work/testflinger/common" "$work/testflinger/server" mongomock \
    "$work/testflinger/device-connectors" "$work/testflinger/agent" \
    "$work/testflinger/cli"
echo "conformance: upstream venv in $(( $(date +%s) - t )) s"

cargo build --release --locked -q

# own session, so that the trap can stop the harness and all it started
setsid -w "$work/venv/bin/python" tests/upstream/conformance.py \
    --agent "$root/target/release/testflinger-agent" --venv "$work/venv" \
    --work "$work/runs" --pgid-file "$work/pgids" "$@" &
harness=$!
wait "$harness"
