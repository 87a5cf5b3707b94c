#!/usr/bin/env bash
# Instructions per request of the sidecar (callgrind), per kind of request: a count that does
# not move with the machine's load, for before/after comparisons of a change to the request
# path. Run after `bash bench/run.sh` has installed its tools (nginx, oha).
#
# Usage: SIDECAR_BIN=target/dist/apipolicy-sidecar bash bench/callgrind.sh [N]
#   N requests per kind (default 20000), 16 connections; prints `kind instructions/request`.
#   Each kind's profile stays in bench/work/callgrind/KIND.out (callgrind_annotate reads it).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/small-upstream.sh
source "$BENCH_DIR/small-upstream.sh"
WORK="$BENCH_DIR/work/callgrind"
N=${1:-20000}
SIDECAR_BIN=${SIDECAR_BIN:-$BENCH_DIR/../target/dist/apipolicy-sidecar}
OHA=$(command -v oha || echo "$BENCH_DIR/work/tools/bin/oha")
UP=127.0.0.1:18180
PROXY=127.0.0.1:18181
ADMIN=127.0.0.1:18182

command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
[[ -x "$OHA" ]] || { echo "oha is missing: run bash bench/run.sh once" >&2; exit 1; }
rm -rf "$WORK" && mkdir -p "$WORK/tmp"

small_upstream_conf "$WORK" "$UP" >"$WORK/nginx.conf"

nginx -c "$WORK/nginx.conf" &
NGINX=$!
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
  "$SIDECAR_BIN" --threads 1 --policy "$BENCH_DIR/layers.yaml" --upstream "http://$UP" \
  --listen "$PROXY" --admin "$ADMIN" --access-log false --log warn 2>"$WORK/valgrind.err" &
SIDECAR=$!
trap 'kill $SIDECAR $NGINX 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -fsS "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.5; done

measure() { # kind path [baseline instructions]
  curl -fsS "http://$PROXY$2" >/dev/null # warm: fill the cache, open the upstream connection
  callgrind_control -z "$SIDECAR" >/dev/null 2>&1
  callgrind_control -i on "$SIDECAR" >/dev/null 2>&1
  "$OHA" -n "$N" -c 16 --no-tui "http://$PROXY$2" >/dev/null
  callgrind_control -i off "$SIDECAR" >/dev/null 2>&1
  rm -f "$WORK"/callgrind.out.*
  callgrind_control -d "$SIDECAR" >/dev/null 2>&1
  local dump
  dump=$(ls -t "$WORK"/callgrind.out.* | head -1)
  cp "$dump" "$WORK/${1//[ ()]/}.out" # for callgrind_annotate: which functions a kind pays for
  local per
  per=$(awk -v n="$N" '/^totals:/ {printf "%.0f", $2 / n; exit}' "$dump")
  if [[ -n "${3:-}" ]]; then
    awk -v p="$per" -v b="$3" -v kind="$1" 'BEGIN {printf "%-14s %.1fk instructions/request (%+.1f %% against its plain twins)\n", kind, p / 1000, (p - b) * 100 / b}'
  else
    awk -v p="$per" -v kind="$1" 'BEGIN {printf "%-14s %.1fk instructions/request\n", kind, p / 1000}'
  fi
  LAST=$per
}
measure pass-through /items
measure cache-hit /cache/items
measure pod-limited /limited/items
# Each resilience layer, configured and idle, against its plain twins (same path length, one
# route before it and one after: the mean of the two).
for layer in retry:retry-1 breaker:break-1 adaptive:adapt-1 slo-protect:guard-1; do
  kind=${layer%%:*} prefix=${layer##*:}
  measure "(before $kind)" "/plain-${prefix:0:1}/items"
  before=$LAST
  measure "(after $kind)" "/after-${prefix:0:1}/items"
  measure "$kind" "/$prefix/items" "$(((before + LAST) / 2))"
done
