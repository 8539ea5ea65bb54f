#!/usr/bin/env bash
# scripts/bench.sh — `make bench`: start the network of bench/kme.toml on loopback, wait until
# kme-a's pool for sae-b is pre-filled, run `kme-bench load` in the modes status, encdec and enc,
# and stop the network by its PIDs. Reports: var/bench/<mode>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=target/release/kme-bench
CONFIG=bench/kme.toml
DURATION=${BENCH_DURATION:-10s}
mkdir -p var/bench
rm -rf var/bench-data
trap 'scripts/net.sh stop' EXIT
scripts/net.sh start "$CONFIG" --background >/dev/null

want=$(awk '/^max_key_count/ { print $3; exit }' "$CONFIG")
echo "bench: pre-filling kme-a's pool for sae-b to $want keys ..."
deadline=$((SECONDS + 300))
while :; do
  have=$(curl -s --http1.1 --cacert certs/ca.crt --cert certs/sae-a.crt --key certs/sae-a.key \
    https://localhost:8441/api/v1/keys/sae-b/status | sed -n 's/.*"stored_key_count":\([0-9]*\).*/\1/p')
  [[ -n "$have" && "$have" -ge "$want" ]] && break
  (( SECONDS < deadline )) || { echo "bench: pool stuck at ${have:-?} keys"; exit 1; }
  sleep 1
done
echo "bench: pool full ($have keys)"

run() { # mode, extra args...
  local mode=$1; shift
  echo; echo "== kme-bench load --mode $mode $*"
  "$BENCH" load --mode "$mode" --duration "$DURATION" --json-out "var/bench/$mode.json" "$@"
}
run status --connections 64
run encdec --number 1 --size 256 --connections 64
run enc --number 128 --size 256 --connections 16
