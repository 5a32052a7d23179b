#!/bin/sh
# A stand-in device connector: runs the job's test_cmds locally, the way a
# real connector runs them on the device, and leaves an artifact.
set -e
phase="$1"
echo "fake connector: $phase phase, job $(sed -n 's/.*"job_id":"\([^"]*\)".*/\1/p' testflinger.json)"
mkdir -p artifacts
echo "test output from the bench" > artifacts/result.txt
echo "secret in env: TOKEN is ${TOKEN:+set}"
echo "TOKEN value printed (masked in logs): $TOKEN"
