#!/usr/bin/env python3
"""A minimal Testflinger server for bench/archive.sh.

Hands out the jobs given on the command line (JSON files), one per poll,
answers the agent endpoints with 200, serves an attachments archive, and
receives the artifact upload streaming, counting its bytes (the upload is
not kept in memory: 512 MiB of it would only measure this server).
Writes one line per upload to the file named by --report.
Usage: archive_server.py PORT REPORT ATTACHMENTS_TAR_GZ JOB.json...
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, REPORT, ATTACHMENTS = int(sys.argv[1]), sys.argv[2], sys.argv[3]
JOBS = [json.load(open(p)) for p in sys.argv[4:]]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status=200, body=b"{}", ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/v1/job") and path.endswith("/attachments"):
            size = os.path.getsize(ATTACHMENTS)
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(ATTACHMENTS, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.wfile.write(chunk)
        elif path == "/v1/job":
            if JOBS:
                self.answer(200, json.dumps(JOBS.pop(0)).encode())
            else:
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
        elif path.startswith("/v1/agents/data/"):
            self.answer(200, b'{"state": "waiting"}')
        elif path.startswith("/v1/result/"):
            self.answer(200, b'{"job_state": "test"}')
        else:
            self.answer(200)

    def do_POST(self):
        left = int(self.headers.get("Content-Length", "0"))
        total = left
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        if self.path.endswith("/artifact"):
            with open(REPORT, "a") as f:
                f.write("upload_body_bytes %d\n" % (total - left))
        self.answer(200)


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
