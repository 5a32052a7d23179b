"""Normalise two snapshots of what the server holds, list their differences,
and sort each into allowed (allowed.yaml says why) or unexplained."""

import difflib
import fnmatch
import json
import re
from pathlib import Path

import yaml

PHASES = ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"]
SHORT = {"setup": "s", "provision": "p", "firmware_update": "f", "test": "t",
         "allocate": "a", "reserve": "r", "cleanup": "c"}

TIMESTAMP = re.compile(
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?"
    r"|\b\d\d-\d\d-\d\d \d\d:\d\d:\d\d\b"
)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def docs_text(root):
    """README.md and every docs/*.md of the checkout at `root`, one after
    another: the documented differences live in docs/differences.md, and a
    `readme:` phrase may be cited from any of them."""
    root = Path(root)
    parts = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    return "\n".join(p.read_text() for p in parts if p.is_file())


def load_allowed(path, readme_text):
    """The allow-list. An entry citing the docs (`readme: phrase`) only
    counts while the docs' text (`docs_text`: the README and docs/*.md)
    holds that phrase, so the list cannot drift from the documented
    differences; the others are upstream quirks we do not copy, each with
    its reason. Returns (entries, complaints)."""
    with open(path) as f:
        entries = yaml.safe_load(f) or []
    usable, complaints = [], []
    for e in entries:
        if not {"scenario", "field", "reason"} <= set(e) or ("readme" in e) == (e.get("kind") == "upstream-quirk"):
            raise ValueError(f"{path}: entry needs scenario, field, reason and either readme or kind: upstream-quirk: {e}")
        if "readme" in e and e["readme"] not in readme_text:
            complaints.append(f"allowed.yaml: neither README.md nor docs/ (yet) says {e['readme']!r}; not applied: {e['reason']}")
            continue
        usable.append(e)
    return usable, complaints


def normaliser(snap):
    """A function making a string comparable across the two sides."""
    pairs = [(snap["job_id"], "<JOB>"), (snap["workdir"], "<DIR>"), (snap["tag"], "<AGENT>")]
    pairs += [(url, "<SERVER>") for url in snap["server"]]
    # a multi-device run's other agents (tag, placeholder)
    pairs += [tuple(a) for a in snap.get("aliases", [])]

    def norm(text):
        for old, new in pairs:
            text = text.replace(old, new)
        text = TIMESTAMP.sub("<TS>", text)
        text = UUID.sub("<UUID>", text)
        return text

    return norm


def deep(value, norm):
    if isinstance(value, str):
        return norm(value)
    if isinstance(value, dict):
        return {k: deep(v, norm) for k, v in value.items()}
    if isinstance(value, list):
        return [deep(v, norm) for v in value]
    return value


# Lines the agent itself writes into a phase's output when it stops a phase.
NOTICE = re.compile(
    r"^(ERROR: (Global|Output) timeout reached!.*"
    r"|Job cancellation was requested, exiting\."
    r"|The \w+ command was killed by signal \d+.*)$"
)


def split_output(text):
    """(what the phase printed, the agent's notices). Blank lines go: where
    the two agents put them depends on how output was chunked."""
    lines = [l for l in text.splitlines() if l.strip()]
    return (
        "\n".join(l for l in lines if not NOTICE.match(l)) + "\n",
        [l for l in lines if NOTICE.match(l)],
    )


def result_post(body):
    """A POST /v1/result body with phase exit codes as 0 / "nonzero": the
    final codes are compared once, in `results.<phase>_status`."""
    if isinstance(body, dict) and isinstance(body.get("status"), dict):
        body = dict(body, status={k: 0 if v == 0 else "nonzero" for k, v in body["status"].items()})
    return body


def collapse(items):
    """Consecutive repeats are polling noise, not behaviour."""
    out = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


def normalise(snap):
    norm = normaliser(snap)
    drop_agent = {"_id", "updated_at", "name", "log"}
    events = [f"{e.get('event_name')}: {e.get('detail', '')}" for e in snap["events"]]
    posts = [p for p in snap["agent_posts"] if isinstance(p, dict)]
    results_posted = [result_post(p) for p in snap["result_posts"]]
    outcome = next((p for p in reversed(results_posted) if isinstance(p, dict) and "status" in p and "job_state" in p), None)
    # phase output is compared once, from `poll` (`results` holds the same)
    results = {k: v for k, v in snap["results"].items() if not k.endswith("_output")}
    logs, notices = {}, {}
    for phase, raw in snap["logs"].items():
        text, notes = split_output(raw)
        if text.strip():
            logs[phase] = text
        if notes:
            notices[phase] = notes
    return deep({
        "results": results,
        "logs": logs,
        "notices": notices,
        "artifacts": sorted(json.dumps(m, sort_keys=True) for m in snap["artifacts"]),
        "job_state_history": collapse(snap["job_state_history"]),
        "refused": collapse(snap["refused"]),
        # the final outcome apart from the posts before it
        "outcome_post": outcome,
        "result_posts": collapse([json.dumps(p, sort_keys=True) for p in results_posted if p is not outcome]),
        "events": events,
        # agent data as a dashboard sees it: the states (with comments) in
        # order, the job ids in order, and which fields were ever posted (how
        # the fields are grouped into posts is not compared)
        "agent_states": collapse([f"{p['state']} ({p.get('comment', '<no comment>')})" for p in posts if "state" in p]),
        "agent_job_ids": collapse([p["job_id"] for p in posts if "job_id" in p]),
        "agent_fields": sorted({k for p in posts for k in p if k != "updated_at"}),
        "agent_final": {k: v for k, v in snap["agent_final"].items() if k not in drop_agent},
        "provision_logs": [
            {k: v for k, v in e.items() if k != "timestamp"} for e in snap["provision_logs"]
        ],
        "observed": snap["observed"],
    }, norm)


def text_diff(a, b):
    """The first three lines that differ (line by line), or what one side has more."""
    al, bl = a.splitlines(), b.splitlines()
    out = [
        f"line {i + 1}: ours {x!r} / upstream {y!r}"
        for i, (x, y) in enumerate(zip(al, bl)) if x != y
    ]
    if len(al) != len(bl):
        longer, who = (al, "ours") if len(al) > len(bl) else (bl, "upstream")
        extra = longer[min(len(al), len(bl)):]
        out.append(f"only {who} has {len(extra)} more line(s), first {extra[0]!r}")
    return "; ".join(out[:3]) + (f"; … {len(out) - 3} more" if len(out) > 3 else "") or "whitespace only"


def list_diff(a, b):
    lines = [
        line for line in difflib.unified_diff(a, b, "ours", "upstream", lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("---", "+++"))
    ]
    shown = "; ".join(("ours " if l[0] == "-" else "upstream ") + l[1:] for l in lines[:6])
    return shown + (f"; … {len(lines) - 6} more" if len(lines) > 6 else "")


def differences(ours, upstream):
    """[(field, description)] for everything that differs."""
    out = []

    def walk(path, a, b):
        if a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if k not in a:
                    out.append((f"{path}.{k}", f"only upstream: {short(b[k])}"))
                elif k not in b:
                    out.append((f"{path}.{k}", f"only ours: {short(a[k])}"))
                else:
                    walk(f"{path}.{k}", a[k], b[k])
        elif isinstance(a, str) and isinstance(b, str) and ("\n" in a or "\n" in b):
            out.append((path, text_diff(a, b)))
        elif isinstance(a, list) and isinstance(b, list):
            out.append((path, list_diff([short(x, 300) for x in a], [short(x, 300) for x in b])))
        else:
            out.append((path, f"ours {short(a)} / upstream {short(b)}"))

    for key in ours:
        walk(key, ours[key], upstream[key])
    return out


def short(v, n=120):
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"


def summary(snap):
    if snap is None:
        return "no snapshot"
    r = snap["results"]
    phases = " ".join(f"{SHORT[p]}={r[p + '_status']}" for p in PHASES if f"{p}_status" in r)
    return f"{r.get('job_state', '?')} {phases}".strip()


def reason_for(allowed, scenario, field, desc):
    for e in allowed:
        if (fnmatch.fnmatchcase(scenario, e["scenario"]) and fnmatch.fnmatchcase(field, e["field"])
                and re.search(e.get("match", ""), desc)):
            kind = "README" if "readme" in e else "upstream quirk"
            return f"{kind}: {e['reason']}"
    return None


def table(names, results, allowed):
    """Lines of the table, the count of unexplained differences, and the
    normalised snapshots (for --dump)."""
    lines, failed, dump = [], 0, {}
    width = max(len(n) for n in names)
    lines.append(f"{'scenario':<{width}}  {'ours':<34}  {'upstream':<34}  verdict")
    for name in names:
        runs = results.get(name)
        ours, up = runs["ours"], runs["upstream"]
        diffs = []
        if ours.snapshot and up.snapshot:
            a, b = normalise(ours.snapshot), normalise(up.snapshot)
            dump[name] = {"ours": a, "upstream": b}
            diffs = differences(a, b)
        for side in (ours, up):
            if side.error:
                diffs.append((f"run.{side.side}", side.error))
        marked = []
        bad = 0
        for field, desc in diffs:
            why = None if field.startswith("run.") else reason_for(allowed, name, field, desc)
            if why is None:
                bad += 1
            marked.append((field, desc, why))
        failed += bad
        verdict = "FAIL" if bad else "ok"
        if marked:
            verdict += f" ({len(marked)} diff, {len(marked) - bad} allowed)"
        lines.append(f"{name:<{width}}  {summary(ours.snapshot):<34}  {summary(up.snapshot):<34}  {verdict}")
        for field, desc, why in marked:
            tag = f"allowed: {why}" if why else "UNEXPLAINED"
            lines.append(f"    {field}: {desc}  [{tag}]")
    return lines, failed, dump


def raw_requests(results):
    """Every request of each run, for reading after a failure."""
    return {
        name: {side: run.snapshot.get("requests") if run.snapshot else None for side, run in runs.items()}
        for name, runs in results.items()
    }
