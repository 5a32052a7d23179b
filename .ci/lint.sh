#!/usr/bin/env bash
# House style, enforced: the tree is formatted (rustfmt.toml says how) and
# clippy is clean on every target, warnings as errors (the crate-level lints
# in src/lib.rs and src/main.rs add unreachable_pub and narrowing casts).
# Also with the plain-HTTP build, whose cfg'd code clippy otherwise skips.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo fmt --check, cargo clippy -D warnings (.ci/lint.sh)"
start=$SECONDS
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --no-default-features -- -D warnings
echo "lint: clean ($((SECONDS - start)) s)"
