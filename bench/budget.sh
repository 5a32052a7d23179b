#!/usr/bin/env bash
# Request budget: what one agent costs the server per minute while idle,
# during a quiet phase and during a chatty phase (a line every 0.25 s).
# One agent (default polling_interval 10 s) against a small local server
# that records every request; the job is offered after the idle window.
#   bench/budget.sh [SECONDS_PER_WINDOW] [extra config lines...]
# e.g. bench/budget.sh 20 "output_interval: 0.25"   (the old 250 ms rule)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
bin=${TF_AGENT_BIN:-target/debug/testflinger-agent}
[ -x "$bin" ] || cargo build -q
tmp=$(mktemp -d)
trap 'kill $srv 2>/dev/null || true; rm -rf "$tmp"' EXIT
python3 - "$tmp" "$secs" <<'PY' &
import http.server, json, sys, threading, time
tmp, secs = sys.argv[1], float(sys.argv[2])
start = time.time()
log = open(tmp + "/requests.txt", "w", buffering=1)
job = {"job_id": "00000000-0000-4000-8000-000000000001", "job_queue": "budget",
       "setup_data": {}, "test_data": {"test_cmds": "x"}}
state = {"given": False}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/json")
        if self.path.startswith("/v1/agents/data"):
            self.send_header("Set-Cookie", "agent_name=budget-agent")
        self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        log.write(f"{time.time() - start:.3f} GET {self.path}\n")
        if self.path.startswith("/v1/job"):
            if not state["given"] and time.time() - start >= secs:
                state["given"] = True
                return self._send(200, json.dumps(job).encode())
            return self._send(204)
        if self.path.startswith("/v1/agents/data"):
            return self._send(200, b'{"state":"waiting","restricted_to":{}}')
        if self.path.startswith("/v1/result/"):
            return self._send(200, b'{"job_state":"test"}')
        self._send(200, b'{}')
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0)); body = self.rfile.read(n)
        extra = ""
        if self.path.startswith("/v1/result/") and self.path.count("/") == 3:
            try: extra = " " + json.loads(body).get("job_state", "")
            except Exception: pass
        log.write(f"{time.time() - start:.3f} POST {self.path}{extra}\n")
        self._send(200, b"OK")
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
open(tmp + "/port", "w").write(str(s.server_address[1]))
s.serve_forever()
PY
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
for _ in $(seq $(( (secs * 3 + 60) * 10 ))); do
  grep -q " complete$" "$tmp/requests.txt" 2>/dev/null && break
  sleep 0.1
done
kill -TERM $agent; wait $agent || true
python3 - "$tmp/requests.txt" "$secs" "$*" <<'PY'
import sys
lines = [l.split() for l in open(sys.argv[1])]
secs = float(sys.argv[2])
t = lambda pred: next(float(l[0]) for l in lines if pred(l))
setup = t(lambda l: l[1] == "POST" and l[-1] == "setup")
test = t(lambda l: l[1] == "POST" and l[-1] == "test")
end = t(lambda l: l[1] == "POST" and l[-1] == "complete")
def rate(a, b):
    n = sum(1 for l in lines if a <= float(l[0]) < b)
    return n, n / (b - a) * 60
# Idle from the first job poll on (start-up requests are not idle cost).
first_poll = t(lambda l: l[1] == "GET" and l[2].startswith("/v1/job"))
idle_n, idle = rate(first_poll, secs)
quiet_n, quiet = rate(setup, test)
chatty_n, chatty = rate(test, end)
frags = sum(1 for l in lines if test <= float(l[0]) < end and l[2].endswith("/log/output"))
print(f"config extra: {sys.argv[3] or '(defaults)'}")
print(f"requests per agent-minute: idle {idle:.1f} ({idle_n} in {secs - first_poll:.1f} s), "
      f"quiet phase {quiet:.1f} ({quiet_n} in {test - setup:.1f} s), "
      f"chatty phase {chatty:.1f} ({chatty_n} in {end - test:.1f} s; {frags} output fragments)")
PY
