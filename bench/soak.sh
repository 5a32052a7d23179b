#!/usr/bin/env bash
# Soak: SOAK_JOBS short jobs (default 1000; or the first argument) back to
# back against the fake server with random faults (fixed seed, SOAK_SEED),
# release build. Prints jobs completed, outcomes lost, fragments lost or
# duplicated, agent RSS and open fds at start and end, leftover processes,
# and the duration; fails if any of them is off. Stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_JOBS=${1:-${SOAK_JOBS:-1000}}
exec cargo test --release --test it soak_many_short_jobs -- --ignored --nocapture --test-threads 1
