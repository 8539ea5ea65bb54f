#!/usr/bin/env bash
# scripts/net.sh — start or stop a network of kme processes on loopback (used by make).
#
#   net.sh start CONFIG [--background]   start every [[kme]] of CONFIG, wait until each answers,
#                                        print the endpoints and a curl example; in the
#                                        foreground, Ctrl-C stops them all
#   net.sh stop                          stop the network started in the background, by PID
#
# PIDs and logs: var/run/<kme-id>.pid and var/run/<kme-id>.log. Processes are only ever stopped
# by their recorded PIDs.
set -euo pipefail
cd "$(dirname "$0")/.."
KME=${KME_BIN:-target/release/kme}
RUN=var/run

say() { printf 'net.sh: %s\n' "$*"; }

stop_all() {
  local pidfile pid
  for pidfile in "$RUN"/*.pid; do
    [[ -e "$pidfile" ]] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      # SIGTERM: the KME finishes the requests in flight (shutdown_grace_s, default 10 s)
      # and exits 0; SIGKILL only if it is still there after that and a margin.
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      say "stopped $(basename "$pidfile" .pid) (pid $pid)"
    fi
    rm -f "$pidfile"
  done
}

wait_port() { # host:port, seconds
  local host=${1%:*} port=${1##*:} deadline=$((SECONDS + $2))
  while (( SECONDS < deadline )); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  return 1
}

start() {
  local config=$1 mode=${2:-}
  mkdir -p "$RUN"
  for pidfile in "$RUN"/*.pid; do
    [[ -e "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && {
      say "a network is already running (see $RUN/*.pid); run 'make stop' first"; exit 1; }
  done
  rm -f "$RUN"/*.pid
  mapfile -t kmes < <("$KME" check-config --config "$config" | awk '$1 == "KME" { print $2, $5 }')
  (( ${#kmes[@]} > 0 )) || { say "no [[kme]] in $config"; exit 1; }
  if [[ "$mode" != "--background" ]]; then trap 'stopping=1; echo; stop_all; exit 0' INT TERM; fi
  for entry in "${kmes[@]}"; do
    read -r id _ <<<"$entry"
    # Same process group: Ctrl-C reaches the KMEs too, and each shuts down by itself.
    "$KME" run --config "$config" --kme "$id" >"$RUN/$id.log" 2>&1 &
    echo $! >"$RUN/$id.pid"
  done
  for entry in "${kmes[@]}"; do
    read -r id url <<<"$entry"
    local addr=${url#https://}
    if ! wait_port "$addr" 30 || ! kill -0 "$(cat "$RUN/$id.pid")" 2>/dev/null; then
      say "$id did not come up; its log ($RUN/$id.log) ends with:"; tail -n 20 "$RUN/$id.log" >&2
      stop_all; exit 1
    fi
    say "$id is up: SAE API $url (log: $RUN/$id.log)"
  done
  echo
  "$KME" curl-example --config "$config"
  echo
  if [[ "$mode" == "--background" ]]; then
    say "running in the background; 'make stop' stops it"
    return 0
  fi
  say "Ctrl-C stops the network"
  while true; do
    for entry in "${kmes[@]}"; do
      read -r id _ <<<"$entry"
      # No PID file: `net.sh stop` (or `make stop`) stopped the network from elsewhere.
      pid=$(cat "$RUN/$id.pid" 2>/dev/null) || { echo; say "stopped by net.sh stop"; exit 0; }
      if ! kill -0 "$pid" 2>/dev/null; then
        # Ctrl-C reaches the KMEs too; one that stopped on it is no failure.
        if [[ -n "${stopping:-}" ]] || grep -qE "SIG(INT|TERM) received" "$RUN/$id.log"; then
          echo; stop_all; exit 0
        fi
        say "$id exited; its log ends with:"; tail -n 20 "$RUN/$id.log" >&2; stop_all; exit 1
      fi
    done
    sleep 1 & wait $!
  done
}

case "${1:-}" in
  start) start "${2:-kme.toml}" "${3:-}" ;;
  stop) stop_all ;;
  *) echo "usage: $0 start CONFIG [--background] | stop" >&2; exit 2 ;;
esac
