"""Conformance: our agent and the upstream agent against the real upstream
server, device connectors and CLI; what the server holds afterwards is
compared scenario by scenario.

    python conformance.py --agent target/release/testflinger-agent \
        --venv VENV --work DIR [--only NAME ...] [--save-table FILE]

Exit status: 0 when every difference is in allowed.yaml, 1 otherwise.
"""

import argparse
import atexit
import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from pathlib import Path

import requests
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import infra  # noqa: E402
from scenarios import SCENARIOS, hostile_archive  # noqa: E402

PHASES = ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"]
TERMINAL = ("complete", "completed", "cancelled")
SCENARIO_DEADLINE = 300  # seconds for one side of one scenario


class Env:
    """What every run shares: server, webhook, credentials, paths."""

    def __init__(self, args):
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.venv = Path(args.venv).resolve()
        self.ours = Path(args.agent).resolve()
        self.webhook = infra.Webhook()
        self.server = infra.Server(self.webhook.url)
        self.server.add_client("conformance-agent", "agent-key", "agent")
        self.server.add_client("conformance-admin", "admin-key", "admin")
        self.agent_token = self.token("conformance-agent", "agent-key")
        self.admin_access = self.token("conformance-admin", "admin-key")["access_token"]
        self.home = self.work / "home"
        self.home.mkdir(exist_ok=True)

    def token(self, client_id, key):
        basic = base64.b64encode(f"{client_id}:{key}".encode()).decode()
        r = requests.post(
            f"{self.server.url}/v1/oauth2/token",
            headers={"Authorization": f"Basic {basic}"}, timeout=30,
        )
        r.raise_for_status()
        return r.json()

    def proc_env(self):
        env = dict(os.environ)
        env["PATH"] = f"{self.venv / 'bin'}:{env['PATH']}"
        env["HOME"] = str(self.home)
        env["XDG_CONFIG_HOME"] = str(self.home / ".config")
        env.pop("INFLUX_HOST", None)
        return env

    def cli(self, *args, check=True, timeout=120):
        argv = [str(self.venv / "bin" / "testflinger-cli"), "--server", self.server.url, *args]
        r = subprocess.run(
            argv, capture_output=True, text=True, env=self.proc_env(), timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"testflinger-cli {' '.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}")
        return r


def fill_in(command, values):
    """{connector} and {devconf} in a phase command (other braces are shell)."""
    for key, value in values.items():
        command = command.replace("{" + key + "}", str(value))
    return command


class Run:
    """One scenario on one side ("ours" or "upstream")."""

    def __init__(self, env, name, spec, side):
        self.env, self.name, self.spec, self.side = env, name, spec, side
        # both tags the same length: the banner's width depends on the agent name
        self.tag = f"{'ours' if side == 'ours' else 'upst'}-{name}".replace("_", "-")
        self.dir = env.work / self.tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proxy = infra.Proxy(env.server.port)
        self.job_id = None
        self.observed = {}
        self.error = None
        self.snapshot = None
        self.proc = None

    # -- set-up

    def write_configs(self):
        connector = "testflinger-device-connector fake_connector"
        devconf = self.dir / "device.yaml"
        devconf.write_text(yaml.safe_dump({"device_ip": "127.0.0.1", "agent_name": self.tag, **self.spec.get("devconf", {})}))
        fill = {"connector": connector, "devconf": devconf}
        commands = {
            "setup_command": "echo setup on the controller",
            "provision_command": "{connector} provision -c {devconf} testflinger.json",
            "firmware_update_command": "{connector} firmware_update -c {devconf} testflinger.json",
            "test_command": "{connector} runtest -c {devconf} testflinger.json",
            "reserve_command": "{connector} reserve -c {devconf} testflinger.json",
            "cleanup_command": "{connector} cleanup -c {devconf} testflinger.json",
        }
        commands.update(self.spec.get("commands", {}))
        conf = {
            "agent_id": self.tag,
            "server_address": f"http://127.0.0.1:{self.proxy.port}",
            "polling_interval": 1,
            "job_queues": [self.tag],
            "execution_basedir": str(self.dir / "run"),
            "logging_basedir": str(self.dir / "logs"),
            "results_basedir": str(self.dir / "results"),
            **{k: fill_in(v, fill) for k, v in commands.items()},
            **self.spec.get("agentconf", {}),
        }
        (self.dir / "agent.conf").write_text(yaml.safe_dump(conf))
        (self.dir / "token.json").write_text(json.dumps(self.env.agent_token))

    def start_agent(self):
        if self.side == "ours":
            argv = [str(self.env.ours)]
        else:
            argv = [str(self.env.venv / "bin" / "testflinger-agent")]
        argv += ["-c", str(self.dir / "agent.conf"), "--token-file", str(self.dir / "token.json")]
        self.proc = infra.spawn(argv, self.dir / "agent.out", env=self.env.proc_env(), cwd=self.dir)
        self.wait(lambda: self.agent().get("state") == "waiting", 60, "agent registers as waiting")

    def submit(self):
        job = json.loads(json.dumps(self.spec["job"]))
        job["job_queue"] = self.tag
        job["job_status_webhook"] = f"{self.env.webhook.url}/hook/{self.tag}"
        for fname, (text, mode) in self.spec.get("files", {}).items():
            path = self.dir / fname
            path.write_text(text)
            path.chmod(mode)
        for path, value in self.spec.get("store", {}).items():
            self.env.cli("secret", "write", "--client-id", "conformance-admin",
                         "--secret-key", "admin-key", path, value)
        if self.spec.get("submit") == "hostile":
            self.job_id = self.submit_hostile(job)
            return
        if self.spec.get("submit") == "api":
            self.job_id = self.submit_api(job)
            return
        jobfile = self.dir / "job.json"
        jobfile.write_text(json.dumps(job, indent=1))
        args = ["submit", "--quiet", str(jobfile)]
        if "store" in self.spec:
            args += ["--client-id", "conformance-admin", "--secret-key", "admin-key"]
        out = self.env.cli(*args).stdout.strip().splitlines()
        self.job_id = out[-1].strip()

    def submit_api(self, job):
        """The CLI refuses a queue without an online agent; a job already
        queued when the operator takes the agent offline is posted directly."""
        r = requests.post(
            f"{self.env.server.url}/v1/job", json=job, timeout=30,
            headers={"Authorization": f"Bearer {self.env.admin_access}"},
        )
        r.raise_for_status()
        return r.json()["job_id"]

    def submit_hostile(self, job):
        """The CLI only packs honest archives; post a crafted one directly."""
        url = self.env.server.url
        headers = {"Authorization": f"Bearer {self.env.admin_access}"}
        r = requests.post(f"{url}/v1/job", json=job, headers=headers, timeout=30)
        r.raise_for_status()
        job_id = r.json()["job_id"]
        r = requests.post(
            f"{url}/v1/job/{job_id}/attachments", headers=headers, timeout=30,
            files={"file": ("attachments.tar.gz", hostile_archive(), "application/x-gzip")},
        )
        r.raise_for_status()
        return job_id

    # -- what the scenario drivers use

    def wait(self, cond, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            if self.proc and self.proc.poll() is not None:
                tail = (self.dir / "agent.out").read_text(errors="replace")[-300:]
                raise RuntimeError(f"{self.tag}: the agent exited ({self.proc.returncode}) while waiting for {what}: {tail}")
            time.sleep(0.3)
        raise TimeoutError(f"{self.tag}: timed out waiting for {what}")

    def sleep(self, seconds):
        time.sleep(seconds)

    def observe(self, key, value):
        self.observed[key] = value

    def agent(self):
        return self.env.server.agent(self.tag)

    def job_state(self):
        return self.env.server.job(self.job_id).get("result_data", {}).get("job_state")

    def wait_job_state(self, state, timeout=120):
        self.wait(lambda: self.job_state() == state, timeout, f"job_state {state}")

    def output(self, phase):
        """The phase's log so far (straight from the API: the CLI is a Python
        start-up per call, too slow to poll with)."""
        r = requests.get(
            f"{self.env.server.url}/v1/result/{self.job_id}/log/output",
            params={"phase": phase}, timeout=30,
            headers={"Authorization": f"Bearer {self.env.admin_access}"},
        )
        return r.text

    def wait_output(self, phase, text, timeout=60):
        self.wait(lambda: text in self.output(phase), timeout, f"{text!r} in {phase} output")

    def cli(self, *args):
        return self.env.cli(*args)

    def wait_state_read(self):
        """Until the agent has read its state after now (requests are
        recorded when answered, one at a time)."""
        since = time.time()
        path = f"/v1/agents/data/{self.tag}"
        self.wait(lambda: any(t > since for t, *_ in self.env.server.recorder.select("GET", path)),
                  60, "the agent to read its state")

    def operator_state(self, state, comment):
        r = requests.post(
            f"{self.env.server.url}/v1/agents/data/{self.tag}",
            json={"state": state, "comment": comment},
            headers={"Authorization": f"Bearer {self.env.admin_access}"}, timeout=30,
        )
        r.raise_for_status()

    # -- end of the run

    def finished(self):
        """The job is over on the server and the agent has cleared its job id
        (both agents post `job_id: ""` once a job's outcome is delivered;
        what follows it comes within the settling time of execute())."""
        if self.job_state() not in TERMINAL:
            return False
        posts = [b for _, _, _, b, _ in self.env.server.recorder.select("POST", f"/v1/agents/data/{self.tag}")]
        took = [i for i, b in enumerate(posts) if isinstance(b, dict) and b.get("job_id") == self.job_id]
        return bool(took) and any(
            isinstance(b, dict) and b.get("job_id") == "" for b in posts[took[0]:]
        )

    def execute(self):
        try:
            self.write_configs()
            self.start_agent()
            if "pre_submit" in self.spec:
                self.spec["pre_submit"](self)
            self.submit()
            self.spec["drive"](self)
            try:
                self.wait(self.finished, SCENARIO_DEADLINE, "the job to finish and the agent to idle")
            except TimeoutError as error:
                self.error = str(error)
            time.sleep(3)  # trailing posts
            self.snapshot = self.take_snapshot()
        except Exception as error:  # report, keep the other runs going
            self.error = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            if self.job_id and self.snapshot is None:
                try:
                    self.snapshot = self.take_snapshot()
                except Exception:
                    traceback.print_exc()
        finally:
            if self.proc:
                infra.stop(self.proc)
            self.proxy.down()

    def take_snapshot(self):
        srv = self.env.server
        results = json.loads(self.env.cli("results", self.job_id).stdout or "{}")
        r = self.env.cli("poll", "--json", self.job_id, check=False)
        try:
            logs = {p: v.get("log_data", "") for p, v in json.loads(r.stdout)["output"].items()}
        except (ValueError, KeyError, AttributeError):
            logs = {"unreadable": r.stdout + r.stderr}
        members = []
        tarpath = self.dir / "artifacts.tar.gz"
        r = self.env.cli("artifacts", "--filename", str(tarpath), self.job_id, check=False)
        if r.returncode == 0 and tarpath.exists():
            with tarfile.open(tarpath) as tar:
                members = [
                    {"name": m.name, "type": m.type.decode() if isinstance(m.type, bytes) else m.type,
                     "mode": oct(m.mode), "size": m.size if m.isfile() else 0,
                     "uname": m.uname, "gname": m.gname, "linkname": m.linkname,
                     "pax": sorted(m.pax_headers)}
                    for m in tar.getmembers()
                ]
        def accepted(path):
            return [b for _, _, _, b, code in srv.recorder.select("POST", path) if code < 400]

        result_posts = accepted(f"/v1/result/{self.job_id}")
        history = [b["job_state"] for b in result_posts if isinstance(b, dict) and "job_state" in b]
        agent_posts = accepted(f"/v1/agents/data/{self.tag}")
        refused = [
            f"{m} {p} -> {code}" for _, m, p, _, code in srv.recorder.select()
            if code >= 400 and (self.job_id in p or p.endswith("/" + self.tag))
        ]
        webhook = self.env.webhook.last(self.tag) or {}
        return {
            "results": results,
            "logs": logs,
            "artifacts": members,
            "job_state_history": history,
            "result_posts": result_posts,
            "refused": refused,
            "events": webhook.get("events", []),
            "agent_posts": agent_posts,
            "agent_final": srv.agent(self.tag),
            "provision_logs": srv.provision_logs(self.tag),
            "observed": self.observed,
            # for reading, not compared: every request of this agent and job
            "requests": [
                r for r in srv.recorder.select()
                if self.job_id in r[2] or r[2].endswith("/" + self.tag)
            ],
            "job_id": self.job_id,
            "tag": self.tag,
            "rundir": str(self.dir / "run"),
            "server": [srv.url, f"http://127.0.0.1:{self.proxy.port}"],
            "workdir": str(self.dir),
        }


def run_scenario(env, name, spec):
    runs = {side: Run(env, name, spec, side) for side in ("ours", "upstream")}
    threads = [threading.Thread(target=r.execute, daemon=True) for r in runs.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--agent", required=True, help="our testflinger-agent binary")
    p.add_argument("--venv", required=True, help="venv with the upstream packages")
    p.add_argument("--work", required=True, help="scratch directory")
    p.add_argument("--only", action="append", help="run only this scenario (repeatable)")
    p.add_argument("--save-table", help="also write the table to this file")
    p.add_argument("--parallel", type=int, default=4,
                   help="scenarios run at once (each runs both agents); the server answers one request at a time")
    p.add_argument("--pgid-file", help="list the process groups started here in this file")
    p.add_argument("--readme",
                   help="a file holding the differences allowed.yaml cites "
                        "(default: the checkout's README.md and docs/*.md)")
    p.add_argument("--dump", help="write both sides' normalised snapshots here (JSON)")
    args = p.parse_args()

    infra.PGID_FILE = args.pgid_file
    atexit.register(infra.stop_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))

    names = args.only or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")

    readme = Path(args.readme).read_text() if args.readme else compare.docs_text(HERE.parent.parent)
    allowed, complaints = compare.load_allowed(HERE / "allowed.yaml", readme)

    started = time.time()
    env = Env(args)
    results = {}
    slots = threading.Semaphore(args.parallel)

    rows = {}  # a multi-device scenario's table rows (one per role) and notes

    def work(name):
        with slots:
            if "multi" in SCENARIOS[name]:
                import multi

                pairs, notes = multi.run(env, name, SCENARIOS[name])
                results.update(pairs)
                rows[name] = (list(pairs), notes)
            else:
                results[name] = run_scenario(env, name, SCENARIOS[name])

    # daemon threads: a SIGTERM ends the harness at once (atexit stops the agents)
    threads = [threading.Thread(target=work, args=(name,), daemon=True) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    table_names = [row for n in names for row in rows.get(n, ([n], []))[0]]
    lines, failed, dump = compare.table(table_names, results, allowed)
    lines += [note for n in names for note in rows.get(n, ([], []))[1]]
    lines += complaints
    lines.append(f"elapsed: {time.time() - started:.0f} s; {'FAIL' if failed else 'OK'}"
                 f" ({failed} unexplained difference(s))")
    text = "\n".join(lines)
    print(text)
    if args.save_table:
        Path(args.save_table).write_text(text + "\n")
    if args.dump:
        dump["_requests"] = compare.raw_requests(results)
        Path(args.dump).write_text(json.dumps(dump, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
