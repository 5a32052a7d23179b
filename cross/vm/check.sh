#!/bin/sh
# The checks, run once by init after the agent's service started. Every
# result is a "VMCHECK PASS|FAIL name: detail" line on the console for the
# host (cross/vm-check.sh); at the end the VM powers off (init's shutdown
# action then checks SIGTERM). IDLE (seconds) comes from the kernel command line.
idle=$(sed -n 's/.*vmcheck.idle=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$idle" ] || idle=60
fails=0
pass() { echo "VMCHECK PASS $1: $2"; }
fail() { echo "VMCHECK FAIL $1: $2"; fails=$((fails + 1)); }
up() { cut -d' ' -f1 /proc/uptime; }
# wait_for SECONDS COMMAND...: poll every 0.2 s; false at the deadline.
wait_for() {
  n=$(($1 * 5)); shift
  while ! "$@"; do
    n=$((n - 1)); [ $n -gt 0 ] || return 1
    sleep 0.2
  done
}
ctl() { echo "$*" > /run/ctl; }
dump() {   # dump ID: the server's view of job ID into /tmp/d-ID
  rm -rf "/tmp/d-$1"
  ctl dump "$1" "/tmp/d-$1"
  wait_for 10 test -e "/tmp/d-$1/done"
}
polled() { ctl requests /tmp/req; sleep 0.1; grep -q 'GET /v1/job' /tmp/req 2>/dev/null; }
ended() { dump "$1" && tail -n 1 "/tmp/d-$1/states" | grep -qx 'complete\|cancelled'; }
job() {    # job N MODE [extra JSON fields]: queue job N, print its id
  id=00000000-0000-4000-8000-00000000000$1
  printf '{"job_id": "%s", "job_queue": "vm", "test_data": {"test_cmds": "mode-%s"}, "job_status_webhook": "http://127.0.0.1:9/hook"%s}\n' "$id" "$2" "${3:+, $3}" > "/tmp/job$1.json"
  ctl push "/tmp/job$1.json"
  echo "$id"
}
left() {   # left N: is a "sleep N" still running?
  for c in /proc/[0-9]*/cmdline; do
    [ "$(tr '\0' ' ' < "$c" 2>/dev/null)" = "sleep $1 " ] && return 0
  done
  return 1
}
not_left() { ! left "$1"; }
stat_cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Boot to the first poll.
if wait_for 20 polled || { echo "VMCHECK INFO no poll yet at $(up) s:"; tail -n 5 /var/log/agent.log; cat /var/log/fake_server.log; ls -l /tmp; wait_for 100 polled; }; then
  echo "VMCHECK INFO boot-to-first-poll $(up) s"
else
  fail first-poll "no GET /v1/job within 120 s"
  echo "VMCHECK INFO agent exits: $(tr '\n' ' ' < /var/log/agent.exits 2>/dev/null)"
  echo "VMCHECK INFO requests: $(head -n 5 /tmp/req 2>/dev/null | tr '\n' ' ')"
  tail -n 15 /var/log/agent.log; tail -n 5 /var/log/fake_server.log
  poweroff; exit 1
fi
pid=$(pidof testflinger-agent)

# Idle: RSS and CPU over $idle seconds.
if [ -n "$pid" ]; then
  c0=$(stat_cpu "$pid"); t0=$(up)
  sleep "$idle"
  c1=$(stat_cpu "$pid"); t1=$(up)
  hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
  echo "VMCHECK INFO idle-rss $(sed -n 's/^VmRSS:[[:space:]]*//p' "/proc/$pid/status")"
  echo "VMCHECK INFO idle-cpu $(awk "BEGIN{printf \"%.2f s over %.0f s\", ($c1 - $c0) / $hz, $t1 - $t0}")"
fi

# 1. A normal job: every phase, output seen while the test still runs, an artifact.
id=$(job 1 normal)
wait_for 120 test -e /tmp/normal-ready
live=no
seen1() { dump "$id" && grep -q 'live line 1' "/tmp/d-$id/output"; }
if wait_for 6 seen1 && ! grep -q 'live line 2' "/tmp/d-$id/output"; then live=yes; fi
if wait_for 120 ended "$id"; then
  st=$(tr '\n' ' ' < "/tmp/d-$id/states")
  # cleanup posts no job state (as upstream); its output shows it ran
  for p in setup provision test; do
    grep -qx "$p" "/tmp/d-$id/states" || fail "job-phases" "no $p in: $st"
  done
  grep -q 'cleanup done' "/tmp/d-$id/output" && pass job-phases "$st + cleanup output" || fail job-phases "no cleanup output"
  grep -q 'setup done' "/tmp/d-$id/output" && grep -q 'live line 2' "/tmp/d-$id/output" \
    && pass job-output "$(wc -l < "/tmp/d-$id/output") lines" || fail job-output "$(head -c 300 "/tmp/d-$id/output")"
  [ "$live" = yes ] && pass live-output "line 1 on the server while the test still ran" || fail live-output "line 1 not seen before line 2"
  grep -q 'artifacts/result.txt' "/tmp/d-$id/artifacts" && pass artifact "$(tr '\n' ' ' < "/tmp/d-$id/artifacts")" \
    || fail artifact "members: $(tr '\n' ' ' < "/tmp/d-$id/artifacts")"
else
  fail job-phases "job 1 did not end in 120 s"
fi

# 2. global_timeout with a setsid daemon: the whole tree is gone afterwards.
id=$(job 2 daemon '"global_timeout": 4')
if wait_for 120 ended "$id"; then
  if grep -q global_timeout "/tmp/d-$id/events" && ! left 1001 && ! left 1002; then
    pass global-timeout "job ended by global_timeout, the setsid daemon (sleep 1001) killed"
  else
    fail global-timeout "events: $(tr '\n' ' ' < "/tmp/d-$id/events"); sleep 1001 left: $(left 1001 && echo yes || echo no)"
  fi
else
  fail global-timeout "job 2 did not end in 120 s"
fi

# 3. A cancel while the test runs.
id=$(job 3 cancel)
wait_for 120 test -e /tmp/cancel-ready
ctl cancel "$id"
if wait_for 60 not_left 1003; then
  if wait_for 60 ended "$id"; then
    pass cancel "the test phase (sleep 1003) stopped, job ended: $(tr '\n' ' ' < "/tmp/d-$id/states")"
  else
    fail cancel "the test phase stopped but the job did not end in 60 s"
  fi
else
  fail cancel "sleep 1003 still running 60 s after the cancel"
fi

# 4. kill -9 mid-job; init respawns the agent, which recovers the job.
id=$(job 4 crash)
wait_for 120 test -e /tmp/crash-ready
old=$(pidof testflinger-agent)
kill -9 "$old"
if wait_for 120 ended "$id"; then
  new=$(pidof testflinger-agent)
  if [ -n "$new" ] && [ "$new" != "$old" ] && grep -q test_fail "/tmp/d-$id/events" && ! left 1004; then
    pass restart-recovery "agent $old killed, $new (respawned by init) recovered the job: $(tr '\n' ' ' < "/tmp/d-$id/events")"
  else
    fail restart-recovery "pids $old/$new; events: $(tr '\n' ' ' < "/tmp/d-$id/events")"
  fi
else
  fail restart-recovery "job 4 not delivered 120 s after kill -9"
fi

ctl requests /tmp/req; sleep 0.2
echo "VMCHECK INFO requests $(wc -l < /tmp/req), all to $(cat /run/url)"
if [ "$fails" -gt 0 ]; then
  echo "VMCHECK INFO agent log tail:"; tail -n 30 /var/log/agent.log
fi
poweroff
