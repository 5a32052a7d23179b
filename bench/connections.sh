#!/usr/bin/env bash
# Connections and TLS handshakes one agent costs the server per minute:
# idle, during a quiet phase (`sleep`) and during a chatty phase (a line
# every 0.25 s), over http and https, for one or two agent binaries (e.g.
# main's build against this one). One agent (default polling_interval 10 s)
# against bench/fake_server.py, which keeps connections alive as long as
# the client does and logs each one it accepts (for https: full handshake
# or resumed). Also the agent's and the server's CPU for the whole run.
#   bench/connections.sh [SECONDS_PER_WINDOW] [BINARY...]
# e.g. bench/connections.sh 60 /tmp/main-agent target/release/testflinger-agent
# Binaries default to target/release/testflinger-agent. The runs go in
# parallel (one agent each: light). CLOSE=1: the server ends every
# connection after its answer (upstream's gunicorn). Stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  cargo build --release -q
  bins=(target/release/testflinger-agent)
fi
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT

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

run() {  # run BINARY SCHEME DIR: one agent, one job; writes DIR/summary
  local bin=$1 scheme=$2 d=$3 tls=() srv agent
  mkdir -p "$d"
  [ "$scheme" = https ] && tls=(--tls "$tmp/srv.pem" "$tmp/srv.key")
  [ -n "${CLOSE:-}" ] && tls+=(--close)
  python3 bench/fake_server.py --port-file "$d/port" --request-log "$d/requests.txt" --conn-log "$d/conns.txt" \
    --lifetime $((secs * 4 + 120)) "${tls[@]}" &
  srv=$!
  for _ in $(seq 100); do [ -s "$d/port" ] && break; sleep 0.05; done
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
  SSL_CERT_FILE="$tmp/ca.pem" "$bin" -c "$d/agent.conf" &
  agent=$!
  sleep "$secs"
  python3 - "$(cat "$d/port")" "$scheme" "$tmp/ca.pem" <<'PY'
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
  python3 - "$d" "$secs" "$bin" "$scheme" > "$d/summary" <<'PY'
import sys
d, secs, binary, scheme = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
# The bench's own control requests (and the connection that carried the job) are not the agent's.
lines = [l.split() for l in open(f"{d}/requests.txt") if " /bench/" not in l]
conns = [l.split() for l in open(f"{d}/conns.txt")]
t = lambda pred, after=-1.0: next(float(l[0]) for l in lines if float(l[0]) > after and pred(l))
setup = t(lambda l: l[1] == "POST" and l[-1] == "setup")
test = t(lambda l: l[1] == "POST" and l[-1] == "test")
status_post = lambda l: l[1] == "POST" and l[2].count("/") == 3 and len(l) == 3
setup_end = t(status_post, setup)
test_end = t(status_post, test)
first_poll = t(lambda l: l[1] == "GET" and l[2].startswith("/v1/job"))
def rate(a, b):
    reqs = sum(1 for l in lines if a <= float(l[0]) < b)
    c = [x for x in conns if a <= float(x[0]) < b]
    full = sum(1 for x in c if x[-1] == "full")
    return f"{len(c) / (b - a) * 60:5.1f} conn/min ({len(c)} for {reqs} requests in {b - a:.0f} s" + \
        (f"; {full} full handshakes" if scheme == "https" else "") + ")"
agent_cpu, srv_cpu = open(f"{d}/cpu").read().split()
print(f"{binary} over {scheme}:")
print(f"  idle:   {rate(first_poll, secs)}")
print(f"  quiet:  {rate(setup, setup_end)}")
print(f"  chatty: {rate(test, test_end)}")
# Less the one that posted the job (the bench's own).
full = sum(1 for x in conns if x[-1] == "full") - (scheme == "https")
print(f"  whole run ({lines and float(lines[-1][0]):.0f} s): {len(conns) - 1} connections" +
      (f" ({full} full handshakes)" if scheme == "https" else "") + f" for {len(lines)} requests; "
      f"CPU agent {agent_cpu} s, server {srv_cpu} s")
PY
}

i=0
for bin in "${bins[@]}"; do
  for scheme in http https; do
    run "$bin" "$scheme" "$tmp/run$i" &
    pids+=($!)
    i=$((i + 1))
  done
done
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
echo "one agent, polling_interval 10 s, windows of ${secs} s (idle, quiet phase, chatty phase: a line every 0.25 s)${CLOSE:+, the server closing every connection}"
for j in $(seq 0 $((i - 1))); do cat "$tmp/run$j/summary" 2>/dev/null || echo "run $j: no summary"; done
