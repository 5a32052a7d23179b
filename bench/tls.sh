#!/usr/bin/env bash
# The two TLS stacks issue 12 weighs, measured the same way: minreq 3
# (rustls 0.23 + aws-lc-rs, platform verifier for the system store) and
# rustls 0.23 + ring under a hand-written HTTP/1.1 exchange (what the agent
# uses). Two tiny programs in bench/tls-compare/, built with the agent's
# release profile (opt-level z, LTO, stripped) as static musl binaries for
# each target, print their size; on the host they then make N sequential
# https GETs (fresh connection each: TCP + full handshake + request) to a
# local `openssl s_server` with a throwaway CA and print the median.
#
#   bench/tls.sh                         # x86_64 and aarch64 musl, N=200
#   TARGETS=x86_64-unknown-linux-musl N=500 bench/tls.sh
#
# Needs what cross/install-deps.sh installs, and openssl. Stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets=${TARGETS:-"x86_64-unknown-linux-musl aarch64-unknown-linux-musl"}
n=${N:-200}
export CARGO_TARGET_DIR="$root/target/tls-compare"
tmp=$(mktemp -d)
srv=""
trap '[ -n "$srv" ] && kill "$srv" 2>/dev/null; rm -rf "$tmp"' EXIT

build() {  # build CRATE TARGET -> path of the binary
  local crate=$1 t=$2 low up
  low=${t//-/_}; up=$(tr 'a-z-' 'A-Z_' <<<"$t")
  local -a env=()
  case "$t" in
    aarch64-*) env+=("CC_$low=aarch64-linux-gnu-gcc" "AR_$low=aarch64-linux-gnu-ar" "CARGO_TARGET_${up}_LINKER=aarch64-linux-gnu-gcc") ;;
    x86_64-*-musl) env+=("CC_$low=musl-gcc") ;;
  esac
  env "${env[@]}" cargo build -q --release --manifest-path "bench/tls-compare/$crate/Cargo.toml" --target "$t" >&2
  echo "$CARGO_TARGET_DIR/$t/release/m-$crate"
}

echo "sizes (bytes, stripped, static):"
printf '  %-30s %12s %12s %10s\n' target "minreq 3" "rustls+ring" difference
for t in $targets; do
  a=$(build minreq3 "$t"); b=$(build ring "$t")
  sa=$(stat -c %s "$a"); sb=$(stat -c %s "$b")
  printf '  %-30s %12s %12s %+10d\n' "$t" "$sa" "$sb" $((sa - sb))
done

cd "$tmp"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 1 \
  -subj "/CN=bench CA" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 1 -extfile ext.cnf 2>/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
openssl s_server -quiet -accept "127.0.0.1:$port" -cert srv.pem -key srv.key -www >/dev/null 2>&1 &
srv=$!
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
host=$(uname -m)-unknown-linux-musl
echo "$n sequential https GETs to openssl s_server on 127.0.0.1 (TLS 1.3, P-256 certificate), $host:"
for crate in ring minreq3; do
  SSL_CERT_FILE="$tmp/ca.pem" "$CARGO_TARGET_DIR/$host/release/m-$crate" "https://localhost:$port/" "$n" | sed 's/^/  /'
done
