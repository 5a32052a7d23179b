#!/usr/bin/env python3
"""List upstream's agent tests, or diff them against upstream-tests.md.

    python3 tests/upstream/upstream_tests.py [UPSTREAM]          # the names
    python3 tests/upstream/upstream_tests.py --diff [UPSTREAM]   # vs the table

UPSTREAM is a canonical/testflinger checkout (default: $UPSTREAM, else
../shared/upstream/testflinger). A name is `file::Class::test` or
`file::test`: every `def test*` at the top of agent/tests/test_*.py or one
level into a class (a parametrized test is one name). `--diff` prints the
names upstream has and the table lacks (`+`) and the other way (`-`), and
exits 1 if there are any. `cargo test --test it upstream_checklist` checks
the same and that every test of ours the table cites exists.
"""

import ast
import os
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent


def upstream_names(root: pathlib.Path) -> list:
    names = []
    for path in sorted((root / "agent" / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
            if isinstance(node, funcs) and node.name.startswith("test"):
                names.append(f"{path.name}::{node.name}")
            elif isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, funcs) and sub.name.startswith("test"):
                        names.append(f"{path.name}::{node.name}::{sub.name}")
    return names


def table_names() -> list:
    text = (HERE / "upstream-tests.md").read_text()
    return re.findall(r"^\| `(test_[^`]+)` \|", text, re.MULTILINE)


def main(argv: list) -> int:
    diff = "--diff" in argv
    args = [a for a in argv if a != "--diff"]
    default = os.environ.get("UPSTREAM") or HERE.parents[1] / ".." / "shared" / "upstream" / "testflinger"
    root = pathlib.Path(args[0] if args else default)
    names = upstream_names(root)
    if not diff:
        print("\n".join(names))
        return 0
    table = table_names()
    missing = [n for n in names if n not in table]
    extra = [n for n in table if n not in names]
    for n in missing:
        print(f"+ {n}")
    for n in extra:
        print(f"- {n}")
    return 1 if missing or extra else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
