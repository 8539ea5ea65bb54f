#!/usr/bin/env bash
# certs/revoke.sh — revoke certificates of the dev/test PKI and (re)write its CRL.
#
# Usage: certs/revoke.sh [--dir DIR] [NAME...]
#   DIR    the PKI's directory, with ca.crt and ca.key (default: the directory of this script)
#   NAME   DIR/NAME.crt is revoked; with no NAME the CRL is only signed again (a first, empty
#          one, or a renewal before its next update)
#
# Writes DIR/ca.crl (PEM; next update in 30 days) from DIR/crl-index.txt, which keeps every
# revocation. List the CRL in the network file (`[tls] crl_files = ["certs/ca.crl"]`) and
# reload the KMEs (SIGHUP or `kme admin reload`): from then on a revoked certificate gets
# 401 (SAE API, operator listener) or 403 (KME-to-KME), on open connections too.
# Tools: bash, openssl (3.x), GNU date.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${1:-}" == "--dir" ]]; then
  DIR="$(cd "${2:?--dir needs a directory}" && pwd)"
  shift 2
fi
die() { printf 'revoke.sh: error: %s\n' "$*" >&2; exit 1; }
[[ -f "$DIR/ca.crt" && -f "$DIR/ca.key" ]] || die "no ca.crt and ca.key in $DIR"

INDEX="$DIR/crl-index.txt"
touch "$INDEX"
[[ -f "$DIR/crl-number" ]] || echo 01 > "$DIR/crl-number"

for name in "$@"; do
  crt="$DIR/$name.crt"
  [[ -f "$crt" ]] || die "no certificate $crt"
  openssl verify -CAfile "$DIR/ca.crt" "$crt" >/dev/null 2>&1 || die "$crt is not of this CA"
  serial="$(openssl x509 -in "$crt" -noout -serial)"
  serial="${serial#serial=}"
  if grep -q "	$serial	" "$INDEX"; then
    printf 'revoke.sh: %s (serial %s) was revoked already\n' "$name" "$serial"
    continue
  fi
  end="$(openssl x509 -in "$crt" -noout -enddate)"
  expiry="$(date -u -d "${end#notAfter=}" +%y%m%d%H%M%SZ)"
  subject="$(openssl x509 -in "$crt" -noout -subject -nameopt compat)"
  printf 'R\t%s\t%s\t%s\tunknown\t%s\n' "$expiry" "$(date -u +%y%m%d%H%M%SZ)" "$serial" \
    "${subject#subject=}" >> "$INDEX"
  printf 'revoke.sh: %s (serial %s) revoked\n' "$name" "$serial"
done

CNF="$(mktemp "${TMPDIR:-/tmp}/kme-crl.XXXXXX")"
trap 'rm -f "$CNF"' EXIT
cat > "$CNF" <<CNF
[ca]
default_ca = kme
[kme]
database = $INDEX
crlnumber = $DIR/crl-number
default_md = sha256
default_crl_days = 30
CNF
openssl ca -batch -gencrl -config "$CNF" -keyfile "$DIR/ca.key" -cert "$DIR/ca.crt" \
  -out "$DIR/ca.crl.tmp" 2>/dev/null || die "openssl ca -gencrl failed"
mv "$DIR/ca.crl.tmp" "$DIR/ca.crl"
printf 'revoke.sh: %s written (%s revoked)\n' "$DIR/ca.crl" "$(grep -c '^R' "$INDEX" || true)"
