#!/usr/bin/env bash
# Fleet simulation (issue 15): bench/fleet.sh [N] [fleet.py options]
# N agents (default 200) against one fake server; see bench/fleet.py.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
shift || true
[ -x target/debug/testflinger-agent ] || cargo build -q
ulimit -n 65536 2>/dev/null || true
python3 bench/fleet.py --agents "$n" "$@"
