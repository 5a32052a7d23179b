#!/bin/sh
# Stands in for a device connector; what the test phase does depends on the
# job's mode-* word in testflinger.json (the cwd is the job's run dir).
phase=$1
mode=$(grep -o 'mode-[a-z]*' testflinger.json | head -n 1)
case "$phase:$mode" in
  test:mode-normal)
    echo "live line 1"
    touch /tmp/normal-ready
    sleep 8
    echo "live line 2"
    mkdir -p artifacts
    echo "artifact from $(uname -m)" > artifacts/result.txt ;;
  test:mode-daemon)
    setsid sh -c 'exec sleep 1001' </dev/null >/dev/null 2>&1 &
    echo "daemon started"
    exec sleep 1002 ;;
  test:mode-cancel)
    echo "waiting for a cancel"
    touch /tmp/cancel-ready
    exec sleep 1003 ;;
  test:mode-crash)
    echo "before the crash"
    touch /tmp/crash-ready
    exec sleep 1004 ;;
  *) echo "$phase done on $(uname -m)" ;;
esac
