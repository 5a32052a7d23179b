# Shared by the scripts in cross/ (sourced, not run): the release targets
# and what each needs from the host.

# The five release targets, all musl, static.
RELEASE_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl
                 armv7-unknown-linux-musleabihf arm-unknown-linux-musleabihf
                 riscv64gc-unknown-linux-musl)

# Targets whose standard library build.sh always builds from source (nightly
# -Zbuild-std), even where rustup has it: the mirror here has none for them,
# and a CI runner that has one must still build the same bytes.
BUILD_STD_TARGETS=(armv7-unknown-linux-musleabihf arm-unknown-linux-musleabihf
                   riscv64gc-unknown-linux-musl)
# The nightly for build-std: a dated one (CI) makes the build repeatable.
NIGHTLY=${TF_NIGHTLY:-nightly}

# Size budgets in bytes for a stripped release binary, every target.
BUDGET_TLS=3000000
BUDGET_PLAIN=1500000

# The glibc target built with +crt-static by `build.sh --glibc-static`, and
# the Debian cross gcc that compiles and links it. None for ARMv6: Debian's
# armhf gcc and glibc are built for ARMv7 and would not run on a Pi 1/Zero.
fallback_of() {
  case "$1" in
    aarch64-unknown-linux-musl)     echo aarch64-unknown-linux-gnu ;;
    armv7-unknown-linux-musleabihf) echo armv7-unknown-linux-gnueabihf ;;
    riscv64gc-unknown-linux-musl)   echo riscv64gc-unknown-linux-gnu ;;
  esac
}
gcc_prefix() {
  case "$1" in
    aarch64-*) echo aarch64-linux-gnu ;;
    armv7-*)   echo arm-linux-gnueabihf ;;
    riscv64*)  echo riscv64-linux-gnu ;;
  esac
}

# qemu-user command (with CPU model) that runs a binary of the triple; empty
# for x86_64, which runs natively. The CPU models are the oldest cores the
# target promises, so an instruction too new for the boards traps here:
# ARMv6 = the Raspberry Pi 1/Zero's ARM1176, ARMv7 = Cortex-A7 (Pi 2).
qemu_of() {
  case "$1" in
    x86_64-*)  echo "" ;;
    aarch64-*) echo "qemu-aarch64-static" ;;
    armv7-*)   echo "qemu-arm-static -cpu cortex-a7" ;;
    arm-*)     echo "qemu-arm-static -cpu arm1176" ;;
    riscv64*)  echo "qemu-riscv64-static" ;;
    *) return 1 ;;
  esac
}
