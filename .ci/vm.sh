#!/usr/bin/env bash
# CI: the full-system VM check for aarch64 (cross/vm-check.sh): a real
# Debian arm64 kernel under qemu-system-aarch64 -M virt, the agent under
# busybox init against the fake server inside the VM. Idle CPU is measured
# over 10 s here (60 s by default) to keep CI short.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== full-system VM, aarch64 (.ci/vm.sh)"
start=$SECONDS
bash cross/install-deps.sh aarch64-unknown-linux-musl >/dev/null
if ! command -v qemu-system-aarch64 >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  suite=()
  if grep -qs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/*; then suite=(-t bookworm-backports); fi
  apt-get install -y -qq --no-install-recommends "${suite[@]}" qemu-system-arm >/dev/null
fi
qemu-system-aarch64 --version | head -n 1
bash cross/vm-check.sh --idle 10 --deadline 600 aarch64-unknown-linux-musl
echo "vm: $((SECONDS - start)) s"
