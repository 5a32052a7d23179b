"""The real upstream server, a recorder of what it receives, a webhook
receiver, per-agent TCP proxies (to take "the server" away from one agent)
and process-group bookkeeping.

Runs inside the venv that holds the upstream server (imports `testflinger`).
"""

import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import bcrypt
import mongomock
from mongomock.gridfs import enable_gridfs_integration
from werkzeug.serving import make_server

# ---------------------------------------------------------------- processes

_GROUPS = []  # process groups we started, killed at exit whatever happens
_GROUPS_LOCK = threading.Lock()
PGID_FILE = None  # also listed here, for the CI script's trap if we die hard


def spawn(argv, log_path, env=None, cwd=None):
    """Start a process in its own session (so its whole tree can be killed),
    with /dev/null on an extra descriptor, 9, as a service manager or a
    shell may leave one: it is not for the phase commands to see."""
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        ["/bin/sh", "-c", 'exec "$@" 9</dev/null', "sh", *map(str, argv)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, cwd=cwd, start_new_session=True,
    )
    log.close()
    with _GROUPS_LOCK:
        _GROUPS.append(proc)
        if PGID_FILE:
            with open(PGID_FILE, "a") as f:
                f.write(f"{proc.pid}\n")
    return proc


def stop(proc, grace=5.0):
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # the leader may be gone while children of its group live on
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        pass


def stop_all():
    with _GROUPS_LOCK:
        procs = list(_GROUPS)
    for proc in procs:
        stop(proc, grace=1.0)


# ------------------------------------------------------------------ server


class DictSecretsStore:
    """In-memory secrets store, the shape of the server's SecretsStore."""

    def __init__(self):
        self.data = {}

    def read(self, namespace, key):
        from testflinger.secrets.exceptions import AccessError

        try:
            return self.data[(namespace, key)]
        except KeyError as error:
            raise AccessError(f"no secret {key}") from error

    def write(self, namespace, key, value, expire_at=None, **_):
        self.data[(namespace, key)] = value
        return expire_at

    def delete(self, namespace, key):
        self.data.pop((namespace, key), None)

    def exists(self, namespace, key):
        return (namespace, key) in self.data


class Recorder:
    """Every request the server answered: (time, method, path, json body,
    status code)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []

    def add(self, method, path, body, status):
        with self.lock:
            self.requests.append((time.time(), method, path, body, status))

    def select(self, method=None, path=None):
        with self.lock:
            return [
                r for r in self.requests
                if (method is None or r[1] == method) and (path is None or r[2] == path)
            ]


class Server:
    """The upstream Flask app on mongomock, served by werkzeug on 127.0.0.1,
    one request at a time (mongomock is not thread-safe)."""

    def __init__(self, webhook_url):
        os.environ["JWT_SIGNING_KEY"] = secrets.token_urlsafe(32)
        os.environ["WEBHOOK_URL"] = webhook_url
        from testflinger import application, database

        class MongoClientMock(mongomock.MongoClient):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                enable_gridfs_integration()

        class TestingConfig:
            TESTING = True

        self.mongo = MongoClientMock()
        database.mongo = self.mongo
        self.db = self.mongo.db
        self.store = DictSecretsStore()
        self.app = application.create_flask_app(
            TestingConfig, secrets_store=self.store
        )
        self.recorder = Recorder()
        self.lock = threading.Lock()
        inner = self.app.wsgi_app

        def wsgi(environ, start_response):
            body = None
            if environ.get("REQUEST_METHOD") in ("POST", "PUT"):
                length = int(environ.get("CONTENT_LENGTH") or 0)
                raw = environ["wsgi.input"].read(length) if length else b""
                environ["wsgi.input"] = io.BytesIO(raw)
                if "json" in environ.get("CONTENT_TYPE", ""):
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw[:200]
            with self.lock:
                # the response is produced entirely under the lock
                chunks = []
                status_headers = {}

                def capture(status, headers, exc_info=None):
                    status_headers["v"] = (status, headers)
                    return chunks.append

                result = inner(environ, capture)
                try:
                    chunks.extend(result)
                finally:
                    if hasattr(result, "close"):
                        result.close()
            status = status_headers["v"][0]
            self.recorder.add(
                environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), body,
                int(status.split()[0]),
            )
            start_response(*status_headers["v"])
            return chunks

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        # the server's security log (a 404 for every CLI's OIDC probe); a
        # failure still shows, as a refused request in the table
        logging.getLogger("testflinger").addHandler(logging.NullHandler())
        self.httpd = make_server("127.0.0.1", 0, wsgi, threaded=True)
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_client(self, client_id, key, role):
        salted = bcrypt.hashpw(key.encode(), bcrypt.gensalt()).decode()
        with self.lock:
            self.db.client_permissions.insert_one({
                "client_id": client_id,
                "client_secret_hash": salted,
                "role": role,
                "max_priority": {},
                "allowed_queues": [],
                "max_reservation_time": {},
            })

    def job(self, job_id):
        with self.lock:
            return self.db.jobs.find_one({"job_id": job_id}) or {}

    def agent(self, name):
        with self.lock:
            return self.db.agents.find_one({"name": name}) or {}

    def provision_logs(self, name):
        with self.lock:
            doc = self.db.provision_logs.find_one({"name": name}) or {}
        return doc.get("provision_log", [])


# ----------------------------------------------------------------- webhook


class Webhook:
    """Receives the event lists the server forwards (PUT /hook/<tag>)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.received = {}  # tag -> list of event-list bodies
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                tag = self.path.rsplit("/", 1)[-1]
                with outer.lock:
                    outer.received.setdefault(tag, []).append(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *_):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def last(self, tag):
        with self.lock:
            bodies = self.received.get(tag, [])
            return bodies[-1] if bodies else None


# ------------------------------------------------------------------- proxy


class Proxy:
    """A TCP relay in front of the server for one agent. `down()` closes the
    listening socket and every relayed connection (the agent sees
    "connection refused"); `up()` listens on the same port again.
    `slow(s)` holds every answer the server sends for `s` seconds (the
    server has handled the request already: slow, not lost)."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.lock = threading.Lock()
        self.conns = []
        self.listener = None
        self.port = 0
        self.delay = 0.0
        self.up()

    def slow(self, seconds):
        self.delay = seconds

    def up(self):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self.listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def down(self):
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        if listener:
            listener.close()
        for conn in conns:
            for s in conn:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns.append((client, upstream))
            for a, b, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, answers), daemon=True).start()

    def _pump(self, src, dst, answers):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if answers and self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
