#!/usr/bin/env python3
"""A minimal Testflinger server for the benches (streaming, wakeups, idle,
budget).

Just enough of API v1 for one agent to take one job and run it. Log
fragments are kept raw with their arrival time and decoded only when the
bench asks (GET /bench/fragments/<job>), so that decoding 1 GiB of JSON does
not compete with the agent for the CPU during the measured run.

Control endpoints (not part of the Testflinger API):
  POST /bench/job        body: a job JSON, handed out by the next GET /v1/job
  POST /bench/cancel/<id> marks the job cancelled
  GET  /bench/fragments/<id>?phase=P  -> {"count", "bytes", "sha256",
                           "first_at", "last_at", "requests", "lines": [[at, line]...]}
        `lines` holds, for lines starting with "MARK ", the arrival time of
        the fragment that completed them (only with &marks=1).
  GET  /bench/cancel_seen/<id> -> {"at": time of the first GET /v1/result/<id>
                           answered "cancelled"}
Times are time.time() floats. The server exits after --lifetime seconds.
With --request-log FILE every request is also written there as it comes,
one line each: seconds since start, method, path, and for a job's result
post the job_state it carries (bench/budget.sh counts these).
With --conn-log FILE every accepted connection is written there: seconds
since start, "tcp" or "tls", and for TLS "full" or "resumed" (the
handshake). --tls CERT KEY serves https. Connections are kept alive as
long as the client keeps them, or, with --close, end after each answer
(`Connection: close`, as upstream's gunicorn sync workers do);
bench/connections.sh counts them. With --cpu-log FILE the server writes
its own CPU time (utime+stime, as time.process_time() reads it: /proc's
10 ms ticks are too coarse for an idle agent's few requests) as each
request and each connection comes in, before handling it: seconds since
start, CPU seconds. A window's CPU is the difference between two lines.
"""

import argparse
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

LOCK = threading.Lock()
JOBS = []
CANCELLED = set()
CANCEL_SEEN = {}
FRAGMENTS = {}  # job_id -> [(arrival, raw body)]
JOB_STATE = {}
REQUEST_LOG = None
CONN_LOG = None
CPU_LOG = None
TLS = None
CLOSE = False
START = time.time()


def record(method, path, body=b""):
    if REQUEST_LOG is None:
        return
    extra = ""
    parts = [p for p in urlparse(path).path.split("/") if p]
    if method == "POST" and parts[:2] == ["v1", "result"] and len(parts) == 3:
        try:
            extra = " " + (json.loads(body).get("job_state") or "")
        except ValueError:
            pass
    with LOCK:
        REQUEST_LOG.write(f"{time.time() - START:.3f} {method} {path}{extra}\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        log_cpu()
        kind = "tcp"
        if TLS is not None:
            self.request.do_handshake()
            kind = "tls " + ("resumed" if self.request.session_reused else "full")
        if CONN_LOG is not None:
            with LOCK:
                CONN_LOG.write(f"{time.time() - START:.3f} {kind}\n")
        super().setup()

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, status, obj=None, cookie=None):
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if cookie:
            self.send_header("Set-Cookie", "agent_name=" + cookie)
        if CLOSE:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        log_cpu()
        record("GET", self.path)
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts in (["v1"],):
            return self.reply(200, {})
        if parts[:3] == ["v1", "agents", "data"]:
            return self.reply(200, {"name": parts[3], "state": "waiting"})
        if parts == ["v1", "job"]:
            with LOCK:
                job = JOBS.pop(0) if JOBS else None
            return self.reply(200, job) if job else self.reply(204)
        if parts[:2] == ["v1", "result"] and len(parts) == 3:
            with LOCK:
                if parts[2] in CANCELLED:
                    CANCEL_SEEN.setdefault(parts[2], time.time())
                    return self.reply(200, {"job_state": "cancelled"})
                return self.reply(200, {"job_state": JOB_STATE.get(parts[2], "waiting")})
        if parts[:2] == ["bench", "fragments"]:
            q = parse_qs(url.query)
            return self.reply(200, summary(parts[2], q.get("phase", [None])[0], q.get("marks") == ["1"]))
        if parts[:2] == ["bench", "cancel_seen"]:
            with LOCK:
                return self.reply(200, {"at": CANCEL_SEEN.get(parts[2])})
        return self.reply(404, {"message": "not found"})

    def do_POST(self):
        log_cpu()
        body = self.body()
        now = time.time()
        record("POST", self.path, body)
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        if parts[:3] == ["v1", "agents", "data"]:
            return self.reply(200, {}, cookie=parts[3])
        if parts[:2] == ["v1", "result"] and len(parts) == 5 and parts[3] == "log":
            if parts[4] == "output":
                with LOCK:
                    FRAGMENTS.setdefault(parts[2], []).append((now, body))
            return self.reply(200, {})
        if parts[:2] == ["v1", "result"] and len(parts) == 3:
            try:
                state = json.loads(body).get("job_state")
            except ValueError:
                return self.reply(400, {"message": "bad JSON"})
            if state and parts[2] not in CANCELLED:
                with LOCK:
                    JOB_STATE[parts[2]] = state
            return self.reply(200, {})
        if parts == ["bench", "job"]:
            with LOCK:
                JOBS.append(json.loads(body))
            return self.reply(200, {})
        if parts[:2] == ["bench", "cancel"]:
            with LOCK:
                CANCELLED.add(parts[2])
            return self.reply(200, {})
        # queues, images, events, provision logs, artifacts: accepted.
        return self.reply(200, {})


class Server(ThreadingHTTPServer):
    def get_request(self):
        sock, addr = super().get_request()
        if TLS is not None:
            # The handshake happens in the connection's thread (setup).
            sock = TLS.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


def summary(job_id, phase, marks):
    with LOCK:
        frags = list(FRAGMENTS.get(job_id, []))
    decoded = []
    for at, raw in frags:
        f = json.loads(raw)
        if phase is None or f["phase"] == phase:
            decoded.append((f["fragment_number"], at, f["log_data"]))
    decoded.sort()
    h = hashlib.sha256()
    total = 0
    lines = []
    pending = ""
    for _, at, data in decoded:
        b = data.encode()
        h.update(b)
        total += len(b)
        if marks:
            text = pending + data
            *complete, pending = text.split("\n")
            lines.extend([at, line] for line in complete if line.startswith("MARK "))
    numbers = [n for n, _, _ in decoded]
    return {
        "count": len(decoded),
        "numbers_ok": numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True,
        "bytes": total,
        "sha256": h.hexdigest(),
        "first_at": decoded[0][1] if decoded else None,
        "last_at": max((at for _, at, _ in decoded), default=None),
        "lines": lines,
        "times": sorted(at for _, at, _ in decoded),
    }


def log_cpu():
    if CPU_LOG is not None:
        with LOCK:
            CPU_LOG.write(f"{time.time() - START:.3f} {time.process_time():.6f}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--lifetime", type=float, default=900)
    ap.add_argument("--request-log")
    ap.add_argument("--conn-log")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--close", action="store_true")
    ap.add_argument("--cpu-log")
    args = ap.parse_args()
    global REQUEST_LOG, CONN_LOG, CPU_LOG, TLS, CLOSE
    CLOSE = args.close
    if args.request_log:
        REQUEST_LOG = open(args.request_log, "w", buffering=1)
    if args.conn_log:
        CONN_LOG = open(args.conn_log, "w", buffering=1)
    if args.cpu_log:
        CPU_LOG = open(args.cpu_log, "w", buffering=1)
    if args.tls:
        import ssl
        TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        TLS.load_cert_chain(*args.tls)
    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(args.port_file, "w") as f:
        f.write(str(server.server_address[1]))
    # Never outlive the bench, even if the script is killed.
    threading.Timer(args.lifetime, server.shutdown).start()
    # A long poll: the server's own wake-ups are not an agent's cost.
    server.serve_forever(poll_interval=5)
    sys.exit(0)


if __name__ == "__main__":
    main()
