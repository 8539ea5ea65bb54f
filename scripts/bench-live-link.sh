#!/usr/bin/env bash
# scripts/bench-live-link.sh — `make bench-live-link`: start the two KMEs of bench/bb84-link.toml
# on loopback (one unpaced BB84 link), let the link run for BENCH_SECONDS (default 40), print
# its status every 10 s (QBER, f, sifted and secret bit/s over the last 16 frames, frame
# counts), write the last one to var/bench/live-link.json, and stop the KMEs by their PIDs.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=bench/bb84-link.toml
SECONDS_TO_RUN=${BENCH_SECONDS:-40}
mkdir -p var/bench
rm -rf var/bench-data/live-link
trap 'scripts/net.sh stop' EXIT
scripts/net.sh start "$CONFIG" --background >/dev/null

status() {
  curl -s --http1.1 --max-time 5 --cacert certs/ca.crt --cert certs/sae-a.crt \
    --key certs/sae-a.key https://localhost:8441/api/v1/keys/sae-b/status
}
echo "bench-live-link: one unpaced BB84 link (20 km, 1.1 Mbit frames) for ${SECONDS_TO_RUN} s"
start=$SECONDS
while (( SECONDS - start < SECONDS_TO_RUN )); do
  sleep 10
  status | python3 -c '
import json, sys
q = json.load(sys.stdin)["status_extension"]["link"]["qkd"]
print("  frames ok %4d aborted %2d  QBER %.2f%%  f %.3f  sifted %.2f Mbit/s  secret %.2f Mbit/s" % (
    q["frames_ok"], q["frames_aborted"], 100 * (q.get("qber") or 0), q.get("efficiency") or 0,
    q["sifted_bits_per_s"] / 1e6, q["secret_bits_per_s"] / 1e6))' || echo "  (no status yet)"
done
status >var/bench/live-link.json
echo "report: var/bench/live-link.json"
