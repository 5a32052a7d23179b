# Shared by the scripts in cross/ (sourced, not run): what each release
# target needs from the host.

# The glibc target built with +crt-static where rustup cannot fetch the
# musl standard library for a target.
fallback_of() {
  case "$1" in
    aarch64-unknown-linux-musl)     echo aarch64-unknown-linux-gnu ;;
    armv7-unknown-linux-musleabihf) echo armv7-unknown-linux-gnueabihf ;;
    riscv64gc-unknown-linux-musl)   echo riscv64gc-unknown-linux-gnu ;;
  esac
}
