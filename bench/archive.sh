#!/bin/sh
# Benchmark of artifacts out and attachments in, against Python's
# shutil.make_archive(..., "gztar") on the same folder. Prints every target.
#   bench/archive.sh [SIZE_MIB]      (default 512; data kept in $BENCH_DIR)
# Needs python3 and GNU time (/usr/bin/time). Starts and stops its own server.
set -eu
SIZE_MIB=${1:-512}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/tf-archive-bench}
DATA=$BENCH_DIR/data-$SIZE_MIB
WORK=$BENCH_DIR/work
PORT=${BENCH_PORT:-18765}

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
BIN=$ROOT/target/release/testflinger-agent

if [ ! -d "$DATA/artifacts" ]; then
    echo "generating $SIZE_MIB MiB of artifacts in $DATA ..."
    python3 "$ROOT/bench/gen_data.py" "$DATA/artifacts.tmp" "$SIZE_MIB"
    mv "$DATA/artifacts.tmp" "$DATA/artifacts"
fi
rm -rf "$WORK" && mkdir -p "$WORK"

# Python, same folder, members under artifacts/ as the agent's.
PY_T=$(python3 -c '
import shutil, sys, time
t = time.monotonic()
shutil.make_archive(sys.argv[1], "gztar", sys.argv[2], "artifacts")
print("%.2f" % (time.monotonic() - t))' "$WORK/python" "$DATA")
PY_SIZE=$(stat -c %s "$WORK/python.tar.gz")

# The attachments archive: the same data under test/, packed by Python.
ATT=$BENCH_DIR/attachments-$SIZE_MIB.tar.gz
if [ ! -f "$ATT" ]; then
    python3 -c '
import sys, tarfile
with tarfile.open(sys.argv[1], "w:gz", compresslevel=6) as t:
    t.add(sys.argv[2], arcname="test")' "$ATT.tmp" "$DATA/artifacts"
    mv "$ATT.tmp" "$ATT"
fi

echo '{"job_id": "bench-artifacts", "job_queue": "bench", "test_data": {"test_cmds": "x"}}' > "$WORK/job1.json"
echo '{"job_id": "bench-attachments", "job_queue": "bench", "attachments_status": "complete", "test_data": {"test_cmds": "x"}}' > "$WORK/job2.json"
cat > "$WORK/agent.conf" <<CONF
agent_id: bench-agent
server_address: 127.0.0.1:$PORT
job_queues: [bench]
polling_interval: 0.2
execution_basedir: $WORK/run
results_basedir: $WORK/results
logging_basedir: $WORK/logs
# Hard links: the artifacts appear in the run dir without a copy.
test_command: if [ -d attachments ]; then du -sb attachments; else cp -al $DATA/artifacts artifacts; fi
CONF

python3 "$ROOT/bench/archive_server.py" "$PORT" "$WORK/report" "$ATT" "$WORK/job1.json" "$WORK/job2.json" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT))" 2>/dev/null && break; sleep 0.1; done

/usr/bin/time -v "$BIN" -c "$WORK/agent.conf" --once > "$WORK/agent1.out" 2> "$WORK/agent1.err"
/usr/bin/time -v "$BIN" -c "$WORK/agent.conf" --once > "$WORK/agent2.out" 2> "$WORK/agent2.err"

rss() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1"; }
RS_RSS=$(rss "$WORK/agent1.err")
ATT_RSS=$(rss "$WORK/agent2.err")
PACKED=$(grep -ho 'artifacts packed: [0-9]* files, [0-9]* bytes from [0-9]* in [0-9.]*s' "$WORK/agent1.err" "$WORK/logs"/* 2>/dev/null | head -1)
RS_SIZE=$(echo "$PACKED" | awk '{print $5}')
RS_T=$(echo "$PACKED" | awk '{print $10}' | tr -d s)
UPLOADED=$(awk '/upload_body_bytes/ {print $2}' "$WORK/report" | tail -1)
UNPACKED=$(grep -ho 'attachments unpacked: [0-9]* files, [0-9]* bytes' "$WORK/agent2.err" "$WORK/logs"/* 2>/dev/null | head -1)
ATT_WALL=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$WORK/agent2.err")

verdict() { if [ "$1" = 1 ]; then echo PASS; else echo FAIL; fi; }
echo
echo "== archive benchmark: $SIZE_MIB MiB artifacts ($(du -sh "$DATA/artifacts" | cut -f1)), $(nproc) cores =="
echo "python shutil.make_archive gztar: ${PY_T}s, $PY_SIZE bytes"
echo "agent pack:                       ${RS_T}s, $RS_SIZE bytes"
awk -v r="$RS_T" -v p="$PY_T" 'BEGIN { printf "pack time ratio agent/python:     %.2f   (target <= 1.00, goal <= 0.50) %s\n", r / p, (r <= p ? "PASS" : "FAIL") }'
awk -v r="$RS_SIZE" -v p="$PY_SIZE" 'BEGIN { d = (r - p) * 100 / p; printf "archive size vs python:           %+.2f%% (target within 5%%) %s\n", d, (d <= 5 && d >= -5 ? "PASS" : "FAIL") }'
echo "upload body received:             $UPLOADED bytes (archive + multipart framing)"
echo "agent peak RSS, pack + upload:    $RS_RSS KB (target <= 16384 KB) $(verdict $([ "$RS_RSS" -le 16384 ] && echo 1))"
echo "attachments archive:              $(stat -c %s "$ATT") bytes; $UNPACKED; agent run ${ATT_WALL}"
echo "agent peak RSS, attachments:      $ATT_RSS KB (target <= 16384 KB) $(verdict $([ "$ATT_RSS" -le 16384 ] && echo 1))"
