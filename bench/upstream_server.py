#!/usr/bin/env python3
"""The real upstream server for bench/connections.sh (SERVER=upstream): the
Flask app on mongomock under werkzeug, as tests/upstream/infra.py serves it
for the conformance suite, with the bench's logs in fake_server.py's
formats (--request-log, --conn-log, --cpu-log: CPU time sampled as each
request is handed to the app and before each accept), an agent client whose
refresh token goes to --token-file, and the job submitted in-process after
--job-after seconds (so the bench's own request is not in the logs).
Runs in a venv holding the upstream server (bench/upstream-agent.sh
--server). werkzeug ends every connection after its answer (as upstream's
gunicorn sync workers do), so --close changes nothing; --tls CERT KEY
serves https. Times in the logs count from when the port file is written
(the app's imports take seconds). Exits after --lifetime seconds from then.
"""

import argparse
import base64
import ssl
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "upstream"))
import infra  # noqa: E402
import werkzeug.serving  # noqa: E402

START = time.time()
LOCK = threading.Lock()


def log_cpu(out):
    with LOCK:
        out.write(f"{time.time() - START:.3f} {time.process_time():.6f}\n")


def main():
    global START
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--lifetime", type=float, default=900)
    ap.add_argument("--job-after", type=float, required=True)
    ap.add_argument("--queue", default="conn")
    ap.add_argument("--request-log", required=True)
    ap.add_argument("--conn-log", required=True)
    ap.add_argument("--cpu-log", required=True)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--close", action="store_true")
    args = ap.parse_args()
    # A long poll, as in fake_server.py: the server's own wake-ups are not an agent's cost.
    poll = werkzeug.serving.BaseWSGIServer.serve_forever
    werkzeug.serving.BaseWSGIServer.serve_forever = lambda self, poll_interval=5: poll(self, poll_interval)
    if args.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*args.tls)
        plain = infra.make_server
        infra.make_server = lambda *a, **k: plain(*a, ssl_context=ctx, **k)
    server = infra.Server("http://127.0.0.1:9/")  # no job here has a webhook
    requests_out = open(args.request_log, "w", buffering=1)
    conns_out = open(args.conn_log, "w", buffering=1)
    cpu_out = open(args.cpu_log, "w", buffering=1)
    app = server.httpd.app

    def sampled(environ, start_response):
        log_cpu(cpu_out)
        return app(environ, start_response)

    server.httpd.app = sampled

    add = server.recorder.add

    def record(method, path, body, status):
        add(method, path, body, status)
        extra = ""
        if method == "POST" and path.startswith("/v1/result/") and path.count("/") == 3 and isinstance(body, dict):
            extra = " " + str(body.get("job_state") or "")
        with LOCK:
            requests_out.write(f"{time.time() - START:.3f} {method} {path}{extra}\n".replace(" \n", "\n"))

    server.recorder.add = record
    accept = server.httpd.get_request

    def get_request():
        log_cpu(cpu_out)  # also before a TLS handshake: accept() does it
        sock, addr = accept()  # for https, werkzeug's socket has done the handshake
        kind = "tcp"
        if args.tls:
            kind = "tls " + ("resumed" if sock.session_reused else "full")
        with LOCK:
            conns_out.write(f"{time.time() - START:.3f} {kind}\n")
        return sock, addr

    server.httpd.get_request = get_request
    server.add_client("bench-agent", "agent-key", "agent")
    client = server.app.test_client()
    basic = base64.b64encode(b"bench-agent:agent-key").decode()
    with server.lock:
        token = client.post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"})
    if token.status_code != 200:
        sys.exit(f"no agent token: {token.status_code} {token.get_data(as_text=True)}")
    Path(args.token_file).write_text(token.get_data(as_text=True))
    START = time.time()
    Path(args.port_file).write_text(str(server.port))

    time.sleep(max(0.0, START + args.job_after - time.time()))
    with server.lock:
        job = client.post("/v1/job", json={"job_queue": args.queue, "test_data": {"test_cmds": "x"}})
    print(f"job {job.status_code}: {job.get_data(as_text=True).strip()}", flush=True)
    time.sleep(max(0.0, START + args.lifetime - time.time()))


if __name__ == "__main__":
    main()
