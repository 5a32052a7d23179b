#!/usr/bin/env bash
# The minimal-image proof: a root file system holding only the static agent,
# a static busybox (Debian busybox-static, for the phase commands) and
# /etc/passwd, in which a real job runs against the fake server (the ignored
# test tests/it/minimal_image.rs: phases, output, artifacts, a clean exit).
#
#   cross/minimal-image.sh [--no-tls] <target>
#
# The job runs in `unshare --user --map-root-user --mount` + chroot: no libc,
# no CA store, no shell or Python of the host is reachable. Mounted into the
# root, as a booted board's kernel and init would: /proc, /dev/null and the
# test's /tmp (its config and run dirs, which the test reads).
#
# A foreign target (aarch64 ...) runs through a private binfmt_misc instance
# of that user namespace (Linux >= 6.7) that hands every binary of the
# target's architecture to qemu-user, opened at registration (flag F), so the
# agent AND the busybox it runs for each phase are the target's. (qemu's -L
# prefix alone would not do: qemu does not remap execve, so the phases would
# run the host's /bin/sh.) Needs target/dist/testflinger-agent-<target>
# (cross/build.sh) and fetches busybox-static for the target's Debian
# architecture with a private apt state (the host's apt config is untouched).
set -euo pipefail
# shellcheck source=cross/targets.sh
. "$(dirname "$0")/targets.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

suffix=""
if [ "${1:-}" = --no-tls ]; then suffix=-notls; shift; fi
target=${1:?usage: cross/minimal-image.sh [--no-tls] <target>}

# Debian architecture, `uname -m` inside the image, binfmt magic and mask.
case "$target" in
  x86_64-*)  debarch=amd64 arch=x86_64 magic="" mask="" ;;
  aarch64-*) debarch=arm64 arch=aarch64
             magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
             mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' ;;
  armv7-*|arm-*) debarch=armhf arch=armv7l
             magic='\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00'
             mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' ;;
  riscv64*)  debarch=riscv64 arch=riscv64
             magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xf3\x00'
             mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' ;;
  *) echo "minimal-image: unknown target $target" >&2; exit 2 ;;
esac
qemu=$(qemu_of "$target")
if [ "$arch" = armv7l ] && [ "$target" = arm-unknown-linux-musleabihf ]; then arch=armv6l; fi

bin="$ROOT/target/dist/testflinger-agent-$target$suffix"
[ -x "$bin" ] || { echo "minimal-image: $bin not built (cross/build.sh ${suffix:+--no-tls }$target)" >&2; exit 1; }
work="$ROOT/target/minimal-image"
img="$work/$target$suffix"
mkdir -p "$work"

# busybox-static for the target's architecture.
if [ "$debarch" = amd64 ] && [ "$(dpkg --print-architecture)" = amd64 ]; then
  [ -x /bin/busybox ] || { echo "minimal-image: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }
  busybox=/bin/busybox
else
  apt_dir="$work/apt-$debarch"
  busybox="$apt_dir/busybox"
  if [ ! -x "$busybox" ]; then
    codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/deb"
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$codename" > "$apt_dir/debian.sources"
    apt_opts=(-o "APT::Architecture=$debarch" -o "APT::Architectures::=$debarch"
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
              -o "Dir::Etc::sourcelist=$apt_dir/debian.sources" -o Dir::Etc::sourceparts=-)
    echo "minimal-image: fetching busybox-static:$debarch ($codename main, private apt state in $apt_dir)"
    apt-get "${apt_opts[@]}" update -qq
    (cd "$apt_dir/deb" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download "busybox-static:$debarch" 2>&1 | grep -v unsandboxed || true)
    dpkg-deb -x "$apt_dir"/deb/busybox-static_*.deb "$apt_dir/x"
    cp "$apt_dir/x/bin/busybox" "$busybox"
  fi
fi

# The root: nothing but these.
rm -rf "$img"
mkdir -p "$img/root/bin" "$img/root/etc" "$img/root/tmp" "$img/root/proc" "$img/root/dev"
r="$img/root"
install -m 0755 "$bin" "$r/bin/testflinger-agent"
install -m 0755 "$busybox" "$r/bin/busybox"
# shellcheck disable=SC2086 # $qemu is words: program and -cpu option
for applet in $($qemu "$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$r/bin/$applet"
done
printf 'root:x:0:0:root:/:/bin/sh\n' > "$r/etc/passwd"
: > "$r/dev/null"

interp=""
if [ -n "$qemu" ]; then
  interp=$(command -v "${qemu%% *}")
  "$interp" --version | head -1
fi

# The wrapper the test harness runs the agent through (TF_AGENT_WRAPPER):
# the agent's pid stays the harness's child (every step execs).
enter="$img/enter"
cat > "$enter" <<EOF
#!/bin/sh
# Generated by cross/minimal-image.sh: run "\$@" chrooted in $r.
exec unshare --user --map-root-user --mount -- /bin/sh -c '
  set -e
  r=\$0
  mount --rbind /proc "\$r/proc"
  mount --bind /dev/null "\$r/dev/null"
  mount --bind /tmp "\$r/tmp"
  if [ -n "$interp" ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    echo ":tf-$arch:M::$magic:$mask:$interp:FP" > /proc/sys/fs/binfmt_misc/register
  fi
  exec chroot "\$r" "\$@"' "$r" "\$@"
EOF
chmod +x "$enter"

echo "minimal-image: the root file system ($(du -sk "$r" | cut -f1) kB):"
(cd "$r" && find . -path ./bin -prune -o -print | sort | sed 's/^/  /'; echo "  ./bin: testflinger-agent, busybox and $(find bin -type l | wc -l) busybox applet links")
file -b "$r/bin/testflinger-agent" | sed 's/^/  agent:   /'
file -b "$r/bin/busybox" | sed 's/^/  busybox: /'

echo "minimal-image: TF_AGENT_BIN=/bin/testflinger-agent TF_AGENT_WRAPPER=$enter cargo test --test it minimal_image_job -- --ignored"
env -u TMPDIR TF_AGENT_BIN=/bin/testflinger-agent TF_AGENT_WRAPPER="$enter" TF_IMAGE_ARCH="$arch" \
  cargo test --locked --test it minimal_image_job -- --ignored --exact minimal_image::minimal_image_job --nocapture --test-threads 1
echo "minimal-image: OK $target$suffix: a real job ran in a root with only the agent, busybox and /etc/passwd"
