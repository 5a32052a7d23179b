#!/usr/bin/env python3
"""The phase command of bench/latency.py: writes "MARK <time written>"
lines on an absolute schedule, so a slow line does not shift the rest.
  emit.py CASE_FILE SECONDS   (the case: every:<period> or start)
"""

import sys
import time

case, secs = open(sys.argv[1]).read().strip(), float(sys.argv[2])


def mark():
    sys.stdout.write(f"MARK {time.time():.6f}\n")
    sys.stdout.flush()


if case == "start":
    # A connector's start line, then its first real line.
    sys.stdout.write("connector start\n")
    sys.stdout.flush()
    time.sleep(0.05)
    mark()
else:
    period = float(case.split(":")[1])
    t0 = time.time()
    for k in range(int(secs / period)):
        time.sleep(max(0.0, t0 + k * period - time.time()))
        mark()
# The phase goes on quietly for a while, as a connector's would: the lines
# are delivered live, not by the flush at the phase's end.
time.sleep(2)
