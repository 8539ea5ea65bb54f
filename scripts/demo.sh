#!/usr/bin/env bash
# scripts/demo.sh — a scripted SAE session with curl against the running default network
# (`make start` or `make run` in another terminal): status, enc_keys at kme-a for sae-b,
# dec_keys at kme-b by sae-b showing the identical key, a key relayed to sae-c two hops away,
# a multicast to sae-b, sae-b2 and sae-c, then the error cases.
set -uo pipefail
cd "$(dirname "$0")/.."
A=https://localhost:8441 B=https://localhost:8442
sae() { local who=$1; shift; curl -sS --http1.1 --cacert certs/ca.crt --cert "certs/$who.crt" --key "certs/$who.key" -w '  -> HTTP %{http_code}\n' "$@"; }
step() { printf '\n== %s\n' "$*"; }
json() { python3 -c 'import sys,json; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

# A fresh network's first BB84 frames take about a second: wait (at most 20 s) for keys.
for _ in $(seq 40); do
  n=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-a.crt --key certs/sae-a.key \
    "$A/api/v1/keys/sae-b/status" 2>/dev/null | json 'd["stored_key_count"]' 2>/dev/null) || n=0
  [[ "${n:-0}" -gt 2 ]] && break
  sleep 0.5
done

step "status: sae-a asks kme-a about keys for sae-b"
sae sae-a "$A/api/v1/keys/sae-b/status"

step "enc_keys: sae-a gets 2 keys of 256 bits for sae-b at kme-a"
enc=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-a.crt --key certs/sae-a.key \
  -H 'Content-Type: application/json' -d '{"number":2,"size":256}' "$A/api/v1/keys/sae-b/enc_keys")
echo "$enc"
id=$(echo "$enc" | json 'd["keys"][0]["key_ID"]') || { echo "no key: is the network running?"; exit 1; }
key=$(echo "$enc" | json 'd["keys"][0]["key"]')
id2=$(echo "$enc" | json 'd["keys"][1]["key_ID"]')

step "dec_keys: sae-b retrieves key $id at kme-b"
dec=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-b.crt --key certs/sae-b.key "$B/api/v1/keys/sae-a/dec_keys?key_ID=$id")
echo "$dec"
if [[ "$(echo "$dec" | json 'd["keys"][0]["key"]')" == "$key" ]]; then echo "identical key at both ends: $key"; else echo "MISMATCH"; exit 1; fi

step "dec_keys (POST) for the second key"
sae sae-b -H 'Content-Type: application/json' -d "{\"key_IDs\":[{\"key_ID\":\"$id2\"}]}" "$B/api/v1/keys/sae-a/dec_keys"

step "error: the same key again (consumed once) -> 400"
sae sae-b "$B/api/v1/keys/sae-a/dec_keys?key_ID=$id"
step "error: sae-b2 is not a slave of a fresh key -> 401, and sae-b still gets it"
id3=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-a.crt --key certs/sae-a.key -d '{}' "$A/api/v1/keys/sae-b/enc_keys" | json 'd["keys"][0]["key_ID"]')
sae sae-b2 "$B/api/v1/keys/sae-a/dec_keys?key_ID=$id3"
sae sae-b "$B/api/v1/keys/sae-a/dec_keys?key_ID=$id3"
step "error: size not a multiple of 8 -> 400"
sae sae-a -d '{"size":100}' "$A/api/v1/keys/sae-b/enc_keys"
step "error: malformed JSON -> 400"
sae sae-a -d '{"number":' "$A/api/v1/keys/sae-b/enc_keys"
step "error: unsupported extension_mandatory -> 400"
sae sae-a -d '{"extension_mandatory":[{"abc_route_type":"indirect"}]}' "$A/api/v1/keys/sae-b/enc_keys"

C=https://localhost:8443
# The B–C link is longer (50 km): wait (at most 30 s) until the route to sae-c carries keys.
for _ in $(seq 60); do
  n=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-a.crt --key certs/sae-a.key \
    "$A/api/v1/keys/sae-c/status" 2>/dev/null | json 'd["stored_key_count"]' 2>/dev/null) || n=0
  [[ "${n:-0}" -gt 2 ]] && break
  sleep 0.5
done
step "relay: sae-a asks kme-a about keys for sae-c, two hops away (the route is in status_extension)"
sae sae-a "$A/api/v1/keys/sae-c/status"
step "relay: sae-a gets a key for sae-c at kme-a; kme-b forwards it one-time-pad encrypted"
enc=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-a.crt --key certs/sae-a.key \
  -d '{"number":1}' "$A/api/v1/keys/sae-c/enc_keys")
echo "$enc"
id=$(echo "$enc" | json 'd["keys"][0]["key_ID"]') || { echo "no relayed key"; exit 1; }
key=$(echo "$enc" | json 'd["keys"][0]["key"]')
dec=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-c.crt --key certs/sae-c.key "$C/api/v1/keys/sae-a/dec_keys?key_ID=$id")
echo "$dec"
if [[ "$(echo "$dec" | json 'd["keys"][0]["key"]')" == "$key" ]]; then echo "identical key at kme-a and kme-c: $key"; else echo "MISMATCH"; exit 1; fi
step "multicast: one key for sae-b and sae-b2 (kme-b) and sae-c (kme-c)"
enc=$(curl -sS --http1.1 --cacert certs/ca.crt --cert certs/sae-a.crt --key certs/sae-a.key \
  -d '{"additional_slave_SAE_IDs":["sae-b2","sae-c"]}' "$A/api/v1/keys/sae-b/enc_keys")
echo "$enc"
id=$(echo "$enc" | json 'd["keys"][0]["key_ID"]') || { echo "no multicast key"; exit 1; }
key=$(echo "$enc" | json 'd["keys"][0]["key"]')
for who in sae-b:$B sae-b2:$B sae-c:$C; do
  got=$(curl -sS --http1.1 --cacert certs/ca.crt --cert "certs/${who%%:*}.crt" --key "certs/${who%%:*}.key" \
    "${who#*:}/api/v1/keys/sae-a/dec_keys?key_ID=$id" | json 'd["keys"][0]["key"]')
  if [[ "$got" == "$key" ]]; then echo "${who%%:*}: identical key"; else echo "${who%%:*}: MISMATCH"; exit 1; fi
done
step "error: a direct route to sae-c made mandatory -> 400"
sae sae-a -d '{"extension_mandatory":[{"kme_route_type":"direct"}]}' "$A/api/v1/keys/sae-c/enc_keys"
step "error: no client certificate -> 401"
curl -sS --http1.1 --cacert certs/ca.crt -w '  -> HTTP %{http_code}\n' "$A/api/v1/keys/sae-b/status"
step "error: a KME certificate on the SAE API -> 401"
sae kme-b "$A/api/v1/keys/sae-b/status"
