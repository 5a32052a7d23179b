#!/usr/bin/env bash
# Dependency audit: every crate in Cargo.lock checked against the RustSec
# advisory database snapshot in ../shared/advisory-db (no network: the
# snapshot is refreshed by hand, see docs/testing.md). Fails on any
# vulnerability; warnings (unmaintained, yanked) are printed, not fatal.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
echo "== cargo audit (RustSec snapshot ../shared/advisory-db)"
if ! command -v cargo-audit >/dev/null 2>&1; then
  cargo install cargo-audit --locked
fi
cargo audit --version
cargo audit --db ../shared/advisory-db --no-fetch --stale --file Cargo.lock \
  || { echo "cargo audit: vulnerabilities found" >&2; exit 1; }
echo "cargo audit: clean ($(( $(date +%s) - start )) s)"
