#!/usr/bin/env bash
# Wake-ups while a quiet phase runs: poll(2) calls of the agent (and its
# phase) over one job whose test phase is `sleep 5`, with the metrics
# endpoint on (-p 0), against bench/fake_server.py. Needs strace.
# AGENT_BIN=path measures that binary instead of target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${AGENT_BIN:-./target/release/testflinger-agent}
[ -n "${AGENT_BIN:-}" ] || cargo build --release -q
work=$(mktemp -d)
python3 bench/fake_server.py --port-file "$work/port" --lifetime 60 &
srv=$!
trap 'kill $srv 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.05; done
base="http://127.0.0.1:$(cat "$work/port")"
cat > "$work/agent.conf" <<CONF
agent_id: wakeups
server_address: $base
polling_interval: 0.1
execution_basedir: $work/run
logging_basedir: $work/logs
results_basedir: $work/results
job_queues: [bench]
test_command: "sleep 5"
CONF
curl -s -X POST -d '{"job_id": "w1", "job_queue": "bench", "test_data": {"test_cmds": "x"}}' "$base/bench/job" >/dev/null
strace -f -c -e trace=poll,ppoll -o "$work/strace.txt" "$bin" -c "$work/agent.conf" -p 0 --once >/dev/null 2>&1 || true
echo "poll(2) calls over one job with a 5 s quiet phase: $(awk '$NF == "poll" {print $4}' "$work/strace.txt")"
echo "binary: $bin"
