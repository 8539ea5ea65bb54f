#!/usr/bin/env bash
# scripts/bench.sh — `make bench`: start the network of bench/kme.toml on loopback, wait until
# the pools are pre-filled, run `kme-bench load`: status, encdec (direct pairs A-B), enc, relay
# (pairs A-C through B) and multicast (B, B2 and C), and stop the network by its PIDs.
# Reports: var/bench/<name>.json.
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
fill() { # master, its KME port, slave
  echo "bench: pre-filling $1's pool for $3 to $want keys ..."
  local deadline=$((SECONDS + 300)) have
  while :; do
    have=$(curl -s --http1.1 --cacert certs/ca.crt --cert "certs/$1.crt" --key "certs/$1.key" \
      "https://localhost:$2/api/v1/keys/$3/status" | sed -n 's/.*"stored_key_count":\([0-9]*\).*/\1/p')
    [[ -n "$have" && "$have" -ge "$want" ]] && break
    (( SECONDS < deadline )) || { echo "bench: pool stuck at ${have:-?} keys"; exit 1; }
    sleep 1
  done
  echo "bench: pool full ($have keys)"
}
# The pools a relay A -> C takes from: kme-a's on A-B, kme-b's on B-C.
fill sae-a 8441 sae-b
fill sae-b 8442 sae-c

run() { # report name, mode, extra args...
  local name=$1 mode=$2; shift 2
  echo; echo "== kme-bench load --mode $mode $* ($name)"
  "$BENCH" load --mode "$mode" --duration "$DURATION" --json-out "var/bench/$name.json" "$@"
}
run status status --connections 64
run encdec encdec --number 1 --size 256 --connections 64
run enc enc --number 128 --size 256 --connections 16
# Relayed pairs: enc at kme-a for sae-c, dec at kme-c (two hops, through kme-b).
run relay encdec --number 1 --size 256 --connections 64 --slave-url https://localhost:8443 \
  --slave-cert certs/sae-c.crt --slave-key certs/sae-c.key --slave-sae-id sae-c
# Multicast: one key for sae-b, sae-b2 (kme-b) and sae-c (kme-c); sae-b retrieves it.
run multicast encdec --number 1 --size 256 --connections 64 --additional-slaves sae-b2,sae-c
