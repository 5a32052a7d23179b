#!/usr/bin/env bash
# The ten common mistakes of a new operator, each run against the agent:
# prints a Markdown table (mistake, the first line printed, the first line
# at WARNING or worse, the exit status) for docs/operations.md's troubleshooting
# section. Re-run it after changing a message. Uses bench/fake_server.py as
# the server; every run is bounded (timeout 15 s). AGENT_BIN=path runs that
# binary instead of the debug build.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${AGENT_BIN:-./target/debug/testflinger-agent}
[ -n "${AGENT_BIN:-}" ] || cargo build -q || exit 1
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT
python3 bench/fake_server.py --port-file "$tmp/port" --lifetime 300 >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.05; done
port=$(cat "$tmp/port")
closed=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# A config that works, with one line changed by each case.
base() {
  cat <<CONF
agent_id: mistakes-agent
server_address: 127.0.0.1:$port
job_queues: [mistakes]
polling_interval: 1
server_timeout: 2
execution_basedir: $tmp/$1/run
logging_basedir: $tmp/$1/logs
results_basedir: $tmp/$1/results
setup_command: "true"
test_command: "cat testflinger.json >/dev/null"
CONF
}

row() { # name, then the agent's arguments; the config is $tmp/$name.conf
  local name=$1 what=$2; shift 2
  timeout -s INT 15 "$bin" "$@" >"$tmp/$name.out" 2>&1
  local code=$?
  local clean="s/^\[[^]]*\] *//; s,$tmp,\$TMP,g; s/:$port/:\$PORT/g; s/ $port/ \$PORT/g; s/:$closed/:\$CLOSED/g; s/|/\\\\|/g"
  local first worst
  first=$(grep -m1 . "$tmp/$name.out" | sed "$clean")
  worst=$(grep -m1 -E '(WARNING|ERROR|CRITICAL): |^testflinger-agent: ' "$tmp/$name.out" | sed "$clean")
  [ "$worst" = "$first" ] && worst="(the same)"
  [ "$code" = 124 ] && code="still running after 15 s (stopped)"
  printf '| %s | `` %s `` | `` %s `` | %s |\n' "$what" "$first" "${worst:-none}" "$code"
}

echo "| mistake | first line printed | first WARNING/ERROR line | exit status |"
echo "|---|---|---|---|"

base key | sed 's/^polling_interval:/polling_intervall:/' >"$tmp/key.conf"
row key "wrong config key (\`polling_intervall\`)" -c "$tmp/key.conf" --once

base type | sed 's/^polling_interval: 1/polling_interval: soon/' >"$tmp/type.conf"
row type "wrong type (\`polling_interval: soon\`)" -c "$tmp/type.conf" --once

base noserver | grep -v '^server_address' >"$tmp/noserver.conf"
row noserver "no \`server_address\`" -c "$tmp/noserver.conf" --once

base down | sed "s/^server_address: .*/server_address: 127.0.0.1:$closed/" >"$tmp/down.conf"
row down "unreachable server (\`--once\`)" -c "$tmp/down.conf" --once

base dir | sed 's|^execution_basedir: .*|execution_basedir: /proc/testflinger-run|' >"$tmp/dir.conf"
row dir "unwritable dir (\`execution_basedir: /proc/testflinger-run\`)" -c "$tmp/dir.conf" --once

base token >"$tmp/token.conf"
row token "missing token file (\`--token-file /nonexistent\`)" -c "$tmp/token.conf" --once --token-file /nonexistent

base metrics >"$tmp/metrics.conf"
row metrics "metrics port in use (\`-p\` the server's port)" -c "$tmp/metrics.conf" --once -p "$port"

base yaml >"$tmp/yaml.conf"
printf 'job_id: 00000000-0000-4000-8000-000000000002\ntest_data:\n  test_cmds: [echo hi\n' >"$tmp/bad.yaml"
row yaml "YAML error in a job file (\`--job\`)" -c "$tmp/yaml.conf" --job "$tmp/bad.yaml"

base phase >"$tmp/phase.conf"
printf 'job_id: 00000000-0000-4000-8000-000000000003\ntset_data:\n  test_cmds: echo hi\n' >"$tmp/typo.yaml"
row phase "typo'd phase key (\`tset_data:\` in a \`--job\` file)" -c "$tmp/phase.conf" --job "$tmp/typo.yaml"

base two >"$tmp/two.conf"
"$bin" -c "$tmp/two.conf" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -e "$tmp/two/logs/testflinger-agent.log" ] && break; sleep 0.05; done
sed -i 's/^agent_id: .*/agent_id: second-agent/' "$tmp/two.conf"
row two "two agents on one run dir" -c "$tmp/two.conf" --once
