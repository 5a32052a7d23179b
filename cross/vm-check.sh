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
#   --all       every target with a VM: aarch64, armv7 and riscv64 on qemu's
#               virt, ARMv6 on raspi0; ends with a table of all
#
# Kernels and busybox-static are Debian's packages (bookworm; trixie for
# riscv64), downloaded with a private apt state under target/vm/ (the
# host's apt is untouched); the agent and fake server are built by
# cross/build.sh and cargo zigbuild when missing. Needs qemu-system-arm
# (.ci/vm.sh installs it) and for riscv64 qemu-system-misc (with opensbi).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. cross/targets.sh

idle=60 deadline=900
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --idle) idle=${2:?}; shift ;;
    --deadline) deadline=${2:?}; shift ;;
    --all) targets=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf
                    riscv64gc-unknown-linux-musl arm-unknown-linux-musleabihf) ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "vm-check: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || { echo "usage: cross/vm-check.sh [--idle S] [--deadline S] [--all | TARGET...]" >&2; exit 2; }

work="$ROOT/target/vm"
mkdir -p "$work"

# fetch DEBARCH SUITE PKG...: download Debian packages of DEBARCH from SUITE
# into $work/deb-DEBARCH (a private apt state per architecture and suite).
fetch() {
  local debarch=$1 suite=$2; shift 2
  local d="$work/apt-$debarch-$suite"
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$work/deb-$debarch"
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$suite" > "$d/debian.sources"
  apt_opts=(-o "APT::Architecture=$debarch" -o "APT::Architectures::=$debarch"
            -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache"
            -o "Dir::Etc::sourcelist=$d/debian.sources" -o Dir::Etc::sourceparts=-)
  [ -n "$(ls "$d/lists" 2>/dev/null | grep Packages)" ] || apt-get "${apt_opts[@]}" update -qq
  (cd "$work/deb-$debarch" && apt-get "${apt_opts[@]}" download "$@" 2>&1 | grep -v unsandboxed || true)
}

run_target() {
  local t=$1 debarch suite=bookworm qemu machine=virt cpu console=ttyAMA0 flavour mem=512 dtb= append=
  local -a extra=()
  case "$t" in
    aarch64-*) debarch=arm64 qemu=qemu-system-aarch64 cpu=cortex-a57 flavour=arm64 ;;
    armv7-*)   debarch=armhf qemu=qemu-system-arm cpu=cortex-a7 flavour=armmp ;;
    # Debian 12 has no riscv64; trixie's kernel and busybox. OpenSBI (the
    # opensbi package qemu-system-riscv depends on) is the firmware.
    riscv64*)  debarch=riscv64 suite=trixie qemu=qemu-system-riscv64 cpu=rv64 console=ttyS0 flavour=riscv64
               extra=(-bios default) ;;
    # ARMv6: Debian armel's kernel for the Pi 1/Zero on qemu's Pi Zero, with
    # its DTB. qemu has no BCM2835 power-domain (ASB) registers: the power
    # driver's probe takes an external abort and kills init, so it is not
    # started (nothing here needs its USB power domain). earlycon: a kernel
    # that dies before the PL011 driver starts (as that probe did) says why.
    arm-*)     debarch=armel qemu=qemu-system-arm machine=raspi0 cpu=arm1176 flavour=rpi dtb=bcm2835-rpi-zero.dtb
               append="earlycon=pl011,0x20201000 initcall_blacklist=bcm2835_power_driver_init" ;;
    *) echo "vm-check: $t: no VM (x86_64 runs natively; see docs/cross.md#full-system-vm)" >&2; return 1 ;;
  esac
  command -v "$qemu" >/dev/null || { echo "vm-check: $qemu missing (apt-get install -t bookworm-backports qemu-system-arm qemu-system-misc)" >&2; return 1; }
  local agent="$ROOT/target/dist/testflinger-agent-$t"
  local fake="$ROOT/target/$t/release/examples/fake_server"
  [ -x "$agent" ] || bash cross/build.sh "$t"
  if [ ! -x "$fake" ]; then
    # As cross/build.sh: nightly and build-std where rustup has no std.
    local -a tc=() zflags=()
    if [[ " ${BUILD_STD_TARGETS[*]} " == *" $t "* ]]; then tc=("+$NIGHTLY"); zflags=(-Zbuild-std=std,panic_abort); fi
    env RUSTFLAGS="-C link-self-contained=no" \
      cargo "${tc[@]}" zigbuild --release --locked --target "$t" "${zflags[@]}" --example fake_server
  fi

  # The kernel the flavour's metapackage names in the suite, and busybox-static.
  local kpkg debs="$work/deb-$debarch"
  if ! ls "$debs"/linux-image-[0-9]*-"$flavour"_*.deb >/dev/null 2>&1 || ! ls "$debs"/busybox-static_*.deb >/dev/null 2>&1; then
    fetch "$debarch" "$suite" "linux-image-$flavour"
    kpkg=$(dpkg-deb -f "$debs"/linux-image-"$flavour"_*.deb Depends | grep -o "linux-image-[0-9][^ ,]*-$flavour" | head -n 1)
    fetch "$debarch" "$suite" "$kpkg" busybox-static
  fi
  local x="$work/x-$debarch"
  rm -rf "$x"; mkdir -p "$x"
  for deb in "$debs"/linux-image-[0-9]*-"$flavour"_*.deb "$debs"/busybox-static_*.deb; do dpkg-deb -x "$deb" "$x"; done
  local kernel
  kernel=$(ls "$x"/boot/vmlinu[xz]-* | sort -V | tail -n 1)

  # The initramfs: busybox and its applets, agent, fake server, cross/vm/.
  local r="$work/root-$t"
  rm -rf "$r"
  mkdir -p "$r"/{bin,sbin,etc/vm,proc,sys,dev,tmp,run,var}
  local bb=$x/bin/busybox
  [ -e "$bb" ] || bb=$x/usr/bin/busybox   # trixie's busybox-static is in /usr
  install -m 0755 "$bb" "$r/bin/busybox"
  install -m 0755 "$agent" "$r/bin/testflinger-agent"
  install -m 0755 "$fake" "$r/bin/fake_server"
  ln -s ../bin/busybox "$r/sbin/init"
  local qu; qu=$(qemu_of "$t")
  # shellcheck disable=SC2086 # $qu is words: program and -cpu option
  for applet in $($qu "$bb" --list); do
    [ -e "$r/bin/$applet" ] || ln -s busybox "$r/bin/$applet"
  done
  cp cross/vm/inittab "$r/etc/inittab"
  cp cross/vm/rcS cross/vm/check.sh cross/vm/agent-run cross/vm/stop-agent cross/vm/connector.sh cross/vm/agent.conf.in "$r/etc/vm/"
  printf 'root:x:0:0:root:/:/bin/sh\n' > "$r/etc/passwd"
  local initrd="$work/initrd-$t.gz"
  (cd "$r" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$initrd"

  local kver; kver=$(basename "$kernel"); kver=${kver#vmlinu[xz]-}
  echo "=== $t: kernel $kver (Debian linux-image-$kver), $qemu -M $machine -cpu $cpu, initramfs $(( $(stat -c %s "$initrd") / 1024 )) kB"
  [ -z "$dtb" ] || extra+=(-dtb "$(ls "$x"/usr/lib/linux-image-*/"$dtb" | sort -V | tail -n 1)")
  local log="$work/console-$t.log" start=$SECONDS rc=0
  timeout --kill-after=10 "$deadline" "$qemu" -M "$machine" -cpu "$cpu" -m "$mem" -smp 1 "${extra[@]}" \
    -nographic -no-reboot -nic none -kernel "$kernel" -initrd "$initrd" \
    -append "console=$console rdinit=/sbin/init panic=-1 loglevel=4 vmcheck.idle=$idle${append:+ $append}" \
    </dev/null > "$log" 2>&1 || rc=$?
  local secs=$((SECONDS - start)) clean info result
  clean=$(tr -d '\r' < "$log")
  grep '^VMCHECK' <<<"$clean" | sed 's/^VMCHECK /  /'
  info() { sed -n "s/^VMCHECK INFO $1 //p" <<<"$clean" | head -n 1; }
  local fails; fails=$(grep -c '^VMCHECK FAIL' <<<"$clean" || true)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result="no poweroff in $deadline s"
  elif ! grep -q '^VMCHECK END' <<<"$clean"; then
    result="ended (qemu $rc) without the end marker"
  elif [ "$fails" -gt 0 ]; then
    result="$fails check(s) failed"
  else
    result="$(grep -c '^VMCHECK PASS' <<<"$clean") checks pass"
  fi
  rows+=("$(printf '%-31s %-26s %-22s %8s %10s %-20s %5s' "$t" "$result" "$kver" \
    "$(info boot-to-first-poll)" "$(info idle-rss)" "$(info idle-cpu)" "$secs s")")
  if [[ "$result" != *"checks pass" ]]; then
    echo "vm-check: $t: FAILED, $result, VM run $secs s (console: $log)" >&2
    tail -n 20 "$log" >&2
    return 1
  fi
  echo "vm-check: $t: all checks passed, VM run $secs s (boot to poweroff, idle $idle s)"
}

status=0
rows=()
for t in "${targets[@]}"; do run_target "$t" || status=1; done
if [ ${#rows[@]} -gt 0 ]; then
  printf '\n%-31s %-26s %-22s %8s %10s %-20s %5s\n' target result kernel boot-poll idle-rss "idle CPU" run
  printf '%s\n' "${rows[@]}"
fi
exit "$status"
