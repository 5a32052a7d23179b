#!/usr/bin/env bash
# The plain-HTTP build (`--no-default-features`: no TLS) must keep building
# and passing the whole test suite (TLS-only tests are compiled out).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
echo "== plain HTTP build (--no-default-features): tests"
cargo test --locked --no-default-features
echo "plain HTTP tests: passed ($(( $(date +%s) - start )) s)"
