#!/usr/bin/env bash
# make fuzz: the property tests beside every parser of outside bytes (`mod fuzz` in
# src/sae_api.rs, src/config.rs, actors/src/peer/protocol.rs, actors/src/link/sources/key_files.rs,
# bb84/src/pipeline.rs), with many more cases than `make test` runs, in release, bounded in
# time. Prints how many inputs ran and how fast. PROPTEST_CASES sets the cases per property.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
CASES=${PROPTEST_CASES:-100000}
cargo test --release --workspace --lib --no-run >/dev/null 2>&1 || cargo test --release --workspace --lib --no-run
start=$(date +%s.%N)
PROPTEST_CASES=$CASES timeout 900 cargo test --release --workspace --lib fuzz -- --test-threads 2 >var/fuzz.log 2>&1
end=$(date +%s.%N)
grep -E "^test .*fuzz" var/fuzz.log
properties=$(grep -cE "^test .*fuzz.* ok$" var/fuzz.log)
failed=$(grep -cE "^test .*fuzz.* FAILED$" var/fuzz.log || true)
awk -v p="$properties" -v c="$CASES" -v s="$start" -v e="$end" -v f="$failed" 'BEGIN {
  t = e - s; n = p * c;
  printf "make fuzz: %d properties x %d cases = %d inputs in %.1f s (%.0f inputs/s), %d failed\n", p, c, n, t, n / t, f }'
[[ "$failed" == 0 ]]
