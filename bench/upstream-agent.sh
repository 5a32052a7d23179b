#!/usr/bin/env bash
# Prints the path of the upstream agent's `testflinger-agent` for the benches
# that run it beside ours, making its venv on first use as
# .ci/conformance.sh does (a copy of the read-only upstream tree, then pip).
#   bench/upstream-agent.sh     # -> $UPSTREAM_VENV/bin/testflinger-agent
#   bench/upstream-agent.sh --server   # the same, the venv also holding the
#                                      # upstream server and mongomock
# UPSTREAM: the upstream checkout (default ../shared/upstream/testflinger);
# UPSTREAM_VENV: where the venv lives (default /tmp/tf-bench-upstream-venv,
# kept between runs). Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
upstream=${UPSTREAM:-../shared/upstream/testflinger}
venv=${UPSTREAM_VENV:-/tmp/tf-bench-upstream-venv}
if [ ! -x "$venv/bin/testflinger-agent" ]; then
  [ -d "$upstream/agent" ] || { echo "no upstream checkout at $upstream" >&2; exit 1; }
  echo "making the upstream agent's venv in $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  cp -r "$upstream" "$venv/src"
  SETUPTOOLS_SCM_PRETEND_VERSION=1.0.0 timeout 600 "$venv/bin/pip" install -q "$venv/src/common" "$venv/src/agent" >&2
fi
if [ "${1:-}" = --server ] && ! "$venv/bin/python" -c 'import testflinger, mongomock' 2>/dev/null; then
  echo "adding the upstream server to $venv" >&2
  SETUPTOOLS_SCM_PRETEND_VERSION=1.0.0 timeout 600 "$venv/bin/pip" install -q "$venv/src/server" mongomock >&2
fi
echo "$venv/bin/testflinger-agent"
