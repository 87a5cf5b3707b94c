#!/usr/bin/env bash
# Instructions per request of the sidecar (callgrind), per kind of request: a count that does
# not move with the machine's load, for before/after comparisons of a change to the request
# path. Run after `bash bench/run.sh` has installed its tools (nginx, oha).
#
# Usage: SIDECAR_BIN=target/dist/apipolicy-sidecar bash bench/callgrind.sh [N]
#   N requests per kind (default 20000), 16 connections; prints `kind instructions/request`.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
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

cat >"$WORK/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/tmp;
    keepalive_requests 1000000;
    server {
        listen $UP;
        location / {
            default_type application/json;
            return 200 '{"id":42,"name":"bench","status":"ok","tags":["a","b","c"],"price":12.5,"ts":"2024-01-01T00:00:00Z"}';
        }
    }
}
EOF
cat >"$WORK/policy.yaml" <<EOF
apiVersion: apipolicy.dev/v1alpha1
kind: ApiPolicy
metadata: {name: callgrind}
spec:
  selector: {matchLabels: {app: bench}}
  upstream: {port: 18180}
  routes:
  - name: cache
    match: {path: {prefix: /cache}}
    cache: {maxAge: 600s}
  - name: limited
    match: {path: {prefix: /limited}}
    rateLimit: {requests: 1000000000, per: 1s, scope: Pod}
  # The resilience layers, configured and idle (the app never fails): what each costs a
  # pass-through request that needs none of it.
  - name: retried
    match: {path: {prefix: /retried}}
    retry: {attempts: 3}
  - name: breaker
    match: {path: {prefix: /breaker}}
    circuitBreaker: {consecutiveFailures: 5, failureRatio: 0.5}
  - name: adaptive
    match: {path: {prefix: /adaptive}}
    concurrencyLimit: {adaptive: {minLimit: 64, maxLimit: 1000}}
  - name: protected
    match: {path: {prefix: /protected}}
  slos:
  - name: availability
    objective: 99.9
    indicator: {availability: {}}
    routes: [protected]
    protect: {actions: [ServeStale, TightenLimits]}
EOF

nginx -c "$WORK/nginx.conf" &
NGINX=$!
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
  "$SIDECAR_BIN" --threads 1 --policy "$WORK/policy.yaml" --upstream "http://$UP" \
  --listen "$PROXY" --admin "$ADMIN" --access-log false --log warn 2>"$WORK/valgrind.err" &
SIDECAR=$!
trap 'kill $SIDECAR $NGINX 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -fsS "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.5; done

measure() { # kind path
  curl -fsS "http://$PROXY$2" >/dev/null # warm: fill the cache, open the upstream connection
  callgrind_control -z "$SIDECAR" >/dev/null 2>&1
  callgrind_control -i on "$SIDECAR" >/dev/null 2>&1
  "$OHA" -n "$N" -c 16 --no-tui "http://$PROXY$2" >/dev/null
  callgrind_control -i off "$SIDECAR" >/dev/null 2>&1
  rm -f "$WORK"/callgrind.out.*
  callgrind_control -d "$SIDECAR" >/dev/null 2>&1
  local dump
  dump=$(ls -t "$WORK"/callgrind.out.* | head -1)
  awk -v n="$N" -v kind="$1" '/^totals:/ {printf "%-14s %.1fk instructions/request\n", kind, $2 / n / 1000; exit}' "$dump"
}
measure pass-through /items
measure cache-hit /cache/items
measure pod-limited /limited/items
measure retry /retried/items
measure breaker /breaker/items
measure adaptive /adaptive/items
measure slo-protect /protected/items
