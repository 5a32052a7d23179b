#!/usr/bin/env python3
"""Fleet simulation: N agents (own dirs and agent_id each) against one fake
server that counts requests per second. Timeline: idle, then one job per
agent (a quiet setup phase, a chatty test phase printing a line every
0.25 s), and the server goes down for DOWN seconds while the jobs run.

Prints requests per agent-minute (idle, jobs running), the peak requests per
second in the 10 s after the server returns vs the run's mean, the agents'
total CPU and RSS, jobs completed, outcomes and output lines lost.
"""
import argparse, json, os, signal, socket, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--agents", type=int, default=200)
ap.add_argument("--bin", default="target/debug/testflinger-agent")
ap.add_argument("--idle", type=float, default=30)
ap.add_argument("--phase", type=int, default=15, help="seconds of each phase")
ap.add_argument("--down-after", type=float, default=8, help="seconds into the jobs")
ap.add_argument("--down", type=float, default=30)
ap.add_argument("--polling", type=float, default=10)
ap.add_argument("--limit", type=float, default=400, help="give up after this many seconds")
ap.add_argument("--extra", action="append", default=[], help="extra config line")
a = ap.parse_args()

LOCK = threading.Lock()
T0 = time.time()
PER_SECOND = {}          # int(second) -> requests
JOBS = []                # queue of job dicts
COMPLETE = set()
FRAGS = {}               # job_id -> {number: text}
DOWN = threading.Event()
LINES = a.phase * 4

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *x): pass
    def _count(self):
        with LOCK:
            s = int(time.time() - T0)
            PER_SECOND[s] = PER_SECOND.get(s, 0) + 1
    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/json")
        if self.path.startswith("/v1/agents/data/"):
            self.send_header("Set-Cookie", "agent_name=" + self.path.rsplit("/", 1)[1])
        self.end_headers(); self.wfile.write(body)
    def _down(self):
        if DOWN.is_set():
            self.close_connection = True
            return True
        return False
    def do_GET(self):
        if self._down(): return
        self._count()
        if self.path.startswith("/v1/job"):
            with LOCK:
                job = JOBS.pop() if JOBS else None
            return self._send(200, json.dumps(job).encode()) if job else self._send(204)
        if self.path.startswith("/v1/agents/data"):
            return self._send(200, b'{"state":"waiting","restricted_to":{}}')
        if self.path.startswith("/v1/result/"):
            return self._send(200, b'{"job_state":"test"}')
        self._send(200, b"{}")
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        if self._down(): return
        self._count()
        parts = self.path.split("/")
        if self.path.startswith("/v1/result/") and len(parts) == 4:
            try:
                if json.loads(body).get("job_state") == "complete":
                    with LOCK: COMPLETE.add(parts[3])
            except Exception: pass
        elif self.path.endswith("/log/output"):
            f = json.loads(body)
            with LOCK: FRAGS.setdefault(parts[3], {})[f["fragment_number"]] = f["log_data"]
        self._send(200, b"OK")

ERRORS = [0]

class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that gave up (timeout, reset): counted, not printed.
        with LOCK: ERRORS[0] += 1

srv = Server(("127.0.0.1", 0), H)
srv.daemon_threads = True
port = srv.server_address[1]
threading.Thread(target=srv.serve_forever, daemon=True).start()

tmp = tempfile.mkdtemp(prefix="tf-fleet-")
procs = []
for i in range(a.agents):
    d = os.path.join(tmp, f"a{i}")
    os.makedirs(d)
    conf = os.path.join(d, "agent.conf")
    with open(conf, "w") as c:
        c.write(f"agent_id: fleet-{i}\nserver_address: 127.0.0.1:{port}\njob_queues: [fleet]\n"
                f"polling_interval: {a.polling}\nexecution_basedir: {d}/run\nlogging_basedir: {d}/logs\n"
                f"results_basedir: {d}/results\nlogging_quiet: true\n"
                f"setup_command: sleep {a.phase}\n"
                f"test_command: \"i=0; while [ $i -lt {LINES} ]; do echo line $i; i=$((i+1)); sleep 0.25; done\"\n")
        for e in a.extra: c.write(e + "\n")
    procs.append(subprocess.Popen([a.bin, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

def rate(t1, t2):
    with LOCK: n = sum(v for s, v in PER_SECOND.items() if t1 <= s < t2)
    return n / (t2 - t1) / a.agents * 60

time.sleep(a.idle)
idle = rate(a.idle / 3, a.idle)
jobs_at = time.time() - T0
with LOCK:
    for i in range(a.agents):
        JOBS.append({"job_id": f"00000000-0000-4000-8000-{i:012d}", "job_queue": "fleet",
                     "setup_data": {}, "test_data": {"test_cmds": "x"}})
time.sleep(a.down_after)
down_at = time.time() - T0
DOWN.set()
time.sleep(a.down)
DOWN.clear()
up_at = time.time() - T0
while time.time() - T0 < a.limit:
    with LOCK:
        if len(COMPLETE) == a.agents: break
    time.sleep(0.5)
end = time.time() - T0
cpu = rss = hwm = 0
tick = os.sysconf("SC_CLK_TCK")
for p in procs:
    try:
        f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
        cpu += (int(f[11]) + int(f[12])) / tick
        for l in open(f"/proc/{p.pid}/status"):
            if l.startswith("VmRSS:"): rss += int(l.split()[1])
            if l.startswith("VmHWM:"): hwm = max(hwm, int(l.split()[1]))
    except OSError: pass
for p in procs: p.send_signal(signal.SIGTERM)
for p in procs:
    try: p.wait(timeout=30)
    except subprocess.TimeoutExpired: p.kill()
lost_lines = 0
for i in range(a.agents):
    text = "".join(v for _, v in sorted(FRAGS.get(f"00000000-0000-4000-8000-{i:012d}", {}).items()))
    lost_lines += sum(1 for k in range(LINES) if f"line {k}\n" not in text)
with LOCK:
    after = [PER_SECOND.get(s, 0) for s in range(int(up_at), int(up_at) + 10)]
    total = sum(PER_SECOND.values())
mean = total / end
print(f"agents {a.agents} (polling {a.polling:g} s{', ' + ', '.join(a.extra) if a.extra else ''}), run {end:.0f} s, server down {down_at:.0f}-{up_at:.0f} s")
print(f"requests per agent-minute: idle {idle:.1f}, jobs running before the outage {rate(jobs_at + 2, down_at):.1f}")
print(f"requests/s: mean {mean:.1f}, peak in the 10 s after the server returned {max(after)} ({after})")
print(f"jobs completed {len(COMPLETE)}/{a.agents}, outcomes lost {a.agents - len(COMPLETE)}, output lines lost {lost_lines}")
print(f"requests the server could not answer (client gone: timeout or reset) {ERRORS[0]}")
print(f"agents' CPU {cpu:.1f} s total, RSS now {rss/1024:.1f} MB total, largest peak RSS {hwm/1024:.1f} MB")
subprocess.run(["rm", "-rf", tmp])
