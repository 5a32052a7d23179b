#!/usr/bin/env python3
"""Live-output latency (bench/budget.sh latency): one agent against
bench/fake_server.py runs one job per case; the phase writes lines
"MARK <time written>" (time.time()), the server stamps the fragment that
completes each line on arrival, and the delay is the difference (same
clock). Cases: a line every 1 s, every 3 s, a start line followed 50 ms
later by the first real line (REPEAT jobs), chatty 4 lines/s.
Prints, per case: lines, median and max delay, fragments and fragments
per minute over the phase (first to last fragment of the test phase; per
job for the start case).
  bench/latency.py PORT CASE_FILE SECONDS REPEAT
"""

import json
import statistics
import sys
import time
import urllib.request

port, case_file, secs, repeat = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
base = f"http://127.0.0.1:{port}"


def call(path, body=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        data = r.read()
    return json.loads(data) if data else None


def run(case, n):
    job_id = f"00000000-0000-4000-8000-{n:012d}"
    with open(case_file, "w") as f:
        f.write(case)
    call("/bench/job", {"job_id": job_id, "job_queue": "budget", "setup_data": {}, "test_data": {"test_cmds": "x"}})
    deadline = time.time() + secs * 3 + 120
    while (call(f"/v1/result/{job_id}") or {}).get("job_state") != "complete":
        if time.time() > deadline:
            sys.exit(f"job {case} did not complete")
        time.sleep(0.1)
    return call(f"/bench/fragments/{job_id}?phase=test&marks=1")


cases = [("every 1 s", "every:1"), ("every 3 s", "every:3"), ("start line, then first line", "start"),
         ("chatty 4 lines/s", "every:0.25")]
n = 0
print(f"{'case':<30} {'lines':>5} {'median s':>9} {'max s':>7} {'fragments':>9} {'per min':>8}")
for name, case in cases:
    delays, frags, span = [], 0, 0.0
    for _ in range(repeat if case == "start" else 1):
        n += 1
        s = run(case, n)
        delays += [at - float(line.split()[1]) for at, line in s["lines"]]
        frags += s["count"]
        if s["count"]:
            span += s["last_at"] - s["first_at"]
    # A start case's phase sends its few fragments within a fraction of a
    # second: per job says more than a rate over that.
    per_min = f"{frags / repeat:.1f}/job" if case == "start" else f"{frags / span * 60:.1f}" if span > 0 else "-"
    print(f"{name:<30} {len(delays):>5} {statistics.median(delays):>9.3f} {max(delays):>7.3f} {frags:>9} {per_min:>8}")
