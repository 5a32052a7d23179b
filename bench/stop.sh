#!/usr/bin/env bash
# Time from SIGTERM to exit in each state of the agent (polling, a phase,
# a held fragment, delivering, a drip-feeding server, a stalled CONNECT
# proxy, a hanging name lookup), STOP_REPS runs each (default 5): median
# and max. The debug build: the hanging lookup is simulated by a hook
# only debug builds have (TESTFLINGER_AGENT_TEST_LOOKUP_DELAY).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test -q --test it stalls::stop_times_in_each_state -- --ignored --nocapture 2>/dev/null | grep '^|'
