#!/usr/bin/env bash
# CI: the minimal-image proof (cross/minimal-image.sh) for x86_64 and, with
# the target's busybox and qemu-user via a private binfmt_misc, for aarch64:
# a real job against the fake server in a root holding only the static
# agent, a static busybox and /etc/passwd. Uses the TLS binaries that
# .ci/cross.sh built (builds them if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== minimal-image proof, x86_64 and aarch64 (.ci/minimal-image.sh)"
start=$SECONDS
bash cross/install-deps.sh x86_64-unknown-linux-musl aarch64-unknown-linux-musl >/dev/null
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  s=$SECONDS
  [ -x "target/dist/testflinger-agent-$t" ] || bash cross/build.sh "$t"
  bash cross/minimal-image.sh "$t"
  echo "minimal-image $t: $((SECONDS - s)) s"
done
echo "minimal-image: $((SECONDS - start)) s"
