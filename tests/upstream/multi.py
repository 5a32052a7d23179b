"""Multi-device scenarios (issue 22): a parent job on an agent whose phase
commands are the real `multi` device connector, which submits one child job
per entry of `provision_data.jobs` (with `allocate_data` and
`parent_job_id`) to other agents and waits until each is `allocated`; the
children run the real fake connector, whose `allocate` exits 1.

A scenario names who runs the parent and each child ("ours" or
"upstream"). Its mix runs next to a reference where upstream runs every
role, and each role (parent, child1, child2) is compared with the same role
of the reference, as a one-agent scenario compares ours with upstream.
"""

import time

import conformance

CONNECTOR = "testflinger-device-connector"
IMAGE = "http://example.com/image.img.xz"
SHORT_ROLE = {"parent": "p", "child1": "c1", "child2": "c2"}


class RoleRun(conformance.Run):
    """One agent of a multi-device run: `kind` says whose agent runs it;
    `slot` ("ours": the mix, "upstream": the reference) names the tag."""

    def __init__(self, env, name, role, kind, slot, devconf, commands):
        self.env, self.name, self.role, self.side = env, name, role, kind
        # same length in both slots: the banner's width depends on the name
        self.tag = f"{'mix' if slot == 'ours' else 'ref'}-{name}-{SHORT_ROLE[role]}".replace("_", "-")
        self.dir = env.work / self.tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proxy = conformance.infra.Proxy(env.server.port)
        self.spec = {"devconf": devconf, "commands": commands}
        self.job_id = None
        self.observed = {}
        self.error = None
        self.snapshot = None
        self.proc = None


class MultiRun:
    """One mix: the parent, its two children and the parent's job."""

    def __init__(self, env, name, spec, slot):
        self.env, self.name, self.spec, self.slot = env, name, spec, slot
        kinds = spec["multi"] if slot == "ours" else {r: "upstream" for r in spec["multi"]}
        conf = lambda run: f"{CONNECTOR} {{kind}} {{stage}} -c {run.dir / 'device.yaml'} testflinger.json"  # noqa: E731
        self.roles = {}
        for role in ("parent", "child1", "child2"):
            is_parent = role == "parent"
            run = RoleRun(env, name, role, kinds[role], slot, {}, {})
            c = conf(run)
            if is_parent:
                run.spec["devconf"] = {"testflinger_server": env.server.url}
                run.spec["commands"] = {
                    "provision_command": c.format(kind="multi", stage="provision"),
                    "test_command": c.format(kind="multi", stage="runtest"),
                    "cleanup_command": c.format(kind="multi", stage="cleanup"),
                }
            else:
                run.spec["commands"] = {"allocate_command": c.format(kind="fake_connector", stage="allocate")}
            self.roles[role] = run
        self.error = None
        self.cancelled_at = None
        self.released = {}

    @property
    def parent(self):
        return self.roles["parent"]

    def children(self):
        return [self.roles["child1"], self.roles["child2"]]

    def parent_job(self):
        hook = f"{self.env.webhook.url}/hook/"
        jobs = [
            {"job_queue": c.tag, "job_status_webhook": hook + c.tag, "provision_data": {"url": IMAGE}}
            for c in self.children()
        ]
        return {
            "job_queue": self.parent.tag,
            "job_status_webhook": hook + self.parent.tag,
            "provision_data": {"jobs": jobs},
            "test_data": {"test_cmds": self.spec["test_cmds"]},
        }

    def find_child_jobs(self):
        """The child jobs the connector submitted, by their queue."""
        with self.env.server.lock:
            docs = list(self.env.server.db.jobs.find({"job_data.parent_job_id": self.parent.job_id}))
        for doc in docs:
            for c in self.children():
                if doc["job_data"].get("job_queue") == c.tag:
                    c.job_id = doc["job_id"]
        return all(c.job_id for c in self.children())

    def execute(self):
        runs = list(self.roles.values())
        try:
            for run in runs:
                run.write_configs()
                run.start_agent()
            p = self.parent
            p.spec["job"] = self.parent_job()
            p.submit()
            p.wait(self.find_child_jobs, 120, "the connector to submit the child jobs")
            if self.spec.get("cancel"):
                self.cancel_while_held()
            deadline = time.time() + conformance.SCENARIO_DEADLINE
            for run in runs:
                try:
                    run.wait(run.finished, max(1, deadline - time.time()), "the job to finish and the agent to idle")
                except TimeoutError as error:
                    run.error = str(error)
            time.sleep(3)  # trailing posts
            for run in runs:
                run.snapshot = run.take_snapshot()
                run.snapshot["aliases"] = [(r.tag, f"<{r.role.upper()}>") for r in runs]
        except Exception as error:  # report, keep the other runs going
            self.error = f"{type(error).__name__}: {error}"
            conformance.traceback.print_exc()
            for run in runs:
                run.error = run.error or self.error
                if run.job_id and run.snapshot is None:
                    try:
                        run.snapshot = run.take_snapshot()
                        run.snapshot["aliases"] = [(r.tag, f"<{r.role.upper()}>") for r in runs]
                    except Exception:
                        conformance.traceback.print_exc()
        finally:
            for run in runs:
                if run.proc:
                    conformance.infra.stop(run.proc)
                run.proxy.down()

    def cancel_while_held(self):
        """Cancels the parent once both children hold and its test runs;
        notes when each child was released: its first post after the
        cancel (the hold posts nothing; the parent's cleanup cancelling the
        child is not the child's)."""
        p = self.parent
        for c in self.children():
            c.wait(lambda c=c: c.job_state() == "allocated", 180, "the child to hold")
        p.wait_job_state("test", 180)
        p.wait_output("test", "test started")
        self.cancelled_at = time.time()
        p.cli("cancel", p.job_id)
        for c in self.children():
            def posted(c=c):
                return any(
                    t > self.cancelled_at and c.job_id in path and not path.endswith("/action")
                    for t, _, path, _, _ in self.env.server.recorder.select("POST")
                )
            c.wait(posted, 120, "the child's first post after the parent's cancel")
            t = min(
                t for t, _, path, _, _ in self.env.server.recorder.select("POST")
                if t > self.cancelled_at and c.job_id in path and not path.endswith("/action")
            )
            self.released[c.role] = t - self.cancelled_at


def run(env, name, spec):
    """The mix and its all-upstream reference, at the same time; returns
    one pair of runs per role, named `<scenario>/<role>:<mix's kind>`, and
    the release lines for the table."""
    import threading

    mixes = {slot: MultiRun(env, name, spec, slot) for slot in ("ours", "upstream")}
    threads = [threading.Thread(target=m.execute, daemon=True) for m in mixes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pairs = {}
    for role in ("parent", "child1", "child2"):
        kind = spec["multi"][role]
        pairs[f"{name}/{role}:{'ours' if kind == 'ours' else 'upst'}"] = {
            "ours": mixes["ours"].roles[role], "upstream": mixes["upstream"].roles[role],
        }
    notes = []
    for slot, m in mixes.items():
        if m.released:
            who = "mix" if slot == "ours" else "reference (all upstream)"
            parts = [
                f"{role} ({m.roles[role].side}) {secs:.1f} s" for role, secs in sorted(m.released.items())
            ]
            notes.append(f"    {name} {who}: children released after the parent's cancel: {', '.join(parts)}")
    return pairs, notes
