#!/usr/bin/env bash
# Full-system VM check: boots a real Linux kernel for the target under
# qemu-system-* with an initramfs holding only the static agent, a static
# busybox, the static fake server (examples/fake_server.rs) and the files in
# cross/vm/; busybox init runs the agent as a respawned service against the
# fake server on the VM's 127.0.0.1 (no network device: nothing leaves the
# VM), and cross/vm/check.sh runs real jobs: every phase, live output, an
# artifact, a global timeout killing a setsid daemon, a cancel, kill -9 with
# the respawned agent recovering the job, and SIGTERM at poweroff (init's
# shutdown action). Results come back as VMCHECK lines on the serial console.
#
#   cross/vm-check.sh [--idle SECONDS] [--deadline SECONDS] [--all | TARGET...]
#
#   --idle      how long the idle agent's CPU time is measured (default 60;
#               CI passes less to save time, the figure says over how long)
#   --deadline  seconds for one whole VM run, boot to poweroff (default 900);
#               past it qemu is killed and the target fails
#   --all       every target with a VM here: aarch64, armv7 (riscv64 and
#               ARMv6 have none; see README)
#
# Kernels and busybox-static are Debian bookworm's packages (downloaded with
# a private apt state under target/vm/, the host's apt is untouched); the
# agent and fake server are built by cross/build.sh and cargo zigbuild when
# missing. Needs qemu-system-arm (.ci/vm.sh installs it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

idle=60 deadline=900
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --idle) idle=${2:?}; shift ;;
    --deadline) deadline=${2:?}; shift ;;
    --all) targets=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf) ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "vm-check: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || { echo "usage: cross/vm-check.sh [--idle S] [--deadline S] [--all | TARGET...]" >&2; exit 2; }

work="$ROOT/target/vm"
mkdir -p "$work"

# fetch DEBARCH PKG...: download Debian packages of DEBARCH into $work/deb-DEBARCH.
fetch() {
  local debarch=$1; shift
  local d="$work/apt-$debarch" codename
  codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$work/deb-$debarch"
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "${codename:-bookworm}" > "$d/debian.sources"
  apt_opts=(-o "APT::Architecture=$debarch" -o "APT::Architectures::=$debarch"
            -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache"
            -o "Dir::Etc::sourcelist=$d/debian.sources" -o Dir::Etc::sourceparts=-)
  [ -n "$(ls "$d/lists" 2>/dev/null | grep Packages)" ] || apt-get "${apt_opts[@]}" update -qq
  (cd "$work/deb-$debarch" && apt-get "${apt_opts[@]}" download "$@" 2>&1 | grep -v unsandboxed || true)
}

run_target() {
  local t=$1 debarch qemu machine cpu console flavour
  case "$t" in
    aarch64-*) debarch=arm64 qemu=qemu-system-aarch64 machine=virt cpu=cortex-a57 console=ttyAMA0 flavour=arm64 ;;
    armv7-*)   debarch=armhf qemu=qemu-system-arm machine=virt cpu=cortex-a7 console=ttyAMA0 flavour=armmp ;;
    *) echo "vm-check: $t: no VM (see README: riscv64 has no kernel in Debian 12's main archive, ARMv6 no machine Debian's kernels boot)" >&2; return 1 ;;
  esac
  command -v "$qemu" >/dev/null || { echo "vm-check: $qemu missing (apt-get install qemu-system-arm)" >&2; return 1; }
  local agent="$ROOT/target/dist/testflinger-agent-$t"
  local fake="$ROOT/target/$t/release/examples/fake_server"
  [ -x "$agent" ] || bash cross/build.sh "$t"
  [ -x "$fake" ] || env RUSTFLAGS="-C link-self-contained=no" \
      cargo zigbuild --release --locked --target "$t" --example fake_server

  # The newest 6.1 kernel of the flavour in bookworm, and busybox-static.
  local kpkg debs="$work/deb-$debarch"
  if ! ls "$debs"/linux-image-6.1.0-*-"$flavour"_*.deb >/dev/null 2>&1 || ! ls "$debs"/busybox-static_*.deb >/dev/null 2>&1; then
    fetch "$debarch" "linux-image-$flavour"   # the metapackage names the kernel
    kpkg=$(dpkg-deb -f "$debs"/linux-image-"$flavour"_*.deb Depends | grep -o "linux-image-6[^ ,]*-$flavour" | head -n 1)
    fetch "$debarch" "$kpkg" busybox-static
  fi
  local x="$work/x-$debarch"
  rm -rf "$x"; mkdir -p "$x"
  for deb in "$debs"/linux-image-6.1.0-*-"$flavour"_*.deb "$debs"/busybox-static_*.deb; do dpkg-deb -x "$deb" "$x"; done
  local kernel
  kernel=$(ls "$x"/boot/vmlinuz-* | sort -V | tail -n 1)

  # The initramfs: busybox and its applets, agent, fake server, cross/vm/.
  local r="$work/root-$t"
  rm -rf "$r"
  mkdir -p "$r"/{bin,sbin,etc/vm,proc,sys,dev,tmp,run,var}
  install -m 0755 "$x/bin/busybox" "$r/bin/busybox"
  install -m 0755 "$agent" "$r/bin/testflinger-agent"
  install -m 0755 "$fake" "$r/bin/fake_server"
  ln -s ../bin/busybox "$r/sbin/init"
  local qu; qu=$(. cross/targets.sh; qemu_of "$t")
  # shellcheck disable=SC2086 # $qu is words: program and -cpu option
  for applet in $($qu "$x/bin/busybox" --list); do
    [ -e "$r/bin/$applet" ] || ln -s busybox "$r/bin/$applet"
  done
  cp cross/vm/inittab "$r/etc/inittab"
  cp cross/vm/rcS cross/vm/check.sh cross/vm/agent-run cross/vm/stop-agent cross/vm/connector.sh cross/vm/agent.conf.in "$r/etc/vm/"
  printf 'root:x:0:0:root:/:/bin/sh\n' > "$r/etc/passwd"
  local initrd="$work/initrd-$t.gz"
  (cd "$r" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$initrd"

  local kver; kver=$(basename "$kernel"); kver=${kver#vmlinuz-}
  echo "=== $t: kernel $kver (Debian linux-image-$kver), $qemu -M $machine -cpu $cpu, initramfs $(( $(stat -c %s "$initrd") / 1024 )) kB"
  local log="$work/console-$t.log" start=$SECONDS rc=0
  timeout --kill-after=10 "$deadline" "$qemu" -M "$machine" -cpu "$cpu" -m 512 -smp 1 \
    -nographic -no-reboot -nic none -kernel "$kernel" -initrd "$initrd" \
    -append "console=$console rdinit=/sbin/init panic=-1 loglevel=4 vmcheck.idle=$idle" \
    </dev/null > "$log" 2>&1 || rc=$?
  local secs=$((SECONDS - start))
  tr -d '\r' < "$log" | grep '^VMCHECK' | sed 's/^VMCHECK /  /'
  local fails; fails=$(tr -d '\r' < "$log" | grep -c '^VMCHECK FAIL' || true)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "vm-check: $t: FAILED, the VM did not power off within the deadline of $deadline s (console: $log)" >&2
    tail -n 20 "$log" >&2
    return 1
  fi
  if ! tr -d '\r' < "$log" | grep -q '^VMCHECK END'; then
    echo "vm-check: $t: FAILED, the VM ended (qemu status $rc) without the end marker (console: $log)" >&2
    tail -n 20 "$log" >&2
    return 1
  fi
  if [ "$fails" -gt 0 ]; then
    echo "vm-check: $t: FAILED, $fails check(s) failed in $secs s (console: $log)" >&2
    return 1
  fi
  echo "vm-check: $t: all checks passed, VM run $secs s (boot to poweroff, idle $idle s)"
}

status=0
for t in "${targets[@]}"; do run_target "$t" || status=1; done
exit "$status"
