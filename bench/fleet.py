#!/usr/bin/env python3
"""Fleet simulation: N agents (own dirs and agent_id each) against one fake
server that counts requests per second. Timeline: idle, then one job per
agent (a quiet setup phase, a chatty test phase printing a line every
0.25 s), and the server goes down for DOWN seconds while the jobs run.
With --jobs K each agent takes K such jobs, one at each poll after the
last one ended: a lab whose queues keep its devices busy.

The server is --workers processes sharing one port (SO_REUSEPORT), so that
it is not what limits a large fleet: one Python process answers about
130 requests/s. They share their state through files in a scratch dir.

Prints requests per agent-minute (idle, jobs running), the run's mean
requests per second and its peak second anywhere after the server returned
(with what that second held), a per-second table (5 s a row), the agents'
total CPU and RSS, jobs completed, outcomes and output lines lost. With
--down 0 there is no outage: the control run, the same work's own peak
and mean to hold a run with an outage against. With
--keep, the server's logs (server/log-*: time, kind, fragment, agent per
request) stay for a look at who made a peak.
"""
import argparse, json, os, signal, socket, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--agents", type=int, default=200)
ap.add_argument("--bin", default="target/debug/testflinger-agent")
ap.add_argument("--idle", type=float, default=30)
ap.add_argument("--phase", type=int, default=15, help="seconds of each phase")
ap.add_argument("--down-after", type=float, default=8, help="seconds into the jobs")
ap.add_argument("--down", type=float, default=30,
                help="seconds the server is down; 0: no outage, the control run to compare a peak with")
ap.add_argument("--polling", type=float, default=10)
ap.add_argument("--limit", type=float, default=400, help="give up after this many seconds")
ap.add_argument("--jobs", type=int, default=1,
                help="jobs per agent, each taken at the poll after the last one ended: a lab whose "
                     "queues keep its devices busy (the default, 1, is one job each)")
ap.add_argument("--workers", type=int, default=2, help="server processes")
ap.add_argument("--extra", action="append", default=[], help="extra config line")
ap.add_argument("--keep", action="store_true", help="keep the agents' dirs and logs (printed)")
a = ap.parse_args()

T0 = time.time()
LINES = a.phase * 4
tmp = tempfile.mkdtemp(prefix="tf-fleet-")
S = os.path.join(tmp, "server")  # the workers' shared state
for d in ("given", "complete"):
    os.makedirs(os.path.join(S, d))
JOBS_OPEN = os.path.join(S, "jobs-open")
DOWN = os.path.join(S, "down")


def job_id(i, k):
    """Agent i's job k (from 0)."""
    return f"00000000-0000-4000-{0x8000 + k:04x}-{i:012d}"


def job_for(agent, k):
    i = int(agent.rsplit("-", 1)[1])
    return {"job_id": job_id(i, k), "job_queue": "fleet",
            "setup_data": {}, "test_data": {"test_cmds": "x"}}


def kind(method, path):
    p = path.split("?")[0].split("/")
    if path.startswith("/v1/result/"):
        if len(p) > 4:
            return "fragment"
        return "cancel check" if method == "GET" else "result post"
    if path.startswith("/v1/agents/data"):
        return "agent " + method
    if path.startswith("/v1/job") and method == "GET":
        return "job poll"
    return "other"


def worker(sock):
    lock = threading.Lock()
    log = open(os.path.join(S, f"log-{os.getpid()}"), "w", buffering=1 << 16)

    def flush_and_exit(*_):
        with lock:
            log.flush()
        os._exit(0)
    signal.signal(signal.SIGTERM, flush_and_exit)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *x): pass
        def _count(self, method, extra=""):
            with lock:
                agent = (self.headers.get("Cookie") or "").partition("agent_name=")[2].split(";")[0]
                log.write(f"{time.time() - T0:.3f}\t{kind(method, self.path)}\t{extra}\t{agent}\n")
        def _send(self, code, body=b""):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/json")
            if self.path.startswith("/v1/agents/data/"):
                self.send_header("Set-Cookie", "agent_name=" + self.path.rsplit("/", 1)[1])
            self.end_headers(); self.wfile.write(body)
        def _down(self):
            if os.path.exists(DOWN):
                self.close_connection = True
                return True
            return False
        def do_GET(self):
            if self._down(): return
            self._count("GET")
            if self.path.startswith("/v1/job"):
                agent = (self.headers.get("Cookie") or "").partition("agent_name=")[2].split(";")[0]
                if agent.startswith("fleet-") and os.path.exists(JOBS_OPEN):
                    # The next job once the last one given is complete.
                    for k in range(a.jobs):
                        if k > 0 and not os.path.exists(os.path.join(S, "complete", job_id(int(agent[6:]), k - 1))):
                            break
                        try:
                            os.close(os.open(os.path.join(S, "given", f"{agent}-{k}"),
                                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                            return self._send(200, json.dumps(job_for(agent, k)).encode())
                        except FileExistsError:
                            pass
                return self._send(204)
            if self.path.startswith("/v1/agents/data"):
                return self._send(200, b'{"state":"waiting","restricted_to":{}}')
            if self.path.startswith("/v1/result/"):
                return self._send(200, b'{"job_state":"test"}')
            self._send(200, b"{}")
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            if self._down(): return
            parts = self.path.split("/")
            extra = ""
            if self.path.startswith("/v1/result/") and len(parts) == 4:
                try:
                    if json.loads(body).get("job_state") == "complete":
                        os.close(os.open(os.path.join(S, "complete", parts[3]), os.O_CREAT | os.O_WRONLY))
                except Exception: pass
            elif self.path.endswith("/log/output"):
                f = json.loads(body)
                extra = json.dumps([parts[3], f["fragment_number"], f["log_data"]])
            self._count("POST", extra)
            self._send(200, b"OK")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        def handle_error(self, request, client_address):
            # A client that gave up (timeout, reset): counted, not printed.
            with lock:
                log.write(f"{time.time() - T0:.3f}\terror\t\n")

    srv = Server(sock.getsockname(), H, bind_and_activate=False)
    srv.socket.close()
    srv.socket = sock
    srv.serve_forever()


# One listening socket, inherited by every worker: the kernel hands each
# connection to whichever worker accepts first.
lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("127.0.0.1", 0))
lsock.listen(1024)
port = lsock.getsockname()[1]
workers = []
for _ in range(a.workers):
    pid = os.fork()
    if pid == 0:
        worker(lsock)
        os._exit(0)
    workers.append(pid)

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

time.sleep(a.idle)
jobs_at = time.time() - T0
open(JOBS_OPEN, "w").close()
time.sleep(a.down_after)
down_at = time.time() - T0
if a.down > 0:
    open(DOWN, "w").close()
    time.sleep(a.down)
    os.remove(DOWN)
up_at = time.time() - T0
while time.time() - T0 < a.limit:
    if len(os.listdir(os.path.join(S, "complete"))) == a.agents * a.jobs: break
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
for pid in workers:
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)

PER_SECOND = {}   # second -> requests
KINDS = {}        # second -> {kind: requests}
FRAGS = {}        # job_id -> {number: text}
errors = 0
for name in os.listdir(S):
    if not name.startswith("log-"): continue
    for line in open(os.path.join(S, name)):
        t, k, extra = line.rstrip("\n").split("\t")[:3]
        if k == "error":
            errors += 1
            continue
        s = int(float(t))
        if s >= end: continue
        PER_SECOND[s] = PER_SECOND.get(s, 0) + 1
        KINDS.setdefault(s, {})[k] = KINDS.get(s, {}).get(k, 0) + 1
        if extra:
            job, n, data = json.loads(extra)
            FRAGS.setdefault(job, {})[n] = data
complete = len(os.listdir(os.path.join(S, "complete")))


def rate(t1, t2):
    n = sum(v for s, v in PER_SECOND.items() if t1 <= s < t2)
    return n / (t2 - t1) / a.agents * 60


lost_lines = 0
for i in range(a.agents):
    for k in range(a.jobs):
        text = "".join(v for _, v in sorted(FRAGS.get(job_id(i, k), {}).items()))
        lost_lines += sum(1 for n in range(LINES) if f"line {n}\n" not in text)
total = sum(PER_SECOND.values())
mean = total / end
after = [(PER_SECOND.get(s, 0), s) for s in range(int(up_at), int(end))]
peak, peak_at = max(after) if after else (0, 0)
what = ", ".join(f"{k} {v}" for k, v in sorted(KINDS.get(peak_at, {}).items(), key=lambda kv: -kv[1]))
print(f"agents {a.agents} (polling {a.polling:g} s, {a.jobs} job{'s' if a.jobs > 1 else ''} each"
      f"{', ' + ', '.join(a.extra) if a.extra else ''}), "
      f"server {a.workers} processes, run {end:.0f} s, jobs from {jobs_at:.0f} s, "
      + (f"server down {down_at:.0f}-{up_at:.0f} s" if a.down > 0 else
         f"no outage (--down 0: the control run; \"after the return\" is from {up_at:.0f} s)"))
print(f"requests per agent-minute: idle {rate(a.idle / 3, a.idle):.1f}, jobs running before the outage {rate(jobs_at + 2, down_at):.1f}")
print(f"requests/s: mean {mean:.1f}; peak second after the server returned {peak} at {peak_at} s "
      f"({peak_at - up_at:+.0f} s), {peak / mean:.1f}x the mean: {what}")


def step(count, s):
    """Second s against the mean of the 10 s around it (5 each side)."""
    around = [count(x) for x in range(s - 5, s + 6) if x != s]
    return count(s) / max(1.0, sum(around) / len(around))


# Requests in step show as one second far above its neighbours (issue 26:
# 105-138 cancel checks in one second every 3 s, 2-8 between); agents busy
# at the same time, not in step, make a plateau instead.
for label, count in (("all requests", lambda x: PER_SECOND.get(x, 0)),
                     ("cancel checks", lambda x: KINDS.get(x, {}).get("cancel check", 0))):
    f, at = max(((step(count, s), s) for s in range(int(up_at) + 5, int(end) - 5)), default=(0, 0))
    if count(at) == 0:
        print(f"in step? {label}: none from 5 s after the return")
        continue
    print(f"in step? {label}: busiest second after the return against the 10 s around it {f:.1f}x "
          f"({count(at)} at {at} s)")
print("requests per second (row: 5 s from its start; * server down):")
for row in range(0, int(end), 5):
    cells = " ".join(f"{PER_SECOND.get(s, 0):5d}" for s in range(row, min(row + 5, int(end))))
    mark = "*" if row < up_at and row + 5 > down_at else " "
    print(f"  {row:4d} s{mark}{cells}")
print(f"jobs completed {complete}/{a.agents * a.jobs}, outcomes lost {a.agents * a.jobs - complete}, "
      f"output lines lost {lost_lines}")
print(f"requests the server could not answer (client gone: timeout or reset) {errors}")
print(f"agents' CPU {cpu:.1f} s total, RSS now {rss/1024:.1f} MB total, largest peak RSS {hwm/1024:.1f} MB")
if a.keep:
    print(f"kept: {tmp}")
else:
    subprocess.run(["rm", "-rf", tmp])
