#!/usr/bin/env bash
# certs/gen.sh — development/testing PKI for the kme demo network. NEVER use these in production.
#
# Usage: certs/gen.sh [CONFIG] [OUTDIR]
#   CONFIG  kme.toml to read the KME and SAE ids from (default: kme.toml at the repo root)
#   OUTDIR  where to write the files (default: the directory of this script)
#
# Makes, only where missing or no longer valid:
#   ca.crt / ca.key        EC P-256 CA, CN "kme dev CA", 10 years
#   <kme-id>.crt / .key    EC P-256, CN = id, ~2 years, EKU serverAuth+clientAuth,
#                          SAN DNS:localhost, IP:127.0.0.1, IP:::1
#   <sae-id>.crt / .key    EC P-256, CN = id (the SAE ID the KME derives), ~2 years, EKU clientAuth
#   <operator-id>.crt/.key the same for each [[operator]] (admin listeners with TLS)
# Re-running changes nothing. If the CA is (re)generated, every leaf certificate is re-issued;
# a leaf that does not verify against the current CA (or has expired) is re-issued too.
# Tools: bash, openssl (3.x), awk.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${1:-$SCRIPT_DIR/../kme.toml}"
OUTDIR="${2:-$SCRIPT_DIR}"

CA_DAYS=3650
LEAF_DAYS=730
CA_CN="kme dev CA"

say() { printf 'gen.sh: %s\n' "$*"; }
die() { printf 'gen.sh: error: %s\n' "$*" >&2; exit 1; }

command -v openssl >/dev/null 2>&1 || die "openssl not found in PATH"
command -v awk >/dev/null 2>&1 || die "awk not found in PATH"
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/kme-certs.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# --- read the ids: "kme <id>" / "sae <id>" / "operator <id>" lines, only for `id` keys directly
# under [[kme]], [[sae]] or [[operator]] (any other table header, e.g. [[link]] or [tls], ends
# the section). Plain POSIX awk. Operators get client certificates like SAEs.
IDS="$(awk '
  {
    line = $0
    sub(/^[ \t]+/, "", line)
    if (line ~ /^\[/) {                       # a table header: [name] or [[name]]
      hdr = line
      sub(/[ \t]*#.*$/, "", hdr)
      sub(/[ \t]+$/, "", hdr)
      if (hdr == "[[kme]]") section = "kme"
      else if (hdr == "[[sae]]") section = "sae"
      else if (hdr == "[[operator]]") section = "operator"
      else section = ""
      next
    }
    if (section == "") next
    if (line !~ /^id[ \t]*=/) next
    val = line
    sub(/^id[ \t]*=[ \t]*/, "", val)
    if (val !~ /^"[^"]*"/) { printf "BAD %s\n", line; next }
    sub(/^"/, "", val)
    sub(/".*$/, "", val)
    printf "%s %s\n", section, val
  }
' "$CONFIG")"

KMES=()
SAES=()
declare -A SEEN=()
while read -r role id; do
  [[ -n "${role:-}" ]] || continue
  [[ "$role" != "BAD" ]] || die "$CONFIG: cannot parse id line: $id (expected id = \"...\")"
  [[ "$id" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
    || die "$CONFIG: id '$id' is not usable as a file name/CN (allowed: letters, digits, . _ -)"
  [[ "$id" != "ca" ]] || die "$CONFIG: id 'ca' is reserved for the CA files"
  [[ -z "${SEEN[$id]:-}" ]] || die "$CONFIG: id '$id' appears more than once"
  SEEN[$id]="$role"
  if [[ "$role" == "kme" ]]; then KMES+=("$id"); else SAES+=("$id"); fi
done <<<"$IDS"

(( ${#KMES[@]} > 0 )) || die "$CONFIG: no [[kme]] id found"
say "config $CONFIG: KMEs: ${KMES[*]}; SAEs and operators: ${SAES[*]:-(none)}"
say "output directory: $OUTDIR"

# New EC P-256 private key (PKCS#8 PEM), mode 600 from the start.
new_key() {
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -pkeyopt ec_param_enc:named_curve -out "$1" 2>/dev/null) || die "cannot generate key $1"
  chmod 600 "$1"
}

rand_serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

# --- CA ---------------------------------------------------------------------------------------
CA_CRT="$OUTDIR/ca.crt"
CA_KEY="$OUTDIR/ca.key"
CA_NEW=0
ca_reason=""
if [[ ! -f "$CA_CRT" || ! -f "$CA_KEY" ]]; then
  ca_reason="missing"
elif ! openssl x509 -in "$CA_CRT" -noout -checkend 86400 >/dev/null 2>&1; then
  ca_reason="expired, expiring within a day, or unreadable"
elif [[ "$(openssl x509 -in "$CA_CRT" -noout -pubkey 2>/dev/null)" \
     != "$(openssl pkey -in "$CA_KEY" -pubout 2>/dev/null)" ]]; then
  ca_reason="ca.key does not match ca.crt"
fi

if [[ -n "$ca_reason" ]]; then
  say "CA: $ca_reason -> generating a new CA (all leaf certificates will be re-issued)"
  new_key "$TMP/ca.key"
  openssl req -x509 -new -key "$TMP/ca.key" -sha256 -days "$CA_DAYS" \
    -subj "/CN=$CA_CN" -set_serial "$(rand_serial)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$TMP/ca.crt" 2>/dev/null || die "cannot create the CA certificate"
  mv -f "$TMP/ca.key" "$CA_KEY"
  mv -f "$TMP/ca.crt" "$CA_CRT"
  chmod 600 "$CA_KEY"
  chmod 644 "$CA_CRT"
  CA_NEW=1
else
  say "CA: $CA_CRT is present and valid (kept)"
fi

# --- leaf certificates --------------------------------------------------------------------------
# issue ROLE ID
issue() {
  local role="$1" id="$2"
  local crt="$OUTDIR/$id.crt" key="$OUTDIR/$id.key" reason=""
  if (( CA_NEW )); then
    reason="new CA"
  elif [[ ! -f "$crt" || ! -f "$key" ]]; then
    reason="missing"
  elif ! openssl verify -CAfile "$CA_CRT" "$crt" >/dev/null 2>&1; then
    reason="does not verify against ca.crt (or expired)"
  elif ! openssl x509 -in "$crt" -noout -checkend 86400 >/dev/null 2>&1; then
    reason="expires within a day"
  elif [[ "$(openssl x509 -in "$crt" -noout -pubkey 2>/dev/null)" \
       != "$(openssl pkey -in "$key" -pubout 2>/dev/null)" ]]; then
    reason="$id.key does not match $id.crt"
  fi
  if [[ -z "$reason" ]]; then
    say "$role $id: $crt is present and valid (kept)"
    return 0
  fi

  say "$role $id: $reason -> issuing $id.crt / $id.key"
  local ext="$TMP/$id.ext"
  {
    echo "basicConstraints = critical,CA:FALSE"
    echo "keyUsage = critical,digitalSignature,keyAgreement"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid"
    if [[ "$role" == "kme" ]]; then
      echo "extendedKeyUsage = serverAuth,clientAuth"
      echo "subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1"
    else
      echo "extendedKeyUsage = clientAuth"
    fi
  } >"$ext"
  new_key "$TMP/$id.key"
  openssl req -new -key "$TMP/$id.key" -subj "/CN=$id" -out "$TMP/$id.csr" 2>/dev/null \
    || die "cannot create the CSR for $id"
  openssl x509 -req -in "$TMP/$id.csr" -CA "$CA_CRT" -CAkey "$CA_KEY" \
    -set_serial "$(rand_serial)" -days "$LEAF_DAYS" -sha256 -extfile "$ext" \
    -out "$TMP/$id.crt" 2>/dev/null || die "cannot sign the certificate for $id"
  openssl verify -CAfile "$CA_CRT" "$TMP/$id.crt" >/dev/null 2>&1 \
    || die "freshly issued $id.crt does not verify against $CA_CRT"
  mv -f "$TMP/$id.key" "$key"
  mv -f "$TMP/$id.crt" "$crt"
  chmod 600 "$key"
  chmod 644 "$crt"
}

for id in "${KMES[@]}"; do issue kme "$id"; done
for id in "${SAES[@]}"; do issue sae "$id"; done

say "done. These are DEVELOPMENT/TEST certificates only — never use them in production."
