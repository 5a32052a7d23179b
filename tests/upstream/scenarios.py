"""The scenarios: a job, the agent's phase commands, and what the operator
does while it runs. Each runs once with our agent and once with upstream's.

A scenario is a dict:
  job        the job submitted with testflinger-cli (queue/webhook added)
  commands   phase commands overriding the default (the real connector)
  devconf    extra keys for the device connector's config
  agentconf  extra keys for the agent's config
  files      {name: (text, mode)} written next to the job file (attachments)
  drive      fn(ctx) run after submission: cancel, operator states, outage
  submit     "cli" (default) or "hostile" (raw API with a crafted archive)
A multi-device scenario (multi.py) has instead:
  multi      who runs each role: {"parent"|"child1"|"child2": "ours"|"upstream"}
  test_cmds  the parent's test
  cancel     cancel the parent while its test runs and the children hold
"""

import io
import tarfile

TEST_SLOW = "echo test started; sleep 120; echo never"
MULTI_TEST = "echo devices: $DEVICE_IP_1 $DEVICE_IP_2"


def full(ctx):
    pass


def cancel_mid_test(ctx):
    ctx.wait_job_state("test")
    ctx.wait_output("test", "test started")
    ctx.cli("cancel", ctx.job_id)


def operator_offline(ctx):
    # Set before submission by pre_submit; the job must wait, then run once
    # the operator puts the agent back.
    ctx.sleep(6)
    ctx.observe("job_state while offline", ctx.job_state())
    ctx.observe("agent state while offline", ctx.agent().get("state"))
    ctx.operator_state("waiting", "")


def operator_offline_pre(ctx):
    ctx.operator_state("offline", "cabling by the lab team")
    # submit only once the agent has read its state since: a job request
    # already under way would otherwise race the operator
    ctx.wait_state_read()


def operator_maintenance_mid_job(ctx):
    ctx.wait_job_state("test")
    ctx.wait_output("test", "tick 1")
    ctx.operator_state("maintenance", "swapping the cable")


def server_unreachable(ctx):
    ctx.wait_job_state("test")
    ctx.wait_output("test", "tick 2")
    ctx.proxy.down()
    ctx.sleep(15)
    ctx.proxy.up()


def slow_server(ctx):
    # every answer comes 4 s late for a while: slow, not lost (the server
    # has stored each request before its answer is held back)
    ctx.wait_job_state("test")
    ctx.wait_output("test", "tick 1")
    ctx.proxy.slow(4)
    ctx.sleep(12)
    ctx.proxy.slow(0)


def hostile_archive():
    """A tar.gz whose members try to leave the attachments directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name, data=b"x\n", kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.mode = 0o644
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("test/fine.txt", b"fine\n")
        add("test/../../escaped.txt")
        add("/tmp/absolute-escape.txt")
        add("setup/not-a-phase.txt")
        add("test/link-out", kind=tarfile.SYMTYPE, link="../../../../etc/passwd")
    return buf.getvalue()


LIST_TREE = (
    "cd attachments 2>/dev/null && find . | sort || echo no attachments dir; "
    "cd ..; ls ../escaped.txt 2>&1 | sed 's/.*escaped/escaped/'"
)

SCENARIOS = {
    "full_job": {
        "job": {
            "provision_data": {"url": "http://example.com/image.img.xz"},
            "test_data": {
                "test_cmds": (
                    "echo hello from test\n"
                    "mkdir -p artifacts/sub && echo one > artifacts/a.txt\n"
                    "echo two > artifacts/sub/b.txt && chmod 755 artifacts/sub/b.txt\n"
                    # a second name of a file and a fifo: how each packer stores them
                    "ln artifacts/a.txt artifacts/sub/again.txt && mkfifo artifacts/fifo\n"
                ),
            },
            "reserve_data": {"timeout": 5},
        },
        # what a phase command finds: the outcome file as the agent left it,
        # and its open descriptors (both agents are started with an extra
        # one, fd 9, which upstream does not pass on)
        "commands": {
            "setup_command": (
                'echo "outcome file: $(cat testflinger-outcome.json 2>&1)";'
                ' echo "descriptors: $(ls /proc/self/fd | sort -n | tr \'\\n\' \' \')";'
                # the config as the phase's environment has it
                " env | grep -E '^(agent_id|server_address|identifier|location|polling_interval"
                "|[a-z]+_basedir|logging_[a-z]+|job_queues|[a-z_]+_command|provision_type"
                "|[a-z]+_timeout|output_bytes|token_file|metrics_endpoint_port)=' | sort"
            ),
        },
        "drive": full,
    },
    "failing_provision": {
        "job": {
            "provision_data": {"url": "http://example.com/image.img.xz"},
            "test_data": {"test_cmds": "echo should not run"},
        },
        # the connector fails inside its stage (the job file it is given is
        # missing), so it writes device-connector-error.json and exits 1
        "commands": {"provision_command": "{connector} provision -c {devconf} missing-job.json"},
        "drive": full,
    },
    "phases_without_data": {
        "job": {"test_data": {"test_cmds": "echo only a test"}},
        "drive": full,
    },
    "test_fail_then_reserve": {
        "job": {
            "provision_data": {"url": "http://example.com/image.img.xz"},
            "test_data": {"test_cmds": "echo failing test; exit 3"},
            "reserve_data": {"timeout": 3},
        },
        "drive": full,
    },
    "cancel_mid_test": {
        "job": {"test_data": {"test_cmds": TEST_SLOW}},
        "drive": cancel_mid_test,
    },
    "global_timeout": {
        "job": {"global_timeout": 12, "test_data": {"test_cmds": TEST_SLOW}},
        "drive": full,
    },
    "output_timeout": {
        "job": {"output_timeout": 12, "test_data": {"test_cmds": TEST_SLOW}},
        "drive": full,
    },
    "attachments": {
        "job": {
            "test_data": {
                "attachments": [
                    {"local": "data.txt", "agent": "data/data.txt"},
                    {"local": "run.sh"},
                ],
                "test_cmds": (
                    "cd attachments && find . | sort && cat test/data/data.txt"
                    " && ls -l test/run.sh | cut -c1-10 && cd ..\n"
                    "mkdir -p artifacts && cp -a attachments/test artifacts/\n"
                ),
            },
        },
        "files": {"data.txt": ("attached data\n", 0o644), "run.sh": ("#!/bin/sh\necho run\n", 0o755)},
        "drive": full,
    },
    "hostile_archive": {
        "job": {
            "test_data": {
                "attachments": [{"agent": "fine.txt"}],
                "test_cmds": LIST_TREE,
            },
        },
        "submit": "hostile",
        "drive": full,
    },
    "secrets_per_phase": {
        "job": {
            "firmware_update_data": {
                "version": "1.0",
                "secrets": {"SHARED": "firmware-value-1", "FW_ONLY": "firmware-only-2"},
            },
            "test_data": {
                "secrets": {"SHARED": "conformance/shared", "TEST_ONLY": "conformance/test-only"},
                "test_cmds": (
                    'echo "test SHARED=${SHARED:-unset} TEST_ONLY=${TEST_ONLY:-unset}'
                    ' FW_ONLY=${FW_ONLY:-unset}"'
                ),
            },
        },
        "store": {"conformance/shared": "test-value-3", "conformance/test-only": "test-only-4"},
        "commands": {
            "firmware_update_command": (
                'echo "firmware SHARED=${SHARED:-unset} FW_ONLY=${FW_ONLY:-unset}'
                ' TEST_ONLY=${TEST_ONLY:-unset}"'
            ),
        },
        "drive": full,
    },
    "exit_46": {
        "job": {
            "provision_data": {"url": "http://example.com/image.img.xz"},
            "test_data": {"test_cmds": "echo should not run"},
        },
        "commands": {"provision_command": "{connector} provision -c {devconf} testflinger.json; exit 46"},
        "drive": full,
    },
    "operator_offline": {
        "job": {"test_data": {"test_cmds": "echo ran after the operator"}},
        "pre_submit": operator_offline_pre,
        "submit": "api",
        "drive": operator_offline,
    },
    "operator_maintenance_mid_job": {
        "job": {"test_data": {"test_cmds": "for i in 1 2 3 4 5 6; do echo tick $i; sleep 2; done"}},
        "drive": operator_maintenance_mid_job,
    },
    "slow_server": {
        "job": {"test_data": {"test_cmds": "for i in $(seq 1 12); do echo tick $i; sleep 1; done"}},
        "drive": slow_server,
    },
    "server_unreachable": {
        "job": {"test_data": {"test_cmds": "for i in $(seq 1 15); do echo tick $i; sleep 2; done"}},
        "drive": server_unreachable,
    },
    # issue 22: the `multi` connector's parent and two children, in mixes
    "multi_ours_ours": {
        "multi": {"parent": "ours", "child1": "ours", "child2": "ours"},
        "test_cmds": MULTI_TEST,
    },
    "multi_ours_upstream_children": {
        "multi": {"parent": "ours", "child1": "upstream", "child2": "upstream"},
        "test_cmds": MULTI_TEST,
    },
    "multi_upstream_ours_children": {
        "multi": {"parent": "upstream", "child1": "ours", "child2": "ours"},
        "test_cmds": MULTI_TEST,
    },
    "multi_mixed_children": {
        "multi": {"parent": "ours", "child1": "ours", "child2": "upstream"},
        "test_cmds": MULTI_TEST,
    },
    "multi_cancel_parent": {
        "multi": {"parent": "ours", "child1": "ours", "child2": "upstream"},
        "test_cmds": "echo test started; sleep 120; echo never",
        "cancel": True,
    },
}
