#!/usr/bin/env bash
# Request budget: what one agent costs the server per minute while idle,
# during a quiet phase and during a chatty phase (a line every 0.25 s).
# One agent (default polling_interval 10 s) against bench/fake_server.py,
# which records every request; the job is offered after the idle window.
#   bench/budget.sh [SECONDS_PER_WINDOW] [extra config lines...]
# e.g. bench/budget.sh 20 "output_interval: 0.25"   (the old 250 ms rule)
#
# Live-output latency: bench/budget.sh latency [--agent ours|upstream|both]
#   [SECONDS_PER_CASE] [REPEAT]
# runs bench/latency.py (lines every 1 s, every 3 s, a start line then the
# first line REPEAT times, chatty 4 lines/s; delay from write to server).
# `both` runs ours (TF_AGENT_BIN, default the debug build) and the upstream
# agent (bench/upstream-agent.sh) at the same time, each against its own
# fake server with the same config, and prints one table. polling_interval
# is 1 s (upstream takes whole seconds only). Stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = latency ]; then
  shift
  which=ours
  if [ "${1:-}" = --agent ]; then which=$2; shift 2; fi
  case "$which" in ours) sides=(ours) ;; upstream) sides=(upstream) ;; both) sides=(ours upstream) ;;
    *) echo "--agent: ours, upstream or both" >&2; exit 2 ;; esac
  secs=${1:-20}
  repeat=${2:-5}
  bin=${TF_AGENT_BIN:-target/debug/testflinger-agent}
  tmp=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
  specs=()
  for side in "${sides[@]}"; do
    if [ "$side" = ours ]; then
      [ -x "$bin" ] || cargo build -q
      argv=("$(realpath "$bin")")
    else
      argv=("$(bench/upstream-agent.sh)")
    fi
    d=$tmp/$side
    mkdir -p "$d"
    python3 bench/fake_server.py --port-file "$d/port" --lifetime $((secs * 12 + repeat * 40 + 300)) &
    pids+=($!)
    for _ in $(seq 100); do [ -s "$d/port" ] && break; sleep 0.05; done
    cat > "$d/agent.conf" <<CONF
agent_id: latency-$side
server_address: 127.0.0.1:$(cat "$d/port")
job_queues: [budget]
polling_interval: 1
execution_basedir: $d/run
logging_basedir: $d/logs
results_basedir: $d/results
logging_quiet: true
test_command: python3 $PWD/bench/emit.py $d/case $secs
CONF
    (cd "$d" && exec "${argv[@]}" -c "$d/agent.conf" > "$d/agent.out" 2>&1) &
    pids+=($!)
    echo "$side: ${argv[*]}"
    specs+=("$side=$(cat "$d/port")=$d/case")
  done
  python3 bench/latency.py "$secs" "$repeat" "${specs[@]}"
  exit 0
fi
secs=${1:-20}
shift || true
bin=${TF_AGENT_BIN:-target/debug/testflinger-agent}
[ -x "$bin" ] || cargo build -q
tmp=$(mktemp -d)
trap 'kill $srv 2>/dev/null || true; rm -rf "$tmp"' EXIT
python3 bench/fake_server.py --port-file "$tmp/port" --request-log "$tmp/requests.txt" --lifetime $((secs * 4 + 120)) &
srv=$!
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.05; done
{
  echo "agent_id: budget-agent"
  echo "server_address: 127.0.0.1:$(cat "$tmp/port")"
  echo "job_queues: [budget]"
  echo "execution_basedir: $tmp/run"
  echo "logging_basedir: $tmp/logs"
  echo "results_basedir: $tmp/results"
  echo "logging_quiet: true"
  echo "setup_command: sleep $secs"
  echo "test_command: \"i=0; while [ \$i -lt $((secs * 4)) ]; do echo line \$i; i=\$((i+1)); sleep 0.25; done\""
  for line in "$@"; do echo "$line"; done
} > "$tmp/agent.conf"
"$bin" -c "$tmp/agent.conf" &
agent=$!
# The job is offered after the idle window (the server's clock starts with it).
sleep "$secs"
python3 - "$(cat "$tmp/port")" <<'PY'
import json, sys, urllib.request
job = {"job_id": "00000000-0000-4000-8000-000000000001", "job_queue": "budget",
       "setup_data": {}, "test_data": {"test_cmds": "x"}}
urllib.request.urlopen(urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[1]}/bench/job", data=json.dumps(job).encode(), method="POST"))
PY
for _ in $(seq $(( (secs * 3 + 60) * 10 ))); do
  grep -q " complete$" "$tmp/requests.txt" 2>/dev/null && break
  sleep 0.1
done
kill -TERM $agent; wait $agent || true
python3 - "$tmp/requests.txt" "$secs" "$*" <<'PY'
import sys
# The bench's own control requests are not the agent's.
lines = [l.split() for l in open(sys.argv[1]) if " /bench/" not in l]
secs = float(sys.argv[2])
t = lambda pred, after=-1.0: next(float(l[0]) for l in lines if float(l[0]) > after and pred(l))
setup = t(lambda l: l[1] == "POST" and l[-1] == "setup")
test = t(lambda l: l[1] == "POST" and l[-1] == "test")
# A phase's window ends with the status post after it (a result post
# without a job_state); the skipped phases between setup and test are
# announced as upstream does and are not a phase's running cost.
status_post = lambda l: l[1] == "POST" and l[2].count("/") == 3 and len(l) == 3
setup_end = t(status_post, setup)
test_end = t(status_post, test)
def rate(a, b):
    n = sum(1 for l in lines if a <= float(l[0]) < b)
    return n, n / (b - a) * 60
# Idle from the first job poll on (start-up requests are not idle cost).
first_poll = t(lambda l: l[1] == "GET" and l[2].startswith("/v1/job"))
idle_n, idle = rate(first_poll, secs)
quiet_n, quiet = rate(setup, setup_end)
chatty_n, chatty = rate(test, test_end)
frags = sum(1 for l in lines if test <= float(l[0]) < test_end and l[2].endswith("/log/output"))
print(f"config extra: {sys.argv[3] or '(defaults)'}")
print(f"requests per agent-minute: idle {idle:.1f} ({idle_n} in {secs - first_poll:.1f} s), "
      f"quiet phase {quiet:.1f} ({quiet_n} in {setup_end - setup:.1f} s), "
      f"chatty phase {chatty:.1f} ({chatty_n} in {test_end - test:.1f} s; {frags} output fragments)")
PY
