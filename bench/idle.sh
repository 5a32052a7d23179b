#!/usr/bin/env bash
# Idle cost: peak RSS and CPU of the release agent polling an empty queue
# for a while (default 20 s, polling every 0.2 s) against a minimal local
# server. Prints the figures; stops by itself. AGENT_BIN=path measures that
# binary instead (e.g. target/dist/testflinger-agent-x86_64-unknown-linux-musl).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
bin=${AGENT_BIN:-./target/release/testflinger-agent}
[ -n "${AGENT_BIN:-}" ] || cargo build --release -q
tmp=$(mktemp -d)
trap 'kill $srv 2>/dev/null || true; rm -rf "$tmp"' EXIT
python3 bench/fake_server.py --port-file "$tmp/port" --lifetime $((secs + 60)) &
srv=$!
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.05; done
cat > "$tmp/agent.conf" <<CONF
agent_id: idle-agent
server_address: 127.0.0.1:$(cat "$tmp/port")
job_queues: [idle]
polling_interval: 0.2
execution_basedir: $tmp/run
logging_basedir: $tmp/logs
results_basedir: $tmp/results
logging_quiet: true
CONF
/usr/bin/time -v timeout -s INT "$secs" "$bin" -c "$tmp/agent.conf" 2> "$tmp/time.txt" || true
polls=$(grep -c . "$tmp/logs/testflinger-agent.log" || true)
echo "idle polling ${secs}s every 0.2s:"
grep -E "Maximum resident set size|User time|System time|Percent of CPU" "$tmp/time.txt" | sed 's/^\s*/  /'
echo "  binary: $bin, $(stat -c %s "$bin") bytes (stripped)"
