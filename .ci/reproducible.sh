#!/usr/bin/env bash
# CI: reproducible builds. Two clones of HEAD in different directories, each
# built by cross/build.sh as a different "user" (its own HOME, CARGO_HOME and
# zig cache) one after the other; the binaries must be bit-identical.
#
#   .ci/reproducible.sh [target...]    (default: x86_64-unknown-linux-musl)
#
# Prints one sha256 pair per target. The crates are copied from this user's
# CARGO_HOME (no download); rustup's toolchains stay shared (RUSTUP_HOME),
# which is one path fewer that could differ: cross/build.sh maps that one
# too. The check is on committed sources: uncommitted changes are not built.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl)
echo "== reproducible builds: ${targets[*]} built twice (.ci/reproducible.sh)"
start=$SECONDS
commit=$(git rev-parse HEAD)
src_cargo=${CARGO_HOME:-$HOME/.cargo}
export RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
work=$(mktemp -d /tmp/tf-repro.XXXXXX)
trap 'rm -rf "$work"' EXIT

declare -A sum
for n in 1 2; do
  # Different depths and names, so no path length or name lines up by chance.
  case $n in
    1) dir=$work/a/testflinger-agent ;;
    2) dir=$work/user-two/src/elsewhere/tf ;;
  esac
  home=$work/home$n
  mkdir -p "$home/.cargo/registry" "$(dirname "$dir")"
  git clone -q --no-hardlinks "$ROOT" "$dir"
  git -C "$dir" checkout -q --detach "$commit"
  for d in index cache; do
    [ -d "$src_cargo/registry/$d" ] && cp -a "$src_cargo/registry/$d" "$home/.cargo/registry/"
  done
  s=$SECONDS
  (cd "$dir" && env -u CARGO_TARGET_DIR -u RUSTFLAGS HOME="$home" CARGO_HOME="$home/.cargo" \
     XDG_CACHE_HOME="$home/.cache" bash cross/build.sh "${targets[@]}" >"$work/build$n.log" 2>&1) \
    || { cat "$work/build$n.log"; echo "reproducible: build $n failed" >&2; exit 1; }
  echo "build $n in $dir: $((SECONDS - s)) s"
  for t in "${targets[@]}"; do
    sum["$t $n"]=$(sha256sum "$dir/target/dist/testflinger-agent-$t" | cut -d' ' -f1)
  done
done

fail=0
for t in "${targets[@]}"; do
  a=${sum["$t 1"]} b=${sum["$t 2"]}
  if [ "$a" = "$b" ]; then verdict=identical; else verdict=DIFFERENT; fail=1; fi
  printf '%-31s %s %s %s\n' "$t" "$a" "$b" "$verdict"
done
echo "reproducible: commit $commit, $((SECONDS - start)) s"
[ "$fail" = 0 ] || { echo "reproducible: the two builds differ" >&2; exit 1; }
