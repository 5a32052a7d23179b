#!/usr/bin/env bash
# Connections and TLS handshakes one agent costs the server per minute, and
# the server's CPU per agent-minute: idle, during a quiet phase (`sleep`)
# and during a chatty phase (a line every 0.25 s), over http and https, for
# our agent binaries and/or the upstream agent, each against its own
# bench/fake_server.py (same config, same phases), all at the same time.
# The server keeps connections alive as long as the client does and logs
# each one it accepts (for https: full handshake or resumed) and its own
# CPU time as each request or connection comes in; a window's server CPU
# is the difference across it (the whole run's, from /proc, as a check).
#   bench/connections.sh [--agent ours|upstream|both] [SECONDS_PER_WINDOW] [BINARY...]
# e.g. bench/connections.sh --agent both 60
#      bench/connections.sh 60 /tmp/main-agent target/release/testflinger-agent
# BINARY is one of our builds or the word `upstream` (the upstream agent,
# from bench/upstream-agent.sh); ours defaults to target/release. MODES:
# "keep" (default), "close" (the server ends every connection after its
# answer, as upstream's gunicorn sync workers do) or "keep close" for both
# side by side; CLOSE=1 is MODES=close. SERVER=upstream: the real upstream
# server (bench/upstream_server.py: Flask on mongomock under werkzeug, as
# the conformance suite runs it) instead of the fake, the agents with a
# refresh token; werkzeug ends every connection after its answer, so the
# runs are all "close". Stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
which=
if [ "${1:-}" = --agent ]; then which=$2; shift 2; fi
secs=${1:-60}
shift || true
bins=("$@")
case "$which" in
  "") ;;
  ours) bins+=(target/release/testflinger-agent) ;;
  upstream) bins+=(upstream) ;;
  both) bins+=(target/release/testflinger-agent upstream) ;;
  *) echo "--agent: ours, upstream or both" >&2; exit 2 ;;
esac
[ ${#bins[@]} -eq 0 ] && bins=(target/release/testflinger-agent)
modes=${MODES:-keep}
server=${SERVER:-fake}
# werkzeug ends every connection itself.
[ "$server" = upstream ] && modes=close
[ -n "${CLOSE:-}" ] && modes=close
for b in "${bins[@]}"; do
  if [ "$b" = target/release/testflinger-agent ]; then cargo build --release -q; break; fi
done
tmp=$(mktemp -d)
pids=()
# The runs' agents and servers too (their pids in run*/pids), should the
# bench itself be stopped.
trap 'for p in "${pids[@]}" $(cat "$tmp"/run*/pids 2>/dev/null); do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT

# A throwaway CA and a certificate for localhost.
(
  cd "$tmp"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 1 \
    -subj "/CN=bench CA" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
  openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 1 -extfile ext.cnf 2>/dev/null
)

cpu() {  # utime + stime of a live process, in seconds
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}

run() {  # run BINARY SCHEME MODE DIR: one agent, one job; writes DIR/summary
  local bin=$1 scheme=$2 mode=$3 d=$4 tls=() srv agent argv label
  mkdir -p "$d"
  [ "$scheme" = https ] && tls=(--tls "$tmp/srv.pem" "$tmp/srv.key")
  [ "$mode" = close ] && tls+=(--close)
  if [ "$bin" = upstream ]; then
    argv=("$(bench/upstream-agent.sh)")
    label=upstream
  else
    argv=("$(realpath "$bin")")
    label=$bin
  fi
  local logs=(--port-file "$d/port" --request-log "$d/requests.txt" --conn-log "$d/conns.txt" --cpu-log "$d/srvcpu.txt"
    --lifetime $((secs * 4 + 120)))
  if [ "$server" = upstream ]; then
    "$(dirname "$(bench/upstream-agent.sh --server)")/python" bench/upstream_server.py "${logs[@]}" "${tls[@]}" \
      --token-file "$d/token.json" --job-after "$secs" > "$d/server.out" 2>&1 &
    argv+=(--token-file "$d/token.json")
  else
    python3 bench/fake_server.py "${logs[@]}" "${tls[@]}" &
  fi
  srv=$!
  echo $srv >> "$d/pids"
  for _ in $(seq 1200); do [ -s "$d/port" ] && break; sleep 0.05; done
  cat > "$d/agent.conf" <<CONF
agent_id: conn-agent
server_address: $scheme://localhost:$(cat "$d/port")
job_queues: [conn]
execution_basedir: $d/run
logging_basedir: $d/logs
results_basedir: $d/results
logging_quiet: true
setup_command: sleep $secs
test_command: "i=0; while [ \$i -lt $((secs * 4)) ]; do echo line \$i; i=\$((i+1)); sleep 0.25; done"
CONF
  # SSL_CERT_FILE for ours, REQUESTS_CA_BUNDLE for upstream's requests.
  (cd "$d" && SSL_CERT_FILE="$tmp/ca.pem" REQUESTS_CA_BUNDLE="$tmp/ca.pem" exec "${argv[@]}" -c "$d/agent.conf" \
    > "$d/agent.out" 2>&1) &
  agent=$!
  echo $agent >> "$d/pids"
  sleep "$secs"
  [ "$server" = upstream ] || python3 - "$(cat "$d/port")" "$scheme" "$tmp/ca.pem" <<'PY'
import json, ssl, sys, urllib.request
job = {"job_id": "00000000-0000-4000-8000-000000000001", "job_queue": "conn",
       "setup_data": {}, "test_data": {"test_cmds": "x"}}
ctx = ssl.create_default_context(cafile=sys.argv[3])
urllib.request.urlopen(urllib.request.Request(
    f"{sys.argv[2]}://localhost:{sys.argv[1]}/bench/job", data=json.dumps(job).encode(), method="POST"), context=ctx)
PY
  for _ in $(seq $(( (secs * 3 + 60) * 10 ))); do
    grep -q " complete$" "$d/requests.txt" 2>/dev/null && break
    sleep 0.1
  done
  echo "$(cpu $agent) $(cpu $srv)" > "$d/cpu"
  kill -TERM $agent; wait $agent || true
  kill $srv 2>/dev/null || true; wait $srv 2>/dev/null || true
  python3 - "$d" "$secs" "$label" "$scheme" "$mode" > "$d/summary" <<'PY'
import sys
d, secs, label, scheme, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
# The bench's own control requests (and the connection that carried the job) are not the agent's.
lines = [l.split() for l in open(f"{d}/requests.txt") if " /bench/" not in l]
conns = [l.split() for l in open(f"{d}/conns.txt")]
samples = [tuple(map(float, l.split())) for l in open(f"{d}/srvcpu.txt")]
def t(pred, after=-1.0):
    return next((float(l[0]) for l in lines if float(l[0]) > after and pred(l)), None)
def srv_cpu(at):
    # The server's CPU seconds just before the first request or connection
    # at or after `at` (sampled as each comes in, before it is handled).
    return next((c for s, c in samples if s >= at - 0.002), samples[-1][1] if samples else 0.0)
setup = t(lambda l: l[1] == "POST" and l[-1] == "setup")
test = t(lambda l: l[1] == "POST" and l[-1] == "test")
first_poll = t(lambda l: l[1] == "GET" and l[2].startswith("/v1/job"))
# A phase's window ends with its status post (a result post without a
# job_state: ours) or, when there is none before it, the next phase's state
# post (upstream posts none): the skipped phases between setup and test are
# not a phase's running cost.
status_post = lambda l: l[1] == "POST" and l[2].count("/") == 3 and len(l) == 3
state_post = lambda l: l[1] == "POST" and l[2].count("/") == 3 and len(l) == 4
def end(a):
    ends = [x for x in (t(status_post, a), t(state_post, a)) if x is not None]
    return min(ends) if ends else None
def cells(a, b):
    if a is None or b is None or b <= a:
        return ["-"] * 4
    per_min = 60 / (b - a)
    reqs = sum(1 for l in lines if a <= float(l[0]) < b)
    c = [x for x in conns if a <= float(x[0]) < b]
    full = sum(1 for x in c if x[-1] == "full")
    return [f"{reqs * per_min:.1f}", f"{len(c) * per_min:.1f}" + (f" ({full * per_min:.1f} full)" if full else ""),
            f"{(srv_cpu(b) - srv_cpu(a)) * per_min:.3f}", f"{b - a:.0f}"]
agent_cpu, whole_srv_cpu = open(f"{d}/cpu").read().split()
row = [label, scheme, mode]
for a, b in ((first_poll, secs), (setup, end(setup) if setup else None), (test, end(test) if test else None)):
    row += cells(a, b)
# Less the connection that posted the job (the bench's own).
row += [str(len(conns) - 1), str(len(lines)), agent_cpu, whole_srv_cpu]
print("\t".join(row))
PY
}

i=0
for bin in "${bins[@]}"; do
  for mode in $modes; do
    for scheme in http https; do
      run "$bin" "$scheme" "$mode" "$tmp/run$i" &
      pids+=($!)
      i=$((i + 1))
    done
  done
done
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
echo "server: $server; one agent per server, polling_interval 10 s, windows of ${secs} s: idle, quiet phase (sleep), chatty phase (a line every 0.25 s)"
echo "per agent-minute: requests, connections accepted (TLS full handshakes), server CPU s; then the window's length in s;"
echo "whole run: connections, requests, agent CPU s, server CPU s (keep: the server keeps connections; close: it ends each one)"
{
  printf 'agent\tscheme\tserver\tidle req\tidle conn\tidle srv CPU\ts\tquiet req\tquiet conn\tquiet srv CPU\ts\t'
  printf 'chatty req\tchatty conn\tchatty srv CPU\ts\tconns\treqs\tagent CPU\tsrv CPU\n'
  for j in $(seq 0 $((i - 1))); do cat "$tmp/run$j/summary" 2>/dev/null || echo "run $j: no summary"; done
} | column -t -s "$(printf '\t')"
