#!/usr/bin/env python3
"""Live-output latency (bench/budget.sh latency): each agent, against its
own bench/fake_server.py, runs one job per case; the phase writes lines
"MARK <time written>" (time.time()), the server stamps the fragment that
completes each line on arrival, and the delay is the difference (same
clock). Cases: a line every 1 s, every 3 s, a start line followed 50 ms
later by the first real line (REPEAT jobs), chatty 4 lines/s.
The agents run their cases at the same time (one thread each), so their
figures share the machine's load; one table, per case and agent: lines,
median and max delay, fragments and fragments per minute over the phase
(first to last fragment of the test phase; per job for the start case).
  bench/latency.py SECONDS REPEAT LABEL=PORT=CASE_FILE...
"""

import json
import statistics
import sys
import threading
import time
import urllib.request

secs, repeat = float(sys.argv[1]), int(sys.argv[2])
agents = [a.split("=", 2) for a in sys.argv[3:]]
CASES = [("every 1 s", "every:1"), ("every 3 s", "every:3"), ("start line, then first line", "start"),
         ("chatty 4 lines/s", "every:0.25")]


def call(port, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        data = r.read()
    return json.loads(data) if data else None


def run(port, case_file, case, n):
    job_id = f"00000000-0000-4000-8000-{n:012d}"
    with open(case_file, "w") as f:
        f.write(case)
    call(port, "/bench/job", {"job_id": job_id, "job_queue": "budget", "setup_data": {},
                              "test_data": {"test_cmds": "x"}})
    deadline = time.time() + secs * 3 + 120
    while (call(port, f"/v1/result/{job_id}") or {}).get("job_state") != "complete":
        if time.time() > deadline:
            raise TimeoutError(f"job {case} did not complete")
        time.sleep(0.1)
    return call(port, f"/bench/fragments/{job_id}?phase=test&marks=1")


def measure(label, port, case_file, out):
    n = 0
    for name, case in CASES:
        delays, frags, span = [], 0, 0.0
        try:
            for _ in range(repeat if case == "start" else 1):
                n += 1
                s = run(port, case_file, case, n)
                delays += [at - float(line.split()[1]) for at, line in s["lines"]]
                frags += s["count"]
                if s["count"]:
                    span += s["last_at"] - s["first_at"]
        except (OSError, TimeoutError) as e:
            out[(label, name)] = f"failed: {e}"
            return
        # A start case's phase sends its few fragments within a fraction of
        # a second: per job says more than a rate over that.
        per_min = f"{frags / repeat:.1f}/job" if case == "start" else f"{frags / span * 60:.1f}" if span > 0 else "-"
        if not delays:
            out[(label, name)] = f"no lines ({frags} fragments)"
            continue
        out[(label, name)] = (f"{len(delays):>5} {statistics.median(delays):>9.3f} {max(delays):>7.3f} "
                              f"{frags:>9} {per_min:>8}")


out = {}
threads = [threading.Thread(target=measure, args=(*a, out)) for a in agents]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(f"{'case':<28} {'agent':<9} {'lines':>5} {'median s':>9} {'max s':>7} {'fragments':>9} {'per min':>8}")
for name, _ in CASES:
    for label, _, _ in agents:
        print(f"{name:<28} {label:<9} {out.get((label, name), '-')}")
